// kvwave C++ client: connects to kvwaved over its Unix socket (with a shared-memory region for
// tensors) or over TCP (tensors inline, a shared-secret token), and exposes every engine
// operation with absl::Status / absl::StatusOr results.
//
//   auto client = kvwave::client::Client::Connect({.socket_path = "/tmp/kvwaved.sock"});
//   auto ctx = (*client)->Open({.shape = {.layers = 32, .q_heads = 32, .kv_heads = 8,
//                                        .head_dim = 128, .dtype = kvwave::DType::kBF16}});
//   (*client)->Append(ctx->id, layer, n, k_bytes, v_bytes);
//   (*client)->Attend(ctx->id, layer, q, {}, out, lse);
//
// Tensors are row-major: K/V [n x kv_heads x head_dim] of the context's dtype; queries, outputs
// and scores float32; positions int64.
//
// Zero copy: over shared memory, every tensor is first copied into the region, except a span
// that already lies inside it (see SharedBuffer()), which is passed by offset as is.
//
// Threading rule: a Client is thread-safe, but it has ONE request in flight at a time: calls
// from several threads are serialised by an internal mutex. For parallel requests, use one
// Client per thread (each has its own connection, session and region). Contexts belong to the
// Client (session) that opened them and are released by the server when it disconnects.
// Spans returned by SharedBuffer() stay valid for the Client's lifetime, and their contents may
// be overwritten by the next call that stages tensors.
#ifndef KVWAVE_CLIENT_INCLUDE_KVWAVE_CLIENT_H_
#define KVWAVE_CLIENT_INCLUDE_KVWAVE_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "config/dtype.h"

// A CUDA stream of the caller: cudaStream_t is CUstream_st* (no CUDA header needed here).
struct CUstream_st;

namespace kvwave::client {

using ContextId = uint64_t;

struct ClientOptions {
  // Unix socket of kvwaved (used when tcp_port == 0).
  std::string socket_path = "/tmp/kvwaved.sock";
  // TCP instead of the Unix socket: host, port and the server's rpc.tcp_token.
  std::string tcp_host = "127.0.0.1";
  int tcp_port = 0;
  std::string token;
  // Credentials of kvwaved's trust model, presented at Hello on either transport (README, "Trust
  // model"): trust.admin_token, or the write_token / read_token of a [trust.namespace.NAME].
  // Connect fails (PERMISSION_DENIED) if one matches no configured token.
  std::vector<std::string> credentials;
  // Size of the shared-memory region (Unix socket only); 0 = send tensors inline.
  size_t shared_memory_bytes = size_t{64} << 20;
  // Deadline of each request; 0 = the server's default. The client gives up waiting for a reply
  // after the deadline plus a grace period (or after 60 s when 0) and closes the connection.
  int deadline_ms = 0;
  std::string client_name = "kvwave-client";
  // After sending a request, poll for the reply this long (non-blocking reads and sched_yield)
  // before blocking in recv; 0 = block at once. A thread that blocks leaves its CPU idle, and on
  // a VM waking an idle vCPU costs tens of microseconds (measured 35-50 us per round trip on the
  // 2-vCPU dev VM vs 12 us when the waiter stays runnable). Yielding lets any other runnable
  // thread on this CPU (the daemon's, say) run meanwhile, so little is lost when it is busy.
  int poll_us = 50;
};

struct ModelShape {
  int32_t layers = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kBF16;
  int64_t TokenBytesPerLayer() const {
    return int64_t{kv_heads} * head_dim * static_cast<int64_t>(ElementSize(dtype));
  }
};

struct OpenOptions {
  ModelShape shape;
  std::vector<int32_t> token_ids;  // optional, for prefix sharing
  std::string prefix_namespace;
};

// What the session may do with the shared prefix blocks of the namespace it opened in (decided by
// kvwaved's trust model; kNone when no token ids were given).
enum class PrefixAccess {
  kNone = 0,   // not shared
  kRead = 1,   // attaches shared blocks; the blocks it seals stay private
  kWrite = 2,  // also registers (shares, persists) the blocks it seals
};

struct OpenResult {
  ContextId id = 0;
  int64_t matched_tokens = 0;
  PrefixAccess prefix_access = PrefixAccess::kNone;
};

// How Attend computes a layer (kvwaved's attend.method when kDefault):
//   kRetroInfer          tripartite attention over the wave index (the budgets below);
//   kRetrievalAttention  the steady zone and, per query head, the RetrievalAttention graphs' top
//                        graph_top_k tokens, exactly, merged by log-sum-exp; needs a context
//                        appended with prefill queries (AppendWithQueries) and index.graph = on,
//                        else FAILED_PRECONDITION.
enum class AttendMethod { kDefault = 0, kRetroInfer = 1, kRetrievalAttention = 2 };

// Negative budgets and zero graph options = the server's defaults.
struct AttendBudget {
  double retrieval = -1;
  double estimation = -1;
  AttendMethod method = AttendMethod::kDefault;
  int32_t graph_top_k = 0;  // retrievalattention: tokens per query head (attend.graph_top_k)
  int32_t beam = 0;         // retrievalattention: search queue per segment (index.graph_beam)
};

// One entry of AttendBatch: a context and its budgets.
struct AttendBatchEntry {
  ContextId ctx = 0;
  AttendBudget budget;
};

struct AttendStats {
  int64_t steady_tokens = 0;
  int64_t retrieved_tokens = 0;
  int64_t retrieved_clusters = 0;
  int64_t estimated_clusters = 0;
  int64_t total_clusters = 0;
  int64_t scored_tokens = 0;  // member keys scored by attend.rank = two_pass (not attended)
  // retrievalattention: keys scored by the graph searches; retrieved_tokens then counts the
  // tokens they chose over query heads.
  int64_t graph_keys_scored = 0;
};

// kGraph: the RetrievalAttention graph of each sealed segment (beam search), the rest exact;
// FAILED_PRECONDITION on a context without graphs (no prefill queries, or index.graph = off).
enum class RetrieveMethod { kWave, kFlat, kGraph };

struct RetrieveOptions {
  int32_t k = 100;
  RetrieveMethod method = RetrieveMethod::kWave;
  double cluster_budget = -1;  // wave; negative = the server's default
  int32_t beam = 0;            // graph: search queue per segment; 0 = index.graph_beam
};

struct RetrieveStats {
  int64_t keys_scored = 0;
  int64_t keys_total = 0;
};

struct ContextInfo {
  ContextId id = 0;
  ModelShape shape;
  std::vector<int64_t> tokens_per_layer;
  int64_t sealed_segments = 0;
  int64_t bytes = 0;
  uint64_t session_id = 0;  // owning session, 0 = none
  // RetrievalAttention: prefill queries were appended and kept (index.graph = on); sealed
  // segments with a graph; tokens whose queries are held until their segment's graph is built.
  bool has_queries = false;
  int64_t graph_segments = 0;
  int64_t query_tokens = 0;
};

struct OpStats {
  std::string op;
  uint64_t count = 0, errors = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, mean_us = 0;
  uint64_t bytes_in = 0, bytes_out = 0;
};

struct ServerStats {
  std::vector<OpStats> ops;
  int64_t sessions = 0, sessions_total = 0, contexts = 0;
  int64_t memory_used_bytes = 0, memory_limit_bytes = 0;
  int64_t segments_sealed = 0, tokens_appended = 0, in_flight = 0, rss_bytes = 0;
  int64_t frames_rejected = 0;
  // Shared prefixes and persistence.
  int64_t prefix_blocks_registered = 0, prefix_blocks_resident = 0, prefix_blocks_known = 0,
          prefix_matched_blocks = 0, prefix_evictions = 0;
  int64_t prefix_reloads = 0, persist_bytes_written = 0, persist_corrupt_records = 0,
          persist_errors = 0;
  // Freed KV blocks the daemon keeps for reuse: not in memory_used_bytes, at most the limit.
  int64_t host_pool_idle_bytes = 0, host_pool_limit_bytes = 0, host_pool_hits = 0,
          host_pool_misses = 0;
  // The attention backend ("cpu" or "cuda") and its GPU page pool (zeros on the CPU).
  std::string attention_backend;
  int32_t gpu_device = -1;
  int64_t gpu_pool_bytes = 0, gpu_pool_used_bytes = 0, gpu_hits = 0, gpu_misses = 0,
          gpu_pcie_bytes = 0, gpu_segments_resident = 0;
  // GPU clients: registrations, mapped client allocations and events open now; device calls.
  int64_t gpu_device_registrations = 0, gpu_ipc_mappings = 0, gpu_ipc_events = 0,
          gpu_device_calls = 0, gpu_device_errors = 0;
  double uptime_s = 0;
  std::string prometheus_text;
};

// GPU clients (device tensors through CUDA IPC). A buffer is [offset, offset + bytes) of the
// device allocation whose cudaIpcMemHandle_t (64 bytes) is ipc_handle.
struct DeviceBufferHandle {
  std::string ipc_handle;
  uint64_t offset = 0;
  uint64_t bytes = 0;
};
// What RegisterDeviceHandles sends: the GPU (cudaDeviceProp::uuid, 16 bytes), the buffers and
// the cudaIpcEventHandle_t of the interprocess events "q ready" and "out ready".
struct DeviceHandles {
  std::string device_uuid;
  DeviceBufferHandle q, out, lse;
  std::string q_ready_event, out_ready_event;
};
// Byte offsets of one call into a registration's q, out and lse buffers (multiples of 16).
struct DeviceOffsets {
  uint64_t q = 0, out = 0, lse = 0;
};

class Client {
 public:
  // Connects and performs the handshake (version, limits, token, shared region).
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  absl::Status Ping();
  absl::StatusOr<OpenResult> Open(const OpenOptions& options);
  // k, v: [n x kv_heads x head_dim] elements of the context's dtype.
  absl::Status Append(ContextId ctx, int32_t layer, int64_t n, std::span<const std::byte> k,
                      std::span<const std::byte> v);
  // Append with the prefill queries of the same n tokens, q: [n x q_heads x head_dim] float32
  // (every query head). With index.graph = on, kvwaved keeps them (charged to its memory limit)
  // until the segment of those tokens is sealed and its RetrievalAttention graph built.
  absl::Status AppendWithQueries(ContextId ctx, int32_t layer, int64_t n,
                                 std::span<const std::byte> k, std::span<const std::byte> v,
                                 std::span<const float> q);
  absl::Status Seal(ContextId ctx);
  // q, out: [q_heads x head_dim] float32; lse: [q_heads] float32.
  absl::Status Attend(ContextId ctx, int32_t layer, std::span<const float> q,
                      const AttendBudget& budget, std::span<float> out, std::span<float> lse,
                      AttendStats* stats = nullptr);
  // One layer of a decode step of B sequences in one round trip: entry b attends its context
  // (of any length) with q rows b. The contexts share q_heads and head_dim; each appears once.
  // q, out: [B x q_heads x head_dim] float32; lse: [B x q_heads]; stats: [B] or empty.
  absl::Status AttendBatch(int32_t layer, std::span<const AttendBatchEntry> entries,
                           std::span<const float> q, std::span<float> out, std::span<float> lse,
                           std::span<AttendStats> stats = {});
  // Device tensors (kvwaved on this process's GPU, Unix socket; this library built with CUDA).
  // RegisterDeviceBuffers registers, once, three device buffers of this process (any allocator:
  // cudaMalloc, torch's caching allocator...; float32) for queries, outputs and log-sum-exps,
  // and creates the interprocess event pair; kvwaved maps them until UnregisterDeviceBuffers or
  // the end of the session. AttendDevice / AttendBatchDevice then read q and write out / lse at
  // the given offsets, ordered on `stream`: "q ready" is recorded on it before the request is
  // sent, and once the reply is in, `stream` waits for "out ready" (recorded by kvwaved after its
  // GPU work, also after a failed call's). Neither side waits for the GPU on the host.
  // Layouts as AttendBatch: q, out [B x q_heads x head_dim], lse [B x q_heads]. One call at a
  // time per registration (this client serialises its calls anyway). Stats: steady tokens,
  // estimated and total clusters (retrieved counts are not known when the reply is sent).
  absl::StatusOr<uint64_t> RegisterDeviceBuffers(const void* q, size_t q_bytes, void* out,
                                                 size_t out_bytes, void* lse, size_t lse_bytes);
  // Registration by handles made elsewhere (another language, or tests): no events of this
  // Client; AttendDevice on it records and waits for nothing.
  absl::StatusOr<uint64_t> RegisterDeviceHandles(const DeviceHandles& handles);
  absl::Status UnregisterDeviceBuffers(uint64_t registration);
  absl::Status AttendDevice(uint64_t registration, ContextId ctx, int32_t layer,
                            const DeviceOffsets& offsets, const AttendBudget& budget,
                            CUstream_st* stream, AttendStats* stats = nullptr);
  absl::Status AttendBatchDevice(uint64_t registration, int32_t layer,
                                 std::span<const AttendBatchEntry> entries,
                                 const DeviceOffsets& offsets, CUstream_st* stream,
                                 std::span<AttendStats> stats = {});

  // positions, scores: [q_heads x k], best first; -1 / -inf past the tokens a head sees.
  absl::Status Retrieve(ContextId ctx, int32_t layer, std::span<const float> q,
                        const RetrieveOptions& options, std::span<int64_t> positions,
                        std::span<float> scores, RetrieveStats* stats = nullptr);
  // k, v: [positions.size() x kv_heads x head_dim] of the context's dtype.
  absl::Status Gather(ContextId ctx, int32_t layer, std::span<const int64_t> positions,
                      std::span<std::byte> k, std::span<std::byte> v);
  absl::Status Close(ContextId ctx);
  // Info and Drop of a context this session did not open are NOT_FOUND, unless the session holds
  // administrative rights (trust.admin_uids / trust.admin_token); so is ListContexts of all.
  absl::StatusOr<ContextInfo> Info(ContextId ctx);
  // This session's contexts; every session's for an administrator.
  absl::StatusOr<std::vector<ContextInfo>> ListContexts();
  // Closes a context of this session; an administrator's closes any session's.
  absl::Status Drop(ContextId ctx);
  absl::StatusOr<ServerStats> Stats();

  // The shared region (empty over TCP). Tensors placed here are sent by offset without a copy.
  std::span<std::byte> SharedBuffer();
  bool uses_shared_memory() const;
  uint64_t session_id() const;
  uint64_t server_max_frame_bytes() const;

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvwave::client

#endif  // KVWAVE_CLIENT_INCLUDE_KVWAVE_CLIENT_H_
