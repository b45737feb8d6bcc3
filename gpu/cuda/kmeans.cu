// Spherical k-means assignment on the GPU: each row goes to the centroid of largest dot product
// (ties: lower index). One warp per row; the lanes cover d with float4 and reduce by shuffles.
// The centroid update (a segmented mean) stays on the host: it is O(n d), the assignment O(n k d).
#include <cmath>

#include "gpu/cuda/launchers.h"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kAssignThreads = 256;

__global__ void __launch_bounds__(kAssignThreads)
    AssignKernel(const float* __restrict__ x, int64_t n, const float* __restrict__ c, int64_t k,
                 int d, int32_t* __restrict__ assignment, float* __restrict__ best) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  if (row >= n) return;  // whole warps leave together
  const int d4 = d / 4;
  const float4* xr = reinterpret_cast<const float4*>(x + row * d);
  float4 xv[4];  // d <= 512
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int i = lane + 32 * t;
    xv[t] = i < d4 ? xr[i] : make_float4(0, 0, 0, 0);
  }
  float best_dot = -INFINITY;
  int32_t best_j = 0;
  for (int64_t j = 0; j < k; ++j) {
    const float4* cr = reinterpret_cast<const float4*>(c + j * d);
    float dot = 0.f;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int i = lane + 32 * t;
      if (i < d4) {
        const float4 cv = cr[i];
        dot += xv[t].x * cv.x + xv[t].y * cv.y + xv[t].z * cv.z + xv[t].w * cv.w;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (dot > best_dot) best_dot = dot, best_j = static_cast<int32_t>(j);
  }
  if (lane == 0) {
    assignment[row] = best_j;
    if (best != nullptr) best[row] = best_dot;
  }
}

}  // namespace

cudaError_t LaunchKMeansAssign(const AssignArgs& a, cudaStream_t stream) {
  if (a.n <= 0) return cudaSuccess;
  if (a.d % 4 != 0 || a.d > 512 || a.k <= 0) return cudaErrorInvalidValue;
  const int64_t warps_per_block = kAssignThreads / 32;
  const int64_t blocks = (a.n + warps_per_block - 1) / warps_per_block;
  AssignKernel<<<blocks, kAssignThreads, 0, stream>>>(a.x, a.n, a.centroids, a.k, a.d, a.assignment,
                                                      a.best);
  return cudaGetLastError();
}

}  // namespace kvwave::gpu::cuda
