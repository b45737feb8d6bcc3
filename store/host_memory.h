// Host memory for KV data: an allocator seam (plain aligned memory now; pinned cudaHostAlloc
// memory when the CUDA backend is present) and a budget that charges every byte against the
// configured limit.
//
// Thread-safety: HostAllocator implementations and MemoryBudget are thread-safe. HostBuffer and
// MemoryCharge are move-only owners, used by one thread at a time.
#ifndef KVWAVE_STORE_HOST_MEMORY_H_
#define KVWAVE_STORE_HOST_MEMORY_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/status/statusor.h"

namespace kvwave::store {

// The seam through which all KV bytes are allocated.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // Returns 64-byte aligned memory or an error (never a silent fallback to other memory).
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* p, size_t bytes) = 0;
  virtual const char* name() const = 0;
};

// Ordinary aligned heap memory.
HostAllocator* DefaultHostAllocator();

// A byte buffer from a HostAllocator; freed on destruction.
class HostBuffer {
 public:
  HostBuffer() = default;
  static absl::StatusOr<HostBuffer> Allocate(HostAllocator* allocator, size_t bytes);
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { Reset(); }

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  void Reset();

 private:
  HostAllocator* allocator_ = nullptr;
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

class MemoryCharge;

// Bytes charged against a limit. Reserve either charges all the bytes or nothing.
class MemoryBudget {
 public:
  explicit MemoryBudget(int64_t limit_bytes) : limit_(limit_bytes) {}

  // RESOURCE_EXHAUSTED (naming the sizes) when used + bytes would pass the limit.
  [[nodiscard]] absl::StatusOr<MemoryCharge> Reserve(int64_t bytes);

  int64_t used() const { return used_.load(std::memory_order_relaxed); }
  int64_t limit() const { return limit_; }

 private:
  friend class MemoryCharge;
  void Release(int64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }
  const int64_t limit_;
  // Relaxed: the counter orders nothing else; Reserve's compare-exchange alone keeps
  // used_ <= limit_.
  std::atomic<int64_t> used_{0};
};

// A move-only charge of bytes against a MemoryBudget, released on destruction.
class MemoryCharge {
 public:
  MemoryCharge() = default;
  MemoryCharge(MemoryCharge&& o) noexcept { *this = std::move(o); }
  MemoryCharge& operator=(MemoryCharge&& o) noexcept;
  MemoryCharge(const MemoryCharge&) = delete;
  MemoryCharge& operator=(const MemoryCharge&) = delete;
  ~MemoryCharge() { Reset(); }

  int64_t bytes() const { return bytes_; }
  // Moves `bytes` of this charge into a new charge (REQUIRES: bytes <= this->bytes()).
  MemoryCharge Split(int64_t bytes);
  // Adds another charge of the same budget into this one.
  void Merge(MemoryCharge&& other);
  // Gives back `bytes` of the charge now (REQUIRES: bytes <= this->bytes()).
  void Shrink(int64_t bytes);
  void Reset();

 private:
  friend class MemoryBudget;
  MemoryCharge(MemoryBudget* budget, int64_t bytes) : budget_(budget), bytes_(bytes) {}
  MemoryBudget* budget_ = nullptr;
  int64_t bytes_ = 0;
};

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_HOST_MEMORY_H_
