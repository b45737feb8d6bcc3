// Internal to the service: one request being handled, and how its tensors are bound to memory.
// A tensor is either a slice of the session's shared region (named by offset and length, checked
// against the region) or inline bytes of the message.
//
// Thread-safety: a Call belongs to the one thread handling the request.
#ifndef KVWAVE_RPC_SERVICE_CALL_H_
#define KVWAVE_RPC_SERVICE_CALL_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "rpc/kvwave_rpc.pb.h"
#include "rpc/service.h"
#include "rpc/session.h"

namespace kvwave::rpc {

struct Service::Call {
  // `backlog` may be null (no per-connection bound). What Output reserves in it is added to
  // *reserved at once, so the caller can give it back even if the request throws.
  Call(Session& s, uint64_t max_frame_bytes, ReplyBacklog* backlog, uint64_t* reserved)
      : session(s), max_frame_bytes_(max_frame_bytes), backlog_(backlog), reserved_(reserved) {}

  // An input tensor of exactly `bytes` bytes whose start is aligned to `align`.
  absl::StatusOr<std::span<const std::byte>> Input(const pb::Tensor& t, uint64_t bytes,
                                                   size_t align, const char* what);
  // An output of exactly `bytes` bytes: the shared-memory slice `requested` names (when the
  // session has a region and `requested` has a length), else an inline buffer copied into
  // `response` by Finish(). Inline outputs are sized before anything is allocated or computed:
  // ResourceExhausted when the reply would exceed rpc.max_frame_bytes; when they do not fit the
  // connection's reply backlog, deferred() turns true and an error is returned (the handler
  // returns it at once; the request is run again later).
  absl::StatusOr<std::span<std::byte>> Output(const pb::Tensor& requested, uint64_t bytes,
                                              size_t align, const char* what, pb::Tensor* response);
  // Copies inline outputs into their response tensors.
  void Finish();
  bool deferred() const { return deferred_; }

  Session& session;
  uint64_t shm_bytes_in = 0;
  uint64_t shm_bytes_out = 0;

 private:
  // Room the rest of a reply may need besides its inline tensors (status, scalars, tags).
  static constexpr uint64_t kReplyOverheadBytes = 4096;

  const uint64_t max_frame_bytes_;
  ReplyBacklog* const backlog_;
  uint64_t* const reserved_;   // bytes this request holds in backlog_
  uint64_t inline_bytes_ = 0;  // inline outputs so far
  bool deferred_ = false;
  struct InlineOutput {
    std::vector<uint64_t> buffer;  // 8-byte aligned storage
    uint64_t bytes;
    pb::Tensor* response;
  };
  std::deque<InlineOutput> inline_outputs_;
  std::deque<std::vector<uint64_t>> aligned_copies_;
};

template <typename T>
std::span<const T> As(std::span<const std::byte> b) {
  return {reinterpret_cast<const T*>(b.data()), b.size() / sizeof(T)};
}
template <typename T>
std::span<T> As(std::span<std::byte> b) {
  return {reinterpret_cast<T*>(b.data()), b.size() / sizeof(T)};
}

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SERVICE_CALL_H_
