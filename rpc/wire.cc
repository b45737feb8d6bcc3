#include "rpc/wire.h"

#include "absl/strings/str_cat.h"

namespace kvwave::rpc {

void ToProto(const absl::Status& status, pb::Status* out) {
  out->set_code(static_cast<int32_t>(status.code()));
  out->set_message(std::string(status.message()));
}

absl::Status FromProto(const pb::Status& status) {
  if (status.code() == 0) return absl::OkStatus();
  auto code = static_cast<absl::StatusCode>(status.code());
  if (status.code() < 0 || status.code() > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = absl::StatusCode::kUnknown;
  }
  return absl::Status(code, status.message());
}

pb::DType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return pb::F32;
    case DType::kF16:
      return pb::F16;
    case DType::kBF16:
      return pb::BF16;
  }
  return pb::F32;
}

absl::StatusOr<DType> FromProto(pb::DType dtype) {
  switch (dtype) {
    case pb::F32:
      return DType::kF32;
    case pb::F16:
      return DType::kF16;
    case pb::BF16:
      return DType::kBF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
}

const char* OpName(uint16_t op) {
  switch (op) {
    case pb::HELLO:
      return "hello";
    case pb::PING:
      return "ping";
    case pb::STATS:
      return "stats";
    case pb::OPEN:
      return "open";
    case pb::APPEND:
      return "append";
    case pb::SEAL:
      return "seal";
    case pb::ATTEND:
      return "attend";
    case pb::RETRIEVE:
      return "retrieve";
    case pb::GATHER:
      return "gather";
    case pb::CLOSE:
      return "close";
    case pb::INFO:
      return "info";
    case pb::LIST_CONTEXTS:
      return "list_contexts";
    case pb::DROP:
      return "drop";
    case pb::ERROR:
      return "error";
    case pb::ATTEND_BATCH:
      return "attend_batch";
    case pb::REGISTER_DEVICE:
      return "register_device";
    case pb::UNREGISTER_DEVICE:
      return "unregister_device";
    case pb::ATTEND_DEVICE:
      return "attend_device";
    default:
      return "unknown";
  }
}

absl::StatusOr<uint64_t> CheckedBytes(int64_t a, int64_t b, int64_t c, uint64_t limit,
                                      const char* what) {
  if (a < 0 || b < 0 || c < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": negative size"));
  }
  unsigned __int128 product = static_cast<unsigned __int128>(a) * static_cast<unsigned __int128>(b);
  product *= static_cast<unsigned __int128>(c);
  if (product > limit) {
    return absl::OutOfRangeError(
        absl::StrCat(what, ": ", a, " x ", b, " x ", c, " bytes exceeds the limit of ", limit));
  }
  return static_cast<uint64_t>(product);
}

}  // namespace kvwave::rpc
