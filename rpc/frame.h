// Framing of the kvwave wire protocol: a fixed 24-byte little-endian header followed by a
// protobuf body (rpc/kvwave_rpc.proto).
//
//   offset size field
//        0    4 magic        'K','V','W','1' (kFrameMagic)
//        4    2 version      kProtocolVersion
//        6    2 type         pb::MessageType, | kResponseBit on responses
//        8    8 request_id   chosen by the client, echoed by the server (responses may come
//                            back in any order)
//       16    4 body_bytes   length of the protobuf body
//       20    4 deadline_ms  requests: relative deadline (0 = the server's default); responses: 0
//
// FrameDecoder turns a byte stream into frames, checking magic, version and the size limit before
// it buffers a body, so a hostile peer cannot make it allocate more than max_frame_bytes; a body's
// memory is reserved, not zero-filled, so it becomes resident only as the bytes arrive.
//
// Thread-safety: free functions are stateless; a FrameDecoder is used by one thread at a time.
#ifndef KVWAVE_RPC_FRAME_H_
#define KVWAVE_RPC_FRAME_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/message_lite.h"

namespace kvwave::rpc {

inline constexpr uint32_t kFrameMagic = 0x3157564B;  // "KVW1" little-endian
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr uint16_t kResponseBit = 0x8000;
inline constexpr size_t kFrameHeaderBytes = 24;

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint16_t type = 0;
  uint64_t request_id = 0;
  uint32_t body_bytes = 0;
  uint32_t deadline_ms = 0;

  bool is_response() const { return (type & kResponseBit) != 0; }
  uint16_t op() const { return type & static_cast<uint16_t>(~kResponseBit); }
};

void EncodeHeader(const FrameHeader& header, std::byte* out);  // writes kFrameHeaderBytes
FrameHeader DecodeHeaderUnchecked(const std::byte* in);        // reads kFrameHeaderBytes

// Checks magic, version and body size against `max_frame_bytes` (header + body).
// InvalidArgument for a bad magic, FailedPrecondition for a bad version, ResourceExhausted for
// an oversized frame.
[[nodiscard]] absl::Status ValidateHeader(const FrameHeader& header, uint64_t max_frame_bytes);

// Serialises header + message into one buffer (body_bytes is filled in). InvalidArgument when the
// message does not fit a 32-bit body length.
[[nodiscard]] absl::StatusOr<std::string> EncodeFrame(FrameHeader header,
                                                      const google::protobuf::MessageLite& body);

// Parses a body into `message`; InvalidArgument when it does not parse.
[[nodiscard]] absl::Status ParseBody(std::span<const std::byte> body,
                                     google::protobuf::MessageLite& message);

struct Frame {
  FrameHeader header;
  std::vector<std::byte> body;
};

// Incremental decoder: feed bytes as they arrive, take complete frames out.
class FrameDecoder {
 public:
  explicit FrameDecoder(uint64_t max_frame_bytes) : max_frame_bytes_(max_frame_bytes) {}

  void set_max_frame_bytes(uint64_t max_frame_bytes) { max_frame_bytes_ = max_frame_bytes; }

  // Consumes all of `data`, queueing complete frames. After an error the decoder is poisoned:
  // the stream is out of sync and the connection must be closed; the header that failed (when
  // one was read) is available through last_header() so the error can be answered by id.
  [[nodiscard]] absl::Status Feed(std::span<const std::byte> data);
  // As Feed, but stops right after the first frame it completes; returns the bytes consumed
  // (all of `data` when no frame completed). Lets the caller change the size limit between
  // frames (the limit before authentication is smaller).
  [[nodiscard]] absl::StatusOr<size_t> FeedOne(std::span<const std::byte> data);

  bool HasFrame() const { return !ready_.empty(); }
  Frame TakeFrame();

  // Bytes buffered for a frame not yet complete.
  size_t pending_bytes() const { return header_fill_ + body_.size(); }
  const FrameHeader& last_header() const { return header_; }

 private:
  absl::StatusOr<size_t> FeedBytes(std::span<const std::byte> data, bool stop_after_frame);

  uint64_t max_frame_bytes_;
  std::byte header_buf_[kFrameHeaderBytes];
  size_t header_fill_ = 0;
  bool in_body_ = false;
  FrameHeader header_;
  std::vector<std::byte> body_;  // capacity = the announced body; size = bytes received
  absl::Status error_;
  std::vector<Frame> ready_;  // FIFO; TakeFrame pops the front
  size_t ready_head_ = 0;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_FRAME_H_
