// spdlog loggers of kvwaved, one per subsystem ("server", "session", "metrics", "kvwaved"), all
// writing to stderr with the subsystem in each line.
//
// Thread-safety: Logger() and SetLogLevel() are thread-safe (spdlog's registry plus a mutex
// around creation).
#ifndef KVWAVE_RPC_LOG_H_
#define KVWAVE_RPC_LOG_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace kvwave::rpc {

// The logger of `subsystem`, created on first use.
std::shared_ptr<spdlog::logger> Logger(const std::string& subsystem);

// "trace", "debug", "info", "warn", "error", "off": applies to every logger, present and future.
[[nodiscard]] absl::Status SetLogLevel(const std::string& level);

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_LOG_H_
