#include "engine/cuda/cuda_attention_backend.h"

namespace kvwave::engine {

// Placeholder until the wave buffer serves live contexts (issue 16 item 2): gpu.mode = auto then
// attends on the CPU, gpu.mode = on fails at start naming this.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const config::Settings& settings, std::shared_ptr<store::HostPool> host_pool) {
  return absl::UnimplementedError("the CUDA attention backend is not implemented yet");
}

}  // namespace kvwave::engine
