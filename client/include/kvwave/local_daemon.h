// Starting a kvwaved child process on a private socket and stopping it: used by `kvwave demo`,
// the integration tests and the serve benchmark. Start() returns once the daemon accepts
// connections: it waits for the line kvwaved writes on a pipe passed as --ready-fd (no polling),
// and Stop() waits on a pidfd for the exit.
//
// Thread-safety: a LocalDaemon is owned by one thread. The destructor stops the daemon (SIGTERM,
// then SIGKILL after a timeout) if it is still running.
#ifndef KVWAVE_CLIENT_INCLUDE_KVWAVE_LOCAL_DAEMON_H_
#define KVWAVE_CLIENT_INCLUDE_KVWAVE_LOCAL_DAEMON_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvwave::client {

struct LocalDaemonOptions {
  std::string binary;                  // path of kvwaved; empty = FindKvwaved("")
  std::string socket_path;             // empty = a fresh path under /tmp
  std::string config_path;             // --config FILE (re-read on SIGHUP); empty = none
  std::vector<std::string> overrides;  // extra "--set key=value" settings
  std::string log_path;                // daemon stderr goes here; empty = inherit
  int start_timeout_ms = 30000;
};

class LocalDaemon {
 public:
  static absl::StatusOr<std::unique_ptr<LocalDaemon>> Start(const LocalDaemonOptions& options);
  ~LocalDaemon();

  pid_t pid() const { return pid_; }
  const std::string& socket_path() const { return socket_path_; }
  bool Running();
  // Sends `signal` and waits up to timeout_ms for exit; returns the exit code (128 + signal when
  // killed by one). DeadlineExceeded when it did not exit in time (it is then still running).
  absl::StatusOr<int> Stop(int signal, int timeout_ms);

 private:
  LocalDaemon(pid_t pid, std::string socket_path)
      : pid_(pid), socket_path_(std::move(socket_path)) {}
  pid_t pid_;
  std::string socket_path_;
  int exit_code_ = -1;
};

// The kvwaved binary: `hint` if not empty, else $KVWAVE_BINARY_DIR/rpc/kvwaved, else
// <dir of this executable>/../rpc/kvwaved, else <dir of this executable>/kvwaved, else "kvwaved"
// on PATH.
std::string FindKvwaved(const std::string& hint);

}  // namespace kvwave::client

#endif  // KVWAVE_CLIENT_INCLUDE_KVWAVE_LOCAL_DAEMON_H_
