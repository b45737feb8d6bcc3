// Test harness for the integration tests: starts the real kvwaved (from $KVWAVE_BINARY_DIR) on a
// private socket, and a raw protocol connection for sending hand-made (and malformed) frames.
//
// Thread-safety: test-only helpers, used from the test's thread.
#ifndef KVWAVE_TESTS_INTEGRATION_HARNESS_H_
#define KVWAVE_TESTS_INTEGRATION_HARNESS_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"
#include "rpc/frame.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/shared_region.h"

namespace kvwave::testing {

inline std::string BinaryDir() {
  const char* dir = std::getenv("KVWAVE_BINARY_DIR");
  return dir != nullptr ? dir : KVWAVE_BINARY_DIR_DEFAULT;
}

// Starts kvwaved with `o` (binary, log level warn unless o.overrides says otherwise first).
// LocalDaemon::Start returns when kvwaved says it listens (--ready-fd): no polling.
inline std::unique_ptr<client::LocalDaemon> StartDaemonWith(client::LocalDaemonOptions o) {
  o.binary = BinaryDir().empty() ? "" : BinaryDir() + "/rpc/kvwaved";
  o.overrides.insert(o.overrides.begin(), "log.level=warn");
  auto d = client::LocalDaemon::Start(o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : nullptr;
}

inline std::unique_ptr<client::LocalDaemon> StartDaemon(std::vector<std::string> overrides = {}) {
  client::LocalDaemonOptions o;
  o.overrides = std::move(overrides);
  return StartDaemonWith(std::move(o));
}

// The seed of a randomized test: $KVWAVE_TEST_SEED when set, else a fresh one; printed either
// way so a failure can be replayed.
inline uint32_t TestSeed() {
  uint32_t seed;
  if (const char* env = std::getenv("KVWAVE_TEST_SEED"); env != nullptr && *env != '\0') {
    seed = static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
  } else {
    seed = std::random_device{}();
  }
  std::printf("seed %u (replay: KVWAVE_TEST_SEED=%u)\n", seed, seed);
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

// A TCP port that was free a moment ago (for daemons that take a fixed port).
inline int FreeTcpPort() {
  const int probe = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(probe);
    return -1;
  }
  socklen_t len = sizeof(addr);
  getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &len);
  close(probe);
  return ntohs(addr.sin_port);
}

inline int ConnectRawTcp(const std::string& ip, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, ip.c_str(), &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// The whole of a small text file ("" when it cannot be read).
inline std::string ReadTextFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A "Key:   123 kB" field of /proc/<pid>/status, in bytes (-1 when absent).
inline int64_t ProcStatusBytes(pid_t pid, const std::string& key) {
  std::istringstream in(ReadTextFile("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::atoll(line.c_str() + key.size() + 1) * 1024;
  }
  return -1;
}

inline std::unique_ptr<client::Client> Connect(const std::string& socket,
                                               size_t shm_bytes = size_t{16} << 20) {
  client::ClientOptions o;
  o.socket_path = socket;
  o.shared_memory_bytes = shm_bytes;
  auto c = client::Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

inline int ConnectRawUnix(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Status code of a response frame body (every response has Status as field 1).
inline int StatusCodeOf(const rpc::Frame& f) {
  rpc::pb::ErrorResponse e;  // same field 1 layout as every response
  if (!e.ParseFromArray(f.body.data(), static_cast<int>(f.body.size()))) return -1;
  return e.status().code();
}

// Status message of a response frame body.
inline std::string StatusMessageOf(const rpc::Frame& f) {
  rpc::pb::ErrorResponse e;
  if (!e.ParseFromArray(f.body.data(), static_cast<int>(f.body.size()))) return "(unparsable)";
  return e.status().message();
}

// A hand-driven protocol connection.
class RawConnection {
 public:
  explicit RawConnection(const std::string& socket) : fd_(ConnectRawUnix(socket)) {}
  // TCP to ip:port.
  RawConnection(const std::string& ip, int port) : fd_(ConnectRawTcp(ip, port)) {}
  ~RawConnection() {
    if (fd_ >= 0) close(fd_);
  }
  int fd() const { return fd_; }
  bool ok() const { return fd_ >= 0; }

  bool SendBytes(const void* data, size_t n) {
    return send(fd_, data, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
  }
  bool SendFrame(uint16_t type, uint64_t id, const google::protobuf::MessageLite& body,
                 uint32_t deadline_ms = 0) {
    rpc::FrameHeader h;
    h.type = type;
    h.request_id = id;
    h.deadline_ms = deadline_ms;
    auto frame = rpc::EncodeFrame(h, body);
    return frame.ok() && SendBytes(frame->data(), frame->size());
  }
  // Hello, with a fresh sealed region of `region_bytes` (0 = none) and `token` (TCP).
  bool Hello(size_t region_bytes, const std::string& token = "") {
    return HelloStatus(region_bytes, token) == 0;
  }
  // The status code of the Hello reply (-1: no reply).
  int HelloStatus(size_t region_bytes, const std::string& token = "") {
    rpc::pb::HelloRequest req;
    req.set_token(token);
    req.set_min_version(rpc::kProtocolVersion);
    req.set_max_version(rpc::kProtocolVersion);
    if (region_bytes > 0) {
      auto r = rpc::SharedRegion::Create(region_bytes, "test");
      if (!r.ok()) return -1;
      region_ = *std::move(r);
      req.set_has_shared_memory(true);
      rpc::FrameHeader h;
      h.type = rpc::pb::HELLO;
      h.request_id = 1;
      auto frame = rpc::EncodeFrame(h, req);
      if (!rpc::SendWithFd(fd_, std::as_bytes(std::span(frame->data(), frame->size())),
                           region_.fd())
               .ok()) {
        return -1;
      }
    } else if (!SendFrame(rpc::pb::HELLO, 1, req)) {
      return -1;
    }
    auto f = ReadFrame(5000);
    if (!f) return -1;
    return StatusCodeOf(*f);
  }
  // The next frame, or nullopt on EOF / timeout / a framing error.
  std::optional<rpc::Frame> ReadFrame(int timeout_ms) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      if (decoder_.HasFrame()) return decoder_.TakeFrame();
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            give_up - std::chrono::steady_clock::now())
                            .count();
      pollfd p{fd_, POLLIN, 0};
      if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) return std::nullopt;
      char buf[65536];
      const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return std::nullopt;
      if (!decoder_.Feed(std::as_bytes(std::span(buf, static_cast<size_t>(n)))).ok()) {
        return std::nullopt;
      }
    }
  }
  // True when the peer closed the connection within timeout_ms (after any pending frames).
  bool ClosedByPeer(int timeout_ms) {
    while (ReadFrame(timeout_ms)) {
    }
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char c;
    return recv(fd_, &c, 1, MSG_DONTWAIT) == 0;
  }
  rpc::SharedRegion& region() { return region_; }

 private:
  int fd_;
  rpc::FrameDecoder decoder_{uint64_t{1} << 32};
  rpc::SharedRegion region_;
};

// Polls a condition the test cannot block on (a counter in the daemon's stats, a line in its
// log) until it holds or timeout_ms passes. The pause is the polling interval only: no test
// assumes that something has happened because time has passed. The deadline only bounds how
// long a failing test takes; it is generous (60 s) so that a loaded machine (the suite is soaked
// with CPU hogs beside it) cannot turn a slow pass into a failure.
template <typename Pred>
bool Eventually(Pred pred, int timeout_ms = 60000) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < give_up) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

}  // namespace kvwave::testing

#endif  // KVWAVE_TESTS_INTEGRATION_HARNESS_H_
