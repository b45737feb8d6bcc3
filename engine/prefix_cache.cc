#include "engine/prefix_cache.h"

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "engine/graph_ops.h"
#include "spdlog/spdlog.h"

namespace kvwave::engine {
namespace {

absl::StatusOr<remote::RemoteTierOptions> RemoteOptions(const config::Settings& s) {
  remote::RemoteTierOptions o;
  KVWAVE_ASSIGN_OR_RETURN(o.cluster.seeds, remote::ParseSeeds(s.remote_redis));
  o.cluster.connect_timeout_ms = s.remote_connect_timeout_ms;
  o.cluster.command_timeout_ms = s.remote_command_timeout_ms;
  o.cluster.down_retry_ms = s.remote_down_retry_ms;
  o.cluster.user = s.remote_user;
  o.cluster.password = s.remote_password;
  o.write = s.remote_mode == "readwrite";
  o.queue_max_bytes = s.remote_queue_bytes;
  o.max_value_bytes = s.remote_max_value_bytes;
  o.fetch_threads = static_cast<int>(s.remote_fetch_threads);
  o.fetch_chunk_bytes = s.remote_fetch_chunk_bytes;
  o.fetch_quiet_ms = s.remote_fetch_quiet_ms;
  return o;
}

}  // namespace

PrefixCache::PrefixCache(const config::Settings& settings, store::HostAllocator* allocator,
                         store::MemoryBudget* budget)
    : settings_(settings), allocator_(allocator), budget_(budget) {}

PrefixCache::~PrefixCache() {
  remote_.reset();   // drains the remote write-behind queue
  persist_.reset();  // drains the write-behind queue while the registry still exists
  registry_.reset();
}

absl::StatusOr<std::unique_ptr<PrefixCache>> PrefixCache::Create(const config::Settings& settings,
                                                                 store::HostAllocator* allocator,
                                                                 store::MemoryBudget* budget,
                                                                 bool pending_rows_ok) {
  std::unique_ptr<PrefixCache> cache(new PrefixCache(settings, allocator, budget));
  cache->lazy_remote_ = pending_rows_ok && settings.remote_attach == "index";
  PrefixCache* self = cache.get();
  if (settings.remote_mode != "off") {
    KVWAVE_ASSIGN_OR_RETURN(remote::RemoteTierOptions options, RemoteOptions(settings));
    KVWAVE_ASSIGN_OR_RETURN(cache->remote_, remote::RemoteTier::Create(std::move(options)));
    spdlog::info("remote: Redis Cluster tier {} via {}", settings.remote_mode,
                 settings.remote_redis);
  }
  if (settings.persist_path.empty()) {
    cache->registry_ = std::make_unique<store::PrefixRegistry>();
    return cache;
  }
  KVWAVE_ASSIGN_OR_RETURN(cache->durability_, store::ParseDurability(settings.durability));
  store::PersistOptions options;
  options.path = settings.persist_path;
  options.durability = cache->durability_;
  options.encode_graph = EncodeSegmentGraph;
  options.decode_graph = DecodeSegmentGraph;
  KVWAVE_ASSIGN_OR_RETURN(cache->persist_, store::PersistStore::Open(options));
  if (!cache->persist_->startup_warning().empty()) {
    spdlog::warn("{}", cache->persist_->startup_warning());
  }
  cache->registry_ = std::make_unique<store::PrefixRegistry>(
      [self](const store::BlockHash& hash) -> absl::StatusOr<store::BlockSegments> {
        KVWAVE_ASSIGN_OR_RETURN(store::LoadedBlock block,
                                self->persist_->LoadBlock(hash, self->allocator_, *self->budget_));
        return std::move(block.segments);
      });
  int64_t blocks = 0;
  KVWAVE_ASSIGN_OR_RETURN(
      int64_t dropped, cache->persist_->ForEachBlock([&](const store::BlockRecord& r) {
        cache->registry_->AddPersisted(
            {r.hash, r.first_position, static_cast<int32_t>(r.tokens.size()), r.shape.kv_heads});
        ++blocks;
      }));
  spdlog::info("persist: {} blocks registered from {}, {} corrupt records dropped", blocks,
               settings.persist_path, dropped);
  return cache;
}

std::string PrefixCache::ModelId(const store::ModelShape& shape) const {
  // Everything that shapes a segment: contexts that differ in any of it never share.
  return absl::StrCat(store::ToString(shape), "/S", settings_.prefill_segment_tokens, "/p",
                      settings_.page_tokens, "/c", settings_.tokens_per_cluster, "/k",
                      settings_.sink_tokens, "/i", settings_.kmeans_iterations, "/",
                      settings_.kmeans_kernel);
}

int64_t PrefixCache::Attach(store::Context& ctx, std::vector<int32_t> token_ids,
                            const std::string& name_space, bool may_register) {
  auto prefix = std::make_unique<store::PrefixState>();
  prefix->may_register = may_register;
  prefix->model_id = ModelId(ctx.shape());
  prefix->name_space = name_space;
  prefix->hashes = store::PrefixBlockHashes(token_ids, settings_.prefill_segment_tokens, name_space,
                                            prefix->model_id);
  prefix->token_ids = std::move(token_ids);
  store::PrefixAttachment attachment = registry_->AttachLongest(prefix->hashes);
  if (!attachment.reload_error.ok()) {
    spdlog::warn("prefix: match stopped at a block that did not reload: {}",
                 attachment.reload_error.ToString());
  } else if (remote_ != nullptr && attachment.blocks.size() < prefix->hashes.size()) {
    AttachRemote(ctx, *prefix, attachment);
  }
  const int64_t matched = attachment.matched_tokens;
  const int32_t kv_heads = ctx.shape().kv_heads;
  for (int32_t l = 0; l < ctx.shape().layers; ++l) {
    store::Context::Layer& layer = ctx.layer(l);
    for (int32_t h = 0; h < kv_heads; ++h) {
      for (const store::BlockPin& pin : attachment.blocks) {
        layer.heads[h].segments.push_back(pin.segment(l, h));
        layer.heads[h].graphs.push_back(pin.segment(l, h)->graph());  // null: none
      }
      layer.heads[h].tail.StartAt(matched);
    }
    layer.tokens = matched;
  }
  {
    absl::MutexLock lock(&prefix->mu);
    prefix->attachment = std::move(attachment);
    prefix->building.resize(prefix->hashes.size());
    prefix->layers_sealed.assign(prefix->hashes.size(), 0);
  }
  ctx.set_prefix(std::move(prefix));
  return matched;
}

store::BlockRecord PrefixCache::MakeRecord(const store::Context& ctx,
                                           const store::PrefixState& prefix, size_t block) const {
  const int64_t block_tokens = settings_.prefill_segment_tokens;
  store::BlockRecord record;
  record.hash = prefix.hashes[block];
  record.parent = block > 0 ? prefix.hashes[block - 1] : store::BlockHash{};
  record.shape = ctx.shape();
  record.name_space = prefix.name_space;
  record.model_id = prefix.model_id;
  record.first_position = static_cast<int64_t>(block) * block_tokens;
  record.tokens.assign(prefix.token_ids.begin() + record.first_position,
                       prefix.token_ids.begin() + record.first_position + block_tokens);
  return record;
}

void PrefixCache::AttachRemote(const store::Context& ctx, const store::PrefixState& prefix,
                               store::PrefixAttachment& attachment) {
  std::vector<store::BlockRecord> wanted;
  for (size_t b = attachment.blocks.size(); b < prefix.hashes.size(); ++b) {
    wanted.push_back(MakeRecord(ctx, prefix, b));
  }
  std::vector<store::BlockSegments> found =
      remote_->FetchRun(wanted, allocator_, *budget_, lazy_remote_);
  for (size_t i = 0; i < found.size(); ++i) {
    const store::BlockRecord& r = wanted[i];
    store::BlockInfo info{r.hash, r.first_position, static_cast<int32_t>(r.tokens.size()),
                          ctx.shape().kv_heads};
    attachment.blocks.push_back(registry_->Insert(info, std::move(found[i]), /*persisted=*/false));
    attachment.matched_tokens = r.first_position + info.num_tokens;
  }
}

absl::Status PrefixCache::OnLayerSealed(store::Context& ctx, int32_t layer_index) {
  store::PrefixState* prefix = ctx.prefix();
  if (prefix == nullptr || !prefix->may_register || ctx.decoding()) return absl::OkStatus();
  const int64_t block_tokens = settings_.prefill_segment_tokens;
  store::Context::Layer& layer = ctx.layer(layer_index);
  const auto& last = layer.heads[0].segments.back();
  if (last->num_tokens() != block_tokens || last->first_position() % block_tokens != 0) {
    return absl::OkStatus();  // not a whole block
  }
  const size_t block = static_cast<size_t>(last->first_position() / block_tokens);
  absl::MutexLock lock(&prefix->mu);
  if (block >= prefix->hashes.size() || block < prefix->attachment.blocks.size()) {
    return absl::OkStatus();  // beyond the token ids, or already shared
  }
  const int32_t kv_heads = ctx.shape().kv_heads;
  store::BlockSegments& segs = prefix->building[block];
  segs.resize(static_cast<size_t>(ctx.shape().layers) * kv_heads);
  for (int32_t h = 0; h < kv_heads; ++h) {
    segs[static_cast<size_t>(layer_index) * kv_heads + h] = layer.heads[h].segments.back();
  }
  if (++prefix->layers_sealed[block] < ctx.shape().layers) return absl::OkStatus();
  // Blocks complete in order: every layer seals block i before block i + 1.
  KVWAVE_CHECK(block == prefix->attachment.blocks.size());
  return RegisterBlock(ctx, *prefix, block);
}

absl::Status PrefixCache::RegisterBlock(store::Context& ctx, store::PrefixState& prefix,
                                        size_t block) {
  const int64_t block_tokens = settings_.prefill_segment_tokens;
  store::BlockSegments segs = std::move(prefix.building[block]);
  store::BlockInfo info{prefix.hashes[block], static_cast<int64_t>(block) * block_tokens,
                        static_cast<int32_t>(block_tokens), ctx.shape().kv_heads};
  prefix.attachment.blocks.push_back(registry_->Insert(info, segs, /*persisted=*/false));
  prefix.attachment.matched_tokens = info.first_position + block_tokens;
  blocks_registered_.fetch_add(1, std::memory_order_relaxed);
  if (persist_ == nullptr && (remote_ == nullptr || !remote_->writes())) return absl::OkStatus();

  store::BlockRecord record = MakeRecord(ctx, prefix, block);
  if (remote_ != nullptr && remote_->writes()) {
    (void)remote_->Enqueue(record, segs);  // written behind; a full queue drops it (counted)
  }
  if (persist_ == nullptr) return absl::OkStatus();
  store::PrefixRegistry* registry = registry_.get();
  if (durability_ == store::Durability::kSync) {
    absl::Status s = persist_->PutBlock(record, segs);
    if (!s.ok()) {
      persist_errors_.fetch_add(1, std::memory_order_relaxed);
      return s;  // the caller learns its block is not durable
    }
    registry->MarkPersisted(info.hash);
    return absl::OkStatus();
  }
  auto done = [registry, hash = info.hash, this](const absl::Status& st) {
    if (st.ok()) {
      registry->MarkPersisted(hash);
    } else {
      persist_errors_.fetch_add(1, std::memory_order_relaxed);
      spdlog::error("persist: block write failed: {}", st.ToString());
    }
  };
  absl::Status s = persist_->EnqueueBlock(record, segs, done);
  if (absl::IsResourceExhausted(s)) {
    // The write-behind queue is full: apply backpressure to this Append/Seal (never to Attend)
    // by waiting for the queue to drain, rather than dropping the block.
    s = persist_->Flush();
    if (s.ok()) s = persist_->EnqueueBlock(std::move(record), std::move(segs), done);
  }
  if (!s.ok()) {
    persist_errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::warn("persist: block not queued: {}", s.ToString());
  }
  return absl::OkStatus();
}

int64_t PrefixCache::Evict(int64_t bytes) { return registry_->Evict(bytes); }

void PrefixCache::WaitRemoteFetches() {
  if (remote_ != nullptr) remote_->fetcher().WaitIdle();
}

absl::Status PrefixCache::Flush() {
  absl::Status s = persist_ == nullptr ? absl::OkStatus() : persist_->Flush();
  if (remote_ != nullptr) s.Update(remote_->Flush());
  return s;
}

PrefixCacheStats PrefixCache::Stats() const {
  PrefixCacheStats s;
  s.registry = registry_->stats();
  if (persist_ != nullptr) s.persist = persist_->stats();
  s.persistent = persist_ != nullptr;
  if (remote_ != nullptr) s.remote = remote_->stats();
  s.remote_on = remote_ != nullptr;
  s.blocks_registered = blocks_registered_.load(std::memory_order_relaxed);
  s.persist_errors = persist_errors_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace kvwave::engine
