// Exact top-N of sampled queries against a segment's keys on the GPU: step 1 of the graph build
// (index/graph_index.h), the CPU's index::ExactTopN. Per chunk of queries (as many as the
// workspace holds): ScoresKernel writes every query's scores over all keys, SelectTopK's radix
// select (scoring.cu) picks each query's N best (ties: the lower key), and OrderKernel sorts them
// best first. Every score is the chain of FMAs over the dimensions in order, starting from zero
// — exactly how the CPU kernels compute it — so the lists equal the CPU's bit for bit (the graph
// built from them is the same graph).
#include <algorithm>

#include "gpu/cuda/launchers.h"

namespace kvwave::gpu::cuda {
namespace {

// A 64 x 64 tile of scores a block of 256 threads, 4 x 4 a thread, over 16-dimension slices
// staged in shared memory (dimension-major, so a thread reads its 4 queries and 4 keys as one
// float4 each).
constexpr int kTile = 64;
constexpr int kSlice = 16;
constexpr int kScoreThreads = 256;
constexpr int kMaxOrdered = 1024;  // N <= one block's threads

__global__ void __launch_bounds__(kScoreThreads)
    ScoresKernel(const float* __restrict__ q, int64_t rows, const float* __restrict__ keys,
                 int64_t n, int d, float* __restrict__ scores) {
  __shared__ __align__(16) float qs[kSlice][kTile];
  __shared__ __align__(16) float ks[kSlice][kTile];
  const int64_t r0 = int64_t{blockIdx.y} * kTile, c0 = int64_t{blockIdx.x} * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < d; k0 += kSlice) {
    for (int i = threadIdx.x; i < kTile * kSlice; i += kScoreThreads) {
      const int row = i / kSlice, kk = i % kSlice, dim = k0 + kk;
      const int64_t r = r0 + row, c = c0 + row;
      qs[kk][row] = r < rows && dim < d ? q[r * d + dim] : 0.0f;
      ks[kk][row] = c < n && dim < d ? keys[c * d + dim] : 0.0f;
    }
    __syncthreads();
    const int slice = min(kSlice, d - k0);  // dims past d are not chained in (the CPU's chain)
    for (int kk = 0; kk < slice; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&qs[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&ks[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx * 4 + j;
      if (c < n) scores[r * n + c] = acc[i][j];
    }
  }
}

// Row b's `counts[b]` selected keys (increasing key order) to out + b * nn best first: higher
// score, then lower key. Ranks past the count are -1 and the row is counted in *short_rows.
__global__ void __launch_bounds__(kMaxOrdered)
    OrderKernel(const float* __restrict__ scores, int64_t n, const int32_t* __restrict__ selected,
                const int32_t* __restrict__ counts, int nn, int32_t* __restrict__ out,
                int32_t* __restrict__ short_rows) {
  __shared__ float sc[kMaxOrdered];
  __shared__ int32_t id[kMaxOrdered];
  const int64_t b = blockIdx.x;
  const int count = min(counts[b], nn);
  const int i = threadIdx.x;
  if (i < count) {
    id[i] = selected[b * nn + i];
    sc[i] = scores[b * n + id[i]];
  }
  __syncthreads();
  if (i < count) {
    int rank = 0;
    for (int j = 0; j < count; ++j) {
      rank += sc[j] > sc[i] || (sc[j] == sc[i] && id[j] < id[i]);
    }
    out[b * nn + rank] = id[i];
  } else if (i < nn) {
    out[b * nn + i] = -1;
  }
  if (i == 0 && count < nn && short_rows != nullptr) atomicAdd(short_rows, 1);
}

size_t RowBytes(int64_t n, int nn) {
  return sizeof(float) * n + sizeof(int32_t) * (static_cast<size_t>(nn) + 1);
}

}  // namespace

int64_t ExactTopNChunkRows(int64_t n, int nn, size_t workspace_bytes) {
  return static_cast<int64_t>(workspace_bytes / RowBytes(n, nn));
}

cudaError_t LaunchExactTopN(const ExactTopNArgs& a, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (a.n < 1 || a.m < 1 || a.d < 1 || a.nn < 1 || a.nn > a.n || a.nn > kMaxOrdered ||
      a.n > (int64_t{1} << 31) - 1)
    return cudaErrorInvalidValue;
  const int64_t chunk = std::min(a.m, ExactTopNChunkRows(a.n, a.nn, workspace_bytes));
  if (chunk < 1) return cudaErrorMemoryAllocation;
  float* scores = static_cast<float*>(workspace);
  int32_t* selected = reinterpret_cast<int32_t*>(scores + chunk * a.n);
  int32_t* counts = selected + chunk * a.nn;
  for (int64_t first = 0; first < a.m; first += chunk) {
    const int64_t rows = std::min(chunk, a.m - first);
    const dim3 grid(static_cast<unsigned>((a.n + kTile - 1) / kTile),
                    static_cast<unsigned>((rows + kTile - 1) / kTile));
    ScoresKernel<<<grid, kScoreThreads, 0, stream>>>(a.queries + first * a.d, rows, a.keys, a.n,
                                                     a.d, scores);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    TopKArgs t;
    t.scores = scores;
    t.heads = static_cast<int>(rows);
    t.n = a.n;
    t.score_stride = a.n;
    t.k = a.nn;
    t.k2 = a.nn;
    t.out = selected;
    t.out_stride = a.nn;
    t.counts = counts;
    if (cudaError_t err = LaunchSelectTopK(t, stream); err != cudaSuccess) return err;
    OrderKernel<<<static_cast<unsigned>(rows), std::max(32, (a.nn + 31) / 32 * 32), 0, stream>>>(
        scores, a.n, selected, counts, a.nn, a.out + first * a.nn, a.short_rows);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace kvwave::gpu::cuda
