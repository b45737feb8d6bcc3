// client/client_cuda.h with the CUDA runtime (and the driver's cuMemGetAddressRange, to find the
// allocation a pointer lies in: an IPC handle names a whole allocation).
#include "client/client_cuda.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "gpu/cuda_address_range.h"

namespace kvwave::client::cuda {
namespace {

absl::Status Check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

// The handle of the allocation holding [p, p + bytes), and p's offset in it.
absl::StatusOr<DeviceBufferHandle> Handle(const void* p, size_t bytes, int device,
                                          const char* what) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
    cudaGetLastError();
    return absl::InvalidArgumentError(absl::StrCat(what, ": not device memory"));
  }
  if (attr.device != device)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": on device ", attr.device, ", q on device ", device));
  CUdeviceptr base = 0;
  size_t size = 0;
  if (gpu::AllocationRange(&base, &size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS)
    return absl::InvalidArgumentError(absl::StrCat(what, ": cuMemGetAddressRange failed"));
  const size_t offset = reinterpret_cast<CUdeviceptr>(p) - base;
  if (bytes == 0 || offset + bytes > size)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", bytes, " bytes at ", offset, " pass its allocation of ", size));
  cudaIpcMemHandle_t h;
  if (absl::Status st =
          Check(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)), "cudaIpcGetMemHandle");
      !st.ok())
    return st;
  return DeviceBufferHandle{std::string(reinterpret_cast<const char*>(&h), sizeof(h)), offset,
                            bytes};
}

absl::StatusOr<std::string> NewEvent(void** event) {
  cudaEvent_t e = nullptr;
  if (absl::Status st =
          Check(cudaEventCreateWithFlags(&e, cudaEventInterprocess | cudaEventDisableTiming),
                "cudaEventCreateWithFlags");
      !st.ok())
    return st;
  cudaIpcEventHandle_t h;
  if (absl::Status st = Check(cudaIpcGetEventHandle(&h, e), "cudaIpcGetEventHandle"); !st.ok()) {
    cudaEventDestroy(e);
    return st;
  }
  *event = e;
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

}  // namespace

absl::StatusOr<DeviceHandles> MakeHandles(const void* q, size_t q_bytes, const void* out,
                                          size_t out_bytes, const void* lse, size_t lse_bytes,
                                          void** q_ready, void** out_ready) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, q) != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
    cudaGetLastError();
    return absl::InvalidArgumentError("q: not device memory");
  }
  const int device = attr.device;
  DeviceHandles h;
  cudaDeviceProp prop;
  if (absl::Status st = Check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      !st.ok())
    return st;
  h.device_uuid.assign(reinterpret_cast<const char*>(&prop.uuid), sizeof(prop.uuid));
  auto q_h = Handle(q, q_bytes, device, "q");
  if (!q_h.ok()) return q_h.status();
  auto out_h = Handle(out, out_bytes, device, "out");
  if (!out_h.ok()) return out_h.status();
  auto lse_h = Handle(lse, lse_bytes, device, "lse");
  if (!lse_h.ok()) return lse_h.status();
  h.q = *q_h;
  h.out = *out_h;
  h.lse = *lse_h;
  int current = 0;
  cudaGetDevice(&current);
  cudaSetDevice(device);  // the events on the buffers' GPU
  auto qe = NewEvent(q_ready);
  absl::StatusOr<std::string> oe = absl::InternalError("not made");
  if (qe.ok()) oe = NewEvent(out_ready);
  cudaSetDevice(current);
  if (!qe.ok()) return qe.status();
  if (!oe.ok()) {
    DestroyEvent(*q_ready);
    return oe.status();
  }
  h.q_ready_event = *qe;
  h.out_ready_event = *oe;
  return h;
}

absl::Status Record(void* event, CUstream_st* stream) {
  return Check(cudaEventRecord(static_cast<cudaEvent_t>(event), stream), "cudaEventRecord");
}

absl::Status Wait(CUstream_st* stream, void* event) {
  return Check(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(event), 0),
               "cudaStreamWaitEvent");
}

void DestroyEvent(void* event) {
  if (event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

}  // namespace kvwave::client::cuda
