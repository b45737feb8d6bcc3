// The CUDA attention backend (engine/attention_backend.h): the wave buffer serving live contexts.
// Only built with CUDA (target kvwave_engine_cuda); engine/backend_select.cc creates it for
// gpu.mode = auto | on.
//
// Thread-safety: see engine/attention_backend.h.
#ifndef KVWAVE_ENGINE_CUDA_CUDA_ATTENTION_BACKEND_H_
#define KVWAVE_ENGINE_CUDA_CUDA_ATTENTION_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "config/settings.h"
#include "engine/attention_backend.h"
#include "store/host_memory.h"

namespace kvwave::engine {

// Starts the backend on settings.gpu_device, its page pool sized by gpu.cache_bytes (or
// gpu.cache_fraction of the resident KV). host_pool: the engine's host memory (pinned and mapped
// when a device is present). Errors: no device, out of device memory, not implemented yet.
[[nodiscard]] absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const config::Settings& settings, std::shared_ptr<store::HostPool> host_pool);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_CUDA_CUDA_ATTENTION_BACKEND_H_
