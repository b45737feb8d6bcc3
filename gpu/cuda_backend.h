// CUDA backend of kvwave's attention kernels, behind a CUDA-free interface (no CUDA header is
// included here, so any module can hold a CudaBackend without nvcc).
//
// The same functions as the CPU reference backend (gpu/attention_cpu.h), batched over the KV heads
// of one layer: centroid scoring with the per-group softmax sum, top-k cluster selection, exact
// attention over an execution buffer of pages (flash-decoding: split along the keys, LSE merge),
// estimation-zone attention from centroids and value sums, LSE merge, and spherical k-means
// assignment. Conventions (scale, lse = -inf for an empty set) are those of attention_cpu.h.
//
// Memory: every pointer handed to an op must be device-accessible: device memory from Allocate(),
// or pinned host memory from cudaHostAlloc(..., cudaHostAllocMapped) (buffer/pinned_allocator.h),
// which kernels read directly over PCIe (zero-copy; unified addressing makes the host pointer
// valid on the device). Ops are asynchronous on one of the backend's streams and allocate nothing:
// scratch comes from a workspace sized once in Create(); an op that would need more fails with
// RESOURCE_EXHAUSTED before launching anything.
//
// Thread-safety: ops that use the workspace (ScoreClusters, ExactAttention, EstimateAttention,
// SphericalKMeans)
// share their stream's region, so each stream takes them from one thread at a time. Copy, Memset,
// events, MergeLse, SelectTopK, KMeansAssign, GatherPages, PlanPages and ScatterInt32 keep no
// state and may be called from several threads at once (the wave buffer's committer thread queues
// its admission copies and table updates on the compute stream).
#ifndef KVWAVE_GPU_CUDA_BACKEND_H_
#define KVWAVE_GPU_CUDA_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "config/dtype.h"

namespace kvwave::gpu {

// One page of the execution buffer: `rows` consecutive key rows at k and value rows at v
// (row = d elements). 1 <= rows <= kMaxPageRows; padding rows are never listed.
// stash > 0: ExactAttention also stores the page's rows to stash page (stash - 1) of
// ExactArgs::stash_k / stash_v as it reads them (a miss read once over PCIe lands on the GPU for
// admission into the cache); 0: no copy.
struct PageRef {
  const void* k = nullptr;
  const void* v = nullptr;
  int32_t rows = 0;
  int32_t stash = 0;
};
inline constexpr int kMaxPageRows = 8;

// Sizes the backend's resources up front.
struct CudaBackendOptions {
  int device = 0;
  int64_t workspace_bytes = int64_t{256} << 20;  // scratch shared by all ops
  // 0: compute; 1: copies; 2: side work (the wave buffer's estimation); 3: the wave buffer's
  // cache updates.
  int num_streams = 4;
  int num_events = 64;  // for cross-stream ordering (RecordEvent)
  // Events [num_events, num_events + num_blocking_events): a thread waiting on one of them
  // (SynchronizeEvent) sleeps until the GPU signals it instead of spinning on a core (for waits
  // off the critical path, such as the wave buffer's committer threads).
  int num_blocking_events = 0;
  // Programmatic dependent launch between the kernels of one op (ScoreSelectPlan): the second is
  // scheduled while the first drains, and waits for it on the GPU (sm_90).
  bool dependent_launch = true;
};

// Owner of one device allocation (device memory), freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }
  void* data() const { return data_; }
  size_t size() const { return size_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  void Reset();

 private:
  friend class CudaBackend;
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct SteadyZone;

// One KV head of a batched launch (the wave buffer's calls of several contexts in one pipeline):
// a device array of these, one per head of the launch, replaces the base + h * stride addressing
// of ScoreSelectPlan, PlanPages and EstimateAttention (ScoreArgs / PlanArgs / EstimateArgs::
// heads_meta). Head h then reads its own arrays (any allocation, any capacity), has n clusters
// (at most the launch's n; the launch's n is the row stride of the scores and logits), and
// selects its own top k (and k2 - k) clusters: contexts of different lengths and budgets in one
// launch. 80 bytes (a multiple of 16: uploaded by the 16-byte gather).
struct alignas(16) HeadMeta {
  const float* centroids = nullptr;       // [n x d] float32
  const uint16_t* centroids16 = nullptr;  // [n x d] bf16 copy (scored when the launch says so)
  const float* value_sums = nullptr;      // [n x d]
  const int32_t* sizes = nullptr;         // [n]
  const int32_t* keys = nullptr;          // [n] cache keys (PlanArgs)
  const SteadyZone* steady = nullptr;     // the head's steady zone (PlanArgs)
  int64_t n = 0;                          // clusters
  int64_t k = 0, k2 = 0;                  // top k retrieved, top k2 (>= k) with the estimated
};
static_assert(sizeof(HeadMeta) % 16 == 0);

// Arguments of ScoreClusters: `heads` KV heads, each with g query heads of dim d and n clusters.
// Head h reads q + h*g*d, centroids + h*centroid_stride (float32 [n x d]), sizes + h*size_stride,
// and writes scores + h*score_stride [n]: scores[j] = sum over its g query heads of the softmax,
// over the non-empty clusters, of scale * q . centroid_j; -inf for empty clusters.
// With centroids_bf16 set (d <= 128, a multiple of 8), the logits read that bf16 copy (same layout
// and stride) instead of the float32 centroids: half the bytes of the largest read of a decode
// step; the scores then equal those of the float32 centroids rounded to bf16.
struct ScoreArgs {
  const float* q = nullptr;
  int heads = 0, g = 0, d = 0;
  float scale = 0;
  const float* centroids = nullptr;
  const uint16_t* centroids_bf16 = nullptr;
  int64_t centroid_stride = 0;
  const int32_t* sizes = nullptr;
  int64_t size_stride = 0;
  int64_t n = 0;
  float* scores = nullptr;  // device
  int64_t score_stride = 0;
  // Optional (ScoreSelectPlan only): per-head descriptors (HeadMeta, device). Then centroids /
  // centroids_bf16 / sizes / strides are not read, except that centroids_bf16 != nullptr still
  // chooses the bf16 copies (HeadMeta::centroids16); n is the largest head's cluster count and
  // TopKArgs::k / k2 are replaced by each head's.
  const HeadMeta* heads_meta = nullptr;
};

// Arguments of SelectTopK: per head, the indices of the k largest finite scores (ties: lower index
// first) go to out + h*out_stride in increasing index order, and their count (min(k, finite)) to
// counts[h]. When k2 > k, the indices ranked [k, k2) go to out2 + h*out_stride, count in counts2.
struct TopKArgs {
  const float* scores = nullptr;
  int heads = 0;
  int64_t n = 0, score_stride = 0;
  int64_t k = 0, k2 = 0;
  int32_t* out = nullptr;
  int32_t* out2 = nullptr;
  int64_t out_stride = 0;
  int32_t* counts = nullptr;
  int32_t* counts2 = nullptr;
};

// Arguments of ExactTopN (all device pointers): for each of the m queries [m x d], the nn keys of
// [n x d] (float32, row-major) with the largest q . k, best first (higher score, then lower key),
// to out + i * nn; scores are FMA chains over the dimensions in order, as index::ExactTopN's,
// so the lists are the CPU's bit for bit. Non-finite scores are never selected: a query with
// fewer than nn finite scores gets -1 past them and is counted in *short_rows (optional; the
// caller zeroes it).
struct ExactTopNArgs {
  const float* keys = nullptr;
  int64_t n = 0;
  const float* queries = nullptr;
  int64_t m = 0;
  int d = 0;
  int nn = 0;
  int32_t* out = nullptr;
  int32_t* short_rows = nullptr;
};

// Dependent launch (sm_90): an op queued with a ChainArgs is a programmatic dependent of the
// kernel before it on the stream: its blocks are scheduled once that kernel's blocks have all
// triggered (ScoreSelectPlan: as each head's plan is written; EstimateAttention: at its start),
// with no launch gap, and they wait on the GPU for their inputs (ExactArgs: head h's page list,
// once pages_ready[h] == seq; EstimateArgs: the kernel before completing). Ops that may overlap
// cannot share the stream's workspace: each brings its own scratch (ExactScratchBytes /
// EstimateScratchBytes) and arrival words (zero, left zero; one per head).
struct ChainArgs {
  float* scratch = nullptr;
  uint32_t* arrivals = nullptr;
  const uint32_t* pages_ready = nullptr;  // ExactAttention only; null: wait for the op before
  uint32_t seq = 0;
};

// Arguments of ExactAttention over an execution buffer. Head h attends over
// pages[page_offsets[h] .. page_offsets[h+1]) (or, when page_counts is set, over
// pages[page_offsets[h] .. page_offsets[h] + page_counts[h])) with its g query rows q + h*g*d,
// and writes out + h*g*d (float32 [g x d]) and lse + h*g. pages, page_offsets and page_counts
// are device-accessible. kv_type: kBF16 or kF16; d: 64 or 128; g: 1, 2, 4 or 8. One launch: the
// blocks of a head split its pages, and the last of them to finish folds the splits' partials
// (flash-decoding's LSE merge) into out/lse.
struct ExactArgs {
  const float* q = nullptr;
  int heads = 0, g = 0, d = 0;
  float scale = 0;
  DType kv_type = DType::kBF16;
  const PageRef* pages = nullptr;
  const int32_t* page_offsets = nullptr;  // [heads + 1], or [heads] with page_counts
  const int32_t* page_counts = nullptr;   // optional [heads]
  int64_t max_pages_per_head = 0;         // host-known bound, sizes the split grid
  int pages_per_split = 0;                // 0: chosen from the sizes
  void* stash_k = nullptr;                // pages of kMaxPageRows rows (see PageRef::stash)
  void* stash_v = nullptr;
  // Optional: one more partial result (out [heads x g x d], lse [heads x g]; the wave buffer's
  // estimation zone) merged into out/lse with the splits. It may come from another stream: row r
  // (= h*g + j) is read once the device word extra_ready[r] equals extra_seq (see
  // EstimateArgs::ready); the kernel waits for that on the GPU (and traps after 5 s, a producer
  // that never signals being a bug). Required with extra_out.
  const float* extra_out = nullptr;
  const float* extra_lse = nullptr;
  const uint32_t* extra_ready = nullptr;
  uint32_t extra_seq = 0;
  float* out = nullptr;
  float* lse = nullptr;
  // Optional, for a launch that overlaps the op before it on the stream (ChainArgs).
  const ChainArgs* chain = nullptr;
};

// One KV head's steady zone on the device (attended exactly by every call): the context's sink
// rows (sink_rows rows at sink_k / sink_v) and its tail, positions [first, first + rows), held in
// a ring of ring_rows rows (a multiple of kMaxPageRows): position p at row p % ring_rows of
// ring_k / ring_v. Its pages: the sinks' in kMaxPageRows-row pages, then the tail cut at positions
// that are multiples of kMaxPageRows (so that no page wraps around the ring).
struct SteadyZone {
  const void* sink_k = nullptr;
  const void* sink_v = nullptr;
  const void* ring_k = nullptr;
  const void* ring_v = nullptr;
  int64_t first = 0;
  int32_t sink_rows = 0;
  int32_t rows = 0;
  int32_t ring_rows = 0;
  int32_t pad = 0;
  int64_t pad2 = 0;  // 64 bytes: copied with 16-byte pieces
};

// Pages of a steady zone (host and device).
#ifdef __CUDACC__
#define KVWAVE_HOST_DEVICE __host__ __device__
#else
#define KVWAVE_HOST_DEVICE
#endif
KVWAVE_HOST_DEVICE inline int64_t SteadyZonePages(const SteadyZone& z) {
  const int64_t sink = (z.sink_rows + kMaxPageRows - 1) / kMaxPageRows;
  if (z.rows <= 0) return sink;
  return sink + (z.first % kMaxPageRows + z.rows + kMaxPageRows - 1) / kMaxPageRows;
}

// Arguments of PlanPages: for `heads` KV heads, turns each head's retrieved clusters (from
// SelectTopK) into the page list of ExactAttention, reading the GPU-resident cache table.
// Head h's cluster c has sizes[h*size_stride + c] rows and the global key keys[h*key_stride + c]
// (the cache's name for it: one key per (segment, cluster), shared by every context that attends
// the segment). Key k's pages have table entries table[page_base[k] + p]; the cluster is cached
// when table[page_base[k]] >= 0, and then its page p lives in pool slot table[page_base[k] + p].
// Otherwise its page p is read from host memory (key_k[k] + p*kMaxPageRows rows, zero-copy) and
// stashed into execution page exec_first(h, i) + p, where exec_first(h, i) = h*exec_stride +
// (pages of the head's earlier missed clusters). Output per head h: pages[h*max_pages_per_head
// ..) = its steady pages (steady[h]) then every retrieved cluster's pages in list order;
// page_counts[h]; and for the i-th retrieved cluster, info[2*(h*info_stride + i)] = its key and
// info[.. + 1] = -1 when it was a hit, else its first exec page (a compact record for the CPU's
// replacement policy).
struct PlanArgs {
  int heads = 0;
  const int32_t* retrieved = nullptr;  // [heads x list_stride]
  const int32_t* counts = nullptr;     // [heads]
  int64_t list_stride = 0;
  const int32_t* sizes = nullptr;  // [heads x size_stride]
  int64_t size_stride = 0;
  const int32_t* keys = nullptr;  // [heads x key_stride]
  int64_t key_stride = 0;
  const int64_t* page_base = nullptr;  // [keys]
  const int32_t* table = nullptr;      // [table entries]
  const void* const* key_k = nullptr;  // [keys]: host address of the cluster's first key row
  const void* const* key_v = nullptr;  // [keys]
  const SteadyZone* steady = nullptr;  // [heads]
  const void* pool_k = nullptr;        // slot s at s*kMaxPageRows rows
  const void* pool_v = nullptr;
  int64_t row_bytes = 0;
  int64_t max_pages_per_head = 0;
  int64_t exec_stride = 0;         // execution pages per head
  PageRef* pages = nullptr;        // [heads x max_pages_per_head]
  int32_t* page_counts = nullptr;  // [heads]
  int32_t* info = nullptr;         // [heads x info_stride x 2]
  int64_t info_stride = 0;         // >= counts[h]
  // Optional (ScoreSelectPlan only): counts[h] is also written to record_counts[h] (which, like
  // info, may be mapped host memory: complete when the op is), and once head h's plan is written
  // pages_ready[h] (device) is set to seq.
  int32_t* record_counts = nullptr;
  // Optional: record_rows[h] = the rows of head h's retrieved clusters (summed sizes; may be
  // mapped host memory, like info), so that the caller needs no size table to report them.
  int32_t* record_rows = nullptr;
  // Optional (ScoreSelectPlan only): the selection and plan (which read the page table, and
  // after which the attention reads the pool) wait for this event of the backend (recorded on
  // another stream, e.g. the wave buffer's cache updates); the centroid logits run before it.
  int wait_event = -1;
  uint32_t* pages_ready = nullptr;
  uint32_t seq = 0;
  // Optional: per-head descriptors (HeadMeta, device): sizes, keys and steady come from them
  // (ScoreSelectPlan: the same array as ScoreArgs::heads_meta).
  const HeadMeta* heads_meta = nullptr;
};

// Arguments of EstimateAttention: head h uses centroids/value_sums + h*cluster_stride*d,
// sizes + h*cluster_stride, and the clusters listed at clusters + h*list_stride, counts[h] of them.
struct EstimateArgs {
  const float* q = nullptr;
  int heads = 0, g = 0, d = 0;
  float scale = 0;
  const float* centroids = nullptr;
  const float* value_sums = nullptr;
  const int32_t* sizes = nullptr;
  int64_t cluster_stride = 0;
  const int32_t* clusters = nullptr;
  const int32_t* counts = nullptr;
  int64_t list_stride = 0;
  float* out = nullptr;
  float* lse = nullptr;
  // Optional (device words [heads x g]): once row r of out/lse is written, ready[r] = ready_seq,
  // for an ExactAttention on another stream that merges this result (ExactArgs::extra_ready).
  uint32_t* ready = nullptr;
  uint32_t ready_seq = 0;
  const ChainArgs* chain = nullptr;  // optional, see ChainArgs (pages_ready unused)
  // Optional: per-head descriptors (HeadMeta, device): centroids, value sums and sizes come from
  // them (cluster_stride unused); list_stride bounds every head's count.
  const HeadMeta* heads_meta = nullptr;
};

// Spherical k-means assignment: assignment[i] = argmax_j x_i . c_j (ties: lower j) for n rows
// x [n x d] (float32) against c [k x d] (float32, normalised by the caller); best[i] the dot.
struct AssignArgs {
  const float* x = nullptr;
  int64_t n = 0;
  const float* centroids = nullptr;
  int64_t k = 0;
  int d = 0;
  int32_t* assignment = nullptr;
  float* best = nullptr;
};

// Spherical k-means of one segment's keys, all on the GPU: the algorithm of index::ClusterKeys
// (mean-centre if asked, L2-normalise, seed centroid c with key c*n/clusters, `iterations` rounds
// of assign + normalised-mean update, a final assignment). Outputs (device): assignment [n],
// sizes [clusters], centroids [clusters x d] = plain means of the members' original keys (zero
// for an empty cluster). d: a multiple of 4, at most 512; 1 <= clusters <= n.
struct KMeansArgs {
  const float* keys = nullptr;  // [n x d] float32, device
  int64_t n = 0;
  int d = 0;
  int64_t clusters = 0;
  int iterations = 10;
  bool mean_center = true;
  int32_t* assignment = nullptr;
  int32_t* sizes = nullptr;
  float* centroids = nullptr;
};

class CudaBackend {
 public:
  // True when a CUDA device can be used (tests skip otherwise).
  static bool DeviceAvailable();
  // True when kernels can read p at the same address: device memory, or pinned host memory mapped
  // into the device's address space (buffer/pinned_allocator.h).
  static bool DeviceAccessible(const void* p);
  // Creates streams, events and the workspace. Errors: no device, out of device memory (the
  // error is cleared, so a later Create with sane sizes works).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(
      const CudaBackendOptions& options);
  ~CudaBackend();
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  // Device memory, and copies between any two device-accessible or host pointers (async on
  // `stream`; pageable host memory makes the copy synchronous).
  [[nodiscard]] absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  [[nodiscard]] absl::Status Copy(void* dst, const void* src, size_t bytes, int stream = 0);
  [[nodiscard]] absl::Status Memset(void* dst, int value, size_t bytes, int stream = 0);
  // `height` rows of `width` bytes, src rows src_pitch bytes apart, dst rows dst_pitch apart.
  [[nodiscard]] absl::Status Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                    size_t width, size_t height, int stream = 0);
  [[nodiscard]] absl::Status Synchronize(int stream = 0);
  // Event `event` (0 <= event < num_events) marks the work queued so far on `stream`; WaitEvent
  // makes later work on `stream` wait for it.
  [[nodiscard]] absl::Status RecordEvent(int event, int stream);
  [[nodiscard]] absl::Status WaitEvent(int stream, int event);
  [[nodiscard]] absl::Status SynchronizeEvent(int event);
  // The same with an event that is not the backend's: a cudaEvent_t, type-erased (e.g. an
  // interprocess event opened by gpu/cuda_ipc.h). The caller keeps it alive meanwhile.
  [[nodiscard]] absl::Status RecordForeignEvent(void* event, int stream);
  [[nodiscard]] absl::Status WaitForeignEvent(int stream, void* event);
  // Milliseconds between two recorded events (both completed).
  [[nodiscard]] absl::StatusOr<float> ElapsedMs(int start_event, int end_event);

  // Kernels, queued on `stream`.
  [[nodiscard]] absl::Status ScoreClusters(const ScoreArgs& args, int stream = 0);
  [[nodiscard]] absl::Status SelectTopK(const TopKArgs& args, int stream = 0);
  // ScoreClusters + SelectTopK + PlanPages in two launches fewer (the wave buffer's critical
  // path): writes score.scores as ScoreClusters does, topk's lists and counts as SelectTopK does
  // (topk.scores is not read), and plan's outputs for the top topk.k.
  // REQUIRES: plan.retrieved == topk.out, plan.counts == topk.counts, equal head counts, the
  // same n. Uses the stream's workspace.
  [[nodiscard]] absl::Status ScoreSelectPlan(const ScoreArgs& score, const TopKArgs& topk,
                                             const PlanArgs& plan, int stream = 0);
  [[nodiscard]] absl::Status ExactAttention(const ExactArgs& args, int stream = 0);
  [[nodiscard]] absl::Status EstimateAttention(const EstimateArgs& args, int stream = 0);
  // Scratch bytes of ExactAttention / EstimateAttention (ChainArgs::scratch).
  size_t ExactScratchBytes(const ExactArgs& args) const;
  size_t EstimateScratchBytes(const EstimateArgs& args) const;
  // In place: (out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b)) for `rows` heads of dim d.
  [[nodiscard]] absl::Status MergeLse(float* out_a, float* lse_a, const float* out_b,
                                      const float* lse_b, int rows, int d, int stream = 0);
  [[nodiscard]] absl::Status KMeansAssign(const AssignArgs& args, int stream = 0);
  // Uses the stream's workspace (4 (n + 2 clusters) d bytes and change).
  [[nodiscard]] absl::Status SphericalKMeans(const KMeansArgs& args, int stream = 0);
  // The graph build's exact top-N (see ExactTopNArgs), in chunks of queries that fit the
  // stream's workspace (4 n + 4 (nn + 1) bytes a query; at least one). REQUIRES nn <= 1024.
  [[nodiscard]] absl::Status ExactTopN(const ExactTopNArgs& args, int stream = 0);
  // Gathers `count` pages: for each i, copies rows_bytes[i] bytes from src[i] to dst[i] with the
  // GPU's threads (src may be mapped pinned host memory: one PCIe read, no staging).
  // src, dst, bytes: device-accessible arrays of `count` entries. bulk: the SMs' bulk-copy
  // engine reads instead (16-byte aligned pieces, sizes a multiple of 16, at most 16 KB).
  [[nodiscard]] absl::Status GatherPages(const void* const* src, void* const* dst,
                                         const int32_t* bytes, int64_t count, int64_t max_bytes,
                                         int stream = 0, bool bulk = false);
  // See PlanArgs. REQUIRES: max_pages_per_head and exec_stride bound every head's pages.
  [[nodiscard]] absl::Status PlanPages(const PlanArgs& args, int stream = 0);
  // Keeps `stream` busy for about `ns` nanoseconds (a spinning kernel; for profiling).
  [[nodiscard]] absl::Status Delay(int64_t ns, int stream = 0);
  // base[index[i]] = value[i] for i < count (index, value device-accessible).
  [[nodiscard]] absl::Status ScatterInt32(int32_t* base, const int64_t* index, const int32_t* value,
                                          int64_t count, int stream = 0);

  int64_t workspace_bytes() const { return workspace_size_; }
  int multiprocessors() const { return multiprocessors_; }

 private:
  struct Impl;
  explicit CudaBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int64_t workspace_size_ = 0;
  int multiprocessors_ = 0;
  bool dependent_launch_ = true;
};

// Makes `buffer` hold at least `bytes` (at least 1 MiB), reallocating only when it is smaller:
// buffers kept between calls this way are not freed on a hot path (a free synchronises the device).
[[nodiscard]] absl::Status FitBuffer(CudaBackend& backend, DeviceBuffer& buffer, size_t bytes);

// ExactTopN over host arrays (the graph build's step 1 for a caller on the host): keys and queries
// copied into `buffers` (grown as needed, kept between calls: a free would synchronise the
// device), the lists copied back to out [m x nn], the stream synchronised. Errors: ExactTopN's;
// a query with fewer than nn finite scores: InvalidArgument (out is then not the CPU's answer).
struct TopNBuffers {
  DeviceBuffer keys, queries, out;
};
[[nodiscard]] absl::Status ExactTopNHost(CudaBackend& backend, TopNBuffers& buffers,
                                         const float* keys, int64_t n, const float* queries,
                                         int64_t m, int d, int nn, int32_t* out, int stream = 0);

}  // namespace kvwave::gpu

#endif  // KVWAVE_GPU_CUDA_BACKEND_H_
