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

template <int kThreads>
__device__ void PlanHead(const PlanArgs& a, int h) {
  using Scan = cub::BlockScan<int2, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int2 carry;  // pages so far (after the steady ones), exec pages so far
  const int64_t unit = a.unit0 + h;
  const int P = a.max_cluster_pages;
  PageRef* out = a.pages + h * a.max_pages_per_head;
  const int64_t row_bytes = a.row_bytes, page_bytes = row_bytes * kMaxPageRows;

  const int32_t steady = a.steady_rows[unit];
  const int steady_pages = (steady + kMaxPageRows - 1) / kMaxPageRows;
  const auto* sk = static_cast<const char*>(a.steady_k) + unit * a.steady_stride_rows * row_bytes;
  const auto* sv = static_cast<const char*>(a.steady_v) + unit * a.steady_stride_rows * row_bytes;
  for (int p = threadIdx.x; p < steady_pages; p += blockDim.x) {
    out[p] = PageRef{sk + p * page_bytes, sv + p * page_bytes,
                     min(kMaxPageRows, steady - p * kMaxPageRows), 0};
  }
  if (threadIdx.x == 0) carry = make_int2(steady_pages, 0);
  __syncthreads();

  const int n = a.counts[h];
  const int32_t* list = a.retrieved + h * a.list_stride;
  const auto* hk = static_cast<const char*>(a.k_host[unit]);
  const auto* hv = static_cast<const char*>(a.v_host[unit]);
  const auto* pk = static_cast<const char*>(a.pool_k);
  const auto* pv = static_cast<const char*>(a.pool_v);
  const int64_t exec0 = int64_t{h} * a.info_stride * P;
  for (int t0 = 0; t0 < n; t0 += kThreads) {
    const int i = t0 + threadIdx.x;
    int c = 0, size = 0, pages = 0;
    const int32_t* slots = nullptr;
    bool hit = false;
    if (i < n) {
      c = list[i];
      const int64_t uc = unit * a.clusters + c;
      size = a.sizes[uc];
      pages = (size + kMaxPageRows - 1) / kMaxPageRows;
      slots = a.table + uc * P;
      hit = slots[0] >= 0;
    }
    int2 mine = make_int2(pages, hit ? 0 : pages), before, total;
    Scan(scan_tmp).ExclusiveScan(
        mine, before, make_int2(0, 0),
        [](int2 x, int2 y) { return make_int2(x.x + y.x, x.y + y.y); }, total);
    const int2 base = carry;
    if (i < n) {
      const int at = base.x + before.x;
      const int64_t exec = exec0 + base.y + before.y;
      if (hit) {
        for (int p = 0; p < pages; ++p) {
          out[at + p] = PageRef{pk + slots[p] * page_bytes, pv + slots[p] * page_bytes,
                                min(kMaxPageRows, size - p * kMaxPageRows), 0};
        }
      } else {
        const int64_t row0 = a.cluster_row[unit * a.clusters + c];
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
    __syncthreads();  // everyone has read carry
    if (threadIdx.x == 0) carry = make_int2(base.x + total.x, base.y + total.y);
    __syncthreads();
  }
  if (threadIdx.x == 0) a.page_counts[h] = carry.x;
}

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_PLAN_BLOCK_CUH_
