// One client connection of kvwaved: reads frames (until Hello, recvmsg on the raw socket so a
// Hello can carry the shared-memory fd; after it, asio reads), hands requests to the server's
// compute arena (Ping runs on the strand), and writes replies in the order they complete
// (pipelined requests are answered out of order, matched by id).
//
// Limits, each checked before the work it bounds (issue 15):
//  * before Hello succeeds, frames may be at most rpc.preauth_max_frame_bytes and the read buffer
//    is small, so an unauthenticated peer can make kvwaved hold ~100 KiB; after it, frames up to
//    rpc.max_frame_bytes, whose bodies become resident only as their bytes arrive;
//  * Hello must succeed within rpc.handshake_timeout_ms of accept; a session with nothing in
//    flight that sends no frame for rpc.idle_timeout_ms (when set) is closed;
//  * at most rpc.max_in_flight_per_connection requests are computed at once: further frames
//    stay in the decoder and the socket is not read;
//  * the reply backlog (rpc/reply_backlog.h, rpc.max_queued_reply_bytes): a request reserves its
//    inline outputs before its work; one that does not fit is deferred (parked here, nothing
//    done) and run again once the client has read replies; meanwhile nothing more is read.
// A frame that breaks the framing (bad magic, version, size) is answered with an ERROR frame and
// the connection is closed after it is flushed.
//
// Thread-safety: every member is touched only on the connection's strand, except `session_`
// (shared with compute tasks; see rpc/session.h), `backlog_` (atomic) and the immutable ids.
#ifndef KVWAVE_RPC_CONNECTION_H_
#define KVWAVE_RPC_CONNECTION_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "boost/asio/posix/stream_descriptor.hpp"
#include "boost/asio/steady_timer.hpp"
#include "boost/asio/strand.hpp"
#include "rpc/frame.h"
#include "rpc/reply_backlog.h"
#include "rpc/session.h"

namespace kvwave::rpc {

class Server;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Server& server, int fd, std::shared_ptr<Session> session);
  ~Connection();

  // Starts reading and the handshake timer.
  void Start();
  // Closes once the replies already queued are written (posted to the strand; any thread).
  void CloseAfterFlush();

 private:
  using TimePoint = std::chrono::steady_clock::time_point;
  // A request that was handed to compute and deferred there (its reply did not fit the backlog).
  struct Deferred {
    std::shared_ptr<Frame> frame;
    TimePoint received;
  };

  void ArmRead();
  void OnReadable(const boost::system::error_code& ec);
  // Before Hello: wait, then recvmsg (a Hello may carry the region's fd). After: async reads.
  void OnRead(const boost::system::error_code& ec, size_t n);
  enum class ReadResult { kMore, kIdle, kStop };  // kStop: closed or closing, do not re-arm
  ReadResult ReadOnce();
  // Decodes the n bytes just read into read_buffer_ and handles the frames.
  ReadResult Consume(size_t n);
  ReadResult ConsumeBeforeHello(std::span<const std::byte> data);
  void RejectStream(const absl::Status& status);
  // True while another request may be handed to compute.
  bool CanDispatch() const;
  // Hands out decoded frames (deferred ones first) while CanDispatch().
  void DispatchReady();
  void OnHello(Frame frame);
  void OnFrame(Frame frame);
  // `retry`: a deferred request run again (at most one at a time: see RetryDeferred).
  void Compute(std::shared_ptr<Frame> frame, TimePoint received, bool retry = false);
  // Runs the oldest deferred request again (or answers them UNAVAILABLE when draining). One at a
  // time: deferred requests compete for the same room, and one alone always gets it.
  void RetryDeferred();
  // `counted`: the frame's bytes are already in backlog_ (added by Service::Handle).
  void Reply(std::string frame, bool counted);
  void WriteNext();
  void OnWritten(const boost::system::error_code& ec);
  void ArmTimer(std::chrono::milliseconds after);
  void OnTimer(const boost::system::error_code& ec);
  void CloseNow();
  void CloseStrayFds();

  Server& server_;
  boost::asio::strand<boost::asio::io_context::executor_type> strand_;
  boost::asio::posix::stream_descriptor socket_;
  boost::asio::steady_timer timer_;  // handshake, then idle timeout
  std::shared_ptr<Session> session_;
  FrameDecoder decoder_;
  std::vector<std::byte> read_buffer_;  // small before Hello
  std::vector<int> fds_;
  size_t fds_received_ = 0;  // before Hello, kept or not (the kernel may drop some: then +1)
  ReplyBacklog backlog_;
  std::deque<std::string> replies_;
  std::deque<Deferred> deferred_;
  int in_flight_ = 0;
  bool retrying_ = false;  // a deferred request is being run again
  TimePoint last_frame_;
  bool reading_ = false;
  bool writing_ = false;
  bool close_after_flush_ = false;
  bool closed_ = false;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_CONNECTION_H_
