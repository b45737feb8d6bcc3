// Shared prefixes and persistence for the engine: the in-memory prefix registry (store/
// prefix_registry.h) and, when persist.path is set, the RocksDB tier (store/persist.h).
//
//   Open with token ids  -> Attach: the longest cached run of full blocks is pinned and placed in
//                           the new context's heads (reloaded from RocksDB when evicted)
//   a layer seals block i -> OnLayerSealed: when every layer has sealed block i, the block is
//                           registered (shared from now on) and persisted: synchronously in
//                           durability "sync" (the Append/Seal that sealed it returns after the
//                           fsync), written behind otherwise (never blocking Attend)
//   memory limit reached -> Evict: unreferenced blocks leave DRAM, LRU first; persisted ones
//                           come back on demand
//   restart              -> the registry is reloaded from RocksDB at Create
//   remote tier (remote.mode, remote/remote_tier.h): Attach continues past the local run with
//                           the blocks found in the Redis Cluster; a registered block is also
//                           queued for writing there (readwrite; never waited for). With
//                           remote.attach = index the blocks come with their rows pending
//                           (store/pending_rows.h); a block whose rows turn out lost is
//                           forgotten by the registry (PrefixRegistry::AttachLongest), so the
//                           next Open prefills it
//
// Only contexts opened with token ids take part; blocks are prefill_segment_tokens long.
// Thread-safety: all methods are thread-safe.
#ifndef KVWAVE_ENGINE_PREFIX_CACHE_H_
#define KVWAVE_ENGINE_PREFIX_CACHE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "config/settings.h"
#include "remote/remote_tier.h"
#include "store/context.h"
#include "store/host_memory.h"
#include "store/persist.h"
#include "store/prefix_registry.h"

namespace kvwave::engine {

struct PrefixCacheStats {
  store::PrefixRegistryStats registry;
  store::PersistStats persist;
  bool persistent = false;
  remote::RemoteStats remote;
  bool remote_on = false;
  int64_t blocks_registered = 0;
  int64_t persist_errors = 0;
};

class PrefixCache {
 public:
  // `pending_rows_ok`: the attention backend reads segments with pending rows
  // (AttentionBackend::reads_pending_rows); else remote blocks are attached whole.
  static absl::StatusOr<std::unique_ptr<PrefixCache>> Create(const config::Settings& settings,
                                                             store::HostAllocator* allocator,
                                                             store::MemoryBudget* budget,
                                                             bool pending_rows_ok = false);
  ~PrefixCache();

  // Sets up ctx's prefix state from token ids and attaches the longest cached prefix: its
  // segments go into every head, tails start after it. Returns the matched token count. Blocks
  // the context seals later are registered only if `may_register` (the opener may write the
  // namespace; engine::OpenOptions::prefix_access).
  // REQUIRES: ctx is not yet visible to other threads.
  int64_t Attach(store::Context& ctx, std::vector<int32_t> token_ids, const std::string& name_space,
                 bool may_register);

  // Called after layer `layer` sealed one segment per head (the last one in each head).
  // REQUIRES: the layer's lock held exclusively.
  [[nodiscard]] absl::Status OnLayerSealed(store::Context& ctx, int32_t layer);

  // Frees at least `bytes` of unreferenced cached blocks if it can; returns the bytes freed.
  int64_t Evict(int64_t bytes);
  // Makes every write durable (waits for the write-behind queue).
  [[nodiscard]] absl::Status Flush();
  // Waits for the background fetch of remote-attached rows (remote/kv_fetcher.h).
  void WaitRemoteFetches();

  PrefixCacheStats Stats() const;

 private:
  PrefixCache(const config::Settings& settings, store::HostAllocator* allocator,
              store::MemoryBudget* budget);
  absl::Status RegisterBlock(store::Context& ctx, store::PrefixState& prefix, size_t block)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(prefix.mu);
  std::string ModelId(const store::ModelShape& shape) const;
  // Extends `attachment` with the blocks of `prefix` that follow it in the remote tier.
  void AttachRemote(const store::Context& ctx, const store::PrefixState& prefix,
                    store::PrefixAttachment& attachment);
  // The registry record of block `block` (what the persistence and remote tiers store).
  store::BlockRecord MakeRecord(const store::Context& ctx, const store::PrefixState& prefix,
                                size_t block) const;

  const config::Settings settings_;
  store::HostAllocator* allocator_;
  store::MemoryBudget* budget_;
  store::Durability durability_ = store::Durability::kNone;
  bool lazy_remote_ = false;  // remote.attach = index and a backend that reads pending rows
  // Destruction order matters: persist_ drains its queue, whose callbacks use registry_.
  std::unique_ptr<store::PrefixRegistry> registry_;
  std::unique_ptr<store::PersistStore> persist_;
  std::unique_ptr<remote::RemoteTier> remote_;                     // null when remote.mode is off
  std::atomic<int64_t> blocks_registered_{0}, persist_errors_{0};  // relaxed: statistics
};

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_PREFIX_CACHE_H_
