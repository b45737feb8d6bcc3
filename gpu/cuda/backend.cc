// CudaBackend: streams, events and a workspace sized up front, and the argument checks and
// workspace carving in front of each launcher (gpu/cuda/launchers.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "gpu/cuda/launchers.h"
#include "gpu/cuda_backend.h"
#include "gpu/device_lost.h"

namespace kvwave::gpu {
namespace {

// The errors after which the CUDA context is unusable: every later call of the process fails.
bool Sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorDevicesUnavailable:
      return true;
    default:
      return false;
  }
}

absl::Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  // Clear the (non-sticky) error so the next call starts clean.
  cudaGetLastError();
  const std::string msg = absl::StrCat(std::string(what), ": ", std::string(cudaGetErrorName(err)),
                                       " (", std::string(cudaGetErrorString(err)), ")");
  if (Sticky(err))
    return MarkDeviceLost(absl::InternalError(absl::StrCat("GPU device lost: ", msg)));
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (err == cudaErrorInvalidValue) return absl::InvalidArgumentError(msg);
  return absl::InternalError(msg);
}

bool GroupOk(int g) { return g == 1 || g == 2 || g == 4 || g == 8; }

}  // namespace

struct CudaBackend::Impl {
  int device = 0;
  std::vector<cudaStream_t> streams;
  std::vector<cudaEvent_t> events;
  void* workspace = nullptr;
  size_t region_bytes = 0;  // workspace share of each stream
  // Per stream, the split kernels' arrival counters (one per head of an op; zero between ops).
  static constexpr int kArrivalWords = 4096;
  uint32_t* arrivals = nullptr;

  ~Impl() {
    if (arrivals != nullptr) cudaFree(arrivals);
    if (workspace != nullptr) cudaFree(workspace);
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    for (cudaStream_t s : streams) cudaStreamDestroy(s);
  }
  absl::StatusOr<cudaStream_t> Stream(int i) const {
    if (i < 0 || i >= static_cast<int>(streams.size()))
      return absl::InvalidArgumentError(absl::StrCat("no stream ", i));
    return streams[i];
  }
  absl::StatusOr<cudaEvent_t> Event(int i) const {
    if (i < 0 || i >= static_cast<int>(events.size()))
      return absl::InvalidArgumentError(absl::StrCat("no event ", i));
    return events[i];
  }
  // The workspace region of stream i, if it holds `bytes`.
  absl::StatusOr<float*> Workspace(int i, size_t bytes) const {
    if (bytes > region_bytes)
      return absl::ResourceExhaustedError(
          absl::StrCat("op needs ", bytes, " workspace bytes, stream region holds ", region_bytes));
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + region_bytes * i);
  }
  // The arrival counters of stream i (a valid stream), if an op of `heads` heads fits them.
  absl::StatusOr<uint32_t*> Arrivals(int i, int heads) const {
    if (heads > kArrivalWords)
      return absl::InvalidArgumentError(
          absl::StrCat("op has ", heads, " heads, at most ", kArrivalWords, " per launch"));
    return arrivals + int64_t{kArrivalWords} * i;
  }
  // A split kernel's scratch (`bytes`) and arrival words: the chained op's own, else stream i's.
  absl::Status SplitScratch(const ChainArgs* chain, int i, size_t bytes, int heads, float** ws,
                            uint32_t** words) const {
    if (chain != nullptr) {
      if (chain->scratch == nullptr || chain->arrivals == nullptr)
        return absl::InvalidArgumentError("a chained launch brings its scratch and arrival words");
      *ws = chain->scratch;
      *words = chain->arrivals;
      return absl::OkStatus();
    }
    KVWAVE_ASSIGN_OR_RETURN(*ws, Workspace(i, bytes));
    KVWAVE_ASSIGN_OR_RETURN(*words, Arrivals(i, heads));
    return absl::OkStatus();
  }
};

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr) cudaFree(data_);
  data_ = nullptr;
  size_ = 0;
}

bool CudaBackend::DeviceAvailable() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();
  return ok;
}

bool CudaBackend::DeviceAccessible(const void* p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return (attr.type == cudaMemoryTypeHost || attr.type == cudaMemoryTypeDevice ||
          attr.type == cudaMemoryTypeManaged) &&
         attr.devicePointer == p;
}

CudaBackend::CudaBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaBackend::~CudaBackend() = default;

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const CudaBackendOptions& options) {
  if (options.num_streams < 1 || options.num_events < 0 || options.workspace_bytes < 0)
    return absl::InvalidArgumentError("CudaBackend: bad options");
  if (!DeviceAvailable()) return absl::UnavailableError("no CUDA device");
  auto impl = std::make_unique<Impl>();
  impl->device = options.device;
  KVWAVE_RETURN_IF_ERROR(FromCuda(cudaSetDevice(options.device), "cudaSetDevice"));
  cudaDeviceProp prop;
  KVWAVE_RETURN_IF_ERROR(
      FromCuda(cudaGetDeviceProperties(&prop, options.device), "cudaGetDeviceProperties"));
  for (int i = 0; i < options.num_streams; ++i) {
    cudaStream_t s;
    KVWAVE_RETURN_IF_ERROR(
        FromCuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
    impl->streams.push_back(s);
  }
  for (int i = 0; i < options.num_events + options.num_blocking_events; ++i) {
    cudaEvent_t e;
    KVWAVE_RETURN_IF_ERROR(
        FromCuda(i < options.num_events
                     ? cudaEventCreate(&e)
                     : cudaEventCreateWithFlags(&e, cudaEventBlockingSync | cudaEventDisableTiming),
                 "cudaEventCreate"));
    impl->events.push_back(e);
  }
  // 256-byte aligned regions, one per stream.
  impl->region_bytes =
      (static_cast<size_t>(options.workspace_bytes) / options.num_streams) & ~size_t{255};
  if (impl->region_bytes > 0) {
    KVWAVE_RETURN_IF_ERROR(
        FromCuda(cudaMalloc(&impl->workspace, impl->region_bytes * options.num_streams),
                 "cudaMalloc(workspace)"));
  }
  const size_t arrival_bytes = sizeof(uint32_t) * Impl::kArrivalWords * options.num_streams;
  KVWAVE_RETURN_IF_ERROR(FromCuda(cudaMalloc(&impl->arrivals, arrival_bytes), "cudaMalloc"));
  KVWAVE_RETURN_IF_ERROR(FromCuda(cudaMemset(impl->arrivals, 0, arrival_bytes), "cudaMemset"));
  std::unique_ptr<CudaBackend> backend(new CudaBackend(std::move(impl)));
  backend->workspace_size_ = options.workspace_bytes;
  backend->multiprocessors_ = prop.multiProcessorCount;
  backend->dependent_launch_ = options.dependent_launch;
  return backend;
}

absl::StatusOr<DeviceBuffer> CudaBackend::Allocate(size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  KVWAVE_RETURN_IF_ERROR(FromCuda(cudaMalloc(&b.data_, bytes), "cudaMalloc"));
  b.size_ = bytes;
  return b;
}

absl::Status CudaBackend::Copy(void* dst, const void* src, size_t bytes, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  if (bytes == 0) return absl::OkStatus();
  return FromCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
}

absl::Status CudaBackend::Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                 size_t width, size_t height, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  if (width == 0 || height == 0) return absl::OkStatus();
  return FromCuda(
      cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDefault, s),
      "cudaMemcpy2DAsync");
}

absl::Status CudaBackend::Memset(void* dst, int value, size_t bytes, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cudaMemsetAsync(dst, value, bytes, s), "cudaMemsetAsync");
}

absl::Status CudaBackend::Synchronize(int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

absl::Status CudaBackend::RecordEvent(int event, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  KVWAVE_ASSIGN_OR_RETURN(cudaEvent_t e, impl_->Event(event));
  return FromCuda(cudaEventRecord(e, s), "cudaEventRecord");
}

absl::Status CudaBackend::WaitEvent(int stream, int event) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  KVWAVE_ASSIGN_OR_RETURN(cudaEvent_t e, impl_->Event(event));
  return FromCuda(cudaStreamWaitEvent(s, e, 0), "cudaStreamWaitEvent");
}

absl::Status CudaBackend::SynchronizeEvent(int event) {
  KVWAVE_ASSIGN_OR_RETURN(cudaEvent_t e, impl_->Event(event));
  return FromCuda(cudaEventSynchronize(e), "cudaEventSynchronize");
}

absl::Status CudaBackend::RecordForeignEvent(void* event, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  if (event == nullptr) return absl::InvalidArgumentError("RecordForeignEvent: no event");
  return FromCuda(cudaEventRecord(static_cast<cudaEvent_t>(event), s), "cudaEventRecord");
}

absl::Status CudaBackend::WaitForeignEvent(int stream, void* event) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  if (event == nullptr) return absl::InvalidArgumentError("WaitForeignEvent: no event");
  return FromCuda(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(event), 0),
                  "cudaStreamWaitEvent");
}

absl::StatusOr<float> CudaBackend::ElapsedMs(int start_event, int end_event) {
  KVWAVE_ASSIGN_OR_RETURN(cudaEvent_t a, impl_->Event(start_event));
  KVWAVE_ASSIGN_OR_RETURN(cudaEvent_t b, impl_->Event(end_event));
  float ms = 0;
  KVWAVE_RETURN_IF_ERROR(FromCuda(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime"));
  return ms;
}

absl::Status CudaBackend::ScoreClusters(const ScoreArgs& a, int stream) {
  if (!GroupOk(a.g) || a.d <= 0 || a.d % 4 != 0 || a.heads < 0 || a.n < 0)
    return absl::InvalidArgumentError("ScoreClusters: g must be 1/2/4/8 and d a multiple of 4");
  if (a.centroids_bf16 != nullptr && (a.d > 128 || a.d % 8 != 0))
    return absl::InvalidArgumentError("ScoreClusters: bf16 centroids need d <= 128, d % 8 == 0");
  if (a.heads_meta != nullptr)
    return absl::InvalidArgumentError("ScoreClusters: per-head descriptors are ScoreSelectPlan's");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  KVWAVE_ASSIGN_OR_RETURN(float* ws,
                          impl_->Workspace(stream, cuda::ScoreWorkspaceBytes(a.heads, a.g, a.n)));
  return FromCuda(cuda::LaunchScoreClusters(a, ws, s), "ScoreClusters");
}

absl::Status CudaBackend::SelectTopK(const TopKArgs& a, int stream) {
  if (a.n < 0 || a.k < 0 || a.n > (int64_t{1} << 31) - 1 || a.out == nullptr ||
      a.counts == nullptr || (a.out2 != nullptr && a.counts2 == nullptr))
    return absl::InvalidArgumentError("SelectTopK: bad arguments");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchSelectTopK(a, s), "SelectTopK");
}

absl::Status CudaBackend::ScoreSelectPlan(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                                          int stream) {
  if (!GroupOk(a.g) || a.d <= 0 || a.d % 4 != 0 || a.heads < 0 || a.n <= 0 ||
      a.n > (int64_t{1} << 31) - 1 || a.scores == nullptr ||
      (a.centroids_bf16 != nullptr && (a.d > 128 || a.d % 8 != 0)))
    return absl::InvalidArgumentError("ScoreSelectPlan: bad score arguments");
  if (t.k < 0 || t.out == nullptr || t.counts == nullptr ||
      (t.out2 != nullptr && t.counts2 == nullptr) || t.heads != a.heads || t.n != a.n ||
      p.heads != a.heads || p.retrieved != t.out || p.counts != t.counts ||
      p.heads_meta != a.heads_meta)
    return absl::InvalidArgumentError("ScoreSelectPlan: bad top-k or plan arguments");
  if (a.heads_meta != nullptr && a.d > 128)
    return absl::InvalidArgumentError("ScoreSelectPlan: per-head descriptors need d <= 128");
  if (p.row_bytes <= 0 || p.row_bytes % 16 != 0 || p.page_base == nullptr || p.table == nullptr ||
      (p.heads_meta == nullptr && (p.keys == nullptr || p.steady == nullptr || p.sizes == nullptr)))
    return absl::InvalidArgumentError("ScoreSelectPlan: bad plan arguments");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  KVWAVE_ASSIGN_OR_RETURN(float* ws,
                          impl_->Workspace(stream, cuda::ScoreWorkspaceBytes(a.heads, a.g, a.n)));
  cudaEvent_t wait = nullptr;
  if (p.wait_event >= 0) {
    KVWAVE_ASSIGN_OR_RETURN(wait, impl_->Event(p.wait_event));
  }
  return FromCuda(
      cuda::LaunchScoreSelectPlan(a, t, p, ws, dependent_launch_, multiprocessors_, wait, s),
      "ScoreSelectPlan");
}

absl::Status CudaBackend::ExactAttention(const ExactArgs& a, int stream) {
  if (!cuda::ExactSupported(a.d, a.g, a.kv_type))
    return absl::InvalidArgumentError(absl::StrCat("ExactAttention: unsupported d=", a.d,
                                                   " g=", a.g,
                                                   " (d 64/128, g 1/2/4/8, "
                                                   "bf16 or f16 K/V)"));
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  const int splits =
      cuda::ExactSplits(a.heads, a.max_pages_per_head, a.pages_per_split, multiprocessors_);
  float* ws = nullptr;
  uint32_t* arrivals = nullptr;
  KVWAVE_RETURN_IF_ERROR(impl_->SplitScratch(a.chain, stream,
                                             cuda::ExactWorkspaceBytes(a.heads, a.g, a.d, splits),
                                             a.heads, &ws, &arrivals));
  if ((a.extra_out == nullptr) != (a.extra_lse == nullptr) ||
      (a.extra_out == nullptr) != (a.extra_ready == nullptr))
    return absl::InvalidArgumentError(
        "ExactAttention: extra_out, extra_lse and extra_ready go together");
  if (a.heads == 0) return absl::OkStatus();
  return FromCuda(cuda::LaunchExactAttention(a, splits, ws, arrivals, s), "ExactAttention");
}

absl::Status CudaBackend::EstimateAttention(const EstimateArgs& a, int stream) {
  if (!cuda::ExactSupported(a.d, a.g, DType::kBF16))
    return absl::InvalidArgumentError("EstimateAttention: d must be 64/128 and g 1/2/4/8");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  const int splits = cuda::EstimateSplits(a.heads, a.list_stride, multiprocessors_);
  float* ws = nullptr;
  uint32_t* arrivals = nullptr;
  KVWAVE_RETURN_IF_ERROR(
      impl_->SplitScratch(a.chain, stream, cuda::EstimateWorkspaceBytes(a.heads, a.g, a.d, splits),
                          a.heads, &ws, &arrivals));
  if (a.heads == 0) return absl::OkStatus();
  return FromCuda(cuda::LaunchEstimateAttention(a, a.list_stride, splits, ws, arrivals, s),
                  "EstimateAttention");
}

size_t CudaBackend::ExactScratchBytes(const ExactArgs& a) const {
  const int splits =
      cuda::ExactSplits(a.heads, a.max_pages_per_head, a.pages_per_split, multiprocessors_);
  return cuda::ExactWorkspaceBytes(a.heads, a.g, a.d, splits);
}

size_t CudaBackend::EstimateScratchBytes(const EstimateArgs& a) const {
  const int splits = cuda::EstimateSplits(a.heads, a.list_stride, multiprocessors_);
  return cuda::EstimateWorkspaceBytes(a.heads, a.g, a.d, splits);
}

absl::Status CudaBackend::MergeLse(float* out_a, float* lse_a, const float* out_b,
                                   const float* lse_b, int rows, int d, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchMergeLse(out_a, lse_a, out_b, lse_b, rows, d, s), "MergeLse");
}

absl::Status CudaBackend::KMeansAssign(const AssignArgs& a, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchKMeansAssign(a, s), "KMeansAssign");
}

absl::Status CudaBackend::SphericalKMeans(const KMeansArgs& a, int stream) {
  if (a.n < 1 || a.d < 4 || a.d % 4 != 0 || a.d > 512 || a.clusters < 1 || a.clusters > a.n ||
      a.iterations < 0 || a.keys == nullptr || a.assignment == nullptr || a.sizes == nullptr ||
      a.centroids == nullptr)
    return absl::InvalidArgumentError(
        "SphericalKMeans: need n >= 1, d a multiple of 4 in [4, 512], 1 <= clusters <= n");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  KVWAVE_ASSIGN_OR_RETURN(
      float* ws, impl_->Workspace(stream, cuda::KMeansWorkspaceBytes(a.n, a.d, a.clusters)));
  return FromCuda(cuda::LaunchSphericalKMeans(a, ws, s), "SphericalKMeans");
}

absl::Status CudaBackend::ExactTopN(const ExactTopNArgs& a, int stream) {
  if (a.n < 1 || a.m < 1 || a.d < 1 || a.nn < 1 || a.nn > a.n || a.nn > 1024 ||
      a.n > (int64_t{1} << 31) - 1 || a.keys == nullptr || a.queries == nullptr || a.out == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(
        "ExactTopN: need n, m, d >= 1, 1 <= N <= min(n, 1024), n < 2^31 and buffers (n=", a.n,
        " m=", a.m, " d=", a.d, " N=", a.nn, ")"));
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  if (cuda::ExactTopNChunkRows(a.n, a.nn, impl_->region_bytes) < 1)
    return absl::ResourceExhaustedError(absl::StrCat("ExactTopN: one query over ", a.n,
                                                     " keys needs more than the stream's ",
                                                     impl_->region_bytes, " workspace bytes"));
  KVWAVE_ASSIGN_OR_RETURN(float* ws, impl_->Workspace(stream, impl_->region_bytes));
  return FromCuda(cuda::LaunchExactTopN(a, ws, impl_->region_bytes, s), "ExactTopN");
}

absl::Status FitBuffer(CudaBackend& b, DeviceBuffer& buf, size_t bytes) {
  if (buf.data() != nullptr && buf.size() >= bytes) return absl::OkStatus();
  buf.Reset();
  KVWAVE_ASSIGN_OR_RETURN(buf, b.Allocate(std::max<size_t>(bytes, 1 << 20)));
  return absl::OkStatus();
}

absl::Status ExactTopNHost(CudaBackend& b, TopNBuffers& buffers, const float* keys, int64_t n,
                           const float* queries, int64_t m, int d, int nn, int32_t* out,
                           int stream) {
  if (keys == nullptr || queries == nullptr || out == nullptr || n < 1 || m < 1 || d < 1 ||
      nn < 1 || nn > n)
    return absl::InvalidArgumentError("ExactTopNHost: bad arguments");
  const auto fit = [&b](DeviceBuffer& buf, size_t bytes) { return FitBuffer(b, buf, bytes); };
  const size_t key_bytes = sizeof(float) * n * d, query_bytes = sizeof(float) * m * d;
  const size_t out_bytes = sizeof(int32_t) * m * nn;
  KVWAVE_RETURN_IF_ERROR(fit(buffers.keys, key_bytes));
  KVWAVE_RETURN_IF_ERROR(fit(buffers.queries, query_bytes));
  KVWAVE_RETURN_IF_ERROR(fit(buffers.out, out_bytes + sizeof(int32_t)));
  ExactTopNArgs a;
  a.keys = buffers.keys.as<float>();
  a.n = n;
  a.queries = buffers.queries.as<float>();
  a.m = m;
  a.d = d;
  a.nn = nn;
  a.out = buffers.out.as<int32_t>();
  a.short_rows = a.out + m * nn;
  KVWAVE_RETURN_IF_ERROR(b.Copy(buffers.keys.data(), keys, key_bytes, stream));
  KVWAVE_RETURN_IF_ERROR(b.Copy(buffers.queries.data(), queries, query_bytes, stream));
  KVWAVE_RETURN_IF_ERROR(b.Memset(a.short_rows, 0, sizeof(int32_t), stream));
  KVWAVE_RETURN_IF_ERROR(b.ExactTopN(a, stream));
  int32_t short_rows = 0;
  KVWAVE_RETURN_IF_ERROR(b.Copy(out, a.out, out_bytes, stream));
  KVWAVE_RETURN_IF_ERROR(b.Copy(&short_rows, a.short_rows, sizeof(int32_t), stream));
  KVWAVE_RETURN_IF_ERROR(b.Synchronize(stream));
  if (short_rows != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "ExactTopNHost: ", short_rows, " queries with fewer than ", nn, " finite scores"));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherPages(const void* const* src, void* const* dst,
                                      const int32_t* bytes, int64_t count, int64_t max_bytes,
                                      int stream, bool bulk) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchGatherPages(src, dst, bytes, count, max_bytes, bulk, s),
                  "GatherPages");
}

absl::Status CudaBackend::PlanPages(const PlanArgs& a, int stream) {
  if (a.heads < 0 || a.row_bytes <= 0 || a.row_bytes % 16 != 0 ||
      (a.heads > 0 && ((a.steady == nullptr && a.heads_meta == nullptr) || a.counts == nullptr)))
    return absl::InvalidArgumentError("PlanPages: bad arguments");
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchPlanPages(a, s), "PlanPages");
}

absl::Status CudaBackend::Delay(int64_t ns, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchDelay(ns, s), "Delay");
}

absl::Status CudaBackend::ScatterInt32(int32_t* base, const int64_t* index, const int32_t* value,
                                       int64_t count, int stream) {
  KVWAVE_ASSIGN_OR_RETURN(cudaStream_t s, impl_->Stream(stream));
  return FromCuda(cuda::LaunchScatterInt32(base, index, value, count, s), "ScatterInt32");
}

}  // namespace kvwave::gpu
