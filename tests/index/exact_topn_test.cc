// Tests of the blocked exact top-N (index/exact_topn.h): against a float64 reference on random
// data over shapes that exercise every remainder (queries not a multiple of the 6-query tile or
// the 96-query block, keys not a multiple of the 16-key panel or the 512-key block, odd dims),
// equal to the previous row-wise kernel, ties by index, rising scores (the running top-N's buffer
// compacted many times), and argument errors. Printed seeds;
// KVWAVE_TEST_SEED overrides them.
#include "index/exact_topn.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

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
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < d; ++j) rows[i * d + j] = normal(*rng) + (j % 4 == 0 ? shift : 0.0f);
  }
  return rows;
}

// Scores in float64, best first, ties by lower index.
std::vector<std::pair<double, int32_t>> ReferenceScores(const std::vector<float>& keys, int64_t n,
                                                        int d, const float* q) {
  std::vector<std::pair<double, int32_t>> scored;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += double{q[j]} * keys[i * d + j];
    scored.emplace_back(s, static_cast<int32_t>(i));
  }
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  return scored;
}

// (keys, queries, dim, N)
class ExactTopNTest : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int, int>> {};

TEST_P(ExactTopNTest, MatchesFloat64ReferenceAndTheRowwiseKernel) {
  const auto [n, m, d, nn] = GetParam();
  std::mt19937_64 rng(Seed(100 + n + m + d + nn));
  const std::vector<float> keys = RandomRows(n, d, &rng, 0.0f);
  const std::vector<float> queries = RandomRows(m, d, &rng, 0.8f);  // shifted: OOD queries
  std::vector<int32_t> blocked(static_cast<size_t>(m * nn), -1), rowwise = blocked;
  ASSERT_TRUE(ExactTopN(keys.data(), n, queries.data(), m, d, nn, blocked.data()).ok());
  ASSERT_TRUE(ExactTopNRowwise(keys.data(), n, queries.data(), m, d, nn, rowwise.data()).ok());
  int64_t mismatches = 0;
  for (int64_t i = 0; i < m; ++i) {
    const auto ref = ReferenceScores(keys, n, d, queries.data() + i * d);
    for (int r = 0; r < nn; ++r) {
      const int32_t got = blocked[i * nn + r];
      ASSERT_GE(got, 0);
      ASSERT_LT(got, n);
      if (got == ref[r].second) continue;
      // float32 rounding may swap keys whose float64 scores differ by ~1 ulp of the sum only.
      double got_score = 0;
      for (int j = 0; j < d; ++j) got_score += double{queries[i * d + j]} * keys[got * d + j];
      EXPECT_NEAR(got_score, ref[r].first, 1e-4 * (1 + std::abs(ref[r].first)))
          << "query " << i << " rank " << r;
      ++mismatches;
    }
  }
  EXPECT_LE(mismatches, m * nn / 1000 + 2);  // rare near-ties only
  // The two kernels round differently, so they may order near-ties differently too.
  int64_t differ = 0;
  for (size_t i = 0; i < blocked.size(); ++i) differ += blocked[i] != rowwise[i];
  EXPECT_LE(differ, m * nn / 1000 + 2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExactTopNTest,
    ::testing::Values(std::make_tuple(1, 1, 1, 1), std::make_tuple(17, 7, 8, 5),
                      std::make_tuple(600, 101, 128, 100), std::make_tuple(1100, 200, 64, 16),
                      std::make_tuple(533, 97, 13, 533), std::make_tuple(2000, 5, 128, 1)));

TEST(ExactTopNTieTest, EqualScoresRankTheLowerKeyFirst) {
  const int d = 8;
  const int64_t n = 1030, m = 13;
  std::vector<float> keys(static_cast<size_t>(n * d), 0.0f), queries(m * d, 1.0f);
  for (int64_t i = 0; i < n; ++i) keys[i * d] = static_cast<float>(i % 3);  // scores 0, 1, 2
  std::vector<int32_t> out(static_cast<size_t>(m * 20));
  ASSERT_TRUE(ExactTopN(keys.data(), n, queries.data(), m, d, 20, out.data()).ok());
  for (int64_t i = 0; i < m; ++i) {
    for (int r = 0; r < 20; ++r) EXPECT_EQ(out[i * 20 + r], 2 + 3 * r) << i << " " << r;
  }
}

// Scores that rise with the key index: every key beats the running threshold, so the buffer
// fills and is compacted again and again; the answer is still the last N keys, best first.
TEST(ExactTopNTieTest, RisingScoresAreSelectedExactly) {
  const int d = 16, nn = 37;
  const int64_t n = 5000, m = 7;
  std::vector<float> keys(static_cast<size_t>(n * d), 0.0f), queries(m * d, 0.0f);
  for (int64_t i = 0; i < n; ++i) keys[i * d + 3] = static_cast<float>(i);
  for (int64_t i = 0; i < m; ++i) queries[i * d + 3] = 1.0f + static_cast<float>(i);
  std::vector<int32_t> out(static_cast<size_t>(m * nn));
  ASSERT_TRUE(ExactTopN(keys.data(), n, queries.data(), m, d, nn, out.data()).ok());
  for (int64_t i = 0; i < m; ++i) {
    for (int r = 0; r < nn; ++r) EXPECT_EQ(out[i * nn + r], n - 1 - r) << i << " " << r;
  }
}

TEST(ExactTopNArgsTest, RejectsBadArguments) {
  std::vector<float> v(64, 1.0f);
  std::vector<int32_t> out(64);
  EXPECT_FALSE(ExactTopN(v.data(), 0, v.data(), 1, 8, 1, out.data()).ok());
  EXPECT_FALSE(ExactTopN(v.data(), 4, v.data(), 0, 8, 1, out.data()).ok());
  EXPECT_FALSE(ExactTopN(v.data(), 4, v.data(), 1, 0, 1, out.data()).ok());
  EXPECT_FALSE(ExactTopN(v.data(), 4, v.data(), 1, 8, 5, out.data()).ok());
  EXPECT_FALSE(ExactTopN(v.data(), 4, v.data(), 1, 8, 0, out.data()).ok());
  EXPECT_FALSE(ExactTopNRowwise(v.data(), 4, v.data(), 1, 8, 5, out.data()).ok());
}

}  // namespace
}  // namespace kvwave::index
