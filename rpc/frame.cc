#include "rpc/frame.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvwave::rpc {
namespace {

template <typename T>
void PutLe(std::byte* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) {
    out[i] = static_cast<std::byte>((static_cast<uint64_t>(value) >> (8 * i)) & 0xff);
  }
}

template <typename T>
T GetLe(const std::byte* in) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<uint64_t>(std::to_integer<uint8_t>(in[i])) << (8 * i);
  }
  return static_cast<T>(value);
}

}  // namespace

void EncodeHeader(const FrameHeader& header, std::byte* out) {
  PutLe<uint32_t>(out, header.magic);
  PutLe<uint16_t>(out + 4, header.version);
  PutLe<uint16_t>(out + 6, header.type);
  PutLe<uint64_t>(out + 8, header.request_id);
  PutLe<uint32_t>(out + 16, header.body_bytes);
  PutLe<uint32_t>(out + 20, header.deadline_ms);
}

FrameHeader DecodeHeaderUnchecked(const std::byte* in) {
  FrameHeader h;
  h.magic = GetLe<uint32_t>(in);
  h.version = GetLe<uint16_t>(in + 4);
  h.type = GetLe<uint16_t>(in + 6);
  h.request_id = GetLe<uint64_t>(in + 8);
  h.body_bytes = GetLe<uint32_t>(in + 16);
  h.deadline_ms = GetLe<uint32_t>(in + 20);
  return h;
}

absl::Status ValidateHeader(const FrameHeader& header, uint64_t max_frame_bytes) {
  if (header.magic != kFrameMagic) {
    return absl::InvalidArgumentError(absl::StrCat("bad frame magic 0x", absl::Hex(header.magic)));
  }
  if (header.version != kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat("unsupported protocol version ",
                                                      header.version, " (this side speaks ",
                                                      kProtocolVersion, ")"));
  }
  if (kFrameHeaderBytes + uint64_t{header.body_bytes} > max_frame_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("frame of ", kFrameHeaderBytes + uint64_t{header.body_bytes},
                     " bytes exceeds the limit of ", max_frame_bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> EncodeFrame(FrameHeader header,
                                        const google::protobuf::MessageLite& body) {
  const size_t body_bytes = body.ByteSizeLong();
  if (body_bytes > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("message body of ", body_bytes, " bytes"));
  }
  header.body_bytes = static_cast<uint32_t>(body_bytes);
  std::string out(kFrameHeaderBytes + body_bytes, '\0');
  EncodeHeader(header, reinterpret_cast<std::byte*>(out.data()));
  if (body_bytes > 0 &&
      !body.SerializeToArray(out.data() + kFrameHeaderBytes, static_cast<int>(body_bytes))) {
    return absl::InternalError("protobuf serialisation failed");
  }
  return out;
}

absl::Status ParseBody(std::span<const std::byte> body, google::protobuf::MessageLite& message) {
  if (body.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      !message.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", message.GetTypeName(), " body (", body.size(), " bytes)"));
  }
  return absl::OkStatus();
}

absl::Status FrameDecoder::Feed(std::span<const std::byte> data) {
  absl::StatusOr<size_t> consumed = FeedBytes(data, /*stop_after_frame=*/false);
  return consumed.ok() ? absl::OkStatus() : consumed.status();
}

absl::StatusOr<size_t> FrameDecoder::FeedOne(std::span<const std::byte> data) {
  return FeedBytes(data, /*stop_after_frame=*/true);
}

absl::StatusOr<size_t> FrameDecoder::FeedBytes(std::span<const std::byte> data,
                                               bool stop_after_frame) {
  if (!error_.ok()) return error_;
  const size_t total = data.size();
  while (!data.empty()) {
    if (!in_body_) {
      const size_t take = std::min(kFrameHeaderBytes - header_fill_, data.size());
      std::memcpy(header_buf_ + header_fill_, data.data(), take);
      header_fill_ += take;
      data = data.subspan(take);
      if (header_fill_ < kFrameHeaderBytes) break;
      header_ = DecodeHeaderUnchecked(header_buf_);
      error_ = ValidateHeader(header_, max_frame_bytes_);
      if (!error_.ok()) return error_;
      // Reserve, never resize: the pages of a large body are touched only as its bytes arrive,
      // so a header announcing a big body costs address space, not memory, until it is sent.
      body_.clear();
      body_.reserve(header_.body_bytes);
      in_body_ = true;
    }
    const size_t take = std::min<size_t>(header_.body_bytes - body_.size(), data.size());
    body_.insert(body_.end(), data.begin(), data.begin() + static_cast<ptrdiff_t>(take));
    data = data.subspan(take);
    if (body_.size() == header_.body_bytes) {
      ready_.push_back(Frame{header_, std::move(body_)});
      body_ = {};
      header_fill_ = 0;
      in_body_ = false;
      if (stop_after_frame) break;
    }
  }
  return total - data.size();
}

Frame FrameDecoder::TakeFrame() {
  Frame frame = std::move(ready_[ready_head_]);
  if (++ready_head_ == ready_.size()) {
    ready_.clear();
    ready_head_ = 0;
  }
  return frame;
}

}  // namespace kvwave::rpc
