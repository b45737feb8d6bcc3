// The kvwave engine: the facade used in-process and by the daemon.
//
//   Open    -> a context (one sequence's KV cache for all layers and KV heads)
//   Append  -> K/V of n new tokens for one layer (any n, layers in any order)
//   Seal    -> seal the tails into indexed segments now (ends prefill; later segments are the
//              decode size)
//   Attend  -> per layer: tripartite attention of the query heads, (output, lse) per head
//   Retrieve-> per layer: top-k token positions per query head from the index's own search
//   Gather  -> per layer: K/V rows of given token positions, back in token order
//   Close   -> release the context
//
// Segments seal automatically when a (layer, KV head) tail holds segment_tokens + recent_tokens
// tokens; the tail always keeps the latest `recent_tokens` tokens, which (with the first
// `sink_tokens` of the context) form the steady zone attended exactly.
//
// Sealing runs in the background: the Append that completes a segment queues its seal and
// returns; a seal thread (attend.seal_threads, low priority) runs the k-means with no lock held
// and then publishes the layer's new segments and drops their tokens from the tails in one step
// under the layer's lock. Until then those tokens are attended exactly as part of the tail, so a
// result never depends on timing except by being more exact, and no Attend waits for indexing.
// Seal() runs what is queued (and seals the rest) on the caller's thread and reports errors of
// earlier background seals. Close finishes the queued seals of a context that shares blocks
// (token ids) and drops those of others. With persist.durability = sync, an Append of a context
// that shares blocks returns after its seals are done and persisted (acknowledged = durable).
// At the memory limit, an Append first finishes its layer's queued seals (they free tail bytes).
//
// Thread-safety: every method is thread-safe. Calls on different contexts run in parallel.
// Within one context, calls on different layers run in parallel; on the same layer, Append and
// Seal are exclusive while Attend, Retrieve and Gather share the layer. Close waits for in-flight
// calls on that context; calls that arrive after it return NotFound.
#ifndef KVWAVE_ENGINE_ENGINE_H_
#define KVWAVE_ENGINE_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "config/settings.h"
#include "store/host_memory.h"
#include "store/model_shape.h"

namespace kvwave::engine {

using ContextId = uint64_t;

// What a context may do with the shared prefix blocks of its namespace. Ordered: writing implies
// reading.
enum class PrefixAccess { kNone = 0, kRead = 1, kWrite = 2 };

struct OpenOptions {
  store::ModelShape shape;
  // Optional: the context's token ids. Full blocks of prefill_segment_tokens ids are shared: Open
  // attaches the longest cached run of them (matched_tokens), and blocks this context seals are
  // registered for others (and persisted when persist.path is set). Empty = no sharing.
  std::vector<int32_t> token_ids;
  std::string prefix_namespace;
  // Decided by the caller (kvwaved: rpc/auth.h TrustPolicy::DecideNamespace): kRead attaches
  // blocks registered in prefix_namespace but keeps the blocks this context seals private; kWrite
  // also registers (shares, persists) them; kNone = as without token ids.
  PrefixAccess prefix_access = PrefixAccess::kWrite;
};

struct OpenResult {
  ContextId id = 0;
  int64_t matched_tokens = 0;  // tokens already present from a shared prefix
};

// How Attend computes a layer's attention (settings attend.method):
//   kRetroInfer          tripartite: steady zone exact, the top clusters (retrieval budget) exact,
//                        the next ones (estimation budget) estimated from centroid and value sum;
//   kRetrievalAttention  RetrievalAttention's split: steady zone exact, and per query head the
//                        graph's top graph_top_k tokens (beam search of every segment's graph;
//                        a segment without one is attended exactly) exact, merged by
//                        log-sum-exp. The graph searches and their tokens on the CPU threads;
//                        the steady zone through the backend (on the GPU with the CUDA one),
//                        overlapped with them.
//                        FAILED_PRECONDITION on a context that never had prefill queries.
enum class AttendMethod { kDefault, kRetroInfer, kRetrievalAttention };

// Budgets of one Attend: fractions of the (layer, KV head)'s clusters, in [0, 1]. These defaults
// are the paper's (1.8% + 23.2%); kvwaved's own defaults are the settings attend.retrieval_budget
// and attend.estimation_budget (1.8% + the rest, config/settings.h), and the ranking is the
// setting attend.rank.
struct AttendBudget {
  double retrieval = 0.018;   // top clusters, attended exactly
  double estimation = 0.232;  // next clusters, estimated from centroid and value sum
  AttendMethod method = AttendMethod::kDefault;  // kDefault = attend.method
  int32_t graph_top_k = 0;  // retrievalattention: tokens per query head (0 = attend.graph_top_k)
  int32_t beam = 0;         // retrievalattention: search queue per segment (0 = index.graph_beam)
};

struct AttendBatchItem {
  uint64_t context = 0;  // a ContextId
  AttendBudget budget;
};

struct AttendStats {
  int64_t steady_tokens = 0;       // summed over KV heads
  int64_t retrieved_tokens = 0;    // summed over KV heads
  int64_t retrieved_clusters = 0;  // summed over KV heads
  int64_t estimated_clusters = 0;  // summed over KV heads
  int64_t total_clusters = 0;      // summed over KV heads
  // Member keys scored (q.k, not attended) by the ranking's second pass (attend.rank =
  // two_pass), summed over KV heads; 0 with the centroid ranking.
  int64_t scored_tokens = 0;
  // retrievalattention: keys the graph searches scored (over query heads); retrieved_tokens is
  // then the tokens they chose, summed over query heads.
  int64_t graph_keys_scored = 0;
};

enum class RetrieveMethod { kWave, kFlat, kGraph };

struct RetrieveOptions {
  int32_t k = 100;
  RetrieveMethod method = RetrieveMethod::kWave;
  double cluster_budget = 0.05;  // wave: fraction of clusters whose members are scored
  int32_t beam = 0;              // graph: search queue per segment (0 = index.graph_beam)
};

struct RetrieveStats {
  int64_t keys_scored = 0;  // summed over query heads
  int64_t keys_total = 0;   // summed over query heads
};

struct ContextInfo {
  ContextId id = 0;
  store::ModelShape shape;
  std::vector<int64_t> tokens_per_layer;
  int64_t sealed_segments = 0;  // over all layers and KV heads
  bool has_queries = false;     // prefill queries were appended and kept (index.graph = on)
  int64_t graph_segments = 0;   // sealed segments with a RetrievalAttention graph (issue 19)
  int64_t query_tokens = 0;     // tokens whose prefill queries are held for a graph, summed
  int64_t bytes = 0;            // host bytes charged to this context
};

// What `kvwave stats`, Prometheus and the CLI show about the backend.
struct BackendStats {
  std::string name = "cpu";  // "cpu" | "cuda"
  int32_t device = -1;       // CUDA device index; -1 on the CPU
  int64_t pool_bytes = 0;    // GPU page pool capacity
  int64_t pool_used_bytes = 0;
  int64_t hits = 0;               // retrieved clusters (or pages) served from the pool, all time
  int64_t misses = 0;             // retrieved clusters (or pages) read from host memory, all time
  int64_t pcie_bytes = 0;         // bytes read or copied host -> GPU, all time
  int64_t segments_resident = 0;  // sealed segments whose meta index is on the GPU
  int64_t hit_pages = 0, miss_pages = 0;  // the same hits and misses in pages (8 rows)
  // Host time of the GPU calls, all time (microseconds): queueing them (the layer's sync
  // included), waiting for a free slot, waiting for results, and the committer threads' LRU work.
  int64_t calls = 0;
  double enqueue_us = 0, slot_wait_us = 0, result_wait_us = 0, commit_us = 0;
  // commit_us's parts: waiting for the batch's GPU work, for the commits before it (their order
  // is the policy's), the policy itself, and queueing the update (its lock included).
  double commit_gpu_us = 0, commit_order_us = 0, commit_policy_us = 0, commit_queue_us = 0;
  int64_t kmeans_gpu = 0, kmeans_cpu = 0;  // segment clusterings run on the GPU / the CPU
  int64_t topn_gpu = 0, topn_cpu = 0;      // graph builds' exact top-N on the GPU / the CPU
  // GPU clients (issue 17): registrations open, IPC memory mappings and events open, device
  // calls served and failed, all time.
  int64_t device_registrations = 0, ipc_mappings = 0, ipc_events = 0;
  int64_t device_calls = 0, device_errors = 0;
};

struct EngineStats {
  int64_t contexts = 0;
  int64_t memory_used_bytes = 0;
  int64_t memory_limit_bytes = 0;
  int64_t segments_sealed = 0;
  int64_t tokens_appended = 0;
  int64_t attend_calls = 0;
  int64_t retrieve_calls = 0;
  // Shared prefixes and persistence.
  int64_t prefix_blocks_registered = 0;  // blocks this engine sealed and shared
  int64_t prefix_blocks_resident = 0;    // registry entries whose segments are in DRAM
  int64_t prefix_blocks_known = 0;       // registry entries (resident or on disk)
  int64_t prefix_matched_blocks = 0;     // blocks attached by Open, all time
  int64_t prefix_evictions = 0;          // blocks whose segments left DRAM at the limit
  int64_t prefix_reloads = 0;            // blocks reloaded from RocksDB
  int64_t persist_bytes_written = 0;
  int64_t persist_corrupt_records = 0;  // detected, dropped, never served
  int64_t persist_errors = 0;           // blocks that could not be written
  // The remote tier (Redis Cluster), all zero when remote.mode is off.
  int64_t remote_blocks_written = 0;
  int64_t remote_bytes_written = 0;
  int64_t remote_parts_sent = 0;
  int64_t remote_write_errors = 0;
  int64_t remote_queue_dropped = 0;
  int64_t remote_blocks_fetched = 0;
  int64_t remote_bytes_read = 0;
  int64_t remote_blocks_partial = 0;
  int64_t remote_blocks_corrupt = 0;
  int64_t remote_blocks_version_mismatch = 0;
  int64_t remote_unavailable = 0;
  int64_t remote_nodes = 0;
  int64_t remote_nodes_down = 0;
  // remote.attach = index: blocks attached with their rows pending, and how the rows came.
  int64_t remote_blocks_attached_lazily = 0;
  int64_t remote_kv_on_demand_bytes = 0;   // GETRANGE payload bytes (clusters an Attend needed)
  int64_t remote_kv_on_demand_ranges = 0;  // GETRANGE commands
  int64_t remote_kv_behind_bytes = 0;      // KV part values read by the background fetch
  int64_t remote_kv_behind_segments = 0;   // segments completed by the background fetch
  int64_t remote_kv_lost_segments = 0;     // rows gone or corrupt after the attach: never served
  int64_t remote_kv_unavailable = 0;       // row fetches that failed on a slow or dead node
  int64_t remote_kv_queued_segments = 0;   // waiting for the background fetch now
  BackendStats backend;                    // the attention backend that serves Attend
};

// GPU clients (issue 17): device buffers of another process on the engine's GPU, named by CUDA
// IPC handles (64 bytes each, cudaIpcGetMemHandle / cudaIpcGetEventHandle). A buffer is a span
// [offset, offset + bytes) of the allocation its handle names.
struct DeviceBufferSpec {
  std::string handle;
  uint64_t offset = 0;
  uint64_t bytes = 0;
};
struct DeviceBuffersSpec {
  std::string device_uuid;  // the client's GPU (cudaDeviceProp::uuid, 16 bytes)
  DeviceBufferSpec q, out, lse;
  std::string q_ready, out_ready;  // interprocess events: recorded by the client / the engine
};
// One registration, open: the buffers mapped, the events opened; everything is closed on
// destruction, after the calls that used them are complete. Made by Engine::OpenDeviceBuffers;
// one AttendBatchDevice at a time per registration (the caller serialises).
class DeviceBuffers {
 public:
  virtual ~DeviceBuffers() = default;
  virtual uint64_t q_bytes() const = 0;
  virtual uint64_t out_bytes() const = 0;
  virtual uint64_t lse_bytes() const = 0;
};
// Byte offsets of one call into a registration's q, out and lse buffers.
struct DeviceOffsets {
  uint64_t q = 0, out = 0, lse = 0;
};

class AttentionBackend;  // engine/attention_backend.h

// What an engine is given at Create instead of reaching for process-wide globals: the attention
// backend it attends with and the host memory its KV bytes come from. engine/backend_select.h
// builds them from the settings (gpu.mode, store.pinned_memory) for the daemon.
struct EngineDeps {
  // Out of line: AttentionBackend is incomplete here.
  EngineDeps();
  EngineDeps(EngineDeps&&) noexcept;
  EngineDeps& operator=(EngineDeps&&) noexcept;
  ~EngineDeps();

  std::unique_ptr<AttentionBackend> backend;  // null: the CPU backend (engine/cpu_backend.h)
  // Every KV byte (tails, segments, reloaded prefix blocks) is allocated here; the engine keeps
  // it alive. Null: a pool of the engine's own over store::MappedHostAllocator(), idle limit
  // store.host_pool_bytes.
  std::shared_ptr<store::HostPool> host_pool;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const config::Settings& settings,
                                                        EngineDeps deps = {});
  virtual ~Engine() = default;

  virtual absl::StatusOr<OpenResult> Open(const OpenOptions& options) = 0;

  // k, v: [n x kv_heads x head_dim] elements of the context's dtype, row-major (n may be 0).
  // RESOURCE_EXHAUSTED (and nothing changes) when the memory limit would be passed. Tokens
  // promised to a queued seal are charged twice (tail rows and the segment reserved for them)
  // until it is published.
  virtual absl::Status Append(ContextId ctx, int32_t layer, int64_t n, std::span<const std::byte> k,
                              std::span<const std::byte> v) = 0;

  // Append with the prefill queries of the same n tokens, q: [n x q_heads x head_dim] float32.
  // With index.graph = on they are held (charged to the memory limit) until the segment holding
  // those tokens is sealed, which builds its RetrievalAttention graph from them and releases
  // them. Queries are kept only when every earlier token of the tail had its queries; otherwise
  // (or with index.graph = off) they are ignored and the segment has no graph.
  virtual absl::Status AppendWithQueries(ContextId ctx, int32_t layer, int64_t n,
                                         std::span<const std::byte> k, std::span<const std::byte> v,
                                         std::span<const float> q) = 0;

  virtual absl::Status Seal(ContextId ctx) = 0;

  // q: [q_heads x head_dim] float32. out: [q_heads x head_dim] float32, lse: [q_heads].
  virtual absl::Status Attend(ContextId ctx, int32_t layer, std::span<const float> q,
                              const AttendBudget& budget, std::span<float> out,
                              std::span<float> lse, AttendStats* stats) = 0;

  // One decode step of B sequences in one call: item b attends context items[b].context (whose
  // layer `layer` may hold any number of tokens) with its budget and q rows b. Every context must
  // have the same q_heads and head_dim, and appear once. q, out: [B x q_heads x head_dim]
  // float32; lse: [B x q_heads]; stats: [B] or empty. All or nothing: on error no output is
  // defined. The CUDA backend runs the batch as one pipeline; the CPU backend spreads its (item,
  // KV head) pairs over the compute arena.
  virtual absl::Status AttendBatch(int32_t layer, std::span<const AttendBatchItem> items,
                                   std::span<const float> q, std::span<float> out,
                                   std::span<float> lse, std::span<AttendStats> stats) = 0;

  // AttendBatch on device tensors of a GPU client (issue 17; backends with a GPU only, else
  // FAILED_PRECONDITION "no GPU backend"). The buffers are those of `buffers` at `offsets` (bytes;
  // multiples of 16): q [B x q_heads x head_dim] float32, out the same, lse [B x q_heads]. The
  // GPU work waits for the registration's "q ready" event, and "out ready" is recorded after it
  // (also when the call fails: after what was queued); returns without waiting for the GPU.
  // Not checked on the host: q's finiteness (a non-finite q gives that call non-finite output).
  // Stats: steady tokens, estimated and total clusters (retrieved counts are not known yet).
  virtual absl::StatusOr<std::unique_ptr<DeviceBuffers>> OpenDeviceBuffers(
      const DeviceBuffersSpec& spec) = 0;
  virtual absl::Status AttendBatchDevice(int32_t layer, std::span<const AttendBatchItem> items,
                                         DeviceBuffers& buffers, const DeviceOffsets& offsets,
                                         std::span<AttendStats> stats) = 0;

  // q: [q_heads x head_dim] float32. positions, scores: [q_heads x k], best first; when a head
  // sees fewer than k tokens the rest is filled with position -1 and score -inf.
  // kGraph on a layer with no graph, of a context that never had prefill queries kept:
  // FAILED_PRECONDITION (nothing to search; use kWave or kFlat).
  virtual absl::Status Retrieve(ContextId ctx, int32_t layer, std::span<const float> q,
                                const RetrieveOptions& options, std::span<int64_t> positions,
                                std::span<float> scores, RetrieveStats* stats) = 0;

  // k, v: [positions.size() x kv_heads x head_dim] elements of the context's dtype.
  virtual absl::Status Gather(ContextId ctx, int32_t layer, std::span<const int64_t> positions,
                              std::span<std::byte> k, std::span<std::byte> v) = 0;

  virtual absl::Status Close(ContextId ctx) = 0;

  // Waits until the seals queued so far have run (in the background) and the jobs that ran them
  // have let go of their contexts (a Close after Flush, with no call in flight, is then the
  // context's last reference: its memory and the backend's OnClose go at that Close), then until
  // every sealed shared block is durable (without persistence, only the former).
  virtual absl::Status Flush() = 0;

  // Waits until the background fetch of remote-attached rows (remote.attach = index) has nothing
  // queued or running: every block attached so far is then fully local, except rows whose fetch
  // failed (counted in remote_kv_lost_segments / remote_kv_unavailable). No-op without the tier.
  virtual void WaitRemoteFetches() = 0;

  virtual absl::StatusOr<ContextInfo> Info(ContextId ctx) = 0;
  virtual std::vector<ContextId> ListContexts() = 0;
  virtual EngineStats Stats() = 0;
  virtual const config::Settings& settings() const = 0;
  // The pool all KV bytes come from (its idle limit is reloadable: store.host_pool_bytes).
  virtual store::HostPool& host_pool() = 0;
};

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_ENGINE_H_
