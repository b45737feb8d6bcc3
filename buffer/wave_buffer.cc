#include "buffer/wave_buffer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/pinned_allocator.h"
#include "config/dtype.h"
#include "config/status_macros.h"

namespace kvwave::buffer {
namespace {

constexpr int kPageRows = gpu::kMaxPageRows;
constexpr int kComputeStream = 0, kRecordStream = 1, kSideStream = 2, kUpdateStream = 3;
constexpr int kPlannedEvent = 0;                       // + slot: plan queued (stream C)
constexpr int kRecordEvent = WaveBuffer::kRing;        // + slot: record on the host
constexpr int kUpdateEvent = 2 * WaveBuffer::kRing;    // + slot: update done (stream U)
constexpr int kJoinEvent = 3 * WaveBuffer::kRing + 1;  // estimation done (S; unfused path)
constexpr int kDoneEvent = 4 * WaveBuffer::kRing;      // + slot: call done (stream C)
constexpr int kProfileEvent = 5 * WaveBuffer::kRing;   // .. + 5

size_t Align16(size_t x) { return (x + 15) & ~size_t{15}; }

using Clock = std::chrono::steady_clock;
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// Offsets of the arrays of one update (admission copies and table writes) in a staging blob.
struct UpdateLayout {
  size_t src = 0, dst = 0, bytes = 0, index = 0, value = 0, total = 0;
  UpdateLayout(int64_t copies, int64_t writes) {
    dst = Align16(src + sizeof(void*) * copies);
    bytes = Align16(dst + sizeof(void*) * copies);
    index = Align16(bytes + sizeof(int32_t) * copies);
    value = Align16(index + sizeof(int64_t) * writes);
    total = Align16(value + sizeof(int32_t) * writes);
  }
};

}  // namespace

struct WaveBuffer::Slot {
  // Device: the lists of SelectTopK, the page list of PlanPages, the execution buffer.
  gpu::DeviceBuffer ret, est, counts, counts2, pages, page_counts, info, exec_k, exec_v;
  gpu::DeviceBuffer update_dev;
  // Pinned host: the record of the call (counts, then (cluster, exec page) pairs), the update.
  store::HostBuffer record, update;
  UpdateLayout layout{0, 0};
  bool update_pending = false;  // an update was queued from `update` (event kUpdateEvent + slot)
};

WaveBuffer::WaveBuffer(gpu::CudaBackend* backend, const WaveBufferOptions& options,
                       std::vector<UnitLayout> units)
    : backend_(backend),
      o_(options),
      units_(std::move(units)),
      pages_per_layer_(
          options.cache_bytes /
          std::max<int64_t>(1, 2 * kPageRows * options.d * ElementSize(options.dtype)) /
          std::max(1, options.layers)) {}

WaveBuffer::~WaveBuffer() {
  for (auto& c : committers_) c->Drain();
  (void)backend_->Synchronize(kRecordStream);
  (void)backend_->Synchronize(kSideStream);
  (void)backend_->Synchronize(kUpdateStream);
  (void)backend_->Synchronize(kComputeStream);
}

absl::StatusOr<std::unique_ptr<WaveBuffer>> WaveBuffer::Create(gpu::CudaBackend* backend,
                                                               const WaveBufferOptions& options,
                                                               std::vector<UnitLayout> units) {
  if (options.layers <= 0 || options.heads <= 0 || options.clusters <= 0 ||
      units.size() != size_t(options.layers) * options.heads || options.max_cluster_pages < 1)
    return absl::InvalidArgumentError("WaveBuffer: bad shape or unit count");
  const int64_t max_rows = int64_t{options.max_cluster_pages} * kPageRows;
  for (const UnitLayout& u : units) {
    for (int64_t c = 0; c < options.clusters; ++c) {
      if (u.sizes[c] < 0 || u.sizes[c] > max_rows)
        return absl::InvalidArgumentError(absl::StrCat("WaveBuffer: cluster of ", u.sizes[c],
                                                       " tokens passes max_cluster_pages (",
                                                       options.max_cluster_pages, ")"));
    }
  }
  std::unique_ptr<WaveBuffer> wb(new WaveBuffer(backend, options, std::move(units)));
  KVWAVE_RETURN_IF_ERROR(wb->Init());
  return wb;
}

absl::Status WaveBuffer::Init() {
  const int64_t C = o_.clusters, U = static_cast<int64_t>(units_.size()), d = o_.d;
  const int P = o_.max_cluster_pages;
  row_bytes_ = d * ElementSize(o_.dtype);
  page_bytes_ = row_bytes_ * kPageRows;
  r_ = std::min<int64_t>(C, static_cast<int64_t>(std::ceil(o_.retrieval * C)));
  e_ = std::min<int64_t>(C - r_, static_cast<int64_t>(std::ceil(o_.estimation * C)));
  list_stride_ = std::max<int64_t>({r_, e_, 1});
  int32_t steady_rows = 0;
  for (const UnitLayout& u : units_) steady_rows = std::max(steady_rows, u.steady_rows);
  steady_pages_ = (steady_rows + kPageRows - 1) / kPageRows;
  steady_stride_rows_ = steady_pages_ * kPageRows;
  max_pages_per_head_ = steady_pages_ + r_ * P;
  exec_pages_ = int64_t{o_.heads} * std::max<int64_t>(r_, 1) * P;
  // An update admits at most exec_pages_ pages (one table write each) and evicts at most as many
  // clusters (each frees at least one page): 2 * exec_pages_ table writes, 2 copies (K, V) a page.
  max_updates_ = 2 * exec_pages_;

  // Meta index, steady zone, layout tables: resident on the GPU.
  const size_t meta = sizeof(float) * U * C * d, steady = row_bytes_ * steady_stride_rows_ * U;
  KVWAVE_ASSIGN_OR_RETURN(centroids_, backend_->Allocate(meta));
  if (o_.bf16_scores) {
    KVWAVE_ASSIGN_OR_RETURN(centroids16_, backend_->Allocate(meta / 2));
  }
  std::vector<uint16_t> bf16(o_.bf16_scores ? C * d : 0);
  KVWAVE_ASSIGN_OR_RETURN(value_sums_, backend_->Allocate(meta));
  KVWAVE_ASSIGN_OR_RETURN(sizes_, backend_->Allocate(sizeof(int32_t) * U * C));
  KVWAVE_ASSIGN_OR_RETURN(cluster_row_, backend_->Allocate(sizeof(int64_t) * U * C));
  KVWAVE_ASSIGN_OR_RETURN(host_ptrs_, backend_->Allocate(2 * sizeof(void*) * U));
  KVWAVE_ASSIGN_OR_RETURN(steady_rows_, backend_->Allocate(sizeof(int32_t) * U));
  KVWAVE_ASSIGN_OR_RETURN(steady_k_, backend_->Allocate(std::max<size_t>(steady, 16)));
  KVWAVE_ASSIGN_OR_RETURN(steady_v_, backend_->Allocate(std::max<size_t>(steady, 16)));
  KVWAVE_ASSIGN_OR_RETURN(table_, backend_->Allocate(sizeof(int32_t) * U * C * P));
  KVWAVE_RETURN_IF_ERROR(backend_->Memset(table_.data(), 0xFF, table_.size()));  // -1: not cached
  std::vector<const void*> ptrs(2 * U);
  std::vector<int32_t> srows(U);
  for (int64_t u = 0; u < U; ++u) {
    const UnitLayout& x = units_[u];
    ptrs[u] = x.k;
    ptrs[U + u] = x.v;
    srows[u] = x.steady_rows;
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(centroids_.as<float>() + u * C * d, x.centroids, sizeof(float) * C * d));
    if (o_.bf16_scores) {  // pageable source: the copy has read it when Copy returns
      FromFloat(x.centroids, DType::kBF16, bf16.data(), bf16.size());
      KVWAVE_RETURN_IF_ERROR(backend_->Copy(centroids16_.as<uint16_t>() + u * C * d, bf16.data(),
                                            sizeof(uint16_t) * C * d));
    }
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(value_sums_.as<float>() + u * C * d, x.value_sums, sizeof(float) * C * d));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(sizes_.as<int32_t>() + u * C, x.sizes, sizeof(int32_t) * C));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(cluster_row_.as<int64_t>() + u * C, x.cluster_row, sizeof(int64_t) * C));
    const size_t off = row_bytes_ * steady_stride_rows_ * u;
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(steady_k_.as<std::byte>() + off, x.steady_k, row_bytes_ * x.steady_rows));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(steady_v_.as<std::byte>() + off, x.steady_v, row_bytes_ * x.steady_rows));
  }
  KVWAVE_RETURN_IF_ERROR(backend_->Copy(host_ptrs_.data(), ptrs.data(), sizeof(void*) * 2 * U));
  KVWAVE_RETURN_IF_ERROR(backend_->Copy(steady_rows_.data(), srows.data(), sizeof(int32_t) * U));
  std::vector<int32_t> offsets(o_.heads);
  for (int h = 0; h < o_.heads; ++h) offsets[h] = static_cast<int32_t>(h * max_pages_per_head_);
  KVWAVE_ASSIGN_OR_RETURN(page_offsets_, backend_->Allocate(sizeof(int32_t) * o_.heads));
  KVWAVE_RETURN_IF_ERROR(
      backend_->Copy(page_offsets_.data(), offsets.data(), sizeof(int32_t) * o_.heads));

  const int64_t pool = pool_pages();
  for (int l = 0; l < o_.layers; ++l)
    policies_.push_back(std::make_unique<WavePolicy>(pages_per_layer_, o_.heads, C, P));
  layer_mu_ = std::make_unique<std::mutex[]>(o_.layers);
  last_call_slot_.assign(o_.layers, -1);
  last_update_slot_.assign(o_.layers, -1);
  KVWAVE_ASSIGN_OR_RETURN(pool_k_, backend_->Allocate(std::max<size_t>(page_bytes_ * pool, 16)));
  KVWAVE_ASSIGN_OR_RETURN(pool_v_, backend_->Allocate(std::max<size_t>(page_bytes_ * pool, 16)));
  KVWAVE_ASSIGN_OR_RETURN(scores_, backend_->Allocate(sizeof(float) * o_.heads * C));
  const size_t rows = sizeof(float) * o_.heads * o_.g;
  KVWAVE_ASSIGN_OR_RETURN(est_out_, backend_->Allocate(rows * d));
  KVWAVE_ASSIGN_OR_RETURN(est_lse_, backend_->Allocate(rows));
  KVWAVE_ASSIGN_OR_RETURN(est_ready_, backend_->Allocate(sizeof(uint32_t) * o_.heads * o_.g));
  KVWAVE_RETURN_IF_ERROR(backend_->Memset(est_ready_.data(), 0, est_ready_.size()));
  if (o_.fused_select && o_.chain) {  // the chained launches' own scratch (see gpu::ChainArgs)
    KVWAVE_ASSIGN_OR_RETURN(pages_ready_, backend_->Allocate(sizeof(uint32_t) * o_.heads));
    KVWAVE_RETURN_IF_ERROR(backend_->Memset(pages_ready_.data(), 0, pages_ready_.size()));
    KVWAVE_ASSIGN_OR_RETURN(arrivals_, backend_->Allocate(sizeof(uint32_t) * 2 * o_.heads));
    KVWAVE_RETURN_IF_ERROR(backend_->Memset(arrivals_.data(), 0, arrivals_.size()));
    gpu::ExactArgs x;
    x.heads = o_.heads;
    x.g = o_.g;
    x.d = o_.d;
    x.max_pages_per_head = max_pages_per_head_;
    x.pages_per_split = o_.exact_pages_per_split;
    KVWAVE_ASSIGN_OR_RETURN(exact_scratch_, backend_->Allocate(backend_->ExactScratchBytes(x)));
    gpu::EstimateArgs e;
    e.heads = o_.heads;
    e.g = o_.g;
    e.d = o_.d;
    e.list_stride = list_stride_;
    KVWAVE_ASSIGN_OR_RETURN(est_scratch_, backend_->Allocate(backend_->EstimateScratchBytes(e)));
  }

  store::HostAllocator* pinned = PinnedAllocator();
  const size_t list = sizeof(int32_t) * o_.heads * list_stride_;
  const size_t record = sizeof(int32_t) * o_.heads * (1 + 2 * std::max<int64_t>(r_, 1));
  for (int i = 0; i < kRing; ++i) {
    auto s = std::make_unique<Slot>();
    KVWAVE_ASSIGN_OR_RETURN(s->ret, backend_->Allocate(list));
    KVWAVE_ASSIGN_OR_RETURN(s->est, backend_->Allocate(list));
    KVWAVE_ASSIGN_OR_RETURN(s->counts, backend_->Allocate(record));  // counts, then info
    KVWAVE_ASSIGN_OR_RETURN(s->counts2, backend_->Allocate(sizeof(int32_t) * o_.heads));
    KVWAVE_ASSIGN_OR_RETURN(
        s->pages, backend_->Allocate(sizeof(gpu::PageRef) * o_.heads * max_pages_per_head_));
    KVWAVE_ASSIGN_OR_RETURN(s->page_counts, backend_->Allocate(sizeof(int32_t) * o_.heads));
    KVWAVE_ASSIGN_OR_RETURN(s->exec_k, backend_->Allocate(page_bytes_ * exec_pages_));
    KVWAVE_ASSIGN_OR_RETURN(s->exec_v, backend_->Allocate(page_bytes_ * exec_pages_));
    KVWAVE_ASSIGN_OR_RETURN(s->record, store::HostBuffer::Allocate(pinned, record));
    s->layout = UpdateLayout(2 * exec_pages_, max_updates_);
    KVWAVE_ASSIGN_OR_RETURN(s->update, store::HostBuffer::Allocate(pinned, s->layout.total));
    KVWAVE_ASSIGN_OR_RETURN(s->update_dev, backend_->Allocate(s->layout.total));
    slots_.push_back(std::move(s));
  }
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  for (int i = 0; i < kRing; ++i) committers_.push_back(std::make_unique<AsyncCommitter>());
  return absl::OkStatus();
}

int32_t WaveBuffer::PagesOf(int64_t unit, int32_t c) const {
  return (units_[unit].sizes[c] + kPageRows - 1) / kPageRows;
}

int32_t WaveBuffer::RowsOfPage(int64_t unit, int32_t c, int32_t page) const {
  return std::min(kPageRows, units_[unit].sizes[c] - page * kPageRows);
}

absl::Status WaveBuffer::Enqueue(int layer, const float* q, float* out, float* lse, Slot& s) {
  const int slot = static_cast<int>(calls_ % kRing);
  const int64_t C = o_.clusters, unit0 = int64_t{layer} * o_.heads;
  const uint32_t seq = static_cast<uint32_t>(calls_) + 1;  // this call's number in ready words
  const bool chain = o_.fused_select && o_.chain;
  const float scale = 1.0f / std::sqrt(static_cast<float>(o_.d));
  auto profile = [&](int i) {
    return o_.profile ? backend_->RecordEvent(kProfileEvent + i, kComputeStream) : absl::OkStatus();
  };
  // The layer's last update (its table and pool) and this slot's last update (reads of the
  // execution buffer this call overwrites) run on stream U: wait for them.
  if (last_update_slot_[layer] >= 0)
    KVWAVE_RETURN_IF_ERROR(
        backend_->WaitEvent(kComputeStream, kUpdateEvent + last_update_slot_[layer]));
  if (s.update_pending)
    KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kComputeStream, kUpdateEvent + slot));
  last_call_slot_[layer] = slot;
  // Profiling: hold the stream while this call is queued, so that the phases time the kernels,
  // not the host's launch gaps.
  if (o_.profile) KVWAVE_RETURN_IF_ERROR(backend_->Delay(int64_t{500} * 1000, kComputeStream));
  KVWAVE_RETURN_IF_ERROR(profile(0));
  gpu::ScoreArgs sc;
  sc.q = q;
  sc.heads = o_.heads;
  sc.g = o_.g;
  sc.d = o_.d;
  sc.scale = scale;
  sc.centroids = centroids_.as<float>() + unit0 * C * o_.d;
  if (o_.bf16_scores) sc.centroids_bf16 = centroids16_.as<uint16_t>() + unit0 * C * o_.d;
  sc.centroid_stride = C * o_.d;
  sc.sizes = sizes_.as<int32_t>() + unit0 * C;
  sc.size_stride = C;
  sc.n = C;
  sc.scores = scores_.as<float>();
  sc.score_stride = C;
  gpu::TopKArgs t;
  t.scores = scores_.as<float>();
  t.heads = o_.heads;
  t.n = C;
  t.score_stride = C;
  t.k = r_;
  t.k2 = r_ + e_;
  t.out = s.ret.as<int32_t>();
  t.out2 = s.est.as<int32_t>();
  t.out_stride = list_stride_;
  t.counts = s.counts.as<int32_t>();
  t.counts2 = s.counts2.as<int32_t>();
  gpu::PlanArgs pl;
  pl.heads = o_.heads;
  pl.unit0 = unit0;
  pl.clusters = C;
  pl.max_cluster_pages = o_.max_cluster_pages;
  pl.retrieved = s.ret.as<int32_t>();
  pl.counts = s.counts.as<int32_t>();
  pl.list_stride = list_stride_;
  pl.table = table_.as<int32_t>();
  pl.sizes = sizes_.as<int32_t>();
  pl.cluster_row = cluster_row_.as<int64_t>();
  const int64_t U = static_cast<int64_t>(units_.size());
  pl.k_host = host_ptrs_.as<const void*>();
  pl.v_host = host_ptrs_.as<const void*>() + U;
  pl.steady_k = steady_k_.data();
  pl.steady_v = steady_v_.data();
  pl.steady_rows = steady_rows_.as<int32_t>();
  pl.steady_stride_rows = steady_stride_rows_;
  pl.pool_k = pool_k_.data();
  pl.pool_v = pool_v_.data();
  pl.row_bytes = static_cast<int64_t>(row_bytes_);
  pl.max_pages_per_head = max_pages_per_head_;
  pl.pages = s.pages.as<gpu::PageRef>();
  pl.page_counts = s.page_counts.as<int32_t>();
  pl.info = s.counts.as<int32_t>() + o_.heads;
  pl.info_stride = std::max<int64_t>(r_, 1);
  if (chain) {  // the plan writes the record straight to the host (complete with the call)
    auto* record = reinterpret_cast<int32_t*>(s.record.data());
    pl.record_counts = record;
    pl.info = record + o_.heads;
    pl.pages_ready = pages_ready_.as<uint32_t>();
    pl.seq = seq;
  }
  if (o_.fused_select) {
    // Scores, both zones' lists and the plan in one op (profiled as "score"; top-k and plan 0).
    KVWAVE_RETURN_IF_ERROR(backend_->ScoreSelectPlan(sc, t, pl, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(profile(1));
    KVWAVE_RETURN_IF_ERROR(profile(2));
  } else {
    KVWAVE_RETURN_IF_ERROR(backend_->ScoreClusters(sc, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(profile(1));
    KVWAVE_RETURN_IF_ERROR(backend_->SelectTopK(t, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(profile(2));
    KVWAVE_RETURN_IF_ERROR(backend_->PlanPages(pl, kComputeStream));
  }
  // Chained: estimation and exact attention follow on stream C as dependent launches, scheduled
  // as the selection ends (the exact attention's blocks wait for their head's pages_ready word);
  // no event between them. Else the record (counts + (cluster, exec page) pairs) goes to the
  // host on stream X and the estimation zone runs on stream S, both after an event.
  int est_stream = kComputeStream;
  if (!chain) {
    KVWAVE_RETURN_IF_ERROR(backend_->RecordEvent(kPlannedEvent + slot, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kRecordStream, kPlannedEvent + slot));
    KVWAVE_RETURN_IF_ERROR(
        backend_->Copy(s.record.data(), s.counts.data(), s.record.size(), kRecordStream));
    KVWAVE_RETURN_IF_ERROR(backend_->RecordEvent(kRecordEvent + slot, kRecordStream));
    KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kSideStream, kPlannedEvent + slot));
    est_stream = kSideStream;
  }
  KVWAVE_RETURN_IF_ERROR(profile(3));

  // The estimation zone runs beside the exact attention (which mostly waits for PCIe); with the
  // fused select, the exact attention's last block of each head merges it once its ready words
  // carry this call's number.
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
  e.clusters = s.est.as<int32_t>();
  e.counts = s.counts2.as<int32_t>();
  e.list_stride = list_stride_;
  e.out = est_out_.as<float>();
  e.lse = est_lse_.as<float>();
  if (o_.fused_select) {
    e.ready = est_ready_.as<uint32_t>();
    e.ready_seq = seq;
  }
  gpu::ChainArgs est_chain, exact_chain;
  if (chain) {
    est_chain.scratch = est_scratch_.as<float>();
    est_chain.arrivals = arrivals_.as<uint32_t>();
    e.chain = &est_chain;
    exact_chain.scratch = exact_scratch_.as<float>();
    exact_chain.arrivals = arrivals_.as<uint32_t>() + o_.heads;
    exact_chain.pages_ready = pages_ready_.as<uint32_t>();
    exact_chain.seq = seq;
  }
  KVWAVE_RETURN_IF_ERROR(backend_->EstimateAttention(e, est_stream));
  if (!o_.fused_select) KVWAVE_RETURN_IF_ERROR(backend_->RecordEvent(kJoinEvent, kSideStream));

  gpu::ExactArgs x;
  x.q = q;
  x.heads = o_.heads;
  x.g = o_.g;
  x.d = o_.d;
  x.scale = scale;
  x.kv_type = o_.dtype;
  x.pages = s.pages.as<gpu::PageRef>();
  x.page_offsets = page_offsets_.as<int32_t>();
  x.page_counts = s.page_counts.as<int32_t>();
  x.max_pages_per_head = max_pages_per_head_;
  x.pages_per_split = o_.exact_pages_per_split;  // small: the misses' reads need many in flight
  x.stash_k = s.exec_k.data();
  x.stash_v = s.exec_v.data();
  x.out = out;
  x.lse = lse;
  if (o_.fused_select) {  // the estimation zone is merged with the splits
    x.extra_out = est_out_.as<float>();
    x.extra_lse = est_lse_.as<float>();
    x.extra_ready = est_ready_.as<uint32_t>();
    x.extra_seq = seq;
    if (chain) x.chain = &exact_chain;
    KVWAVE_RETURN_IF_ERROR(backend_->ExactAttention(x, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(profile(4));
    KVWAVE_RETURN_IF_ERROR(profile(5));
    return backend_->RecordEvent(kDoneEvent + slot, kComputeStream);
  }
  KVWAVE_RETURN_IF_ERROR(backend_->ExactAttention(x, kComputeStream));
  KVWAVE_RETURN_IF_ERROR(profile(4));
  KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kComputeStream, kJoinEvent));
  KVWAVE_RETURN_IF_ERROR(backend_->MergeLse(out, lse, est_out_.as<float>(), est_lse_.as<float>(),
                                            o_.heads * o_.g, o_.d, kComputeStream));
  KVWAVE_RETURN_IF_ERROR(profile(5));
  return backend_->RecordEvent(kDoneEvent + slot, kComputeStream);
}

absl::Status WaveBuffer::WaitForRecord(int slot_index) {
  // Chained, the plan wrote the record straight to the host: it is complete with the call.
  return backend_->SynchronizeEvent((o_.fused_select && o_.chain ? kDoneEvent : kRecordEvent) +
                                    slot_index);
}

void WaveBuffer::Commit(int layer, int slot_index) {
  const auto t0 = Clock::now();
  Slot& s = *slots_[slot_index];
  absl::Status status = WaitForRecord(slot_index);
  // The staging of this slot's previous update must have been copied to the device.
  if (status.ok() && s.update_pending)
    status = backend_->SynchronizeEvent(kUpdateEvent + slot_index);
  const auto t1 = Clock::now();
  if (!status.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) error_ = status;
    return;
  }
  const int64_t C = o_.clusters, P = o_.max_cluster_pages, stride = std::max<int64_t>(r_, 1);
  const int32_t* counts = reinterpret_cast<const int32_t*>(s.record.data());
  const int32_t* info = counts + o_.heads;
  WaveCounters add;
  std::vector<std::vector<int32_t>> hits(o_.heads);
  std::vector<std::vector<MissCluster>> misses(o_.heads);
  std::vector<std::vector<int32_t>> exec_first(o_.heads);
  std::vector<WavePolicy::CommitItem> items(o_.heads);
  for (int h = 0; h < o_.heads; ++h) {
    const int64_t unit = int64_t{layer} * o_.heads + h;
    add.exact_rows += units_[unit].steady_rows;
    for (int32_t i = 0; i < counts[h]; ++i) {
      const int32_t c = info[2 * (h * stride + i)], exec = info[2 * (h * stride + i) + 1];
      const int32_t pages = PagesOf(unit, c);
      add.exact_rows += units_[unit].sizes[c];
      if (exec < 0) {
        hits[h].push_back(c);
        ++add.hit_clusters;
        add.hit_pages += pages;
      } else {
        misses[h].push_back({c, pages});
        exec_first[h].push_back(exec);
        ++add.miss_clusters;
        add.miss_pages += pages;
        add.pcie_bytes += 2 * int64_t{units_[unit].sizes[c]} * static_cast<int64_t>(row_bytes_);
      }
    }
    items[h] = {h, hits[h], misses[h]};  // the layer's policy numbers its units 0..heads-1
  }
  std::vector<WavePolicy::Evicted> evicted;
  WavePolicy& policy = *policies_[layer];
  const int64_t slot0 = pages_per_layer_ * layer;            // the layer's share of the pool
  std::lock_guard<std::mutex> layer_lock(layer_mu_[layer]);  // decisions and updates in order
  const PolicyStats before = policy.stats();
  const auto admitted = policy.CommitMany(items, &evicted);
  const PolicyStats after = policy.stats();
  add.stale_hits = add.hit_clusters - (after.hits - before.hits);

  // The update: admission copies exec -> pool, then table writes (evictions, admissions), laid
  // out for its actual sizes (one short H2D copy).
  int64_t admitted_pages = 0;
  for (int h = 0; h < o_.heads; ++h)
    for (const CachedCluster& a : admitted[h])
      admitted_pages += static_cast<int64_t>(a.slots.size());
  const UpdateLayout layout(2 * admitted_pages,
                            static_cast<int64_t>(evicted.size()) + admitted_pages);
  KVWAVE_CHECK(layout.total <= s.layout.total);
  auto* src = reinterpret_cast<const void**>(s.update.data() + layout.src);
  auto* dst = reinterpret_cast<void**>(s.update.data() + layout.dst);
  auto* bytes = reinterpret_cast<int32_t*>(s.update.data() + layout.bytes);
  auto* index = reinterpret_cast<int64_t*>(s.update.data() + layout.index);
  auto* value = reinterpret_cast<int32_t*>(s.update.data() + layout.value);
  int64_t n = 0, w = 0;
  for (const WavePolicy::Evicted& ev : evicted) {
    index[w] = ((int64_t{layer} * o_.heads + ev.unit) * C + ev.cluster) * P;
    value[w++] = -1;
  }
  for (int h = 0; h < o_.heads; ++h) {
    const int64_t unit = int64_t{layer} * o_.heads + h;
    size_t m = 0;  // admitted is a subsequence of misses, in order
    for (const CachedCluster& a : admitted[h]) {
      while (misses[h][m].cluster != a.cluster) ++m;
      const int32_t first = exec_first[h][m];
      for (size_t p = 0; p < a.slots.size(); ++p) {
        const int32_t rows = RowsOfPage(unit, a.cluster, static_cast<int32_t>(p));
        const int64_t slot = slot0 + a.slots[p];
        const size_t from = page_bytes_ * (first + p), to = page_bytes_ * slot;
        src[n] = s.exec_k.as<std::byte>() + from, dst[n] = pool_k_.as<std::byte>() + to;
        bytes[n++] = rows * static_cast<int32_t>(row_bytes_);
        src[n] = s.exec_v.as<std::byte>() + from, dst[n] = pool_v_.as<std::byte>() + to;
        bytes[n++] = rows * static_cast<int32_t>(row_bytes_);
        index[w] = (unit * C + a.cluster) * P + static_cast<int64_t>(p);
        value[w++] = static_cast<int32_t>(slot);
      }
    }
  }
  KVWAVE_CHECK(n <= 2 * exec_pages_ && w <= max_updates_);
  if (n > 0 || w > 0) {
    // On stream U, after this layer's latest call (which may still read the slots and table
    // entries this update rewrites, and whose execution buffer it copies from); the layer's next
    // call and this slot's next call wait for it (Enqueue). Off the compute stream, it overlaps
    // the calls of other layers.
    std::lock_guard<std::mutex> lock(enqueue_mu_);  // between two calls, never inside one
    std::byte* blob = s.update_dev.as<std::byte>();
    status = backend_->WaitEvent(kUpdateStream, kDoneEvent + last_call_slot_[layer]);
    if (status.ok()) status = backend_->Copy(blob, s.update.data(), layout.total, kUpdateStream);
    if (status.ok())
      status = backend_->GatherPages(reinterpret_cast<const void* const*>(blob + layout.src),
                                     reinterpret_cast<void* const*>(blob + layout.dst),
                                     reinterpret_cast<const int32_t*>(blob + layout.bytes), n,
                                     static_cast<int64_t>(page_bytes_), kUpdateStream);
    if (status.ok())
      status = backend_->ScatterInt32(
          table_.as<int32_t>(), reinterpret_cast<const int64_t*>(blob + layout.index),
          reinterpret_cast<const int32_t*>(blob + layout.value), w, kUpdateStream);
    if (status.ok()) status = backend_->RecordEvent(kUpdateEvent + slot_index, kUpdateStream);
    if (status.ok()) last_update_slot_[layer] = slot_index;
    s.update_pending = status.ok();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok() && error_.ok()) error_ = status;
  counters_.hit_clusters += add.hit_clusters;
  counters_.miss_clusters += add.miss_clusters;
  counters_.hit_pages += add.hit_pages;
  counters_.miss_pages += add.miss_pages;
  counters_.stale_hits += add.stale_hits;
  counters_.pcie_bytes += add.pcie_bytes;
  counters_.exact_rows += add.exact_rows;
  counters_.record_wait_us += Us(t0, t1);
  counters_.commit_us += Us(t1, Clock::now());
}

absl::Status WaveBuffer::AttendLayer(int layer, const float* q, float* out, float* lse) {
  if (layer < 0 || layer >= o_.layers) return absl::InvalidArgumentError("bad layer");
  const int slot = static_cast<int>(calls_ % kRing);
  const auto t0 = Clock::now();
  if (calls_ >= kRing) committers_[slot]->WaitFor(tickets_[slot]);  // call n - kRing's job
  {
    std::lock_guard<std::mutex> lock(mu_);
    KVWAVE_RETURN_IF_ERROR(error_);
  }
  const auto t1 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    KVWAVE_RETURN_IF_ERROR(Enqueue(layer, q, out, lse, *slots_[slot]));
  }
  const auto t2 = Clock::now();
  tickets_[slot] = committers_[slot]->Submit([this, layer, slot] { Commit(layer, slot); });
  ++calls_;
  double phase[5] = {0, 0, 0, 0, 0};
  if (o_.profile) {
    KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
    for (int i = 0; i < 5; ++i) {
      KVWAVE_ASSIGN_OR_RETURN(float ms,
                              backend_->ElapsedMs(kProfileEvent + i, kProfileEvent + i + 1));
      phase[i] = ms;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++counters_.calls;
  counters_.wait_us += Us(t0, t1);
  counters_.enqueue_us += Us(t1, t2);
  counters_.score_ms += phase[0];
  counters_.topk_ms += phase[1];
  counters_.plan_ms += phase[2];
  counters_.exact_ms += phase[3];
  counters_.estimate_ms += phase[4];
  return absl::OkStatus();
}

absl::Status WaveBuffer::Finish() {
  for (auto& c : committers_) c->Drain();
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kRecordStream));
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kSideStream));
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kUpdateStream));
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

PolicyStats WaveBuffer::policy_stats() const {
  PolicyStats sum;
  for (const auto& p : policies_) {
    const PolicyStats s = p->stats();
    sum.hits += s.hits;
    sum.misses += s.misses;
    sum.hit_pages += s.hit_pages;
    sum.miss_pages += s.miss_pages;
    sum.admitted += s.admitted;
    sum.evicted += s.evicted;
    sum.overflow += s.overflow;
  }
  return sum;
}

WaveCounters WaveBuffer::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

}  // namespace kvwave::buffer
