// Host KV memory pinned and mapped into the GPU's address space (cudaHostAlloc with
// cudaHostAllocMapped | cudaHostAllocPortable), so kernels read it directly over PCIe (zero-copy)
// and copies from it run at full DMA speed. Plugs into store::HostAllocator.
//
// Failing to pin is an error (RESOURCE_EXHAUSTED / INTERNAL), never a fallback to pageable memory.
// Only built with the CUDA backend (kvwave_buffer_cuda). Thread-safe (stateless over CUDA's
// thread-safe allocator).
#ifndef KVWAVE_BUFFER_PINNED_ALLOCATOR_H_
#define KVWAVE_BUFFER_PINNED_ALLOCATOR_H_

#include <cstddef>

#include "absl/status/statusor.h"
#include "store/host_memory.h"

namespace kvwave::buffer {

class PinnedHostAllocator final : public store::HostAllocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Free(void* p, size_t bytes) override;
  const char* name() const override { return "cuda-pinned-mapped"; }
};

// The process-wide instance.
PinnedHostAllocator* PinnedAllocator();

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_PINNED_ALLOCATOR_H_
