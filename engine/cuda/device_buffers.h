// GPU clients' registrations on the CUDA backend (issue 17): the q / out / lse buffers of another
// process, mapped from their CUDA IPC handles, and its "q ready" / "out ready" events.
//
// Lifecycle of a registration: Open (handles checked and opened: right GPU, sizes within the
// allocations, 16-byte aligned) -> calls (one at a time, each recording "out ready" after its
// GPU work) -> destruction: waits for "out ready" (the last call's work), then closes the events
// and drops its mappings. A mapping is shared by every registration naming the same allocation
// (one process may map a handle once) and unmapped with the last of them.
//
// Thread-safety: IpcOpener is thread-safe; a registration is used by one call at a time.
#ifndef KVWAVE_ENGINE_CUDA_DEVICE_BUFFERS_H_
#define KVWAVE_ENGINE_CUDA_DEVICE_BUFFERS_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "gpu/cuda_ipc.h"

namespace kvwave::engine {

class IpcOpener;

class CudaDeviceBuffers final : public DeviceBuffers {
 public:
  struct Buffer {
    std::shared_ptr<gpu::IpcMemory> memory;
    uint64_t offset = 0, bytes = 0;
    std::byte* at(uint64_t o) const { return memory->base() + offset + o; }
  };
  CudaDeviceBuffers(std::shared_ptr<IpcOpener> opener, Buffer q, Buffer out, Buffer lse,
                    std::unique_ptr<gpu::IpcEvent> q_ready,
                    std::unique_ptr<gpu::IpcEvent> out_ready);
  ~CudaDeviceBuffers() override;

  uint64_t q_bytes() const override { return q_.bytes; }
  uint64_t out_bytes() const override { return out_.bytes; }
  uint64_t lse_bytes() const override { return lse_.bytes; }
  const float* q(uint64_t offset) const { return reinterpret_cast<const float*>(q_.at(offset)); }
  float* out(uint64_t offset) const { return reinterpret_cast<float*>(out_.at(offset)); }
  float* lse(uint64_t offset) const { return reinterpret_cast<float*>(lse_.at(offset)); }
  void* q_ready() const { return q_ready_->event(); }
  void* out_ready() const { return out_ready_->event(); }

 private:
  std::shared_ptr<IpcOpener> opener_;
  Buffer q_, out_, lse_;
  std::unique_ptr<gpu::IpcEvent> q_ready_, out_ready_;
};

// Opens registrations on one device and counts what is open.
class IpcOpener : public std::enable_shared_from_this<IpcOpener> {
 public:
  explicit IpcOpener(int device) : device_(device) {}
  [[nodiscard]] absl::StatusOr<std::unique_ptr<CudaDeviceBuffers>> Open(
      const DeviceBuffersSpec& spec);

  int64_t registrations() const { return registrations_.load(std::memory_order_relaxed); }
  int64_t events() const { return events_.load(std::memory_order_relaxed); }
  int64_t mappings() const;

 private:
  friend class CudaDeviceBuffers;
  absl::StatusOr<CudaDeviceBuffers::Buffer> Map(const DeviceBufferSpec& spec, const char* what);

  const int device_;
  std::string uuid_;  // of device_, read at the first Open
  mutable std::mutex mu_;
  // handle -> its mapping while a registration holds it (entries leave with the mapping).
  std::map<std::string, std::weak_ptr<gpu::IpcMemory>> mapped_;
  // Counters (relaxed: statistics only).
  std::atomic<int64_t> registrations_{0}, events_{0};
};

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_CUDA_DEVICE_BUFFERS_H_
