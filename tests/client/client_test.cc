// The client library without a server: connection errors and the local-daemon launcher.
#include "kvwave/client.h"

#include "gtest/gtest.h"
#include "kvwave/local_daemon.h"

namespace kvwave::client {
namespace {

TEST(ClientTest, ConnectToAMissingSocketIsUnavailable) {
  ClientOptions o;
  o.socket_path = "/tmp/kvwave-no-such-socket-for-test.sock";
  auto c = Client::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find(o.socket_path), std::string::npos);
}

TEST(ClientTest, SocketPathTooLongIsInvalid) {
  ClientOptions o;
  o.socket_path = "/tmp/" + std::string(200, 'x');
  EXPECT_EQ(Client::Connect(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClientTest, TcpConnectionRefused) {
  ClientOptions o;
  o.tcp_port = 1;  // nothing listens on port 1
  EXPECT_EQ(Client::Connect(o).status().code(), absl::StatusCode::kUnavailable);
}

TEST(LocalDaemonTest, HintWinsAndMissingBinaryFailsFast) {
  EXPECT_EQ(FindKvwaved("/some/where/kvwaved"), "/some/where/kvwaved");
  LocalDaemonOptions o;
  o.binary = "/nonexistent/kvwaved";
  o.start_timeout_ms = 5000;
  auto d = LocalDaemon::Start(o);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kUnavailable) << d.status();
}

TEST(ModelShapeTest, TokenBytes) {
  ModelShape s{32, 32, 8, 128, DType::kBF16};
  EXPECT_EQ(s.TokenBytesPerLayer(), 8 * 128 * 2);
  s.dtype = DType::kF32;
  EXPECT_EQ(s.TokenBytesPerLayer(), 8 * 128 * 4);
}

}  // namespace
}  // namespace kvwave::client
