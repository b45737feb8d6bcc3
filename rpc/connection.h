// One client connection of kvwaved: reads frames (until Hello, recvmsg on the raw socket so a
// Hello can carry the shared-memory fd; after it, asio reads), hands requests to the server's
// compute arena (Ping runs on the strand), and writes replies in the order they complete
// (pipelined requests are answered out of order, matched by id).
//
// Flow control: at most kMaxInFlight requests per connection are computed at once and at most
// kMaxQueuedReplyBytes of replies wait for the client to read them; past either, the connection
// stops reading until it drains. A frame that breaks the framing (bad magic, version, size) is
// answered with an ERROR frame and the connection is closed after it is flushed.
//
// Thread-safety: every member is touched only on the connection's strand, except `session_`
// (shared with compute tasks; see rpc/session.h) and the immutable ids.
#ifndef KVWAVE_RPC_CONNECTION_H_
#define KVWAVE_RPC_CONNECTION_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "boost/asio/posix/stream_descriptor.hpp"
#include "boost/asio/strand.hpp"
#include "rpc/frame.h"
#include "rpc/session.h"

namespace kvwave::rpc {

class Server;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  static constexpr int kMaxInFlight = 256;
  static constexpr size_t kMaxQueuedReplyBytes = size_t{64} << 20;

  Connection(Server& server, int fd, std::shared_ptr<Session> session);
  ~Connection();

  void Start();
  // Closes once the replies already queued are written (posted to the strand; any thread).
  void CloseAfterFlush();

 private:
  void ArmRead();
  void OnReadable(const boost::system::error_code& ec);
  // Before Hello: wait, then recvmsg (a Hello may carry the region's fd). After: async reads.
  void OnRead(const boost::system::error_code& ec, size_t n);
  enum class ReadResult { kMore, kIdle, kStop };  // kStop: closed or closing, do not re-arm
  ReadResult ReadOnce();
  // Decodes the n bytes just read into read_buffer_ and handles the frames.
  ReadResult Consume(size_t n);
  void OnFrame(Frame frame);
  void Reply(std::string frame);
  void WriteNext();
  void OnWritten(const boost::system::error_code& ec);
  void CloseNow();
  void CloseStrayFds();

  Server& server_;
  boost::asio::strand<boost::asio::io_context::executor_type> strand_;
  boost::asio::posix::stream_descriptor socket_;
  std::shared_ptr<Session> session_;
  FrameDecoder decoder_;
  std::vector<std::byte> read_buffer_;
  std::vector<int> fds_;
  std::deque<std::string> replies_;
  size_t queued_bytes_ = 0;
  int in_flight_ = 0;
  bool reading_ = false;
  bool writing_ = false;
  bool close_after_flush_ = false;
  bool closed_ = false;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_CONNECTION_H_
