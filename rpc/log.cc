#include "rpc/log.h"

#include <mutex>

#include "spdlog/sinks/stdout_color_sinks.h"

namespace kvwave::rpc {

std::shared_ptr<spdlog::logger> Logger(const std::string& subsystem) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<spdlog::logger> logger = spdlog::get(subsystem);
  if (logger == nullptr) {
    logger = spdlog::stderr_color_mt(subsystem);
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e [%n] %^%l%$ %v");
    logger->set_level(spdlog::get_level());
  }
  return logger;
}

absl::Status SetLogLevel(const std::string& level) {
  const spdlog::level::level_enum parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError("unknown log level '" + level + "'");
  }
  spdlog::set_level(parsed);  // every registered logger and the default for new ones
  return absl::OkStatus();
}

bool LogRateLimiter::Allow(uint64_t* suppressed) {
  const auto now = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  if (now < next_) {
    ++suppressed_;
    return false;
  }
  next_ = now + interval_;
  *suppressed = suppressed_;
  suppressed_ = 0;
  return true;
}

std::string LogRateLimiter::Suffix(uint64_t n) {
  return n == 0 ? std::string() : " (" + std::to_string(n) + " similar lines suppressed)";
}

}  // namespace kvwave::rpc
