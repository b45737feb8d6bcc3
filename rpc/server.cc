#include "rpc/server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <new>

#include "absl/strings/str_cat.h"
#include "boost/asio/post.hpp"
#include "rpc/connection.h"
#include "rpc/log.h"
#include "rpc/metrics_http.h"
#include "store/host_memory.h"

namespace kvwave::rpc {
namespace asio = boost::asio;
using UnixProtocol = asio::local::stream_protocol;

namespace {

constexpr auto kDrainTick = std::chrono::milliseconds(5);
constexpr auto kDrainTimeout = std::chrono::seconds(30);
constexpr auto kCloseTimeout = std::chrono::seconds(2);
constexpr auto kAcceptRetry = std::chrono::milliseconds(100);

LogRateLimiter accept_log;

int ArenaThreads(int64_t compute_threads) {
  return compute_threads > 0 ? static_cast<int>(compute_threads) : tbb::task_arena::automatic;
}

// True when something accepts connections at `path` (another kvwaved is running).
bool SocketIsLive(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool live = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return live;
}

}  // namespace

Server::Server(engine::Engine& engine, const config::Settings& settings)
    : settings_(settings),
      engine_(engine),
      service_(engine, settings),
      arena_(ArenaThreads(settings.compute_threads)),
      max_sessions_(settings.max_sessions),
      io_(static_cast<int>(std::max<int64_t>(1, settings.io_threads))) {
  engine_.host_pool().SetIdleLimit(settings.host_pool_bytes);
  service_.set_on_device_lost([this](const absl::Status& status) {
    int none = 0;
    if (!exit_code_.compare_exchange_strong(none, 3, std::memory_order_acq_rel)) return;
    Logger("server")->error(
        "{}: kvwaved stops serving and exits 3 (restart it, or run it with "
        "gpu.mode = off)",
        std::string(status.message()));
    BeginShutdown();
  });
}

Server::~Server() {
  if (!threads_.empty()) {
    io_.stop();
    for (std::thread& t : threads_) t.join();
  }
}

absl::Status Server::Start() {
  // Connections write replies with write(2) (asio's stream_descriptor: no MSG_NOSIGNAL). A client
  // that vanishes while its replies are written must cost only its connection (EPIPE), so
  // SIGPIPE is ignored process-wide; left at its default it killed the daemon.
  std::signal(SIGPIPE, SIG_IGN);
  if (absl::Status st = ListenUnix(); !st.ok()) return st;
  if (settings_.tcp_port > 0) {
    if (absl::Status st = ListenTcp(); !st.ok()) return st;
  }
  if (settings_.metrics_port > 0) {
    metrics_ = std::make_unique<MetricsHttp>(
        io_, [this] { return service_.PrometheusText(); },
        static_cast<int>(settings_.metrics_max_connections));
    absl::StatusOr<uint16_t> port =
        metrics_->Start(settings_.metrics_bind, static_cast<uint16_t>(settings_.metrics_port));
    if (!port.ok()) return port.status();
    metrics_port_ = *port;
    Logger("metrics")->info("Prometheus endpoint on http://{}:{}/metrics", settings_.metrics_bind,
                            metrics_port_);
  }
  unix_retry_ = std::make_unique<asio::steady_timer>(io_);
  tcp_retry_ = std::make_unique<asio::steady_timer>(io_);
  AcceptUnix();
  if (tcp_acceptor_) AcceptTcp();
  const int n = static_cast<int>(std::max<int64_t>(1, settings_.io_threads));
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { RunIo(); });
  Logger("server")->info(
      "serving on {} ({} io threads, TCP {})", settings_.socket_path, n,
      tcp_port_ == 0 ? std::string("off") : absl::StrCat(settings_.tcp_bind, ":", tcp_port_));
  return absl::OkStatus();
}

// io_.run(), except that after each handler the thread keeps polling for rpc.io_poll_us before
// it blocks: waking a sleeping thread (epoll, then the scheduler, on another CPU) costs tens of
// microseconds on a VM, several times a small request's whole round trip.
//
// The last line of defence against running out of memory on an io thread. The allocations a
// peer controls (frame bodies, replies) are bounded and already turn into RESOURCE_EXHAUSTED
// where they happen; what is left (an asio handler, a reply queue node, an accepted socket's
// state) is small. If one of those throws, the daemon logs it (rate-limited), counts a rejected
// frame and keeps serving every other connection; the connection whose handler failed may stop
// being served (its session slot is freed by rpc.idle_timeout_ms where set, else at shutdown).
void Server::RunIo() {
  using Clock = std::chrono::steady_clock;
  static LogRateLimiter oom_log;
  const auto spin = std::chrono::microseconds(settings_.io_poll_us);
  auto last = Clock::now();
  while (!io_.stopped()) {
    try {
      if (io_.poll_one() > 0) {
        last = Clock::now();
        continue;
      }
      if (Clock::now() - last < spin) {
        std::this_thread::yield();
        continue;
      }
      if (io_.run_one() == 0) break;  // stopped, or out of work
    } catch (const std::bad_alloc&) {
      service_.stats().FrameRejected();
      uint64_t suppressed = 0;
      if (oom_log.Allow(&suppressed)) {
        Logger("server")->error("an io handler ran out of memory; its connection is dropped{}",
                                LogRateLimiter::Suffix(suppressed));
      }
    }
    last = Clock::now();
  }
}

absl::Status Server::ListenUnix() {
  const std::string& path = settings_.socket_path;
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path too long: ", path));
  }
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::AlreadyExistsError(absl::StrCat(path, " exists and is not a socket"));
    }
    if (SocketIsLive(path)) {
      return absl::AlreadyExistsError(absl::StrCat("another server is listening on ", path));
    }
    unlink(path.c_str());  // stale socket of a crashed server
  }
  boost::system::error_code ec;
  unix_acceptor_ = std::make_unique<UnixProtocol::acceptor>(io_);
  unix_acceptor_->open(UnixProtocol(), ec);
  if (ec) return absl::UnavailableError(absl::StrCat("socket for ", path, ": ", ec.message()));
  // The socket must never be reachable with looser permissions than 0660 (under umask 0 a bind
  // creates it 0777): bind it in a fresh private directory (0700), chmod it there, then move it
  // into place; RENAME_NOREPLACE fails if another server took the path meanwhile.
  const std::filesystem::path target(path);
  std::string dir_template =
      (target.parent_path().empty() ? std::filesystem::path(".") : target.parent_path()) /
      ".kvwaved-XXXXXX";
  if (dir_template.size() + 3 >= sizeof(sockaddr_un::sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "socket path too long: ", path, " (its directory needs room for a private bind dir)"));
  }
  if (mkdtemp(dir_template.data()) == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("listen on ", path, ": mkdtemp beside it: ", std::strerror(errno)));
  }
  const std::string private_path = dir_template + "/s";
  unix_acceptor_->bind(UnixProtocol::endpoint(private_path), ec);
  absl::Status placed = absl::OkStatus();
  if (ec) {
    placed = absl::UnavailableError(absl::StrCat("listen on ", path, ": ", ec.message()));
  } else if (chmod(private_path.c_str(), 0660) != 0) {  // permissions are the access control
    placed =
        absl::UnavailableError(absl::StrCat("chmod ", private_path, ": ", std::strerror(errno)));
  } else if (renameat2(AT_FDCWD, private_path.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) !=
             0) {
    placed =
        errno == EEXIST
            ? absl::AlreadyExistsError(absl::StrCat("another server created ", path))
            : absl::UnavailableError(absl::StrCat("rename to ", path, ": ", std::strerror(errno)));
  }
  if (!placed.ok()) unlink(private_path.c_str());
  rmdir(dir_template.c_str());
  if (!placed.ok()) return placed;
  struct stat mine;
  if (lstat(path.c_str(), &mine) == 0) {
    socket_dev_ = mine.st_dev;
    socket_ino_ = mine.st_ino;
  }
  unix_acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("listen on ", path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::Status Server::ListenTcp() {
  if (settings_.tcp_token.empty()) {
    return absl::InvalidArgumentError("rpc.tcp_port is set but rpc.tcp_token is empty");
  }
  boost::system::error_code ec;
  const asio::ip::address address = asio::ip::make_address(settings_.tcp_bind, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("rpc.tcp_bind = '", settings_.tcp_bind, "' is not an IP address"));
  }
  const asio::ip::tcp::endpoint endpoint(address, static_cast<uint16_t>(settings_.tcp_port));
  tcp_acceptor_ = std::make_unique<asio::ip::tcp::acceptor>(io_);
  tcp_acceptor_->open(endpoint.protocol(), ec);
  if (!ec) tcp_acceptor_->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) tcp_acceptor_->bind(endpoint, ec);
  if (!ec) tcp_acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("listen on TCP ", settings_.tcp_bind, ":",
                                               settings_.tcp_port, ": ", ec.message()));
  }
  tcp_port_ = tcp_acceptor_->local_endpoint().port();
  return absl::OkStatus();
}

void Server::AcceptUnix() {
  unix_acceptor_->async_accept([this](boost::system::error_code ec, UnixProtocol::socket s) {
    if (draining() || !unix_acceptor_->is_open()) return;
    if (ec) {
      AcceptFailed("accept (unix)", ec, *unix_retry_, &Server::AcceptUnix);
      return;
    }
    boost::system::error_code ignored;
    Adopt(s.release(ignored), /*local=*/true);
    AcceptUnix();
  });
}

void Server::AcceptTcp() {
  tcp_acceptor_->async_accept([this](boost::system::error_code ec, asio::ip::tcp::socket s) {
    if (draining() || !tcp_acceptor_->is_open()) return;
    if (ec) {
      AcceptFailed("accept (tcp)", ec, *tcp_retry_, &Server::AcceptTcp);
      return;
    }
    boost::system::error_code ignored;
    s.set_option(asio::ip::tcp::no_delay(true), ignored);
    Adopt(s.release(ignored), /*local=*/false);
    AcceptTcp();
  });
}

void Server::AcceptFailed(const char* what, const boost::system::error_code& ec,
                          asio::steady_timer& timer, void (Server::*retry)()) {
  if (ec == asio::error::operation_aborted) return;
  uint64_t suppressed = 0;
  if (accept_log.Allow(&suppressed)) {
    Logger("server")->warn("{}: {}; retrying in {} ms{}", what, ec.message(), kAcceptRetry.count(),
                           LogRateLimiter::Suffix(suppressed));
  }
  timer.expires_after(kAcceptRetry);
  timer.async_wait([this, retry](boost::system::error_code wait_ec) {
    if (!wait_ec && !draining()) (this->*retry)();
  });
}

void Server::Adopt(int fd, bool local) {
  if (fd < 0) return;
  auto session = std::make_shared<Session>(service_.NewSessionId(), local,
                                           local ? ReadPeerCredentials(fd) : PeerCredentials{});
  {
    absl::MutexLock lock(&mu_);
    const int64_t limit = max_sessions_.load(std::memory_order_relaxed);
    if (static_cast<int64_t>(sessions_.size()) >= limit) {
      const std::string reply =
          service_.ErrorFrame(0, absl::ResourceExhaustedError(absl::StrCat(
                                     "kvwaved is at its limit of ", limit, " sessions")));
      [[maybe_unused]] ssize_t n =
          send(fd, reply.data(), reply.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      close(fd);
      return;
    }
    sessions_[session->id()] = session;
  }
  service_.stats().SessionOpened();
  auto connection = std::make_shared<Connection>(*this, fd, session);
  {
    absl::MutexLock lock(&mu_);
    connections_[session->id()] = connection;
  }
  Logger("session")->debug("session {} connected ({})", session->id(), local ? "unix" : "tcp");
  connection->Start();
}

void Server::Compute(std::function<void()> task) {
  service_.BeginRequest();
  arena_.enqueue([this, task = std::move(task)] {
    task();
    service_.EndRequest();
  });
}

void Server::ConnectionClosed(uint64_t session_id) {
  absl::MutexLock lock(&mu_);
  connections_.erase(session_id);
}

void Server::EndSession(uint64_t session_id) {
  std::shared_ptr<Session> session;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return;
    session = std::move(it->second);
    sessions_.erase(it);
  }
  service_.stats().SessionClosed();
  Logger("session")->debug("session {} ended", session_id);
  Compute([this, session] { service_.ReleaseSession(*session); });
}

void Server::ApplySettings(const config::Settings& settings) {
  max_sessions_.store(settings.max_sessions, std::memory_order_relaxed);
  engine_.host_pool().SetIdleLimit(settings.host_pool_bytes);
  service_.ApplySettings(settings);
}

void Server::BeginShutdown() {
  asio::post(io_, [this] {
    if (draining_.exchange(true)) return;
    Logger("server")->info("shutting down: no new connections; draining {} request(s)",
                           service_.in_flight());
    boost::system::error_code ignored;
    if (unix_acceptor_) {
      unix_acceptor_->close(ignored);
      // Only our own socket: another kvwaved may have replaced the path since.
      struct stat st;
      if (lstat(settings_.socket_path.c_str(), &st) == 0 && st.st_dev == socket_dev_ &&
          st.st_ino == socket_ino_) {
        unlink(settings_.socket_path.c_str());
      } else {
        Logger("server")->warn("{} is no longer this server's socket; left in place",
                               settings_.socket_path);
      }
    }
    if (tcp_acceptor_) tcp_acceptor_->close(ignored);
    if (unix_retry_) unix_retry_->cancel();
    if (tcp_retry_) tcp_retry_->cancel();
    if (metrics_) metrics_->Stop();
    drain_started_ = std::chrono::steady_clock::now();
    drain_timer_ = std::make_unique<asio::steady_timer>(io_);
    DrainTick();
  });
}

// Phase 0: wait for in-flight requests; phase 1: flush replies and close connections; then stop.
void Server::DrainTick() {
  const auto elapsed = std::chrono::steady_clock::now() - drain_started_;
  if (drain_phase_ == 0 && (service_.in_flight() == 0 || elapsed > kDrainTimeout)) {
    std::vector<std::shared_ptr<Connection>> live;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [id, weak] : connections_) {
        if (auto c = weak.lock()) live.push_back(std::move(c));
      }
    }
    for (auto& c : live) c->CloseAfterFlush();
    drain_phase_ = 1;
    drain_started_ = std::chrono::steady_clock::now();
  } else if (drain_phase_ == 1) {
    bool empty;
    {
      absl::MutexLock lock(&mu_);
      empty = connections_.empty();
    }
    if (empty || elapsed > kCloseTimeout) {
      io_.stop();
      return;
    }
  }
  drain_timer_->expires_after(kDrainTick);
  drain_timer_->async_wait([this](boost::system::error_code ec) {
    if (!ec) DrainTick();
  });
}

void Server::Wait() {
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  // Connections still referenced by pending handlers end when io_ is destroyed; release the
  // sessions' contexts now, then wait for the compute arena.
  std::map<uint64_t, std::shared_ptr<Session>> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(sessions_);
  }
  for (auto& [id, session] : left) service_.ReleaseSession(*session);
  while (service_.in_flight() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  Logger("server")->info("stopped; released {} session(s) at exit", left.size());
}

}  // namespace kvwave::rpc
