#include "buffer/pinned_allocator.h"

#include <cuda_runtime.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace kvwave::buffer {

absl::StatusOr<void*> PinnedHostAllocator::Allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();  // non-sticky: clear it
    const std::string msg =
        absl::StrCat("cudaHostAlloc(", bytes, " bytes): ", std::string(cudaGetErrorString(err)));
    if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
    return absl::InternalError(msg);
  }
  // cudaHostAlloc returns page-aligned memory, more than the 64 bytes HostAllocator promises.
  return p;
}

void PinnedHostAllocator::Free(void* p, size_t) {
  if (p != nullptr) cudaFreeHost(p);
}

PinnedHostAllocator* PinnedAllocator() {
  static PinnedHostAllocator* const allocator = new PinnedHostAllocator;
  return allocator;
}

}  // namespace kvwave::buffer
