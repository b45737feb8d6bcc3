// The daemon's side of CUDA IPC (GPU clients, issue 17), behind a CUDA-free interface like
// gpu/cuda_backend.h (implemented in gpu/cuda/ipc.cc, CUDA builds only): device memory and
// interprocess events of another process on the same GPU, opened from the 64-byte handles that
// process made (cudaIpcGetMemHandle / cudaIpcGetEventHandle) and closed by RAII.
//
// A memory handle names a whole allocation (cudaMalloc's, or a segment of a caching allocator
// such as torch's); a client's tensor is an offset into it. One process can map a handle once:
// the caller keeps one IpcMemory per handle and shares it (engine/cuda/device_buffers.cc).
// While a mapping is open the exporting process's allocation stays alive, even after that
// process exits: a mapping left open is device memory leaked.
//
// Thread-safety: Open is thread-safe; an object is used by one owner (the accessors are const).
#ifndef KVWAVE_GPU_CUDA_IPC_H_
#define KVWAVE_GPU_CUDA_IPC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvwave::gpu {

inline constexpr size_t kIpcHandleBytes = 64;   // cudaIpcMemHandle_t, cudaIpcEventHandle_t
inline constexpr size_t kDeviceUuidBytes = 16;  // cudaDeviceProp::uuid

// The UUID of CUDA device `device` (kDeviceUuidBytes bytes): how a client names its GPU.
[[nodiscard]] absl::StatusOr<std::string> DeviceUuid(int device);

// Another process's device allocation mapped into this one (cudaIpcOpenMemHandle with lazy peer
// access), unmapped on destruction.
class IpcMemory {
 public:
  // Errors: a handle of the wrong length (INVALID_ARGUMENT), one the driver refuses (a forged or
  // stale handle, another GPU's: INVALID_ARGUMENT with the driver's word).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<IpcMemory>> Open(int device,
                                                                       std::string_view handle);
  ~IpcMemory();
  IpcMemory(const IpcMemory&) = delete;
  IpcMemory& operator=(const IpcMemory&) = delete;

  std::byte* base() const { return base_; }
  // The allocation's bytes as the driver reports them (cuMemGetAddressRange).
  size_t size() const { return size_; }

 private:
  IpcMemory(int device, std::byte* base, size_t size) : device_(device), base_(base), size_(size) {}
  int device_;
  std::byte* base_;
  size_t size_;
};

// Another process's interprocess event (cudaIpcOpenEventHandle), destroyed on destruction.
class IpcEvent {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<IpcEvent>> Open(int device,
                                                                      std::string_view handle);
  ~IpcEvent();
  IpcEvent(const IpcEvent&) = delete;
  IpcEvent& operator=(const IpcEvent&) = delete;

  void* event() const { return event_; }  // a cudaEvent_t (CudaBackend::*ForeignEvent)
  // Waits until the work before the event's latest record (in any process) is done.
  [[nodiscard]] absl::Status Synchronize() const;

 private:
  IpcEvent(int device, void* event) : device_(device), event_(event) {}
  int device_;
  void* event_;
};

}  // namespace kvwave::gpu

#endif  // KVWAVE_GPU_CUDA_IPC_H_
