// Spherical k-means on the GPU, the same algorithm as index::ClusterKeys (the wave index of one
// segment): mean-centre and L2-normalise the keys, seed centroid c with key c*n/k, then rounds of
// assignment (each row to the centroid of largest dot product, ties: lower index; one warp per
// row, lanes over d) and update (per cluster: sum of its unit rows by atomics, normalised; an
// empty cluster keeps its centroid), a final assignment, and the summary: sizes and centroids as
// plain means of the members' original keys. Sums use float atomics, so their order (and the last
// bits) vary from run to run; the CPU version sums in order.
#include <algorithm>
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

constexpr int kRowThreads = 256;  // a warp per row

// Column sums of x into sums[d] (pre-zeroed): each warp adds its rows, lanes over d.
__global__ void ColumnSumKernel(const float* __restrict__ x, int64_t n, int d,
                                float* __restrict__ sums) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t{gridDim.x} * blockDim.x / 32;
  for (int e = lane; e < d; e += 32) {
    float acc = 0.f;
    for (int64_t i = warp; i < n; i += warps) acc += x[i * d + e];
    atomicAdd(&sums[e], acc);
  }
}

// unit[i] = (x[i] - sums/n) / |x[i] - sums/n| (zero rows stay zero); sums null: no centring.
__global__ void NormalizeRowsKernel(const float* __restrict__ x, int64_t n, int d,
                                    const float* __restrict__ sums, float* __restrict__ unit) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  if (row >= n) return;
  const float inv_n = 1.0f / static_cast<float>(n);
  float ss = 0.f;
  for (int e = lane; e < d; e += 32) {
    const float v = x[row * d + e] - (sums != nullptr ? sums[e] * inv_n : 0.f);
    ss += v * v;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float inv = ss > 0.f ? rsqrtf(ss) : 0.f;
  for (int e = lane; e < d; e += 32)
    unit[row * d + e] = (x[row * d + e] - (sums != nullptr ? sums[e] * inv_n : 0.f)) * inv;
}

__global__ void SeedKernel(const float* __restrict__ unit, int64_t n, int d, int64_t k,
                           float* __restrict__ centroids) {
  const int64_t c = blockIdx.x;
  const int64_t token = c * n / k;
  for (int e = threadIdx.x; e < d; e += blockDim.x) centroids[c * d + e] = unit[token * d + e];
}

// sums[a[i]] += x[i], counts[a[i]] += 1 (both pre-zeroed).
__global__ void AccumulateKernel(const float* __restrict__ x, int64_t n, int d,
                                 const int32_t* __restrict__ assignment, float* __restrict__ sums,
                                 int32_t* __restrict__ counts) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  if (row >= n) return;
  const int64_t c = assignment[row];
  for (int e = lane; e < d; e += 32) atomicAdd(&sums[c * d + e], x[row * d + e]);
  if (lane == 0) atomicAdd(&counts[c], 1);
}

// unit_mean: centroid c = sums/|sums| when it has members (else unchanged); otherwise (the
// summary) centroid c = sums/count, zero for an empty cluster. One warp per centroid.
__global__ void FinishCentroidsKernel(const float* __restrict__ sums,
                                      const int32_t* __restrict__ counts, int64_t k, int d,
                                      bool unit_mean, float* __restrict__ centroids) {
  const int lane = threadIdx.x % 32;
  const int64_t c = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  if (c >= k) return;
  const int32_t count = counts[c];
  if (unit_mean) {
    if (count == 0) return;
    float ss = 0.f;
    for (int e = lane; e < d; e += 32) ss += sums[c * d + e] * sums[c * d + e];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (!(ss > 0.f)) return;
    const float inv = rsqrtf(ss);
    for (int e = lane; e < d; e += 32) centroids[c * d + e] = sums[c * d + e] * inv;
  } else {
    const float inv = count > 0 ? 1.0f / static_cast<float>(count) : 0.f;
    for (int e = lane; e < d; e += 32) centroids[c * d + e] = sums[c * d + e] * inv;
  }
}

int64_t RowBlocks(int64_t rows) { return (rows + kRowThreads / 32 - 1) / (kRowThreads / 32); }

}  // namespace

size_t KMeansWorkspaceBytes(int64_t n, int d, int64_t k) {
  // unit rows, unit centroids, sums (k x d, and d for the mean), counts
  return sizeof(float) * (n * d + 2 * k * d + d + 64) + sizeof(int32_t) * (k + 64);
}

cudaError_t LaunchSphericalKMeans(const KMeansArgs& a, void* workspace, cudaStream_t stream) {
  if (a.n <= 0) return cudaSuccess;
  if (a.d % 4 != 0 || a.d > 512 || a.clusters <= 0 || a.clusters > a.n || a.iterations < 0)
    return cudaErrorInvalidValue;
  const int64_t n = a.n, k = a.clusters;
  const int d = a.d;
  float* unit = static_cast<float*>(workspace);
  float* ucent = unit + n * d;
  float* sums = ucent + k * d;
  float* mean = sums + k * d;
  int32_t* counts = reinterpret_cast<int32_t*>(mean + d + 64);
  cudaError_t err = cudaSuccess;
  if (a.mean_center) {
    if ((err = cudaMemsetAsync(mean, 0, sizeof(float) * d, stream)) != cudaSuccess) return err;
    ColumnSumKernel<<<std::min<int64_t>(RowBlocks(n), 264), kRowThreads, 0, stream>>>(a.keys, n, d,
                                                                                      mean);
  }
  NormalizeRowsKernel<<<RowBlocks(n), kRowThreads, 0, stream>>>(
      a.keys, n, d, a.mean_center ? mean : nullptr, unit);
  SeedKernel<<<k, 128, 0, stream>>>(unit, n, d, k, ucent);
  AssignArgs as;
  as.x = unit;
  as.n = n;
  as.centroids = ucent;
  as.k = k;
  as.d = d;
  as.assignment = a.assignment;
  for (int it = 0;; ++it) {
    if ((err = LaunchKMeansAssign(as, stream)) != cudaSuccess) return err;
    if (it == a.iterations) break;  // the final assignment
    if ((err = cudaMemsetAsync(sums, 0, sizeof(float) * k * d, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * k, stream)) != cudaSuccess) return err;
    AccumulateKernel<<<RowBlocks(n), kRowThreads, 0, stream>>>(unit, n, d, a.assignment, sums,
                                                               counts);
    FinishCentroidsKernel<<<RowBlocks(k), kRowThreads, 0, stream>>>(sums, counts, k, d, true,
                                                                    ucent);
  }
  // Summary: sizes and plain means of the original keys.
  if ((err = cudaMemsetAsync(sums, 0, sizeof(float) * k * d, stream)) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(a.sizes, 0, sizeof(int32_t) * k, stream)) != cudaSuccess) return err;
  AccumulateKernel<<<RowBlocks(n), kRowThreads, 0, stream>>>(a.keys, n, d, a.assignment, sums,
                                                             a.sizes);
  FinishCentroidsKernel<<<RowBlocks(k), kRowThreads, 0, stream>>>(sums, a.sizes, k, d, false,
                                                                  a.centroids);
  return cudaGetLastError();
}

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
