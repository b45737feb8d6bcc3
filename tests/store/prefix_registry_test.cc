#include "store/prefix_registry.h"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>

#include "store/prefix_hash.h"
#include "tests/store/store_test_util.h"

namespace kvwave::store {
namespace {

using testing::RandomSegment;

class PrefixRegistryTest : public ::testing::Test {
 protected:
  // Block i of a 2-layer, 1-KV-head model: 2 segments of 32 tokens.
  BlockSegments MakeBlock(int i) {
    BlockSegments segs;
    for (int l = 0; l < 2; ++l) {
      segs.push_back(RandomSegment(
          {.tokens = 32, .head_dim = 8, .steady = 0, .clusters = 3, .first_position = 32 * i}, rng_,
          budget_));
    }
    return segs;
  }
  BlockInfo Info(int i) { return BlockInfo{hashes_[i], 32 * i, 32, 1}; }

  std::mt19937 rng_{12345};
  MemoryBudget budget_{int64_t{1} << 30};
  std::vector<BlockHash> hashes_ = [] {
    std::vector<int32_t> tokens(32 * 6);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 7 + 1);
    return PrefixBlockHashes(tokens, 32, "ns", "model");
  }();
};

TEST_F(PrefixRegistryTest, LongestPrefixAndRefcounts) {
  PrefixRegistry registry;
  {
    BlockPin p0 = registry.Insert(Info(0), MakeBlock(0), false);
    BlockPin p1 = registry.Insert(Info(1), MakeBlock(1), false);
    BlockPin p2 = registry.Insert(Info(2), MakeBlock(2), false);
    EXPECT_EQ(registry.stats().pinned_entries, 3);
    PrefixAttachment a = registry.AttachLongest(hashes_);  // 6 hashes, 3 known
    EXPECT_EQ(a.blocks.size(), 3u);
    EXPECT_EQ(a.matched_tokens, 96);
    EXPECT_TRUE(a.reload_error.ok());
    EXPECT_EQ(a.blocks[1].segment(1, 0), p1.segment(1, 0));  // the same shared segment
    EXPECT_EQ(a.blocks[2].first_position(), 64);
    // A list that diverges at block 1 matches block 0 only.
    std::vector<BlockHash> diverged = {hashes_[0], hashes_[4], hashes_[2]};
    PrefixAttachment b = registry.AttachLongest(diverged);
    EXPECT_EQ(b.blocks.size(), 1u);
    EXPECT_EQ(b.matched_tokens, 32);
  }
  // Every pin released: nothing pinned, everything evictable.
  auto s = registry.stats();
  EXPECT_EQ(s.pinned_entries, 0);
  EXPECT_EQ(s.evictable_bytes, s.resident_bytes);
  EXPECT_GT(s.resident_bytes, 0);
  EXPECT_EQ(s.matched_blocks, 4);
}

TEST_F(PrefixRegistryTest, InsertOfAKnownBlockKeepsTheFirstSegments) {
  PrefixRegistry registry;
  BlockPin first = registry.Insert(Info(0), MakeBlock(0), false);
  BlockPin second = registry.Insert(Info(0), MakeBlock(0), false);
  EXPECT_EQ(second.segment(0, 0), first.segment(0, 0));
  EXPECT_EQ(registry.stats().entries, 1);
}

TEST_F(PrefixRegistryTest, EvictsUnreferencedPersistedLruFirstAndReloads) {
  std::map<BlockHash, BlockSegments> disk;
  int loads = 0;
  PrefixRegistry registry([&](const BlockHash& h) -> absl::StatusOr<BlockSegments> {
    ++loads;
    auto it = disk.find(h);
    if (it == disk.end()) return absl::DataLossError("gone");
    return it->second;
  });
  for (int i = 0; i < 4; ++i) {
    BlockSegments segs = MakeBlock(i);
    disk[hashes_[i]] = segs;
    registry.Insert(Info(i), segs, /*persisted=*/i != 3);  // pin dropped at once
  }
  auto bytes = [&](int i) { return disk[hashes_[i]][0]->bytes() + disk[hashes_[i]][1]->bytes(); };
  {
    // Pin block 1; release order of the rest (by Insert above): 0, 1, 2, 3.
    PrefixAttachment pinned = registry.AttachLongest(std::span(hashes_).subspan(0, 2));
    pinned.blocks.erase(pinned.blocks.begin());  // keep block 1 only
    // Wanting 1 block: evicts block 0 (oldest unreferenced, persisted).
    EXPECT_EQ(registry.Evict(1, /*drop_unpersisted=*/false), bytes(0));
    // Wanting more: block 1 is pinned, block 3 is not persisted: only block 2 goes.
    EXPECT_EQ(registry.Evict(int64_t{1} << 30, /*drop_unpersisted=*/false), bytes(2));
    auto s = registry.stats();
    EXPECT_EQ(s.resident_entries, 2);  // 1 (pinned) and 3
    EXPECT_EQ(s.entries, 4);
    EXPECT_EQ(s.evictions, 2);
  }
  // Attaching again reloads blocks 0 and 2 from "disk", in order.
  PrefixAttachment again = registry.AttachLongest(std::span(hashes_).subspan(0, 4));
  EXPECT_EQ(again.blocks.size(), 4u);
  EXPECT_EQ(loads, 2);
  EXPECT_EQ(registry.stats().reloads, 2);
  EXPECT_EQ(again.blocks[0].segment(0, 0), disk[hashes_[0]][0]);
  again.Release();
  // Release order is deepest first, so eviction takes block 3 (unpersisted: dropped) first.
  EXPECT_EQ(registry.Evict(1, /*drop_unpersisted=*/true), bytes(3));
  EXPECT_FALSE(registry.Contains(hashes_[3]));
  EXPECT_EQ(registry.Evict(1), bytes(2));  // then block 2
  PrefixAttachment two = registry.AttachLongest(std::span(hashes_).subspan(0, 4));
  EXPECT_EQ(two.blocks.size(), 3u);
}

TEST_F(PrefixRegistryTest, AFailedReloadEndsTheMatchAndForgetsACorruptBlock) {
  bool corrupt = true;
  PrefixRegistry registry([&](const BlockHash&) -> absl::StatusOr<BlockSegments> {
    if (corrupt) return absl::DataLossError("checksum");
    return absl::ResourceExhaustedError("memory limit");
  });
  registry.Insert(Info(0), MakeBlock(0), true);
  registry.AddPersisted(Info(1));  // known from RocksDB, not resident
  registry.AddPersisted(Info(2));
  PrefixAttachment a = registry.AttachLongest(hashes_);
  EXPECT_EQ(a.blocks.size(), 1u);
  EXPECT_EQ(a.reload_error.code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(registry.Contains(hashes_[1]));  // forgotten
  a.Release();
  corrupt = false;
  registry.AddPersisted(Info(1));
  PrefixAttachment b = registry.AttachLongest(hashes_);
  EXPECT_EQ(b.blocks.size(), 1u);
  EXPECT_EQ(b.reload_error.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(registry.Contains(hashes_[1]));  // kept: it may load later
}

TEST_F(PrefixRegistryTest, ConcurrentAttachReleaseEvictKeepsCountsConsistent) {
  std::map<BlockHash, BlockSegments> disk;
  for (int i = 0; i < 6; ++i) disk[hashes_[i]] = MakeBlock(i);
  PrefixRegistry registry([&](const BlockHash& h) -> absl::StatusOr<BlockSegments> {
    return disk.at(h);  // read-only after setup
  });
  for (int i = 0; i < 6; ++i) registry.Insert(Info(i), disk[hashes_[i]], true);
  std::vector<std::thread> threads;
  std::atomic<int64_t> matched{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 2000; ++i) {
        if (rng() % 3 == 0) {
          registry.Evict(1 << 20);
        } else {
          PrefixAttachment a = registry.AttachLongest(hashes_);
          matched += static_cast<int64_t>(a.blocks.size());
          for (const auto& b : a.blocks) EXPECT_NE(b.segment(1, 0), nullptr);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  auto s = registry.stats();
  EXPECT_EQ(s.pinned_entries, 0);
  EXPECT_EQ(s.entries, 6);
  EXPECT_EQ(s.matched_blocks, matched.load());
  EXPECT_EQ(matched.load() % 6, 0);  // every attach matched the whole chain
}

}  // namespace
}  // namespace kvwave::store
