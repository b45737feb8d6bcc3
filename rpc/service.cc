// Request dispatch, Hello, sessions and the context-management operations of the service.
// The tensor operations (Append, Seal, Attend, Retrieve, Gather) are in service_ops.cc.
#include "rpc/service.h"

#include <unistd.h>

#include <algorithm>
#include <new>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "gpu/device_lost.h"
#include "rpc/log.h"
#include "rpc/service_call.h"
#include "rpc/wire.h"
#include "store/host_memory.h"

namespace kvwave::rpc {
namespace {

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// Frames the service itself builds that carry no tensors (errors, Hello): always small.
std::string EncodeSmall(const FrameHeader& header, const google::protobuf::MessageLite& body) {
  absl::StatusOr<std::string> frame = EncodeFrame(header, body);
  KVWAVE_CHECK(frame.ok());  // a status and a few scalars
  return *std::move(frame);
}

absl::Status OutOfMemory(uint16_t op) {
  return absl::ResourceExhaustedError(
      absl::StrCat(OpName(op), ": kvwaved could not allocate memory for this request"));
}

}  // namespace

Service::Service(engine::Engine& engine, const config::Settings& settings)
    : engine_(engine),
      max_frame_bytes_(static_cast<uint64_t>(settings.max_frame_bytes)),
      max_region_bytes_(static_cast<uint64_t>(settings.max_region_bytes)),
      address_budget_(static_cast<uint64_t>(settings.max_mapped_bytes)),
      tcp_token_(settings.tcp_token),
      trust_(settings),
      default_deadline_ms_(settings.default_deadline_ms),
      retrieval_budget_(settings.retrieval_budget),
      estimation_budget_(settings.estimation_budget),
      retrievalattention_(settings.attend_method == "retrievalattention"),
      graph_top_k_(static_cast<int32_t>(settings.graph_top_k)),
      graph_beam_(static_cast<int32_t>(settings.graph_beam)) {}

void Service::ApplySettings(const config::Settings& settings) {
  default_deadline_ms_.store(settings.default_deadline_ms, std::memory_order_relaxed);
  retrieval_budget_.store(settings.retrieval_budget, std::memory_order_relaxed);
  estimation_budget_.store(settings.estimation_budget, std::memory_order_relaxed);
  retrievalattention_.store(settings.attend_method == "retrievalattention",
                            std::memory_order_relaxed);
  graph_top_k_.store(static_cast<int32_t>(settings.graph_top_k), std::memory_order_relaxed);
  graph_beam_.store(static_cast<int32_t>(settings.graph_beam), std::memory_order_relaxed);
}

std::string Service::ErrorFrame(uint64_t request_id, const absl::Status& status) {
  pb::ErrorResponse resp;
  ToProto(status, resp.mutable_status());
  FrameHeader h;
  h.type = pb::ERROR | kResponseBit;
  h.request_id = request_id;
  return EncodeSmall(h, resp);
}

std::string Service::EncodeReply(const FrameHeader& header,
                                 const google::protobuf::MessageLite& body) {
  const uint64_t bytes = kFrameHeaderBytes + body.ByteSizeLong();
  if (bytes > max_frame_bytes_) {
    return ErrorFrame(header.request_id,
                      absl::ResourceExhaustedError(absl::StrCat(
                          OpName(header.type & ~kResponseBit), ": the reply of ", bytes,
                          " bytes would exceed rpc.max_frame_bytes = ", max_frame_bytes_)));
  }
  absl::StatusOr<std::string> frame = EncodeFrame(header, body);
  if (!frame.ok()) return ErrorFrame(header.request_id, frame.status());
  return *std::move(frame);
}

template <typename Req, typename Resp>
std::string Service::Run(Session& session, const Frame& frame,
                         absl::Status (Service::*handler)(Call&, const Req&, Resp&),
                         RunState* state) {
  Req req;
  Resp resp;
  Call call(session, max_frame_bytes_, state->backlog, &state->reserved);
  absl::Status status = ParseBody(frame.body, req);
  if (status.ok()) status = (this->*handler)(call, req, resp);
  if (gpu::IsDeviceLost(status) && on_device_lost_) on_device_lost_(status);
  if (call.deferred()) {
    state->deferred = true;
    return std::string();
  }
  if (status.ok()) {
    call.Finish();
  } else {
    resp.Clear();
  }
  ToProto(status, resp.mutable_status());
  state->ok = status.ok();
  FrameHeader h;
  h.type = frame.header.op() | kResponseBit;
  h.request_id = frame.header.request_id;
  return EncodeReply(h, resp);
}

std::string Service::Handle(Session& session, const Frame& frame, Clock::time_point received,
                            ReplyBacklog* backlog) {
  const uint16_t op = frame.header.op();
  RunState state;
  state.backlog = backlog;
  std::string out;
  try {
    out = Dispatch(session, frame, received, &state);
  } catch (const std::bad_alloc&) {  // address space or memory ran out on the way
    out = ErrorFrame(frame.header.request_id, OutOfMemory(op));
    state.ok = false;
    state.deferred = false;
  } catch (const std::length_error&) {  // a container asked for more than it can hold
    out = ErrorFrame(frame.header.request_id, OutOfMemory(op));
    state.ok = false;
    state.deferred = false;
  }
  if (backlog != nullptr) {
    if (!state.deferred) backlog->Add(out.size());
    backlog->Release(state.reserved);
  }
  if (state.deferred) return std::string();
  const double micros = std::chrono::duration<double, std::micro>(Clock::now() - received).count();
  stats_.RecordOp(op, state.ok, micros, kFrameHeaderBytes + frame.body.size(), out.size());
  return out;
}

std::string Service::Dispatch(Session& session, const Frame& frame, Clock::time_point received,
                              RunState* state) {
  const uint16_t op = frame.header.op();
  const int64_t deadline_ms = frame.header.deadline_ms != 0
                                  ? frame.header.deadline_ms
                                  : default_deadline_ms_.load(std::memory_order_relaxed);
  std::string out;
  bool& ok = state->ok;
  if (frame.header.is_response()) {
    out = ErrorFrame(frame.header.request_id,
                     absl::InvalidArgumentError("a client may not send response frames"));
    ok = false;
  } else if (Clock::now() > received + std::chrono::milliseconds(deadline_ms)) {
    out = ErrorFrame(frame.header.request_id,
                     absl::DeadlineExceededError(absl::StrCat(
                         OpName(op), ": deadline of ", deadline_ms, " ms passed before it ran")));
    ok = false;
  } else {
    switch (op) {
      case pb::PING:
        out = Run(session, frame, &Service::DoPing, state);
        break;
      case pb::STATS:
        out = Run(session, frame, &Service::DoStats, state);
        break;
      case pb::OPEN:
        out = Run(session, frame, &Service::DoOpen, state);
        break;
      case pb::APPEND:
        out = Run(session, frame, &Service::DoAppend, state);
        break;
      case pb::SEAL:
        out = Run(session, frame, &Service::DoSeal, state);
        break;
      case pb::ATTEND:
        out = Run(session, frame, &Service::DoAttend, state);
        break;
      case pb::ATTEND_BATCH:
        out = Run(session, frame, &Service::DoAttendBatch, state);
        break;
      case pb::REGISTER_DEVICE:
        out = Run(session, frame, &Service::DoRegisterDevice, state);
        break;
      case pb::UNREGISTER_DEVICE:
        out = Run(session, frame, &Service::DoUnregisterDevice, state);
        break;
      case pb::ATTEND_DEVICE:
        out = Run(session, frame, &Service::DoAttendDevice, state);
        break;
      case pb::RETRIEVE:
        out = Run(session, frame, &Service::DoRetrieve, state);
        break;
      case pb::GATHER:
        out = Run(session, frame, &Service::DoGather, state);
        break;
      case pb::CLOSE:
        out = Run(session, frame, &Service::DoClose, state);
        break;
      case pb::INFO:
        out = Run(session, frame, &Service::DoInfo, state);
        break;
      case pb::LIST_CONTEXTS:
        out = Run(session, frame, &Service::DoList, state);
        break;
      case pb::DROP:
        out = Run(session, frame, &Service::DoDrop, state);
        break;
      default:
        out = ErrorFrame(frame.header.request_id, absl::InvalidArgumentError(absl::StrCat(
                                                      "unknown or unexpected message type ", op)));
        ok = false;
    }
  }
  return out;
}

std::string Service::HandleHello(Session& session, const Frame& frame, std::vector<int>& fds,
                                 bool* accepted) {
  pb::HelloRequest req;
  pb::HelloResponse resp;
  absl::Status status = ParseBody(frame.body, req);
  SharedRegion region;
  Principal principal;
  if (status.ok() && (req.min_version() > kProtocolVersion ||
                      (req.max_version() != 0 && req.max_version() < kProtocolVersion))) {
    status = absl::FailedPreconditionError(absl::StrCat("client speaks versions ",
                                                        req.min_version(), "..", req.max_version(),
                                                        ", server speaks ", kProtocolVersion));
  }
  if (status.ok() && !session.local() && !tcp_token_.empty() &&
      !ConstantTimeEquals(req.token(), tcp_token_)) {
    status = absl::PermissionDeniedError("bad token");
  }
  if (status.ok()) {
    const std::vector<std::string> credentials(req.credentials().begin(), req.credentials().end());
    absl::StatusOr<Principal> who =
        trust_.Authenticate(session.local(), session.peer(), credentials);
    if (who.ok()) {
      principal = *std::move(who);
    } else {
      status = who.status();
    }
  }
  if (status.ok() && req.has_shared_memory()) {
    if (!session.local() || fds.empty()) {
      status = absl::InvalidArgumentError(
          "has_shared_memory set but no fd came with Hello (only a Unix socket can pass one)");
    } else {
      absl::StatusOr<SharedRegion> adopted =
          SharedRegion::Adopt(fds.front(), max_region_bytes_, &address_budget_);
      fds.erase(fds.begin());
      if (adopted.ok()) {
        region = *std::move(adopted);
      } else {
        status = adopted.status();
      }
    }
  }
  for (int fd : fds) close(fd);
  fds.clear();
  *accepted = status.ok();
  if (status.ok()) {
    resp.set_version(kProtocolVersion);
    resp.set_max_frame_bytes(max_frame_bytes_);
    resp.set_session_id(session.id());
    resp.set_shared_memory(region.valid());
    resp.set_shared_memory_bytes(region.size());
    resp.set_default_deadline_ms(
        static_cast<uint32_t>(default_deadline_ms_.load(std::memory_order_relaxed)));
    resp.set_server_version("kvwaved 0.1.0");
    session.CompleteHello(std::move(region), std::move(principal));
    absl::MutexLock lock(&mu_);
    sessions_[session.id()] = &session;
  }
  ToProto(status, resp.mutable_status());
  stats_.RecordOp(pb::HELLO, status.ok(), 0, kFrameHeaderBytes + frame.body.size(), 0);
  FrameHeader h;
  h.type = pb::HELLO | kResponseBit;
  h.request_id = frame.header.request_id;
  return EncodeSmall(h, resp);
}

void Service::ReleaseSession(Session& session) {
  {
    absl::MutexLock lock(&mu_);
    sessions_.erase(session.id());
  }
  // GPU clients' registrations: each waits for its last call's GPU work, then closes its
  // handles (engine/cuda/device_buffers.h).
  const size_t registrations = session.TakeDevices().size();
  if (registrations > 0) {
    Logger("session")->info("session {} ended: closed {} device registration(s)", session.id(),
                            registrations);
  }
  std::vector<engine::ContextId> ids = session.TakeContexts();
  for (engine::ContextId id : ids) {
    absl::Status st = engine_.Close(id);
    if (!st.ok() && !absl::IsNotFound(st)) {
      Logger("session")->warn("session {}: closing context {}: {}", session.id(), id,
                              st.ToString());
    }
    absl::MutexLock lock(&mu_);
    owners_.erase(id);
  }
  if (!ids.empty()) {
    Logger("session")->info("session {} ended: released {} context(s)", session.id(), ids.size());
  }
}

absl::StatusOr<store::ModelShape> Service::OwnedShape(const Session& session, uint64_t ctx,
                                                      int32_t layer) const {
  std::optional<store::ModelShape> shape = session.Shape(ctx);
  if (!shape) {
    return absl::NotFoundError(absl::StrCat("context ", ctx, " is not open in this session"));
  }
  if (layer < 0 || layer >= shape->layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", shape->layers, ")"));
  }
  return *shape;
}

absl::Status Service::CheckOwnerOrAdmin(const Session& session, uint64_t ctx) const {
  if (session.principal().admin || session.Shape(ctx).has_value()) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("context ", ctx, " is not open in this session"));
}

absl::Status Service::DoPing(Call&, const pb::PingRequest& req, pb::PingResponse& resp) {
  resp.set_payload(req.payload());
  return absl::OkStatus();
}

absl::Status Service::DoStats(Call&, const pb::StatsRequest&, pb::StatsResponse& resp) {
  FillStats(resp);
  resp.set_in_flight(std::max<int64_t>(0, resp.in_flight() - 1));  // not counting this request
  resp.set_prometheus_text(stats_.Prometheus(resp));
  return absl::OkStatus();
}

void Service::FillStats(pb::StatsResponse& out) {
  stats_.Fill(out);
  const engine::EngineStats e = engine_.Stats();
  out.set_contexts(e.contexts);
  out.set_memory_used_bytes(e.memory_used_bytes);
  out.set_memory_limit_bytes(e.memory_limit_bytes);
  out.set_segments_sealed(e.segments_sealed);
  out.set_tokens_appended(e.tokens_appended);
  out.set_prefix_blocks_registered(e.prefix_blocks_registered);
  out.set_prefix_blocks_resident(e.prefix_blocks_resident);
  out.set_prefix_blocks_known(e.prefix_blocks_known);
  out.set_prefix_matched_blocks(e.prefix_matched_blocks);
  out.set_prefix_evictions(e.prefix_evictions);
  out.set_prefix_reloads(e.prefix_reloads);
  out.set_persist_bytes_written(e.persist_bytes_written);
  out.set_persist_corrupt_records(e.persist_corrupt_records);
  out.set_persist_errors(e.persist_errors);
  out.set_remote_blocks_written(e.remote_blocks_written);
  out.set_remote_bytes_written(e.remote_bytes_written);
  out.set_remote_parts_sent(e.remote_parts_sent);
  out.set_remote_write_errors(e.remote_write_errors);
  out.set_remote_queue_dropped(e.remote_queue_dropped);
  out.set_remote_blocks_fetched(e.remote_blocks_fetched);
  out.set_remote_bytes_read(e.remote_bytes_read);
  out.set_remote_blocks_partial(e.remote_blocks_partial);
  out.set_remote_blocks_corrupt(e.remote_blocks_corrupt);
  out.set_remote_blocks_version_mismatch(e.remote_blocks_version_mismatch);
  out.set_remote_unavailable(e.remote_unavailable);
  out.set_remote_nodes(e.remote_nodes);
  out.set_remote_nodes_down(e.remote_nodes_down);
  out.set_remote_blocks_attached_lazily(e.remote_blocks_attached_lazily);
  out.set_remote_kv_on_demand_bytes(e.remote_kv_on_demand_bytes);
  out.set_remote_kv_on_demand_ranges(e.remote_kv_on_demand_ranges);
  out.set_remote_kv_behind_bytes(e.remote_kv_behind_bytes);
  out.set_remote_kv_behind_segments(e.remote_kv_behind_segments);
  out.set_remote_kv_lost_segments(e.remote_kv_lost_segments);
  out.set_remote_kv_unavailable(e.remote_kv_unavailable);
  out.set_remote_kv_queued_segments(e.remote_kv_queued_segments);
  const store::HostPoolStats pool = engine_.host_pool().stats();
  out.set_host_pool_idle_bytes(pool.idle_bytes);
  out.set_host_pool_limit_bytes(pool.idle_limit_bytes);
  out.set_host_pool_hits(pool.hits);
  out.set_host_pool_misses(pool.misses);
  out.set_attention_backend(e.backend.name);
  out.set_gpu_device(e.backend.device);
  out.set_gpu_pool_bytes(e.backend.pool_bytes);
  out.set_gpu_pool_used_bytes(e.backend.pool_used_bytes);
  out.set_gpu_hits(e.backend.hits);
  out.set_gpu_misses(e.backend.misses);
  out.set_gpu_pcie_bytes(e.backend.pcie_bytes);
  out.set_gpu_segments_resident(e.backend.segments_resident);
  out.set_gpu_device_registrations(e.backend.device_registrations);
  out.set_gpu_ipc_mappings(e.backend.ipc_mappings);
  out.set_gpu_ipc_events(e.backend.ipc_events);
  out.set_gpu_device_calls(e.backend.device_calls);
  out.set_gpu_device_errors(e.backend.device_errors);
  out.set_in_flight(in_flight());
}

std::string Service::PrometheusText() {
  pb::StatsResponse s;
  FillStats(s);
  return stats_.Prometheus(s);
}

absl::Status Service::DoOpen(Call& call, const pb::OpenRequest& req, pb::OpenResponse& resp) {
  engine::OpenOptions options;
  const pb::ModelShape& s = req.shape();
  KVWAVE_ASSIGN_OR_RETURN(options.shape.dtype, FromProto(s.dtype()));
  options.shape.layers = s.layers();
  options.shape.q_heads = s.q_heads();
  options.shape.kv_heads = s.kv_heads();
  options.shape.head_dim = s.head_dim();
  KVWAVE_RETURN_IF_ERROR(store::Validate(options.shape));
  options.token_ids.assign(req.token_ids().begin(), req.token_ids().end());
  if (!options.token_ids.empty()) {
    // The trust decision is made here, at the boundary, and handed to the engine explicitly.
    NamespaceGrant grant = trust_.DecideNamespace(call.session.principal(), req.prefix_namespace());
    options.prefix_namespace = std::move(grant.scope);
    options.prefix_access = grant.access;
  }
  KVWAVE_ASSIGN_OR_RETURN(engine::OpenResult opened, engine_.Open(options));
  call.session.AddContext(opened.id, options.shape);
  {
    absl::MutexLock lock(&mu_);
    owners_[opened.id] = call.session.id();
  }
  resp.set_context_id(opened.id);
  resp.set_matched_tokens(opened.matched_tokens);
  resp.set_prefix_access(options.token_ids.empty()
                             ? pb::PREFIX_NONE
                             : static_cast<pb::PrefixAccess>(options.prefix_access));
  return absl::OkStatus();
}

absl::Status Service::DoClose(Call& call, const pb::CloseRequest& req, pb::CloseResponse&) {
  if (!call.session.RemoveContext(req.context_id())) {
    return absl::NotFoundError(
        absl::StrCat("context ", req.context_id(), " is not open in this session"));
  }
  {
    absl::MutexLock lock(&mu_);
    owners_.erase(req.context_id());
  }
  return engine_.Close(req.context_id());
}

absl::Status Service::DoDrop(Call& call, const pb::DropRequest& req, pb::DropResponse&) {
  KVWAVE_RETURN_IF_ERROR(CheckOwnerOrAdmin(call.session, req.context_id()));
  {
    absl::MutexLock lock(&mu_);
    auto owner = owners_.find(req.context_id());
    if (owner != owners_.end()) {
      auto session = sessions_.find(owner->second);
      if (session != sessions_.end()) session->second->RemoveContext(req.context_id());
      owners_.erase(owner);
    }
  }
  return engine_.Close(req.context_id());
}

void Service::FillInfo(const engine::ContextInfo& info, pb::ContextInfo* out) {
  out->set_id(info.id);
  pb::ModelShape* s = out->mutable_shape();
  s->set_layers(info.shape.layers);
  s->set_q_heads(info.shape.q_heads);
  s->set_kv_heads(info.shape.kv_heads);
  s->set_head_dim(info.shape.head_dim);
  s->set_dtype(ToProto(info.shape.dtype));
  for (int64_t t : info.tokens_per_layer) out->add_tokens_per_layer(t);
  out->set_sealed_segments(info.sealed_segments);
  out->set_bytes(info.bytes);
  out->set_has_queries(info.has_queries);
  out->set_graph_segments(info.graph_segments);
  out->set_query_tokens(info.query_tokens);
  absl::MutexLock lock(&mu_);
  auto owner = owners_.find(info.id);
  out->set_session_id(owner == owners_.end() ? 0 : owner->second);
}

absl::Status Service::DoInfo(Call& call, const pb::InfoRequest& req, pb::InfoResponse& resp) {
  KVWAVE_RETURN_IF_ERROR(CheckOwnerOrAdmin(call.session, req.context_id()));
  KVWAVE_ASSIGN_OR_RETURN(engine::ContextInfo info, engine_.Info(req.context_id()));
  FillInfo(info, resp.mutable_info());
  return absl::OkStatus();
}

absl::Status Service::DoList(Call& call, const pb::ListContextsRequest&,
                             pb::ListContextsResponse& resp) {
  std::vector<engine::ContextId> ids =
      call.session.principal().admin ? engine_.ListContexts() : call.session.ContextIds();
  for (engine::ContextId id : ids) {
    absl::StatusOr<engine::ContextInfo> info = engine_.Info(id);
    if (!info.ok()) continue;  // closed meanwhile
    FillInfo(*info, resp.add_contexts());
  }
  return absl::OkStatus();
}

}  // namespace kvwave::rpc
