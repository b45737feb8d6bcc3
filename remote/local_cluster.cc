#include "remote/local_cluster.h"

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "config/status_macros.h"

namespace kvwave::remote {
namespace {

using Clock = std::chrono::steady_clock;

bool OnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return false;
  for (absl::string_view dir : absl::StrSplit(path, ':')) {
    if (!dir.empty() && access(absl::StrCat(dir, "/", name).c_str(), X_OK) == 0) return true;
  }
  return false;
}

// A free TCP port on 127.0.0.1 (bound and released: another process may take it before the node
// binds it; StartNode then retries with fresh ports).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

// One command on a node; the reply's text (status, string, or the integer as text).
absl::StatusOr<std::string> Ask(int port, const char* command) {
  timeval connect_tv{0, 200000}, command_tv{2, 0};
  redisContext* c = redisConnectWithTimeout("127.0.0.1", port, connect_tv);
  if (c == nullptr || c->err != 0) {
    std::string why = c != nullptr ? c->errstr : "no memory";
    if (c != nullptr) redisFree(c);
    return absl::UnavailableError(why);
  }
  redisSetTimeout(c, command_tv);
  auto* r = static_cast<redisReply*>(redisCommand(c, command));
  if (r == nullptr) {
    std::string why = c->errstr;
    redisFree(c);
    return absl::UnavailableError(why);
  }
  std::string out = r->type == REDIS_REPLY_INTEGER ? std::to_string(r->integer)
                                                   : std::string(r->str ? r->str : "", r->len);
  const bool error = r->type == REDIS_REPLY_ERROR;
  freeReplyObject(r);
  redisFree(c);
  if (error) return absl::FailedPreconditionError(out);
  return out;
}

// Polls `ready` every 10 ms until it holds or the deadline passes.
template <typename Pred>
bool PollUntil(Pred ready, int64_t timeout_ms) {
  const auto give_up = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (ready()) return true;
    if (Clock::now() >= give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Starts a child with stdout and stderr appended to `log`. The child gets SIGKILL when the
// thread that started it dies (PR_SET_PDEATHSIG), so a crashed or killed test leaves no
// redis-server behind.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {  // only async-signal-safe calls until exec
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent already died
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execvp(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

bool Exited(pid_t pid) {
  int status;
  return waitpid(pid, &status, WNOHANG) == pid;
}

}  // namespace

bool LocalRedisCluster::Installed() { return OnPath("redis-server") && OnPath("redis-cli"); }

absl::Status LocalRedisCluster::StartNode(int index, const LocalClusterOptions& options) {
  for (int attempt = 0; attempt < 5; ++attempt) {
    const int port = FreePort(), bus = FreePort();
    if (port <= 0 || bus <= 0 || port == bus) continue;
    const std::string conf = absl::StrCat(dir_, "/node", index, ".conf");
    {
      std::ofstream f(conf);
      f << "port " << port << "\ncluster-port " << bus << "\nbind 127.0.0.1\n"
        << "cluster-enabled yes\ncluster-config-file " << dir_ << "/nodes" << index << ".conf\n"
        << "cluster-node-timeout " << options.node_timeout_ms << "\n"
        << "cluster-require-full-coverage no\ncluster-allow-reads-when-down yes\n"
        << "dir " << dir_ << "\nsave \"\"\nappendonly no\nprotected-mode no\n"
        << "maxmemory " << options.maxmemory_bytes << "\nmaxmemory-policy "
        << options.maxmemory_policy << "\nlogfile " << dir_ << "/node" << index << ".log\n";
    }
    KVWAVE_ASSIGN_OR_RETURN(pid_t pid, Spawn({"redis-server", conf}, dir_ + "/spawn.log"));
    bool exited = false;
    const bool up = PollUntil(
        [&] {
          if (Exited(pid)) return exited = true;
          absl::StatusOr<std::string> pong = Ask(port, "PING");
          return pong.ok() && *pong == "PONG";
        },
        options.start_timeout_ms);
    if (up && !exited) {
      pids_[index] = pid;
      ports_[index] = port;
      addresses_[index] = absl::StrCat("127.0.0.1:", port);
      return absl::OkStatus();
    }
    if (!exited) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    // A port taken meanwhile by another process: try fresh ones.
  }
  return absl::UnavailableError(absl::StrCat("redis-server node ", index, " did not start (see ",
                                             dir_, "/node", index, ".log)"));
}

absl::StatusOr<std::unique_ptr<LocalRedisCluster>> LocalRedisCluster::Start(
    const LocalClusterOptions& options) {
  if (!Installed()) {
    return absl::FailedPreconditionError(
        "redis-server / redis-cli not on PATH (Debian: apt-get install redis-server)");
  }
  std::unique_ptr<LocalRedisCluster> cluster(new LocalRedisCluster());
  std::string tmpl = (std::filesystem::temp_directory_path() / "kvwave-redis-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) return absl::InternalError("mkdtemp failed");
  cluster->dir_ = tmpl;
  cluster->pids_.assign(options.masters, -1);
  cluster->ports_.assign(options.masters, 0);
  cluster->addresses_.assign(options.masters, "");
  for (int i = 0; i < options.masters; ++i) {
    KVWAVE_RETURN_IF_ERROR(cluster->StartNode(i, options));
  }
  std::vector<std::string> args = {"redis-cli", "--cluster", "create"};
  for (const std::string& a : cluster->addresses_) args.push_back(a);
  args.insert(args.end(), {"--cluster-replicas", "0", "--cluster-yes"});
  KVWAVE_ASSIGN_OR_RETURN(pid_t cli, Spawn(args, cluster->dir_ + "/create.log"));
  int status = 0;
  waitpid(cli, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::UnavailableError(
        absl::StrCat("redis-cli --cluster create failed (see ", cluster->dir_, "/create.log)"));
  }
  KVWAVE_RETURN_IF_ERROR(cluster->WaitHealthy(options.start_timeout_ms));
  return cluster;
}

absl::Status LocalRedisCluster::WaitHealthy(int64_t timeout_ms) {
  const std::string want_nodes = absl::StrCat("cluster_known_nodes:", ports_.size());
  const bool ok = PollUntil(
      [&] {
        for (int port : ports_) {
          absl::StatusOr<std::string> info = Ask(port, "CLUSTER INFO");
          if (!info.ok() || !absl::StrContains(*info, "cluster_state:ok") ||
              !absl::StrContains(*info, "cluster_slots_ok:16384") ||
              !absl::StrContains(*info, want_nodes)) {
            return false;
          }
        }
        return true;
      },
      timeout_ms);
  return ok ? absl::OkStatus()
            : absl::UnavailableError(absl::StrCat("redis cluster in ", dir_, " not healthy"));
}

std::string LocalRedisCluster::seeds() const { return absl::StrJoin(addresses_, ","); }

int LocalRedisCluster::IndexOf(const std::string& address) const {
  for (size_t i = 0; i < addresses_.size(); ++i) {
    if (addresses_[i] == address) return static_cast<int>(i);
  }
  return -1;
}

absl::Status LocalRedisCluster::Pause(int node) {
  if (kill(pids_.at(node), SIGSTOP) != 0) return absl::InternalError("SIGSTOP failed");
  return absl::OkStatus();
}

absl::Status LocalRedisCluster::Resume(int node) {
  if (kill(pids_.at(node), SIGCONT) != 0) return absl::InternalError("SIGCONT failed");
  return absl::OkStatus();
}

absl::Status LocalRedisCluster::FlushAll() {
  for (int port : ports_) KVWAVE_RETURN_IF_ERROR(Ask(port, "FLUSHALL").status());
  return absl::OkStatus();
}

void LocalRedisCluster::StopAll() {
  for (pid_t pid : pids_) {
    if (pid <= 0) continue;
    kill(pid, SIGCONT);
    kill(pid, SIGTERM);
  }
  for (pid_t pid : pids_) {
    if (pid <= 0) continue;
    if (!PollUntil([&] { return Exited(pid); }, 5000)) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  pids_.clear();
}

LocalRedisCluster::~LocalRedisCluster() {
  StopAll();
  std::error_code ec;
  if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
}

}  // namespace kvwave::remote
