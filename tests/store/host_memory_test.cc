#include "store/host_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "store/context.h"

namespace kvwave::store {
namespace {

// Counts what is outstanding upstream, so a test can see every block come back.
class CountingAllocator final : public HostAllocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    absl::StatusOr<void*> p = AlignedHeapAllocator()->Allocate(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    if (p.ok()) {
      live_[*p] = bytes;
      live_bytes_ += static_cast<int64_t>(bytes);
      ++allocations_;
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      EXPECT_NE(it, live_.end()) << "freed a block that is not live";
      if (it != live_.end()) {
        EXPECT_EQ(it->second, bytes) << "freed with another size than allocated";
        live_bytes_ -= static_cast<int64_t>(it->second);
        live_.erase(it);
      }
    }
    AlignedHeapAllocator()->Free(p, bytes);
  }
  const char* name() const override { return "counting"; }

  int64_t live_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_bytes_;
  }
  size_t live_blocks() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_.size();
  }
  int64_t allocations() {
    std::lock_guard<std::mutex> lock(mu_);
    return allocations_;
  }

 private:
  std::mutex mu_;
  std::map<void*, size_t> live_;
  int64_t live_bytes_ = 0;
  int64_t allocations_ = 0;
};

constexpr size_t kMiB = size_t{1} << 20;

TEST(HostPoolTest, ClassBytesCoverTheRequestWithBoundedSlack) {
  EXPECT_EQ(HostPool::ClassBytes(1000), 1000u);  // below the pooled size: exact
  EXPECT_EQ(HostPool::ClassBytes(HostPool::kMinPooledBytes), HostPool::kMinPooledBytes);
  EXPECT_EQ(HostPool::ClassBytes(kMiB), kMiB);
  size_t previous = 0;
  for (size_t bytes = HostPool::kMinPooledBytes; bytes < 256 * kMiB; bytes = bytes * 9 / 8 + 777) {
    const size_t c = HostPool::ClassBytes(bytes);
    EXPECT_GE(c, bytes);
    EXPECT_LE(c, bytes + bytes / 8 + 4096) << bytes;
    EXPECT_EQ(c % 4096, 0u);
    EXPECT_EQ(HostPool::ClassBytes(c), c) << "a class size is its own class";
    EXPECT_GE(c, previous);
    previous = c;
  }
}

TEST(HostPoolTest, FreedBlockIsReusedForTheSameClass) {
  CountingAllocator upstream;
  HostPool pool(&upstream, 64 * kMiB);
  void* a = pool.Allocate(3 * kMiB).value();
  std::memset(a, 7, 3 * kMiB);
  pool.Free(a, 3 * kMiB);
  EXPECT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(HostPool::ClassBytes(3 * kMiB)));
  // A slightly different size of the same class gets the same (resident) block.
  void* b = pool.Allocate(3 * kMiB - 100).value();
  EXPECT_EQ(a, b);
  EXPECT_EQ(pool.stats().hits, 1);
  EXPECT_EQ(pool.stats().misses, 1);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  EXPECT_EQ(upstream.allocations(), 1);
  pool.Free(b, 3 * kMiB - 100);
  pool.Trim();
  EXPECT_EQ(upstream.live_blocks(), 0u);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
}

TEST(HostPoolTest, SmallBlocksBypassThePool) {
  CountingAllocator upstream;
  HostPool pool(&upstream, 64 * kMiB);
  void* p = pool.Allocate(1000).value();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  EXPECT_EQ(upstream.live_bytes(), 1000);
  pool.Free(p, 1000);
  EXPECT_EQ(upstream.live_blocks(), 0u);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  EXPECT_EQ(pool.stats().misses, 0);
}

TEST(HostPoolTest, IdleBytesStayWithinTheLimit) {
  CountingAllocator upstream;
  HostPool pool(&upstream, 5 * kMiB);
  std::vector<void*> blocks;
  for (int i = 0; i < 4; ++i) blocks.push_back(pool.Allocate(2 * kMiB).value());
  for (void* p : blocks) pool.Free(p, 2 * kMiB);
  HostPoolStats s = pool.stats();
  EXPECT_EQ(s.idle_bytes, static_cast<int64_t>(4 * kMiB));  // two fit, two went upstream
  EXPECT_EQ(s.idle_blocks, 2);
  EXPECT_EQ(s.released, 2);
  EXPECT_EQ(upstream.live_bytes(), s.idle_bytes);
  // Lowering the limit gives idle blocks back at once.
  pool.SetIdleLimit(3 * kMiB);
  s = pool.stats();
  EXPECT_EQ(s.idle_bytes, static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(s.idle_limit_bytes, static_cast<int64_t>(3 * kMiB));
  EXPECT_EQ(upstream.live_bytes(), s.idle_bytes);
  pool.SetIdleLimit(0);  // a zero limit pools nothing
  void* p = pool.Allocate(2 * kMiB).value();
  pool.Free(p, 2 * kMiB);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  EXPECT_EQ(upstream.live_blocks(), 0u);
}

TEST(HostPoolTest, DestructionReturnsEveryIdleBlock) {
  CountingAllocator upstream;
  {
    HostPool pool(&upstream, 64 * kMiB);
    for (size_t bytes : {kMiB, 2 * kMiB, 100 * size_t{1024}}) {
      void* p = pool.Allocate(bytes).value();
      pool.Free(p, bytes);
    }
    EXPECT_EQ(pool.stats().idle_blocks, 3);
  }
  EXPECT_EQ(upstream.live_blocks(), 0u);
}

TEST(HostPoolTest, GrowMovesPagesOfAnIdleBlockInsteadOfCopying) {
  HostPool pool(MappedHostAllocator(), 64 * kMiB);
  pool.set_grow_by_remap(true);
  auto* a = static_cast<unsigned char*>(pool.Allocate(kMiB).value());
  for (size_t i = 0; i < kMiB; ++i) a[i] = static_cast<unsigned char>(i * 7 + 1);
  // No idle block of the missing size: the pool says so and the caller would copy.
  EXPECT_EQ(pool.Grow(a, kMiB, 2 * kMiB).status().code(), absl::StatusCode::kUnimplemented);
  void* donor = pool.Allocate(kMiB).value();
  std::memset(donor, 0xAB, kMiB);
  pool.Free(donor, kMiB);
  ASSERT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(kMiB));
  auto* b = static_cast<unsigned char*>(pool.Grow(a, kMiB, 2 * kMiB).value());
  EXPECT_EQ(pool.stats().remapped, 1);
  EXPECT_EQ(pool.stats().idle_bytes, 0) << "the donor's pages now belong to the grown block";
  bool same = true;
  for (size_t i = 0; i < kMiB; ++i) same &= b[i] == static_cast<unsigned char>(i * 7 + 1);
  EXPECT_TRUE(same) << "the first MiB kept its contents";
  EXPECT_EQ(b[kMiB], 0xAB) << "the extension is the donor's (resident) pages";
  std::memset(b + kMiB, 1, kMiB);  // and writable
  // Growth within the class is free; the block goes back under its new class.
  EXPECT_EQ(pool.Grow(b, 2 * kMiB, 2 * kMiB - 4096).value(), b);
  pool.Free(b, 2 * kMiB);
  EXPECT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(2 * kMiB));
  void* again = pool.Allocate(2 * kMiB).value();
  EXPECT_EQ(again, b);
  pool.Free(again, 2 * kMiB);
}

TEST(HostPoolTest, MappedPoolCutsLargerIdleBlocksForSmallerRequests) {
  HostPool pool(MappedHostAllocator(), 64 * kMiB);
  void* big = pool.Allocate(2 * kMiB).value();
  std::memset(big, 5, 2 * kMiB);
  pool.Free(big, 2 * kMiB);
  // The front of the idle 2 MiB serves 512 KiB; the rest stays idle as one 1.5 MiB class.
  auto* a = static_cast<unsigned char*>(pool.Allocate(512 << 10).value());
  EXPECT_EQ(static_cast<void*>(a), big);
  EXPECT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(3 * kMiB / 2));
  EXPECT_EQ(pool.stats().idle_blocks, 1);
  auto* b = static_cast<unsigned char*>(pool.Allocate(3 * kMiB / 2).value());
  EXPECT_EQ(b, a + (512 << 10));
  EXPECT_EQ(b[0], 5) << "resident pages of the idle block";
  EXPECT_EQ(pool.stats().misses, 1);
  EXPECT_EQ(pool.stats().hits, 2);
  std::memset(a, 1, 512 << 10);
  std::memset(b, 2, 3 * kMiB / 2);
  EXPECT_EQ(a[(512 << 10) - 1], 1);
  pool.Free(a, 512 << 10);
  pool.Free(b, 3 * kMiB / 2);
  EXPECT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(2 * kMiB));
  // A rest below the smallest class goes back to the OS.
  pool.Trim();
  void* c = pool.Allocate(80 << 10).value();
  pool.Free(c, 80 << 10);
  const int64_t released = pool.stats().released;
  void* d = pool.Allocate(64 << 10).value();
  EXPECT_EQ(d, c);
  EXPECT_EQ(pool.stats().released, released + 1);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  pool.Free(d, 64 << 10);
}

TEST(HostPoolTest, MappedPoolAssemblesALargeBlockFromSmallerIdleOnes) {
  HostPool pool(MappedHostAllocator(), 64 * kMiB);
  std::vector<void*> small;
  for (int i = 0; i < 4; ++i) small.push_back(pool.Allocate(512 << 10).value());
  for (int i = 0; i < 4; ++i) std::memset(small[i], 10 + i, 512 << 10);
  for (void* p : small) pool.Free(p, 512 << 10);
  const int64_t misses = pool.stats().misses;
  // No idle range of 2 MiB: four 512 KiB ones are moved into a fresh mapping.
  auto* big = static_cast<unsigned char*>(pool.Allocate(2 * kMiB).value());
  EXPECT_EQ(pool.stats().misses, misses);
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  EXPECT_GE(pool.stats().remapped, 1);
  std::set<int> seen;
  for (int i = 0; i < 4; ++i) seen.insert(big[i * (512 << 10)]);
  EXPECT_EQ(seen, (std::set<int>{10, 11, 12, 13})) << "the idle pages, not fresh zero pages";
  std::memset(big, 0, 2 * kMiB);
  // Growing it takes what is idle and leaves the rest fresh.
  EXPECT_EQ(pool.Grow(big, 2 * kMiB, 4 * kMiB).status().code(), absl::StatusCode::kUnimplemented)
      << "off by default";
  pool.set_grow_by_remap(true);
  void* more = pool.Allocate(kMiB).value();
  pool.Free(more, kMiB);
  auto* grown = static_cast<unsigned char*>(pool.Grow(big, 2 * kMiB, 4 * kMiB).value());
  EXPECT_EQ(pool.stats().idle_bytes, 0);
  EXPECT_EQ(grown[2 * kMiB - 1], 0);
  std::memset(grown, 3, 4 * kMiB);
  pool.Free(grown, 4 * kMiB);
  EXPECT_EQ(pool.stats().idle_bytes, static_cast<int64_t>(4 * kMiB));
}

TEST(HostBufferTest, GrowKeepsTheLiveBytesWithOrWithoutRemapping) {
  CountingAllocator counting;
  HostPool copying(&counting, 64 * kMiB);
  HostPool mapped(MappedHostAllocator(), 64 * kMiB);
  mapped.set_grow_by_remap(true);
  for (HostAllocator* allocator : {static_cast<HostAllocator*>(&copying),
                                   static_cast<HostAllocator*>(&mapped), AlignedHeapAllocator()}) {
    SCOPED_TRACE(allocator->name());
    // Two idle blocks: one for b, one of the missing size for the pool that can remap.
    HostBuffer spare1 = HostBuffer::Allocate(allocator, 512 << 10).value();
    HostBuffer spare2 = HostBuffer::Allocate(allocator, 512 << 10).value();
    spare1.Reset();
    spare2.Reset();
    HostBuffer b = HostBuffer::Allocate(allocator, 512 << 10).value();
    for (size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<std::byte>(i % 251);
    ASSERT_TRUE(b.Grow(1 << 20, 300 << 10).ok());
    EXPECT_GE(b.size(), size_t{1} << 20);
    bool same = true;
    for (size_t i = 0; i < (300 << 10); ++i) same &= b.data()[i] == static_cast<std::byte>(i % 251);
    EXPECT_TRUE(same);
    std::memset(b.data(), 0, b.size());
    ASSERT_TRUE(b.Grow(1000, 1000).ok()) << "a smaller size is already satisfied";
    EXPECT_EQ(b.size(), size_t{1} << 20);
  }
  EXPECT_EQ(mapped.stats().remapped, 1);
  EXPECT_EQ(copying.stats().remapped, 0);
  copying.Trim();
  EXPECT_EQ(counting.live_blocks(), 0u);
}

// Randomized, several threads: the pool never hands out a block twice, and every byte is either
// held by a caller, idle in the pool (within the limit), or back upstream.
TEST(HostPoolTest, ConcurrentAllocateFreeKeepsBlocksDisjoint) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  CountingAllocator upstream;
  HostPool pool(&upstream, 8 * kMiB);
  std::vector<std::thread> threads;
  std::atomic<int> corrupt{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed + t);
      std::vector<std::pair<void*, size_t>> held;
      for (int i = 0; i < 400; ++i) {
        if (held.size() < 4 && rng() % 2 == 0) {
          const size_t bytes = (64 << 10) + rng() % (2 * kMiB);
          auto* p = static_cast<unsigned char*>(pool.Allocate(bytes).value());
          std::memset(p, t + 1, 64);
          std::memset(p + bytes - 64, t + 1, 64);
          held.push_back({p, bytes});
        } else if (!held.empty()) {
          auto [p, bytes] = held.back();
          held.pop_back();
          auto* c = static_cast<unsigned char*>(p);
          if (c[0] != t + 1 || c[bytes - 1] != t + 1) ++corrupt;  // someone else wrote here
          pool.Free(p, bytes);
        }
      }
      for (auto [p, bytes] : held) pool.Free(p, bytes);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(corrupt.load(), 0);
  const HostPoolStats s = pool.stats();
  EXPECT_LE(s.idle_bytes, s.idle_limit_bytes);
  EXPECT_EQ(upstream.live_bytes(), s.idle_bytes);
  EXPECT_GT(s.hits, 0);
  pool.Trim();
  EXPECT_EQ(upstream.live_blocks(), 0u);
}

// A tail appended in pieces, strided like the engine's per-head slices, large enough to take the
// streaming copy and small enough to take the plain one, holds exactly the rows given.
TEST(TailTest, StridedAppendsOfEverySizeKeepTheRows) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (int32_t head_dim : {8, 64, 128, 100}) {
    const int heads = 4;
    MemoryBudget budget(int64_t{1} << 32);
    CountingAllocator upstream;
    HostPool pool(&upstream, 64 * kMiB);
    std::vector<Tail> tails;
    for (int h = 0; h < heads; ++h) tails.emplace_back(head_dim, DType::kBF16, &pool);
    const size_t row = static_cast<size_t>(head_dim) * 2, stride = heads * row;
    std::vector<std::vector<uint8_t>> want_k(heads), want_v(heads);
    for (int64_t n : {1, 3, 700, 2048, 1, 5000, 64}) {
      std::vector<uint8_t> k(n * stride), v(n * stride);
      for (auto& x : k) x = static_cast<uint8_t>(rng());
      for (auto& x : v) x = static_cast<uint8_t>(rng());
      for (int h = 0; h < heads; ++h) {
        auto charge = budget.Reserve(static_cast<int64_t>(2 * n * row)).value();
        ASSERT_TRUE(tails[h]
                        .Append(reinterpret_cast<const std::byte*>(k.data()) + h * row,
                                reinterpret_cast<const std::byte*>(v.data()) + h * row, n, stride,
                                std::move(charge))
                        .ok());
        for (int64_t i = 0; i < n; ++i) {
          want_k[h].insert(want_k[h].end(), k.begin() + i * stride + h * row,
                           k.begin() + i * stride + (h + 1) * row);
          want_v[h].insert(want_v[h].end(), v.begin() + i * stride + h * row,
                           v.begin() + i * stride + (h + 1) * row);
        }
      }
    }
    for (int h = 0; h < heads; ++h) {
      ASSERT_EQ(tails[h].size() * row, want_k[h].size());
      EXPECT_EQ(std::memcmp(tails[h].key_row(0), want_k[h].data(), want_k[h].size()), 0) << h;
      EXPECT_EQ(std::memcmp(tails[h].value_row(0), want_v[h].data(), want_v[h].size()), 0) << h;
    }
    // Every row is charged: exactly 2 x rows x row bytes, and all of it comes back.
    EXPECT_EQ(budget.used(), static_cast<int64_t>(2 * heads * tails[0].size() * row));
    for (auto& t : tails) t.DropFront(t.size()).Reset();
    EXPECT_EQ(budget.used(), 0);
    tails.clear();
    EXPECT_LE(pool.stats().idle_bytes, pool.stats().idle_limit_bytes);
    pool.Trim();
    EXPECT_EQ(upstream.live_blocks(), 0u);
  }
}

TEST(TailTest, GrowingTailOverMappedPoolKeepsRowsAndRemaps) {
  HostPool pool(MappedHostAllocator(), 256 * kMiB);
  pool.set_grow_by_remap(true);
  MemoryBudget budget(int64_t{1} << 32);
  std::vector<uint8_t> rows(2048 * 256);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<uint8_t>(i * 13 + i / 256);
  const auto* p = reinterpret_cast<const std::byte*>(rows.data());
  for (int round = 0; round < 2; ++round) {
    Tail t(128, DType::kBF16, &pool);
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(t.Append(p, p, 2048, 256, budget.Reserve(2 * 2048 * 256).value()).ok());
    }
    ASSERT_EQ(t.size(), 4 * 2048);
    bool same = true;
    for (int64_t r = 0; r < t.size(); ++r) {
      same &= std::memcmp(t.key_row(r), p + (r % 2048) * 256, 256) == 0;
      same &= std::memcmp(t.value_row(r), p + (r % 2048) * 256, 256) == 0;
    }
    EXPECT_TRUE(same) << "round " << round;
  }
  // The first tail's blocks were freed into the pool; the second grew into them by remapping.
  EXPECT_GT(pool.stats().remapped, 0);
  EXPECT_EQ(budget.used(), 0);
}

TEST(TailTest, NewTailReusesTheBlocksOfAClosedOne) {
  CountingAllocator upstream;
  HostPool pool(&upstream, 256 * kMiB);
  MemoryBudget budget(int64_t{1} << 32);
  std::vector<uint8_t> rows(4096 * 256, 1);
  auto append = [&](Tail& t) {
    const auto* p = reinterpret_cast<const std::byte*>(rows.data());
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(t.Append(p, p, 1024, 256, budget.Reserve(2 * 1024 * 256).value()).ok());
    }
  };
  {
    Tail first(128, DType::kBF16, &pool);
    append(first);
  }
  const int64_t cold = upstream.allocations();
  EXPECT_GT(cold, 0);
  {
    Tail second(128, DType::kBF16, &pool);
    append(second);
  }
  EXPECT_EQ(upstream.allocations(), cold) << "the second tail should live in pooled blocks";
  EXPECT_GT(pool.stats().hits, 0);
  EXPECT_EQ(budget.used(), 0);
}

}  // namespace
}  // namespace kvwave::store
