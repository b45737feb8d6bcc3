#include "store/segment.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "store/context.h"
#include "store/host_memory.h"
#include "tests/store/store_test_util.h"

namespace kvwave::store {
namespace {

TEST(SegmentTest, ClusterContiguousPagesAndPermutation) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int n = 203, d = 64, steady = 4, clusters = 13;
  std::vector<float> k(n * d), v(n * d);
  std::normal_distribution<float> normal(0.5f, 1.0f);
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  std::vector<int32_t> assignment(n - steady), sizes(clusters, 0);
  std::uniform_int_distribution<int> pick(0, clusters - 2);  // the last cluster stays empty
  for (auto& a : assignment) ++sizes[a = pick(rng)];
  std::vector<float> centroids(clusters * d, 1.0f);

  MemoryBudget budget(1 << 30);
  MemoryCharge reserved = budget.Reserve(Segment::MaxBytes(n, d, DType::kF32, 8, 16)).value();
  SegmentInput in = testing::Float32Input(k, v, n, d, steady, assignment, centroids, sizes);
  in.first_position = 1000;
  auto seg = Segment::Build(in, DefaultHostAllocator(), reserved);
  ASSERT_TRUE(seg.ok()) << seg.status();
  const Segment& s = **seg;
  EXPECT_EQ(budget.used(), reserved.bytes() + s.bytes());
  // Every token appears exactly once, at a row whose content is the token's row.
  std::vector<int> seen(n, 0);
  for (int64_t r = 0; r < s.num_rows(); ++r) {
    int32_t t = s.token_of_row(r);
    if (t < 0) continue;
    ++seen[t];
    EXPECT_EQ(s.row_of_token(t), r);
    EXPECT_EQ(std::memcmp(s.key_row(r), &k[t * d], d * 4), 0);
    EXPECT_EQ(std::memcmp(s.value_row(r), &v[t * d], d * 4), 0);
  }
  for (int t = 0; t < n; ++t) EXPECT_EQ(seen[t], 1) << t;
  // Clusters start on page boundaries, their members are contiguous, value sums add up.
  for (int c = 0; c < clusters; ++c) {
    EXPECT_EQ(s.cluster_row(c) % 8, 0);
    EXPECT_EQ(s.cluster_size(c), sizes[c]);
    std::vector<double> sum(d, 0.0);
    for (int i = 0; i < sizes[c]; ++i) {
      int32_t t = s.token_of_row(s.cluster_row(c) + i);
      ASSERT_GE(t, steady);
      EXPECT_EQ(assignment[t - steady], c);
      for (int j = 0; j < d; ++j) sum[j] += v[t * d + j];
    }
    for (int j = 0; j < d; ++j) {
      EXPECT_NEAR(s.value_sums()[c * d + j], sum[j], 1e-4 * (1 + std::abs(sum[j])));
    }
    // Key spread: the members' mean per-dimension squared distance to the (given) centroid.
    double spread = 0;
    for (int i = 0; i < sizes[c]; ++i) {
      const int32_t t = s.token_of_row(s.cluster_row(c) + i);
      for (int j = 0; j < d; ++j) spread += std::pow(double{k[t * d + j]} - 1.0, 2);
    }
    spread = sizes[c] > 0 ? spread / (double{sizes[c]} * d) : 0.0;
    EXPECT_NEAR(s.key_spreads()[c], spread, 1e-5 * (1 + spread)) << "cluster " << c;
  }
  ASSERT_EQ(s.key_spreads().size(), static_cast<size_t>(clusters));
  EXPECT_EQ(s.cluster_size(clusters - 1), 0);
  for (int t = 0; t < steady; ++t) EXPECT_EQ(s.row_of_token(t), t);
}

TEST(SegmentTest, InconsistentClusteringIsAnError) {
  std::vector<float> k(10 * 8, 1.0f), v(10 * 8, 1.0f), centroids(2 * 8, 0.0f);
  std::vector<int32_t> assignment(10, 0), sizes = {9, 1};  // sizes disagree with assignment
  MemoryBudget budget(1 << 20);
  MemoryCharge reserved = budget.Reserve(1 << 16).value();
  SegmentInput in;
  in.num_tokens = 10;
  in.head_dim = 8;
  in.keys = reinterpret_cast<const std::byte*>(k.data());
  in.values = reinterpret_cast<const std::byte*>(v.data());
  in.num_clusters = 2;
  in.assignment = assignment;
  in.centroids = centroids;
  in.sizes = sizes;
  EXPECT_EQ(Segment::Build(in, DefaultHostAllocator(), reserved).status().code(),
            absl::StatusCode::kInvalidArgument);
  assignment[0] = 5;  // out of range
  EXPECT_FALSE(Segment::Build(in, DefaultHostAllocator(), reserved).ok());
  EXPECT_EQ(reserved.bytes(), 1 << 16);  // nothing taken
}

TEST(MemoryBudgetTest, ReserveIsAllOrNothing) {
  MemoryBudget budget(1000);
  MemoryCharge a = budget.Reserve(600).value();
  EXPECT_EQ(budget.Reserve(500).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(budget.used(), 600);
  MemoryCharge b = a.Split(100);
  EXPECT_EQ(budget.used(), 600);
  b.Reset();
  EXPECT_EQ(budget.used(), 500);
  a.Shrink(200);
  EXPECT_EQ(budget.used(), 300);
  { MemoryCharge c = budget.Reserve(700).value(); }
  EXPECT_EQ(budget.used(), 300);
}

TEST(TailTest, AppendAndDropFrontKeepOrderAndCharges) {
  MemoryBudget budget(1 << 20);
  Tail tail(8, DType::kF32, DefaultHostAllocator());
  std::vector<float> rows(100 * 8);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i) + 0.5f;
  auto* bytes = reinterpret_cast<const std::byte*>(rows.data());
  ASSERT_TRUE(tail.Append(bytes, bytes, 100, 32, budget.Reserve(2 * 100 * 32).value()).ok());
  EXPECT_EQ(budget.used(), 6400);
  MemoryCharge dropped = tail.DropFront(30);
  dropped.Reset();
  EXPECT_EQ(budget.used(), 2 * 70 * 32);
  EXPECT_EQ(tail.first_position(), 30);
  EXPECT_EQ(std::memcmp(tail.key_row(0), &rows[30 * 8], 32), 0);
}

}  // namespace
}  // namespace kvwave::store
