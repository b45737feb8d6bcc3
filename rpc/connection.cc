#include "rpc/connection.h"

#include <unistd.h>

#include <new>

#include "absl/strings/str_cat.h"
#include "boost/asio/bind_executor.hpp"
#include "boost/asio/post.hpp"
#include "boost/asio/write.hpp"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/log.h"
#include "rpc/server.h"

namespace kvwave::rpc {
namespace asio = boost::asio;

namespace {
constexpr size_t kReadChunk = size_t{256} << 10;
// Before Hello a peer is not authenticated: read in small pieces (a Hello is a few dozen bytes).
constexpr size_t kPreAuthReadChunk = size_t{16} << 10;
// Fds kept before Hello; a Hello passes one. More are closed at once (and the Hello refused).
constexpr size_t kMaxPendingFds = 4;

// Lines a peer can make repeat: at most one a second each.
LogRateLimiter bad_frame_log;
LogRateLimiter timeout_log;
}  // namespace

Connection::Connection(Server& server, int fd, std::shared_ptr<Session> session)
    : server_(server),
      strand_(asio::make_strand(server.io())),
      socket_(server.io(), fd),
      timer_(server.io()),
      session_(std::move(session)),
      decoder_(static_cast<uint64_t>(server.settings().preauth_max_frame_bytes)),
      read_buffer_(kPreAuthReadChunk),
      backlog_(static_cast<uint64_t>(server.settings().max_queued_reply_bytes)) {
  boost::system::error_code ignored;
  socket_.non_blocking(true, ignored);
}

Connection::~Connection() {
  CloseStrayFds();
  server_.EndSession(session_->id());
}

void Connection::Start() {
  asio::post(strand_, [self = shared_from_this()] {
    self->ArmTimer(std::chrono::milliseconds(self->server_.settings().handshake_timeout_ms));
    self->ArmRead();
  });
}

void Connection::CloseAfterFlush() {
  asio::post(strand_, [self = shared_from_this()] {
    self->RetryDeferred();  // draining: parked requests are answered UNAVAILABLE
    self->close_after_flush_ = true;
    if (!self->writing_ && self->replies_.empty()) self->CloseNow();
  });
}

bool Connection::CanDispatch() const {
  return !closed_ && !close_after_flush_ &&
         in_flight_ < server_.settings().max_in_flight_per_connection && !backlog_.full();
}

void Connection::ArmRead() {
  if (closed_ || reading_ || close_after_flush_) return;
  // Frames already decoded, or parked, go first; until they are out, the socket is not read.
  if (decoder_.HasFrame() || !deferred_.empty() || !CanDispatch()) return;
  reading_ = true;
  if (session_->hello_done()) {
    if (read_buffer_.size() < kReadChunk) read_buffer_.resize(kReadChunk);
    // After Hello no fd may arrive (any sent are discarded by the kernel with the message), so a
    // plain read will do. Asio (1.18) re-registers the descriptor with epoll_ctl on every
    // async_wait; a read that was already waiting costs no such syscall, one per request saved.
    socket_.async_read_some(asio::buffer(read_buffer_),
                            asio::bind_executor(strand_, [self = shared_from_this()](
                                                             const boost::system::error_code& ec,
                                                             size_t n) { self->OnRead(ec, n); }));
    return;
  }
  socket_.async_wait(asio::posix::stream_descriptor::wait_read,
                     asio::bind_executor(
                         strand_, [self = shared_from_this()](const boost::system::error_code& ec) {
                           self->OnReadable(ec);
                         }));
}

void Connection::OnReadable(const boost::system::error_code& ec) {
  reading_ = false;
  if (closed_) return;
  if (ec) {
    CloseNow();
    return;
  }
  // A few reads per wake-up keep one busy client from starving the others on this thread.
  for (int round = 0; round < 4; ++round) {
    const ReadResult r = ReadOnce();
    if (r == ReadResult::kStop) return;
    if (r == ReadResult::kIdle) break;
    if (!CanDispatch() || decoder_.HasFrame()) break;
    if (session_->hello_done()) break;  // the rest is read by OnRead
  }
  ArmRead();
}

void Connection::OnRead(const boost::system::error_code& ec, size_t n) {
  reading_ = false;
  if (closed_) return;
  if (ec || n == 0) {  // EOF (the client is gone, its replies have no reader) or an error
    CloseNow();
    return;
  }
  if (Consume(n) == ReadResult::kStop) return;
  ArmRead();
}

Connection::ReadResult Connection::ReadOnce() {
  bool truncated = false;
  const size_t had = fds_.size();
  absl::StatusOr<size_t> n =
      ReceiveWithFds(socket_.native_handle(), read_buffer_, fds_, &truncated);
  fds_received_ += fds_.size() - had + (truncated ? 1 : 0);
  if (fds_.size() > kMaxPendingFds) CloseStrayFds();
  if (!n.ok()) {
    if (absl::IsUnavailable(n.status())) return ReadResult::kIdle;
    CloseNow();
    return ReadResult::kStop;
  }
  if (*n == 0) {  // orderly EOF: the client is gone, its replies have no reader
    CloseNow();
    return ReadResult::kStop;
  }
  return Consume(*n);
}

void Connection::RejectStream(const absl::Status& status) {
  server_.service().stats().FrameRejected();
  uint64_t suppressed = 0;
  if (bad_frame_log.Allow(&suppressed)) {
    Logger("server")->info("session {}: closing after bad frame: {}{}", session_->id(),
                           status.ToString(), LogRateLimiter::Suffix(suppressed));
  }
  Reply(server_.service().ErrorFrame(decoder_.last_header().request_id, status), false);
  close_after_flush_ = true;
}

Connection::ReadResult Connection::Consume(size_t n) {
  std::span<const std::byte> data(read_buffer_.data(), n);
  if (!session_->hello_done()) return ConsumeBeforeHello(data);
  absl::Status fed;
  try {
    fed = decoder_.Feed(data);
  } catch (const std::bad_alloc&) {  // a body's reservation found no address space
    fed = absl::ResourceExhaustedError("kvwaved could not allocate memory for a frame");
  }
  DispatchReady();
  if (!fed.ok()) {
    RejectStream(fed);
    return ReadResult::kStop;
  }
  if (closed_ || close_after_flush_) return ReadResult::kStop;
  return n == read_buffer_.size() ? ReadResult::kMore : ReadResult::kIdle;
}

// Frame by frame, so that the limit can rise once Hello succeeds: bytes pipelined after the
// Hello belong to an authenticated session.
Connection::ReadResult Connection::ConsumeBeforeHello(std::span<const std::byte> data) {
  while (!data.empty()) {
    if (session_->hello_done()) {
      absl::Status fed = decoder_.Feed(data);
      DispatchReady();
      if (!fed.ok()) {
        RejectStream(fed);
        return ReadResult::kStop;
      }
      break;
    }
    absl::StatusOr<size_t> consumed = decoder_.FeedOne(data);
    if (!consumed.ok()) {
      absl::Status st = consumed.status();
      if (absl::IsResourceExhausted(st)) {
        st = absl::ResourceExhaustedError(
            absl::StrCat(st.message(), " (before Hello: rpc.preauth_max_frame_bytes)"));
      }
      RejectStream(st);
      CloseStrayFds();
      return ReadResult::kStop;
    }
    data = data.subspan(*consumed);
    if (decoder_.HasFrame()) OnHello(decoder_.TakeFrame());
    if (closed_ || close_after_flush_) return ReadResult::kStop;
  }
  return ReadResult::kIdle;
}

void Connection::OnHello(Frame frame) {
  Service& service = server_.service();
  const uint64_t id = frame.header.request_id;
  if (frame.header.op() != pb::HELLO || frame.header.is_response()) {
    service.stats().FrameRejected();
    Reply(service.ErrorFrame(id, absl::FailedPreconditionError("the first frame must be Hello")),
          false);
    close_after_flush_ = true;
    CloseStrayFds();
    return;
  }
  if (fds_received_ > 1) {
    service.stats().FrameRejected();
    Reply(service.ErrorFrame(
              id, absl::InvalidArgumentError(absl::StrCat(
                      fds_received_, " file descriptors came with Hello (", kMaxPendingFds,
                      " at most are kept); pass exactly one: the sealed shared-memory memfd"))),
          false);
    close_after_flush_ = true;
    CloseStrayFds();
    return;
  }
  bool accepted = false;
  Reply(service.HandleHello(*session_, frame, fds_, &accepted), false);
  if (!accepted) {
    close_after_flush_ = true;
    return;
  }
  // Authenticated: full-size frames from now on, and full-size reads (the buffer grows in
  // ArmRead: the bytes after this Hello are still being consumed from it).
  decoder_.set_max_frame_bytes(service.max_frame_bytes());
  last_frame_ = std::chrono::steady_clock::now();
  const int64_t idle_ms = server_.settings().idle_timeout_ms;
  if (idle_ms > 0) {
    ArmTimer(std::chrono::milliseconds(idle_ms));
  } else {
    timer_.cancel();
  }
}

void Connection::DispatchReady() {
  if (!deferred_.empty() || retrying_) return;  // they go first (see RetryDeferred)
  while (decoder_.HasFrame() && CanDispatch()) OnFrame(decoder_.TakeFrame());
}

void Connection::OnFrame(Frame frame) {
  Service& service = server_.service();
  const uint64_t id = frame.header.request_id;
  CloseStrayFds();
  const auto received = Clock::now();
  last_frame_ = received;
  if (server_.draining()) {
    Reply(service.ErrorFrame(id, absl::UnavailableError("kvwaved is shutting down")), false);
    return;
  }
  if (Service::RunsInline(frame.header.op())) {
    Reply(service.Handle(*session_, frame, received, &backlog_), true);
    return;
  }
  Compute(std::make_shared<Frame>(std::move(frame)), received);
}

void Connection::Compute(std::shared_ptr<Frame> frame, TimePoint received, bool retry) {
  ++in_flight_;
  if (retry) retrying_ = true;
  server_.Compute([self = shared_from_this(), frame = std::move(frame), received, retry]() mutable {
    std::string reply =
        self->server_.service().Handle(*self->session_, *frame, received, &self->backlog_);
    if (!reply.empty()) frame.reset();  // deferred requests keep theirs to run again
    asio::post(self->strand_, [self, frame = std::move(frame), received, retry,
                               reply = std::move(reply)]() mutable {
      --self->in_flight_;
      if (retry) self->retrying_ = false;
      if (reply.empty()) {
        if (self->closed_) return;
        self->deferred_.push_front({std::move(frame), received});  // keeps the oldest first
        // Retried when a reply is written (OnWritten); when nothing is being written or
        // computed, the backlog is empty and a lone retry must fit: retry now.
        if (self->replies_.empty() && self->in_flight_ == 0) self->RetryDeferred();
        return;
      }
      self->Reply(std::move(reply), true);
      self->RetryDeferred();
      self->DispatchReady();
      self->ArmRead();
    });
  });
}

void Connection::Reply(std::string frame, bool counted) {
  if (closed_) {
    if (counted) backlog_.Release(frame.size());
    return;
  }
  if (!counted) backlog_.Add(frame.size());
  replies_.push_back(std::move(frame));
  if (!writing_) WriteNext();
}

void Connection::WriteNext() {
  writing_ = true;
  asio::async_write(
      socket_, asio::buffer(replies_.front()),
      asio::bind_executor(strand_, [self = shared_from_this()](const boost::system::error_code& ec,
                                                               size_t) { self->OnWritten(ec); }));
}

void Connection::OnWritten(const boost::system::error_code& ec) {
  writing_ = false;
  if (closed_) return;
  if (ec) {
    CloseNow();
    return;
  }
  backlog_.Release(replies_.front().size());
  replies_.pop_front();
  if (!replies_.empty()) {
    WriteNext();
  } else if (close_after_flush_) {
    CloseNow();
    return;
  }
  // Room in the backlog: parked requests run again (oldest first), then new frames.
  RetryDeferred();
  DispatchReady();
  ArmRead();
}

void Connection::RetryDeferred() {
  if (server_.draining()) {
    std::deque<Deferred> refused;
    refused.swap(deferred_);
    for (Deferred& d : refused) {
      Reply(server_.service().ErrorFrame(d.frame->header.request_id,
                                         absl::UnavailableError("kvwaved is shutting down")),
            false);
    }
    return;
  }
  if (retrying_ || deferred_.empty() || closed_) return;
  Deferred d = std::move(deferred_.front());
  deferred_.pop_front();
  Compute(std::move(d.frame), d.received, /*retry=*/true);
}

void Connection::ArmTimer(std::chrono::milliseconds after) {
  timer_.expires_after(after);
  timer_.async_wait(asio::bind_executor(
      strand_,
      [self = shared_from_this()](const boost::system::error_code& ec) { self->OnTimer(ec); }));
}

void Connection::OnTimer(const boost::system::error_code& ec) {
  if (ec || closed_) return;  // cancelled or re-armed
  uint64_t suppressed = 0;
  if (!session_->hello_done()) {
    if (timeout_log.Allow(&suppressed)) {
      Logger("session")->info(
          "session {}: no Hello within rpc.handshake_timeout_ms = {}; closing{}", session_->id(),
          server_.settings().handshake_timeout_ms, LogRateLimiter::Suffix(suppressed));
    }
    CloseNow();
    return;
  }
  const auto idle = std::chrono::milliseconds(server_.settings().idle_timeout_ms);
  if (idle.count() <= 0) return;
  const auto now = std::chrono::steady_clock::now();
  const bool busy = in_flight_ > 0 || !replies_.empty() || !deferred_.empty();
  if (!busy && now - last_frame_ >= idle) {
    if (timeout_log.Allow(&suppressed)) {
      Logger("session")->info("session {}: idle for rpc.idle_timeout_ms = {}; closing{}",
                              session_->id(), idle.count(), LogRateLimiter::Suffix(suppressed));
    }
    CloseNow();
    return;
  }
  ArmTimer(busy ? idle
                : std::chrono::duration_cast<std::chrono::milliseconds>(last_frame_ + idle - now) +
                      std::chrono::milliseconds(1));
}

void Connection::CloseNow() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ignored;
  socket_.close(ignored);
  timer_.cancel();
  for (const std::string& r : replies_) backlog_.Release(r.size());
  replies_.clear();
  deferred_.clear();
  CloseStrayFds();
  server_.ConnectionClosed(session_->id());
}

void Connection::CloseStrayFds() {
  for (int fd : fds_) close(fd);
  fds_.clear();
}

}  // namespace kvwave::rpc
