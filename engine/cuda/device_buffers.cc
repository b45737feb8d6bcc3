#include "engine/cuda/device_buffers.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::engine {

CudaDeviceBuffers::CudaDeviceBuffers(std::shared_ptr<IpcOpener> opener, Buffer q, Buffer out,
                                     Buffer lse, std::unique_ptr<gpu::IpcEvent> q_ready,
                                     std::unique_ptr<gpu::IpcEvent> out_ready)
    : opener_(std::move(opener)),
      q_(std::move(q)),
      out_(std::move(out)),
      lse_(std::move(lse)),
      q_ready_(std::move(q_ready)),
      out_ready_(std::move(out_ready)) {
  opener_->registrations_.fetch_add(1, std::memory_order_relaxed);
  opener_->events_.fetch_add(2, std::memory_order_relaxed);
}

CudaDeviceBuffers::~CudaDeviceBuffers() {
  // The last call's GPU work (which reads q and writes out / lse) is before "out ready".
  (void)out_ready_->Synchronize();
  q_ready_.reset();
  out_ready_.reset();
  q_ = out_ = lse_ = Buffer{};
  opener_->events_.fetch_sub(2, std::memory_order_relaxed);
  opener_->registrations_.fetch_sub(1, std::memory_order_relaxed);
}

int64_t IpcOpener::mappings() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(mapped_.size());
}

absl::StatusOr<CudaDeviceBuffers::Buffer> IpcOpener::Map(const DeviceBufferSpec& spec,
                                                         const char* what) {
  if (spec.bytes == 0) return absl::InvalidArgumentError(absl::StrCat(what, ": 0 bytes"));
  if (spec.offset % 16 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": offset ", spec.offset, " is not a multiple of 16 bytes"));
  std::shared_ptr<gpu::IpcMemory> memory;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = mapped_.find(spec.handle);
    if (it != mapped_.end()) memory = it->second.lock();
    if (memory == nullptr) {
      absl::StatusOr<std::unique_ptr<gpu::IpcMemory>> opened =
          gpu::IpcMemory::Open(device_, spec.handle);
      if (!opened.ok())
        return absl::Status(opened.status().code(),
                            absl::StrCat(what, ": ", opened.status().message()));
      // The deleter unmaps under the lock, so that a new Open of the same handle never races it.
      std::weak_ptr<IpcOpener> self = weak_from_this();
      std::string key = spec.handle;
      memory = std::shared_ptr<gpu::IpcMemory>(opened->release(), [self, key](gpu::IpcMemory* m) {
        if (auto o = self.lock()) {
          std::lock_guard<std::mutex> lock(o->mu_);
          auto it = o->mapped_.find(key);
          if (it != o->mapped_.end() && it->second.expired()) o->mapped_.erase(it);
          delete m;
        } else {
          delete m;
        }
      });
      mapped_[spec.handle] = memory;
    }
  }
  if (spec.offset > memory->size() || spec.bytes > memory->size() - spec.offset)
    return absl::OutOfRangeError(absl::StrCat(what, ": ", spec.bytes, " bytes at offset ",
                                              spec.offset, " pass the allocation's ",
                                              memory->size(), " bytes"));
  return CudaDeviceBuffers::Buffer{std::move(memory), spec.offset, spec.bytes};
}

absl::StatusOr<std::unique_ptr<CudaDeviceBuffers>> IpcOpener::Open(const DeviceBuffersSpec& spec) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (uuid_.empty()) {
      KVWAVE_ASSIGN_OR_RETURN(uuid_, gpu::DeviceUuid(device_));
    }
  }
  if (spec.device_uuid != uuid_)
    return absl::InvalidArgumentError(absl::StrCat(
        "the buffers are on another GPU (uuid ", absl::BytesToHexString(spec.device_uuid),
        ") than kvwaved's device ", device_, " (uuid ", absl::BytesToHexString(uuid_), ")"));
  KVWAVE_ASSIGN_OR_RETURN(CudaDeviceBuffers::Buffer q, Map(spec.q, "q"));
  KVWAVE_ASSIGN_OR_RETURN(CudaDeviceBuffers::Buffer out, Map(spec.out, "out"));
  KVWAVE_ASSIGN_OR_RETURN(CudaDeviceBuffers::Buffer lse, Map(spec.lse, "lse"));
  absl::StatusOr<std::unique_ptr<gpu::IpcEvent>> q_ready =
      gpu::IpcEvent::Open(device_, spec.q_ready);
  if (!q_ready.ok())
    return absl::Status(q_ready.status().code(),
                        absl::StrCat("q_ready: ", q_ready.status().message()));
  absl::StatusOr<std::unique_ptr<gpu::IpcEvent>> out_ready =
      gpu::IpcEvent::Open(device_, spec.out_ready);
  if (!out_ready.ok())
    return absl::Status(out_ready.status().code(),
                        absl::StrCat("out_ready: ", out_ready.status().message()));
  return std::make_unique<CudaDeviceBuffers>(shared_from_this(), std::move(q), std::move(out),
                                             std::move(lse), std::move(*q_ready),
                                             std::move(*out_ready));
}

}  // namespace kvwave::engine
