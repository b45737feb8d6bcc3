// The operations of kvwave::client::Client: build a request, stage its tensors, call, collect.
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "client/client_impl.h"
#include "config/status_macros.h"

namespace kvwave::client {
namespace pb = rpc::pb;

namespace {

template <typename T>
std::span<const std::byte> Bytes(std::span<const T> s) {
  return std::as_bytes(s);
}
template <typename T>
std::span<std::byte> Bytes(std::span<T> s) {
  return std::as_writable_bytes(s);
}

ModelShape FromProto(const pb::ModelShape& s) {
  ModelShape shape;
  shape.layers = s.layers();
  shape.q_heads = s.q_heads();
  shape.kv_heads = s.kv_heads();
  shape.head_dim = s.head_dim();
  absl::StatusOr<DType> dtype = rpc::FromProto(s.dtype());
  shape.dtype = dtype.ok() ? *dtype : DType::kF32;
  return shape;
}

ContextInfo FromProto(const pb::ContextInfo& p) {
  ContextInfo info;
  info.id = p.id();
  info.shape = FromProto(p.shape());
  info.tokens_per_layer.assign(p.tokens_per_layer().begin(), p.tokens_per_layer().end());
  info.sealed_segments = p.sealed_segments();
  info.bytes = p.bytes();
  info.session_id = p.session_id();
  info.has_queries = p.has_queries();
  info.graph_segments = p.graph_segments();
  info.query_tokens = p.query_tokens();
  return info;
}

}  // namespace

absl::Status Client::Ping() {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::PingRequest req;
  pb::PingResponse resp;
  return impl_->Call(pb::PING, req, resp);
}

absl::StatusOr<OpenResult> Client::Open(const OpenOptions& options) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::OpenRequest req;
  pb::ModelShape* s = req.mutable_shape();
  s->set_layers(options.shape.layers);
  s->set_q_heads(options.shape.q_heads);
  s->set_kv_heads(options.shape.kv_heads);
  s->set_head_dim(options.shape.head_dim);
  s->set_dtype(rpc::ToProto(options.shape.dtype));
  req.mutable_token_ids()->Add(options.token_ids.begin(), options.token_ids.end());
  req.set_prefix_namespace(options.prefix_namespace);
  pb::OpenResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::OPEN, req, resp));
  return OpenResult{resp.context_id(), resp.matched_tokens(),
                    static_cast<PrefixAccess>(resp.prefix_access())};
}

absl::Status Client::Append(ContextId ctx, int32_t layer, int64_t n, std::span<const std::byte> k,
                            std::span<const std::byte> v) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::AppendRequest req;
  req.set_context_id(ctx);
  req.set_layer(layer);
  req.set_tokens(n);
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(k, 1, req.mutable_k()));
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(v, 1, req.mutable_v()));
  pb::AppendResponse resp;
  return impl_->Call(pb::APPEND, req, resp);
}

absl::Status Client::AppendWithQueries(ContextId ctx, int32_t layer, int64_t n,
                                       std::span<const std::byte> k, std::span<const std::byte> v,
                                       std::span<const float> q) {
  if (q.empty()) return absl::InvalidArgumentError("q: no queries (use Append)");
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::AppendRequest req;
  req.set_context_id(ctx);
  req.set_layer(layer);
  req.set_tokens(n);
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(k, 1, req.mutable_k()));
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(v, 1, req.mutable_v()));
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(Bytes(q), 4, req.mutable_q()));
  pb::AppendResponse resp;
  return impl_->Call(pb::APPEND, req, resp);
}

absl::Status Client::Seal(ContextId ctx) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::SealRequest req;
  req.set_context_id(ctx);
  pb::SealResponse resp;
  return impl_->Call(pb::SEAL, req, resp);
}

absl::Status Client::Attend(ContextId ctx, int32_t layer, std::span<const float> q,
                            const AttendBudget& budget, std::span<float> out, std::span<float> lse,
                            AttendStats* stats) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::AttendRequest req;
  req.set_context_id(ctx);
  req.set_layer(layer);
  req.set_retrieval_budget(budget.retrieval);
  req.set_estimation_budget(budget.estimation);
  req.set_method(static_cast<pb::AttendMethod>(budget.method));
  req.set_graph_top_k(budget.graph_top_k);
  req.set_beam(budget.beam);
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(Bytes(q), 4, req.mutable_q()));
  impl_->StageOutput(Bytes(out), 4, req.mutable_out());
  impl_->StageOutput(Bytes(lse), 4, req.mutable_lse());
  pb::AttendResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::ATTEND, req, resp));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.out(), Bytes(out), "out"));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.lse(), Bytes(lse), "lse"));
  if (stats != nullptr) *stats = ToStats(resp.stats());
  return absl::OkStatus();
}

absl::Status Client::AttendBatch(int32_t layer, std::span<const AttendBatchEntry> entries,
                                 std::span<const float> q, std::span<float> out,
                                 std::span<float> lse, std::span<AttendStats> stats) {
  if (!stats.empty() && stats.size() != entries.size()) {
    return absl::InvalidArgumentError("stats must be empty or one per entry");
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::AttendBatchRequest req;
  req.set_layer(layer);
  for (const AttendBatchEntry& e : entries) SetEntry(e, req.add_entries());
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(Bytes(q), 4, req.mutable_q()));
  impl_->StageOutput(Bytes(out), 4, req.mutable_out());
  impl_->StageOutput(Bytes(lse), 4, req.mutable_lse());
  pb::AttendBatchResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::ATTEND_BATCH, req, resp));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.out(), Bytes(out), "out"));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.lse(), Bytes(lse), "lse"));
  return CopyStats(resp.stats(), stats, "attend_batch");
}

absl::Status Client::Retrieve(ContextId ctx, int32_t layer, std::span<const float> q,
                              const RetrieveOptions& options, std::span<int64_t> positions,
                              std::span<float> scores, RetrieveStats* stats) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::RetrieveRequest req;
  req.set_context_id(ctx);
  req.set_layer(layer);
  req.set_k(options.k);
  req.set_method(options.method == RetrieveMethod::kFlat    ? pb::FLAT
                 : options.method == RetrieveMethod::kGraph ? pb::GRAPH
                                                            : pb::WAVE);
  req.set_cluster_budget(options.cluster_budget);
  req.set_beam(options.beam);
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(Bytes(q), 4, req.mutable_q()));
  impl_->StageOutput(Bytes(positions), 8, req.mutable_positions());
  impl_->StageOutput(Bytes(scores), 4, req.mutable_scores());
  pb::RetrieveResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::RETRIEVE, req, resp));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.positions(), Bytes(positions), "positions"));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.scores(), Bytes(scores), "scores"));
  if (stats != nullptr) *stats = {resp.keys_scored(), resp.keys_total()};
  return absl::OkStatus();
}

absl::Status Client::Gather(ContextId ctx, int32_t layer, std::span<const int64_t> positions,
                            std::span<std::byte> k, std::span<std::byte> v) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::GatherRequest req;
  req.set_context_id(ctx);
  req.set_layer(layer);
  KVWAVE_RETURN_IF_ERROR(impl_->StageInput(Bytes(positions), 8, req.mutable_positions()));
  impl_->StageOutput(k, 1, req.mutable_k());
  impl_->StageOutput(v, 1, req.mutable_v());
  pb::GatherResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::GATHER, req, resp));
  KVWAVE_RETURN_IF_ERROR(impl_->Collect(resp.k(), k, "k"));
  return impl_->Collect(resp.v(), v, "v");
}

absl::Status Client::Close(ContextId ctx) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::CloseRequest req;
  req.set_context_id(ctx);
  pb::CloseResponse resp;
  return impl_->Call(pb::CLOSE, req, resp);
}

absl::Status Client::Drop(ContextId ctx) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::DropRequest req;
  req.set_context_id(ctx);
  pb::DropResponse resp;
  return impl_->Call(pb::DROP, req, resp);
}

absl::StatusOr<ContextInfo> Client::Info(ContextId ctx) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::InfoRequest req;
  req.set_context_id(ctx);
  pb::InfoResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::INFO, req, resp));
  return FromProto(resp.info());
}

absl::StatusOr<std::vector<ContextInfo>> Client::ListContexts() {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::ListContextsRequest req;
  pb::ListContextsResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::LIST_CONTEXTS, req, resp));
  std::vector<ContextInfo> out;
  for (const pb::ContextInfo& c : resp.contexts()) out.push_back(FromProto(c));
  return out;
}

absl::StatusOr<ServerStats> Client::Stats() {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pb::StatsRequest req;
  pb::StatsResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::STATS, req, resp));
  ServerStats s;
  for (const pb::OpStats& o : resp.ops()) {
    s.ops.push_back({o.op(), o.count(), o.errors(), o.p50_us(), o.p99_us(), o.p999_us(),
                     o.mean_us(), o.bytes_in(), o.bytes_out()});
  }
  s.sessions = resp.sessions();
  s.sessions_total = resp.sessions_total();
  s.contexts = resp.contexts();
  s.memory_used_bytes = resp.memory_used_bytes();
  s.memory_limit_bytes = resp.memory_limit_bytes();
  s.segments_sealed = resp.segments_sealed();
  s.tokens_appended = resp.tokens_appended();
  s.prefix_blocks_registered = resp.prefix_blocks_registered();
  s.prefix_blocks_resident = resp.prefix_blocks_resident();
  s.prefix_blocks_known = resp.prefix_blocks_known();
  s.prefix_matched_blocks = resp.prefix_matched_blocks();
  s.prefix_evictions = resp.prefix_evictions();
  s.prefix_reloads = resp.prefix_reloads();
  s.persist_bytes_written = resp.persist_bytes_written();
  s.persist_corrupt_records = resp.persist_corrupt_records();
  s.persist_errors = resp.persist_errors();
  s.host_pool_idle_bytes = resp.host_pool_idle_bytes();
  s.host_pool_limit_bytes = resp.host_pool_limit_bytes();
  s.host_pool_hits = resp.host_pool_hits();
  s.host_pool_misses = resp.host_pool_misses();
  s.attention_backend = resp.attention_backend();
  s.gpu_device = resp.gpu_device();
  s.gpu_pool_bytes = resp.gpu_pool_bytes();
  s.gpu_pool_used_bytes = resp.gpu_pool_used_bytes();
  s.gpu_hits = resp.gpu_hits();
  s.gpu_misses = resp.gpu_misses();
  s.gpu_pcie_bytes = resp.gpu_pcie_bytes();
  s.gpu_segments_resident = resp.gpu_segments_resident();
  s.gpu_device_registrations = resp.gpu_device_registrations();
  s.gpu_ipc_mappings = resp.gpu_ipc_mappings();
  s.gpu_ipc_events = resp.gpu_ipc_events();
  s.gpu_device_calls = resp.gpu_device_calls();
  s.gpu_device_errors = resp.gpu_device_errors();
  s.in_flight = resp.in_flight();
  s.rss_bytes = resp.rss_bytes();
  s.frames_rejected = resp.frames_rejected();
  s.uptime_s = resp.uptime_s();
  s.prometheus_text = resp.prometheus_text();
  return s;
}

}  // namespace kvwave::client
