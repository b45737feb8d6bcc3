// The wave buffer's spaces (one layer of one context on the GPU), the registry of segments
// (cache keys and page-table entries), and Sync: segments joining the meta index, the steady
// zone's ring following the tail. See wave_buffer.h.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/pinned_allocator.h"
#include "buffer/wave_buffer.h"
#include "buffer/wave_buffer_internal.h"
#include "config/status_macros.h"

namespace kvwave::buffer {
namespace {

// First fit in a free-range map (start -> length); -1 when nothing fits.
int64_t TakeRange(std::map<int64_t, int64_t>& free, int64_t n) {
  for (auto it = free.begin(); it != free.end(); ++it) {
    if (it->second < n) continue;
    const int64_t start = it->first, len = it->second;
    free.erase(it);
    if (len > n) free.emplace(start + n, len - n);
    return start;
  }
  return -1;
}

void GiveRange(std::map<int64_t, int64_t>& free, int64_t start, int64_t n) {
  if (n <= 0) return;
  auto next = free.lower_bound(start);
  if (next != free.end() && start + n == next->first) {
    n += next->second;
    next = free.erase(next);
  }
  if (next != free.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      prev->second += n;
      return;
    }
  }
  free.emplace(start, n);
}

// Grows a device array of `old_bytes` to `new_bytes` keeping its contents (the tail filled with
// `fill` bytes); queued on stream C. The old buffer goes to `retired` (freed once C is idle).
absl::Status GrowArray(gpu::CudaBackend& b, gpu::DeviceBuffer& buf, size_t old_bytes,
                       size_t new_bytes, int fill, std::vector<gpu::DeviceBuffer>& retired) {
  KVWAVE_ASSIGN_OR_RETURN(gpu::DeviceBuffer next, b.Allocate(new_bytes));
  if (old_bytes > 0) KVWAVE_RETURN_IF_ERROR(b.Copy(next.data(), buf.data(), old_bytes));
  KVWAVE_RETURN_IF_ERROR(
      b.Memset(next.as<std::byte>() + old_bytes, fill, new_bytes - old_bytes, kComputeStream));
  retired.push_back(std::move(buf));
  buf = std::move(next);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<WaveBuffer::SpaceId> WaveBuffer::OpenSpace() {
  auto space = std::make_shared<Space>();
  space->joined.resize(o_.heads);
  space->head_clusters.assign(o_.heads, 0);
  space->head_pages.assign(o_.heads, 0);
  space->zone_host.assign(o_.heads, gpu::SteadyZone{});
  KVWAVE_ASSIGN_OR_RETURN(space->zones, backend_->Allocate(sizeof(gpu::SteadyZone) * o_.heads));
  {
    std::lock_guard<std::mutex> lock(enqueue_mu_);  // empty zones until the first Sync
    KVWAVE_RETURN_IF_ERROR(
        backend_->Memset(space->zones.data(), 0, space->zones.size(), kComputeStream));
  }
  std::lock_guard<std::mutex> lock(spaces_mu_);
  const SpaceId id = next_space_++;
  spaces_.emplace(id, std::move(space));
  return id;
}

absl::Status WaveBuffer::CloseSpace(SpaceId id) {
  std::shared_ptr<Space> space;
  {
    std::lock_guard<std::mutex> lock(spaces_mu_);
    auto it = spaces_.find(id);
    if (it == spaces_.end()) return absl::NotFoundError(absl::StrCat("no wave space ", id));
    space = std::move(it->second);
    spaces_.erase(it);
  }
  std::vector<const store::Segment*> held;
  {
    std::lock_guard<std::mutex> lock(space->mu);  // its in-flight Sync/Enqueue is done
    space->closed = true;
    for (const auto& list : space->joined) held.insert(held.end(), list.begin(), list.end());
  }
  {
    // Its queued calls may still read its arrays and its segments' rows.
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    KVWAVE_RETURN_IF_ERROR(SynchronizeAll());
  }
  return Release(std::move(held));
}

absl::Status WaveBuffer::GrowKeys(int64_t keys, int64_t entries) {
  // Caller holds enqueue_mu_ and reg_mu_. The table is copied on C after the updates queued so
  // far (U writes it).
  KVWAVE_RETURN_IF_ERROR(CallsWaitForUpdates());
  std::vector<gpu::DeviceBuffer> retired;
  if (keys > key_cap_) {
    const int64_t cap = std::max<int64_t>({keys, 2 * key_cap_, 4096});
    if (cap >= (int64_t{1} << 31)) return absl::ResourceExhaustedError("wave buffer: cache keys");
    KVWAVE_RETURN_IF_ERROR(GrowArray(*backend_, page_base_, sizeof(int64_t) * key_cap_,
                                     sizeof(int64_t) * cap, 0, retired));
    KVWAVE_RETURN_IF_ERROR(
        GrowArray(*backend_, key_k_, sizeof(void*) * key_cap_, sizeof(void*) * cap, 0, retired));
    KVWAVE_RETURN_IF_ERROR(
        GrowArray(*backend_, key_v_, sizeof(void*) * key_cap_, sizeof(void*) * cap, 0, retired));
    GiveRange(free_keys_, key_cap_, cap - key_cap_);
    key_entry_.resize(cap, 0);
    key_rows_.resize(cap, 0);
    key_cap_ = cap;
  }
  if (entries > entry_cap_) {
    const int64_t cap = std::max<int64_t>({entries, 2 * entry_cap_, 16384});
    KVWAVE_RETURN_IF_ERROR(GrowArray(*backend_, table_, sizeof(int32_t) * entry_cap_,
                                     sizeof(int32_t) * cap, 0xFF, retired));
    GiveRange(free_entries_, entry_cap_, cap - entry_cap_);
    entry_cap_ = cap;
  }
  if (!retired.empty()) KVWAVE_RETURN_IF_ERROR(backend_->Synchronize(kComputeStream));
  return absl::OkStatus();
}

absl::StatusOr<int32_t> WaveBuffer::Acquire(const std::shared_ptr<const store::Segment>& seg) {
  // Caller holds enqueue_mu_.
  std::lock_guard<std::mutex> lock(reg_mu_);
  auto it = registered_.find(seg.get());
  if (it != registered_.end()) {
    ++it->second->refs;
    return it->second->key0;
  }
  const int32_t C = seg->num_clusters();
  if (seg->dtype() != o_.dtype || seg->head_dim() != o_.d || seg->page_tokens() != kPageRows)
    return absl::InvalidArgumentError(
        absl::StrCat("wave buffer: segment of dtype ", static_cast<int>(seg->dtype()), ", d ",
                     seg->head_dim(), ", ", seg->page_tokens(), "-token pages; the buffer holds ",
                     static_cast<int>(o_.dtype), ", d ", o_.d, ", ", kPageRows));
  if (C > 0 && (!gpu::CudaBackend::DeviceAccessible(seg->key_row(0)) ||
                !gpu::CudaBackend::DeviceAccessible(seg->value_row(0))))
    return absl::FailedPreconditionError(
        "wave buffer: segment rows are not in pinned, mapped host memory (pinned_memory = on)");
  std::vector<int64_t> entries(C);
  int64_t total = 0;
  for (int32_t c = 0; c < C; ++c) {
    entries[c] = total;
    total += std::max<int64_t>(1, PagesOfRows(seg->cluster_size(c)));  // >= 1: the hit word
  }
  int64_t key0 = TakeRange(free_keys_, C), entry0 = TakeRange(free_entries_, total);
  if (key0 < 0 || entry0 < 0) {
    if (key0 >= 0) GiveRange(free_keys_, key0, C);
    if (entry0 >= 0) GiveRange(free_entries_, entry0, total);
    KVWAVE_RETURN_IF_ERROR(
        GrowKeys(key_cap_ + C + key_cap_ / 2, entry_cap_ + total + entry_cap_ / 2));
    key0 = TakeRange(free_keys_, C);
    entry0 = TakeRange(free_entries_, total);
    KVWAVE_CHECK(key0 >= 0 && entry0 >= 0);
  }
  std::vector<const void*> kp(C), vp(C);
  for (int32_t c = 0; c < C; ++c) {
    entries[c] += entry0;
    kp[c] = seg->key_row(seg->cluster_row(c));
    vp[c] = seg->value_row(seg->cluster_row(c));
    key_entry_[key0 + c] = entries[c];
    key_rows_[key0 + c] = seg->cluster_size(c);
  }
  if (C > 0) {  // pageable sources: read when Copy returns
    KVWAVE_RETURN_IF_ERROR(backend_->Copy(page_base_.as<int64_t>() + key0, entries.data(),
                                          sizeof(int64_t) * C, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(backend_->Copy(key_k_.as<const void*>() + key0, kp.data(),
                                          sizeof(void*) * C, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(backend_->Copy(key_v_.as<const void*>() + key0, vp.data(),
                                          sizeof(void*) * C, kComputeStream));
    KVWAVE_RETURN_IF_ERROR(backend_->Memset(table_.as<int32_t>() + entry0, 0xFF,
                                            sizeof(int32_t) * total, kComputeStream));
  }
  policy_->RegisterKeys(static_cast<int32_t>(key0), C, entries.data());
  auto r = std::make_unique<Registered>();
  r->segment = seg;
  r->key0 = static_cast<int32_t>(key0);
  r->clusters = C;
  r->entry0 = entry0;
  r->entries = total;
  r->refs = 1;
  keys_used_ += C;
  entries_used_ += total;
  registered_.emplace(seg.get(), std::move(r));
  return static_cast<int32_t>(key0);
}

absl::Status WaveBuffer::Release(std::vector<const store::Segment*> segments) {
  std::vector<std::unique_ptr<Registered>> drop;
  {
    std::lock_guard<std::mutex> lock(reg_mu_);
    for (const store::Segment* seg : segments) {
      auto it = registered_.find(seg);
      if (it == registered_.end()) continue;
      if (--it->second->refs == 0) {
        drop.push_back(std::move(it->second));
        registered_.erase(it);
      }
    }
  }
  if (drop.empty()) return absl::OkStatus();
  // Commit jobs of earlier calls may still name these keys: let them finish first.
  for (auto& c : committers_) c->Drain();
  std::lock_guard<std::mutex> lock(enqueue_mu_);
  std::lock_guard<std::mutex> reg(reg_mu_);
  KVWAVE_RETURN_IF_ERROR(CallsWaitForUpdates());  // the memsets below come after their writes
  for (const auto& r : drop) {
    policy_->DropKeys(r->key0, r->clusters);
    // After the updates queued so far (stream order): the entries read "not cached" when reused.
    KVWAVE_RETURN_IF_ERROR(backend_->Memset(table_.as<int32_t>() + r->entry0, 0xFF,
                                            sizeof(int32_t) * r->entries, kComputeStream));
    GiveRange(free_keys_, r->key0, r->clusters);
    GiveRange(free_entries_, r->entry0, r->entries);
    keys_used_ -= r->clusters;
    entries_used_ -= r->entries;
  }
  return absl::OkStatus();
}

absl::Status WaveBuffer::GrowSpace(Space& sp, int64_t clusters) {
  if (clusters <= sp.capacity) return absl::OkStatus();
  const int64_t cap = std::max<int64_t>({clusters, 2 * sp.capacity, 256});
  const int64_t H = o_.heads, d = o_.d, old = sp.capacity;
  gpu::CudaBackend& b = *backend_;
  struct Array {
    gpu::DeviceBuffer* buf;
    size_t elem;
    bool on;
  };
  const Array arrays[] = {{&sp.centroids, sizeof(float) * d, true},
                          {&sp.centroids16, sizeof(uint16_t) * d, o_.bf16_scores},
                          {&sp.value_sums, sizeof(float) * d, true},
                          {&sp.sizes, sizeof(int32_t), true},
                          {&sp.keys, sizeof(int32_t), true}};
  std::vector<gpu::DeviceBuffer> retired;  // freed once stream C is done with them
  for (const Array& a : arrays) {
    if (!a.on) continue;
    KVWAVE_ASSIGN_OR_RETURN(gpu::DeviceBuffer next, b.Allocate(a.elem * H * cap));
    KVWAVE_RETURN_IF_ERROR(b.Memset(next.data(), 0, next.size(), kComputeStream));
    if (old > 0)
      KVWAVE_RETURN_IF_ERROR(b.Copy2D(next.data(), a.elem * cap, a.buf->data(), a.elem * old,
                                      a.elem * old, H, kComputeStream));
    retired.push_back(std::move(*a.buf));
    *a.buf = std::move(next);
  }
  sp.capacity = cap;
  if (old > 0) KVWAVE_RETURN_IF_ERROR(b.Synchronize(kComputeStream));
  return absl::OkStatus();
}

absl::Status WaveBuffer::JoinSegments(Space& sp, std::span<const store::HeadKv> heads) {
  const int H = o_.heads, d = o_.d;
  // Check that what is joined is still each head's prefix; count what joins.
  int64_t need = sp.clusters;
  for (int h = 0; h < H; ++h) {
    const auto& segs = heads[h].segments;
    const auto& done = sp.joined[h];
    if (segs.size() < done.size())
      return absl::AbortedError("wave buffer: a head lost segments since its last sync");
    for (size_t i = 0; i < done.size(); ++i)
      if (segs[i].get() != done[i])
        return absl::AbortedError("wave buffer: a head's segments changed since its last sync");
    int64_t n = sp.head_clusters[h];
    for (size_t i = done.size(); i < segs.size(); ++i) n += segs[i]->num_clusters();
    need = std::max(need, n);
  }
  if (need > (int64_t{1} << 31) - 1) return absl::ResourceExhaustedError("too many clusters");
  KVWAVE_RETURN_IF_ERROR(GrowSpace(sp, need));
  std::vector<uint16_t> bf16;
  std::vector<int32_t> keys;
  gpu::CudaBackend& b = *backend_;
  for (int h = 0; h < H; ++h) {
    const auto& segs = heads[h].segments;
    for (size_t i = sp.joined[h].size(); i < segs.size(); ++i) {
      const store::Segment& seg = *segs[i];
      if (i == 0 && seg.steady_tokens() > 0 && sp.sink_rows == 0 && h == 0) {
        // The context's sink rows (first segment only), uploaded once for every head below.
        sp.sink_rows = seg.steady_tokens();
        sp.sink_cap = PagesOfRows(sp.sink_rows) * kPageRows;
        KVWAVE_ASSIGN_OR_RETURN(sp.sink_k, b.Allocate(row_bytes_ * sp.sink_cap * H));
        KVWAVE_ASSIGN_OR_RETURN(sp.sink_v, b.Allocate(row_bytes_ * sp.sink_cap * H));
        sp.zones_dirty = true;
      }
      if (i == 0 && sp.sink_rows > 0) {
        const int32_t rows = std::min<int32_t>(seg.steady_tokens(), sp.sink_rows);
        const size_t off = row_bytes_ * sp.sink_cap * h;
        KVWAVE_RETURN_IF_ERROR(b.Copy(sp.sink_k.as<std::byte>() + off, seg.key_row(0),
                                      row_bytes_ * rows, kComputeStream));
        KVWAVE_RETURN_IF_ERROR(b.Copy(sp.sink_v.as<std::byte>() + off, seg.value_row(0),
                                      row_bytes_ * rows, kComputeStream));
      }
      KVWAVE_ASSIGN_OR_RETURN(const int32_t key0, Acquire(segs[i]));
      sp.joined[h].push_back(&seg);
      const int64_t C = seg.num_clusters(), at = h * sp.capacity + sp.head_clusters[h];
      if (C == 0) continue;
      KVWAVE_RETURN_IF_ERROR(b.Copy(sp.centroids.as<float>() + at * d, seg.centroids().data(),
                                    sizeof(float) * C * d, kComputeStream));
      if (o_.bf16_scores) {
        bf16.resize(C * d);
        FromFloat(seg.centroids().data(), DType::kBF16, bf16.data(), bf16.size());
        KVWAVE_RETURN_IF_ERROR(b.Copy(sp.centroids16.as<uint16_t>() + at * d, bf16.data(),
                                      sizeof(uint16_t) * C * d, kComputeStream));
      }
      KVWAVE_RETURN_IF_ERROR(b.Copy(sp.value_sums.as<float>() + at * d, seg.value_sums().data(),
                                    sizeof(float) * C * d, kComputeStream));
      KVWAVE_RETURN_IF_ERROR(b.Copy(sp.sizes.as<int32_t>() + at, seg.sizes().data(),
                                    sizeof(int32_t) * C, kComputeStream));
      keys.resize(C);
      for (int64_t c = 0; c < C; ++c) {
        keys[c] = key0 + static_cast<int32_t>(c);
        const int64_t pages = PagesOfRows(seg.cluster_size(static_cast<int32_t>(c)));
        sp.head_pages[h] += pages;
        sp.max_cluster_pages = std::max(sp.max_cluster_pages, pages);
      }
      KVWAVE_RETURN_IF_ERROR(
          b.Copy(sp.keys.as<int32_t>() + at, keys.data(), sizeof(int32_t) * C, kComputeStream));
      sp.head_clusters[h] += C;
      std::lock_guard<std::mutex> lock(mu_);
      counters_.upload_bytes +=
          static_cast<int64_t>((8 + (o_.bf16_scores ? 2 : 0)) * C * d + 8 * C);
    }
  }
  sp.clusters = need;
  return absl::OkStatus();
}

absl::Status WaveBuffer::GrowRing(Space& sp, std::span<const store::HeadKv> heads) {
  int64_t rows_max = 0;
  for (const store::HeadKv& head : heads) rows_max = std::max<int64_t>(rows_max, head.tail.size());
  if (rows_max <= sp.ring_cap) return absl::OkStatus();
  // A larger ring: every head's tail is uploaded anew.
  gpu::CudaBackend& b = *backend_;
  const int64_t H = o_.heads;
  const int64_t cap =
      PagesOfRows(std::max<int64_t>({rows_max + 64, 2 * sp.ring_cap, 128})) * kPageRows;
  KVWAVE_ASSIGN_OR_RETURN(gpu::DeviceBuffer k, b.Allocate(row_bytes_ * cap * H));
  KVWAVE_ASSIGN_OR_RETURN(gpu::DeviceBuffer v, b.Allocate(row_bytes_ * cap * H));
  if (sp.ring_cap > 0) KVWAVE_RETURN_IF_ERROR(b.Synchronize(kComputeStream));
  sp.ring_k = std::move(k);
  sp.ring_v = std::move(v);
  sp.ring_cap = cap;
  for (auto& z : sp.zone_host) z.rows = 0;
  sp.zones_dirty = true;
  return absl::OkStatus();
}

void WaveBuffer::SyncSteady(Space& sp, std::span<const store::HeadKv> heads,
                            std::vector<Run>& runs) {
  const int H = o_.heads;
  size_t run_bytes = 0;
  for (int h = 0; h < H; ++h) {
    const store::Tail& tail = heads[h].tail;
    gpu::SteadyZone& z = sp.zone_host[h];
    const int64_t f = tail.first_position(), n = tail.size();
    int64_t from = f;  // first position to upload
    if (z.rows > 0 && f >= z.first && f <= z.first + z.rows) from = z.first + z.rows;
    const size_t base = row_bytes_ * sp.ring_cap * h;
    for (int64_t p = from; p < f + n;) {
      const int64_t at = p % sp.ring_cap, len = std::min(f + n - p, sp.ring_cap - at);
      runs.push_back({tail.key_row(p - f), sp.ring_k.as<std::byte>() + base + row_bytes_ * at,
                      row_bytes_ * len});
      runs.push_back({tail.value_row(p - f), sp.ring_v.as<std::byte>() + base + row_bytes_ * at,
                      row_bytes_ * len});
      run_bytes += 2 * row_bytes_ * len;
      p += len;
    }
    gpu::SteadyZone next;
    if (sp.sink_rows > 0) {
      next.sink_k = sp.sink_k.as<std::byte>() + row_bytes_ * sp.sink_cap * h;
      next.sink_v = sp.sink_v.as<std::byte>() + row_bytes_ * sp.sink_cap * h;
    }
    next.ring_k = sp.ring_k.as<std::byte>() + base;
    next.ring_v = sp.ring_v.as<std::byte>() + base;
    next.first = f;
    next.sink_rows = sp.sink_rows;
    next.rows = static_cast<int32_t>(n);
    next.ring_rows = static_cast<int32_t>(sp.ring_cap);
    if (std::memcmp(&next, &z, sizeof(next)) != 0) sp.zones_dirty = true;
    z = next;
  }
  if (sp.zones_dirty) {  // staged (copied out of zone_host) before the space's lock is released
    runs.push_back({reinterpret_cast<const std::byte*>(sp.zone_host.data()),
                    sp.zones.as<std::byte>(), sizeof(gpu::SteadyZone) * H});
    run_bytes += sizeof(gpu::SteadyZone) * H;
    sp.zones_dirty = false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  counters_.upload_bytes += static_cast<int64_t>(run_bytes);
}

absl::Status WaveBuffer::UploadRuns(Slot& slot, std::span<const Run> runs, bool* direct) {
  // Runs up to kStagedRun bytes (a decode step's rows, q, zones, descriptors) are copied into the
  // slot's pinned staging with their copy list, one copy (DMA) takes the staging to its device
  // twin, and one gather kernel puts the runs in place from there (a gather reading the staging
  // over PCIe waited for one round trip per run: ~12 us a call, bench/results/ncu_h100_*); larger
  // ones (a first sync's tail) are copied directly (their sources stay valid until the batch is
  // complete). The slot's previous batch is complete: its staging is free, and grows to fit.
  constexpr size_t kStagedRun = size_t{64} << 10;
  gpu::CudaBackend& b = *backend_;
  size_t count = 0, data_bytes = 0;
  for (const Run& r : runs) {
    if (r.bytes == 0) continue;
    if (r.bytes > kStagedRun) {
      KVWAVE_RETURN_IF_ERROR(b.Copy(r.dst, r.src, r.bytes, kComputeStream));
      *direct = true;
      continue;
    }
    KVWAVE_CHECK(r.bytes % 16 == 0);  // the gather copies 16-byte pieces
    ++count;
    data_bytes += Align16(r.bytes);
  }
  if (count == 0) return absl::OkStatus();
  const size_t arrays = Align16(2 * sizeof(void*) * count + sizeof(int32_t) * count);
  if (arrays + data_bytes > slot.staging.size() || slot.staging_d.size() < slot.staging.size()) {
    const size_t size = std::max(arrays + data_bytes, static_cast<size_t>(o_.staging_bytes));
    slot.staging.Reset();
    slot.staging_d = gpu::DeviceBuffer();
    KVWAVE_ASSIGN_OR_RETURN(slot.staging, store::HostBuffer::Allocate(PinnedAllocator(), size));
    KVWAVE_ASSIGN_OR_RETURN(slot.staging_d, b.Allocate(size));
  }
  std::byte* blob = slot.staging.data();
  std::byte* blob_d = slot.staging_d.as<std::byte>();
  auto* src = reinterpret_cast<const void**>(blob);
  auto* dst = reinterpret_cast<void**>(blob + sizeof(void*) * count);
  auto* bytes = reinterpret_cast<int32_t*>(blob + 2 * sizeof(void*) * count);
  std::byte* data = blob + arrays;
  int64_t max_bytes = 0;
  size_t i = 0;
  for (const Run& r : runs) {
    if (r.bytes == 0 || r.bytes > kStagedRun) continue;
    std::memcpy(data, r.src, r.bytes);
    src[i] = blob_d + (data - blob);  // where the DMA puts it
    dst[i] = r.dst;
    bytes[i] = static_cast<int32_t>(r.bytes);
    max_bytes = std::max<int64_t>(max_bytes, static_cast<int64_t>(r.bytes));
    data += Align16(r.bytes);
    ++i;
  }
  KVWAVE_RETURN_IF_ERROR(b.Copy(blob_d, blob, static_cast<size_t>(data - blob), kComputeStream));
  return b.GatherPages(reinterpret_cast<const void* const*>(blob_d),
                       reinterpret_cast<void* const*>(blob_d + sizeof(void*) * count),
                       reinterpret_cast<const int32_t*>(blob_d + 2 * sizeof(void*) * count),
                       static_cast<int64_t>(count), max_bytes, kComputeStream);
}

absl::Status WaveBuffer::Sync(Space& sp, std::span<const store::HeadKv> heads,
                              std::vector<Run>& runs) {
  if (static_cast<int>(heads.size()) != o_.heads)
    return absl::InvalidArgumentError(absl::StrCat(
        "wave buffer: ", heads.size(), " heads given, the buffer's spaces have ", o_.heads));
  KVWAVE_RETURN_IF_ERROR(JoinSegments(sp, heads));
  KVWAVE_RETURN_IF_ERROR(GrowRing(sp, heads));
  SyncSteady(sp, heads, runs);
  return absl::OkStatus();
}

}  // namespace kvwave::buffer
