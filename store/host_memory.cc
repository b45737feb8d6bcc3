#include "store/host_memory.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

class AlignedAllocator final : public HostAllocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("host allocation of ", bytes, " failed"));
    }
    return p;
  }
  void Free(void* p, size_t) override { std::free(p); }
  const char* name() const override { return "aligned-heap"; }
};

}  // namespace

HostAllocator* DefaultHostAllocator() {
  static AlignedAllocator allocator;
  return &allocator;
}

absl::StatusOr<HostBuffer> HostBuffer::Allocate(HostAllocator* allocator, size_t bytes) {
  KVWAVE_ASSIGN_OR_RETURN(void* p, allocator->Allocate(bytes));
  HostBuffer b;
  b.allocator_ = allocator;
  b.data_ = static_cast<std::byte*>(p);
  b.size_ = bytes;
  return b;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    allocator_ = std::exchange(o.allocator_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void HostBuffer::Reset() {
  if (data_ != nullptr) allocator_->Free(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<MemoryCharge> MemoryBudget::Reserve(int64_t bytes) {
  KVWAVE_CHECK(bytes >= 0);
  int64_t used = used_.load(std::memory_order_relaxed);
  do {
    if (used + bytes > limit_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("memory limit: need ", bytes, " bytes, ", used, " of ", limit_, " in use"));
    }
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return MemoryCharge(this, bytes);
}

MemoryCharge& MemoryCharge::operator=(MemoryCharge&& o) noexcept {
  if (this != &o) {
    Reset();
    budget_ = std::exchange(o.budget_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

MemoryCharge MemoryCharge::Split(int64_t bytes) {
  KVWAVE_CHECK(bytes >= 0 && bytes <= bytes_);
  bytes_ -= bytes;
  return MemoryCharge(budget_, bytes);
}

void MemoryCharge::Merge(MemoryCharge&& other) {
  if (other.bytes_ == 0) return;
  KVWAVE_CHECK(budget_ == nullptr || budget_ == other.budget_ || bytes_ == 0);
  budget_ = other.budget_;
  bytes_ += std::exchange(other.bytes_, 0);
}

void MemoryCharge::Shrink(int64_t bytes) {
  KVWAVE_CHECK(bytes >= 0 && bytes <= bytes_);
  if (budget_ != nullptr) budget_->Release(bytes);
  bytes_ -= bytes;
}

void MemoryCharge::Reset() {
  if (budget_ != nullptr && bytes_ > 0) budget_->Release(bytes_);
  bytes_ = 0;
}

}  // namespace kvwave::store
