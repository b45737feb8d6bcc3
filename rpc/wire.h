// Conversions shared by the server and the client between protocol messages and C++ values:
// absl::Status <-> pb::Status, DType <-> pb::DType, operation names, and the byte sizes of the
// tensors each operation carries. Stateless; thread-safe.
#ifndef KVWAVE_RPC_WIRE_H_
#define KVWAVE_RPC_WIRE_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "config/dtype.h"
#include "rpc/kvwave_rpc.pb.h"

namespace kvwave::rpc {

void ToProto(const absl::Status& status, pb::Status* out);
absl::Status FromProto(const pb::Status& status);

pb::DType ToProto(DType dtype);
absl::StatusOr<DType> FromProto(pb::DType dtype);

// "open", "append", ... for a pb::MessageType value; "unknown" otherwise.
const char* OpName(uint16_t op);
inline constexpr uint16_t kMaxOp = pb::ATTEND_DEVICE;

// a * b * c with an overflow check against `limit`; OutOfRange naming `what` on overflow.
absl::StatusOr<uint64_t> CheckedBytes(int64_t a, int64_t b, int64_t c, uint64_t limit,
                                      const char* what);

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_WIRE_H_
