// Tests of the graph record (index/graph_codec.h) and GraphIndex::ToParts / FromParts: a built
// graph survives encode -> decode -> FromParts with identical searches; every corruption of the
// bytes or of the invariants is refused. Printed seeds; KVWAVE_TEST_SEED overrides them.
#include "index/graph_codec.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "index/graph_index.h"

namespace kvwave::index {
namespace {

uint64_t Seed(uint64_t fallback) {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : fallback;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

std::vector<float> RandomRows(int64_t n, int d, std::mt19937_64* rng, float shift) {
  std::normal_distribution<float> normal;
  std::vector<float> rows(static_cast<size_t>(n * d));
  for (auto& x : rows) x = normal(*rng) + shift;
  return rows;
}

class GraphCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(Seed(21));
    keys_ = RandomRows(n_, d_, &rng, 0.0f);
    queries_ = RandomRows(300, d_, &rng, 0.5f);
    GraphIndexOptions options;
    options.query_neighbors = 20;
    options.max_degree = 12;
    options.entry_points = 3;
    options.recent_entries = 5;
    auto g = GraphIndex::Build(keys_.data(), n_, queries_.data(), 300, d_, options);
    ASSERT_TRUE(g.ok()) << g.status();
    graph_ = std::make_unique<GraphIndex>(std::move(*g));
  }
  const int64_t n_ = 500;
  const int d_ = 24;
  std::vector<float> keys_, queries_;
  std::unique_ptr<GraphIndex> graph_;
};

TEST_F(GraphCodecTest, RoundTripSearchesTheSame) {
  const GraphParts parts = graph_->ToParts();
  const std::string bytes = EncodeGraph(parts);
  auto decoded = DecodeGraph(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, parts);
  auto back = GraphIndex::FromParts(keys_.data(), n_, d_, *std::move(decoded));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->num_edges(), graph_->num_edges());
  for (int i = 0; i < 50; ++i) {
    const float* q = queries_.data() + int64_t{i} * d_;
    const GraphSearchResult a = graph_->Search(q, 10, 32), b = back->Search(q, 10, 32);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.scanned, b.scanned);
  }
}

TEST_F(GraphCodecTest, EveryFlippedByteIsDataLoss) {
  const std::string bytes = EncodeGraph(graph_->ToParts());
  for (size_t i = 0; i < bytes.size(); i += std::max<size_t>(1, bytes.size() / 97)) {
    std::string bad = bytes;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    const auto decoded = DecodeGraph(bad);
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kDataLoss) << "byte " << i;
  }
  EXPECT_EQ(DecodeGraph(bytes.substr(0, bytes.size() - 1)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecodeGraph("").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(GraphCodecTest, ResealedBadInvariantsAreDataLoss) {
  const GraphParts good = graph_->ToParts();
  auto expect_loss = [](GraphParts parts, const char* what) {
    std::string bytes = EncodeGraph(parts);
    TEST_ResealGraph(bytes);
    EXPECT_EQ(DecodeGraph(bytes).status().code(), absl::StatusCode::kDataLoss) << what;
  };
  GraphParts p = good;
  p.targets[3] = static_cast<int32_t>(good.n);
  expect_loss(p, "target out of range");
  p = good;
  std::swap(p.offsets[5], p.offsets[6]);
  if (p.offsets[5] != p.offsets[6]) expect_loss(p, "offsets decrease");
  p = good;
  p.search_entries.push_back(p.search_entries.front());
  expect_loss(p, "repeated entry");
  p = good;
  p.search_entries[0] = (p.search_entries[0] + 1) % static_cast<int32_t>(good.n);
  expect_loss(p, "entries not a prefix of the search entries");
  p = good;
  p.connect_edges = -1;
  expect_loss(p, "negative connect edges");
}

TEST_F(GraphCodecTest, FromPartsRefusesKeysOfAnotherShape) {
  GraphParts parts = graph_->ToParts();
  EXPECT_FALSE(GraphIndex::FromParts(keys_.data(), n_ - 1, d_, parts).ok());
  EXPECT_FALSE(GraphIndex::FromParts(keys_.data(), n_, d_ + 1, parts).ok());
  parts.targets.push_back(0);  // offsets no longer match
  EXPECT_FALSE(GraphIndex::FromParts(keys_.data(), n_, d_, parts).ok());
}

}  // namespace
}  // namespace kvwave::index
