// The CUDA attention backend: one buffer::WaveBuffer per model shape (KV heads, group, head dim,
// dtype) on the configured device, one wave space per (context, layer), synced from the layer's
// host state at each Attend (under the layer lock the engine holds): segments published since
// the last call join the GPU meta index, the tail rows appended since are copied into the
// device ring of the steady zone. So the lifecycle events OnAppend/OnPublish need no work (the
// next Attend reads what they announce), and OnClose drops the context's spaces (its segments
// leave the cache unless another context holds them). Shapes the GPU kernels do not cover (head
// dim other than 64/128, group other than 1/2/4/8, f32 K/V) are served by the CPU backend.
//
// Indexing: the k-means of background seals (ClusterKeys) runs on the GPU
// (CudaBackend::SphericalKMeans, ClusterKeys' algorithm) on a backend instance of its own (its
// own stream and workspace, one clustering at a time), beside the calls; input the GPU path does
// not take (non-finite keys, a segment past its workspace, d not a multiple of 4) and any GPU
// error go to the CPU kernel, which also reports bad options. The graphs' exact top-N
// (ExactTopN, index.graph = on) runs on that instance too, with the CPU kernel as its fallback.
//
// Thread-safety: see engine/attention_backend.h; the map of spaces under a mutex, the buffers
// thread-safe themselves, the k-means under its own mutex.
#include "engine/cuda/cuda_attention_backend.h"

#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/wave_buffer.h"
#include "config/status_macros.h"
#include "engine/cpu_backend.h"
#include "engine/cuda/device_buffers.h"
#include "gpu/cuda_backend.h"

namespace kvwave::engine {
namespace {

using ShapeKey = std::tuple<int32_t, int32_t, int32_t, int>;  // kv heads, group, d, dtype

// The GPU ranks by centroid (attend.rank = auto resolves to it here); the CPU fallback of the
// shapes the wave buffer does not serve ranks the same way, so one backend gives one ranking.
config::Settings CentroidRank(config::Settings s) {
  s.rank = "centroid";
  s.estimation_spread = "off";  // nor does the GPU's estimation count the key spreads
  return s;
}

class CudaAttentionBackend final : public AttentionBackend {
 public:
  CudaAttentionBackend(const config::Settings& settings, int64_t cache_bytes)
      : settings_(settings),
        cache_bytes_(cache_bytes),
        cpu_(CreateCpuBackend(CentroidRank(settings))),
        ipc_(std::make_shared<IpcOpener>(static_cast<int>(settings.gpu_device))) {}

  const char* name() const override { return "cuda"; }

  void OnClose(const store::Context& ctx) override {
    std::vector<std::pair<buffer::WaveBuffer*, buffer::WaveBuffer::SpaceId>> spaces;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = spaces_.lower_bound({ctx.id(), 0});
      while (it != spaces_.end() && it->first.first == ctx.id()) {
        spaces.push_back(it->second);
        it = spaces_.erase(it);
      }
    }
    for (const auto& [wb, space] : spaces) (void)wb->CloseSpace(space);
  }

  absl::Status Attend(std::span<const AttendItem> items) override {
    std::vector<buffer::WaveBuffer::HostCall> calls;
    std::vector<buffer::WaveBuffer*> owners;
    std::vector<buffer::WaveCallStats> stats(items.size());
    std::vector<size_t> item_of;
    std::vector<AttendItem> on_cpu;
    for (size_t i = 0; i < items.size(); ++i) {
      const AttendItem& it = items[i];
      const store::ModelShape& shape = it.context->shape();
      KVWAVE_ASSIGN_OR_RETURN(buffer::WaveBuffer * wb, BufferFor(shape));
      if (wb == nullptr) {
        on_cpu.push_back(it);
        continue;
      }
      KVWAVE_ASSIGN_OR_RETURN(const buffer::WaveBuffer::SpaceId space,
                              SpaceFor(*wb, it.context->id(), it.layer));
      buffer::WaveBuffer::HostCall c;
      c.space = space;
      c.heads = it.context->layer(it.layer).heads;
      c.q = it.q.data();
      c.out = it.out.data();
      c.lse = it.lse.data();
      c.budget = buffer::WaveBudget{it.budget.retrieval, it.budget.estimation};
      c.stats = &stats[i];
      calls.push_back(c);
      owners.push_back(wb);
      item_of.push_back(i);
    }
    if (!on_cpu.empty()) KVWAVE_RETURN_IF_ERROR(cpu_->Attend(on_cpu));
    // One batch per buffer (a batch is normally one shape: one buffer).
    for (size_t a = 0; a < calls.size();) {
      size_t b = a;
      while (b < calls.size() && owners[b] == owners[a]) ++b;
      KVWAVE_RETURN_IF_ERROR(owners[a]->AttendHostBatch(
          std::span<const buffer::WaveBuffer::HostCall>(calls.data() + a, b - a)));
      a = b;
    }
    for (size_t j = 0; j < item_of.size(); ++j) {
      const buffer::WaveCallStats& s = stats[item_of[j]];
      AttendStats* out = items[item_of[j]].stats;
      out->steady_tokens += s.steady_tokens;
      out->retrieved_tokens += s.retrieved_tokens;
      out->retrieved_clusters += s.retrieved_clusters;
      out->estimated_clusters += s.estimated_clusters;
      out->total_clusters += s.total_clusters;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<DeviceBuffers>> OpenDeviceBuffers(
      const DeviceBuffersSpec& spec) override {
    KVWAVE_ASSIGN_OR_RETURN(std::unique_ptr<CudaDeviceBuffers> b, ipc_->Open(spec));
    return std::unique_ptr<DeviceBuffers>(std::move(b));
  }

  absl::Status AttendDevice(std::span<const DeviceAttendItem> items,
                            DeviceBuffers& buffers) override {
    absl::Status st = AttendDeviceItems(items, buffers);
    (st.ok() ? device_calls_ : device_errors_).fetch_add(1, std::memory_order_relaxed);
    return st;
  }

  BackendStats Stats() const override {
    BackendStats s;
    s.name = "cuda";
    s.device_registrations = ipc_->registrations();
    s.ipc_mappings = ipc_->mappings();
    s.ipc_events = ipc_->events();
    s.device_calls = device_calls_.load(std::memory_order_relaxed);
    s.device_errors = device_errors_.load(std::memory_order_relaxed);
    s.device = static_cast<int32_t>(settings_.gpu_device);
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, wb] : buffers_) {
      if (wb == nullptr) continue;
      const buffer::WaveCounters c = wb->counters();
      const buffer::WaveAccounting a = wb->accounting();
      const int64_t page = 2 * int64_t{8} * std::get<2>(key) * ElementSize(DType(std::get<3>(key)));
      s.pool_bytes += a.pool_pages * page;
      s.pool_used_bytes += (a.pool_pages - a.free_pages) * page;
      s.hits += c.hit_clusters;
      s.misses += c.miss_clusters;
      s.pcie_bytes += c.pcie_bytes + c.upload_bytes;
      s.segments_resident += a.segments;
      s.hit_pages += c.hit_pages;
      s.miss_pages += c.miss_pages;
      s.calls += c.calls;
      s.enqueue_us += c.enqueue_us;
      s.slot_wait_us += c.wait_us;
      s.result_wait_us += c.result_wait_us;
      s.commit_us += c.commit_us;
      s.commit_gpu_us += c.commit_gpu_us;
      s.commit_order_us += c.commit_order_us;
      s.commit_policy_us += c.commit_policy_us;
      s.commit_queue_us += c.commit_queue_us;
    }
    s.kmeans_gpu = kmeans_gpu_.load();
    s.kmeans_cpu = kmeans_cpu_.load();
    s.topn_gpu = topn_gpu_.load();
    s.topn_cpu = topn_cpu_.load();
    return s;
  }

  absl::StatusOr<index::WaveClusters> ClusterKeys(const float* keys, int64_t n, int32_t d,
                                                  const index::WaveIndexOptions& o) override {
    if (keys != nullptr && n >= 1 && d >= 4 && d <= 512 && d % 4 == 0 &&
        o.tokens_per_cluster >= 1 && o.iterations >= 0 && o.iterations <= 1000 &&
        (o.kernel == index::WaveIndexOptions::Kernel::kOwn ||
         o.kernel == index::WaveIndexOptions::Kernel::kFaiss) &&
        n <= kMaxKMeansRows) {
      bool finite = true;
      for (int64_t i = 0; i < n * d && finite; ++i) finite = std::isfinite(keys[i]);
      if (finite) {
        absl::StatusOr<index::WaveClusters> r = ClusterOnGpu(keys, n, d, o);
        if (r.ok()) {
          ++kmeans_gpu_;
          return r;
        }
      }
    }
    ++kmeans_cpu_;
    return index::ClusterKeys(keys, n, d, o);
  }

  absl::Status ExactTopN(const float* keys, int64_t n, const float* queries, int64_t m, int d,
                         int nn, int32_t* out) override {
    if (absl::Status s = TopNOnGpu(keys, n, queries, m, d, nn, out); s.ok()) {
      ++topn_gpu_;
      return s;
    }
    ++topn_cpu_;
    return index::ExactTopN(keys, n, queries, m, d, nn, out);
  }

 private:
  // One wave buffer pipeline for the items, on the registration's events (wave_device.cc).
  absl::Status AttendDeviceItems(std::span<const DeviceAttendItem> items, DeviceBuffers& buffers) {
    auto* regs = dynamic_cast<CudaDeviceBuffers*>(&buffers);
    if (regs == nullptr) return absl::InvalidArgumentError("device buffers of another backend");
    std::vector<buffer::WaveBuffer::DeviceCall> calls(items.size());
    std::vector<buffer::WaveCallStats> stats(items.size());
    buffer::WaveBuffer* wb = nullptr;
    for (size_t i = 0; i < items.size(); ++i) {
      const DeviceAttendItem& it = items[i];
      KVWAVE_ASSIGN_OR_RETURN(buffer::WaveBuffer * w, BufferFor(it.context->shape()));
      if (w == nullptr)
        return absl::UnimplementedError(
            "device tensors: this model shape is not served by the GPU kernels (head dim 64 or "
            "128, group 1/2/4/8, bf16 or f16 K/V)");
      if (wb != nullptr && w != wb)
        return absl::InvalidArgumentError("device tensors: a batch of one model shape only");
      wb = w;
      KVWAVE_ASSIGN_OR_RETURN(calls[i].space, SpaceFor(*wb, it.context->id(), it.layer));
      calls[i].heads = it.context->layer(it.layer).heads;
      calls[i].q = regs->q(it.offsets.q);
      calls[i].out = regs->out(it.offsets.out);
      calls[i].lse = regs->lse(it.offsets.lse);
      calls[i].budget = buffer::WaveBudget{it.budget.retrieval, it.budget.estimation};
      calls[i].stats = &stats[i];
    }
    KVWAVE_RETURN_IF_ERROR(wb->AttendDeviceBatch(calls, regs->q_ready(), regs->out_ready()));
    for (size_t i = 0; i < items.size(); ++i) {
      items[i].stats->steady_tokens += stats[i].steady_tokens;
      items[i].stats->estimated_clusters += stats[i].estimated_clusters;
      items[i].stats->total_clusters += stats[i].total_clusters;
    }
    return absl::OkStatus();
  }

  // The buffer serving `shape`, created on first use; null when the GPU kernels do not cover it.
  absl::StatusOr<buffer::WaveBuffer*> BufferFor(const store::ModelShape& shape) {
    const int32_t group = shape.q_heads / std::max(1, shape.kv_heads);
    const ShapeKey key{shape.kv_heads, group, shape.head_dim, static_cast<int>(shape.dtype)};
    std::lock_guard<std::mutex> lock(mu_);
    auto it = buffers_.find(key);
    if (it != buffers_.end()) return it->second.get();
    std::unique_ptr<buffer::WaveBuffer> wb;
    const bool covered = (shape.head_dim == 64 || shape.head_dim == 128) &&
                         (group == 1 || group == 2 || group == 4 || group == 8) &&
                         (shape.dtype == DType::kBF16 || shape.dtype == DType::kF16) &&
                         settings_.page_tokens == gpu::kMaxPageRows;
    if (covered) {
      buffer::WaveBufferOptions o;
      o.device = static_cast<int>(settings_.gpu_device);
      o.heads = shape.kv_heads;
      o.g = group;
      o.d = shape.head_dim;
      o.dtype = shape.dtype;
      o.cache_bytes = cache_bytes_;
      // bf16 centroid scores (the fused scoring + selection kernel; half the bytes of the float32
      // copy): segments keep bf16-exact centroids (store::Segment::Build), so this ranks as the
      // CPU backend does up to float32 rounding. (With unrounded centroids the GPU-vs-CPU engine
      // test saw other retrieved clusters in 11 of 1,560 calls: bench/results/gpu_engine_run2_*.)
      o.bf16_scores = true;
      KVWAVE_ASSIGN_OR_RETURN(wb, buffer::WaveBuffer::Create(o));
    }
    buffer::WaveBuffer* raw = wb.get();
    buffers_.emplace(key, std::move(wb));
    return raw;
  }

  // The backend instance of the indexing work (k-means, the graphs' top-N). REQUIRES kmeans_mu_.
  absl::StatusOr<gpu::CudaBackend*> IndexingBackend() {
    if (kmeans_ == nullptr) {
      gpu::CudaBackendOptions bo;
      bo.device = static_cast<int>(settings_.gpu_device);
      bo.num_streams = 1;
      bo.num_events = 1;
      bo.workspace_bytes = kKMeansWorkspace;
      KVWAVE_ASSIGN_OR_RETURN(kmeans_, gpu::CudaBackend::Create(bo));
    }
    return kmeans_.get();
  }

  // The graph build's top-N on the GPU (the indexing instance); an error leaves the caller to
  // the CPU kernel: bad shapes, N > 1024, non-finite scores (short rows), no device memory.
  absl::Status TopNOnGpu(const float* keys, int64_t n, const float* queries, int64_t m, int d,
                         int nn, int32_t* out) {
    std::lock_guard<std::mutex> lock(kmeans_mu_);
    KVWAVE_ASSIGN_OR_RETURN(gpu::CudaBackend * b, IndexingBackend());
    return gpu::ExactTopNHost(*b, topn_buffers_, keys, n, queries, m, d, nn, out);
  }

  // The k-means on the GPU; errors leave the caller to the CPU kernel.
  absl::StatusOr<index::WaveClusters> ClusterOnGpu(const float* keys, int64_t n, int32_t d,
                                                   const index::WaveIndexOptions& o) {
    const int64_t k = (n + o.tokens_per_cluster - 1) / o.tokens_per_cluster;
    std::lock_guard<std::mutex> lock(kmeans_mu_);
    KVWAVE_ASSIGN_OR_RETURN(gpu::CudaBackend * bp, IndexingBackend());
    gpu::CudaBackend& b = *bp;
    auto fit = [&](gpu::DeviceBuffer& buf, size_t bytes) { return gpu::FitBuffer(b, buf, bytes); };
    KVWAVE_RETURN_IF_ERROR(fit(km_keys_, sizeof(float) * n * d));
    KVWAVE_RETURN_IF_ERROR(fit(km_assignment_, sizeof(int32_t) * n));
    KVWAVE_RETURN_IF_ERROR(fit(km_sizes_, sizeof(int32_t) * k));
    KVWAVE_RETURN_IF_ERROR(fit(km_centroids_, sizeof(float) * k * d));
    KVWAVE_RETURN_IF_ERROR(b.Copy(km_keys_.data(), keys, sizeof(float) * n * d));
    gpu::KMeansArgs a;
    a.keys = km_keys_.as<float>();
    a.n = n;
    a.d = d;
    a.clusters = k;
    a.iterations = o.iterations;
    a.mean_center = o.mean_center;
    a.assignment = km_assignment_.as<int32_t>();
    a.sizes = km_sizes_.as<int32_t>();
    a.centroids = km_centroids_.as<float>();
    KVWAVE_RETURN_IF_ERROR(b.SphericalKMeans(a));
    index::WaveClusters out;
    out.num_clusters = static_cast<int32_t>(k);
    out.assignment.resize(n);
    out.sizes.resize(k);
    out.centroids.resize(k * d);
    KVWAVE_RETURN_IF_ERROR(b.Copy(out.assignment.data(), a.assignment, sizeof(int32_t) * n));
    KVWAVE_RETURN_IF_ERROR(b.Copy(out.sizes.data(), a.sizes, sizeof(int32_t) * k));
    KVWAVE_RETURN_IF_ERROR(b.Copy(out.centroids.data(), a.centroids, sizeof(float) * k * d));
    KVWAVE_RETURN_IF_ERROR(b.Synchronize());
    return out;
  }

  absl::StatusOr<buffer::WaveBuffer::SpaceId> SpaceFor(buffer::WaveBuffer& wb, uint64_t ctx,
                                                       int32_t layer) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = spaces_.find({ctx, layer});
    if (it != spaces_.end()) return it->second.second;
    KVWAVE_ASSIGN_OR_RETURN(const buffer::WaveBuffer::SpaceId space, wb.OpenSpace());
    spaces_.emplace(std::pair{ctx, layer}, std::pair{&wb, space});
    return space;
  }

  // Segments up to 64K rows of d <= 128 cluster on the GPU (the workspace: 4 (n + 2k) d bytes and
  // change); longer ones on the CPU.
  static constexpr int64_t kMaxKMeansRows = int64_t{1} << 16;
  static constexpr int64_t kKMeansWorkspace = int64_t{64} << 20;

  const config::Settings settings_;
  const int64_t cache_bytes_;
  std::mutex kmeans_mu_;
  std::unique_ptr<gpu::CudaBackend> kmeans_;
  gpu::DeviceBuffer km_keys_, km_assignment_, km_sizes_, km_centroids_;
  gpu::TopNBuffers topn_buffers_;
  std::atomic<int64_t> kmeans_gpu_{0}, kmeans_cpu_{0}, topn_gpu_{0}, topn_cpu_{0};
  std::unique_ptr<AttentionBackend> cpu_;
  std::shared_ptr<IpcOpener> ipc_;
  std::atomic<int64_t> device_calls_{0}, device_errors_{0};  // relaxed: statistics
  mutable std::mutex mu_;
  std::map<ShapeKey, std::unique_ptr<buffer::WaveBuffer>> buffers_;
  std::map<std::pair<uint64_t, int32_t>,
           std::pair<buffer::WaveBuffer*, buffer::WaveBuffer::SpaceId>>
      spaces_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const config::Settings& settings, std::shared_ptr<store::HostPool> host_pool) {
  if (!gpu::CudaBackend::DeviceAvailable()) return absl::FailedPreconditionError("no CUDA device");
  // The wave buffer ranks by centroid only; the second pass of two_pass (scoring the member keys
  // of the next clusters, which may not be resident) is not implemented on the GPU yet. auto
  // means two_pass where the backend has it, so centroid here.
  if (settings.rank == "two_pass") {
    return absl::UnimplementedError(
        absl::StrCat("attend.rank = ", settings.rank,
                     " is implemented on the CPU backend only (set attend.rank = centroid to "
                     "attend on the GPU)"));
  }
  if (settings.estimation_spread == "on") {
    return absl::UnimplementedError(
        "attend.estimation_spread = on is implemented on the CPU backend only (set it to off to "
        "attend on the GPU)");
  }
  // The pool: gpu.cache_bytes, else gpu.cache_fraction of the memory limit (the most KV that can
  // be resident), per model shape served.
  const int64_t cache_bytes =
      settings.gpu_cache_bytes > 0
          ? settings.gpu_cache_bytes
          : static_cast<int64_t>(settings.gpu_cache_fraction *
                                 static_cast<double>(settings.memory_limit_bytes));
  // Fail at start (not at the first Attend) when the device cannot be used.
  buffer::WaveBufferOptions probe;
  probe.device = static_cast<int>(settings.gpu_device);
  probe.heads = 1;
  probe.g = 1;
  probe.d = 128;
  probe.cache_bytes = 0;
  KVWAVE_RETURN_IF_ERROR(buffer::WaveBuffer::Create(probe).status());
  return std::make_unique<CudaAttentionBackend>(settings, cache_bytes);
}

}  // namespace kvwave::engine
