// Attention kernels: flash-decoding exact attention over an execution buffer of pages, the
// estimation zone from centroids and value sums, the split merge, LSE merge and page gathering.
//
// Exact attention (one launch per layer, all KV heads): grid (splits, heads), 4 warps a block.
// A key row of D bf16/f16 elements is read by D/8 lanes with 16-byte loads (a "slot"), so a warp
// holds 32/(D/8) slots and each slot walks its own pages, four rows at a time, keeping an online
// softmax in base 2 (scores pre-scaled by log2 e). The block then merges its slots in shared
// memory and writes one (out, lse) partial per query head; the last block of a head to finish
// (an arrival counter per head) folds the head's partials, and the optional extra partial of
// another stream once its ready words say so, into out/lse: no second launch. The estimation
// zone's kernel ends the same way and signals those ready words.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "gpu/cuda/launch_config.h"
#include "gpu/cuda/launchers.h"
#include "gpu/cuda/sync.cuh"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 4;  // rows a slot loads at once (8 measured slower on the H200: registers)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <bool kBf16>
__device__ __forceinline__ void Unpack8(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kBf16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 x = __half22float2(h);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
}

// Merges the per-slot states (m, l in base 2; acc unnormalised) of a block and writes the partial
// out (normalised) and natural-log lse of query head j for this (head, split).
template <int D, int G, int kSlots>
__device__ void CombineSlots(const float (*sm_m)[G], const float (*sm_l)[G],
                             const float (*sm_acc)[G][D], float* part_out, float* part_lse) {
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int j = idx / D, e = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) mx = fmaxf(mx, sm_m[s][j]);
    float l = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (sm_m[s][j] == -INFINITY) continue;
        const float c = exp2f(sm_m[s][j] - mx);
        l += sm_l[s][j] * c;
        o += sm_acc[s][j][e] * c;
      }
    }
    const bool empty = !(l > 0.f);
    part_out[j * D + e] = empty ? 0.f : o / l;
    if (e == 0) part_lse[j] = empty ? -INFINITY : (mx + log2f(l)) * kLn2;
  }
}

// The end of a split kernel (exact or estimation attention): where the partials are, and what the
// last block of each head does with them.
struct FoldArgs {
  int splits = 0;
  float* part_out = nullptr;         // [heads x splits x G x D], normalised
  float* part_lse = nullptr;         // [heads x splits x G], natural log
  uint32_t* arrivals = nullptr;      // [heads], zero before the launch and left zero
  const float* extra_out = nullptr;  // optional partial [heads x G x D] ...
  const float* extra_lse = nullptr;
  const uint32_t* extra_ready = nullptr;  // ... row r read once extra_ready[r] == extra_seq
  uint32_t extra_seq = 0;
  float* out = nullptr;       // [heads x G x D]
  float* lse = nullptr;       // [heads x G]
  uint32_t* ready = nullptr;  // optional: ready[r] = ready_seq once row r is written
  uint32_t ready_seq = 0;
};

constexpr int kFoldChunk = 64;  // splits' lse staged at once

// Called by every block of a split kernel after writing its partial of `head` (all threads). The
// head's last block to arrive folds the partials, and the extra partial, into out/lse: per chunk
// of splits, the rows' running maxima and the splits' weights go to shared memory, and each thread
// accumulates four adjacent elements of one row with independent (pipelined) loads.
template <int D, int G>
__device__ void FoldSplitsIfLast(const FoldArgs& f, int head) {
  constexpr int kVecs = G * D / 4;  // float4 outputs of the head
  constexpr int kPerThread = (kVecs + kThreads - 1) / kThreads;
  __shared__ bool last;
  __shared__ float sm_w[kFoldChunk][G];  // a chunk's lse, then its weights
  __shared__ float sm_m[G], sm_l[G], sm_c[G], sm_x[G];
  __threadfence();  // this thread's part of the partial, before the arrival that publishes it
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(f.arrivals + head, 1u) == static_cast<uint32_t>(f.splits - 1);
    if (last) f.arrivals[head] = 0;  // every block of the head has arrived: reset for the next op
    __threadfence();
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x < G) {
    sm_m[threadIdx.x] = -INFINITY;
    sm_l[threadIdx.x] = 0.f;
  }
  float4 acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int64_t base = int64_t{head} * f.splits;
  const auto* parts = reinterpret_cast<const float4*>(f.part_out);
  for (int s0 = 0; s0 < f.splits; s0 += kFoldChunk) {
    const int n = min(kFoldChunk, f.splits - s0);
    for (int i = threadIdx.x; i < n * G; i += kThreads)
      sm_w[i / G][i % G] = __ldcg(f.part_lse + (base + s0) * G + i);
    __syncthreads();
    if (threadIdx.x < G) {  // the row's new maximum, and the factor for what was summed so far
      const int j = threadIdx.x;
      float mx = sm_m[j];
      for (int s = 0; s < n; ++s) mx = fmaxf(mx, sm_w[s][j]);
      sm_c[j] = sm_m[j] == -INFINITY ? 0.f : expf(sm_m[j] - mx);
      sm_m[j] = mx;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * G; i += kThreads) {
      const int j = i % G;
      sm_w[i / G][j] = sm_m[j] == -INFINITY ? 0.f : expf(sm_w[i / G][j] - sm_m[j]);
    }
    __syncthreads();
    if (threadIdx.x < G) {
      float l = sm_l[threadIdx.x] * sm_c[threadIdx.x];
      for (int s = 0; s < n; ++s) l += sm_w[s][threadIdx.x];
      sm_l[threadIdx.x] = l;
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int v = threadIdx.x + k * kThreads, j = v / (D / 4), e4 = v % (D / 4);
      if (v >= kVecs) break;
      float4 a = acc[k];
      const float c = sm_c[j];
      a.x *= c;
      a.y *= c;
      a.z *= c;
      a.w *= c;
      const float4* src = parts + ((base + s0) * G + j) * (D / 4) + e4;
#pragma unroll 8
      for (int s = 0; s < n; ++s) {
        const float4 p = __ldcg(src + int64_t{s} * G * (D / 4));
        const float w = sm_w[s][j];
        a.x = fmaf(w, p.x, a.x);
        a.y = fmaf(w, p.y, a.y);
        a.z = fmaf(w, p.z, a.z);
        a.w = fmaf(w, p.w, a.w);
      }
      acc[k] = a;
    }
    __syncthreads();
  }
  if (f.extra_ready != nullptr && threadIdx.x < G)
    WaitForWord(f.extra_ready + head * G + threadIdx.x, f.extra_seq);
  if (threadIdx.x < G) {  // the extra partial's weight; sm_c: the splits' factor
    const int j = threadIdx.x;
    const float lx = f.extra_out != nullptr ? __ldcg(f.extra_lse + head * G + j) : -INFINITY;
    const float m = sm_m[j], mx = fmaxf(m, lx);
    const float cs = m == -INFINITY ? 0.f : expf(m - mx);
    const float cx = lx == -INFINITY ? 0.f : expf(lx - mx);
    const float l = sm_l[j] * cs + cx;
    const bool empty = !(l > 0.f);
    sm_c[j] = empty ? 0.f : cs / l;
    sm_x[j] = empty ? 0.f : cx / l;
    f.lse[int64_t{head} * G + j] = empty ? -INFINITY : mx + logf(l);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int v = threadIdx.x + k * kThreads, j = v / (D / 4), e4 = v % (D / 4);
    if (v >= kVecs) break;
    const int64_t at = (int64_t{head} * G + j) * (D / 4) + e4;
    const float cs = sm_c[j], cx = sm_x[j];
    float4 r = make_float4(acc[k].x * cs, acc[k].y * cs, acc[k].z * cs, acc[k].w * cs);
    if (cx != 0.f) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(f.extra_out) + at);
      r.x = fmaf(cx, x.x, r.x);
      r.y = fmaf(cx, x.y, r.y);
      r.z = fmaf(cx, x.z, r.z);
      r.w = fmaf(cx, x.w, r.w);
    }
    reinterpret_cast<float4*>(f.out)[at] = r;
  }
  if (f.ready != nullptr) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x < G) StoreRelease(f.ready + head * G + threadIdx.x, f.ready_seq);
  }
}

template <int D, int G, bool kBf16>
__global__ void __launch_bounds__(kThreads)
    ExactKernel(const float* __restrict__ q, float scale2, const PageRef* __restrict__ pages,
                const int32_t* __restrict__ offsets, const int32_t* __restrict__ counts,
                int64_t pps, uint4* __restrict__ stash_k, uint4* __restrict__ stash_v,
                const uint32_t* __restrict__ pages_ready, uint32_t seq, const FoldArgs fold) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kSlots = kWarps * kKeysPerWarp;
  const int head = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  // A dependent launch: this head's page list is ready once its word says so (or, without
  // words, once the op before has completed; a no-op for a plain launch).
  if (pages_ready != nullptr) {
    if (threadIdx.x == 0) WaitForWord(pages_ready + head, seq);
    __syncthreads();
  } else {
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerKey, sl = lane % kLanesPerKey;
  const int64_t head_end = counts != nullptr ? offsets[head] + counts[head] : offsets[head + 1];
  const int64_t begin = offsets[head] + split * pps;
  const int64_t end = min(head_end, begin + pps);

  float qr[G][8];
#pragma unroll
  for (int j = 0; j < G; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[j][e] = q[(head * G + j) * D + sl * 8 + e] * scale2;
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
  }

  for (int64_t p0 = begin + warp * kKeysPerWarp; p0 < end; p0 += kSlots) {
    const int64_t page = p0 + sub;
    int rows = 0;
    const uint4* kp = nullptr;
    const uint4* vp = nullptr;
    uint4* sk = nullptr;  // stash destination of this page, if any
    uint4* sv = nullptr;
    if (page < end) {
      const PageRef pr = pages[page];
      rows = pr.rows;
      kp = static_cast<const uint4*>(pr.k) + sl;
      vp = static_cast<const uint4*>(pr.v) + sl;
      if (pr.stash > 0) {
        const int64_t at = int64_t{pr.stash - 1} * kMaxPageRows * (D / 8) + sl;
        sk = stash_k + at;
        sv = stash_v + at;
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxPageRows; t += kTile) {
      uint4 kv[kTile], vv[kTile];
#pragma unroll
      for (int r = 0; r < kTile; ++r) {
        if (t + r < rows) {
          kv[r] = __ldcs(kp + (t + r) * (D / 8));
          vv[r] = __ldcs(vp + (t + r) * (D / 8));
        } else {
          kv[r] = make_uint4(0, 0, 0, 0);
          vv[r] = kv[r];
        }
      }
      if (sk != nullptr) {
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
          if (t + r < rows) {
            sk[(t + r) * (D / 8)] = kv[r];
            sv[(t + r) * (D / 8)] = vv[r];
          }
        }
      }
      float s[kTile][G];
#pragma unroll
      for (int r = 0; r < kTile; ++r) {
        float kf[8];
        Unpack8<kBf16>(kv[r], kf);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(qr[j][e], kf[e], dot);
          s[r][j] = dot;
        }
      }
#pragma unroll
      for (int off = kLanesPerKey / 2; off > 0; off /= 2)
#pragma unroll
        for (int r = 0; r < kTile; ++r)
#pragma unroll
          for (int j = 0; j < G; ++j) s[r][j] += __shfl_xor_sync(0xffffffffu, s[r][j], off);
      if (t >= rows) continue;  // no shuffles below
      float vf[kTile][8];
#pragma unroll
      for (int r = 0; r < kTile; ++r) Unpack8<kBf16>(vv[r], vf[r]);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        float mt = -INFINITY;
#pragma unroll
        for (int r = 0; r < kTile; ++r)
          if (t + r < rows) mt = fmaxf(mt, s[r][j]);
        const float mn = fmaxf(m[j], mt);
        const float c = exp2f(m[j] - mn);
        l[j] *= c;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] *= c;
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
          if (t + r >= rows) continue;
          const float p = exp2f(s[r][j] - mn);
          l[j] += p;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(p, vf[r][e], acc[j][e]);
        }
        m[j] = mn;
      }
    }
  }

  __shared__ float sm_m[kSlots][G], sm_l[kSlots][G];
  __shared__ float sm_acc[kSlots][G][D];
  const int slot = warp * kKeysPerWarp + sub;
#pragma unroll
  for (int j = 0; j < G; ++j) {
    if (sl == 0) {
      sm_m[slot][j] = m[j];
      sm_l[slot][j] = l[j];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[slot][j][sl * 8 + e] = acc[j][e];
  }
  __syncthreads();
  const int64_t part = (int64_t{head} * splits + split) * G;
  CombineSlots<D, G, kSlots>(sm_m, sm_l, sm_acc, fold.part_out + part * D, fold.part_lse + part);
  FoldSplitsIfLast<D, G>(fold, head);
}

// Estimation zone: one warp per listed cluster at a time; lanes cover D with float4.
template <int D, int G>
__global__ void __launch_bounds__(kThreads)
    EstimateKernel(const float* __restrict__ q, float scale2, const float* __restrict__ centroids,
                   const float* __restrict__ value_sums, const int32_t* __restrict__ sizes,
                   int64_t cluster_stride, const int32_t* __restrict__ clusters,
                   const int32_t* __restrict__ counts, int64_t list_stride, int64_t cps,
                   const FoldArgs fold, const HeadMeta* __restrict__ meta) {
  constexpr int kLanes = D / 4;
  const int head = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  // In a chain of dependent launches: let the next op's blocks be scheduled now, then wait for
  // the op before (both no-ops for a plain launch).
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool active = lane < kLanes;
  const int64_t begin = split * cps;
  const int64_t end = min(static_cast<int64_t>(counts[head]), begin + cps);
  // This head's meta index (a batched launch: its descriptor).
  const float* cen = meta != nullptr ? meta[head].centroids : centroids + head * cluster_stride * D;
  const float* vs =
      meta != nullptr ? meta[head].value_sums : value_sums + head * cluster_stride * D;
  const int32_t* sz = meta != nullptr ? meta[head].sizes : sizes + head * cluster_stride;
  const int32_t* list = clusters + head * list_stride;
  float qr[G][4], m[G], l[G], acc[G][4];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      qr[j][e] = active ? q[(head * G + j) * D + lane * 4 + e] * scale2 : 0.f;
      acc[j][e] = 0.f;
    }
  }
  for (int64_t i = begin + warp; i < end; i += kWarps) {
    const int32_t c = list[i];
    const int32_t size = sz[c];
    float4 cv = make_float4(0, 0, 0, 0), vv = cv;
    if (active) {
      cv = reinterpret_cast<const float4*>(cen + int64_t{c} * D)[lane];
      vv = reinterpret_cast<const float4*>(vs + int64_t{c} * D)[lane];
    }
    float s[G];
#pragma unroll
    for (int j = 0; j < G; ++j)
      s[j] = qr[j][0] * cv.x + qr[j][1] * cv.y + qr[j][2] * cv.z + qr[j][3] * cv.w;
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int j = 0; j < G; ++j) s[j] += __shfl_xor_sync(0xffffffffu, s[j], off);
    if (size <= 0) continue;
    const float lw = log2f(static_cast<float>(size));
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float mn = fmaxf(m[j], s[j] + lw);
      const float cf = exp2f(m[j] - mn);
      const float p = exp2f(s[j] - mn);  // weight of the value sum
      l[j] = l[j] * cf + p * static_cast<float>(size);
      acc[j][0] = acc[j][0] * cf + p * vv.x;
      acc[j][1] = acc[j][1] * cf + p * vv.y;
      acc[j][2] = acc[j][2] * cf + p * vv.z;
      acc[j][3] = acc[j][3] * cf + p * vv.w;
      m[j] = mn;
    }
  }
  __shared__ float sm_m[kWarps][G], sm_l[kWarps][G];
  __shared__ float sm_acc[kWarps][G][D];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    if (lane == 0) {
      sm_m[warp][j] = m[j];
      sm_l[warp][j] = l[j];
    }
    if (active)
#pragma unroll
      for (int e = 0; e < 4; ++e) sm_acc[warp][j][lane * 4 + e] = acc[j][e];
  }
  __syncthreads();
  const int64_t part = (int64_t{head} * splits + split) * G;
  CombineSlots<D, G, kWarps>(sm_m, sm_l, sm_acc, fold.part_out + part * D, fold.part_lse + part);
  FoldSplitsIfLast<D, G>(fold, head);
}

__global__ void MergeLseKernel(float* __restrict__ out_a, float* __restrict__ lse_a,
                               const float* __restrict__ out_b, const float* __restrict__ lse_b,
                               int rows, int d) {
  const int row = blockIdx.x;
  const float la = lse_a[row], lb = lse_b[row];
  const float mx = fmaxf(la, lb);
  __syncthreads();
  if (mx == -INFINITY) return;
  const float wa = __expf(la - mx), wb = __expf(lb - mx);
  const float z = wa + wb;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    const int64_t i = int64_t{row} * d + e;
    out_a[i] = (wa * out_a[i] + wb * out_b[i]) / z;
  }
  __syncthreads();
  if (threadIdx.x == 0) lse_a[row] = mx + logf(z);
}

__global__ void GatherKernel(const void* const* __restrict__ src, void* const* __restrict__ dst,
                             const int32_t* __restrict__ bytes, int64_t count) {
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    const uint4* s = static_cast<const uint4*>(src[i]);
    uint4* t = static_cast<uint4*>(dst[i]);
    const int n = bytes[i] / 16;
    for (int k = threadIdx.x; k < n; k += blockDim.x) t[k] = __ldcs(s + k);
  }
}

// GatherKernel with the copy engine of each SM (1D bulk copies, sm_90): thread 0 issues the
// reads of kBulkStages pieces into shared memory, each completing on its mbarrier, then the block
// writes them out. For comparing how fast the two kinds of reads pull mapped host memory over
// PCIe. REQUIRES: 16-byte aligned pieces of at most kBulkMaxBytes, sizes a multiple of 16.
constexpr int kBulkStages = 4;
constexpr int kBulkMaxBytes = 16384;

__device__ __forceinline__ uint32_t SharedAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__global__ void GatherBulkKernel(const void* const* __restrict__ src, void* const* __restrict__ dst,
                                 const int32_t* __restrict__ bytes, int64_t count) {
  extern __shared__ __align__(128) unsigned char buf[];  // kBulkStages x kBulkMaxBytes
  __shared__ __align__(8) uint64_t bar[kBulkStages];
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SharedAddr(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  uint32_t parity = 0;
  for (int64_t i0 = int64_t{blockIdx.x} * kBulkStages; i0 < count;
       i0 += int64_t{gridDim.x} * kBulkStages, parity ^= 1) {
    const int pieces = static_cast<int>(min(int64_t{kBulkStages}, count - i0));
    if (threadIdx.x == 0) {
      for (int s = 0; s < pieces; ++s) {
        const uint32_t b = SharedAddr(&bar[s]), n = static_cast<uint32_t>(bytes[i0 + s]);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(n)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
            "[%3];" ::"r"(SharedAddr(buf + s * kBulkMaxBytes)),
            "l"(__cvta_generic_to_global(src[i0 + s])), "r"(n), "r"(b)
            : "memory");
      }
    }
    for (int s = 0; s < pieces; ++s) {
      uint32_t done = 0;
      while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
            "selp.b32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(SharedAddr(&bar[s])), "r"(parity)
            : "memory");
      }
      const uint4* from = reinterpret_cast<const uint4*>(buf + s * kBulkMaxBytes);
      uint4* to = static_cast<uint4*>(dst[i0 + s]);
      for (int k = threadIdx.x; k < bytes[i0 + s] / 16; k += blockDim.x) to[k] = from[k];
    }
    __syncthreads();  // the buffers are free again
  }
}

FoldArgs SplitFold(float* ws, int heads, int g, int d, int splits, uint32_t* arrivals, float* out,
                   float* lse) {
  FoldArgs f;
  f.splits = splits;
  f.part_out = ws;
  f.part_lse = ws + int64_t{heads} * splits * g * d;
  f.arrivals = arrivals;
  f.out = out;
  f.lse = lse;
  return f;
}

template <int D, int G>
cudaError_t LaunchExactTyped(const ExactArgs& a, int splits, int64_t pps, float* ws,
                             uint32_t* arrivals, cudaStream_t stream) {
  FoldArgs f = SplitFold(ws, a.heads, G, D, splits, arrivals, a.out, a.lse);
  f.extra_out = a.extra_out;
  f.extra_lse = a.extra_lse;
  f.extra_ready = a.extra_ready;
  f.extra_seq = a.extra_seq;
  const float scale2 = a.scale * kLog2e;
  auto* sk = static_cast<uint4*>(a.stash_k);
  auto* sv = static_cast<uint4*>(a.stash_v);
  const uint32_t* ready = a.chain != nullptr ? a.chain->pages_ready : nullptr;
  const uint32_t seq = a.chain != nullptr ? a.chain->seq : 0;
  LaunchConfig l(dim3(splits, a.heads), kThreads, 0, stream, 0, a.chain != nullptr);
  return a.kv_type == DType::kBF16
             ? cudaLaunchKernelEx(&l.config, ExactKernel<D, G, true>, a.q, scale2, a.pages,
                                  a.page_offsets, a.page_counts, pps, sk, sv, ready, seq, f)
             : cudaLaunchKernelEx(&l.config, ExactKernel<D, G, false>, a.q, scale2, a.pages,
                                  a.page_offsets, a.page_counts, pps, sk, sv, ready, seq, f);
}

template <int D, int G>
cudaError_t LaunchEstimateTyped(const EstimateArgs& a, int splits, int64_t cps, float* ws,
                                uint32_t* arrivals, cudaStream_t stream) {
  FoldArgs f = SplitFold(ws, a.heads, G, D, splits, arrivals, a.out, a.lse);
  f.ready = a.ready;
  f.ready_seq = a.ready_seq;
  LaunchConfig l(dim3(splits, a.heads), kThreads, 0, stream, 0, a.chain != nullptr);
  return cudaLaunchKernelEx(&l.config, EstimateKernel<D, G>, a.q, a.scale * kLog2e, a.centroids,
                            a.value_sums, a.sizes, a.cluster_stride, a.clusters, a.counts,
                            a.list_stride, cps, f, a.heads_meta);
}

// Dispatches to F::template Run<D, G>(args...) for the supported (d, g); false otherwise.
template <template <int, int> class F, typename... Args>
bool Dispatch(int d, int g, cudaError_t& err, Args&&... args) {
#define KVWAVE_CASE(D, G) \
  if (d == D && g == G) return err = F<D, G>::Run(args...), true;
  // clang-format off (a run of macro calls, which clang-format 14 does not lay out stably)
  KVWAVE_CASE(64, 1)
  KVWAVE_CASE(64, 2)
  KVWAVE_CASE(64, 4)
  KVWAVE_CASE(64, 8)
  KVWAVE_CASE(128, 1)
  KVWAVE_CASE(128, 2)
  KVWAVE_CASE(128, 4)
  KVWAVE_CASE(128, 8)
  // clang-format on
#undef KVWAVE_CASE
  return false;
}

template <int D, int G>
struct ExactRunner {
  static cudaError_t Run(const ExactArgs& a, int splits, int64_t pps, float* ws, uint32_t* arrivals,
                         cudaStream_t s) {
    return LaunchExactTyped<D, G>(a, splits, pps, ws, arrivals, s);
  }
};

template <int D, int G>
struct EstimateRunner {
  static cudaError_t Run(const EstimateArgs& a, int splits, int64_t cps, float* ws,
                         uint32_t* arrivals, cudaStream_t s) {
    return LaunchEstimateTyped<D, G>(a, splits, cps, ws, arrivals, s);
  }
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool ExactSupported(int d, int g, DType kv_type) {
  return (d == 64 || d == 128) && (g == 1 || g == 2 || g == 4 || g == 8) &&
         (kv_type == DType::kBF16 || kv_type == DType::kF16);
}

int ExactSplits(int heads, int64_t max_pages_per_head, int pages_per_split, int sm_count) {
  if (max_pages_per_head <= 0 || heads <= 0) return 1;
  int64_t pps = pages_per_split;
  if (pps <= 0) {
    const int64_t want = CeilDiv(int64_t{sm_count} * 8, heads);  // ~8 blocks per SM
    pps = std::max<int64_t>(32, CeilDiv(max_pages_per_head, want));
  }
  return static_cast<int>(CeilDiv(max_pages_per_head, pps));
}

size_t ExactWorkspaceBytes(int heads, int g, int d, int splits) {
  return sizeof(float) * size_t(heads) * splits * g * (d + 1);
}

cudaError_t LaunchExactAttention(const ExactArgs& a, int splits, float* workspace,
                                 uint32_t* arrivals, cudaStream_t stream) {
  const int64_t pps = CeilDiv(std::max<int64_t>(a.max_pages_per_head, 1), splits);
  cudaError_t err = cudaErrorInvalidValue;
  Dispatch<ExactRunner>(a.d, a.g, err, a, splits, pps, workspace, arrivals, stream);
  return err;
}

int EstimateSplits(int heads, int64_t max_clusters, int sm_count) {
  if (max_clusters <= 0 || heads <= 0) return 1;
  const int64_t want = CeilDiv(int64_t{sm_count} * 4, heads);
  const int64_t cps = std::max<int64_t>(64, CeilDiv(max_clusters, want));
  return static_cast<int>(CeilDiv(max_clusters, cps));
}

size_t EstimateWorkspaceBytes(int heads, int g, int d, int splits) {
  return ExactWorkspaceBytes(heads, g, d, splits);
}

cudaError_t LaunchEstimateAttention(const EstimateArgs& a, int64_t max_clusters, int splits,
                                    float* workspace, uint32_t* arrivals, cudaStream_t stream) {
  const int64_t cps = CeilDiv(std::max<int64_t>(max_clusters, 1), splits);
  cudaError_t err = cudaErrorInvalidValue;
  Dispatch<EstimateRunner>(a.d, a.g, err, a, splits, cps, workspace, arrivals, stream);
  return err;
}

cudaError_t LaunchMergeLse(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                           int rows, int d, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  MergeLseKernel<<<rows, std::min(d, 256), 0, stream>>>(out_a, lse_a, out_b, lse_b, rows, d);
  return cudaGetLastError();
}

cudaError_t LaunchGatherPages(const void* const* src, void* const* dst, const int32_t* bytes,
                              int64_t count, int64_t max_bytes, bool bulk, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  if (bulk) {
    if (max_bytes > kBulkMaxBytes) return cudaErrorInvalidValue;
    constexpr int kSmem = kBulkStages * kBulkMaxBytes;
    static const cudaError_t attr =
        cudaFuncSetAttribute(GatherBulkKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (attr != cudaSuccess) return attr;
    const int blocks =
        static_cast<int>(std::min<int64_t>((count + kBulkStages - 1) / kBulkStages, 65535));
    GatherBulkKernel<<<blocks, 128, kSmem, stream>>>(src, dst, bytes, count);
    return cudaGetLastError();
  }
  const int threads = static_cast<int>(std::clamp<int64_t>(max_bytes / 16, 32, 256));
  const int blocks = static_cast<int>(std::min<int64_t>(count, 65535));
  GatherKernel<<<blocks, threads, 0, stream>>>(src, dst, bytes, count);
  return cudaGetLastError();
}

}  // namespace kvwave::gpu::cuda
