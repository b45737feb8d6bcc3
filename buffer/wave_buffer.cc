#include "buffer/wave_buffer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "buffer/pinned_allocator.h"
#include "config/status_macros.h"
#include "tbb/parallel_for.h"

namespace kvwave::buffer {
namespace {

constexpr int kPageRows = gpu::kMaxPageRows;
constexpr int kComputeStream = 0, kCopyStream = 1;
constexpr int kLayerDoneEvent = 0;  // + parity
constexpr int kAdmitDoneEvent = 2;  // + parity

size_t Align16(size_t x) { return (x + 15) & ~size_t{15}; }

// Offsets of the arrays inside one pinned staging blob (mirrored on the device).
struct BlobLayout {
  size_t pages = 0, offsets = 0, src = 0, dst = 0, bytes = 0, total = 0;
  BlobLayout(int64_t num_pages, int heads, int64_t gathers) {
    offsets = Align16(pages + sizeof(gpu::PageRef) * num_pages);
    src = Align16(offsets + sizeof(int32_t) * (heads + 1));
    dst = Align16(src + sizeof(void*) * gathers);
    bytes = Align16(dst + sizeof(void*) * gathers);
    total = Align16(bytes + sizeof(int32_t) * gathers);
  }
};

}  // namespace

void StepStats::Add(const StepStats& o) {
  hit_clusters += o.hit_clusters;
  miss_clusters += o.miss_clusters;
  hit_pages += o.hit_pages;
  miss_pages += o.miss_pages;
  pcie_bytes += o.pcie_bytes;
  exact_rows += o.exact_rows;
  score_us += o.score_us;
  wait_commit_us += o.wait_commit_us;
  classify_us += o.classify_us;
  launch_us += o.launch_us;
}

struct WaveBuffer::Half {
  gpu::DeviceBuffer ret, est, counts, counts2, exec_k, exec_v, blob_dev, admit_dev;
  store::HostBuffer ret_host, blob_host, admit_host;
  BlobLayout blob{0, 0, 0}, admit{0, 0, 0};
  std::vector<std::vector<CachedCluster>> hits;
  std::vector<std::vector<MissCluster>> misses;
  std::vector<std::vector<int32_t>> exec_first;  // first execution-buffer page of each miss
  int64_t gathers = 0;
  int layer = 0;

  int32_t* ret_list(int head, int64_t stride) {
    return reinterpret_cast<int32_t*>(ret_host.data()) + head * stride;
  }
  int32_t ret_count(int head, int heads, int64_t stride) {
    return reinterpret_cast<int32_t*>(ret_host.data())[heads * stride + head];
  }
  template <typename T>
  T* at(size_t off) {
    return reinterpret_cast<T*>(blob_host.data() + off);
  }
};

WaveBuffer::WaveBuffer(gpu::CudaBackend* backend, const WaveBufferOptions& options,
                       std::vector<UnitLayout> units)
    : backend_(backend),
      o_(options),
      units_(std::move(units)),
      policy_(options.cache_bytes /
              std::max<int64_t>(1, 2 * kPageRows * options.d * ElementSize(options.dtype))) {}

WaveBuffer::~WaveBuffer() {
  if (committer_ != nullptr) committer_->Drain();
  (void)backend_->Synchronize(kCopyStream);
  (void)backend_->Synchronize(kComputeStream);
}

absl::StatusOr<std::unique_ptr<WaveBuffer>> WaveBuffer::Create(gpu::CudaBackend* backend,
                                                               const WaveBufferOptions& options,
                                                               std::vector<UnitLayout> units) {
  if (options.layers <= 0 || options.heads <= 0 || options.clusters <= 0 ||
      units.size() != size_t(options.layers) * options.heads || options.max_cluster_pages < 1)
    return absl::InvalidArgumentError("WaveBuffer: bad shape or unit count");
  std::unique_ptr<WaveBuffer> wb(new WaveBuffer(backend, options, std::move(units)));
  KVWAVE_RETURN_IF_ERROR(wb->Init());
  return wb;
}

absl::Status WaveBuffer::Init() {
  const int64_t C = o_.clusters, U = static_cast<int64_t>(units_.size()), d = o_.d;
  row_bytes_ = d * ElementSize(o_.dtype);
  page_bytes_ = row_bytes_ * kPageRows;
  r_ = std::min<int64_t>(C, static_cast<int64_t>(std::ceil(o_.retrieval * C)));
  e_ = std::min<int64_t>(C - r_, static_cast<int64_t>(std::ceil(o_.estimation * C)));
  list_stride_ = std::max<int64_t>({r_, e_, 1});
  int32_t steady_rows = 0;
  for (const UnitLayout& u : units_) steady_rows = std::max(steady_rows, u.steady_rows);
  steady_pages_ = (steady_rows + kPageRows - 1) / kPageRows;
  max_pages_per_head_ = steady_pages_ + r_ * o_.max_cluster_pages;
  max_miss_pages_ = int64_t{o_.heads} * r_ * o_.max_cluster_pages;

  // Meta index and steady zone, resident on the GPU.
  const size_t meta = sizeof(float) * U * C * d,
               steady = row_bytes_ * steady_pages_ * kPageRows * U;
  KVWAVE_ASSIGN_OR_RETURN(centroids_, backend_->Allocate(meta));
  KVWAVE_ASSIGN_OR_RETURN(value_sums_, backend_->Allocate(meta));
  KVWAVE_ASSIGN_OR_RETURN(sizes_, backend_->Allocate(sizeof(int32_t) * U * C));
  KVWAVE_ASSIGN_OR_RETURN(steady_k_, backend_->Allocate(std::max<size_t>(steady, 16)));
  KVWAVE_ASSIGN_OR_RETURN(steady_v_, backend_->Allocate(std::max<size_t>(steady, 16)));
  for (int64_t u = 0; u < U; ++u) {
    const UnitLayout& x = units_[u];
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(centroids_.as<float>() + u * C * d, x.centroids, sizeof(float) * C * d));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(value_sums_.as<float>() + u * C * d, x.value_sums, sizeof(float) * C * d));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(sizes_.as<int32_t>() + u * C, x.sizes, sizeof(int32_t) * C));
    const size_t off = row_bytes_ * steady_pages_ * kPageRows * u;
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(steady_k_.as<std::byte>() + off, x.steady_k, row_bytes_ * x.steady_rows));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(steady_v_.as<std::byte>() + off, x.steady_v, row_bytes_ * x.steady_rows));
  }
  const int64_t pool = policy_.num_pages();
  KVWAVE_ASSIGN_OR_RETURN(pool_k_, backend_->Allocate(std::max<size_t>(page_bytes_ * pool, 16)));
  KVWAVE_ASSIGN_OR_RETURN(pool_v_, backend_->Allocate(std::max<size_t>(page_bytes_ * pool, 16)));
  KVWAVE_ASSIGN_OR_RETURN(scores_, backend_->Allocate(sizeof(float) * o_.heads * C));
  const size_t rows = sizeof(float) * o_.heads * o_.g;
  KVWAVE_ASSIGN_OR_RETURN(est_out_, backend_->Allocate(rows * d));
  KVWAVE_ASSIGN_OR_RETURN(est_lse_, backend_->Allocate(rows));

  store::HostAllocator* pinned = PinnedAllocator();
  for (int p = 0; p < 2; ++p) {
    auto h = std::make_unique<Half>();
    const size_t list = sizeof(int32_t) * o_.heads * list_stride_;
    KVWAVE_ASSIGN_OR_RETURN(h->ret, backend_->Allocate(list));
    KVWAVE_ASSIGN_OR_RETURN(h->est, backend_->Allocate(list));
    KVWAVE_ASSIGN_OR_RETURN(h->counts, backend_->Allocate(sizeof(int32_t) * o_.heads));
    KVWAVE_ASSIGN_OR_RETURN(h->counts2, backend_->Allocate(sizeof(int32_t) * o_.heads));
    KVWAVE_ASSIGN_OR_RETURN(h->exec_k, backend_->Allocate(page_bytes_ * max_miss_pages_ + 16));
    KVWAVE_ASSIGN_OR_RETURN(h->exec_v, backend_->Allocate(page_bytes_ * max_miss_pages_ + 16));
    KVWAVE_ASSIGN_OR_RETURN(h->ret_host,
                            store::HostBuffer::Allocate(pinned, list + sizeof(int32_t) * o_.heads));
    h->blob = BlobLayout(int64_t{o_.heads} * max_pages_per_head_, o_.heads, 2 * max_miss_pages_);
    h->admit = BlobLayout(0, 0, 2 * max_miss_pages_);
    KVWAVE_ASSIGN_OR_RETURN(h->blob_host, store::HostBuffer::Allocate(pinned, h->blob.total));
    KVWAVE_ASSIGN_OR_RETURN(h->blob_dev, backend_->Allocate(h->blob.total));
    KVWAVE_ASSIGN_OR_RETURN(h->admit_host, store::HostBuffer::Allocate(pinned, h->admit.total));
    KVWAVE_ASSIGN_OR_RETURN(h->admit_dev, backend_->Allocate(h->admit.total));
    h->hits.resize(o_.heads);
    h->misses.resize(o_.heads);
    h->exec_first.resize(o_.heads);
    halves_.push_back(std::move(h));
  }
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  committer_ = std::make_unique<AsyncCommitter>();
  return absl::OkStatus();
}

int32_t WaveBuffer::PagesOf(int64_t unit, int32_t c) const {
  return (units_[unit].sizes[c] + kPageRows - 1) / kPageRows;
}

int32_t WaveBuffer::RowsOfPage(int64_t unit, int32_t c, int32_t page) const {
  return std::min(kPageRows, units_[unit].sizes[c] - page * kPageRows);
}

absl::Status WaveBuffer::ScoreAndSelect(int layer, const float* q, Half& h) {
  const int64_t C = o_.clusters, unit0 = int64_t{layer} * o_.heads;
  gpu::ScoreArgs s;
  s.q = q;
  s.heads = o_.heads;
  s.g = o_.g;
  s.d = o_.d;
  s.scale = 1.0f / std::sqrt(static_cast<float>(o_.d));
  s.centroids = centroids_.as<float>() + unit0 * C * o_.d;
  s.centroid_stride = C * o_.d;
  s.sizes = sizes_.as<int32_t>() + unit0 * C;
  s.size_stride = C;
  s.n = C;
  s.scores = scores_.as<float>();
  s.score_stride = C;
  KVWAVE_RETURN_IF_ERROR(backend_->ScoreClusters(s, kComputeStream));
  gpu::TopKArgs t;
  t.scores = scores_.as<float>();
  t.heads = o_.heads;
  t.n = C;
  t.score_stride = C;
  t.k = r_;
  t.k2 = r_ + e_;
  t.out = h.ret.as<int32_t>();
  t.out2 = h.est.as<int32_t>();
  t.out_stride = list_stride_;
  t.counts = h.counts.as<int32_t>();
  t.counts2 = h.counts2.as<int32_t>();
  KVWAVE_RETURN_IF_ERROR(backend_->SelectTopK(t, kComputeStream));
  const size_t list = sizeof(int32_t) * o_.heads * list_stride_;
  KVWAVE_RETURN_IF_ERROR(backend_->Copy(h.ret_host.data(), h.ret.data(), list, kComputeStream));
  KVWAVE_RETURN_IF_ERROR(backend_->Copy(h.ret_host.data() + list, h.counts.data(),
                                        sizeof(int32_t) * o_.heads, kComputeStream));
  return backend_->Synchronize(kComputeStream);
}

void WaveBuffer::Classify(int layer, Half& h, StepStats* stats) {
  h.layer = layer;
  tbb::parallel_for(0, o_.heads, [&](int head) {
    const int64_t unit = int64_t{layer} * o_.heads + head;
    h.hits[head].clear();
    h.misses[head].clear();
    std::span<const int32_t> list(h.ret_list(head, list_stride_),
                                  h.ret_count(head, o_.heads, list_stride_));
    policy_.Classify(
        static_cast<int32_t>(unit), list, [&](int32_t c) { return PagesOf(unit, c); }, h.hits[head],
        h.misses[head]);
  });
  auto* pages = h.at<gpu::PageRef>(h.blob.pages);
  auto* offsets = h.at<int32_t>(h.blob.offsets);
  auto* src = h.at<const void*>(h.blob.src);
  auto* dst = h.at<void*>(h.blob.dst);
  auto* bytes = h.at<int32_t>(h.blob.bytes);
  int64_t np = 0, ng = 0, exec = 0;
  StepStats st;
  auto add = [&](const void* k, const void* v, int32_t rows) {
    pages[np++] = gpu::PageRef{k, v, rows, 0};
    st.exact_rows += rows;
  };
  for (int head = 0; head < o_.heads; ++head) {
    const int64_t unit = int64_t{layer} * o_.heads + head;
    const UnitLayout& u = units_[unit];
    offsets[head] = static_cast<int32_t>(np);
    for (int64_t p = 0; p < steady_pages_ && p * kPageRows < u.steady_rows; ++p) {
      const size_t off = row_bytes_ * (steady_pages_ * kPageRows * unit + p * kPageRows);
      add(steady_k_.as<std::byte>() + off, steady_v_.as<std::byte>() + off,
          std::min<int32_t>(kPageRows, u.steady_rows - p * kPageRows));
    }
    for (const CachedCluster& c : h.hits[head]) {
      for (size_t p = 0; p < c.slots.size(); ++p)
        add(pool_k_.as<std::byte>() + page_bytes_ * c.slots[p],
            pool_v_.as<std::byte>() + page_bytes_ * c.slots[p], RowsOfPage(unit, c.cluster, p));
      ++st.hit_clusters;
      st.hit_pages += static_cast<int64_t>(c.slots.size());
    }
    h.exec_first[head].clear();
    for (const MissCluster& m : h.misses[head]) {
      h.exec_first[head].push_back(static_cast<int32_t>(exec));
      for (int32_t p = 0; p < m.pages; ++p, ++exec) {
        const int32_t rows = RowsOfPage(unit, m.cluster, p);
        const int64_t row = u.cluster_row[m.cluster] + int64_t{p} * kPageRows;
        std::byte* ek = h.exec_k.as<std::byte>() + page_bytes_ * exec;
        std::byte* ev = h.exec_v.as<std::byte>() + page_bytes_ * exec;
        add(ek, ev, rows);
        src[ng] = u.k + row_bytes_ * row, dst[ng] = ek, bytes[ng++] = rows * row_bytes_;
        src[ng] = u.v + row_bytes_ * row, dst[ng] = ev, bytes[ng++] = rows * row_bytes_;
        st.pcie_bytes += 2 * rows * static_cast<int64_t>(row_bytes_);
      }
      ++st.miss_clusters;
      st.miss_pages += m.pages;
    }
  }
  offsets[o_.heads] = static_cast<int32_t>(np);
  h.gathers = ng;
  if (stats != nullptr) *stats = st;
}

absl::Status WaveBuffer::Attend(int layer, const float* q, float* out, float* lse, Half& h) {
  const int parity = static_cast<int>(calls_ % 2);
  KVWAVE_RETURN_IF_ERROR(
      backend_->Copy(h.blob_dev.data(), h.blob_host.data(), h.blob.total, kComputeStream));
  // The execution-buffer half is free once call n-2's admission copies have read it.
  KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kComputeStream, kAdmitDoneEvent + parity));
  std::byte* blob = h.blob_dev.as<std::byte>();
  KVWAVE_RETURN_IF_ERROR(
      backend_->GatherPages(reinterpret_cast<const void* const*>(blob + h.blob.src),
                            reinterpret_cast<void* const*>(blob + h.blob.dst),
                            reinterpret_cast<const int32_t*>(blob + h.blob.bytes), h.gathers,
                            static_cast<int64_t>(page_bytes_), kComputeStream));
  const float scale = 1.0f / std::sqrt(static_cast<float>(o_.d));
  gpu::ExactArgs x;
  x.q = q;
  x.heads = o_.heads;
  x.g = o_.g;
  x.d = o_.d;
  x.scale = scale;
  x.kv_type = o_.dtype;
  x.pages = reinterpret_cast<const gpu::PageRef*>(blob + h.blob.pages);
  x.page_offsets = reinterpret_cast<const int32_t*>(blob + h.blob.offsets);
  x.max_pages_per_head = max_pages_per_head_;
  x.out = out;
  x.lse = lse;
  KVWAVE_RETURN_IF_ERROR(backend_->ExactAttention(x, kComputeStream));
  const int64_t C = o_.clusters, unit0 = int64_t{layer} * o_.heads;
  gpu::EstimateArgs e;
  e.q = q;
  e.heads = o_.heads;
  e.g = o_.g;
  e.d = o_.d;
  e.scale = scale;
  e.centroids = centroids_.as<float>() + unit0 * C * o_.d;
  e.value_sums = value_sums_.as<float>() + unit0 * C * o_.d;
  e.sizes = sizes_.as<int32_t>() + unit0 * C;
  e.cluster_stride = C;
  e.clusters = h.est.as<int32_t>();
  e.counts = h.counts2.as<int32_t>();
  e.list_stride = list_stride_;
  e.out = est_out_.as<float>();
  e.lse = est_lse_.as<float>();
  KVWAVE_RETURN_IF_ERROR(backend_->EstimateAttention(e, kComputeStream));
  KVWAVE_RETURN_IF_ERROR(backend_->MergeLse(out, lse, est_out_.as<float>(), est_lse_.as<float>(),
                                            o_.heads * o_.g, o_.d, kComputeStream));
  return backend_->RecordEvent(kLayerDoneEvent + parity, kComputeStream);
}

void WaveBuffer::SubmitCommit(int layer, int parity) {
  Half* h = halves_[parity].get();
  tickets_.push_back(committer_->Submit([this, h, layer, parity] {
    // The admission blob of this half was last read by call n-2's copies.
    (void)backend_->SynchronizeEvent(kAdmitDoneEvent + parity);
    auto* src = reinterpret_cast<const void**>(h->admit_host.data() + h->admit.src);
    auto* dst = reinterpret_cast<void**>(h->admit_host.data() + h->admit.dst);
    auto* bytes = reinterpret_cast<int32_t*>(h->admit_host.data() + h->admit.bytes);
    int64_t n = 0;
    std::vector<std::vector<int32_t>> hit_ids(o_.heads);
    std::vector<WavePolicy::CommitItem> items(o_.heads);
    for (int head = 0; head < o_.heads; ++head) {
      for (const CachedCluster& c : h->hits[head]) hit_ids[head].push_back(c.cluster);
      items[head] = {static_cast<int32_t>(int64_t{layer} * o_.heads + head), hit_ids[head],
                     h->misses[head]};
    }
    const auto admitted_all = policy_.CommitMany(items);
    for (int head = 0; head < o_.heads; ++head) {
      const int64_t unit = int64_t{layer} * o_.heads + head;
      const auto& misses = h->misses[head];
      size_t m = 0;  // admitted is a subsequence of misses, in order
      for (const CachedCluster& a : admitted_all[head]) {
        while (misses[m].cluster != a.cluster) ++m;
        const int32_t first = h->exec_first[head][m];
        for (size_t p = 0; p < a.slots.size(); ++p) {
          const int32_t rows = RowsOfPage(unit, a.cluster, static_cast<int32_t>(p));
          const size_t from = page_bytes_ * (first + p), to = page_bytes_ * a.slots[p];
          src[n] = h->exec_k.as<std::byte>() + from, dst[n] = pool_k_.as<std::byte>() + to;
          bytes[n++] = rows * static_cast<int32_t>(row_bytes_);
          src[n] = h->exec_v.as<std::byte>() + from, dst[n] = pool_v_.as<std::byte>() + to;
          bytes[n++] = rows * static_cast<int32_t>(row_bytes_);
        }
      }
    }
    absl::Status s = backend_->WaitEvent(kCopyStream, kLayerDoneEvent + parity);
    if (s.ok() && n > 0) {
      s = backend_->Copy(h->admit_dev.data(), h->admit_host.data(), h->admit.total, kCopyStream);
      std::byte* blob = h->admit_dev.as<std::byte>();
      if (s.ok())
        s = backend_->GatherPages(reinterpret_cast<const void* const*>(blob + h->admit.src),
                                  reinterpret_cast<void* const*>(blob + h->admit.dst),
                                  reinterpret_cast<const int32_t*>(blob + h->admit.bytes), n,
                                  static_cast<int64_t>(page_bytes_), kCopyStream);
    }
    if (s.ok()) s = backend_->RecordEvent(kAdmitDoneEvent + parity, kCopyStream);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (error_.ok()) error_ = s;
    }
  }));
}

absl::Status WaveBuffer::AttendLayer(int layer, const float* q, float* out, float* lse,
                                     StepStats* stats) {
  if (layer < 0 || layer >= o_.layers) return absl::InvalidArgumentError("bad layer");
  const int parity = static_cast<int>(calls_ % 2);
  Half& h = *halves_[parity];
  using Clock = std::chrono::steady_clock;
  auto us = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };
  const auto t0 = Clock::now();
  KVWAVE_RETURN_IF_ERROR(ScoreAndSelect(layer, q, h));
  const auto t1 = Clock::now();
  if (calls_ > 0) committer_->WaitFor(tickets_[calls_ - 1]);  // see commit(n-1)
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    KVWAVE_RETURN_IF_ERROR(error_);
  }
  const auto t2 = Clock::now();
  StepStats local;
  Classify(layer, h, &local);
  const auto t3 = Clock::now();
  KVWAVE_RETURN_IF_ERROR(Attend(layer, q, out, lse, h));
  const auto t4 = Clock::now();
  local.score_us = us(t0, t1);
  local.wait_commit_us = us(t1, t2);
  local.classify_us = us(t2, t3);
  local.launch_us = us(t3, t4);
  if (stats != nullptr) *stats = local;
  SubmitCommit(layer, parity);
  ++calls_;
  return absl::OkStatus();
}

absl::Status WaveBuffer::Finish() {
  committer_->Drain();
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kCopyStream));
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  std::lock_guard<std::mutex> lock(error_mu_);
  return error_;
}

}  // namespace kvwave::buffer
