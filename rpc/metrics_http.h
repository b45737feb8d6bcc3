// The Prometheus endpoint of kvwaved: a minimal HTTP/1.1 server (Boost.Beast) on the server's
// io_context answering GET /metrics with the text exposition format, 404 otherwise, one request
// per connection.
//
// Thread-safety: created, started and stopped on the io_context's threads; `render` must be
// thread-safe.
#ifndef KVWAVE_RPC_METRICS_HTTP_H_
#define KVWAVE_RPC_METRICS_HTTP_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"

namespace kvwave::rpc {

class MetricsHttp {
 public:
  MetricsHttp(boost::asio::io_context& io, std::function<std::string()> render);
  // Binds 0.0.0.0:port (0 picks a free port) and starts accepting; returns the bound port.
  [[nodiscard]] absl::StatusOr<uint16_t> Start(uint16_t port);
  void Stop();

 private:
  void Accept();
  boost::asio::io_context& io_;
  std::function<std::string()> render_;
  boost::asio::ip::tcp::acceptor acceptor_;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_METRICS_HTTP_H_
