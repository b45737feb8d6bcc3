// The wave buffer's per-layer planning on the GPU: retrieved clusters -> page list of the exact
// attention, using the GPU-resident cluster -> pool-slot table (no CPU round trip), and the
// scatter that applies the CPU committer's table updates.
//
// PlanKernel: one block per KV head. The steady pages come first; then the retrieved clusters are
// taken in tiles of kPlanThreads, one thread per cluster: a block-wide exclusive scan of the page
// counts (and of the missed clusters' page counts) gives every cluster its place in the page list
// and, for a miss, its first execution page.
#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "gpu/cuda/launchers.h"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads) PlanKernel(PlanArgs a) {
  using Scan = cub::BlockScan<int2, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int2 carry;  // pages so far (after the steady ones), exec pages so far
  const int h = blockIdx.x;
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
  for (int t0 = 0; t0 < n; t0 += kPlanThreads) {
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
