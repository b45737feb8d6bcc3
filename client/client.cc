// kvwave::client::Client: a blocking connection to kvwaved with one request in flight.
#include "kvwave/client.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "client/client_cuda.h"
#include "client/client_impl.h"
#include "config/status_macros.h"

namespace kvwave::client {

namespace {

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

absl::StatusOr<int> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("socket path too long: " + path);
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    absl::Status st = Errno("connect to " + path);
    close(fd);
    return st;
  }
  return fd;
}

absl::StatusOr<int> ConnectTcp(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolve ", host, ": ", gai_strerror(rc)));
  }
  absl::Status last = absl::UnavailableError("no address for " + host);
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      freeaddrinfo(found);
      return fd;
    }
    last = Errno(absl::StrCat("connect to ", host, ":", port));
    close(fd);
  }
  freeaddrinfo(found);
  return last;
}

}  // namespace

Client::Impl::~Impl() {
  if (fd_ >= 0) close(fd_);  // kvwaved closes this session's registrations
  for (auto& [id, ev] : device_events_) {
    cuda::DestroyEvent(ev.q_ready);
    cuda::DestroyEvent(ev.out_ready);
  }
}

absl::Status Client::Impl::WriteAll(std::span<const std::byte> data) {
  while (!data.empty()) {
    const ssize_t n = send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      broken_ = true;
      return Errno("send");
    }
    data = data.subspan(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::StatusOr<rpc::Frame> Client::Impl::ReadReply(uint64_t id) {
  using Clock = std::chrono::steady_clock;
  const int wait_ms = options_.deadline_ms > 0 ? options_.deadline_ms + 5000 : 60000;
  const auto give_up = Clock::now() + std::chrono::milliseconds(wait_ms);
  for (;;) {
    while (decoder_.HasFrame()) {
      rpc::Frame frame = decoder_.TakeFrame();
      // Replies to abandoned ids are dropped; an ERROR for id 0 is about the connection.
      if (frame.header.request_id == id ||
          (frame.header.request_id == 0 && frame.header.op() == rpc::pb::ERROR)) {
        return frame;
      }
    }
    // First poll (options_.poll_us), then a blocking recv bounded by SO_RCVTIMEO (set at
    // connect): one syscall per reply once it is there.
    const bool poll = Clock::now() < poll_until_;
    const ssize_t n = recv(fd_, read_buffer_.data(), read_buffer_.size(), poll ? MSG_DONTWAIT : 0);
    if (n < 0 && poll && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      sched_yield();
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (Clock::now() < give_up) continue;
      broken_ = true;
      return absl::DeadlineExceededError(absl::StrCat("no reply from kvwaved in ", wait_ms, " ms"));
    }
    if (n <= 0) {
      broken_ = true;
      return n == 0 ? absl::UnavailableError("kvwaved closed the connection") : Errno("recv");
    }
    if (absl::Status st = decoder_.Feed({read_buffer_.data(), static_cast<size_t>(n)}); !st.ok()) {
      broken_ = true;
      return absl::DataLossError(absl::StrCat("bad frame from kvwaved: ", st.message()));
    }
  }
}

absl::Status Client::Impl::Exchange(uint16_t type, const google::protobuf::MessageLite& request,
                                    google::protobuf::MessageLite& response, int fd_to_pass) {
  if (broken_) return absl::UnavailableError("connection to kvwaved is broken; reconnect");
  rpc::FrameHeader header;
  header.type = type;
  header.request_id = next_id_++;
  header.deadline_ms = static_cast<uint32_t>(std::max(0, options_.deadline_ms));
  KVWAVE_ASSIGN_OR_RETURN(std::string frame, rpc::EncodeFrame(header, request));
  if (max_frame_bytes_ != 0 && frame.size() > max_frame_bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("request of ", frame.size(), " bytes exceeds the server's frame limit of ",
                     max_frame_bytes_, " (use shared memory or smaller calls)"));
  }
  const auto bytes = std::as_bytes(std::span<const char>(frame.data(), frame.size()));
  absl::Status sent = fd_to_pass >= 0 ? rpc::SendWithFd(fd_, bytes, fd_to_pass) : WriteAll(bytes);
  if (!sent.ok()) {
    broken_ = true;
    // The server may have said why it closed (e.g. the session limit) before closing.
    return ConnectionError(sent);
  }
  poll_until_ = std::chrono::steady_clock::now() + std::chrono::microseconds(options_.poll_us);
  KVWAVE_ASSIGN_OR_RETURN(rpc::Frame reply, ReadReply(header.request_id));
  if (reply.header.op() == rpc::pb::ERROR) {
    rpc::pb::ErrorResponse error;
    KVWAVE_RETURN_IF_ERROR(rpc::ParseBody(reply.body, error));
    absl::Status st = rpc::FromProto(error.status());
    return st.ok() ? absl::UnknownError("ERROR frame with an OK status") : st;
  }
  if (reply.header.op() != type) {
    return absl::DataLossError(
        absl::StrCat("reply of type ", reply.header.op(), " to a request of type ", type));
  }
  return rpc::ParseBody(reply.body, response);
}

absl::Status Client::Impl::ConnectionError(absl::Status fallback) {
  for (;;) {
    while (decoder_.HasFrame()) {
      rpc::Frame frame = decoder_.TakeFrame();
      rpc::pb::ErrorResponse error;
      if (frame.header.op() == rpc::pb::ERROR && rpc::ParseBody(frame.body, error).ok() &&
          error.status().code() != 0) {
        return rpc::FromProto(error.status());
      }
    }
    const ssize_t n = recv(fd_, read_buffer_.data(), read_buffer_.size(), MSG_DONTWAIT);
    if (n <= 0 || !decoder_.Feed({read_buffer_.data(), static_cast<size_t>(n)}).ok()) {
      return fallback;
    }
  }
}

absl::Status Client::Impl::Hello() {
  rpc::pb::HelloRequest req;
  req.set_min_version(rpc::kProtocolVersion);
  req.set_max_version(rpc::kProtocolVersion);
  req.set_client_name(options_.client_name);
  req.set_token(options_.token);
  for (const std::string& credential : options_.credentials) req.add_credentials(credential);
  int fd_to_pass = -1;
  if (options_.tcp_port == 0 && options_.shared_memory_bytes > 0) {
    KVWAVE_ASSIGN_OR_RETURN(
        region_, rpc::SharedRegion::Create(options_.shared_memory_bytes, "kvwave-client"));
    req.set_has_shared_memory(true);
    fd_to_pass = region_.fd();
  }
  rpc::pb::HelloResponse resp;
  KVWAVE_RETURN_IF_ERROR(Call(rpc::pb::HELLO, req, resp, fd_to_pass));
  max_frame_bytes_ = resp.max_frame_bytes();
  session_id_ = resp.session_id();
  if (!resp.shared_memory()) region_ = rpc::SharedRegion();
  return absl::OkStatus();
}

void Client::Impl::BeginCall() { stage_used_ = 0; }

absl::Status Client::Impl::StageInput(std::span<const std::byte> data, size_t align,
                                      rpc::pb::Tensor* t) {
  if (data.empty()) return absl::OkStatus();
  uint64_t offset;
  if (region_.valid()) {
    if (region_.Contains(data.data(), data.size(), &offset) && offset % align == 0) {
      t->set_offset(offset);
      t->set_length(data.size());
      return absl::OkStatus();
    }
    if (Allocate(data.size(), align, &offset)) {
      std::memcpy(region_.data() + offset, data.data(), data.size());
      t->set_offset(offset);
      t->set_length(data.size());
      return absl::OkStatus();
    }
  }
  t->set_data(reinterpret_cast<const char*>(data.data()), data.size());
  return absl::OkStatus();
}

void Client::Impl::StageOutput(std::span<std::byte> dst, size_t align, rpc::pb::Tensor* t) {
  uint64_t offset;
  if (!region_.valid() || dst.empty()) return;
  if ((region_.Contains(dst.data(), dst.size(), &offset) && offset % align == 0) ||
      Allocate(dst.size(), align, &offset)) {
    t->set_offset(offset);
    t->set_length(dst.size());
  }
}

absl::Status Client::Impl::Collect(const rpc::pb::Tensor& got, std::span<std::byte> dst,
                                   const char* what) {
  if (!got.data().empty() || got.length() == 0) {
    if (got.data().size() != dst.size()) {
      return absl::DataLossError(
          absl::StrCat(what, ": ", got.data().size(), " bytes returned, expected ", dst.size()));
    }
    if (!dst.empty()) std::memcpy(dst.data(), got.data().data(), dst.size());
    return absl::OkStatus();
  }
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> src,
                          region_.Slice(got.offset(), got.length(), 1, what));
  if (src.size() != dst.size()) {
    return absl::DataLossError(absl::StrCat(what, ": size mismatch in the reply"));
  }
  if (src.data() != dst.data()) std::memcpy(dst.data(), src.data(), dst.size());
  return absl::OkStatus();
}

bool Client::Impl::Allocate(size_t bytes, size_t align, uint64_t* offset) {
  const size_t start = (stage_used_ + 63) & ~size_t{63};  // cache-line aligned (>= align)
  (void)align;
  if (start > region_.size() || bytes > region_.size() - start) return false;
  stage_used_ = start + bytes;
  *offset = start;
  return true;
}

// ---- Client ----

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  absl::StatusOr<int> fd = options.tcp_port != 0 ? ConnectTcp(options.tcp_host, options.tcp_port)
                                                 : ConnectUnix(options.socket_path);
  if (!fd.ok()) return fd.status();
  // Receive timeout slices for ReadReply's deadline check.
  timeval slice{1, 0};
  setsockopt(*fd, SOL_SOCKET, SO_RCVTIMEO, &slice, sizeof(slice));
  auto impl = std::make_unique<Impl>(options, *fd);
  KVWAVE_RETURN_IF_ERROR(impl->Hello());
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

std::span<std::byte> Client::SharedBuffer() {
  return impl_->region_.valid() ? std::span<std::byte>(impl_->region_.data(), impl_->region_.size())
                                : std::span<std::byte>();
}
bool Client::uses_shared_memory() const { return impl_->region_.valid(); }
uint64_t Client::session_id() const { return impl_->session_id_; }
uint64_t Client::server_max_frame_bytes() const { return impl_->max_frame_bytes_; }

}  // namespace kvwave::client
