#include "store/prefix_registry.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

bool RowsLost(const BlockSegments& segments) {
  for (const auto& s : segments) {
    if (s->pending() != nullptr && s->pending()->any_lost()) return true;
  }
  return false;
}

int64_t SegmentBytes(const BlockSegments& segments) {
  int64_t bytes = 0;
  for (const auto& s : segments) bytes += s->bytes();
  return bytes;
}

}  // namespace

BlockPin& BlockPin::operator=(BlockPin&& o) noexcept {
  if (this != &o) {
    Reset();
    registry_ = std::exchange(o.registry_, nullptr);
    hash_ = o.hash_;
    generation_ = o.generation_;
    first_position_ = o.first_position_;
    num_tokens_ = o.num_tokens_;
    kv_heads_ = o.kv_heads_;
    segments_ = std::move(o.segments_);
    o.segments_.clear();
  }
  return *this;
}

void BlockPin::Reset() {
  segments_.clear();
  if (registry_ != nullptr) std::exchange(registry_, nullptr)->Release(hash_, generation_);
}

PrefixAttachment& PrefixAttachment::operator=(PrefixAttachment&& o) noexcept {
  if (this != &o) {
    Release();
    blocks = std::move(o.blocks);
    o.blocks.clear();
    matched_tokens = std::exchange(o.matched_tokens, 0);
    reload_error = std::exchange(o.reload_error, absl::OkStatus());
  }
  return *this;
}

void PrefixAttachment::Release() {
  while (!blocks.empty()) blocks.pop_back();  // deepest first
  matched_tokens = 0;
}

PrefixRegistry::~PrefixRegistry() {
  absl::MutexLock lock(&mu_);
  for (const auto& [hash, entry] : entries_) KVWAVE_CHECK(entry.refs == 0);
}

BlockPin PrefixRegistry::PinLocked(Entry& entry) {
  ++entry.refs;
  if (entry.in_lru) {
    lru_.erase(entry.lru);
    entry.in_lru = false;
  }
  BlockPin pin;
  pin.registry_ = this;
  pin.hash_ = entry.info.hash;
  pin.generation_ = entry.generation;
  pin.first_position_ = entry.info.first_position;
  pin.num_tokens_ = entry.info.num_tokens;
  pin.kv_heads_ = entry.info.kv_heads;
  pin.segments_ = entry.segments;
  return pin;
}

BlockPin PrefixRegistry::Insert(const BlockInfo& info, BlockSegments segments, bool persisted) {
  KVWAVE_CHECK(info.kv_heads >= 1 && !segments.empty() && segments.size() % info.kv_heads == 0);
  for (const auto& s : segments) KVWAVE_CHECK(s != nullptr);
  absl::MutexLock lock(&mu_);
  auto [it, fresh] = entries_.try_emplace(info.hash);
  Entry& entry = it->second;
  if (fresh) {
    entry.info = info;
    entry.generation = next_generation_++;
  }
  entry.persisted = entry.persisted || persisted;
  if (entry.segments.empty()) {  // new, or evicted: adopt the caller's segments
    entry.segments = std::move(segments);
    entry.bytes = SegmentBytes(entry.segments);
    resident_bytes_ += entry.bytes;
  }
  return PinLocked(entry);
}

void PrefixRegistry::AddPersisted(const BlockInfo& info) {
  absl::MutexLock lock(&mu_);
  auto [it, fresh] = entries_.try_emplace(info.hash);
  if (fresh) {
    it->second.info = info;
    it->second.generation = next_generation_++;
  }
  it->second.persisted = true;
}

void PrefixRegistry::MarkPersisted(const BlockHash& hash) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(hash);
  if (it != entries_.end()) it->second.persisted = true;
}

void PrefixRegistry::EraseLocked(const BlockHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return;
  if (it->second.in_lru) lru_.erase(it->second.lru);
  resident_bytes_ -= it->second.bytes;
  entries_.erase(it);
}

void PrefixRegistry::Erase(const BlockHash& hash) {
  absl::MutexLock lock(&mu_);
  EraseLocked(hash);
}

void PrefixRegistry::Release(const BlockHash& hash, uint64_t generation) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(hash);
  if (it == entries_.end() || it->second.generation != generation) return;
  Entry& entry = it->second;
  KVWAVE_CHECK(entry.refs > 0);
  if (--entry.refs == 0 && !entry.segments.empty()) {
    entry.lru = lru_.insert(lru_.end(), hash);
    entry.in_lru = true;
  }
}

absl::StatusOr<BlockPin> PrefixRegistry::PinOrReload(const BlockHash& hash) {
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(hash);
    if (it == entries_.end()) return BlockPin();  // unknown: the match ends here
    if (RowsLost(it->second.segments)) {
      // A remote-attached block whose rows could not be fetched: never attach it again (its
      // current users keep their pins and get DataLoss for those rows).
      EraseLocked(hash);
      return BlockPin();
    }
    if (!it->second.segments.empty()) return PinLocked(it->second);
    if (!loader_) return absl::FailedPreconditionError("evicted block and no loader");
  }
  absl::StatusOr<BlockSegments> loaded = loader_(hash);  // without the lock: disk I/O
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(hash);
  if (it == entries_.end()) return BlockPin();  // forgotten during the reload
  Entry& entry = it->second;
  if (!entry.segments.empty()) return PinLocked(entry);  // another thread reloaded it first
  if (!loaded.ok()) {
    const absl::StatusCode code = loaded.status().code();
    if (code == absl::StatusCode::kDataLoss || code == absl::StatusCode::kNotFound) {
      if (entry.refs == 0) EraseLocked(hash);
    }
    return loaded.status();
  }
  if (loaded->empty() || loaded->size() % entry.info.kv_heads != 0) {
    return absl::InternalError(absl::StrCat("reload of ", hash.ToHex(), ": wrong segment count"));
  }
  entry.segments = *std::move(loaded);
  entry.bytes = SegmentBytes(entry.segments);
  resident_bytes_ += entry.bytes;
  ++reloads_;
  return PinLocked(entry);
}

PrefixAttachment PrefixRegistry::AttachLongest(std::span<const BlockHash> hashes) {
  PrefixAttachment attachment;
  for (const BlockHash& hash : hashes) {
    absl::StatusOr<BlockPin> pin = PinOrReload(hash);
    if (!pin.ok()) {
      attachment.reload_error = pin.status();
      break;
    }
    if (!pin->valid()) break;
    attachment.matched_tokens += pin->num_tokens();
    attachment.blocks.push_back(*std::move(pin));
  }
  absl::MutexLock lock(&mu_);
  matched_blocks_ += static_cast<int64_t>(attachment.blocks.size());
  return attachment;
}

int64_t PrefixRegistry::Evict(int64_t bytes, bool drop_unpersisted) {
  absl::MutexLock lock(&mu_);
  int64_t freed = 0;
  for (auto lit = lru_.begin(); lit != lru_.end() && freed < bytes;) {
    Entry& entry = entries_.at(*lit);
    if (!entry.persisted && !drop_unpersisted) {
      ++lit;
      continue;
    }
    freed += entry.bytes;
    ++evictions_;
    lit = lru_.erase(lit);
    entry.in_lru = false;
    if (entry.persisted) {
      resident_bytes_ -= entry.bytes;
      entry.bytes = 0;
      entry.segments.clear();
    } else {
      const BlockHash hash = entry.info.hash;
      EraseLocked(hash);
    }
  }
  return freed;
}

bool PrefixRegistry::Contains(const BlockHash& hash) const {
  absl::MutexLock lock(&mu_);
  return entries_.contains(hash);
}

PrefixRegistryStats PrefixRegistry::stats() const {
  absl::MutexLock lock(&mu_);
  PrefixRegistryStats s;
  s.entries = static_cast<int64_t>(entries_.size());
  for (const auto& [hash, entry] : entries_) {
    if (!entry.segments.empty()) ++s.resident_entries;
    if (entry.refs > 0) ++s.pinned_entries;
    if (entry.in_lru) s.evictable_bytes += entry.bytes;
  }
  s.resident_bytes = resident_bytes_;
  s.matched_blocks = matched_blocks_;
  s.reloads = reloads_;
  s.evictions = evictions_;
  return s;
}

}  // namespace kvwave::store
