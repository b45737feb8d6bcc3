#include "rpc/connection.h"

#include <unistd.h>

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
constexpr size_t kMaxPendingFds = 4;
}  // namespace

Connection::Connection(Server& server, int fd, std::shared_ptr<Session> session)
    : server_(server),
      strand_(asio::make_strand(server.io())),
      socket_(server.io(), fd),
      session_(std::move(session)),
      decoder_(server.service().max_frame_bytes()),
      read_buffer_(kReadChunk) {
  boost::system::error_code ignored;
  socket_.non_blocking(true, ignored);
}

Connection::~Connection() {
  CloseStrayFds();
  server_.EndSession(session_->id());
}

void Connection::Start() {
  asio::post(strand_, [self = shared_from_this()] { self->ArmRead(); });
}

void Connection::CloseAfterFlush() {
  asio::post(strand_, [self = shared_from_this()] {
    self->close_after_flush_ = true;
    if (!self->writing_ && self->replies_.empty()) self->CloseNow();
  });
}

void Connection::ArmRead() {
  if (closed_ || reading_ || close_after_flush_) return;
  if (in_flight_ >= kMaxInFlight || queued_bytes_ >= kMaxQueuedReplyBytes) return;
  reading_ = true;
  if (session_->hello_done()) {
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
    if (in_flight_ >= kMaxInFlight || queued_bytes_ >= kMaxQueuedReplyBytes) break;
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
  absl::StatusOr<size_t> n = ReceiveWithFds(socket_.native_handle(), read_buffer_, fds_);
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

Connection::ReadResult Connection::Consume(size_t n) {
  absl::Status fed = decoder_.Feed(std::span<const std::byte>(read_buffer_.data(), n));
  while (decoder_.HasFrame() && !closed_ && !close_after_flush_) OnFrame(decoder_.TakeFrame());
  if (!fed.ok()) {
    server_.service().stats().FrameRejected();
    Logger("server")->info("session {}: closing after bad frame: {}", session_->id(),
                           fed.ToString());
    Reply(server_.service().ErrorFrame(decoder_.last_header().request_id, fed));
    close_after_flush_ = true;
    return ReadResult::kStop;
  }
  if (closed_ || close_after_flush_) return ReadResult::kStop;
  return n == read_buffer_.size() ? ReadResult::kMore : ReadResult::kIdle;
}

void Connection::OnFrame(Frame frame) {
  Service& service = server_.service();
  const uint64_t id = frame.header.request_id;
  if (!session_->hello_done()) {
    if (frame.header.op() != pb::HELLO || frame.header.is_response()) {
      service.stats().FrameRejected();
      Reply(service.ErrorFrame(id, absl::FailedPreconditionError("the first frame must be Hello")));
      close_after_flush_ = true;
      CloseStrayFds();
      return;
    }
    bool accepted = false;
    Reply(service.HandleHello(*session_, frame, fds_, &accepted));
    if (!accepted) close_after_flush_ = true;
    return;
  }
  CloseStrayFds();
  if (server_.draining()) {
    Reply(service.ErrorFrame(id, absl::UnavailableError("kvwaved is shutting down")));
    return;
  }
  const auto received = Clock::now();
  if (Service::RunsInline(frame.header.op())) {
    Reply(service.Handle(*session_, frame, received));
    return;
  }
  ++in_flight_;
  auto shared_frame = std::make_shared<Frame>(std::move(frame));
  server_.Compute([self = shared_from_this(), shared_frame, received]() mutable {
    std::string reply = self->server_.service().Handle(*self->session_, *shared_frame, received);
    shared_frame.reset();
    asio::post(self->strand_, [self, reply = std::move(reply)]() mutable {
      --self->in_flight_;
      self->Reply(std::move(reply));
      self->ArmRead();
    });
  });
}

void Connection::Reply(std::string frame) {
  if (closed_) return;
  queued_bytes_ += frame.size();
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
  queued_bytes_ -= replies_.front().size();
  replies_.pop_front();
  if (!replies_.empty()) {
    WriteNext();
  } else if (close_after_flush_) {
    CloseNow();
    return;
  }
  ArmRead();
}

void Connection::CloseNow() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ignored;
  socket_.close(ignored);
  replies_.clear();
  queued_bytes_ = 0;
  CloseStrayFds();
  server_.ConnectionClosed(session_->id());
}

void Connection::CloseStrayFds() {
  for (int fd : fds_) close(fd);
  fds_.clear();
}

}  // namespace kvwave::rpc
