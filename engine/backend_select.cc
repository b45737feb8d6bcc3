#include "engine/backend_select.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/attention_backend.h"
#include "engine/cpu_backend.h"
#include "spdlog/spdlog.h"
#include "store/host_memory.h"
#if KVWAVE_HAVE_CUDA
#include "buffer/pinned_allocator.h"
#include "engine/cuda/cuda_attention_backend.h"
#include "gpu/cuda_backend.h"
#endif

namespace kvwave::engine {
namespace {

bool DevicePresent() {
#if KVWAVE_HAVE_CUDA
  return gpu::CudaBackend::DeviceAvailable();
#else
  return false;
#endif
}

constexpr const char* kNoCuda = "kvwaved was built without CUDA";

}  // namespace

absl::StatusOr<SelectedDeps> SelectEngineDeps(const config::Settings& settings) {
  SelectedDeps out;
  const bool device = DevicePresent();

  // Host memory.
  store::HostAllocator* upstream = store::MappedHostAllocator();
  if (settings.pinned_memory == "on" && !device) {
    return absl::FailedPreconditionError(
        absl::StrCat("store.pinned_memory = on, but ",
                     KVWAVE_HAVE_CUDA ? "no CUDA device is available" : kNoCuda));
  }
#if KVWAVE_HAVE_CUDA
  if (settings.pinned_memory != "off" && device) upstream = buffer::PinnedAllocator();
#endif
  out.deps.host_pool = std::make_shared<store::HostPool>(upstream, settings.host_pool_bytes);
  const std::string memory = upstream == store::MappedHostAllocator()
                                 ? "pageable, pooled"
                                 : "pinned (cudaHostAlloc, mapped), pooled";

  // Attention backend.
  if (settings.gpu_mode != "off") {
    std::string why_not;
    if (!KVWAVE_HAVE_CUDA) {
      why_not = kNoCuda;
    } else if (!device) {
      why_not = "no CUDA device is available";
    } else {
#if KVWAVE_HAVE_CUDA
      absl::StatusOr<std::unique_ptr<AttentionBackend>> cuda =
          CreateCudaAttentionBackend(settings, out.deps.host_pool);
      if (cuda.ok()) {
        out.deps.backend = *std::move(cuda);
      } else {
        why_not = absl::StrCat("the CUDA backend did not start: ", cuda.status().ToString());
      }
#endif
    }
    if (out.deps.backend == nullptr) {
      if (settings.gpu_mode == "on") {
        return absl::FailedPreconditionError(absl::StrCat("gpu.mode = on, but ", why_not));
      }
      spdlog::info("gpu.mode = auto: attending on the CPU ({})", why_not);
    }
  }
  if (out.deps.backend == nullptr) out.deps.backend = CreateCpuBackend(settings);
  out.description =
      absl::StrCat("attention backend: ", out.deps.backend->name(), "; host KV memory: ", memory);
  return out;
}

}  // namespace kvwave::engine
