// Fetching the KV rows of remote-attached segments after the attach (store/pending_rows.h).
//
// A block attached lazily (RemoteTier::FetchRun with lazy) arrives with each segment's index
// stream (remote/split_segment.h) decoded and its KV stream left in the cluster; each such
// segment carries a RemoteRows (where its KV stream lives: keys, generation, parts, cluster
// checksums). Two ways bring the rows in:
//   on demand  FetchClaimed (called through store::EnsureClusters by an Attend, Retrieve or
//              Gather that needs clusters not resident yet): one GETRANGE per run of adjacent
//              clusters (per part it crosses), all pipelined, one connection per node, nodes in
//              parallel; each cluster is verified against its checksum from the index before it
//              is published.
//   behind     FetchBehind queues whole segments; `threads` low-priority worker threads GET
//              their KV parts (each part verified by its own checksum) and publish every
//              cluster still absent.
// Failures: a node down or slow (Unavailable) leaves the clusters absent (a later call tries
// again); a part gone (evicted, deleted) or bytes that do not verify make the clusters lost for
// good: readers get DataLoss, the block's (hash, generation) is remembered as lost (IsLost), so
// that the tier does not attach it again, and the engine's registry forgets it.
//
// Lifetime: segments hold their RemoteRows, which hold a shared_ptr to the fetcher, which holds
// the cluster client: on-demand fetches work as long as a segment lives. Stop (called by the
// RemoteTier's destructor) joins the workers; queued segments are held by weak_ptr only.
//
// Thread-safety: every method is thread-safe.
#ifndef KVWAVE_REMOTE_KV_FETCHER_H_
#define KVWAVE_REMOTE_KV_FETCHER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "remote/block_format.h"
#include "remote/redis_cluster.h"
#include "store/pending_rows.h"
#include "store/prefix_hash.h"
#include "store/segment.h"

namespace kvwave::remote {

class KvFetcher;

// Where one segment's KV stream lives in the cluster.
class RemoteRows final : public store::PendingRows {
 public:
  struct Part {
    uint32_t index = 0;  // part number (its key)
    PartRef ref;         // offset and length in the KV stream, checksum of the value
  };
  RemoteRows(const std::vector<bool>& empty, std::shared_ptr<KvFetcher> fetcher);

  std::string name_space;
  store::BlockHash hash;
  uint64_t generation = 0;
  int slot = 0;
  std::vector<Part> parts;                  // the KV stream's, in offset order
  std::vector<uint64_t> cluster_checksums;  // [C]
  uint64_t kv_bytes = 0;
};

struct KvFetchStats {
  int64_t on_demand_bytes = 0;     // GETRANGE payload bytes
  int64_t on_demand_ranges = 0;    // GETRANGE commands
  int64_t on_demand_clusters = 0;  // clusters published on demand
  int64_t behind_bytes = 0;        // KV part values read by the workers
  int64_t behind_segments = 0;     // segments completed by the workers
  int64_t lost_segments = 0;       // segments with clusters lost (part gone or corrupt)
  int64_t unavailable = 0;         // fetches that failed on a slow or dead node
  int64_t queued = 0;              // segments waiting for a worker now
};

class KvFetcher final : public store::RowFetcher {
 public:
  KvFetcher(std::shared_ptr<RedisCluster> cluster, int threads);
  ~KvFetcher() override;  // REQUIRES: Stop() was called if threads > 0

  absl::Status FetchClaimed(std::span<store::RowClaim> claims) override;

  // Queues segments for the background workers (no-op without workers).
  void FetchBehind(std::vector<std::weak_ptr<const store::Segment>> segments);
  // Waits until the queue is empty and no worker is busy.
  void WaitIdle();
  // Stops and joins the workers; queued segments are dropped.
  void Stop();

  // Whether the KV of (hash, generation) was found gone or corrupt.
  bool IsLost(const store::BlockHash& hash, uint64_t generation) const;

  KvFetchStats stats() const;

 private:
  void WorkerLoop();
  void FetchSegment(const store::Segment& segment, std::vector<BulkValue>& scratch);
  void MarkLost(const RemoteRows& rows);

  const std::shared_ptr<RedisCluster> cluster_;
  mutable absl::Mutex mu_;
  std::deque<std::weak_ptr<const store::Segment>> queue_ ABSL_GUARDED_BY(mu_);
  int busy_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<std::pair<store::BlockHash, uint64_t>> lost_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> workers_;
  // Statistics: relaxed, they order nothing.
  std::atomic<int64_t> on_demand_bytes_{0}, on_demand_ranges_{0}, on_demand_clusters_{0},
      behind_bytes_{0}, behind_segments_{0}, lost_segments_{0}, unavailable_{0};
};

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_KV_FETCHER_H_
