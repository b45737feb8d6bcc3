// A private Redis Cluster on loopback, for tests and benchmarks: N masters (redis-server
// --cluster-enabled yes, no replicas) on free ports in a fresh temporary directory, joined by
// `redis-cli --cluster create`, ready once every node reports cluster_state:ok with all 16384
// slots assigned. Eviction is Redis's: maxmemory + maxmemory-policy (allkeys-lru by default), as
// a deployment would set them. cluster-require-full-coverage is off, so the masters that are up
// keep serving their slots while one is stopped or dead.
//
// Thread-safety: owned by one thread. The destructor stops every node and removes the directory.
#ifndef KVWAVE_REMOTE_LOCAL_CLUSTER_H_
#define KVWAVE_REMOTE_LOCAL_CLUSTER_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvwave::remote {

struct LocalClusterOptions {
  int masters = 3;
  int64_t maxmemory_bytes = int64_t{512} << 20;  // per node
  std::string maxmemory_policy = "allkeys-lru";
  int64_t node_timeout_ms = 2000;  // cluster-node-timeout
  int64_t start_timeout_ms = 60000;
};

class LocalRedisCluster {
 public:
  // Whether redis-server and redis-cli are on PATH.
  static bool Installed();
  // FailedPrecondition when Redis is not installed; Unavailable when the cluster did not form.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<LocalRedisCluster>> Start(
      const LocalClusterOptions& options = {});
  ~LocalRedisCluster();
  LocalRedisCluster(const LocalRedisCluster&) = delete;
  LocalRedisCluster& operator=(const LocalRedisCluster&) = delete;

  // "127.0.0.1:p1,127.0.0.1:p2,..." (the remote.redis setting).
  std::string seeds() const;
  const std::vector<std::string>& nodes() const { return addresses_; }
  int size() const { return static_cast<int>(addresses_.size()); }
  // Index of a node by "host:port", -1 if none.
  int IndexOf(const std::string& address) const;
  pid_t pid(int node) const { return pids_[node]; }
  const std::string& dir() const { return dir_; }

  // SIGSTOP / SIGCONT one node: a stopped node accepts TCP connections (the kernel does) but
  // never answers, the worst case for a client.
  [[nodiscard]] absl::Status Pause(int node);
  [[nodiscard]] absl::Status Resume(int node);
  // Waits until every node reports cluster_state:ok again (after Resume).
  [[nodiscard]] absl::Status WaitHealthy(int64_t timeout_ms);
  // Deletes every key on every node.
  [[nodiscard]] absl::Status FlushAll();

 private:
  LocalRedisCluster() = default;
  absl::Status StartNode(int index, const LocalClusterOptions& options);
  void StopAll();

  std::string dir_;
  std::vector<std::string> addresses_;
  std::vector<int> ports_;
  std::vector<pid_t> pids_;
};

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_LOCAL_CLUSTER_H_
