// spdlog loggers of kvwaved, one per subsystem ("server", "session", "metrics", "kvwaved"), all
// writing to stderr with the subsystem in each line, and LogRateLimiter for lines a peer or the
// environment can make repeat (accept errors, bad frames, timeouts): at most one line per
// interval, the next one saying how many were suppressed.
//
// Thread-safety: Logger(), SetLogLevel() and LogRateLimiter are thread-safe (spdlog's registry
// plus a mutex around creation; the limiter has its own mutex).
#ifndef KVWAVE_RPC_LOG_H_
#define KVWAVE_RPC_LOG_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"

namespace kvwave::rpc {

// The logger of `subsystem`, created on first use.
std::shared_ptr<spdlog::logger> Logger(const std::string& subsystem);

// "trace", "debug", "info", "warn", "error", "off": applies to every logger, present and future.
[[nodiscard]] absl::Status SetLogLevel(const std::string& level);

// Lets one kind of log line through at most once per `interval`.
class LogRateLimiter {
 public:
  explicit LogRateLimiter(std::chrono::milliseconds interval = std::chrono::seconds(1))
      : interval_(interval) {}
  // True when a line may be written now; then *suppressed = lines refused since the last one.
  bool Allow(uint64_t* suppressed);
  // " (N similar lines suppressed)", or "" when n == 0.
  static std::string Suffix(uint64_t n);

 private:
  const std::chrono::milliseconds interval_;
  absl::Mutex mu_;
  std::chrono::steady_clock::time_point next_ ABSL_GUARDED_BY(mu_){};
  uint64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_LOG_H_
