// The Prometheus endpoint of kvwaved: a minimal HTTP/1.1 server (Boost.Beast) on the server's
// io_context answering GET /metrics with the text exposition format, 404 otherwise, one request
// per connection. It has no authentication, so it binds where configured (rpc.metrics_bind,
// loopback by default), holds at most `max_connections` connections (more are closed at accept),
// gives each 10 s, and backs off after an accept error.
//
// Thread-safety: created, started and stopped on the io_context's threads; `render` must be
// thread-safe. The connection count is atomic (exchanges end on any io thread).
#ifndef KVWAVE_RPC_METRICS_HTTP_H_
#define KVWAVE_RPC_METRICS_HTTP_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"
#include "boost/asio/steady_timer.hpp"

namespace kvwave::rpc {

class MetricsHttp {
 public:
  MetricsHttp(boost::asio::io_context& io, std::function<std::string()> render,
              int max_connections = 16);
  // Binds address:port (an IP literal; port 0 picks a free port) and starts accepting; returns
  // the bound port. InvalidArgument when `address` is not an IP address.
  [[nodiscard]] absl::StatusOr<uint16_t> Start(const std::string& address, uint16_t port);
  void Stop();
  int connections() const { return open_->load(std::memory_order_relaxed); }

 private:
  void Accept();
  boost::asio::io_context& io_;
  std::function<std::string()> render_;
  const int max_connections_;
  // Shared with exchanges, which may outlive this object on a stopping io_context. Relaxed: a
  // counter with a bound.
  std::shared_ptr<std::atomic<int>> open_ = std::make_shared<std::atomic<int>>(0);
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer retry_;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_METRICS_HTTP_H_
