// Flags between kernels that run at the same time (sm_90 PTX): a producer publishes data with a
// release store of a sequence number, a consumer spins on an acquire load until it sees it.
#ifndef KVWAVE_GPU_CUDA_SYNC_CUH_
#define KVWAVE_GPU_CUDA_SYNC_CUH_

#include <cstdint>

namespace kvwave::gpu::cuda {

inline constexpr uint64_t kReadyTimeoutNs = 5'000'000'000ull;  // a producer that never signals

__device__ __forceinline__ uint32_t LoadAcquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreRelease(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t GlobalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spins (one thread) until *word == seq; traps after kReadyTimeoutNs (a bug, not a slow producer:
// the producers are kernels already running). Then a fence, so that what the thread's block reads
// after its next barrier is ordered after the producer's writes.
__device__ __forceinline__ void WaitForWord(const uint32_t* word, uint32_t seq) {
  if (LoadAcquire(word) != seq) {
    const uint64_t t0 = GlobalNs();
    while (LoadAcquire(word) != seq) {
      if (GlobalNs() - t0 > kReadyTimeoutNs) __trap();
      __nanosleep(128);
    }
  }
  __threadfence();
}

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_SYNC_CUH_
