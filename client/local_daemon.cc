#include "kvwave/local_daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

bool CanConnect(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
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
  for (const std::string& o : options.overrides) {
    args.push_back("--set");
    args.push_back(o);
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    if (!options.log_path.empty()) {
      const int log = open(options.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) dup2(log, STDERR_FILENO);
    }
    execvp(argv[0], argv.data());
    std::_Exit(127);
  }
  auto daemon = std::unique_ptr<LocalDaemon>(new LocalDaemon(pid, socket_path));
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options.start_timeout_ms);
  while (!CanConnect(socket_path)) {
    if (!daemon->Running()) {
      return absl::UnavailableError(absl::StrCat(binary, " exited with code ", daemon->exit_code_,
                                                 " before listening on ", socket_path));
    }
    if (std::chrono::steady_clock::now() > give_up) {
      return absl::DeadlineExceededError(
          absl::StrCat(binary, " did not listen on ", socket_path, " in time"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return daemon;
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
  kill(pid_, signal);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Running()) {
    if (std::chrono::steady_clock::now() > give_up) {
      return absl::DeadlineExceededError(absl::StrCat("kvwaved (pid ", pid_, ") still running"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return exit_code_;
}

LocalDaemon::~LocalDaemon() {
  if (!Stop(SIGTERM, 15000).ok()) {
    (void)Stop(SIGKILL, 5000);
  }
}

}  // namespace kvwave::client
