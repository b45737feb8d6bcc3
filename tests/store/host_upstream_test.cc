// The default pool's upstream allocator can be replaced (kvwaved puts pinned memory there) only
// before the pool's first use. Its own binary: the default pool is a process-wide singleton.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>

#include "store/host_memory.h"

namespace kvwave::store {
namespace {

class CountingAllocator final : public HostAllocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    ++allocations;
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == nullptr) return absl::ResourceExhaustedError("no memory");
    return p;
  }
  void Free(void* p, size_t) override {
    ++frees;
    std::free(p);
  }
  const char* name() const override { return "counting"; }
  std::atomic<int> allocations{0}, frees{0};
};

TEST(HostUpstreamTest, InstalledBeforeFirstUseThenFixed) {
  static CountingAllocator counting;  // lives for the process, as required
  ASSERT_TRUE(SetDefaultHostUpstream(&counting).ok());
  {
    auto buf = HostBuffer::Allocate(DefaultHostAllocator(), size_t{1} << 20);
    ASSERT_TRUE(buf.ok()) << buf.status();
    EXPECT_EQ(counting.allocations.load(), 1);  // the pool had nothing idle: upstream served it
  }
  // Freed into the pool (idle, reused): the next block of that size does not go upstream.
  auto again = HostBuffer::Allocate(DefaultHostAllocator(), size_t{1} << 20);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(counting.allocations.load(), 1);
  EXPECT_EQ(counting.frees.load(), 0);
  // The pool is in use now: its upstream can no longer change.
  const absl::Status late = SetDefaultHostUpstream(&counting);
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition) << late;
}

}  // namespace
}  // namespace kvwave::store
