// The tensor operations of the service: Append, Seal, Attend, Retrieve, Gather, and how their
// tensors are bound to shared memory or inline bytes.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "rpc/service.h"
#include "rpc/service_call.h"
#include "rpc/wire.h"

namespace kvwave::rpc {
namespace {

constexpr int32_t kMaxRetrieveK = 1 << 16;
constexpr int kMaxAttendBatch = 4096;  // entries per AttendBatch (the engine's bound)
constexpr int64_t kMaxGatherRows = int64_t{1} << 26;

bool UsesRegion(const Session& session, const pb::Tensor& t) {
  return session.region() != nullptr && t.data().empty() && t.length() > 0;
}

constexpr int32_t kMaxBeam = 1 << 16;  // graph search queue, and Attend's graph top-k

// The estimation budget a request that names none gets: the daemon's default, capped at what the
// retrieval budget leaves (attend.estimation_budget = 1 estimates every cluster not retrieved).
double DefaultEstimation(double setting, double retrieval) {
  return retrieval >= 0.0 && retrieval <= 1.0 ? std::min(setting, 1.0 - retrieval) : setting;
}

absl::Status CheckBudget(double value, const char* what) {
  if (!(value >= 0.0 && value <= 1.0)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat(what, " budget ", value, " not in [0, 1]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Service::ResolveMethod(int method, int32_t graph_top_k, int32_t beam,
                                    engine::AttendBudget& budget) const {
  switch (method) {
    case pb::ATTEND_DEFAULT:
      budget.method = retrievalattention_.load(std::memory_order_relaxed)
                          ? engine::AttendMethod::kRetrievalAttention
                          : engine::AttendMethod::kRetroInfer;
      break;
    case pb::RETROINFER:
      budget.method = engine::AttendMethod::kRetroInfer;
      break;
    case pb::RETRIEVALATTENTION:
      budget.method = engine::AttendMethod::kRetrievalAttention;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown attend method ", method));
  }
  if (graph_top_k < 0 || graph_top_k > kMaxBeam || beam < 0 || beam > kMaxBeam) {
    return absl::InvalidArgumentError(absl::StrCat("graph_top_k = ", graph_top_k, ", beam = ", beam,
                                                   ": each must be in [0, ", kMaxBeam,
                                                   "] (0 = the server's default)"));
  }
  budget.graph_top_k = graph_top_k > 0 ? graph_top_k : graph_top_k_.load(std::memory_order_relaxed);
  budget.beam = beam > 0 ? beam : graph_beam_.load(std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::span<const std::byte>> Service::Call::Input(const pb::Tensor& t, uint64_t bytes,
                                                                size_t align, const char* what) {
  if (UsesRegion(session, t)) {
    if (t.length() != bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", t.length(), " bytes given, the shape needs ", bytes));
    }
    KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> slice,
                            session.region()->Slice(t.offset(), t.length(), align, what));
    shm_bytes_in += bytes;
    return std::span<const std::byte>(slice);
  }
  if (t.data().size() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": ", t.data().size(), " inline bytes given, the shape needs ", bytes,
        t.length() > 0 && session.region() == nullptr ? " (this session has no shared region)"
                                                      : ""));
  }
  const auto* p = reinterpret_cast<const std::byte*>(t.data().data());
  if (align > 1 && reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::vector<uint64_t>& copy = aligned_copies_.emplace_back((bytes + 7) / 8);
    std::memcpy(copy.data(), p, bytes);
    p = reinterpret_cast<const std::byte*>(copy.data());
  }
  return std::span<const std::byte>(p, bytes);
}

absl::StatusOr<std::span<std::byte>> Service::Call::Output(const pb::Tensor& requested,
                                                           uint64_t bytes, size_t align,
                                                           const char* what, pb::Tensor* response) {
  if (UsesRegion(session, requested)) {
    if (requested.length() != bytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": output of ", requested.length(),
                                                     " bytes given, the result has ", bytes));
    }
    KVWAVE_ASSIGN_OR_RETURN(
        std::span<std::byte> slice,
        session.region()->Slice(requested.offset(), requested.length(), align, what));
    response->set_offset(requested.offset());
    response->set_length(requested.length());
    shm_bytes_out += bytes;
    return slice;
  }
  const uint64_t limit =
      max_frame_bytes_ - std::min(max_frame_bytes_, kFrameHeaderBytes + kReplyOverheadBytes);
  if (bytes > limit || inline_bytes_ > limit - bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": the reply would carry ", inline_bytes_ + bytes,
                     " bytes of tensors inline, more than rpc.max_frame_bytes = ", max_frame_bytes_,
                     " allows; name output buffers in shared memory or ask for less"));
  }
  if (backlog_ != nullptr) {
    if (!backlog_->TryReserve(bytes, *reserved_)) {
      deferred_ = true;
      return absl::UnavailableError("reply backlog full; deferred");
    }
    *reserved_ += bytes;
  }
  inline_bytes_ += bytes;
  InlineOutput& out = inline_outputs_.emplace_back();
  out.buffer.resize((bytes + 7) / 8);
  out.bytes = bytes;
  out.response = response;
  return std::span<std::byte>(reinterpret_cast<std::byte*>(out.buffer.data()), bytes);
}

void Service::Call::Finish() {
  for (InlineOutput& out : inline_outputs_) {
    out.response->set_data(reinterpret_cast<const char*>(out.buffer.data()), out.bytes);
  }
}

absl::Status Service::DoAppend(Call& call, const pb::AppendRequest& req, pb::AppendResponse&) {
  KVWAVE_ASSIGN_OR_RETURN(store::ModelShape shape,
                          OwnedShape(call.session, req.context_id(), req.layer()));
  KVWAVE_ASSIGN_OR_RETURN(uint64_t bytes, CheckedBytes(req.tokens(), shape.TokenBytesPerLayer(), 1,
                                                       uint64_t{1} << 40, "append"));
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> k, call.Input(req.k(), bytes, 1, "k"));
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> v, call.Input(req.v(), bytes, 1, "v"));
  const pb::Tensor& qt = req.q();
  if (qt.data().empty() && qt.length() == 0) {
    return engine_.Append(req.context_id(), req.layer(), req.tokens(), k, v);
  }
  // Prefill queries: [tokens x q_heads x head_dim] float32, sized before anything is bound
  // (inline bytes are already in the frame, a region slice is checked against the region); the
  // engine charges what it keeps to the memory limit before it copies them.
  KVWAVE_ASSIGN_OR_RETURN(uint64_t q_bytes,
                          CheckedBytes(req.tokens(), int64_t{4} * shape.q_heads * shape.head_dim, 1,
                                       uint64_t{1} << 40, "append q"));
  if (req.tokens() == 0) return absl::InvalidArgumentError("q: queries given for 0 tokens");
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> q, call.Input(qt, q_bytes, 4, "q"));
  return engine_.AppendWithQueries(req.context_id(), req.layer(), req.tokens(), k, v, As<float>(q));
}

absl::Status Service::DoSeal(Call& call, const pb::SealRequest& req, pb::SealResponse&) {
  KVWAVE_RETURN_IF_ERROR(OwnedShape(call.session, req.context_id(), 0).status());
  return engine_.Seal(req.context_id());
}

absl::Status Service::DoAttend(Call& call, const pb::AttendRequest& req, pb::AttendResponse& resp) {
  KVWAVE_ASSIGN_OR_RETURN(store::ModelShape shape,
                          OwnedShape(call.session, req.context_id(), req.layer()));
  const uint64_t q_bytes = uint64_t{4} * shape.q_heads * shape.head_dim;
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> q, call.Input(req.q(), q_bytes, 4, "q"));
  engine::AttendBudget budget;
  budget.retrieval = req.retrieval_budget() < 0 ? retrieval_budget_.load(std::memory_order_relaxed)
                                                : req.retrieval_budget();
  budget.estimation =
      req.estimation_budget() < 0
          ? DefaultEstimation(estimation_budget_.load(std::memory_order_relaxed), budget.retrieval)
          : req.estimation_budget();
  KVWAVE_RETURN_IF_ERROR(CheckBudget(budget.retrieval, "retrieval"));
  KVWAVE_RETURN_IF_ERROR(CheckBudget(budget.estimation, "estimation"));
  KVWAVE_RETURN_IF_ERROR(ResolveMethod(req.method(), req.graph_top_k(), req.beam(), budget));
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> out,
                          call.Output(req.out(), q_bytes, 4, "out", resp.mutable_out()));
  KVWAVE_ASSIGN_OR_RETURN(
      std::span<std::byte> lse,
      call.Output(req.lse(), uint64_t{4} * shape.q_heads, 4, "lse", resp.mutable_lse()));
  engine::AttendStats stats;
  KVWAVE_RETURN_IF_ERROR(engine_.Attend(req.context_id(), req.layer(), As<float>(q), budget,
                                        As<float>(out), As<float>(lse), &stats));
  pb::AttendStats* s = resp.mutable_stats();
  s->set_steady_tokens(stats.steady_tokens);
  s->set_retrieved_tokens(stats.retrieved_tokens);
  s->set_retrieved_clusters(stats.retrieved_clusters);
  s->set_estimated_clusters(stats.estimated_clusters);
  s->set_total_clusters(stats.total_clusters);
  s->set_scored_tokens(stats.scored_tokens);
  s->set_graph_keys_scored(stats.graph_keys_scored);
  return absl::OkStatus();
}

absl::StatusOr<store::ModelShape> Service::BatchItems(
    const Session& session, int32_t layer,
    const google::protobuf::RepeatedPtrField<pb::AttendBatchEntry>& entries,
    std::vector<engine::AttendBatchItem>& items) const {
  const int b = entries.size();
  if (b < 1 || b > kMaxAttendBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("attend_batch: ", b, " entries, not in [1, ", kMaxAttendBatch, "]"));
  }
  items.resize(b);
  store::ModelShape shape;
  for (int i = 0; i < b; ++i) {
    const pb::AttendBatchEntry& e = entries.Get(i);
    KVWAVE_ASSIGN_OR_RETURN(store::ModelShape s, OwnedShape(session, e.context_id(), layer));
    if (i == 0) shape = s;
    if (s.q_heads != shape.q_heads || s.head_dim != shape.head_dim) {
      return absl::InvalidArgumentError("attend_batch: contexts of different q_heads x head_dim");
    }
    items[i].context = e.context_id();
    items[i].budget.retrieval = e.retrieval_budget() < 0
                                    ? retrieval_budget_.load(std::memory_order_relaxed)
                                    : e.retrieval_budget();
    items[i].budget.estimation =
        e.estimation_budget() < 0
            ? DefaultEstimation(estimation_budget_.load(std::memory_order_relaxed),
                                items[i].budget.retrieval)
            : e.estimation_budget();
    KVWAVE_RETURN_IF_ERROR(CheckBudget(items[i].budget.retrieval, "retrieval"));
    KVWAVE_RETURN_IF_ERROR(CheckBudget(items[i].budget.estimation, "estimation"));
    KVWAVE_RETURN_IF_ERROR(ResolveMethod(e.method(), e.graph_top_k(), e.beam(), items[i].budget));
  }
  return shape;
}

void Service::FillAttendStats(const engine::AttendStats& st, pb::AttendStats* s) {
  s->set_steady_tokens(st.steady_tokens);
  s->set_retrieved_tokens(st.retrieved_tokens);
  s->set_retrieved_clusters(st.retrieved_clusters);
  s->set_estimated_clusters(st.estimated_clusters);
  s->set_total_clusters(st.total_clusters);
  s->set_scored_tokens(st.scored_tokens);
  s->set_graph_keys_scored(st.graph_keys_scored);
}

absl::Status Service::DoAttendBatch(Call& call, const pb::AttendBatchRequest& req,
                                    pb::AttendBatchResponse& resp) {
  std::vector<engine::AttendBatchItem> items;
  KVWAVE_ASSIGN_OR_RETURN(const store::ModelShape shape,
                          BatchItems(call.session, req.layer(), req.entries(), items));
  const uint64_t b = items.size();
  const uint64_t q_bytes = uint64_t{4} * b * shape.q_heads * shape.head_dim;
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> q, call.Input(req.q(), q_bytes, 4, "q"));
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> out,
                          call.Output(req.out(), q_bytes, 4, "out", resp.mutable_out()));
  KVWAVE_ASSIGN_OR_RETURN(
      std::span<std::byte> lse,
      call.Output(req.lse(), uint64_t{4} * b * shape.q_heads, 4, "lse", resp.mutable_lse()));
  std::vector<engine::AttendStats> stats(b);
  KVWAVE_RETURN_IF_ERROR(
      engine_.AttendBatch(req.layer(), items, As<float>(q), As<float>(out), As<float>(lse), stats));
  for (const engine::AttendStats& st : stats) FillAttendStats(st, resp.add_stats());
  return absl::OkStatus();
}

absl::Status Service::DoRetrieve(Call& call, const pb::RetrieveRequest& req,
                                 pb::RetrieveResponse& resp) {
  KVWAVE_ASSIGN_OR_RETURN(store::ModelShape shape,
                          OwnedShape(call.session, req.context_id(), req.layer()));
  if (req.k() < 1 || req.k() > kMaxRetrieveK) {
    return absl::InvalidArgumentError(
        absl::StrCat("k = ", req.k(), " not in [1, ", kMaxRetrieveK, "]"));
  }
  engine::RetrieveOptions options;
  options.k = req.k();
  switch (req.method()) {
    case pb::WAVE:
      options.method = engine::RetrieveMethod::kWave;
      break;
    case pb::FLAT:
      options.method = engine::RetrieveMethod::kFlat;
      break;
    case pb::GRAPH:
      options.method = engine::RetrieveMethod::kGraph;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown retrieve method ", static_cast<int>(req.method())));
  }
  if (req.beam() < 0 || req.beam() > kMaxBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam = ", req.beam(), " not in [0, ", kMaxBeam, "] (0 = index.graph_beam)"));
  }
  options.beam = req.beam() > 0 ? req.beam() : graph_beam_.load(std::memory_order_relaxed);
  if (req.cluster_budget() >= 0) options.cluster_budget = req.cluster_budget();
  KVWAVE_RETURN_IF_ERROR(CheckBudget(options.cluster_budget, "cluster"));
  const uint64_t q_bytes = uint64_t{4} * shape.q_heads * shape.head_dim;
  const uint64_t rows = uint64_t(shape.q_heads) * uint64_t(req.k());
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> q, call.Input(req.q(), q_bytes, 4, "q"));
  KVWAVE_ASSIGN_OR_RETURN(
      std::span<std::byte> positions,
      call.Output(req.positions(), rows * 8, 8, "positions", resp.mutable_positions()));
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> scores,
                          call.Output(req.scores(), rows * 4, 4, "scores", resp.mutable_scores()));
  engine::RetrieveStats stats;
  KVWAVE_RETURN_IF_ERROR(engine_.Retrieve(req.context_id(), req.layer(), As<float>(q), options,
                                          As<int64_t>(positions), As<float>(scores), &stats));
  resp.set_keys_scored(stats.keys_scored);
  resp.set_keys_total(stats.keys_total);
  return absl::OkStatus();
}

absl::Status Service::DoGather(Call& call, const pb::GatherRequest& req, pb::GatherResponse& resp) {
  KVWAVE_ASSIGN_OR_RETURN(store::ModelShape shape,
                          OwnedShape(call.session, req.context_id(), req.layer()));
  const pb::Tensor& p = req.positions();
  const uint64_t p_bytes = UsesRegion(call.session, p) ? p.length() : p.data().size();
  if (p_bytes % 8 != 0 || p_bytes / 8 > static_cast<uint64_t>(kMaxGatherRows)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "positions: ", p_bytes, " bytes is not a whole number (<= ", kMaxGatherRows, ") of int64"));
  }
  const int64_t n = static_cast<int64_t>(p_bytes / 8);
  KVWAVE_ASSIGN_OR_RETURN(std::span<const std::byte> positions,
                          call.Input(p, p_bytes, 8, "positions"));
  KVWAVE_ASSIGN_OR_RETURN(
      uint64_t bytes, CheckedBytes(n, shape.TokenBytesPerLayer(), 1, max_frame_bytes_, "gather"));
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> k,
                          call.Output(req.k(), bytes, 1, "k", resp.mutable_k()));
  KVWAVE_ASSIGN_OR_RETURN(std::span<std::byte> v,
                          call.Output(req.v(), bytes, 1, "v", resp.mutable_v()));
  return engine_.Gather(req.context_id(), req.layer(), As<int64_t>(positions), k, v);
}

}  // namespace kvwave::rpc
