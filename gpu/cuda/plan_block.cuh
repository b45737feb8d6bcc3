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

// Writes head h's steady pages at the front of its page list; returns their count. All threads.
__device__ __forceinline__ int PlanSteady(const PlanArgs& a, int h) {
  const int64_t unit = a.unit0 + h;
  const int64_t page_bytes = a.row_bytes * kMaxPageRows;
  PageRef* out = a.pages + h * a.max_pages_per_head;
  const int32_t steady = a.steady_rows[unit];
  const int steady_pages = (steady + kMaxPageRows - 1) / kMaxPageRows;
  const auto* sk = static_cast<const char*>(a.steady_k) + unit * a.steady_stride_rows * a.row_bytes;
  const auto* sv = static_cast<const char*>(a.steady_v) + unit * a.steady_stride_rows * a.row_bytes;
  for (int p = threadIdx.x; p < steady_pages; p += blockDim.x) {
    out[p] = PageRef{sk + p * page_bytes, sv + p * page_bytes,
                     min(kMaxPageRows, steady - p * kMaxPageRows), 0};
  }
  return steady_pages;
}

// Plans cluster c (size rows), retrieved at list position i of head h: its pages go to the page
// list from position `at`, from the pool slots `slots` when hit, else from the pinned host rows
// (landing in execution pages exec, exec + 1, ...), and its (cluster, exec page or -1) record.
__device__ __forceinline__ void PlanCluster(const PlanArgs& a, int h, int i, int c, int size,
                                            bool hit, int at, int64_t exec) {
  const int64_t unit = a.unit0 + h, uc = unit * a.clusters + c;
  const int64_t row_bytes = a.row_bytes, page_bytes = row_bytes * kMaxPageRows;
  PageRef* out = a.pages + h * a.max_pages_per_head;
  const int pages = (size + kMaxPageRows - 1) / kMaxPageRows;
  if (hit) {
    const int32_t* slots = a.table + uc * a.max_cluster_pages;
    const auto* pk = static_cast<const char*>(a.pool_k);
    const auto* pv = static_cast<const char*>(a.pool_v);
    for (int p = 0; p < pages; ++p) {
      out[at + p] = PageRef{pk + slots[p] * page_bytes, pv + slots[p] * page_bytes,
                            min(kMaxPageRows, size - p * kMaxPageRows), 0};
    }
  } else {
    const auto* hk = static_cast<const char*>(a.k_host[unit]);
    const auto* hv = static_cast<const char*>(a.v_host[unit]);
    const int64_t row0 = a.cluster_row[uc];
    for (int p = 0; p < pages; ++p) {
      const int64_t off = (row0 + int64_t{p} * kMaxPageRows) * row_bytes;
      out[at + p] = PageRef{hk + off, hv + off, min(kMaxPageRows, size - p * kMaxPageRows),
                            static_cast<int32_t>(exec + p + 1)};
    }
  }
  int32_t* rec = a.info + 2 * (h * a.info_stride + i);
  rec[0] = c;
  rec[1] = hit ? -1 : static_cast<int32_t>(exec);
}

// steady_pages >= 0: the steady pages are already written (by another block), this many.
template <int kThreads>
__device__ void PlanHead(const PlanArgs& a, int h, int steady_pages_written = -1) {
  using Scan = cub::BlockScan<int2, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int2 carry;  // pages so far (after the steady ones), exec pages so far
  const int64_t unit = a.unit0 + h;
  const int P = a.max_cluster_pages;
  const int steady_pages = steady_pages_written >= 0 ? steady_pages_written : PlanSteady(a, h);
  if (threadIdx.x == 0) carry = make_int2(steady_pages, 0);
  __syncthreads();

  const int n = a.counts[h];
  const int32_t* list = a.retrieved + h * a.list_stride;
  const int64_t exec0 = int64_t{h} * a.info_stride * P;
  for (int t0 = 0; t0 < n; t0 += kThreads) {
    const int i = t0 + threadIdx.x;
    int c = 0, size = 0, pages = 0;
    bool hit = false;
    if (i < n) {
      c = list[i];
      const int64_t uc = unit * a.clusters + c;
      size = a.sizes[uc];
      pages = (size + kMaxPageRows - 1) / kMaxPageRows;
      hit = a.table[uc * P] >= 0;
    }
    int2 mine = make_int2(pages, hit ? 0 : pages), before, total;
    Scan(scan_tmp).ExclusiveScan(
        mine, before, make_int2(0, 0),
        [](int2 x, int2 y) { return make_int2(x.x + y.x, x.y + y.y); }, total);
    const int2 base = carry;
    if (i < n) PlanCluster(a, h, i, c, size, hit, base.x + before.x, exec0 + base.y + before.y);
    __syncthreads();  // everyone has read carry
    if (threadIdx.x == 0) carry = make_int2(base.x + total.x, base.y + total.y);
    __syncthreads();
  }
  if (threadIdx.x == 0) a.page_counts[h] = carry.x;
}

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_PLAN_BLOCK_CUH_
