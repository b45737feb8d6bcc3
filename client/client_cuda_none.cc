// client/client_cuda.h in builds without CUDA: device tensors are not available.
#include "client/client_cuda.h"

namespace kvwave::client::cuda {
namespace {

absl::Status NoCuda() {
  return absl::UnimplementedError("device tensors: this kvwave client was built without CUDA");
}

}  // namespace

absl::StatusOr<DeviceHandles> MakeHandles(const void*, size_t, const void*, size_t, const void*,
                                          size_t, void**, void**) {
  return NoCuda();
}
absl::Status Record(void*, CUstream_st*) { return NoCuda(); }
absl::Status Wait(CUstream_st*, void*) { return NoCuda(); }
void DestroyEvent(void*) {}

}  // namespace kvwave::client::cuda
