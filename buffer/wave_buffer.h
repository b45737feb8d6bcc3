// The wave buffer: a GPU page pool caching clusters of KV pages that live in pinned host memory,
// plus the per-layer decode pipeline of tripartite attention on the GPU (steady zone + retrieval
// zone attended exactly, estimation zone from the meta index).
//
// Resident on the GPU: the meta index (centroids, value sums, sizes of every cluster of every
// (layer, KV head) unit), the steady zone (sink + local tokens), the page pool, and a
// double-buffered execution buffer. The KV of the clusters stays in pinned, mapped host memory.
//
// One AttendLayer call (stream C = compute, stream X = copies, W = the committer's worker thread):
//
//   C: |score+topk(l)|D2H|      |H2D descr|gather misses (zero-copy PCIe)|exact|estimate|merge|
//   CPU:                |wait commit(l-1); hit/miss per head (TBB threads); descriptors|
//   W:                                         commit(l): LRU touch + admit/evict ------->|
//   X:                                  (waits C's layer-done event) |copy exec->pool(l)|
//
//   Layer l+1's score+topk queues right behind l's merge on C, so commit(l) and the admission
//   copies (device to device, from the execution buffer: no second PCIe read) overlap layer l's
//   attention and layer l+1's scoring. Ordering: classify(l+1) waits commit(l) on the CPU (it must
//   see the new owners of evicted slots); the gather of call n waits the admission copies of call
//   n-2 (same execution-buffer half); admission copies of call n wait call n's compute.
//
// Events 0..3 of the backend are used here (2 layer-done, 2 admission-done); streams 0 and 1.
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
  int64_t clusters = 0;       // per unit
  double retrieval = 0.018;   // fraction of clusters attended exactly
  double estimation = 0.232;  // next fraction, estimated
  int64_t cache_bytes = 0;    // page pool (K and V)
  int max_cluster_pages = 4;  // bound of pages per cluster (sizes the execution buffer)
};

struct StepStats {
  int64_t hit_clusters = 0, miss_clusters = 0;
  int64_t hit_pages = 0, miss_pages = 0;
  int64_t pcie_bytes = 0;  // K and V rows read from host memory
  int64_t exact_rows = 0;  // rows attended exactly (steady + retrieval)
  // Host time of AttendLayer's phases, microseconds: score + top-k + D2H round trip, waiting for
  // the previous commit, hit/miss classification + descriptors, queueing the attention kernels.
  double score_us = 0, wait_commit_us = 0, classify_us = 0, launch_us = 0;
  void Add(const StepStats& o);
};

class WaveBuffer {
 public:
  // units: [layers x heads], unit = layer * heads + head.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WaveBuffer>> Create(
      gpu::CudaBackend* backend, const WaveBufferOptions& options, std::vector<UnitLayout> units);
  ~WaveBuffer();

  // Tripartite attention of one layer: q [heads x g x d] float32 on the device; out [heads x g x
  // d] and lse [heads x g] on the device. Queued on stream 0; `stats` gets this call's counts.
  [[nodiscard]] absl::Status AttendLayer(int layer, const float* q, float* out, float* lse,
                                         StepStats* stats);
  // Waits for the committer and both streams.
  [[nodiscard]] absl::Status Finish();

  PolicyStats policy_stats() const { return policy_.stats(); }
  int64_t pool_pages() const { return policy_.num_pages(); }
  int64_t retrieval_clusters() const { return r_; }
  int64_t estimation_clusters() const { return e_; }

 private:
  struct Half;  // one half of the double-buffered staging
  WaveBuffer(gpu::CudaBackend* backend, const WaveBufferOptions& options,
             std::vector<UnitLayout> units);
  absl::Status Init();
  absl::Status ScoreAndSelect(int layer, const float* q, Half& h);
  void Classify(int layer, Half& h, StepStats* stats);
  absl::Status Attend(int layer, const float* q, float* out, float* lse, Half& h);
  void SubmitCommit(int layer, int parity);
  int32_t PagesOf(int64_t unit, int32_t c) const;
  int32_t RowsOfPage(int64_t unit, int32_t c, int32_t page) const;

  gpu::CudaBackend* backend_;
  WaveBufferOptions o_;
  std::vector<UnitLayout> units_;
  WavePolicy policy_;
  int64_t r_ = 0, e_ = 0, list_stride_ = 0, steady_pages_ = 0, max_pages_per_head_ = 0;
  int64_t max_miss_pages_ = 0;
  size_t row_bytes_ = 0, page_bytes_ = 0;
  gpu::DeviceBuffer centroids_, value_sums_, sizes_, steady_k_, steady_v_, pool_k_, pool_v_;
  gpu::DeviceBuffer scores_, est_out_, est_lse_;
  std::vector<std::unique_ptr<Half>> halves_;
  uint64_t calls_ = 0;
  std::vector<uint64_t> tickets_;  // committer ticket of each call
  std::mutex error_mu_;
  absl::Status error_;                         // first error of a commit job
  std::unique_ptr<AsyncCommitter> committer_;  // last: joined first
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_BUFFER_H_
