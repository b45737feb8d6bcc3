// The wave buffer: a GPU page pool caching clusters of KV pages that live in pinned host memory,
// plus the per-layer decode pipeline of tripartite attention on the GPU (steady zone + retrieval
// zone attended exactly, estimation zone from the meta index).
//
// Resident on the GPU: the meta index (centroids, value sums, sizes of every cluster of every
// (layer, KV head) unit), the steady zone (sink + local tokens), the page pool, and the cache
// table (cluster -> pool slots), so that a layer's attention needs no CPU round trip: the GPU
// ranks the clusters, looks up hits in the table, reads the misses straight from pinned host
// memory (zero-copy, once) and stashes them in an execution buffer as it attends to them. The
// CPU's part (the LRU replacement policy) runs behind, on the committer thread, from a compact
// record of each layer's hits and misses; its decisions reach the GPU as table updates and
// device-to-device admission copies from the execution buffer (no second PCIe read).
//
// Streams: C = 0 (compute), X = 1 (records to the host), S = 2 (estimation zone), U = 3 (cache
// updates). W = the committer threads. Call n uses ring slot n % kRing (execution buffer, records,
// staging).
//
//   C: |logits|scores + top-k + plan(table), record -> host|estimate (meta index, HBM)
//                                                         |exact: steady+hits (HBM) + misses (PCIe,
//                                                         |stashed); the last block of each head
//                                                         |merges the estimate (ready words)|
//      (chained: estimate and exact are programmatic dependents of the selection, no event
//      between them; unchained, an event, the estimate on S and a D2H copy of the record on X)
//   W:                                                    |LRU: touch hits, admit misses, evict|
//   U:                 (after call n, beside calls n+1, n+2 ...) |H2D update(n)|admission copies
//                                                                 exec -> pool|table scatter|
//
// Ordering: the main thread queues a call's kernels and the committer queues an update under one
// mutex. An update waits (on U) for its layer's latest call, which may still read the pool slots
// and table entries it rewrites; the layer's next call, and the next call of the same ring slot
// (which overwrites the execution buffer the update copies from), wait for it (on C). So every
// call sees a table consistent with the pool's contents, and the update's work overlaps the calls
// of other layers instead of sitting between them. A hit that an earlier update evicted after the
// call was planned was still read correctly and is simply not touched; a miss admitted meanwhile
// counts as a hit. Call n + kRing waits (on the CPU) for job n to have queued its update, which
// frees ring slot n % kRing; so the CPU policy may lag the GPU by kRing layers. Call n's job runs
// on committer thread n % kRing: jobs of different layers run in parallel (each layer has its
// own share of the pool and its own LRU), jobs of one layer one at a time.
//
// Events 0..5*kRing+5 of the backend are used here; streams 0 to 3.
// Thread-safety: one thread calls AttendLayer/Finish; the committer thread is internal.
#ifndef KVWAVE_BUFFER_WAVE_BUFFER_H_
#define KVWAVE_BUFFER_WAVE_BUFFER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "buffer/async_committer.h"
#include "buffer/wave_policy.h"
#include "config/dtype.h"
#include "gpu/cuda_backend.h"
#include "store/host_memory.h"

namespace kvwave::buffer {

// One (layer, KV head): where its clusters and meta index are. All host pointers stay valid for
// the WaveBuffer's life; k and v must be pinned mapped memory (PinnedHostAllocator).
struct UnitLayout {
  const std::byte* k = nullptr;  // cluster-contiguous rows of d elements (store::Segment layout)
  const std::byte* v = nullptr;
  const int64_t* cluster_row = nullptr;  // [C] first row of each cluster (page aligned)
  const int32_t* sizes = nullptr;        // [C] tokens of each cluster
  const float* centroids = nullptr;      // [C x d]
  const float* value_sums = nullptr;     // [C x d]
  const std::byte* steady_k = nullptr;   // [steady_rows x d], copied to the GPU
  const std::byte* steady_v = nullptr;
  int32_t steady_rows = 0;
};

struct WaveBufferOptions {
  int layers = 0, heads = 0, g = 0, d = 0;
  DType dtype = DType::kBF16;
  int64_t clusters = 0;            // per unit
  double retrieval = 0.018;        // fraction of clusters attended exactly
  double estimation = 0.232;       // next fraction, estimated
  int64_t cache_bytes = 0;         // page pool (K and V)
  int max_cluster_pages = 4;       // bound of pages per cluster (sizes the execution buffer)
  int exact_pages_per_split = 16;  // exact attention: pages per block (0: backend default)
  // Scores, top-k of both zones and plan in one op (CudaBackend::ScoreSelectPlan), and the
  // estimation zone merged with the exact attention's splits; false: one op each
  // (ScoreClusters, SelectTopK, PlanPages, ExactAttention, MergeLse).
  bool fused_select = true;
  // Score the clusters with a bf16 copy of the centroids (half the bytes of the logits' read;
  // ScoreArgs::centroids_bf16): the ranking then equals the float32 one for centroids that bf16
  // represents exactly (the wave index's, see SyntheticKv), else it may differ at near-ties. The
  // estimation zone keeps the float32 centroids.
  bool bf16_scores = true;
  // With fused_select: the estimation and exact attention queued as dependent launches behind the
  // selection on the compute stream (sm_90 programmatic dependent launch: scheduled as the
  // selection ends, no event or launch gap in between; the exact attention's blocks wait on the
  // GPU for their head's plan), and the record written by the plan straight to pinned host
  // memory, read once the call is done. false: an event after the selection, the estimation on
  // the side stream, the record copied on stream X.
  bool chain = true;
  bool profile = false;  // time each phase with events (synchronises every call)
};

// Cumulative counts since Create (hits/misses are known once the committer has processed a call:
// read them after Finish()).
struct WaveCounters {
  int64_t calls = 0;
  int64_t hit_clusters = 0, miss_clusters = 0;
  int64_t hit_pages = 0, miss_pages = 0;
  int64_t stale_hits = 0;     // hits whose cluster an earlier commit evicted before this one ran
  int64_t pcie_bytes = 0;     // K and V rows read from host memory
  int64_t exact_rows = 0;     // rows attended exactly (steady + retrieval)
  double enqueue_us = 0;      // main thread: queueing a call's kernels
  double wait_us = 0;         // main thread: waiting for the committer to free a ring slot
  double record_wait_us = 0;  // committer thread: waiting for a call's record to reach the host
  double commit_us = 0;       // committer thread: policy + queueing the update
  // With WaveBufferOptions::profile: GPU time of each phase (ms), summed over calls.
  // estimate_ms: waiting for the estimation zone (side stream) after the exact part, + merge.
  double score_ms = 0, topk_ms = 0, plan_ms = 0, exact_ms = 0, estimate_ms = 0;
};

class WaveBuffer {
 public:
  static constexpr int kRing = 4;

  // units: [layers x heads], unit = layer * heads + head. Every cluster must fit in
  // max_cluster_pages pages.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WaveBuffer>> Create(
      gpu::CudaBackend* backend, const WaveBufferOptions& options, std::vector<UnitLayout> units);
  ~WaveBuffer();

  // Tripartite attention of one layer: q [heads x g x d] float32 on the device; out [heads x g x
  // d] and lse [heads x g] on the device. Queued on stream 0; returns without waiting for the GPU
  // (unless the committer lags kRing calls behind).
  [[nodiscard]] absl::Status AttendLayer(int layer, const float* q, float* out, float* lse);
  // Waits for the committer and both streams; reports the first error of a commit job.
  [[nodiscard]] absl::Status Finish();

  WaveCounters counters() const;
  PolicyStats policy_stats() const;  // summed over the layers' policies
  int64_t pool_pages() const { return pages_per_layer_ * o_.layers; }
  int64_t retrieval_clusters() const { return r_; }
  int64_t estimation_clusters() const { return e_; }

 private:
  struct Slot;  // one ring slot
  WaveBuffer(gpu::CudaBackend* backend, const WaveBufferOptions& options,
             std::vector<UnitLayout> units);
  absl::Status Init();
  absl::Status Enqueue(int layer, const float* q, float* out, float* lse, Slot& slot);
  void Commit(int layer, int slot_index);
  // Blocks until the record of the slot's latest call is on the host.
  absl::Status WaitForRecord(int slot_index);
  int32_t PagesOf(int64_t unit, int32_t c) const;
  int32_t RowsOfPage(int64_t unit, int32_t c, int32_t page) const;

  gpu::CudaBackend* backend_;
  WaveBufferOptions o_;
  std::vector<UnitLayout> units_;
  // The pool is split evenly between the layers (each retrieves the same fraction of its
  // clusters): layer l owns slots [l * pages_per_layer_, (l + 1) * pages_per_layer_), with its own
  // LRU policy, so that the commits of different layers run in parallel on kRing committer
  // threads. layer_mu_[l] orders a layer's policy decisions and the updates they queue.
  int64_t pages_per_layer_ = 0;
  std::vector<std::unique_ptr<WavePolicy>> policies_;
  std::unique_ptr<std::mutex[]> layer_mu_;
  int64_t r_ = 0, e_ = 0, list_stride_ = 0, steady_pages_ = 0, max_pages_per_head_ = 0;
  int64_t steady_stride_rows_ = 0, exec_pages_ = 0, max_updates_ = 0;
  size_t row_bytes_ = 0, page_bytes_ = 0;
  gpu::DeviceBuffer centroids_, centroids16_, value_sums_, sizes_, cluster_row_, host_ptrs_;
  gpu::DeviceBuffer steady_rows_;
  gpu::DeviceBuffer steady_k_, steady_v_, pool_k_, pool_v_, table_, page_offsets_;
  gpu::DeviceBuffer scores_, est_out_, est_lse_;
  gpu::DeviceBuffer est_ready_;
  // Chained launches: [heads] pages_ready words, 2 x [heads] arrival words, scratch.
  gpu::DeviceBuffer pages_ready_, arrivals_, exact_scratch_,
      est_scratch_;  // [heads x g]: number of the call whose estimate row is written
  std::vector<std::unique_ptr<Slot>> slots_;
  uint64_t calls_ = 0;
  std::array<uint64_t, kRing>
      tickets_{};          // the last job of each slot (call n: committer n % kRing)
  std::mutex enqueue_mu_;  // one call's kernels or one update's queueing at a time
  // Under enqueue_mu_: per layer, the ring slot of its latest call and of its latest update (-1:
  // none); their events (done, update) order the update stream against the compute stream.
  std::vector<int> last_call_slot_, last_update_slot_;
  mutable std::mutex mu_;  // error_, counters_
  absl::Status error_;     // first error of a commit job
  WaveCounters counters_;
  std::vector<std::unique_ptr<AsyncCommitter>> committers_;  // last: joined first
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_BUFFER_H_
