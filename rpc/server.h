// kvwaved's network server: a Boost.Asio io_context run by `io_threads` threads, listening on a
// Unix socket and optionally on TCP, with one Connection (rpc/connection.h) per client and a
// Prometheus endpoint (rpc/metrics_http.h). Engine work never runs on an io thread: requests go
// to a oneTBB task_arena and their replies are posted back to the connection's strand.
//
// Lifecycle: Start() binds and spawns the io threads -> BeginShutdown() (any thread, e.g. from a
// signal) stops accepting, answers new requests UNAVAILABLE, waits for in-flight ones, flushes
// replies and closes connections -> Wait() returns once that is done; it then releases every
// session's contexts and returns. A second BeginShutdown() is a no-op (the caller forces exit).
//
// Thread-safety: Start/Wait from the owning thread; BeginShutdown and ApplySettings from any.
#ifndef KVWAVE_RPC_SERVER_H_
#define KVWAVE_RPC_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"
#include "boost/asio/local/stream_protocol.hpp"
#include "boost/asio/steady_timer.hpp"
#include "config/settings.h"
#include "engine/engine.h"
#include "oneapi/tbb/task_arena.h"
#include "rpc/service.h"
#include "rpc/session.h"

namespace kvwave::rpc {

class Connection;
class MetricsHttp;

class Server {
 public:
  Server(engine::Engine& engine, const config::Settings& settings);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  [[nodiscard]] absl::Status Start();
  void BeginShutdown();
  void Wait();
  void ApplySettings(const config::Settings& settings);

  Service& service() { return service_; }
  // 0, or 3 once a request failed because the GPU is lost (gpu/device_lost.h): the server then
  // logs it, shuts down as on SIGTERM, and kvwaved exits with this code.
  int exit_code() const { return exit_code_.load(std::memory_order_acquire); }
  uint16_t tcp_port() const { return tcp_port_; }          // 0 when TCP is off
  uint16_t metrics_port() const { return metrics_port_; }  // 0 when off

  // For connections.
  boost::asio::io_context& io() { return io_; }
  const config::Settings& settings() const { return settings_; }
  bool draining() const { return draining_.load(std::memory_order_acquire); }
  // Runs `task` on the compute arena; counted in service().in_flight() until it returns.
  void Compute(std::function<void()> task);
  void ConnectionClosed(uint64_t session_id);
  // Called when the last reference to a connection goes: releases its session's contexts.
  void EndSession(uint64_t session_id);

 private:
  void RunIo();  // one io thread's loop (see rpc.io_poll_us)
  absl::Status ListenUnix();
  absl::Status ListenTcp();
  void AcceptUnix();
  void AcceptTcp();
  // After an accept error (EMFILE, ENFILE, ENOBUFS...): a rate-limited log line, then `retry`
  // after a pause instead of at once (an accept loop at EMFILE would spin and flood the log).
  void AcceptFailed(const char* what, const boost::system::error_code& ec,
                    boost::asio::steady_timer& timer, void (Server::*retry)());
  void Adopt(int fd, bool local);
  void DrainTick();

  const config::Settings settings_;
  engine::Engine& engine_;
  Service service_;
  tbb::task_arena arena_;
  std::atomic<bool> draining_{false};
  std::atomic<int> exit_code_{0};
  std::atomic<int64_t> max_sessions_;  // reloadable; relaxed: a limit, no ordering needed
  uint16_t tcp_port_ = 0;
  uint16_t metrics_port_ = 0;
  std::vector<std::thread> threads_;

  absl::Mutex mu_;
  std::map<uint64_t, std::weak_ptr<Connection>> connections_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);

  // Declared last so they are destroyed first, while the members above are still alive for the
  // destructors of connections that pending handlers hold.
  boost::asio::io_context io_;
  std::unique_ptr<boost::asio::local::stream_protocol::acceptor> unix_acceptor_;
  std::unique_ptr<boost::asio::ip::tcp::acceptor> tcp_acceptor_;
  std::unique_ptr<MetricsHttp> metrics_;
  std::unique_ptr<boost::asio::steady_timer> unix_retry_;
  std::unique_ptr<boost::asio::steady_timer> tcp_retry_;
  // The socket file this server created (unlinked at shutdown only if the path still names it).
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  std::unique_ptr<boost::asio::steady_timer> drain_timer_;
  std::chrono::steady_clock::time_point drain_started_;
  int drain_phase_ = 0;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SERVER_H_
