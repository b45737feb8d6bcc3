#include "store/prefix_hash.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "absl/container/flat_hash_set.h"

namespace kvwave::store {
namespace {

std::vector<int32_t> RandomTokens(std::mt19937& rng, size_t n) {
  std::uniform_int_distribution<int32_t> token(0, 151935);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = token(rng);
  return t;
}

class PrefixHashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed %u\n", seed_);
  }
  unsigned seed_ = 0;
  std::mt19937 rng_;
};

TEST_F(PrefixHashTest, SameTokensSameHashesAndOnlyFullBlocks) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  const auto tokens = RandomTokens(rng_, 1000);
  const auto a = PrefixBlockHashes(tokens, 128, "tenant-a", "llama3-8b");
  const auto b = PrefixBlockHashes(tokens, 128, "tenant-a", "llama3-8b");
  ASSERT_EQ(a.size(), 7u);  // 1000 / 128, the partial block has no hash
  EXPECT_EQ(a, b);
  absl::flat_hash_set<BlockHash> distinct(a.begin(), a.end());
  EXPECT_EQ(distinct.size(), a.size());
  // A longer list extends the chain without changing it.
  auto longer = tokens;
  longer.resize(1100, 7);
  const auto c = PrefixBlockHashes(longer, 128, "tenant-a", "llama3-8b");
  ASSERT_EQ(c.size(), 8u);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), c.begin()));
  // The chain is h_i = H(h_{i-1}, ...).
  EXPECT_EQ(a[3], ChainBlockHash(a[2], "tenant-a", "llama3-8b",
                                 std::span<const int32_t>(tokens).subspan(3 * 128, 128)));
  EXPECT_EQ(a[0], ChainBlockHash(BlockHash{}, "tenant-a", "llama3-8b",
                                 std::span<const int32_t>(tokens).subspan(0, 128)));
  EXPECT_EQ(a[0].ToHex().size(), 32u);
  EXPECT_TRUE(
      PrefixBlockHashes(std::span<const int32_t>(tokens).subspan(0, 127), 128, "", "").empty());
}

TEST_F(PrefixHashTest, NamespaceOrModelChangesEveryHash) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  const auto tokens = RandomTokens(rng_, 64 * 10);
  const auto base = PrefixBlockHashes(tokens, 64, "ns", "model");
  for (const auto& other : {PrefixBlockHashes(tokens, 64, "ns2", "model"),
                            PrefixBlockHashes(tokens, 64, "ns", "model2"),
                            PrefixBlockHashes(tokens, 64, "", "nsmodel"),  // no ambiguity
                            PrefixBlockHashes(tokens, 64, "nsm", "odel")}) {
    ASSERT_EQ(other.size(), base.size());
    for (size_t i = 0; i < base.size(); ++i) EXPECT_NE(other[i], base[i]) << i;
  }
  // A different block size changes the hashes too (different token runs).
  const auto other_size = PrefixBlockHashes(tokens, 32, "ns", "model");
  for (size_t i = 0; i < base.size(); ++i) EXPECT_NE(other_size[2 * i + 1], base[i]);
}

TEST_F(PrefixHashTest, DivergenceAtBlockIChangesHashesFromIOn) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  const int64_t block = 256, blocks = 12;
  const auto tokens = RandomTokens(rng_, block * blocks);
  const auto base = PrefixBlockHashes(tokens, block, "ns", "m");
  std::uniform_int_distribution<int64_t> where(0, block * blocks - 1);
  for (int trial = 0; trial < 50; ++trial) {
    auto changed = tokens;
    const int64_t at = where(rng_);
    changed[at] ^= 1 + static_cast<int32_t>(rng_() % 1000);
    const auto h = PrefixBlockHashes(changed, block, "ns", "m");
    const int64_t diverged = at / block;
    for (int64_t i = 0; i < blocks; ++i) {
      if (i < diverged) {
        EXPECT_EQ(h[i], base[i]) << "token " << at << " block " << i;
      } else {
        EXPECT_NE(h[i], base[i]) << "token " << at << " block " << i;
      }
    }
  }
}

}  // namespace
}  // namespace kvwave::store
