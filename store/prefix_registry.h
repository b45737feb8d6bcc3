// The in-memory registry of shared-prefix blocks: block hash (store/prefix_hash.h) -> the sealed
// segments of every (layer, KV head) of that block, reference-counted by the contexts attached.
//
// Lifecycle of a block entry:
//   resident, pinned      : segments in DRAM, >= 1 BlockPin alive (contexts using it)
//   resident, unreferenced: no pin; on the LRU list (front = released longest ago)
//   evicted               : persisted entries only: segments dropped by Evict, the entry stays;
//                           AttachLongest reloads it through the loader (RocksDB) on demand
//   gone                  : Evict of an unpersisted entry, Erase, or a failed reload
// A pin is a move-only RAII handle holding the block's segments; the segments are immutable, so
// a context that diverges after a shared block never changes it (it seals its own next block).
//
// Thread-safety: all methods are thread-safe (one mutex; the loader runs without it held).
// BlockPin and PrefixAttachment are used by one thread at a time; they must not outlive the
// registry.
#ifndef KVWAVE_STORE_PREFIX_REGISTRY_H_
#define KVWAVE_STORE_PREFIX_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "store/prefix_hash.h"
#include "store/segment.h"

namespace kvwave::store {

class PrefixRegistry;

// Segments of one block, [layer * kv_heads + kv_head].
using BlockSegments = std::vector<std::shared_ptr<const Segment>>;

// A reference on a registered block; releases it on destruction.
class BlockPin {
 public:
  BlockPin() = default;
  BlockPin(BlockPin&& o) noexcept { *this = std::move(o); }
  BlockPin& operator=(BlockPin&& o) noexcept;
  BlockPin(const BlockPin&) = delete;
  BlockPin& operator=(const BlockPin&) = delete;
  ~BlockPin() { Reset(); }

  bool valid() const { return registry_ != nullptr; }
  const BlockHash& hash() const { return hash_; }
  int64_t first_position() const { return first_position_; }
  int32_t num_tokens() const { return num_tokens_; }
  const BlockSegments& segments() const { return segments_; }
  const std::shared_ptr<const Segment>& segment(int32_t layer, int32_t kv_head) const {
    return segments_[static_cast<size_t>(layer) * kv_heads_ + kv_head];
  }
  void Reset();

 private:
  friend class PrefixRegistry;
  PrefixRegistry* registry_ = nullptr;
  BlockHash hash_;
  uint64_t generation_ = 0;
  int64_t first_position_ = 0;
  int32_t num_tokens_ = 0;
  int32_t kv_heads_ = 0;
  BlockSegments segments_;
};

// The blocks a context attached, in prefix order; released deepest block first, so the LRU
// evicts the tails of prefixes before their shared beginnings.
struct PrefixAttachment {
  std::vector<BlockPin> blocks;
  int64_t matched_tokens = 0;
  absl::Status reload_error;  // why the match stopped at a cached but unloadable block, if so

  PrefixAttachment() = default;
  PrefixAttachment(PrefixAttachment&&) = default;
  PrefixAttachment& operator=(PrefixAttachment&& o) noexcept;
  ~PrefixAttachment() { Release(); }
  void Release();
};

struct BlockInfo {
  BlockHash hash;
  int64_t first_position = 0;
  int32_t num_tokens = 0;
  int32_t kv_heads = 0;
};

struct PrefixRegistryStats {
  int64_t entries = 0;
  int64_t resident_entries = 0;
  int64_t pinned_entries = 0;
  int64_t resident_bytes = 0;   // segment bytes of resident entries
  int64_t evictable_bytes = 0;  // of resident, unreferenced entries
  int64_t matched_blocks = 0;   // blocks attached by AttachLongest, all time
  int64_t reloads = 0;
  int64_t evictions = 0;  // entries whose segments left DRAM
};

class PrefixRegistry {
 public:
  // Reloads an evicted block's segments (e.g. PersistStore::LoadBlock). DataLoss or NotFound
  // make the registry forget the block; other errors (ResourceExhausted) keep it evicted.
  using Loader = std::function<absl::StatusOr<BlockSegments>(const BlockHash&)>;

  explicit PrefixRegistry(Loader loader = nullptr) : loader_(std::move(loader)) {}
  ~PrefixRegistry();  // REQUIRES: no pin alive
  PrefixRegistry(const PrefixRegistry&) = delete;
  PrefixRegistry& operator=(const PrefixRegistry&) = delete;

  // Registers a sealed block and pins it. If the hash is already resident the existing segments
  // win (the pin holds them: the caller may swap its own for them); an evicted entry adopts
  // `segments`. REQUIRES: segments.size() is a multiple of kv_heads, none null.
  BlockPin Insert(const BlockInfo& info, BlockSegments segments, bool persisted);
  // A block that is in RocksDB but not in memory (at startup, from PersistStore::ForEachBlock).
  void AddPersisted(const BlockInfo& info);
  // The block's write to RocksDB completed: it may now be evicted and reloaded.
  void MarkPersisted(const BlockHash& hash);
  // Forgets a block (pins stay valid and release nothing).
  void Erase(const BlockHash& hash);

  // Pins the longest run hashes[0..m) of registered blocks, reloading evicted ones. Stops at the
  // first unknown block or the first that fails to reload.
  PrefixAttachment AttachLongest(std::span<const BlockHash> hashes);

  // Frees DRAM at the memory limit: takes unreferenced resident entries LRU-first until `bytes`
  // are freed. Persisted entries are evicted (reloadable); unpersisted ones are forgotten when
  // drop_unpersisted, skipped otherwise. Returns the segment bytes released.
  int64_t Evict(int64_t bytes, bool drop_unpersisted = true);

  bool Contains(const BlockHash& hash) const;
  PrefixRegistryStats stats() const;

 private:
  friend class BlockPin;
  struct Entry {
    BlockInfo info;
    BlockSegments segments;  // empty while evicted
    int64_t bytes = 0;       // of segments
    int64_t refs = 0;
    bool persisted = false;
    uint64_t generation = 0;
    bool in_lru = false;
    std::list<BlockHash>::iterator lru;
  };
  BlockPin PinLocked(Entry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Release(const BlockHash& hash, uint64_t generation);
  void EraseLocked(const BlockHash& hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pins hash's entry, reloading it if evicted; an invalid pin when the hash is unknown.
  absl::StatusOr<BlockPin> PinOrReload(const BlockHash& hash);

  const Loader loader_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::list<BlockHash> lru_ ABSL_GUARDED_BY(mu_);  // resident, unreferenced; front = oldest
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t resident_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t matched_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reloads_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_PREFIX_REGISTRY_H_
