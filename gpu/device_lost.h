// A GPU whose context is gone for good: an error the CUDA runtime keeps returning to every later
// call of the process (an illegal address, a kernel fault, an uncorrectable ECC error, a launch
// timeout...). The backend marks such a status (MarkDeviceLost) where it converts a CUDA error;
// the status travels up unchanged, and kvwaved, on seeing one (IsDeviceLost), says so and exits
// non-zero (rpc/server.h) instead of failing every later call. No CUDA here: rpc/ and the CPU build
// include it.
#ifndef KVWAVE_GPU_DEVICE_LOST_H_
#define KVWAVE_GPU_DEVICE_LOST_H_

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace kvwave::gpu {

inline constexpr absl::string_view kDeviceLostPayload = "type.kvwave/gpu-device-lost";

inline absl::Status MarkDeviceLost(absl::Status status) {
  status.SetPayload(kDeviceLostPayload, absl::Cord("1"));
  return status;
}

inline bool IsDeviceLost(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kDeviceLostPayload).has_value();
}

}  // namespace kvwave::gpu

#endif  // KVWAVE_GPU_DEVICE_LOST_H_
