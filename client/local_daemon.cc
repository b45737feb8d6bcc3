#include "kvwave/local_daemon.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"

namespace kvwave::client {
namespace {

// The fd number the child's --ready-fd gets (dup2'd there; far above what stdio uses).
constexpr int kChildReadyFd = 100;

int MillisLeft(std::chrono::steady_clock::time_point until) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        until - std::chrono::steady_clock::now())
                        .count();
  return static_cast<int>(std::max<int64_t>(0, left));
}

// Reads the daemon's readiness line: true on "ready ...", false on EOF (it exited) or timeout.
bool WaitReady(int fd, std::chrono::steady_clock::time_point give_up, bool* timed_out) {
  std::string got;
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int r = poll(&p, 1, MillisLeft(give_up));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      *timed_out = r == 0;
      return false;
    }
    char buf[64];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got.append(buf, static_cast<size_t>(n));
    if (got.find('\n') != std::string::npos) return got.rfind("ready", 0) == 0;
  }
}

bool Executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

std::string FindKvwaved(const std::string& hint) {
  if (!hint.empty()) return hint;
  if (const char* dir = std::getenv("KVWAVE_BINARY_DIR"); dir != nullptr) {
    const std::string p = std::string(dir) + "/rpc/kvwaved";
    if (Executable(p)) return p;
  }
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const auto& p :
         {self.parent_path() / ".." / "rpc" / "kvwaved", self.parent_path() / "kvwaved"}) {
      if (Executable(p.string())) return p.lexically_normal().string();
    }
  }
  return "kvwaved";
}

absl::StatusOr<std::unique_ptr<LocalDaemon>> LocalDaemon::Start(const LocalDaemonOptions& options) {
  static std::atomic<int> counter{0};
  const std::string binary = FindKvwaved(options.binary);
  const std::string socket_path =
      !options.socket_path.empty()
          ? options.socket_path
          : absl::StrCat("/tmp/kvwaved-", getpid(), "-", counter.fetch_add(1), ".sock");
  std::vector<std::string> args = {binary, "--set", "rpc.socket_path=" + socket_path};
  if (!options.config_path.empty()) {
    args.push_back("--config");
    args.push_back(options.config_path);
  }
  for (const std::string& o : options.overrides) {
    args.push_back("--set");
    args.push_back(o);
  }
  args.push_back("--ready-fd");
  args.push_back(std::to_string(kChildReadyFd));
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int ready[2];
  if (pipe2(ready, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  const pid_t pid = fork();
  if (pid < 0) {
    close(ready[0]);
    close(ready[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    if (!options.log_path.empty()) {
      const int log = open(options.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) dup2(log, STDERR_FILENO);
    }
    if (dup2(ready[1], kChildReadyFd) < 0) std::_Exit(126);  // dup2 clears close-on-exec
    execvp(argv[0], argv.data());
    std::_Exit(127);
  }
  close(ready[1]);
  auto daemon = std::unique_ptr<LocalDaemon>(new LocalDaemon(pid, socket_path));
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options.start_timeout_ms);
  bool timed_out = false;
  const bool is_ready = WaitReady(ready[0], give_up, &timed_out);
  close(ready[0]);
  if (is_ready) return daemon;
  if (timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat(binary, " did not listen on ", socket_path, " in time"));
  }
  // EOF without the line: it exited (or closed the fd and will); reap it.
  (void)daemon->Stop(0, options.start_timeout_ms);
  return absl::UnavailableError(absl::StrCat(binary, " exited with code ", daemon->exit_code_,
                                             " before listening on ", socket_path));
}

bool LocalDaemon::Running() {
  if (exit_code_ >= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_code_ = DecodeWaitStatus(status);
    return false;
  }
  return r == 0;
}

absl::StatusOr<int> LocalDaemon::Stop(int signal, int timeout_ms) {
  if (!Running()) return exit_code_;
  if (signal != 0) kill(pid_, signal);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  // Wait on the process itself (a pidfd is readable once it exits); no polling interval.
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
  while (Running()) {
    if (std::chrono::steady_clock::now() > give_up) {
      if (pidfd >= 0) close(pidfd);
      return absl::DeadlineExceededError(absl::StrCat("kvwaved (pid ", pid_, ") still running"));
    }
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      (void)poll(&p, 1, MillisLeft(give_up));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // kernel without pidfd_open
    }
  }
  if (pidfd >= 0) close(pidfd);
  return exit_code_;
}

LocalDaemon::~LocalDaemon() {
  if (!Stop(SIGTERM, 15000).ok()) {
    (void)Stop(SIGKILL, 5000);
  }
}

}  // namespace kvwave::client
