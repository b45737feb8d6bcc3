// Engine implementation: the context table, argument checks, locking, memory reservation, and
// fan-out of per-head work (engine/head_ops.h) over KV heads with oneTBB.
#include <sys/random.h>

#include <algorithm>
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
#include "engine/graph_ops.h"
#include "engine/head_ops.h"
#include "engine/prefix_cache.h"
#include "engine/seal_workers.h"
#include "gpu/attention_cpu.h"
#include "spdlog/spdlog.h"
#include "store/context.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"
#include "tbb/task_group.h"

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
                                     : tbb::task_arena::automatic),
        workers_(std::make_unique<SealWorkers>(SealThreads(s.seal_threads))) {}

  absl::Status Init() {
    if (host_pool_ == nullptr) {
      host_pool_ = std::make_shared<store::HostPool>(store::MappedHostAllocator(),
                                                     settings_.host_pool_bytes);
    }
    if (backend_ == nullptr) backend_ = CreateCpuBackend(settings_);
    KVWAVE_ASSIGN_OR_RETURN(
        prefix_cache_,
        PrefixCache::Create(settings_, host_pool_.get(), &budget_, backend_->reads_pending_rows()));
    return absl::OkStatus();
  }

  ~EngineImpl() override {
    {
      // Seals still queued are dropped (their tokens were only ever in the tails); a running one
      // stops at its next head. Then no seal thread touches anything below.
      absl::MutexLock lock(&mu_);
      for (auto& [id, ctx] : contexts_) StopSeals(*ctx);
    }
    workers_.reset();
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
    KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge charge, Reserve(store::Context::SkeletonBytes(
                                                            options.shape, options.token_ids.size(),
                                                            settings_.prefill_segment_tokens)));
    const uint64_t id = NewContextId();
    // The backend hears OnClose when the last reference goes: after Close and after every call
    // in flight on the context has returned.
    AttentionBackend* backend = backend_.get();
    std::shared_ptr<store::Context> ctx(new store::Context(id, options.shape, host_pool_.get()),
                                        [backend](store::Context* c) {
                                          backend->OnClose(*c);
                                          delete c;
                                        });
    ctx->add_charge(std::move(charge));
    int64_t matched = 0;
    if (!options.token_ids.empty() && options.prefix_access != PrefixAccess::kNone) {
      matched = prefix_cache_->Attach(*ctx, options.token_ids, options.prefix_namespace,
                                      options.prefix_access == PrefixAccess::kWrite);
      KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge attached,
                              Reserve(store::Context::AttachedBytes(
                                  options.shape, matched / settings_.prefill_segment_tokens)));
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

  void WaitRemoteFetches() override { prefix_cache_->WaitRemoteFetches(); }

  absl::Status Flush() override {
    std::vector<std::shared_ptr<store::Context>> open;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [id, ctx] : contexts_) open.push_back(ctx);
    }
    for (const auto& ctx : open) {  // the background seals queued so far, done
      for (int32_t l = 0; l < ctx->shape().layers; ++l) {
        store::Context::Layer& layer = ctx->layer(l);
        absl::MutexLock lock(&layer.seal_mu);
        layer.seal_mu.Await(absl::Condition(
            +[](store::Context::Layer* x)
                 ABSL_NO_THREAD_SAFETY_ANALYSIS { return x->pending.empty() && !x->draining; },
            &layer));
      }
    }
    // ... and the jobs that ran them gone, with their references to the contexts: a drain
    // returns after marking its layer idle, and the context it held may otherwise outlive a
    // Close that follows (its OnClose then came from the worker, later).
    workers_->WaitIdle();
    return prefix_cache_->Flush();
  }

  absl::Status Append(ContextId id, int32_t layer, int64_t n, std::span<const std::byte> k,
                      std::span<const std::byte> v) override {
    return AppendImpl(id, layer, n, k, v, {});
  }
  absl::Status AppendWithQueries(ContextId id, int32_t layer, int64_t n,
                                 std::span<const std::byte> k, std::span<const std::byte> v,
                                 std::span<const float> q) override {
    if (q.empty() && n > 0) return absl::InvalidArgumentError("q: no queries");
    return AppendImpl(id, layer, n, k, v, q);
  }
  absl::Status Seal(ContextId id) override;
  absl::Status Attend(ContextId id, int32_t layer, std::span<const float> q,
                      const AttendBudget& budget, std::span<float> out, std::span<float> lse,
                      AttendStats* stats) override;
  absl::Status AttendBatch(int32_t layer, std::span<const AttendBatchItem> items,
                           std::span<const float> q, std::span<float> out, std::span<float> lse,
                           std::span<AttendStats> stats) override;
  absl::StatusOr<std::unique_ptr<DeviceBuffers>> OpenDeviceBuffers(
      const DeviceBuffersSpec& spec) override {
    return backend_->OpenDeviceBuffers(spec);
  }
  absl::Status AttendBatchDevice(int32_t layer, std::span<const AttendBatchItem> items,
                                 DeviceBuffers& buffers, const DeviceOffsets& offsets,
                                 std::span<AttendStats> stats) override;
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
    if (ctx->prefix() != nullptr) {
      // Its blocks are shared once sealed: finish its queued seals (here, heads in parallel)
      // rather than lose them.
      for (int32_t l = 0; l < ctx->shape().layers; ++l) {
        if (absl::Status s = DrainNow(*ctx, l); !s.ok()) {
          spdlog::warn("context {} layer {}: seal at close: {}", id, l, s.ToString());
        }
      }
    }
    StopSeals(*ctx);  // anything still queued is dropped; a running seal stops at its next head
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
    s.remote_blocks_attached_lazily = p.remote.blocks_attached_lazily;
    s.remote_kv_on_demand_bytes = p.remote.kv.on_demand_bytes;
    s.remote_kv_on_demand_ranges = p.remote.kv.on_demand_ranges;
    s.remote_kv_behind_bytes = p.remote.kv.behind_bytes;
    s.remote_kv_behind_segments = p.remote.kv.behind_segments;
    s.remote_kv_lost_segments = p.remote.kv.lost_segments;
    s.remote_kv_unavailable = p.remote.kv.unavailable;
    s.remote_kv_queued_segments = p.remote.kv.queued;
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

  static constexpr size_t kMaxBatch = 4096;

  using Contexts = std::vector<std::shared_ptr<store::Context>>;
  using LayerLocks = std::vector<std::shared_lock<std::shared_mutex>>;

  // A batch's contexts, checked: 1..kMaxBatch items, each context known, the layer in range, the
  // budget valid, every context with the first one's q_heads x head_dim.
  absl::StatusOr<Contexts> FindBatch(int32_t layer, std::span<const AttendBatchItem> items) {
    if (items.empty() || items.size() > kMaxBatch) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch of ", items.size(), " not in [1, ", kMaxBatch, "]"));
    }
    Contexts ctxs;
    ctxs.reserve(items.size());
    for (const AttendBatchItem& item : items) {
      KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(item.context));
      KVWAVE_RETURN_IF_ERROR(CheckLayer(*ctx, layer));
      KVWAVE_RETURN_IF_ERROR(CheckBudget(item.budget));
      const store::ModelShape& s0 = ctxs.empty() ? ctx->shape() : ctxs[0]->shape();
      if (ctx->shape().q_heads != s0.q_heads || ctx->shape().head_dim != s0.head_dim) {
        return absl::InvalidArgumentError(absl::StrCat(
            "context ", item.context, " has another q_heads x head_dim than the batch's first"));
      }
      ctxs.push_back(std::move(ctx));
    }
    return ctxs;
  }

  // The batch's layer locks, shared, taken in increasing context id (a fixed order: no deadlock
  // with another batch; writers only ever hold one). A context named twice is an error.
  static absl::StatusOr<LayerLocks> LockBatch(int32_t layer, std::span<const AttendBatchItem> items,
                                              const Contexts& ctxs) {
    const size_t b = items.size();
    std::vector<size_t> order(b);
    for (size_t i = 0; i < b; ++i) order[i] = i;
    std::sort(order.begin(), order.end(),
              [&](size_t x, size_t y) { return items[x].context < items[y].context; });
    for (size_t i = 1; i < b; ++i) {
      if (items[order[i]].context == items[order[i - 1]].context) {
        return absl::InvalidArgumentError(
            absl::StrCat("context ", items[order[i]].context, " is in the batch twice"));
      }
    }
    LayerLocks locks;
    locks.reserve(b);
    for (size_t i : order) locks.emplace_back(ctxs[i]->layer(layer).mu);
    return locks;
  }

  static absl::Status CheckBudget(const AttendBudget& budget) {
    if (!(budget.retrieval >= 0 && budget.estimation >= 0 &&
          budget.retrieval + budget.estimation <= 1.0 + 1e-9)) {
      return absl::InvalidArgumentError("budgets must be >= 0 and sum to at most 1");
    }
    if (budget.graph_top_k < 0 || budget.beam < 0) {
      return absl::InvalidArgumentError("graph_top_k and beam must be >= 0");
    }
    return absl::OkStatus();
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

  // Background sealing: each layer's seal queue (store::Context::Layer) is run in order by one
  // drainer at a time, a seal thread (workers_) or a caller that needs it done now.
  //
  // Queues seals of `counts` tokens each (from the tails' front, in order), charged from
  // `reserved`, and schedules a background drain. REQUIRES: the layer's lock held exclusively.
  void QueueSeals(const std::shared_ptr<store::Context>& ctx, int32_t layer,
                  const std::vector<int64_t>& counts, store::MemoryCharge& reserved);
  // Runs the layer's queue on a seal thread until it is empty, the context closes, or a caller
  // asks for it (Layer::yield).
  void DrainInBackground(const std::weak_ptr<store::Context>& weak, int32_t layer);
  // Takes the layer's queue over (once a background drainer has yielded) and runs it on this
  // thread, heads in parallel. Returns the first error.
  absl::Status DrainNow(store::Context& ctx, int32_t layer);
  // Close: drops the queued seals and waits for a running one to stop (at its next head).
  void StopSeals(store::Context& ctx);
  // One seal: copy the keys (layer lock shared), k-means (no lock), build the segments (shared),
  // publish them and drop the tails' front (exclusive), share/persist the block.
  absl::Status RunSeal(store::Context& ctx, int32_t layer, store::PendingSeal& job, bool in_place);
  // Charges a just-built graph (its MemoryBytes) to the memory limit for as long as it lives;
  // at the limit the graph is dropped (logged; the segment is then searched exactly).
  void ChargeGraph(const store::Context& ctx, int32_t layer, SealPlan& plan) {
    if (plan.graph == nullptr) return;
    absl::StatusOr<store::MemoryCharge> charge = Reserve(plan.graph->MemoryBytes());
    if (!charge.ok()) {
      spdlog::warn("context {} layer {}: graph of segment at {} dropped: {}", ctx.id(), layer,
                   plan.first_position, charge.status().ToString());
      plan.graph = nullptr;
      return;
    }
    plan.graph = WithCharge(std::move(plan.graph), *std::move(charge));
  }
  AttendMethod Method(AttendMethod m) const {
    if (m != AttendMethod::kDefault) return m;
    return settings_.attend_method == "retrievalattention" ? AttendMethod::kRetrievalAttention
                                                           : AttendMethod::kRetroInfer;
  }
  // Graph methods need something to search: FAILED_PRECONDITION on a layer with no graph of a
  // context that never kept queries. REQUIRES: the layer's lock held (shared).
  static absl::Status CheckHasGraphs(const store::Context& ctx, int32_t l, const char* what) {
    if (ctx.has_queries()) return absl::OkStatus();
    for (const store::HeadKv& head : ctx.layer(l).heads) {
      for (const auto& graph : head.graphs) {
        if (graph != nullptr) return absl::OkStatus();
      }
    }
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": context ", ctx.id(), " has no RetrievalAttention graphs on layer ", l,
        " (opened without prefill queries, or index.graph = off); use the wave index"));
  }
  // RetrievalAttention's attention of one item, split as the paper splits it: the steady zone
  // (sinks + tail) through the backend at zero budgets — on the GPU with the CUDA backend — in a
  // task of its own, while this thread searches the graphs and attends their tokens and the
  // graph-less segments on the CPU (graph_ops.h AttendGraphRetrievedHead, KV heads in parallel);
  // the two merged by log-sum-exp. REQUIRES: the item's layer lock held (shared).
  absl::Status AttendGraphLocked(const AttendItem& item) {
    const store::Context& ctx = *item.context;
    KVWAVE_RETURN_IF_ERROR(CheckHasGraphs(ctx, item.layer, "attend (retrievalattention)"));
    const HeadParams p = Params(ctx);
    const int32_t heads = ctx.shape().kv_heads;
    const int32_t top_k = item.budget.graph_top_k > 0 ? item.budget.graph_top_k
                                                      : static_cast<int32_t>(settings_.graph_top_k);
    const int32_t beam =
        item.budget.beam > 0 ? item.budget.beam : static_cast<int32_t>(settings_.graph_beam);
    if (top_k < 1) return absl::InvalidArgumentError("graph attention: top_k < 1");
    AttendItem steady = item;
    steady.budget.retrieval = 0;
    steady.budget.estimation = 0;
    steady.budget.method = AttendMethod::kRetroInfer;
    AttendStats steady_stats;
    steady.stats = &steady_stats;
    absl::Status steady_status;
    tbb::task_group steady_task;
    arena_.execute([&] {
      steady_task.run([&] { steady_status = backend_->Attend({&steady, 1}); });
    });
    std::vector<AttendStats> per_head(heads);
    const size_t gd = static_cast<size_t>(p.group) * p.head_dim;
    std::vector<float> out(item.out.size()), lse(item.lse.size());
    const absl::Status graph_status = ForEachHead(heads, [&](int32_t h) {
      const store::HeadKv& head = ctx.layer(item.layer).heads[h];
      return AttendGraphRetrievedHead(p, head, head.graphs, item.q.data() + h * gd, top_k, beam,
                                      out.data() + h * gd, lse.data() + h * p.group, &per_head[h]);
    });
    arena_.execute([&] { steady_task.wait(); });
    KVWAVE_RETURN_IF_ERROR(steady_status);
    KVWAVE_RETURN_IF_ERROR(graph_status);
    gpu::cpu::MergeLse(item.out.data(), item.lse.data(), out.data(), lse.data(),
                       ctx.shape().q_heads, p.head_dim);
    item.stats->steady_tokens += steady_stats.steady_tokens;
    for (const AttendStats& s : per_head) {
      item.stats->retrieved_tokens += s.retrieved_tokens;
      item.stats->graph_keys_scored += s.graph_keys_scored;
    }
    return absl::OkStatus();
  }

  // Durability "sync" for a context that shares blocks: its Append returns after its seals are
  // done and persisted, so a sealed block is durable when the Append is acknowledged.
  bool SealsInPlace(const store::Context& ctx) const {
    return ctx.prefix() != nullptr && !settings_.persist_path.empty() &&
           settings_.durability == "sync";
  }

  // Append and AppendWithQueries: q is empty or [n x q_heads x head_dim].
  absl::Status AppendImpl(ContextId id, int32_t layer_index, int64_t n,
                          std::span<const std::byte> k, std::span<const std::byte> v,
                          std::span<const float> q);

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
  // Last: its jobs use everything above; the destructor stops it first.
  std::unique_ptr<SealWorkers> workers_;
};

void EngineImpl::QueueSeals(const std::shared_ptr<store::Context>& ctx, int32_t l,
                            const std::vector<int64_t>& counts, store::MemoryCharge& reserved) {
  if (counts.empty()) return;
  const HeadParams p = Params(*ctx);
  store::Context::Layer& layer = ctx->layer(l);
  absl::MutexLock lock(&layer.seal_mu);
  for (int64_t n : counts) {
    layer.sealing_tokens += n;
    layer.pending.push_back({n, reserved.Split(ctx->shape().kv_heads * SealReserveBytes(p, n))});
  }
  if (layer.draining || layer.scheduled) return;
  layer.scheduled = true;
  workers_->Submit(
      [this, weak = std::weak_ptr<store::Context>(ctx), l] { DrainInBackground(weak, l); });
}

void EngineImpl::DrainInBackground(const std::weak_ptr<store::Context>& weak, int32_t l) {
  std::shared_ptr<store::Context> ctx = weak.lock();
  if (ctx == nullptr) return;  // closed and gone before this drain started
  store::Context::Layer& layer = ctx->layer(l);
  {
    absl::MutexLock lock(&layer.seal_mu);
    layer.scheduled = false;
    if (layer.draining) return;  // a caller runs the queue (and takes what is queued)
    layer.draining = true;
  }
  for (;;) {
    store::PendingSeal job;
    {
      absl::MutexLock lock(&layer.seal_mu);
      if (layer.pending.empty() || layer.yield || ctx->closing()) {
        if (ctx->closing()) layer.pending.clear();
        layer.draining = false;
        return;
      }
      job = std::move(layer.pending.front());
      layer.pending.pop_front();
    }
    absl::Status s = RunSeal(*ctx, l, job, /*in_place=*/false);
    if (!s.ok() && !ctx->closing()) {
      // The tokens stay in the tail (attended exactly): nothing is lost; Seal reports it.
      spdlog::error("context {} layer {}: background seal: {}", ctx->id(), l, s.ToString());
      ctx->DeferError(s);
    }
  }
}

absl::Status EngineImpl::DrainNow(store::Context& ctx, int32_t l) {
  store::Context::Layer& layer = ctx.layer(l);
  {
    absl::MutexLock lock(&layer.seal_mu);
    layer.yield = true;
    layer.seal_mu.Await(absl::Condition(
        +[](bool* draining) { return !*draining; }, &layer.draining));
    layer.yield = false;
    layer.draining = true;
  }
  absl::Status status;
  for (;;) {
    store::PendingSeal job;
    {
      absl::MutexLock lock(&layer.seal_mu);
      if (layer.pending.empty()) {
        layer.draining = false;
        return status;
      }
      job = std::move(layer.pending.front());
      layer.pending.pop_front();
    }
    status.Update(RunSeal(ctx, l, job, /*in_place=*/true));
  }
}

void EngineImpl::StopSeals(store::Context& ctx) {
  ctx.set_closing();
  for (int32_t l = 0; l < ctx.shape().layers; ++l) {
    store::Context::Layer& layer = ctx.layer(l);
    absl::MutexLock lock(&layer.seal_mu);
    layer.pending.clear();  // their reservations go back
    layer.seal_mu.Await(absl::Condition(
        +[](bool* draining) { return !*draining; }, &layer.draining));
  }
}

absl::Status EngineImpl::RunSeal(store::Context& ctx, int32_t l, store::PendingSeal& job,
                                 bool in_place) {
  const HeadParams p = Params(ctx);
  store::Context::Layer& layer = ctx.layer(l);
  const int32_t heads = ctx.shape().kv_heads;
  const int64_t n = job.tokens;
  std::vector<SealPlan> plans(heads);
  // In place: heads in parallel in the compute arena. In the background: one after another on
  // the (low-priority) seal thread, stopping at the next head once the context closes.
  auto each = [&](auto&& fn) -> absl::Status {
    if (in_place) return ForEachHead(heads, fn);
    for (int32_t h = 0; h < heads; ++h) {
      if (ctx.closing()) return absl::CancelledError("context closed");
      KVWAVE_RETURN_IF_ERROR(fn(h));
    }
    return absl::OkStatus();
  };
  {
    std::shared_lock lock(layer.mu);
    for (int32_t h = 0; h < heads; ++h) PrepareSeal(p, n, layer.heads[h], plans[h]);
  }
  absl::Status status = each([&](int32_t h) { return ClusterSeal(p, plans[h]); });
  if (status.ok()) {
    std::vector<store::MemoryCharge> charges;
    for (int32_t h = 0; h < heads; ++h)
      charges.push_back(job.reserved.Split(SealReserveBytes(p, n)));
    std::shared_lock lock(layer.mu);
    status = each([&](int32_t h) { return BuildSeal(p, layer.heads[h], plans[h], charges[h]); });
  }
  if (status.ok()) {  // the graphs (index.graph = on, queries held), without the layer lock
    status = each([&](int32_t h) {
      GraphSeal(p, plans[h]);
      return absl::OkStatus();
    });
    for (SealPlan& plan : plans) ChargeGraph(ctx, l, plan);
  }
  // Publication: the new segments and the tails without their tokens, in one step for readers.
  std::unique_lock lock(layer.mu);
  layer.sealing_tokens -= n;
  if (status.ok() && ctx.closing()) status = absl::CancelledError("context closed");
  if (!status.ok()) return status;  // the tokens stay in the tail, attended exactly
  for (int32_t h = 0; h < heads; ++h) {
    layer.heads[h].segments.push_back(std::move(plans[h].segment));
    PublishSegmentGraph(p, plans[h], layer.heads[h]);
    layer.heads[h].tail.DropFront(n);  // its charge is released here
  }
  segments_sealed_.fetch_add(heads, std::memory_order_relaxed);
  Report("OnPublish", ctx, l, backend_->OnPublish(ctx, l, 1));
  return SharePersisted(ctx, l);
}

absl::Status EngineImpl::AppendImpl(ContextId id, int32_t layer_index, int64_t n,
                                    std::span<const std::byte> k, std::span<const std::byte> v,
                                    std::span<const float> q) {
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
  // Prefill queries (AppendWithQueries): held per KV head for the graph of their segment.
  const size_t q_row = static_cast<size_t>(p.group) * shape.head_dim;  // floats per token, head
  if (!q.empty()) {
    KVWAVE_RETURN_IF_ERROR(CheckSize("q", q.size(), n * q_row * shape.kv_heads));
    KVWAVE_RETURN_IF_ERROR(CheckFinite("q", q));
  }
  const bool hold_queries = !q.empty() && p.graph;
  const int64_t q_head_bytes = hold_queries ? static_cast<int64_t>(n * q_row * sizeof(float)) : 0;

  store::Context::Layer& layer = ctx->layer(layer_index);
  const int64_t seg_tokens = SegmentTokens(*ctx);
  const int64_t threshold = seg_tokens + settings_.recent_tokens;
  std::unique_lock lock(layer.mu);
  // Plan the seals this append completes (tokens already promised to queued seals do not count
  // again), and reserve everything up front: all or nothing.
  auto plan = [&] {
    std::vector<int64_t> seals;
    for (int64_t t = layer.heads[0].tail.size() + n - layer.sealing_tokens; t >= threshold;
         t -= seg_tokens) {
      seals.push_back(seg_tokens);
    }
    return seals;
  };
  auto need = [&](const std::vector<int64_t>& seals) {
    return 2 * n * token_bytes + shape.kv_heads * q_head_bytes +
           static_cast<int64_t>(seals.size()) * shape.kv_heads * SealReserveBytes(p, seg_tokens);
  };
  std::vector<int64_t> seals = plan();
  absl::StatusOr<store::MemoryCharge> reserved = Reserve(need(seals));
  if (absl::IsResourceExhausted(reserved.status()) && layer.sealing_tokens > 0) {
    // At the limit with seals queued: finishing them frees their tokens' tail bytes.
    lock.unlock();
    if (absl::Status s = DrainNow(*ctx, layer_index); !s.ok()) ctx->DeferError(s);
    lock.lock();
    seals = plan();
    reserved = Reserve(need(seals));
  }
  KVWAVE_RETURN_IF_ERROR(reserved.status());

  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    store::MemoryCharge charge = reserved->Split(static_cast<int64_t>(2 * n * row_bytes));
    KVWAVE_RETURN_IF_ERROR(layer.heads[h].tail.Append(
        k.data() + h * row_bytes, v.data() + h * row_bytes, n, token_bytes, std::move(charge)));
  }
  for (int32_t h = 0; hold_queries && h < shape.kv_heads; ++h) {
    store::HeadKv& head = layer.heads[h];
    store::MemoryCharge charge = reserved->Split(q_head_bytes);
    // Kept only while every earlier token of the tail has its queries (else released here).
    if (head.query_tokens != head.tail.size() - n) continue;
    head.queries.reserve(head.queries.size() + n * q_row);
    for (int64_t t = 0; t < n; ++t) {  // token t, query heads [h * group, (h + 1) * group)
      const float* src = q.data() + (t * shape.kv_heads + h) * q_row;
      head.queries.insert(head.queries.end(), src, src + q_row);
    }
    head.query_tokens += n;
    head.query_charge.Merge(std::move(charge));
    ctx->set_has_queries();
  }
  layer.tokens += n;
  tokens_appended_.fetch_add(n, std::memory_order_relaxed);
  Report("OnAppend", *ctx, layer_index, backend_->OnAppend(*ctx, layer_index, n));
  // The seals run in the background: this Append returns without waiting for their k-means.
  QueueSeals(ctx, layer_index, seals, *reserved);
  lock.unlock();
  if (!seals.empty() && SealsInPlace(*ctx)) return DrainNow(*ctx, layer_index);
  return absl::OkStatus();
}

absl::Status EngineImpl::Seal(ContextId id) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  const HeadParams p = Params(*ctx);
  const int64_t seg_tokens = SegmentTokens(*ctx);
  absl::Status status = ctx->TakeDeferredError();  // of earlier background seals
  for (int32_t l = 0; l < ctx->shape().layers; ++l) {
    store::Context::Layer& layer = ctx->layer(l);
    {
      // Everything but the recent tokens, in segments, after what is already queued.
      std::unique_lock lock(layer.mu);
      std::vector<int64_t> counts;
      int64_t sealable =
          layer.heads[0].tail.size() - layer.sealing_tokens - settings_.recent_tokens;
      for (; sealable > 0; sealable -= counts.back()) {
        counts.push_back(std::min(sealable, seg_tokens));
      }
      int64_t bytes = 0;
      for (int64_t c : counts) bytes += ctx->shape().kv_heads * SealReserveBytes(p, c);
      KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge reserved, Reserve(bytes));
      QueueSeals(ctx, l, counts, reserved);
    }
    status.Update(DrainNow(*ctx, l));  // on this thread, heads in parallel
  }
  KVWAVE_RETURN_IF_ERROR(status);
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
  KVWAVE_RETURN_IF_ERROR(CheckBudget(budget));
  const store::Context::Layer& layer = ctx->layer(layer_index);
  std::shared_lock lock(layer.mu);
  AttendStats local;
  const AttendItem item{
      ctx.get(), layer_index, budget, q, out, lse, stats != nullptr ? stats : &local};
  if (Method(budget.method) == AttendMethod::kRetrievalAttention) {
    KVWAVE_RETURN_IF_ERROR(AttendGraphLocked(item));
  } else {
    KVWAVE_RETURN_IF_ERROR(backend_->Attend(std::span<const AttendItem>(&item, 1)));
  }
  attend_calls_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status EngineImpl::AttendBatch(int32_t layer_index, std::span<const AttendBatchItem> items,
                                     std::span<const float> q, std::span<float> out,
                                     std::span<float> lse, std::span<AttendStats> stats) {
  const size_t b = items.size();
  KVWAVE_ASSIGN_OR_RETURN(const Contexts ctxs, FindBatch(layer_index, items));
  const store::ModelShape& shape = ctxs[0]->shape();
  const size_t qd = static_cast<size_t>(shape.q_heads) * shape.head_dim;
  KVWAVE_RETURN_IF_ERROR(CheckSize("q", q.size(), b * qd));
  KVWAVE_RETURN_IF_ERROR(CheckSize("out", out.size(), b * qd));
  KVWAVE_RETURN_IF_ERROR(CheckSize("lse", lse.size(), b * shape.q_heads));
  if (!stats.empty()) KVWAVE_RETURN_IF_ERROR(CheckSize("stats", stats.size(), b));
  KVWAVE_RETURN_IF_ERROR(CheckFinite("q", q));
  KVWAVE_ASSIGN_OR_RETURN(const LayerLocks locks, LockBatch(layer_index, items, ctxs));
  std::vector<AttendStats> local(b);
  std::vector<AttendItem> work, graph_work;  // the backend's, and retrievalattention's
  for (size_t i = 0; i < b; ++i) {
    const AttendItem item{ctxs[i].get(),
                          layer_index,
                          items[i].budget,
                          q.subspan(i * qd, qd),
                          out.subspan(i * qd, qd),
                          lse.subspan(i * shape.q_heads, shape.q_heads),
                          stats.empty() ? &local[i] : &stats[i]};
    (Method(items[i].budget.method) == AttendMethod::kRetrievalAttention ? graph_work : work)
        .push_back(item);
  }
  for (const AttendItem& item : graph_work) KVWAVE_RETURN_IF_ERROR(AttendGraphLocked(item));
  if (!work.empty()) KVWAVE_RETURN_IF_ERROR(backend_->Attend(work));
  attend_calls_.fetch_add(static_cast<int64_t>(b), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status EngineImpl::AttendBatchDevice(int32_t layer_index,
                                           std::span<const AttendBatchItem> items,
                                           DeviceBuffers& buffers, const DeviceOffsets& offsets,
                                           std::span<AttendStats> stats) {
  const size_t b = items.size();
  KVWAVE_ASSIGN_OR_RETURN(const Contexts ctxs, FindBatch(layer_index, items));
  if (!stats.empty()) KVWAVE_RETURN_IF_ERROR(CheckSize("stats", stats.size(), b));
  for (const AttendBatchItem& item : items) {
    if (Method(item.budget.method) == AttendMethod::kRetrievalAttention) {
      return absl::UnimplementedError("retrievalattention is not served on device tensors");
    }
  }
  // Each buffer's span for the whole batch lies inside its registered bytes.
  const uint64_t qd = uint64_t{4} * ctxs[0]->shape().q_heads * ctxs[0]->shape().head_dim;
  const uint64_t ld = uint64_t{4} * ctxs[0]->shape().q_heads;
  auto check = [](const char* what, uint64_t offset, uint64_t need, uint64_t have) {
    if (offset % 16 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " offset ", offset, " is not a multiple of 16 bytes"));
    }
    if (offset > have || need > have - offset) {
      return absl::OutOfRangeError(absl::StrCat(what, ": ", need, " bytes at offset ", offset,
                                                " pass the registered ", have, " bytes"));
    }
    return absl::OkStatus();
  };
  KVWAVE_RETURN_IF_ERROR(check("q", offsets.q, b * qd, buffers.q_bytes()));
  KVWAVE_RETURN_IF_ERROR(check("out", offsets.out, b * qd, buffers.out_bytes()));
  KVWAVE_RETURN_IF_ERROR(check("lse", offsets.lse, b * ld, buffers.lse_bytes()));
  KVWAVE_ASSIGN_OR_RETURN(const LayerLocks locks, LockBatch(layer_index, items, ctxs));
  std::vector<AttendStats> local(b);
  std::vector<DeviceAttendItem> work(b);
  for (size_t i = 0; i < b; ++i) {
    work[i].context = ctxs[i].get();
    work[i].layer = layer_index;
    work[i].budget = items[i].budget;
    work[i].offsets = {offsets.q + i * qd, offsets.out + i * qd, offsets.lse + i * ld};
    work[i].stats = stats.empty() ? &local[i] : &stats[i];
  }
  KVWAVE_RETURN_IF_ERROR(backend_->AttendDevice(work, buffers));
  attend_calls_.fetch_add(static_cast<int64_t>(b), std::memory_order_relaxed);
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
  if (options.method == RetrieveMethod::kGraph) {
    KVWAVE_RETURN_IF_ERROR(CheckHasGraphs(*ctx, layer_index, "retrieve (graph)"));
  }
  if (options.beam < 0) return absl::InvalidArgumentError("beam must be >= 0");
  const int32_t beam = options.beam > 0 ? options.beam : static_cast<int32_t>(settings_.graph_beam);
  KVWAVE_RETURN_IF_ERROR(ForEachHead(shape.kv_heads, [&](int32_t h) {
    const size_t first = static_cast<size_t>(h) * p.group;
    if (options.method == RetrieveMethod::kGraph) {
      return RetrieveGraphHead(
          p, layer.heads[h], layer.heads[h].graphs, q.data() + first * p.head_dim, options.k, beam,
          positions.data() + first * options.k, scores.data() + first * options.k, &per_head[h]);
    }
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
  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    KVWAVE_RETURN_IF_ERROR(EnsureRowsAt(layer.heads[h], positions));  // one batch per head
  }
  for (size_t i = 0; i < positions.size(); ++i) {
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      const size_t at = i * token_bytes + h * row_bytes;
      KVWAVE_RETURN_IF_ERROR(
          GatherRow(layer.heads[h], positions[i], row_bytes, k.data() + at, v.data() + at));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ContextInfo> EngineImpl::Info(ContextId id) {
  KVWAVE_ASSIGN_OR_RETURN(auto ctx, Find(id));
  ContextInfo info;
  info.id = id;
  info.shape = ctx->shape();
  info.has_queries = ctx->has_queries();
  for (int32_t l = 0; l < ctx->shape().layers; ++l) {
    const store::Context::Layer& layer = ctx->layer(l);
    std::shared_lock lock(layer.mu);
    info.tokens_per_layer.push_back(layer.tokens);
    for (const store::HeadKv& head : layer.heads) {
      info.sealed_segments += static_cast<int64_t>(head.segments.size());
      for (const auto& graph : head.graphs) info.graph_segments += graph != nullptr;
      info.query_tokens += head.query_tokens;
      info.bytes += head.query_charge.bytes();
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
