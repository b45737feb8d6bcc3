// Internal state of kvwave::client::Client: the socket, the shared region with its per-call
// staging allocator, and the request/reply exchange.
//
// Thread-safety: none of its own; Client holds mu_ around every public call.
#ifndef KVWAVE_CLIENT_CLIENT_IMPL_H_
#define KVWAVE_CLIENT_CLIENT_IMPL_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvwave/client.h"
#include "rpc/frame.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/shared_region.h"
#include "rpc/wire.h"

namespace kvwave::client {

class Client::Impl {
 public:
  Impl(const ClientOptions& options, int fd)
      : options_(options), fd_(fd), decoder_(uint64_t{1} << 33), read_buffer_(size_t{256} << 10) {}
  ~Impl();

  absl::Status Hello();

  // Sends `request` (with `fd_to_pass` attached when >= 0) and waits for its reply; the
  // transport or framing error, the ERROR frame's status, or the response's own status.
  template <typename Resp>
  absl::Status Call(uint16_t type, const google::protobuf::MessageLite& request, Resp& response,
                    int fd_to_pass = -1) {
    absl::Status st = Exchange(type, request, response, fd_to_pass);
    if (!st.ok()) return st;
    return rpc::FromProto(response.status());
  }

  // Per-call staging of tensors in the shared region (reset by BeginCall).
  void BeginCall();
  absl::Status StageInput(std::span<const std::byte> data, size_t align, rpc::pb::Tensor* t);
  void StageOutput(std::span<std::byte> dst, size_t align, rpc::pb::Tensor* t);
  // Copies a returned tensor (inline or in the region) into dst.
  absl::Status Collect(const rpc::pb::Tensor& got, std::span<std::byte> dst, const char* what);

  // Registrations made by RegisterDeviceBuffers: their events (cudaEvent_t), this client's.
  struct DeviceEvents {
    void* q_ready = nullptr;
    void* out_ready = nullptr;
  };
  std::map<uint64_t, DeviceEvents> device_events_;

  std::mutex mu_;
  ClientOptions options_;
  int fd_;
  rpc::SharedRegion region_;
  uint64_t max_frame_bytes_ = 0;
  uint64_t session_id_ = 0;

 private:
  absl::Status Exchange(uint16_t type, const google::protobuf::MessageLite& request,
                        google::protobuf::MessageLite& response, int fd_to_pass);
  absl::Status WriteAll(std::span<const std::byte> data);
  // After a failed send: the status of an ERROR frame the server sent before closing, if any.
  absl::Status ConnectionError(absl::Status fallback);
  absl::StatusOr<rpc::Frame> ReadReply(uint64_t id);
  bool Allocate(size_t bytes, size_t align, uint64_t* offset);

  rpc::FrameDecoder decoder_;
  std::vector<std::byte> read_buffer_;
  uint64_t next_id_ = 1;
  std::chrono::steady_clock::time_point poll_until_;  // ReadReply polls until then (poll_us)
  size_t stage_used_ = 0;
  bool broken_ = false;
};

inline void SetEntry(const AttendBatchEntry& e, rpc::pb::AttendBatchEntry* p) {
  p->set_context_id(e.ctx);
  p->set_retrieval_budget(e.budget.retrieval);
  p->set_estimation_budget(e.budget.estimation);
  p->set_method(static_cast<rpc::pb::AttendMethod>(e.budget.method));
  p->set_graph_top_k(e.budget.graph_top_k);
  p->set_beam(e.budget.beam);
}

inline AttendStats ToStats(const rpc::pb::AttendStats& s) {
  return {s.steady_tokens(),  s.retrieved_tokens(), s.retrieved_clusters(), s.estimated_clusters(),
          s.total_clusters(), s.scored_tokens(),    s.graph_keys_scored()};
}

// A reply's per-item stats into `stats` (left alone when empty); `what` names the call.
template <typename Stats>
absl::Status CopyStats(const Stats& reply, std::span<AttendStats> stats, const char* what) {
  if (stats.empty()) return absl::OkStatus();
  if (reply.size() != static_cast<int>(stats.size())) {
    return absl::InternalError(absl::StrCat(what, ": the reply has the wrong number of stats"));
  }
  for (size_t i = 0; i < stats.size(); ++i) {
    stats[i] = ToStats(reply.Get(static_cast<int>(i)));
  }
  return absl::OkStatus();
}

}  // namespace kvwave::client

#endif  // KVWAVE_CLIENT_CLIENT_IMPL_H_
