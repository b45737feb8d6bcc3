#include "buffer/wave_buffer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/pinned_allocator.h"
#include "buffer/wave_buffer_internal.h"
#include "config/status_macros.h"
#include "gpu/budget.h"

namespace kvwave::buffer {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kMaxBatchHeads = 4096;
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// Offsets of the arrays of one update (admission copies and table writes) in a pinned blob that
// the update's kernels read in place (mapped memory).
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

// Grows a device buffer to at least `bytes` (contents dropped).
absl::Status Fit(gpu::CudaBackend& b, gpu::DeviceBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes && buf.data() != nullptr) return absl::OkStatus();
  buf.Reset();
  KVWAVE_ASSIGN_OR_RETURN(buf, b.Allocate(std::max<size_t>(bytes, 16)));
  return absl::OkStatus();
}

absl::Status FitHost(store::HostBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes && buf.data() != nullptr) return absl::OkStatus();
  buf.Reset();
  KVWAVE_ASSIGN_OR_RETURN(
      buf, store::HostBuffer::Allocate(PinnedAllocator(), std::max<size_t>(bytes, 64)));
  return absl::OkStatus();
}

}  // namespace

ZoneCounts ZoneClusters(const WaveBudget& budget, int64_t total) {
  const gpu::ZoneSizes z = gpu::SizeZones(budget.retrieval, budget.estimation, total);
  return {z.retrieval, z.estimation};
}

WaveBuffer::WaveBuffer(const WaveBufferOptions& options) : o_(options) {}

WaveBuffer::~WaveBuffer() {
  for (auto& c : committers_) c->Drain();
  if (backend_ != nullptr) (void)SynchronizeAll();
}

absl::Status WaveBuffer::SynchronizeAll() {
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  return backend_->Synchronize(kUpdateStream);
}

absl::Status WaveBuffer::CallsWaitForUpdates() {
  if (!updates_unseen_) return absl::OkStatus();
  KVWAVE_RETURN_IF_ERROR(backend_->WaitEvent(kComputeStream, UpdatesEvent()));
  updates_unseen_ = false;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<WaveBuffer>> WaveBuffer::Create(const WaveBufferOptions& options) {
  if (options.heads <= 0 || options.d <= 0 || options.g <= 0 || options.cache_bytes < 0 ||
      (options.dtype != DType::kBF16 && options.dtype != DType::kF16) || options.slots < 1 ||
      options.slots > 64)
    return absl::InvalidArgumentError(
        "WaveBuffer: heads, g and d must be positive, K/V bf16 or f16, cache_bytes >= 0, 1 to 64 "
        "slots");
  std::unique_ptr<WaveBuffer> wb(new WaveBuffer(options));
  KVWAVE_RETURN_IF_ERROR(wb->Init());
  return wb;
}

absl::Status WaveBuffer::Init() {
  gpu::CudaBackendOptions bo;
  bo.device = o_.device;
  bo.num_streams = 2;
  bo.num_events = o_.slots + 2;
  bo.num_blocking_events = o_.slots;  // CommitEvent(slot): the committers sleep on them
  bo.workspace_bytes = o_.workspace_bytes;
  KVWAVE_ASSIGN_OR_RETURN(backend_, gpu::CudaBackend::Create(bo));
  row_bytes_ = static_cast<size_t>(o_.d) * ElementSize(o_.dtype);
  page_bytes_ = row_bytes_ * kPageRows;
  pool_pages_ = o_.cache_bytes / static_cast<int64_t>(2 * page_bytes_);
  policy_ = std::make_unique<WavePolicy>(pool_pages_);
  KVWAVE_ASSIGN_OR_RETURN(pool_k_,
                          backend_->Allocate(std::max<size_t>(page_bytes_ * pool_pages_, 16)));
  KVWAVE_ASSIGN_OR_RETURN(pool_v_,
                          backend_->Allocate(std::max<size_t>(page_bytes_ * pool_pages_, 16)));
  {
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    std::lock_guard<std::mutex> reg(reg_mu_);
    KVWAVE_RETURN_IF_ERROR(GrowKeys(4096, 16384));
  }
  // Per-head scratch and the slots' per-head buffers are sized for one call here and grown to
  // the largest batch later.
  KVWAVE_RETURN_IF_ERROR(EnsureScratch(o_.heads, 1, 1, 1));
  for (int i = 0; i < o_.slots; ++i) {
    auto s = std::make_unique<Slot>();
    s->index = i;
    KVWAVE_RETURN_IF_ERROR(EnsureSlot(*s, o_.heads, 1, 1, 1, 4 * o_.heads));
    KVWAVE_RETURN_IF_ERROR(FitHost(s->staging, static_cast<size_t>(o_.staging_bytes)));
    free_slots_.push_back(o_.slots - 1 - i);
    slots_.push_back(std::move(s));
  }
  KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  for (int i = 0; i < o_.slots; ++i) committers_.push_back(std::make_unique<AsyncCommitter>());
  return absl::OkStatus();
}

absl::StatusOr<int> WaveBuffer::AcquireSlot() {
  std::unique_lock<std::mutex> lock(slot_mu_);
  slot_cv_.wait(lock, [&] { return !free_slots_.empty(); });
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  return slot;
}

void WaveBuffer::FreeSlot(int slot) {
  std::lock_guard<std::mutex> lock(slot_mu_);
  if (--slots_[slot]->holders > 0) return;
  free_slots_.push_back(slot);
  slot_cv_.notify_one();
}

void WaveBuffer::Fail(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.ok()) error_ = status;
}

absl::Status WaveBuffer::EnsureSlot(Slot& s, int64_t heads, int64_t list_stride, int64_t max_pages,
                                    int64_t exec_pages, int64_t record_ints) {
  // The slot's previous batch is complete (its commit waited for it), but its update (queued on
  // U) may still read its execution buffer: U must be idle before that buffer is replaced.
  gpu::CudaBackend& b = *backend_;
  if (heads > s.heads_cap) {
    const int64_t cap = std::max(heads, s.heads_cap * 3 / 2);
    const int64_t rows = cap * o_.g;
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.q, sizeof(float) * rows * o_.d));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.counts, sizeof(int32_t) * cap));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.counts2, sizeof(int32_t) * cap));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.page_counts, sizeof(int32_t) * 2 * cap));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.meta, sizeof(gpu::HeadMeta) * cap));
    KVWAVE_RETURN_IF_ERROR(FitHost(s.io, sizeof(float) * rows * (o_.d + 1)));
    s.heads_cap = cap;
    s.offsets_for = -1;
    s.list_cap = s.pages_cap = 0;  // per-head lists: regrown below
  }
  const int64_t H = s.heads_cap;
  if (list_stride > s.list_cap) {
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.ret, sizeof(int32_t) * H * list_stride));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.est, sizeof(int32_t) * H * list_stride));
    s.list_cap = list_stride;
  }
  if (max_pages > s.pages_cap) {
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.pages, sizeof(gpu::PageRef) * H * max_pages));
    s.pages_cap = max_pages;
  }
  if (exec_pages > s.exec_cap) {
    KVWAVE_RETURN_IF_ERROR(SynchronizeAll());  // an update may still copy from it
    const int64_t cap = std::max(exec_pages, s.exec_cap * 3 / 2);
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.exec_k, page_bytes_ * cap));
    KVWAVE_RETURN_IF_ERROR(Fit(b, s.exec_v, page_bytes_ * cap));
    s.exec_cap = cap;
  }
  return FitHost(s.record, sizeof(int32_t) * record_ints);
}

absl::Status WaveBuffer::EnsureScratch(int64_t heads, int64_t clusters, int64_t max_pages,
                                       int64_t list_stride) {
  gpu::CudaBackend& b = *backend_;
  gpu::ExactArgs x;
  x.heads = static_cast<int>(heads);
  x.g = o_.g;
  x.d = o_.d;
  x.max_pages_per_head = max_pages;
  x.pages_per_split = o_.exact_pages_per_split;
  gpu::EstimateArgs e;
  e.heads = static_cast<int>(heads);
  e.g = o_.g;
  e.d = o_.d;
  e.list_stride = list_stride;
  const size_t xs = b.ExactScratchBytes(x), es = b.EstimateScratchBytes(e);
  const size_t ss = sizeof(float) * heads * std::max<int64_t>(clusters, 1);
  if (heads <= heads_cap_ && xs <= exact_scratch_.size() && es <= est_scratch_.size() &&
      ss <= scores_.size())
    return absl::OkStatus();
  KVWAVE_RETURN_IF_ERROR(b.Synchronize(kComputeStream));  // in use by queued batches
  if (xs > exact_scratch_.size()) KVWAVE_RETURN_IF_ERROR(Fit(b, exact_scratch_, xs * 3 / 2));
  if (es > est_scratch_.size()) KVWAVE_RETURN_IF_ERROR(Fit(b, est_scratch_, es * 3 / 2));
  if (ss > scores_.size()) KVWAVE_RETURN_IF_ERROR(Fit(b, scores_, ss * 3 / 2));
  if (heads > heads_cap_) {
    // Ready words start at 0 (no batch has number 0 until seq_ wraps) and arrival counters at 0.
    const int64_t cap = std::max(heads, heads_cap_ * 3 / 2), rows = cap * o_.g;
    KVWAVE_RETURN_IF_ERROR(Fit(b, est_out_, sizeof(float) * rows * o_.d));
    KVWAVE_RETURN_IF_ERROR(Fit(b, est_lse_, sizeof(float) * rows));
    KVWAVE_RETURN_IF_ERROR(Fit(b, est_ready_, sizeof(uint32_t) * rows));
    KVWAVE_RETURN_IF_ERROR(Fit(b, pages_ready_, sizeof(uint32_t) * cap));
    KVWAVE_RETURN_IF_ERROR(Fit(b, arrivals_, sizeof(uint32_t) * 2 * cap));
    KVWAVE_RETURN_IF_ERROR(b.Memset(est_ready_.data(), 0, est_ready_.size(), kComputeStream));
    KVWAVE_RETURN_IF_ERROR(b.Memset(pages_ready_.data(), 0, pages_ready_.size(), kComputeStream));
    KVWAVE_RETURN_IF_ERROR(b.Memset(arrivals_.data(), 0, arrivals_.size(), kComputeStream));
    heads_cap_ = cap;
  }
  return absl::OkStatus();
}

absl::Status WaveBuffer::Enqueue(std::span<Space* const> spaces, std::span<const HostCall> calls,
                                 bool host, int slot_index, std::vector<Run>& runs,
                                 void* wait_event) {
  Slot& s = *slots_[slot_index];
  gpu::CudaBackend& b = *backend_;
  const int H = o_.heads;
  const int64_t B = static_cast<int64_t>(calls.size()), heads = B * H;
  // The batch's shape: every per-head array is sized by its largest call.
  int64_t n = 0, list_stride = 1, max_pages = 1, exec_stride = 1, info_stride = 1;
  bool ranked = false;
  std::vector<ZoneCounts> zones(B);
  s.calls.assign(B, CallRecord{});
  for (int64_t i = 0; i < B; ++i) {
    const Space& sp = *spaces[i];
    const ZoneCounts z = ZoneClusters(calls[i].budget, sp.clusters);
    zones[i] = z;
    int64_t steady_max = 0, head_pages = 0;
    CallRecord& rec = s.calls[i];
    for (const gpu::SteadyZone& zone : sp.zone_host) {
      steady_max = std::max(steady_max, gpu::SteadyZonePages(zone));
      rec.steady_rows += zone.sink_rows + zone.rows;
    }
    for (int64_t p : sp.head_pages) head_pages = std::max(head_pages, p);
    const int64_t ret_bound = std::min(head_pages, z.retrieval * sp.max_cluster_pages);
    rec.estimated = sp.clusters > 0 ? z.estimation : 0;
    rec.total_clusters = sp.clusters * H;
    n = std::max(n, sp.clusters);
    list_stride = std::max({list_stride, z.retrieval, z.estimation});
    max_pages = std::max(max_pages, steady_max + ret_bound);
    exec_stride = std::max(exec_stride, ret_bound);
    info_stride = std::max(info_stride, z.retrieval);
    ranked = ranked || (sp.clusters > 0 && z.retrieval + z.estimation > 0);
  }
  s.heads = heads;
  s.info_stride = info_stride;
  s.planned = ranked;
  KVWAVE_RETURN_IF_ERROR(EnsureSlot(s, heads, list_stride, max_pages, heads * exec_stride,
                                    2 * heads + 2 * heads * info_stride));
  KVWAVE_RETURN_IF_ERROR(EnsureScratch(heads, n, max_pages, list_stride));

  // The heads' descriptors, q of a host batch and the page lists' starts go up with the syncs'
  // rows (one gather).
  std::vector<gpu::HeadMeta> meta(heads);
  for (int64_t i = 0; i < B; ++i) {
    const Space& sp = *spaces[i];
    for (int h = 0; h < H; ++h) {
      gpu::HeadMeta& m = meta[i * H + h];
      const int64_t at = h * sp.capacity;
      m.centroids = sp.centroids.as<float>() + at * o_.d;
      if (o_.bf16_scores) m.centroids16 = sp.centroids16.as<uint16_t>() + at * o_.d;
      m.value_sums = sp.value_sums.as<float>() + at * o_.d;
      m.sizes = sp.sizes.as<int32_t>() + at;
      m.keys = sp.keys.as<int32_t>() + at;
      m.steady = sp.zones.as<gpu::SteadyZone>() + h;
      m.n = sp.clusters;
      m.k = zones[i].retrieval;
      m.k2 = zones[i].retrieval + zones[i].estimation;
    }
  }
  runs.push_back({reinterpret_cast<const std::byte*>(meta.data()), s.meta.as<std::byte>(),
                  sizeof(gpu::HeadMeta) * heads});
  const size_t qn = static_cast<size_t>(H) * o_.g * o_.d;
  const float* q = calls[0].q;
  float* out = calls[0].out;
  float* lse = calls[0].lse;
  if (host) {
    // A host batch's results are written by the exact attention's last blocks straight into the
    // slot's pinned io (mapped): no copies back.
    for (int64_t i = 0; i < B; ++i)
      runs.push_back({reinterpret_cast<const std::byte*>(calls[i].q),
                      s.q.as<std::byte>() + sizeof(float) * qn * i, sizeof(float) * qn});
    q = s.q.as<float>();
    out = reinterpret_cast<float*>(s.io.data());
    lse = out + qn * B;
  }
  bool direct = false;
  KVWAVE_RETURN_IF_ERROR(UploadRuns(s, runs, &direct));
  if (s.offsets_for != max_pages || s.offsets_heads != heads) {
    // The starts of the heads' page lists (page_counts + heads); pageable: read when Copy returns.
    std::vector<int32_t> offsets(heads);
    for (int64_t h = 0; h < heads; ++h) offsets[h] = static_cast<int32_t>(h * max_pages);
    KVWAVE_RETURN_IF_ERROR(b.Copy(s.page_counts.as<int32_t>() + heads, offsets.data(),
                                  sizeof(int32_t) * heads, kComputeStream));
    s.offsets_for = max_pages;
    s.offsets_heads = heads;
  }
  if (!host) {
    // Rows copied straight from host memory (a first sync after a long prefill): complete before
    // returning (the caller may change the rows then), never waiting for the other party's work
    // (queued next).
    if (direct) {
      KVWAVE_RETURN_IF_ERROR(b.RecordEvent(kDoneEvent + slot_index, kComputeStream));
      KVWAVE_RETURN_IF_ERROR(b.SynchronizeEvent(kDoneEvent + slot_index));
    }
    if (wait_event != nullptr)
      KVWAVE_RETURN_IF_ERROR(b.WaitForeignEvent(kComputeStream, wait_event));
  }
  const uint32_t seq = ++seq_;
  const float scale = 1.0f / std::sqrt(static_cast<float>(o_.d));
  const gpu::HeadMeta* meta_d = s.meta.as<gpu::HeadMeta>();

  gpu::PlanArgs pl;
  pl.heads = static_cast<int>(heads);
  pl.retrieved = s.ret.as<int32_t>();
  pl.counts = s.counts.as<int32_t>();
  pl.list_stride = list_stride;
  pl.heads_meta = meta_d;
  pl.page_base = page_base_.as<int64_t>();
  pl.table = table_.as<int32_t>();
  pl.key_k = key_k_.as<const void*>();
  pl.key_v = key_v_.as<const void*>();
  pl.pool_k = pool_k_.data();
  pl.pool_v = pool_v_.data();
  pl.row_bytes = static_cast<int64_t>(row_bytes_);
  pl.max_pages_per_head = max_pages;
  pl.exec_stride = exec_stride;
  pl.pages = s.pages.as<gpu::PageRef>();
  pl.page_counts = s.page_counts.as<int32_t>();
  // The record: [heads counts][heads retrieved rows][(key, exec page) pairs, info_stride a head].
  auto* record = reinterpret_cast<int32_t*>(s.record.data());
  pl.info = record + 2 * heads;
  pl.info_stride = s.info_stride;

  gpu::ExactArgs x;
  x.q = q;
  x.heads = static_cast<int>(heads);
  x.g = o_.g;
  x.d = o_.d;
  x.scale = scale;
  x.kv_type = o_.dtype;
  x.pages = s.pages.as<gpu::PageRef>();
  x.page_offsets = s.page_counts.as<int32_t>() + heads;
  x.page_counts = s.page_counts.as<int32_t>();
  x.max_pages_per_head = max_pages;
  x.pages_per_split = o_.exact_pages_per_split;
  x.stash_k = s.exec_k.data();
  x.stash_v = s.exec_v.data();
  x.out = out;
  x.lse = lse;

  if (!ranked) {
    // Nothing ranked in any call: the steady zones alone (no record).
    KVWAVE_RETURN_IF_ERROR(b.Memset(s.counts.data(), 0, sizeof(int32_t) * heads, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(b.PlanPages(pl, kComputeStream));
    return b.ExactAttention(x, kComputeStream);
  }
  gpu::ScoreArgs sc;
  sc.q = q;
  sc.heads = static_cast<int>(heads);
  sc.g = o_.g;
  sc.d = o_.d;
  sc.scale = scale;
  sc.heads_meta = meta_d;
  // With descriptors, a non-null bf16 pointer only says "score the bf16 copies" (never read).
  if (o_.bf16_scores) sc.centroids_bf16 = reinterpret_cast<const uint16_t*>(meta_d);
  sc.n = n;
  sc.scores = scores_.as<float>();
  sc.score_stride = n;
  gpu::TopKArgs t;
  t.scores = scores_.as<float>();
  t.heads = static_cast<int>(heads);
  t.n = n;
  t.score_stride = n;
  t.k = info_stride;  // each head's own k and k2 come from its descriptor
  t.k2 = list_stride;
  t.out = s.ret.as<int32_t>();
  t.out2 = s.est.as<int32_t>();
  t.out_stride = list_stride;
  t.counts = s.counts.as<int32_t>();
  t.counts2 = s.counts2.as<int32_t>();
  // The plan writes the record straight to pinned host memory (complete with the batch) and
  // publishes each head's page list with its pages_ready word.
  pl.record_counts = record;
  pl.record_rows = record + heads;
  if (updates_unseen_) {  // the plan reads the table, the attention the pool: after the updates
    pl.wait_event = UpdatesEvent();
    updates_unseen_ = false;
  }
  pl.pages_ready = pages_ready_.as<uint32_t>();
  pl.seq = seq;
  KVWAVE_RETURN_IF_ERROR(b.ScoreSelectPlan(sc, t, pl, kComputeStream));

  // Estimation and exact attention: programmatic dependents of the selection on stream C; the
  // exact attention's last block per head folds in the estimation zone once its ready words
  // carry this batch's number.
  gpu::ChainArgs est_chain, exact_chain;
  est_chain.scratch = est_scratch_.as<float>();
  est_chain.arrivals = arrivals_.as<uint32_t>();
  exact_chain.scratch = exact_scratch_.as<float>();
  exact_chain.arrivals = arrivals_.as<uint32_t>() + heads;
  exact_chain.pages_ready = pages_ready_.as<uint32_t>();
  exact_chain.seq = seq;
  gpu::EstimateArgs est;
  est.q = q;
  est.heads = static_cast<int>(heads);
  est.g = o_.g;
  est.d = o_.d;
  est.scale = scale;
  est.heads_meta = meta_d;
  est.clusters = s.est.as<int32_t>();
  est.counts = s.counts2.as<int32_t>();
  est.list_stride = list_stride;
  est.out = est_out_.as<float>();
  est.lse = est_lse_.as<float>();
  est.ready = est_ready_.as<uint32_t>();
  est.ready_seq = seq;
  est.chain = &est_chain;
  KVWAVE_RETURN_IF_ERROR(b.EstimateAttention(est, kComputeStream));
  x.extra_out = est_out_.as<float>();
  x.extra_lse = est_lse_.as<float>();
  x.extra_ready = est_ready_.as<uint32_t>();
  x.extra_seq = seq;
  x.chain = &exact_chain;
  return b.ExactAttention(x, kComputeStream);
}

void WaveBuffer::Commit(int slot_index) {
  const auto t0 = Clock::now();
  Slot& s = *slots_[slot_index];
  absl::Status status = backend_->SynchronizeEvent(CommitEvent(slot_index));
  const auto t_gpu = Clock::now();
  if (!status.ok() || !s.planned) {
    if (!status.ok()) Fail(status);
    FreeSlot(slot_index);
    return;
  }
  const int64_t H = s.heads;
  const int32_t* counts = reinterpret_cast<const int32_t*>(s.record.data());
  const int32_t* info = counts + 2 * H;
  WaveCounters add;
  std::vector<int32_t> hits;
  std::vector<MissCluster> misses;
  std::vector<int32_t> exec_first;
  {
    std::lock_guard<std::mutex> lock(reg_mu_);
    for (int64_t h = 0; h < H; ++h) {
      for (int32_t i = 0; i < counts[h]; ++i) {
        const int32_t key = info[2 * (h * s.info_stride + i)];
        const int32_t exec = info[2 * (h * s.info_stride + i) + 1];
        const int32_t rows = key_rows_[key];
        const int32_t pages = static_cast<int32_t>(PagesOfRows(rows));
        add.exact_rows += rows;
        if (exec < 0) {
          hits.push_back(key);
          ++add.hit_clusters;
          add.hit_pages += pages;
        } else {
          misses.push_back({key, pages});
          exec_first.push_back(exec);
          ++add.miss_clusters;
          add.miss_pages += pages;
          add.pcie_bytes += 2 * int64_t{rows} * static_cast<int64_t>(row_bytes_);
        }
      }
    }
  }
  // The policy's decisions and the updates that carry them out reach the GPU in one order:
  // were commit A to admit a cluster into slot s and commit B then evict it and admit another
  // into s, B's update queued before A's would leave A's rows in s under B's table entry (seen:
  // one wrong 100%-budget call in 1,560 of the engine GPU test with three threads, run 3).
  const auto t_order0 = Clock::now();
  std::lock_guard<std::mutex> order(commit_mu_);
  const auto t_order1 = Clock::now();
  // One item for all heads: every hit is touched before any miss is admitted.
  const WavePolicy::CommitItem item{0, hits, misses};
  std::vector<WavePolicy::Evicted> evicted;
  const PolicyStats before = policy_->stats();
  const auto admitted = std::move(
      policy_->CommitMany(std::span<const WavePolicy::CommitItem>(&item, 1), &evicted)[0]);
  const PolicyStats after = policy_->stats();
  add.stale_hits = add.hit_clusters - (after.hits - before.hits);

  const auto t_policy = Clock::now();
  int64_t admitted_pages = 0;
  for (const CachedCluster& a : admitted) admitted_pages += static_cast<int64_t>(a.slots.size());
  const int64_t writes = static_cast<int64_t>(evicted.size()) + admitted_pages;
  if (writes > 0) {
    const UpdateLayout layout(2 * admitted_pages, writes);
    status = FitHost(s.update, layout.total);
    std::byte* blob = s.update.data();
    auto* src = reinterpret_cast<const void**>(blob + layout.src);
    auto* dst = reinterpret_cast<void**>(blob + layout.dst);
    auto* bytes = reinterpret_cast<int32_t*>(blob + layout.bytes);
    auto* index = reinterpret_cast<int64_t*>(blob + layout.index);
    auto* value = reinterpret_cast<int32_t*>(blob + layout.value);
    int64_t nc = 0, w = 0;
    if (status.ok()) {
      std::lock_guard<std::mutex> reg(reg_mu_);
      for (const WavePolicy::Evicted& ev : evicted) {
        index[w] = key_entry_[ev.cluster];
        value[w++] = -1;
      }
      size_t m = 0;  // admitted is a subsequence of misses, in order
      for (const CachedCluster& a : admitted) {
        while (misses[m].cluster != a.cluster) ++m;
        const int32_t first = exec_first[m], rows = key_rows_[a.cluster];
        for (size_t p = 0; p < a.slots.size(); ++p) {
          const int32_t page_rows =
              std::min<int32_t>(kPageRows, rows - static_cast<int32_t>(p) * kPageRows);
          const size_t from = page_bytes_ * (first + p), to = page_bytes_ * a.slots[p];
          src[nc] = s.exec_k.as<std::byte>() + from, dst[nc] = pool_k_.as<std::byte>() + to;
          bytes[nc++] = page_rows * static_cast<int32_t>(row_bytes_);
          src[nc] = s.exec_v.as<std::byte>() + from, dst[nc] = pool_v_.as<std::byte>() + to;
          bytes[nc++] = page_rows * static_cast<int32_t>(row_bytes_);
          index[w] = key_entry_[a.cluster] + static_cast<int64_t>(p);
          value[w++] = a.slots[p];
        }
      }
    }
    if (status.ok()) {
      // On stream U: after every call queued so far on C (which may still read the slots and
      // entries it rewrites, and whose execution buffer it copies from); the calls queued later
      // wait for it before their plan. The kernels read the blob in place (pinned, mapped); the
      // blob is reused only by this slot's next commit, after this slot's next call, whose plan
      // waited for this update. (Copying the blob to the device first was tried: one more copy
      // to queue on the commits' serial path; bench/results/gpu_engine_run10_h100_decode_ab.txt.)
      std::lock_guard<std::mutex> lock(enqueue_mu_);
      status = backend_->RecordEvent(CallsEvent(), kComputeStream);
      if (status.ok()) status = backend_->WaitEvent(kUpdateStream, CallsEvent());
      if (status.ok())
        status = backend_->GatherPages(reinterpret_cast<const void* const*>(src),
                                       reinterpret_cast<void* const*>(dst), bytes, nc,
                                       static_cast<int64_t>(page_bytes_), kUpdateStream);
      if (status.ok())
        status = backend_->ScatterInt32(table_.as<int32_t>(), index, value, w, kUpdateStream);
      if (status.ok()) status = backend_->RecordEvent(UpdatesEvent(), kUpdateStream);
      if (status.ok()) updates_unseen_ = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status.ok() && error_.ok()) error_ = status;
    counters_.hit_clusters += add.hit_clusters;
    counters_.miss_clusters += add.miss_clusters;
    counters_.hit_pages += add.hit_pages;
    counters_.miss_pages += add.miss_pages;
    counters_.stale_hits += add.stale_hits;
    counters_.pcie_bytes += add.pcie_bytes;
    counters_.exact_rows += add.exact_rows;
    const auto t_end = Clock::now();
    counters_.commit_us += Us(t0, t_end);
    counters_.commit_gpu_us += Us(t0, t_gpu);
    counters_.commit_order_us += Us(t_order0, t_order1);
    counters_.commit_policy_us += Us(t_gpu, t_order0) + Us(t_order1, t_policy);
    counters_.commit_queue_us += Us(t_policy, t_end);
  }
  FreeSlot(slot_index);
}

int WaveBuffer::TryAcquireSlot() {
  std::lock_guard<std::mutex> lock(slot_mu_);
  if (free_slots_.empty()) return -1;
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  return slot;
}

absl::Status WaveBuffer::Begin(int slot, std::span<const HostCall> calls, bool host,
                               void* wait_event) {
  Slot& s = *slots_[slot];
  auto give_back = [&](absl::Status status) {
    // Nothing will commit this slot; what was queued is left to finish on the streams.
    (void)SynchronizeAll();
    std::lock_guard<std::mutex> lock(slot_mu_);
    s.holders = 0;
    free_slots_.push_back(slot);
    slot_cv_.notify_one();
    return status;
  };
  for (const HostCall& c : calls) {
    const WaveBudget& budget = c.budget;
    if (!(budget.retrieval >= 0 && budget.retrieval <= 1 && budget.estimation >= 0 &&
          budget.estimation <= 1))
      return give_back(absl::InvalidArgumentError("wave buffer: budgets are fractions in [0, 1]"));
  }
  if (calls.empty()) return give_back(absl::InvalidArgumentError("wave buffer: an empty batch"));
  if (!host) {
    // Device memory: the launches read q and write out / lse of call i at i * (heads x g x d)
    // (lse: i * heads x g) from the first call's pointers.
    const size_t qn = static_cast<size_t>(o_.heads) * o_.g * o_.d, rows = qn / o_.d;
    for (size_t i = 1; i < calls.size(); ++i)
      if (calls[i].q != calls[0].q + qn * i || calls[i].out != calls[0].out + qn * i ||
          calls[i].lse != calls[0].lse + rows * i)
        return give_back(absl::InvalidArgumentError(
            "wave buffer: a device batch's q / out / lse must be consecutive, call by call"));
  }
  std::vector<std::shared_ptr<Space>> held(calls.size());
  {
    std::lock_guard<std::mutex> lock(spaces_mu_);
    for (size_t i = 0; i < calls.size(); ++i) {
      auto it = spaces_.find(calls[i].space);
      if (it != spaces_.end()) held[i] = it->second;
    }
  }
  for (size_t i = 0; i < calls.size(); ++i)
    if (held[i] == nullptr)
      return give_back(absl::NotFoundError(absl::StrCat("no wave space ", calls[i].space)));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_.ok()) return give_back(error_);
  }
  s.holders = host ? 2 : 1;  // the commit job, and the host batch until it has read its results
  const auto t1 = Clock::now();
  // Each distinct space locked once, in address order (every batch does the same).
  std::vector<Space*> spaces(calls.size()), order;
  for (size_t i = 0; i < calls.size(); ++i) spaces[i] = held[i].get();
  order = spaces;
  std::sort(order.begin(), order.end());
  order.erase(std::unique(order.begin(), order.end()), order.end());
  std::vector<std::unique_lock<std::mutex>> space_locks;
  space_locks.reserve(order.size());
  for (Space* sp : order) space_locks.emplace_back(sp->mu);
  absl::Status status;
  Clock::time_point t2, t3;
  {
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    t2 = Clock::now();
    std::vector<Run> runs;
    std::vector<Space*> synced;
    for (size_t i = 0; i < calls.size() && status.ok(); ++i) {
      Space& sp = *spaces[i];
      if (sp.closed) {
        status = absl::NotFoundError(absl::StrCat("no wave space ", calls[i].space));
      } else if (!calls[i].heads.empty() &&
                 std::find(synced.begin(), synced.end(), &sp) == synced.end()) {
        status = Sync(sp, calls[i].heads, runs);
        synced.push_back(&sp);
      }
    }
    t3 = Clock::now();
    if (status.ok()) status = Enqueue(spaces, calls, host, slot, runs, wait_event);
    if (status.ok()) status = backend_->RecordEvent(kDoneEvent + slot, kComputeStream);
    if (status.ok()) status = backend_->RecordEvent(CommitEvent(slot), kComputeStream);
    if (status.ok() && !host) {
      // A device batch's stats: what is known when it is queued (retrieved counts are not).
      for (size_t i = 0; i < calls.size(); ++i) {
        if (calls[i].stats == nullptr) continue;
        const CallRecord& rec = s.calls[i];
        calls[i].stats->steady_tokens += rec.steady_rows;
        calls[i].stats->total_clusters += rec.total_clusters;
        if (s.planned) calls[i].stats->estimated_clusters += int64_t{o_.heads} * rec.estimated;
      }
    }
    if (status.ok()) committers_[slot]->Submit([this, slot] { Commit(slot); });
  }
  space_locks.clear();
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto t4 = Clock::now();
    counters_.enqueue_us += Us(t1, t4);
    counters_.lock_us += Us(t1, t2);
    counters_.sync_us += Us(t2, t3);
    counters_.launch_us += Us(t3, t4);
    if (status.ok()) counters_.calls += static_cast<int64_t>(calls.size());
  }
  if (!status.ok()) return give_back(status);
  return absl::OkStatus();
}

absl::Status WaveBuffer::End(int slot, std::span<const HostCall> calls) {
  Slot& s = *slots_[slot];
  const int H = o_.heads;
  const size_t qn = static_cast<size_t>(H) * o_.g * o_.d, rows = qn / o_.d;
  const auto* out = reinterpret_cast<const float*>(s.io.data());
  const float* lse = out + qn * calls.size();
  const auto t0 = Clock::now();
  absl::Status status = backend_->SynchronizeEvent(kDoneEvent + slot);
  const auto t1 = Clock::now();
  if (status.ok()) {
    // Counts and rows from the record's head: no size table (whose lock the commit of this very
    // batch takes at this moment), nothing proportional to the retrieved clusters.
    const int32_t* counts = reinterpret_cast<const int32_t*>(s.record.data());
    const int32_t* ret_rows = counts + s.heads;
    for (size_t i = 0; i < calls.size(); ++i) {
      const HostCall& c = calls[i];
      std::memcpy(c.out, out + qn * i, sizeof(float) * qn);
      std::memcpy(c.lse, lse + rows * i, sizeof(float) * rows);
      if (c.stats == nullptr) continue;
      const CallRecord& rec = s.calls[i];
      c.stats->steady_tokens += rec.steady_rows;
      c.stats->total_clusters += rec.total_clusters;
      if (!s.planned) continue;
      for (int h = 0; h < H; ++h) {
        c.stats->retrieved_clusters += counts[i * H + h];
        c.stats->retrieved_tokens += ret_rows[i * H + h];
      }
      c.stats->estimated_clusters += int64_t{H} * rec.estimated;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.result_wait_us += Us(t0, t1);
    counters_.end_us += Us(t1, Clock::now());
  }
  FreeSlot(slot);
  return status;
}

absl::Status WaveBuffer::AttendLayer(SpaceId space, std::span<const store::HeadKv> heads,
                                     const float* q, float* out, float* lse,
                                     const WaveBudget& budget) {
  const auto t0 = Clock::now();
  KVWAVE_ASSIGN_OR_RETURN(const int slot, AcquireSlot());
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.wait_us += Us(t0, Clock::now());
  }
  const HostCall call{space, heads, q, out, lse, budget, nullptr};
  return Begin(slot, std::span<const HostCall>(&call, 1), false);
}

absl::Status WaveBuffer::AttendHost(SpaceId space, std::span<const store::HeadKv> heads,
                                    const float* q, float* out, float* lse,
                                    const WaveBudget& budget, WaveCallStats* stats) {
  const HostCall call{space, heads, q, out, lse, budget, stats};
  return AttendHostBatch(std::span<const HostCall>(&call, 1));
}

size_t WaveBuffer::BatchPrefix(std::span<const HostCall> calls) const {
  if (calls.size() <= 1) return calls.size();
  // The scoring's logits and statistics of the batch's heads (ScoreWorkspaceBytes) must fit the
  // compute stream's half of the backend's workspace (cluster counts from the heads' segments),
  // and a launch covers at most kMaxBatchHeads heads (the backend's arrival words per stream).
  const double room = 0.9 * static_cast<double>(o_.workspace_bytes) / 2;
  const double per_cluster = 4.0 * o_.heads * o_.g * 1.05;
  int64_t n = 1;
  size_t taken = 0;
  for (const HostCall& c : calls) {
    int64_t clusters = 0;
    for (const store::HeadKv& head : c.heads) {
      int64_t sum = 0;
      for (const auto& seg : head.segments) sum += seg->num_clusters();
      clusters = std::max(clusters, sum);
    }
    const int64_t next = std::max(n, clusters);
    if (taken > 0 && (per_cluster * static_cast<double>(next) * (taken + 1) > room ||
                      static_cast<int64_t>(taken + 1) * o_.heads > kMaxBatchHeads))
      break;
    n = next;
    ++taken;
  }
  return std::max<size_t>(taken, 1);
}

absl::Status WaveBuffer::AttendHostBatch(std::span<const HostCall> calls) {
  // One pipeline a batch (BatchPrefix cuts one that would not fit the workspace). Each batch is
  // queued as soon as a slot is free; a caller that finds none first completes the batches it
  // holds (so that callers never wait on each other's slots), then waits.
  std::vector<std::pair<int, std::span<const HostCall>>> pending;
  absl::Status status;
  auto complete = [&] {
    for (const auto& [slot, part] : pending) {
      const absl::Status st = End(slot, part);
      if (status.ok()) status = st;
    }
    pending.clear();
  };
  for (size_t at = 0; at < calls.size();) {
    const std::span<const HostCall> part = calls.subspan(at, BatchPrefix(calls.subspan(at)));
    at += part.size();
    int slot = TryAcquireSlot();
    if (slot < 0) {
      complete();
      const auto t0 = Clock::now();
      KVWAVE_ASSIGN_OR_RETURN(slot, AcquireSlot());
      std::lock_guard<std::mutex> lock(mu_);
      counters_.wait_us += Us(t0, Clock::now());
    }
    const absl::Status st = Begin(slot, part, true);
    if (!st.ok()) {
      if (status.ok()) status = st;
      break;
    }
    pending.emplace_back(slot, part);
  }
  complete();
  return status;
}

absl::Status WaveBuffer::WaitForCalls() {
  std::lock_guard<std::mutex> lock(enqueue_mu_);
  return SynchronizeAll();
}

absl::Status WaveBuffer::Finish() {
  for (auto& c : committers_) c->Drain();
  {
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    KVWAVE_RETURN_IF_ERROR(SynchronizeAll());
  }
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

WaveCounters WaveBuffer::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

WaveAccounting WaveBuffer::accounting() const {
  WaveAccounting a;
  a.pool_pages = pool_pages_;
  a.free_pages = policy_->free_pages();
  a.cached_clusters = policy_->cached_clusters();
  {
    std::lock_guard<std::mutex> lock(spaces_mu_);
    a.spaces = static_cast<int64_t>(spaces_.size());
  }
  {
    std::lock_guard<std::mutex> lock(reg_mu_);
    a.segments = static_cast<int64_t>(registered_.size());
    a.keys = keys_used_;
    a.table_entries = entries_used_;
  }
  std::lock_guard<std::mutex> lock(slot_mu_);
  a.busy_slots = o_.slots - static_cast<int64_t>(free_slots_.size());
  return a;
}

}  // namespace kvwave::buffer
