#include "store/host_memory.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

size_t PageRounded(size_t bytes) { return (bytes + 4095) / 4096 * 4096; }

// Copies the live bytes of a growing buffer. Large copies use streaming stores: the rows are
// far larger than the caches and are not read again soon, and streaming stores skip reading
// every destination line first (measured 9-10 vs 6 GB/s for 1 MiB copies on the dev VM).
void CopyForGrowth(std::byte* dst, const std::byte* src, size_t bytes) {
#if defined(__AVX2__)
  constexpr size_t kStreamingBytes = size_t{256} << 10;
  if (bytes >= kStreamingBytes && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    size_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
      const auto* s = reinterpret_cast<const __m256i*>(src + i);
      auto* d = reinterpret_cast<__m256i*>(dst + i);
      const __m256i a = _mm256_loadu_si256(s), b = _mm256_loadu_si256(s + 1);
      const __m256i c = _mm256_loadu_si256(s + 2), e = _mm256_loadu_si256(s + 3);
      _mm256_stream_si256(d, a);
      _mm256_stream_si256(d + 1, b);
      _mm256_stream_si256(d + 2, c);
      _mm256_stream_si256(d + 3, e);
    }
    _mm_sfence();  // streaming stores are weakly ordered: complete them before the buffer is used
    std::memcpy(dst + i, src + i, bytes - i);
    return;
  }
#endif
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

class MappedAllocator final : public HostAllocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (bytes < kMinMappedBytes) return AlignedHeapAllocator()->Allocate(bytes);
    void* p = mmap(nullptr, PageRounded(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(
          absl::StrCat("mapping ", bytes, " bytes failed: ", std::strerror(errno)));
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    if (bytes < kMinMappedBytes) {
      AlignedHeapAllocator()->Free(p, bytes);
    } else {
      KVWAVE_CHECK(munmap(p, PageRounded(bytes)) == 0);
    }
  }
  const char* name() const override { return "mapped"; }
  bool blocks_are_mappings() const override { return true; }
};

}  // namespace

absl::StatusOr<void*> HostAllocator::Grow(void*, size_t, size_t) {
  return absl::UnimplementedError(absl::StrCat(name(), " memory cannot be remapped"));
}

HostAllocator* MappedHostAllocator() {
  static MappedAllocator allocator;
  return &allocator;
}

HostAllocator* AlignedHeapAllocator() {
  static AlignedAllocator allocator;
  return &allocator;
}

size_t HostPool::ClassBytes(size_t bytes) {
  if (bytes < kMinPooledBytes) return bytes;
  constexpr size_t kGranule = size_t{4} << 10;
  const size_t granules = (bytes + kGranule - 1) / kGranule;
  // 8 classes per power of two: round up to a multiple of 2^(floor(log2 granules) - 3).
  const int log2 = 63 - __builtin_clzll(granules);
  const size_t step = size_t{1} << std::max(0, log2 - 3);
  return (granules + step - 1) / step * step * kGranule;
}

namespace {

// The largest class size <= bytes. REQUIRES: bytes >= kMinPooledBytes, a multiple of 4 KiB.
size_t FloorClassBytes(size_t bytes) {
  const size_t granules = bytes / 4096;
  const int log2 = 63 - __builtin_clzll(granules);
  const size_t step = size_t{1} << std::max(0, log2 - 3);
  return granules / step * step * 4096;
}

}  // namespace

void* HostPool::TakeIdle(size_t bytes) {
  auto it = idle_.find(bytes);
  if (it == idle_.end() || it->second.empty()) {
    if (!upstream_->blocks_are_mappings()) return nullptr;
    for (it = idle_.upper_bound(bytes); it != idle_.end() && it->second.empty(); ++it) {
    }
    if (it == idle_.end()) return nullptr;
  }
  auto* p = static_cast<std::byte*>(it->second.back());
  it->second.pop_back();
  idle_bytes_ -= static_cast<int64_t>(it->first);
  --idle_blocks_;
  if (it->first > bytes) PutIdleRest(p + bytes, it->first - bytes);
  return p;
}

void HostPool::PutIdleRest(std::byte* p, size_t bytes) {
  while (bytes >= kMinPooledBytes) {
    const size_t piece = FloorClassBytes(bytes);
    idle_[piece].push_back(p);
    idle_bytes_ += static_cast<int64_t>(piece);
    ++idle_blocks_;
    p += piece;
    bytes -= piece;
  }
  if (bytes > 0) {
    KVWAVE_CHECK(munmap(p, bytes) == 0);
    ++released_;
  }
}

bool HostPool::FillFromIdle(std::byte* dst, size_t bytes) {
  // Take the pieces under the lock, move them outside it (an mremap costs microseconds).
  std::vector<std::pair<std::byte*, size_t>> pieces;
  {
    absl::MutexLock lock(&mu_);
    size_t left = bytes;
    while (left > 0 && idle_bytes_ > 0) {
      // One idle range that covers the rest, cut to size; else the largest one there is.
      size_t take = left;
      void* p = TakeIdle(left);
      if (p == nullptr) {
        auto it = idle_.rbegin();
        while (it != idle_.rend() && it->second.empty()) ++it;
        if (it == idle_.rend()) break;
        take = it->first;
        p = TakeIdle(take);
      }
      pieces.push_back({static_cast<std::byte*>(p), take});
      left -= take;
    }
  }
  bool moved_any = false;
  size_t offset = 0;
  for (auto [p, size] : pieces) {
    if (mremap(p, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, dst + offset) != MAP_FAILED) {
      moved_any = true;
    } else {
      absl::MutexLock lock(&mu_);
      PutIdleRest(p, size);  // that part of dst stays fresh
    }
    offset += size;
  }
  if (moved_any) {
    absl::MutexLock lock(&mu_);
    ++remapped_;
  }
  return moved_any;
}

absl::StatusOr<void*> HostPool::Grow(void* p, size_t old_bytes, size_t new_bytes) {
  const size_t from = ClassBytes(old_bytes), to = ClassBytes(new_bytes);
  if (from < kMinPooledBytes || !upstream_->blocks_are_mappings()) {
    return absl::UnimplementedError("only pooled mappings grow in place");
  }
  if (to <= from) return p;  // the class already holds new_bytes
  {
    absl::MutexLock lock(&mu_);
    if (!grow_by_remap_) return absl::UnimplementedError("growth by remapping is off");
    if (idle_bytes_ == 0) return absl::UnimplementedError("no idle pages to extend with");
  }
  // 1. Move the block's pages to a range of the new size (its end is fresh, unfaulted memory).
  void* q = mremap(p, from, to, MREMAP_MAYMOVE);
  if (q == MAP_FAILED) {
    return absl::UnimplementedError(absl::StrCat("mremap: ", std::strerror(errno)));
  }
  // 2. Replace that end by idle resident pages, as far as there are some.
  if (FillFromIdle(static_cast<std::byte*>(q) + from, to - from)) {
    absl::MutexLock lock(&mu_);
    ++hits_;
  }
  return q;
}

HostPool::~HostPool() {
  absl::MutexLock lock(&mu_);
  TrimTo(0);
}

absl::StatusOr<void*> HostPool::Allocate(size_t bytes) {
  const size_t size = ClassBytes(bytes);
  if (size < kMinPooledBytes) return upstream_->Allocate(bytes);
  bool assemble = false;
  {
    absl::MutexLock lock(&mu_);
    if (void* p = TakeIdle(size); p != nullptr) {
      ++hits_;
      return p;
    }
    // No single idle range is large enough: with mappings, smaller ones can be moved together.
    assemble = upstream_->blocks_are_mappings() && idle_bytes_ > 0;
    if (!assemble) ++misses_;
  }
  KVWAVE_ASSIGN_OR_RETURN(void* p, upstream_->Allocate(size));
  if (assemble) {
    const bool filled = FillFromIdle(static_cast<std::byte*>(p), size);
    absl::MutexLock lock(&mu_);
    ++(filled ? hits_ : misses_);
  }
  return p;
}

void HostPool::Free(void* p, size_t bytes) {
  if (p == nullptr) return;
  const size_t size = ClassBytes(bytes);
  if (size < kMinPooledBytes) {
    upstream_->Free(p, bytes);
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    if (idle_bytes_ + static_cast<int64_t>(size) <= idle_limit_) {
      idle_[size].push_back(p);
      idle_bytes_ += static_cast<int64_t>(size);
      ++idle_blocks_;
      return;
    }
    ++released_;
  }
  upstream_->Free(p, size);
}

void HostPool::set_grow_by_remap(bool on) {
  absl::MutexLock lock(&mu_);
  grow_by_remap_ = on;
}

void HostPool::SetIdleLimit(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  idle_limit_ = std::max<int64_t>(0, bytes);
  TrimTo(idle_limit_);
}

void HostPool::Trim() {
  absl::MutexLock lock(&mu_);
  TrimTo(0);
}

int64_t HostPool::idle_limit() const {
  absl::MutexLock lock(&mu_);
  return idle_limit_;
}

void HostPool::TrimTo(int64_t target) {
  // Largest classes first: the fewest blocks to give back. Upstream frees run under mu_, which
  // only trimming (rare: a limit change, shutdown) does.
  std::vector<size_t> sizes;
  for (const auto& [size, blocks] : idle_) {
    if (!blocks.empty()) sizes.push_back(size);
  }
  std::sort(sizes.rbegin(), sizes.rend());
  for (size_t size : sizes) {
    std::vector<void*>& blocks = idle_[size];
    while (idle_bytes_ > target && !blocks.empty()) {
      upstream_->Free(blocks.back(), size);
      blocks.pop_back();
      idle_bytes_ -= static_cast<int64_t>(size);
      --idle_blocks_;
      ++released_;
    }
  }
}

HostPoolStats HostPool::stats() const {
  absl::MutexLock lock(&mu_);
  HostPoolStats s;
  s.idle_bytes = idle_bytes_;
  s.idle_limit_bytes = idle_limit_;
  s.idle_blocks = idle_blocks_;
  s.hits = hits_;
  s.misses = misses_;
  s.released = released_;
  s.remapped = remapped_;
  return s;
}

namespace {
absl::Mutex default_upstream_mu;
HostAllocator* default_upstream ABSL_GUARDED_BY(default_upstream_mu) = nullptr;
bool default_pool_made ABSL_GUARDED_BY(default_upstream_mu) = false;
}  // namespace

HostPool* DefaultHostPool() {
  static HostPool* pool = [] {
    absl::MutexLock lock(&default_upstream_mu);
    default_pool_made = true;
    return new HostPool(default_upstream != nullptr ? default_upstream : MappedHostAllocator(),
                        HostPool::kDefaultIdleLimitBytes);
  }();
  return pool;  // never destroyed: buffers of static objects may be freed after main returns
}

absl::Status SetDefaultHostUpstream(HostAllocator* upstream) {
  absl::MutexLock lock(&default_upstream_mu);
  if (default_pool_made) {
    return absl::FailedPreconditionError(
        "the default host pool is already in use; set its upstream allocator before any KV "
        "memory is allocated");
  }
  default_upstream = upstream;
  return absl::OkStatus();
}

HostAllocator* DefaultHostAllocator() { return DefaultHostPool(); }

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

absl::Status HostBuffer::Grow(size_t new_bytes, size_t live_bytes) {
  KVWAVE_CHECK(allocator_ != nullptr && live_bytes <= size_);
  if (new_bytes <= size_) return absl::OkStatus();
  absl::StatusOr<void*> moved = allocator_->Grow(data_, size_, new_bytes);
  if (moved.ok()) {
    data_ = static_cast<std::byte*>(*moved);
    size_ = new_bytes;
    return absl::OkStatus();
  }
  KVWAVE_ASSIGN_OR_RETURN(HostBuffer bigger, Allocate(allocator_, new_bytes));
  CopyForGrowth(bigger.data(), data_, live_bytes);
  *this = std::move(bigger);
  return absl::OkStatus();
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
