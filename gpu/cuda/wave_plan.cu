// The wave buffer's per-layer planning on the GPU: retrieved clusters -> page list of the exact
// attention, using the GPU-resident cluster -> pool-slot table (no CPU round trip), and the
// scatter that applies the CPU committer's table updates.
//
// PlanKernel: one block per KV head, running PlanHead (plan_block.cuh).
#include <algorithm>

#include "gpu/cuda/launchers.h"
#include "gpu/cuda/plan_block.cuh"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads) PlanKernel(PlanArgs a) {
  PlanHead<kPlanThreads>(a, blockIdx.x);
}

__global__ void ScatterKernel(int32_t* __restrict__ base, const int64_t* __restrict__ index,
                              const int32_t* __restrict__ value, int64_t count) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x)
    base[index[i]] = value[i];
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void DelayKernel(int64_t ns) {  // spins on the global nanosecond timer
  const uint64_t end = GlobalTimerNs() + static_cast<uint64_t>(ns);
  while (GlobalTimerNs() < end) __nanosleep(256);
}

}  // namespace

cudaError_t LaunchDelay(int64_t ns, cudaStream_t stream) {
  DelayKernel<<<1, 1, 0, stream>>>(ns);
  return cudaGetLastError();
}

cudaError_t LaunchPlanPages(const PlanArgs& a, cudaStream_t stream) {
  if (a.heads <= 0) return cudaSuccess;
  PlanKernel<<<a.heads, kPlanThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchScatterInt32(int32_t* base, const int64_t* index, const int32_t* value,
                               int64_t count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 1024));
  ScatterKernel<<<blocks, 256, 0, stream>>>(base, index, value, count);
  return cudaGetLastError();
}

}  // namespace kvwave::gpu::cuda
