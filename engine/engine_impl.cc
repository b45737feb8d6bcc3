// Engine implementation: the context table, argument checks, locking, memory reservation, and
// fan-out of per-head work (engine/head_ops.h) over KV heads with oneTBB.
#include <sys/random.h>

#include <atomic>
#include <cerrno>
#include <mutex>
#include <shared_mutex>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "config/status_macros.h"
#include "engine/attention_backend.h"
#include "engine/cpu_backend.h"
#include "engine/engine.h"
#include "engine/finite.h"
#include "engine/head_ops.h"
#include "engine/prefix_cache.h"
#include "spdlog/spdlog.h"
#include "store/context.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace kvwave::engine {
namespace {

absl::Status CheckSize(const char* what, size_t got, size_t want) {
  if (got != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", got, " elements, expected ", want));
  }
  return absl::OkStatus();
}

class EngineImpl final : public Engine {
 public:
  EngineImpl(const config::Settings& s, EngineDeps deps)
      : settings_(s),
        host_pool_(std::move(deps.host_pool)),
        backend_(std::move(deps.backend)),
        budget_(s.memory_limit_bytes),
        arena_(s.compute_threads > 0 ? static_cast<int>(s.compute_threads)
                                     : tbb::task_arena::automatic) {}

  absl::Status Init() {
    if (host_pool_ == nullptr) {
      host_pool_ =
          std::make_shared<store::HostPool>(store::MappedHostAllocator(), settings_.host_pool_bytes);
    }
    if (backend_ == nullptr) backend_ = CreateCpuBackend(settings_);
    KVWAVE_ASSIGN_OR_RETURN(prefix_cache_,
                            PrefixCache::Create(settings_, host_pool_.get(), &budget_));
    return absl::OkStatus();
  }

  ~EngineImpl() override {
    if (prefix_cache_ != nullptr) {
      absl::Status s = prefix_cache_->Flush();
      if (!s.ok()) spdlog::error("engine: final flush: {}", s.ToString());
    }
    absl::flat_hash_map<ContextId, std::shared_ptr<store::Context>> contexts;
    {
      absl::MutexLock lock(&mu_);
      contexts.swap(contexts_);
    }
    contexts.clear();  // pins go before the prefix cache; the backend hears OnClose of each
  }

  absl::StatusOr<OpenResult> Open(const OpenOptions& options) override {
    KVWAVE_RETURN_IF_ERROR(store::Validate(options.shape));
    // Everything the context will hold is charged before it is built (issue 15, item 10).
    KVWAVE_ASSIGN_OR_RETURN(
        store::MemoryCharge charge,
        Reserve(store::Context::SkeletonBytes(options.shape, options.token_ids.size(),
                                              settings_.prefill_segment_tokens)));
    const uint64_t id = NewContextId();
    // The backend hears OnClose when the last reference goes: after Close and after every call
    // in flight on the context has returned.
    AttentionBackend* backend = backend_.get();
    std::shared_ptr<store::Context> ctx(
        new store::Context(id, options.shape, host_pool_.get()), [backend](store::Context* c) {
          backend->OnClose(*c);
          delete c;
        });
    ctx->add_charge(std::move(charge));
    int64_t matched = 0;
    if (!options.token_ids.empty() && options.prefix_access != PrefixAccess::kNone) {
      matched = prefix_cache_->Attach(*ctx, options.token_ids, options.prefix_namespace,
                                      options.prefix_access == PrefixAccess::kWrite);
      KVWAVE_ASSIGN_OR_RETURN(
          store::MemoryCharge attached,
          Reserve(store::Context::AttachedBytes(options.shape,
                                                matched / settings_.prefill_segment_tokens)));
      ctx->add_charge(std::move(attached));
    }
    if (absl::Status s = backend_->OnOpen(*ctx); !s.ok()) {
      spdlog::error("context {}: backend {} OnOpen: {}", id, backend_->name(), s.ToString());
    }
    {
      absl::MutexLock lock(&mu_);
      if (contexts_.try_emplace(id, ctx).second) return OpenResult{id, matched};
    }
    ctx.reset();  // two Opens drew the same unused id at once (p ~ 2^-64): start again
    return Open(options);
  }

  absl::Status Flush() override { return prefix_cache_->Flush(); }

  absl::Status Append(ContextId id, int32_t layer, int64_t n, std::span<const std::byte> k,
                      std::span<const std::byte> v) override;
  absl::Status Seal(ContextId id) override;
  absl::Status Attend(ContextId id, int32_t layer, std::span<const float> q,
                      const AttendBudget& budget, std::span<float> out, std::span<float> lse,
                      AttendStats* stats) override;
  absl::Status Retrieve(ContextId id, int32_t layer, std::span<const float> q,
                        const RetrieveOptions& options, std::span<int64_t> positions,
                        std::span<float> scores, RetrieveStats* stats) override;
  absl::Status Gather(ContextId id, int32_t layer, std::span<const int64_t> positions,
                      std::span<std::byte> k, std::span<std::byte> v) override;

  absl::Status Close(ContextId id) override {
    std::shared_ptr<store::Context> ctx;
    {
      absl::MutexLock lock(&mu_);
      auto it = contexts_.find(id);
      if (it == contexts_.end()) return UnknownContext(id);
      ctx = std::move(it->second);
      contexts_.erase(it);
    }
    // Memory goes (and the backend hears OnClose) when the last in-flight call drops its
    // reference: here, outside the table's lock, when none is in flight.
    ctx.reset();
    return absl::OkStatus();
  }

  absl::StatusOr<ContextInfo> Info(ContextId id) override;

  std::vector<ContextId> ListContexts() override {
    absl::MutexLock lock(&mu_);
    std::vector<ContextId> ids;
    for (const auto& [id, ctx] : contexts_) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  EngineStats Stats() override {
    EngineStats s;
    {
      absl::MutexLock lock(&mu_);
      s.contexts = static_cast<int64_t>(contexts_.size());
    }
    s.memory_used_bytes = budget_.used();
    s.memory_limit_bytes = budget_.limit();
    s.segments_sealed = segments_sealed_.load(std::memory_order_relaxed);
    s.tokens_appended = tokens_appended_.load(std::memory_order_relaxed);
    s.attend_calls = attend_calls_.load(std::memory_order_relaxed);
    s.retrieve_calls = retrieve_calls_.load(std::memory_order_relaxed);
    const PrefixCacheStats p = prefix_cache_->Stats();
    s.prefix_blocks_registered = p.blocks_registered;
    s.prefix_blocks_resident = p.registry.resident_entries;
    s.prefix_blocks_known = p.registry.entries;
    s.prefix_matched_blocks = p.registry.matched_blocks;
    s.prefix_evictions = p.registry.evictions;
    s.prefix_reloads = p.registry.reloads;
    s.persist_bytes_written = p.persist.segment_bytes_written;
    s.persist_corrupt_records = p.persist.corrupt_records;
    s.persist_errors = p.persist_errors;
    s.remote_blocks_written = p.remote.blocks_written;
    s.remote_bytes_written = p.remote.bytes_written;
    s.remote_parts_sent = p.remote.parts_sent;
    s.remote_write_errors = p.remote.write_errors;
    s.remote_queue_dropped = p.remote.queue_dropped;
    s.remote_blocks_fetched = p.remote.blocks_fetched;
    s.remote_bytes_read = p.remote.bytes_read;
    s.remote_blocks_partial = p.remote.blocks_partial;
    s.remote_blocks_corrupt = p.remote.blocks_corrupt;
    s.remote_blocks_version_mismatch = p.remote.blocks_version_mismatch;
    s.remote_unavailable = p.remote.unavailable;
    s.remote_nodes = p.remote.cluster.nodes;
    s.remote_nodes_down = p.remote.cluster.nodes_down;
    s.backend = backend_->Stats();
    return s;
  }

  const config::Settings& settings() const override { return settings_; }
  store::HostPool& host_pool() override { return *host_pool_; }

 private:
  // A random nonzero id not in use: ids are not guessable from one another (getrandom(2), the
  // kernel's CSPRNG), so a session cannot name another's context by counting.
  ContextId NewContextId() {
    for (;;) {
      ContextId id = 0;
      auto* p = reinterpret_cast<char*>(&id);
      for (size_t got = 0; got < sizeof(id);) {
        const ssize_t n = getrandom(p + got, sizeof(id) - got, 0);
        if (n > 0) got += static_cast<size_t>(n);
        KVWAVE_CHECK(n > 0 || errno == EINTR);  // getrandom with flags 0 cannot fail otherwise
      }
      absl::MutexLock lock(&mu_);
      if (id != 0 && !contexts_.contains(id)) return id;
    }
  }

  static absl::Status UnknownContext(ContextId id) {
    return absl::NotFoundError(absl::StrCat("unknown context ", id));
  }

  absl::StatusOr<std::shared_ptr<store::Context>> Find(ContextId id) {
    absl::MutexLock lock(&mu_);
    auto it = contexts_.find(id);
    if (it == contexts_.end()) return UnknownContext(id);
    return it->second;
  }

  static absl::Status CheckLayer(const store::Context& ctx, int32_t layer) {
    if (layer < 0 || layer >= ctx.shape().layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " out of range [0, ", ctx.shape().layers, ")"));
    }
    return absl::OkStatus();
  }

  HeadParams Params(const store::Context& ctx) const {
    HeadParams p = MakeHeadParams(settings_, ctx.shape(), host_pool_.get());
    p.backend = backend_.get();
    return p;
  }

  // Events whose failure is the backend's to absorb (engine/attention_backend.h): logged.
  void Report(const char* event, const store::Context& ctx, int32_t layer, absl::Status s) {
    if (!s.ok()) {
      spdlog::error("context {} layer {}: backend {} {}: {}", ctx.id(), layer, backend_->name(),
                    event, s.ToString());
    }
  }

  int64_t SegmentTokens(const store::Context& ctx) const {
    return ctx.decoding() ? settings_.decode_segment_tokens : settings_.prefill_segment_tokens;
  }

  // Seals `count` tokens from the front of every head's tail, heads in parallel.
  // REQUIRES: the layer's lock held exclusively; `reserved` covers SealReserveBytes per head.
  absl::Status SealLayer(const HeadParams& p, store::Context& ctx, int32_t layer_index,
                         int64_t count, store::MemoryCharge& reserved);

  // Registers a just-sealed block for sharing (and persists it). In durability "sync" a failed
  // write is reported: the tokens are appended and sealed in memory, but not durable.
  absl::Status SharePersisted(store::Context& ctx, int32_t layer) {
    absl::Status s = prefix_cache_->OnLayerSealed(ctx, layer);
    if (s.ok()) return s;
    return absl::UnavailableError(
        absl::StrCat("tokens appended, but a sealed block was not persisted: ", s.message()));
  }

  // Reserves bytes, first evicting unreferenced cached prefix blocks if the limit is reached.
  absl::StatusOr<store::MemoryCharge> Reserve(int64_t bytes) {
    auto charge = budget_.Reserve(bytes);
    if (charge.ok() || !absl::IsResourceExhausted(charge.status())) return charge;
    if (prefix_cache_->Evict(bytes) == 0) return charge;
    return budget_.Reserve(bytes);
  }

  // Runs fn(h) for every KV head in the compute arena; returns the first error.
  template <typename Fn>
  absl::Status ForEachHead(int32_t heads, Fn&& fn) {
    std::vector<absl::Status> status(heads);
    arena_.execute([&] { tbb::parallel_for(0, heads, [&](int32_t h) { status[h] = fn(h); }); });
    for (auto& s : status) KVWAVE_RETURN_IF_ERROR(s);
    return absl::OkStatus();
  }

  const config::Settings settings_;
  std::shared_ptr<store::HostPool> host_pool_;  // outlives every byte allocated from it
  std::unique_ptr<AttentionBackend> backend_;   // outlives contexts_ (they call OnClose)
  store::MemoryBudget budget_;
  tbb::task_arena arena_;
  std::unique_ptr<PrefixCache> prefix_cache_;  // outlives contexts_ (declared before it)
  absl::Mutex mu_;
  absl::flat_hash_map<ContextId, std::shared_ptr<store::Context>> contexts_ ABSL_GUARDED_BY(mu_);
  // Relaxed: counters are statistics.
  std::atomic<int64_t> segments_sealed_{0}, tokens_appended_{0}, attend_calls_{0},
      retrieve_calls_{0};
};

absl::Status EngineImpl::SealLayer(const HeadParams& p, store::Context& ctx, int32_t layer_index,
                                   int64_t count, store::MemoryCharge& reserved) {
  store::Context::Layer& layer = ctx.layer(layer_index);
  const int32_t heads = static_cast<int32_t>(layer.heads.size());
  std::vector<store::MemoryCharge> charges;
  for (int32_t h = 0; h < heads; ++h) charges.push_back(reserved.Split(SealReserveBytes(p, count)));
  absl::Status status =
      ForEachHead(heads, [&](int32_t h) { return SealHead(p, count, layer.heads[h], charges[h]); });
  for (auto& c : charges) reserved.Merge(std::move(c));  // unused bytes go back to the caller
  KVWAVE_RETURN_IF_ERROR(status);
  segments_sealed_.fetch_add(heads, std::memory_order_relaxed);
  Report("OnPublish", ctx, layer_index, backend_->OnPublish(ctx, layer_index, 1));
  return absl::OkStatus();
}

absl::Status EngineImpl::Append(ContextId id, int32_t layer_index, int64_t n,
                                std::span<const std::byte> k, std::span<const std::byte> v) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  KVWAVE_RETURN_IF_ERROR(CheckLayer(*ctx, layer_index));
  if (n < 0) return absl::InvalidArgumentError("negative token count");
  const store::ModelShape& shape = ctx->shape();
  const int64_t token_bytes = shape.TokenBytesPerLayer();
  KVWAVE_RETURN_IF_ERROR(CheckSize("k (bytes)", k.size(), n * token_bytes));
  KVWAVE_RETURN_IF_ERROR(CheckSize("v (bytes)", v.size(), n * token_bytes));
  if (n == 0) return absl::OkStatus();
  KVWAVE_RETURN_IF_ERROR(CheckFinite("k", k, shape.dtype));
  KVWAVE_RETURN_IF_ERROR(CheckFinite("v", v, shape.dtype));
  const HeadParams p = Params(*ctx);
  const size_t row_bytes = static_cast<size_t>(token_bytes / shape.kv_heads);

  store::Context::Layer& layer = ctx->layer(layer_index);
  std::unique_lock lock(layer.mu);
  // Plan the seals this append triggers, and reserve everything up front: all or nothing.
  const int64_t seg_tokens = SegmentTokens(*ctx);
  const int64_t threshold = seg_tokens + settings_.recent_tokens;
  int64_t seals = 0;
  for (int64_t t = layer.heads[0].tail.size() + n; t >= threshold; t -= seg_tokens) ++seals;
  const int64_t need =
      2 * n * token_bytes + seals * shape.kv_heads * SealReserveBytes(p, seg_tokens);
  KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge reserved, Reserve(need));

  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    store::MemoryCharge charge = reserved.Split(static_cast<int64_t>(2 * n * row_bytes));
    KVWAVE_RETURN_IF_ERROR(layer.heads[h].tail.Append(
        k.data() + h * row_bytes, v.data() + h * row_bytes, n, token_bytes, std::move(charge)));
  }
  layer.tokens += n;
  tokens_appended_.fetch_add(n, std::memory_order_relaxed);
  Report("OnAppend", *ctx, layer_index, backend_->OnAppend(*ctx, layer_index, n));
  absl::Status persisted = absl::OkStatus();
  for (int64_t i = 0; i < seals; ++i) {
    absl::Status s = SealLayer(p, *ctx, layer_index, seg_tokens, reserved);
    if (!s.ok()) {
      // A failed seal keeps the tokens in the tail (still attended exactly): nothing is lost.
      spdlog::error("context {} layer {}: seal failed, tokens stay in the tail: {}", id,
                    layer_index, s.ToString());
      break;
    }
    persisted.Update(SharePersisted(*ctx, layer_index));
  }
  return persisted;
}

absl::Status EngineImpl::Seal(ContextId id) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  const HeadParams p = Params(*ctx);
  const int64_t seg_tokens = SegmentTokens(*ctx);
  for (int32_t l = 0; l < ctx->shape().layers; ++l) {
    store::Context::Layer& layer = ctx->layer(l);
    std::unique_lock lock(layer.mu);
    for (;;) {
      const int64_t sealable = layer.heads[0].tail.size() - settings_.recent_tokens;
      if (sealable <= 0) break;
      const int64_t count = std::min(sealable, seg_tokens);
      KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge reserved,
                              Reserve(ctx->shape().kv_heads * SealReserveBytes(p, count)));
      KVWAVE_RETURN_IF_ERROR(SealLayer(p, *ctx, l, count, reserved));
      KVWAVE_RETURN_IF_ERROR(SharePersisted(*ctx, l));
    }
  }
  ctx->set_decoding();
  return absl::OkStatus();
}

absl::Status EngineImpl::Attend(ContextId id, int32_t layer_index, std::span<const float> q,
                                const AttendBudget& budget, std::span<float> out,
                                std::span<float> lse, AttendStats* stats) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  KVWAVE_RETURN_IF_ERROR(CheckLayer(*ctx, layer_index));
  const store::ModelShape& shape = ctx->shape();
  const size_t qd = static_cast<size_t>(shape.q_heads) * shape.head_dim;
  KVWAVE_RETURN_IF_ERROR(CheckSize("q", q.size(), qd));
  KVWAVE_RETURN_IF_ERROR(CheckSize("out", out.size(), qd));
  KVWAVE_RETURN_IF_ERROR(CheckSize("lse", lse.size(), shape.q_heads));
  KVWAVE_RETURN_IF_ERROR(CheckFinite("q", q));
  if (!(budget.retrieval >= 0 && budget.estimation >= 0 &&
        budget.retrieval + budget.estimation <= 1.0 + 1e-9)) {
    return absl::InvalidArgumentError("budgets must be >= 0 and sum to at most 1");
  }
  const store::Context::Layer& layer = ctx->layer(layer_index);
  std::shared_lock lock(layer.mu);
  AttendStats local;
  const AttendItem item{ctx.get(), layer_index, budget, q, out, lse,
                        stats != nullptr ? stats : &local};
  KVWAVE_RETURN_IF_ERROR(backend_->Attend(std::span<const AttendItem>(&item, 1)));
  attend_calls_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status EngineImpl::Retrieve(ContextId id, int32_t layer_index, std::span<const float> q,
                                  const RetrieveOptions& options, std::span<int64_t> positions,
                                  std::span<float> scores, RetrieveStats* stats) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  KVWAVE_RETURN_IF_ERROR(CheckLayer(*ctx, layer_index));
  const store::ModelShape& shape = ctx->shape();
  if (options.k < 1 || options.k > (1 << 20)) {
    return absl::InvalidArgumentError("k must be in [1, 2^20]");
  }
  if (!(options.cluster_budget >= 0 && options.cluster_budget <= 1)) {
    return absl::InvalidArgumentError("cluster_budget must be in [0, 1]");
  }
  KVWAVE_RETURN_IF_ERROR(CheckSize("q", q.size(), size_t{1} * shape.q_heads * shape.head_dim));
  KVWAVE_RETURN_IF_ERROR(
      CheckSize("positions", positions.size(), size_t{1} * shape.q_heads * options.k));
  KVWAVE_RETURN_IF_ERROR(CheckSize("scores", scores.size(), size_t{1} * shape.q_heads * options.k));
  KVWAVE_RETURN_IF_ERROR(CheckFinite("q", q));
  const HeadParams p = Params(*ctx);
  const store::Context::Layer& layer = ctx->layer(layer_index);
  std::shared_lock lock(layer.mu);
  std::vector<RetrieveStats> per_head(shape.kv_heads);
  KVWAVE_RETURN_IF_ERROR(ForEachHead(shape.kv_heads, [&](int32_t h) {
    const size_t first = static_cast<size_t>(h) * p.group;
    return RetrieveHead(p, layer.heads[h], q.data() + first * p.head_dim, options,
                        positions.data() + first * options.k, scores.data() + first * options.k,
                        &per_head[h]);
  }));
  retrieve_calls_.fetch_add(1, std::memory_order_relaxed);
  if (stats != nullptr) {
    for (const RetrieveStats& s : per_head) {
      stats->keys_scored += s.keys_scored;
      stats->keys_total += s.keys_total;
    }
  }
  return absl::OkStatus();
}

absl::Status EngineImpl::Gather(ContextId id, int32_t layer_index,
                                std::span<const int64_t> positions, std::span<std::byte> k,
                                std::span<std::byte> v) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  KVWAVE_RETURN_IF_ERROR(CheckLayer(*ctx, layer_index));
  const store::ModelShape& shape = ctx->shape();
  const int64_t token_bytes = shape.TokenBytesPerLayer();
  KVWAVE_RETURN_IF_ERROR(CheckSize("k (bytes)", k.size(), positions.size() * token_bytes));
  KVWAVE_RETURN_IF_ERROR(CheckSize("v (bytes)", v.size(), positions.size() * token_bytes));
  const size_t row_bytes = static_cast<size_t>(token_bytes / shape.kv_heads);
  const store::Context::Layer& layer = ctx->layer(layer_index);
  std::shared_lock lock(layer.mu);
  for (int64_t pos : positions) {
    if (pos < 0 || pos >= layer.tokens) {
      return absl::OutOfRangeError(
          absl::StrCat("position ", pos, " outside [0, ", layer.tokens, ")"));
    }
  }
  for (size_t i = 0; i < positions.size(); ++i) {
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      const size_t at = i * token_bytes + h * row_bytes;
      GatherRow(layer.heads[h], positions[i], row_bytes, k.data() + at, v.data() + at);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ContextInfo> EngineImpl::Info(ContextId id) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  ContextInfo info;
  info.id = id;
  info.shape = ctx->shape();
  for (int32_t l = 0; l < ctx->shape().layers; ++l) {
    const store::Context::Layer& layer = ctx->layer(l);
    std::shared_lock lock(layer.mu);
    info.tokens_per_layer.push_back(layer.tokens);
    for (const store::HeadKv& head : layer.heads) {
      info.sealed_segments += static_cast<int64_t>(head.segments.size());
      for (const auto& seg : head.segments) info.bytes += seg->bytes();
      info.bytes += 2 * head.tail.size() * static_cast<int64_t>(head.tail.row_bytes());
    }
  }
  return info;
}

}  // namespace

EngineDeps::EngineDeps() = default;
EngineDeps::EngineDeps(EngineDeps&&) noexcept = default;
EngineDeps& EngineDeps::operator=(EngineDeps&&) noexcept = default;
EngineDeps::~EngineDeps() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const config::Settings& settings,
                                                       EngineDeps deps) {
  auto engine = std::make_unique<EngineImpl>(settings, std::move(deps));
  KVWAVE_RETURN_IF_ERROR(engine->Init());
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace kvwave::engine
