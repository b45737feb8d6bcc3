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
//   behind     FetchBehind queues whole segments; `threads` worker threads (nice 19) read them
//              a chunk at a time: claim the absent clusters of the next behind_chunk_bytes of
//              the KV stream, GETRANGE them (one pipeline on the block's node, the calling
//              thread), verify each cluster against its checksum and publish it. So a reader
//              that wants a cluster a worker holds waits for one chunk, not a segment, and a
//              node serving a behind read delays an on-demand GETRANGE by at most one chunk.
// Urgent reads first: the reads a caller waits for (an Open's index reads, RemoteTier::FetchRun;
// on-demand fetches) each hold an UrgentScope; no behind chunk starts while one is held, nor
// within behind_quiet_ms after the last one ended (so the attach and the first Attend of every
// layer after it run without the background traffic competing for the CPU and the nodes, and
// the background takes the gaps).
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
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
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

struct KvFetcherOptions {
  int threads = 1;                                  // behind workers (0: rows only on demand)
  int64_t behind_chunk_bytes = int64_t{512} << 10;  // KV bytes a behind read asks for
  int64_t behind_quiet_ms = 20;  // behind reads wait this long after the last urgent read
};

struct KvFetchStats {
  int64_t on_demand_bytes = 0;     // GETRANGE payload bytes
  int64_t on_demand_ranges = 0;    // GETRANGE commands
  int64_t on_demand_clusters = 0;  // clusters published on demand
  int64_t behind_bytes = 0;        // GETRANGE payload bytes read by the workers
  int64_t behind_ranges = 0;       // their GETRANGE commands
  int64_t behind_segments = 0;     // segments the workers went through without an error
  int64_t behind_held = 0;         // times a worker with work waited for urgent reads to end
  int64_t lost_segments = 0;       // segments with clusters lost (part gone or corrupt)
  int64_t unavailable = 0;         // fetches that failed on a slow or dead node
  int64_t queued = 0;              // segments waiting for a worker now
};

class KvFetcher final : public store::RowFetcher {
 public:
  KvFetcher(std::shared_ptr<RedisCluster> cluster, KvFetcherOptions options);
  ~KvFetcher() override;  // REQUIRES: Stop() was called if threads > 0

  // Held by a read a caller waits for, for its duration (move-only; nests).
  class UrgentScope {
   public:
    explicit UrgentScope(KvFetcher* fetcher);
    UrgentScope(UrgentScope&& other) noexcept : fetcher_(std::exchange(other.fetcher_, nullptr)) {}
    UrgentScope& operator=(UrgentScope&&) = delete;
    ~UrgentScope();

   private:
    KvFetcher* fetcher_;
  };
  UrgentScope Urgent() { return UrgentScope(this); }

  // On demand: an urgent read.
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

  // Waits until a worker holding a segment is waiting for urgent reads to end (or for the
  // quiet time after them). For tests.
  void TEST_WaitBehindHeld();

 private:
  using Clock = std::chrono::steady_clock;
  struct Plan;  // the GETRANGE commands of a batch of claims

  void WorkerLoop();
  // Reads one segment a chunk at a time; false when stopping.
  bool FetchBehindSegment(const std::weak_ptr<const store::Segment>& segment);
  // Waits until no urgent read is running and the quiet time after the last one has passed;
  // false when stopping.
  bool WaitQuiet();
  void EndUrgent();
  static Plan PlanRanges(std::span<store::RowClaim> claims);
  // Verifies the replies of `plan` and publishes, retries or loses each claimed cluster.
  absl::Status Settle(std::span<store::RowClaim> claims, const Plan& plan,
                      std::vector<absl::StatusOr<Reply>>& replies, bool behind);
  void MarkLost(const RemoteRows& rows);

  const std::shared_ptr<RedisCluster> cluster_;
  const KvFetcherOptions options_;
  mutable absl::Mutex mu_;
  std::deque<std::weak_ptr<const store::Segment>> queue_ ABSL_GUARDED_BY(mu_);
  int busy_ ABSL_GUARDED_BY(mu_) = 0;
  int held_ ABSL_GUARDED_BY(mu_) = 0;                    // workers waiting in WaitQuiet now
  int urgent_ ABSL_GUARDED_BY(mu_) = 0;                  // urgent reads running now
  Clock::time_point urgent_end_ ABSL_GUARDED_BY(mu_){};  // when the last one ended
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<std::pair<store::BlockHash, uint64_t>> lost_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> workers_;
  // Statistics: relaxed, they order nothing.
  std::atomic<int64_t> on_demand_bytes_{0}, on_demand_ranges_{0}, on_demand_clusters_{0},
      behind_bytes_{0}, behind_ranges_{0}, behind_segments_{0}, behind_held_{0}, lost_segments_{0},
      unavailable_{0};
};

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_KV_FETCHER_H_
