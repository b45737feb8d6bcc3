// The body of the wave buffer's page planning for one KV head, shared by PlanKernel
// (wave_plan.cu) and the fused select-and-plan kernel (scoring.cu). See PlanArgs.
//
// Called by all kThreads threads of a block. The steady pages come first; then the retrieved
// clusters are taken in tiles of kThreads, one thread per cluster: a block-wide exclusive scan of
// the page counts (and of the missed clusters' page counts) gives every cluster its place in the
// page list and, for a miss, its first execution page.
#ifndef KVWAVE_GPU_CUDA_PLAN_BLOCK_CUH_
#define KVWAVE_GPU_CUDA_PLAN_BLOCK_CUH_

#include <cub/block/block_scan.cuh>

#include "gpu/cuda_backend.h"

namespace kvwave::gpu::cuda {

// Head h's steady zone, sizes and cache keys: from its descriptor in a batched launch (HeadMeta),
// else at base + h * stride.
__device__ __forceinline__ const SteadyZone& SteadyOf(const PlanArgs& a, int h) {
  return a.heads_meta != nullptr ? *a.heads_meta[h].steady : a.steady[h];
}
__device__ __forceinline__ const int32_t* PlanSizesOf(const PlanArgs& a, int h) {
  return a.heads_meta != nullptr ? a.heads_meta[h].sizes : a.sizes + h * a.size_stride;
}
__device__ __forceinline__ const int32_t* PlanKeysOf(const PlanArgs& a, int h) {
  return a.heads_meta != nullptr ? a.heads_meta[h].keys : a.keys + h * a.key_stride;
}

// Writes head h's steady pages (SteadyZone: sinks, then the tail's ring cut at multiples of
// kMaxPageRows) at the front of its page list; returns their count. All threads.
__device__ __forceinline__ int PlanSteady(const PlanArgs& a, int h) {
  const SteadyZone z = SteadyOf(a, h);
  const int64_t row_bytes = a.row_bytes;
  PageRef* out = a.pages + h * a.max_pages_per_head;
  const int sink_pages = (z.sink_rows + kMaxPageRows - 1) / kMaxPageRows;
  const int total = static_cast<int>(SteadyZonePages(z));
  const auto* sk = static_cast<const char*>(z.sink_k);
  const auto* sv = static_cast<const char*>(z.sink_v);
  const auto* rk = static_cast<const char*>(z.ring_k);
  const auto* rv = static_cast<const char*>(z.ring_v);
  for (int p = threadIdx.x; p < total; p += blockDim.x) {
    if (p < sink_pages) {
      const int64_t off = int64_t{p} * kMaxPageRows * row_bytes;
      out[p] = PageRef{sk + off, sv + off, min(kMaxPageRows, z.sink_rows - p * kMaxPageRows), 0};
    } else {
      const int j = p - sink_pages;
      const int64_t page0 = z.first / kMaxPageRows + j;
      const int64_t start = j == 0 ? z.first : page0 * kMaxPageRows;
      const int64_t end = min(z.first + z.rows, (page0 + 1) * kMaxPageRows);
      const int64_t off = (start % z.ring_rows) * row_bytes;
      out[p] = PageRef{rk + off, rv + off, static_cast<int32_t>(end - start), 0};
    }
  }
  return total;
}

// Plans the cluster of key `key` (size rows), retrieved at list position i of head h: its pages
// go to the page list from position `at`, from the pool slots `slots` when hit, else from the
// pinned host rows (landing in execution pages exec, exec + 1, ...), and its (key, exec page or
// -1) record.
__device__ __forceinline__ void PlanCluster(const PlanArgs& a, int h, int i, int32_t key, int size,
                                            bool hit, int at, int64_t exec) {
  const int64_t row_bytes = a.row_bytes, page_bytes = row_bytes * kMaxPageRows;
  PageRef* out = a.pages + h * a.max_pages_per_head;
  const int pages = (size + kMaxPageRows - 1) / kMaxPageRows;
  if (hit) {
    const int32_t* slots = a.table + a.page_base[key];
    const auto* pk = static_cast<const char*>(a.pool_k);
    const auto* pv = static_cast<const char*>(a.pool_v);
    for (int p = 0; p < pages; ++p) {
      out[at + p] = PageRef{pk + slots[p] * page_bytes, pv + slots[p] * page_bytes,
                            min(kMaxPageRows, size - p * kMaxPageRows), 0};
    }
  } else {
    const auto* hk = static_cast<const char*>(a.key_k[key]);
    const auto* hv = static_cast<const char*>(a.key_v[key]);
    for (int p = 0; p < pages; ++p) {
      const int64_t off = int64_t{p} * page_bytes;
      out[at + p] = PageRef{hk + off, hv + off, min(kMaxPageRows, size - p * kMaxPageRows),
                            static_cast<int32_t>(exec + p + 1)};
    }
  }
  int32_t* rec = a.info + 2 * (h * a.info_stride + i);
  rec[0] = key;
  rec[1] = hit ? -1 : static_cast<int32_t>(exec);
}

// steady_pages >= 0: the steady pages are already written (by another block), this many.
template <int kThreads>
__device__ void PlanHead(const PlanArgs& a, int h, int steady_pages_written = -1) {
  using Scan = cub::BlockScan<int2, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int2 carry;  // pages so far (after the steady ones), exec pages so far
  __shared__ int rows;    // rows of the retrieved clusters so far
  const int steady_pages = steady_pages_written >= 0 ? steady_pages_written : PlanSteady(a, h);
  if (threadIdx.x == 0) carry = make_int2(steady_pages, 0), rows = 0;
  __syncthreads();

  const int n = a.counts[h];
  const int32_t* list = a.retrieved + h * a.list_stride;
  const int64_t exec0 = int64_t{h} * a.exec_stride;
  const int32_t* keys = PlanKeysOf(a, h);
  const int32_t* sizes = PlanSizesOf(a, h);
  for (int t0 = 0; t0 < n; t0 += kThreads) {
    const int i = t0 + threadIdx.x;
    int32_t key = 0;
    int size = 0, pages = 0;
    bool hit = false;
    if (i < n) {
      const int c = list[i];
      key = keys[c];
      size = sizes[c];
      pages = (size + kMaxPageRows - 1) / kMaxPageRows;
      hit = a.table[a.page_base[key]] >= 0;
    }
    int2 mine = make_int2(pages, hit ? 0 : pages), before, total;
    Scan(scan_tmp).ExclusiveScan(
        mine, before, make_int2(0, 0),
        [](int2 x, int2 y) { return make_int2(x.x + y.x, x.y + y.y); }, total);
    const int2 base = carry;
    if (i < n) {
      PlanCluster(a, h, i, key, size, hit, base.x + before.x, exec0 + base.y + before.y);
      if (a.record_rows != nullptr) atomicAdd(&rows, size);
    }
    __syncthreads();  // everyone has read carry
    if (threadIdx.x == 0) carry = make_int2(base.x + total.x, base.y + total.y);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    a.page_counts[h] = carry.x;
    if (a.record_rows != nullptr) a.record_rows[h] = rows;
  }
}

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_PLAN_BLOCK_CUH_
