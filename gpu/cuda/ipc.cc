// CUDA IPC handles of other processes (gpu/cuda_ipc.h).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "gpu/cuda_address_range.h"
#include "gpu/cuda_ipc.h"

namespace kvwave::gpu {
namespace {

// A refused handle is bad input (the client's), not a broken daemon: INVALID_ARGUMENT.
absl::Status Refused(cudaError_t err, const char* what) {
  cudaGetLastError();  // not sticky: clear it
  return absl::InvalidArgumentError(absl::StrCat(
      what, " refused the handle: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

absl::Status Use(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::FailedPreconditionError(
      absl::StrCat("cudaSetDevice(", device, "): ", cudaGetErrorString(err)));
}

}  // namespace

absl::StatusOr<std::string> DeviceUuid(int device) {
  cudaDeviceProp prop;
  const cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("cudaGetDeviceProperties(", device, "): ", cudaGetErrorString(err)));
  }
  static_assert(sizeof(prop.uuid) == kDeviceUuidBytes);
  return std::string(reinterpret_cast<const char*>(&prop.uuid), kDeviceUuidBytes);
}

absl::StatusOr<std::unique_ptr<IpcMemory>> IpcMemory::Open(int device, std::string_view handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t))
    return absl::InvalidArgumentError(absl::StrCat(
        "a memory handle has ", sizeof(cudaIpcMemHandle_t), " bytes, not ", handle.size()));
  if (absl::Status st = Use(device); !st.ok()) return st;
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* p = nullptr;
  const cudaError_t err = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) return Refused(err, "cudaIpcOpenMemHandle");
  CUdeviceptr range_base = 0;
  size_t range_size = 0;
  if (AllocationRange(&range_base, &range_size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS ||
      range_base != reinterpret_cast<CUdeviceptr>(p)) {
    cudaIpcCloseMemHandle(p);
    cudaGetLastError();
    return absl::InternalError("cuMemGetAddressRange failed on an opened IPC allocation");
  }
  return std::unique_ptr<IpcMemory>(new IpcMemory(device, static_cast<std::byte*>(p), range_size));
}

IpcMemory::~IpcMemory() {
  if (Use(device_).ok()) cudaIpcCloseMemHandle(base_);
  cudaGetLastError();
}

absl::StatusOr<std::unique_ptr<IpcEvent>> IpcEvent::Open(int device, std::string_view handle) {
  if (handle.size() != sizeof(cudaIpcEventHandle_t))
    return absl::InvalidArgumentError(absl::StrCat(
        "an event handle has ", sizeof(cudaIpcEventHandle_t), " bytes, not ", handle.size()));
  if (absl::Status st = Use(device); !st.ok()) return st;
  cudaIpcEventHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  cudaEvent_t e = nullptr;
  const cudaError_t err = cudaIpcOpenEventHandle(&e, h);
  if (err != cudaSuccess) return Refused(err, "cudaIpcOpenEventHandle");
  return std::unique_ptr<IpcEvent>(new IpcEvent(device, e));
}

IpcEvent::~IpcEvent() {
  if (Use(device_).ok()) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  cudaGetLastError();
}

absl::Status IpcEvent::Synchronize() const {
  const cudaError_t err = cudaEventSynchronize(static_cast<cudaEvent_t>(event_));
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::InternalError(absl::StrCat("cudaEventSynchronize: ", cudaGetErrorString(err)));
}

}  // namespace kvwave::gpu
