#include "rpc/metrics_http.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "rpc/log.h"

namespace kvwave::rpc {
namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;

namespace {

// One HTTP exchange: read a request, write the reply, close.
struct Exchange : std::enable_shared_from_this<Exchange> {
  Exchange(tcp::socket s, std::function<std::string()>& r, std::shared_ptr<std::atomic<int>> o)
      : stream(std::move(s)), render(r), open(std::move(o)) {
    stream.expires_after(std::chrono::seconds(10));
  }
  ~Exchange() { open->fetch_sub(1, std::memory_order_relaxed); }
  void Run() {
    http::async_read(stream, buffer, request,
                     [self = shared_from_this()](boost::beast::error_code ec, size_t) {
                       if (!ec) self->Respond();
                     });
  }
  void Respond() {
    const bool found = request.method() == http::verb::get &&
                       (request.target() == "/metrics" || request.target() == "/");
    response.version(request.version());
    response.keep_alive(false);
    response.result(found ? http::status::ok : http::status::not_found);
    response.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    response.body() = found ? render() : std::string("not found\n");
    response.prepare_payload();
    http::async_write(stream, response,
                      [self = shared_from_this()](boost::beast::error_code, size_t) {
                        boost::beast::error_code ignored;
                        self->stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
                      });
  }
  boost::beast::tcp_stream stream;
  std::function<std::string()>& render;
  std::shared_ptr<std::atomic<int>> open;
  boost::beast::flat_buffer buffer;
  http::request<http::string_body> request;
  http::response<http::string_body> response;
};

constexpr auto kAcceptRetry = std::chrono::milliseconds(100);
LogRateLimiter accept_log;
LogRateLimiter refused_log;

}  // namespace

MetricsHttp::MetricsHttp(asio::io_context& io, std::function<std::string()> render,
                         int max_connections)
    : io_(io),
      render_(std::move(render)),
      max_connections_(max_connections),
      acceptor_(io),
      retry_(io) {}

absl::StatusOr<uint16_t> MetricsHttp::Start(const std::string& address, uint16_t port) {
  boost::system::error_code ec;
  const asio::ip::address ip = asio::ip::make_address(address, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("rpc.metrics_bind = '", address, "' is not an IP address"));
  }
  const tcp::endpoint endpoint(ip, port);
  acceptor_.open(endpoint.protocol(), ec);
  if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(endpoint, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("metrics endpoint ", address, ":", port, ": ", ec.message()));
  }
  Accept();
  return acceptor_.local_endpoint().port();
}

void MetricsHttp::Stop() {
  boost::system::error_code ignored;
  acceptor_.close(ignored);
  retry_.cancel();
}

void MetricsHttp::Accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
    uint64_t suppressed = 0;
    if (ec) {  // EMFILE and kin: pause instead of spinning
      if (accept_log.Allow(&suppressed)) {
        Logger("metrics")->warn("accept: {}; retrying in {} ms{}", ec.message(),
                                kAcceptRetry.count(), LogRateLimiter::Suffix(suppressed));
      }
      retry_.expires_after(kAcceptRetry);
      retry_.async_wait([this](boost::system::error_code wait_ec) {
        if (!wait_ec && acceptor_.is_open()) Accept();
      });
      return;
    }
    if (open_->fetch_add(1, std::memory_order_relaxed) >= max_connections_) {
      open_->fetch_sub(1, std::memory_order_relaxed);
      if (refused_log.Allow(&suppressed)) {
        Logger("metrics")->warn("refusing a connection: {} open (rpc.metrics_max_connections){}",
                                max_connections_, LogRateLimiter::Suffix(suppressed));
      }
      boost::system::error_code ignored;
      socket.close(ignored);
    } else {
      std::make_shared<Exchange>(std::move(socket), render_, open_)->Run();
    }
    Accept();
  });
}

}  // namespace kvwave::rpc
