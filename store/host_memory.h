// Host memory for KV data: an allocator seam (plain aligned memory now; pinned cudaHostAlloc
// memory when the CUDA backend is present), a pool that recycles freed large blocks, and a budget
// that charges every byte against the configured limit.
//
// Accounting: MemoryBudget charges the bytes the store holds (KV rows, indexes). The pool's idle
// blocks are held by nobody: they are not charged, but they are bounded (HostPool's idle limit,
// `store.host_pool_bytes`) and reported (HostPoolStats, the daemon's stats).
//
// Thread-safety: HostAllocator implementations, HostPool and MemoryBudget are thread-safe.
// HostBuffer and MemoryCharge are move-only owners, used by one thread at a time.
#ifndef KVWAVE_STORE_HOST_MEMORY_H_
#define KVWAVE_STORE_HOST_MEMORY_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace kvwave::store {

// The seam through which all KV bytes are allocated.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // Returns 64-byte aligned memory or an error (never a silent fallback to other memory).
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* p, size_t bytes) = 0;
  virtual const char* name() const = 0;
  // Grows block p of old_bytes to new_bytes keeping its contents, without copying them, and
  // returns its (possibly new) address; on error p is unchanged and still owned by the caller.
  // UNIMPLEMENTED where the memory cannot be remapped (the caller then copies; see HostBuffer).
  virtual absl::StatusOr<void*> Grow(void* p, size_t old_bytes, size_t new_bytes);
  // True when every block of at least kMinMappedBytes is a private anonymous mapping of exactly
  // its size rounded up to 4 KiB pages, which a pool may move with mremap. Pinned memory is not.
  virtual bool blocks_are_mappings() const { return false; }
  static constexpr size_t kMinMappedBytes = size_t{64} << 10;
};

// Ordinary aligned heap memory, every block from and back to the C library.
HostAllocator* AlignedHeapAllocator();

// Blocks of at least 64 KiB are private anonymous mappings of their size rounded up to 4 KiB
// pages (so they can be remapped); smaller ones come from the aligned heap.
HostAllocator* MappedHostAllocator();

struct HostPoolStats {
  int64_t idle_bytes = 0;        // bytes of idle blocks held for reuse (not charged to a budget)
  int64_t idle_limit_bytes = 0;  // the bound on idle_bytes
  int64_t idle_blocks = 0;
  int64_t hits = 0;      // allocations (and growths) served with idle pages
  int64_t misses = 0;    // pooled-size allocations that got only fresh upstream memory
  int64_t released = 0;  // blocks given back upstream (over the limit, trimmed, cut-off rests)
  int64_t remapped = 0;  // assemblies and growths that moved idle pages with mremap
};

// Recycles freed large blocks. A request of at least kMinPooledBytes is rounded up to its size
// class (4 KiB granules, then 8 classes per power of two: at most 12.5% slack, never touched
// unless used, so never resident) and served from an idle block of that class when there is one;
// a freed block goes back to its class unless that would take the idle bytes past the limit, in
// which case it goes upstream. Smaller requests go straight upstream.
//
// Where upstream blocks are mappings (MappedHostAllocator), idle memory is a set of page ranges
// that may be cut and moved: a request with no idle block of its class takes the front of the
// smallest larger idle block (the rest stays idle, cut into class sizes), or is assembled from
// smaller idle ranges moved into a fresh mapping with mremap; Grow can move pages instead of
// copying (set_grow_by_remap). Without cutting and assembling, blocks freed at one size would
// not serve requests of another (tails grow through several sizes), and new contexts would
// start on fresh pages again.
//
// Why: a fresh block of the heap is fresh pages, and on a VM every first touch of a 4 KiB page is
// a fault costing microseconds; a tail that grows, or a new context after a closed one, would pay
// it for every byte appended. Reused blocks are already resident. Pinned memory
// (cudaHostAlloc) needs the same recycling, only more so: put that allocator upstream.
//
// Invariant: idle_bytes <= idle_limit_bytes, except transiently inside SetIdleLimit.
class HostPool final : public HostAllocator {
 public:
  static constexpr size_t kMinPooledBytes = kMinMappedBytes;
  static constexpr int64_t kDefaultIdleLimitBytes = int64_t{1} << 30;  // store.host_pool_bytes

  // REQUIRES: upstream outlives the pool.
  HostPool(HostAllocator* upstream, int64_t idle_limit_bytes)
      : upstream_(upstream), idle_limit_(idle_limit_bytes) {}
  ~HostPool() override;

  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Free(void* p, size_t bytes) override;
  const char* name() const override { return "pool"; }
  // With set_grow_by_remap(true) and mappings upstream: moves the block's pages to a range of
  // the new class size and fills the rest with idle (already resident) pages, so neither a copy
  // nor first-touch faults are paid. UNIMPLEMENTED otherwise, or when there are no idle pages
  // to fill with (the caller then copies into a new block, which the pool serves).
  absl::StatusOr<void*> Grow(void* p, size_t old_bytes, size_t new_bytes) override;
  // Off by default: on the 2-vCPU development VM an mremap in the multi-threaded daemon costs
  // about as much as copying the megabyte it saves (TLB shootdown IPIs are VM exits), and bulk
  // Append over shared memory measured no faster with it (kvwave-bench serve, A/B, 3 pairs of
  // runs); in-process, with no other thread running, it was faster. Worth re-measuring on
  // bare metal.
  void set_grow_by_remap(bool on);

  // Sets the bound on idle bytes; releases idle blocks now until they fit (0: pool nothing).
  void SetIdleLimit(int64_t bytes);
  // Releases every idle block upstream.
  void Trim();
  int64_t idle_limit() const;
  HostPoolStats stats() const;

  // The bytes actually allocated for a request of `bytes` (its size class).
  static size_t ClassBytes(size_t bytes);

 private:
  // Gives idle blocks back upstream until idle_bytes_ <= target.
  void TrimTo(int64_t target) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // An idle range of exactly `bytes` (a multiple of 4 KiB): an idle block of that size, or, with
  // mappings upstream, the front of the smallest larger one. Null when there is none.
  void* TakeIdle(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds the rest of a cut block to the idle ranges, in class sizes; a rest smaller than the
  // smallest class goes back to the OS. REQUIRES: mappings upstream, bytes a multiple of 4 KiB.
  void PutIdleRest(std::byte* p, size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // With mappings upstream: moves idle pages onto [dst, dst + bytes) (a range of fresh pages of
  // one mapping), largest idle ranges first, until it is covered or nothing is idle; returns
  // whether any page moved. What is not covered stays fresh (faulted on first touch).
  bool FillFromIdle(std::byte* dst, size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);

  HostAllocator* const upstream_;
  mutable absl::Mutex mu_;
  int64_t idle_limit_ ABSL_GUARDED_BY(mu_);
  int64_t idle_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t idle_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0, misses_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t released_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t remapped_ ABSL_GUARDED_BY(mu_) = 0;
  bool grow_by_remap_ ABSL_GUARDED_BY(mu_) = false;
  // Class size -> idle blocks, most recently freed last (reused first: likeliest in cache).
  std::map<size_t, std::vector<void*>> idle_ ABSL_GUARDED_BY(mu_);
};

// The process-wide pool over MappedHostAllocator() (or the allocator installed by
// SetDefaultHostUpstream); its idle limit starts at HostPool::kDefaultIdleLimitBytes (kvwaved
// applies `store.host_pool_bytes`).
HostPool* DefaultHostPool();

// Makes `upstream` (e.g. pinned memory, buffer/pinned_allocator.h) the allocator under
// DefaultHostPool(). Only before the pool's first use (FAILED_PRECONDITION after it), so that
// no block changes allocator. REQUIRES: upstream lives for the rest of the process.
[[nodiscard]] absl::Status SetDefaultHostUpstream(HostAllocator* upstream);

// The allocator of all KV bytes of the store: DefaultHostPool().
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
  // Grows the buffer to at least new_bytes keeping its first live_bytes: by remapping where the
  // allocator can (HostAllocator::Grow), else by allocating, copying and freeing. On error the
  // buffer is unchanged. REQUIRES: an allocated buffer, live_bytes <= size().
  [[nodiscard]] absl::Status Grow(size_t new_bytes, size_t live_bytes);
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
