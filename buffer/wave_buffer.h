// The wave buffer: tripartite attention on the GPU for live, growing contexts, with one GPU page
// pool caching clusters of KV pages that live in pinned host memory.
//
// Spaces. A space is one layer of one context (its KV heads). Sync(space, heads) brings the GPU's
// copy in line with the layer's host state: every sealed segment not yet joined joins the space's
// meta index (centroids, bf16 centroids, value sums, sizes, cache keys; any cluster count per
// segment, any cluster size), and the steady zone (the context's sink rows + its unsealed tail)
// is mirrored in a device ring that each Sync extends by the rows appended since (one row per
// head per decode step). A space's arrays grow by doubling. CloseSpace drops it; a segment no
// space holds any more leaves the cache (its pages are freed, its keys reused).
//
// Segments are named by identity (the store::Segment object): a prefix block attached by several
// contexts is registered once, its clusters get one set of cache keys, and its cached pages serve
// every context that attends it. (Each space keeps its own copy of the block's meta index, so
// that a head's clusters are contiguous for the scoring kernels.)
//
// A batch (AttendHostBatch: calls on several spaces, contexts of any lengths, each with its own
// budgets; AttendLayer / AttendHost: a batch of one) runs ONE fused, chained pipeline on the
// compute stream, whose launches cover (call, head) for every call: one upload of the batch's
// rows, q and per-head descriptors (gpu::HeadMeta: where each head's meta index is, its cluster
// count and zone sizes), then scores + top-k of both zones + page plan in one kernel
// (ScoreSelectPlan) that writes a compact record straight to pinned host memory, then the
// estimation zone and the exact attention as programmatic dependents (no event or launch gap
// between them); the exact attention reads steady rows and cached clusters from HBM and the misses
// straight from pinned host memory (zero-copy, once), stashing them in the batch's execution
// buffer, and its last block per head folds in the estimation zone; a host batch's results land in
// pinned memory, read once it is complete. Budgets come with each call. The CPU's part (the LRU
// over the one page pool shared by all spaces) runs behind on committer threads from the record;
// its decisions (table writes, device-to-device admission copies from the execution buffer) are
// queued on a stream of their own (U), each after the calls queued before it (an event of C's
// tail), and every later call's selection and plan wait for them (an event of U's tail): so every
// call sees a table consistent with the pool, and an update runs beside the next call's centroid
// logits instead of in front of them.
//
// Resources: a WaveBuffer owns its CudaBackend (streams, events, workspace), its slots (per
// in-flight batch: lists, page lists, execution buffer, pinned record and staging) and scratch,
// all grown to the largest batch so far.
//
// Thread-safety: every method is thread-safe. Calls on different spaces may come from different
// threads at once (their kernels are queued one batch at a time under a mutex; a space is synced
// and queued under its own mutex; a batch takes its spaces' mutexes in address order). The host
// rows a Sync reads (segments, tail) must not change
// until that call is complete (AttendHost returns complete; after AttendLayer, Finish).
#ifndef KVWAVE_BUFFER_WAVE_BUFFER_H_
#define KVWAVE_BUFFER_WAVE_BUFFER_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "buffer/async_committer.h"
#include "buffer/wave_policy.h"
#include "config/dtype.h"
#include "gpu/cuda_backend.h"
#include "store/context.h"
#include "store/host_memory.h"
#include "store/segment.h"

namespace kvwave::buffer {

struct WaveBufferOptions {
  int device = 0;
  int heads = 0, g = 0, d = 0;  // KV heads of a space, query heads per KV head, head dim
  DType dtype = DType::kBF16;   // of K and V (bf16 or f16)
  int64_t cache_bytes = 0;      // page pool (K and V)
  int exact_pages_per_split = 16;
  // Score the clusters with a bf16 copy of the centroids (half the bytes of the largest read of
  // a call): the ranking equals the float32 one except at near-ties (the estimation zone keeps
  // the float32 centroids). false: float32 scores, the CPU backend's ranking.
  bool bf16_scores = true;
  // The backend's scratch, halved between the calls' stream (scoring logits: 4 x heads x g x
  // clusters bytes) and the updates' (which use none).
  int64_t workspace_bytes = int64_t{256} << 20;
  // Batches in flight at once (each holds its slot until its LRU commit is done; a batch of B
  // contexts is one batch a layer).
  int slots = 8;
  // Pinned staging per slot for the rows a Sync uploads (larger uploads copy row runs directly).
  int64_t staging_bytes = int64_t{1} << 20;
};

// Budgets of one call: fractions of a head's clusters.
struct WaveBudget {
  double retrieval = 0.018;
  double estimation = 0.232;
};

// Clusters of the retrieval and estimation zones for `total` clusters: gpu::SizeZones
// (gpu/budget.h), the one formula the CPU backend uses too (fractions of ALL clusters).
struct ZoneCounts {
  int64_t retrieval = 0, estimation = 0;
};
ZoneCounts ZoneClusters(const WaveBudget& budget, int64_t total);

// What one call attended, summed over its heads (known once the call is complete).
struct WaveCallStats {
  int64_t steady_tokens = 0;
  int64_t retrieved_tokens = 0;
  int64_t retrieved_clusters = 0;
  int64_t estimated_clusters = 0;
  int64_t total_clusters = 0;
};

// Cumulative counts since Create (hits/misses are counted by the committer: read them after
// Finish()).
struct WaveCounters {
  int64_t calls = 0;
  int64_t hit_clusters = 0, miss_clusters = 0;
  int64_t hit_pages = 0, miss_pages = 0;
  int64_t stale_hits = 0;       // hits whose cluster an earlier commit evicted before this one ran
  int64_t pcie_bytes = 0;       // K and V rows read from host memory by calls
  int64_t upload_bytes = 0;     // meta index and steady rows uploaded by Syncs
  int64_t exact_rows = 0;       // rows attended exactly (steady + retrieval)
  double enqueue_us = 0;        // queueing a batch's kernels (and its syncs), of which:
  double lock_us = 0;           //   waiting for the spaces' and the queueing locks
  double sync_us = 0;           //   syncing the spaces (segments joining, new rows collected)
  double launch_us = 0;         //   the upload and the launches
  double wait_us = 0;           // waiting for a free slot
  double commit_us = 0;         // committer threads: policy + queueing the update, of which:
  double commit_gpu_us = 0;     //   waiting for the batch's GPU work to complete
  double commit_order_us = 0;   //   waiting for the commits before it (commit_mu_)
  double commit_policy_us = 0;  //   the record's classification and the policy's decision
  double commit_queue_us = 0;   //   building the update and queueing it (enqueue_mu_ included)
  double result_wait_us = 0;    // host calls: waiting for the call's results (GPU time and queue)
  double end_us = 0;            // host calls: copying the results out and counting the stats
};

// The cache's bookkeeping, for checking that it returns to its baseline.
struct WaveAccounting {
  int64_t pool_pages = 0, free_pages = 0, cached_clusters = 0;
  int64_t spaces = 0, segments = 0;     // segments registered (held by at least one space)
  int64_t keys = 0, table_entries = 0;  // cache keys and page-table entries in use
  int64_t busy_slots = 0;
};

class WaveBuffer {
 public:
  using SpaceId = int64_t;

  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WaveBuffer>> Create(
      const WaveBufferOptions& options);
  ~WaveBuffer();
  WaveBuffer(const WaveBuffer&) = delete;
  WaveBuffer& operator=(const WaveBuffer&) = delete;

  [[nodiscard]] absl::StatusOr<SpaceId> OpenSpace();
  // Waits for the space's calls, drops it and releases the segments no other space holds.
  [[nodiscard]] absl::Status CloseSpace(SpaceId space);

  // Tripartite attention of one space: q [heads x g x d] float32, out [heads x g x d], lse
  // [heads x g], all on the device. With `heads` (the layer's KV heads, whose lock the caller
  // holds), the space is synced first. Queued; returns without waiting for the GPU.
  [[nodiscard]] absl::Status AttendLayer(SpaceId space, std::span<const store::HeadKv> heads,
                                         const float* q, float* out, float* lse,
                                         const WaveBudget& budget);
  // The same with host q / out / lse; returns once the results are in out and lse.
  [[nodiscard]] absl::Status AttendHost(SpaceId space, std::span<const store::HeadKv> heads,
                                        const float* q, float* out, float* lse,
                                        const WaveBudget& budget, WaveCallStats* stats);
  // Several host calls (spaces of one buffer; the same space may come twice) as one batch: one
  // pipeline (one upload, one set of launches, one plan, one commit). A batch whose scoring
  // would not fit the backend's workspace is cut into consecutive batches.
  struct HostCall {
    SpaceId space = 0;
    std::span<const store::HeadKv> heads;
    const float* q = nullptr;
    float* out = nullptr;
    float* lse = nullptr;
    WaveBudget budget;
    WaveCallStats* stats = nullptr;
  };
  [[nodiscard]] absl::Status AttendHostBatch(std::span<const HostCall> calls);
  // Calls on device q / out / lse of another party's stream (wave_device.cc): calls whose q, out
  // and lse follow the previous call's in memory go in one pipeline (as AttendHostBatch's), else
  // each starts another. The first pipeline's
  // kernels wait for `wait_event` (a cudaEvent_t, e.g. a client's "q ready"; null: none), and
  // `signal_event` (null: none) is recorded after the last call's, even when a call fails (then
  // after what was queued): once it completes, nothing of these calls touches q / out / lse.
  // Returns without waiting for the GPU. Uploads a Sync copies straight from host rows (too
  // large for the slot's staging: a first call after a long prefill) are waited for before the
  // calls wait for `wait_event`, so the host rows may change once this returns. Stats: the
  // steady rows and cluster totals (known when queued); retrieved counts are not reported.
  using DeviceCall = HostCall;  // the same fields; q / out / lse are device pointers
  [[nodiscard]] absl::Status AttendDeviceBatch(std::span<const DeviceCall> calls, void* wait_event,
                                               void* signal_event);
  // Waits for the calls queued so far (and the cache updates queued before them), not for the
  // commits still to come (Finish).
  [[nodiscard]] absl::Status WaitForCalls();
  // Waits for every queued call and commit; reports the first error of a commit job.
  [[nodiscard]] absl::Status Finish();

  WaveCounters counters() const;
  PolicyStats policy_stats() const { return policy_->stats(); }
  WaveAccounting accounting() const;
  int64_t pool_pages() const { return pool_pages_; }
  const WaveBufferOptions& options() const { return o_; }
  gpu::CudaBackend* backend() const { return backend_.get(); }

 private:
  struct Slot;
  struct Space;
  struct Registered;  // one segment's keys and table entries
  struct CallRecord;
  explicit WaveBuffer(const WaveBufferOptions& options);
  absl::Status Init();

  // ---- wave_space.cc ----
  // One host-to-device copy of a batch's upload: bytes from a host source to the device.
  struct Run {
    const std::byte* src = nullptr;
    std::byte* dst = nullptr;
    size_t bytes = 0;
  };
  // Brings `space` in line with `heads`: joins new segments (copies queued on the compute
  // stream) and appends the steady zone's new rows to `runs` (uploaded by UploadRuns). Caller
  // holds space.mu and enqueue_mu_.
  absl::Status Sync(Space& space, std::span<const store::HeadKv> heads, std::vector<Run>& runs);
  absl::Status JoinSegments(Space& space, std::span<const store::HeadKv> heads);
  absl::Status GrowSpace(Space& space, int64_t clusters);
  void SyncSteady(Space& space, std::span<const store::HeadKv> heads, std::vector<Run>& runs);
  absl::Status GrowRing(Space& space, std::span<const store::HeadKv> heads);
  // Queues `runs` on the compute stream: the small ones staged in the slot's pinned staging and
  // copied by one gather kernel, the large ones copied directly (then *direct = true). Caller
  // holds enqueue_mu_.
  absl::Status UploadRuns(Slot& slot, std::span<const Run> runs, bool* direct);
  // Registers a segment (or takes one more reference); returns its first key.
  absl::StatusOr<int32_t> Acquire(const std::shared_ptr<const store::Segment>& seg);
  // Drops one reference of each; the ones left with none leave the cache. Caller holds no lock.
  absl::Status Release(std::vector<const store::Segment*> segments);
  absl::Status GrowKeys(int64_t keys, int64_t entries);

  // ---- wave_buffer.cc ----
  absl::StatusOr<int> AcquireSlot();
  int TryAcquireSlot();  // -1: none free
  void FreeSlot(int slot);
  // Syncs and queues one batch on an acquired slot (which it gives back on error); host: q, out
  // and lse are host memory, else device memory (consecutive, call by call), and the kernels wait
  // for `wait_event` (a foreign cudaEvent_t; null: none) after the batch's uploads, of which the
  // direct copies from host rows are complete when a device batch's Begin returns. End waits for
  // a host batch's results, copies them out and frees the slot.
  absl::Status Begin(int slot, std::span<const HostCall> calls, bool host,
                     void* wait_event = nullptr);
  absl::Status End(int slot, std::span<const HostCall> calls);
  absl::Status EnsureSlot(Slot& s, int64_t heads, int64_t list_stride, int64_t max_pages,
                          int64_t exec_pages, int64_t record_ints);
  absl::Status EnsureScratch(int64_t heads, int64_t clusters, int64_t max_pages,
                             int64_t list_stride);
  // Queues one batch, call i on spaces[i] (caller holds enqueue_mu_ and the spaces' mutexes);
  // `runs` (the syncs' uploads) go up with the batch's q and descriptors.
  absl::Status Enqueue(std::span<Space* const> spaces, std::span<const HostCall> calls, bool host,
                       int slot, std::vector<Run>& runs, void* wait_event);
  // How many of `calls` (from the first) one batch takes: as many as the backend's workspace
  // scores at once.
  size_t BatchPrefix(std::span<const HostCall> calls) const;
  void Commit(int slot);
  void Fail(const absl::Status& status);

  WaveBufferOptions o_;
  std::unique_ptr<gpu::CudaBackend> backend_;
  size_t row_bytes_ = 0, page_bytes_ = 0;
  int64_t pool_pages_ = 0;
  std::unique_ptr<WavePolicy> policy_;
  gpu::DeviceBuffer pool_k_, pool_v_;

  // Cache keys (one per registered cluster) and page-table entries (one per page of a key).
  // Device: page_base_ [key_cap], key_k_ / key_v_ [key_cap] host row addresses, table_
  // [entry_cap] (pool slot or -1). Host mirrors for the committer. Guarded by reg_mu_ (the
  // device arrays' pointers change only under enqueue_mu_ too).
  mutable std::mutex reg_mu_;
  std::unordered_map<const store::Segment*, std::unique_ptr<Registered>> registered_;
  std::map<int64_t, int64_t> free_keys_, free_entries_;  // start -> length
  int64_t key_cap_ = 0, entry_cap_ = 0, keys_used_ = 0, entries_used_ = 0;
  std::vector<int64_t> key_entry_;  // [key_cap]
  std::vector<int32_t> key_rows_;   // [key_cap] cluster size
  gpu::DeviceBuffer page_base_, key_k_, key_v_, table_;

  mutable std::mutex spaces_mu_;
  std::unordered_map<SpaceId, std::shared_ptr<Space>> spaces_;
  SpaceId next_space_ = 1;

  // The instance's scratch for chained batches (sized by the largest batch so far: heads_cap_
  // heads).
  gpu::DeviceBuffer scores_, est_out_, est_lse_, est_ready_, pages_ready_, arrivals_,
      exact_scratch_, est_scratch_;
  int64_t heads_cap_ = 0;

  std::vector<std::unique_ptr<Slot>> slots_;
  mutable std::mutex slot_mu_;
  std::condition_variable slot_cv_;
  std::vector<int> free_slots_;

  // Events after the slots' done events (see wave_buffer_internal.h).
  int CallsEvent() const { return o_.slots; }
  int UpdatesEvent() const { return o_.slots + 1; }
  // The slot's batch is complete, for its committer (a blocking-sync event: the committer
  // sleeps; the host batch's own wait, on kDoneEvent + slot, spins for the lowest latency).
  int CommitEvent(int slot) const { return o_.slots + 2 + slot; }
  // Both streams idle (calls and cache updates).
  absl::Status SynchronizeAll();
  // Stream C waits for the updates queued so far, if any since it last did (enqueue_mu_ held).
  absl::Status CallsWaitForUpdates();

  std::mutex enqueue_mu_;        // one call's (or one update's) GPU work queued at a time
  bool updates_unseen_ = false;  // under enqueue_mu_: an update was queued since C last waited
  // Held by a commit from its policy decision until its update is queued (commits reach the GPU
  // in the order the policy decided them). Order: commit_mu_, then reg_mu_ or enqueue_mu_.
  std::mutex commit_mu_;
  uint32_t seq_ = 0;  // under enqueue_mu_: number of the latest call (ready words)

  mutable std::mutex mu_;  // error_, counters_
  absl::Status error_;
  WaveCounters counters_;
  std::vector<std::unique_ptr<AsyncCommitter>> committers_;  // [slots]; last: joined first
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_BUFFER_H_
