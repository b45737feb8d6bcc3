// The request handlers of kvwaved: decode a request frame, check it (ownership of the context,
// shapes, every shared-memory offset and length), call the engine, encode the response frame.
// Independent of sockets, so tests can drive it with frames directly.
//
// Which thread runs what: HandleHello and ops for which RunsInline() is true are cheap and run on
// a connection's io strand; Handle() for every other op may block in the engine and must run on a
// compute thread. Deadlines: a request whose deadline has passed when it reaches a compute thread
// is answered DEADLINE_EXCEEDED without running; once started, an operation runs to completion
// (engine calls are not cancellable, and Append must not half-apply).
//
// Thread-safety: every method is thread-safe. Sessions are registered at Hello and unregistered by
// ReleaseSession; the session registry and context ownership table are guarded by one mutex.
#ifndef KVWAVE_RPC_SERVICE_H_
#define KVWAVE_RPC_SERVICE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "config/settings.h"
#include "engine/engine.h"
#include "rpc/auth.h"
#include "rpc/frame.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/reply_backlog.h"
#include "rpc/session.h"
#include "rpc/stats.h"

namespace kvwave::rpc {

using Clock = std::chrono::steady_clock;

class Service {
 public:
  // `engine` must outlive the service.
  Service(engine::Engine& engine, const config::Settings& settings);

  // The first frame of every session. Consumes `fds` (a region is adopted only from a Hello on a
  // Unix socket; anything else is closed). *accepted = false means: send the reply, then close.
  std::string HandleHello(Session& session, const Frame& frame, std::vector<int>& fds,
                          bool* accepted);
  // Any other request; `received` is when its frame was complete (the deadline counts from it).
  // Every reply fits rpc.max_frame_bytes: a request whose reply would not is refused
  // RESOURCE_EXHAUSTED before its work; so is one that meets an allocation failure. With a
  // `backlog`, inline outputs are reserved in it before the work and the reply is added to it;
  // the result is then empty when the reply did not fit: nothing was done, run it again once the
  // client has read some replies.
  std::string Handle(Session& session, const Frame& frame, Clock::time_point received,
                     ReplyBacklog* backlog = nullptr);
  static bool RunsInline(uint16_t op) { return op == pb::PING; }

  // An ERROR response for a frame that could not be attributed to an operation.
  std::string ErrorFrame(uint64_t request_id, const absl::Status& status);
  // Closes every context the session still owns and unregisters it. Blocks in the engine.
  void ReleaseSession(Session& session);

  void FillStats(pb::StatsResponse& out);
  std::string PrometheusText();
  ServerStats& stats() { return stats_; }

  // Copies reloadable values (deadline default, budgets) from `settings`.
  void ApplySettings(const config::Settings& settings);
  // Called (on a compute thread) with the status of every request that failed because the GPU
  // is lost (gpu/device_lost.h); set once, before Start, by the server.
  void set_on_device_lost(std::function<void(const absl::Status&)> f) {
    on_device_lost_ = std::move(f);
  }
  uint64_t max_frame_bytes() const { return max_frame_bytes_; }
  uint64_t NewSessionId() { return next_session_id_.fetch_add(1, std::memory_order_relaxed); }

  // Requests handed to compute threads and not yet answered (for drain and stats).
  void BeginRequest() { in_flight_.fetch_add(1, std::memory_order_acq_rel); }
  void EndRequest() { in_flight_.fetch_sub(1, std::memory_order_acq_rel); }
  int64_t in_flight() const { return in_flight_.load(std::memory_order_acquire); }

  // Per-call bookkeeping (bytes moved through shared memory); defined in service.cc.
  struct Call;
  // Shared-memory regions of all sessions (rpc.max_mapped_bytes).
  const AddressBudget& address_budget() const { return address_budget_; }

 private:
  std::function<void(const absl::Status&)> on_device_lost_;
  // What Run reports back to Handle.
  struct RunState {
    ReplyBacklog* backlog = nullptr;
    bool ok = true;
    bool deferred = false;  // the reply did not fit the backlog; nothing was done
    uint64_t reserved = 0;  // bytes Run reserved in `backlog` (released by Handle)
  };
  template <typename Req, typename Resp>
  std::string Run(Session& session, const Frame& frame,
                  absl::Status (Service::*handler)(Call&, const Req&, Resp&), RunState* state);
  std::string Dispatch(Session& session, const Frame& frame, Clock::time_point received,
                       RunState* state);
  // header + body, or a RESOURCE_EXHAUSTED error frame when that exceeds rpc.max_frame_bytes.
  std::string EncodeReply(const FrameHeader& header, const google::protobuf::MessageLite& body);

  absl::Status DoPing(Call& call, const pb::PingRequest& req, pb::PingResponse& resp);
  absl::Status DoStats(Call& call, const pb::StatsRequest& req, pb::StatsResponse& resp);
  absl::Status DoOpen(Call& call, const pb::OpenRequest& req, pb::OpenResponse& resp);
  absl::Status DoAppend(Call& call, const pb::AppendRequest& req, pb::AppendResponse& resp);
  absl::Status DoSeal(Call& call, const pb::SealRequest& req, pb::SealResponse& resp);
  absl::Status DoAttend(Call& call, const pb::AttendRequest& req, pb::AttendResponse& resp);
  absl::Status DoAttendBatch(Call& call, const pb::AttendBatchRequest& req,
                             pb::AttendBatchResponse& resp);
  // GPU clients (rpc/service_device.cc).
  absl::Status DoRegisterDevice(Call& call, const pb::RegisterDeviceRequest& req,
                                pb::RegisterDeviceResponse& resp);
  absl::Status DoUnregisterDevice(Call& call, const pb::UnregisterDeviceRequest& req,
                                  pb::UnregisterDeviceResponse& resp);
  absl::Status DoAttendDevice(Call& call, const pb::AttendDeviceRequest& req,
                              pb::AttendDeviceResponse& resp);
  // The items of an AttendBatch / AttendDevice: contexts owned by `session`, one q_heads x
  // head_dim (returned), budgets resolved with the server's defaults.
  absl::StatusOr<store::ModelShape> BatchItems(
      const Session& session, int32_t layer,
      const google::protobuf::RepeatedPtrField<pb::AttendBatchEntry>& entries,
      std::vector<engine::AttendBatchItem>& items) const;
  static void FillAttendStats(const engine::AttendStats& st, pb::AttendStats* out);
  absl::Status DoRetrieve(Call& call, const pb::RetrieveRequest& req, pb::RetrieveResponse& resp);
  absl::Status DoGather(Call& call, const pb::GatherRequest& req, pb::GatherResponse& resp);
  absl::Status DoClose(Call& call, const pb::CloseRequest& req, pb::CloseResponse& resp);
  absl::Status DoInfo(Call& call, const pb::InfoRequest& req, pb::InfoResponse& resp);
  absl::Status DoList(Call& call, const pb::ListContextsRequest& req,
                      pb::ListContextsResponse& resp);
  absl::Status DoDrop(Call& call, const pb::DropRequest& req, pb::DropResponse& resp);

  absl::StatusOr<store::ModelShape> OwnedShape(const Session& session, uint64_t ctx,
                                               int32_t layer) const;
  // NOT_FOUND unless `session` owns `ctx` or is an administrator; the same error whether or not
  // the context exists, so another session's context ids cannot be probed.
  absl::Status CheckOwnerOrAdmin(const Session& session, uint64_t ctx) const;
  // Attend's method (pb::AttendMethod) and graph options into `budget`, the server's defaults
  // for ATTEND_DEFAULT and zeros; InvalidArgument for an unknown method or a value out of range.
  absl::Status ResolveMethod(int method, int32_t graph_top_k, int32_t beam,
                             engine::AttendBudget& budget) const;
  void FillInfo(const engine::ContextInfo& info, pb::ContextInfo* out);

  engine::Engine& engine_;
  const uint64_t max_frame_bytes_;
  const uint64_t max_region_bytes_;
  AddressBudget address_budget_;
  const std::string tcp_token_;
  const TrustPolicy trust_;
  std::atomic<int64_t> default_deadline_ms_;
  std::atomic<double> retrieval_budget_;
  std::atomic<double> estimation_budget_;
  // Reloadable defaults of the graph methods (attend.method, attend.graph_top_k,
  // index.graph_beam), resolved here so that SIGHUP applies them.
  std::atomic<bool> retrievalattention_;
  std::atomic<int32_t> graph_top_k_;
  std::atomic<int32_t> graph_beam_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<uint64_t> next_session_id_{1};
  ServerStats stats_;

  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Session*> sessions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<engine::ContextId, uint64_t> owners_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SERVICE_H_
