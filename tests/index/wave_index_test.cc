#include "index/wave_index.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "index/kmeans.h"

namespace kvwave::index {
namespace {

using Kernel = WaveIndexOptions::Kernel;
constexpr uint32_t kSeed = 777001;

// n keys around `modes` random centres (plus a common offset, as real keys have), never zero.
std::vector<float> ClusteredKeys(uint32_t seed, int64_t n, int d, int modes, float noise) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> centres(static_cast<size_t>(modes) * d), offset(d), keys(n * d);
  for (auto& v : centres) v = normal(rng);
  for (auto& v : offset) v = 3.0f * normal(rng);
  for (int64_t i = 0; i < n; ++i) {
    const int mode = static_cast<int>(rng() % modes);
    for (int k = 0; k < d; ++k) {
      float v = offset[k] + centres[mode * d + k] + noise * normal(rng);
      keys[i * d + k] = v == 0.0f ? 1e-3f : v;
    }
  }
  return keys;
}

// Checks the structural contract of a clustering and that centroids are float64 member means.
void ExpectValidClustering(const std::vector<float>& keys, int64_t n, int d, int tpc,
                           const WaveClusters& w) {
  ASSERT_EQ(w.num_clusters, (n + tpc - 1) / tpc);
  ASSERT_EQ(static_cast<int64_t>(w.assignment.size()), n);
  ASSERT_EQ(static_cast<int32_t>(w.sizes.size()), w.num_clusters);
  ASSERT_EQ(static_cast<int64_t>(w.centroids.size()), int64_t{w.num_clusters} * d);
  std::vector<int32_t> counts(w.num_clusters, 0);
  std::vector<double> sums(w.centroids.size(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = w.assignment[i];
    ASSERT_GE(c, 0);
    ASSERT_LT(c, w.num_clusters);
    ++counts[c];
    for (int k = 0; k < d; ++k) sums[int64_t{c} * d + k] += keys[i * d + k];
  }
  int64_t total = 0;
  for (int32_t c = 0; c < w.num_clusters; ++c) {
    EXPECT_EQ(w.sizes[c], counts[c]) << "cluster " << c;
    total += w.sizes[c];
    double err = 0.0, norm = 0.0;
    for (int k = 0; k < d; ++k) {
      const double mean = counts[c] > 0 ? sums[int64_t{c} * d + k] / counts[c] : 0.0;
      const double got = w.centroids[int64_t{c} * d + k];
      err += (got - mean) * (got - mean);
      norm += mean * mean;
    }
    if (counts[c] == 0) {
      EXPECT_EQ(err, 0.0) << "empty cluster " << c << " must have a zero centroid";
    } else {
      EXPECT_LE(std::sqrt(err), 1e-6 * std::sqrt(norm)) << "cluster " << c;
    }
  }
  EXPECT_EQ(total, n);
}

// Mean cosine of each centred key to its (centred) reported centroid.
double Objective(const std::vector<float>& keys, int64_t n, int d, const WaveClusters& w) {
  std::vector<double> mu(d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < d; ++k) mu[k] += keys[i * d + k] / n;
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double xy = 0, xx = 0, yy = 0;
    for (int k = 0; k < d; ++k) {
      const double x = keys[i * d + k] - mu[k];
      const double y = w.centroids[int64_t{w.assignment[i]} * d + k] - mu[k];
      xy += x * y, xx += x * x, yy += y * y;
    }
    if (xx > 0 && yy > 0) total += xy / std::sqrt(xx * yy);
  }
  return total / n;
}

WaveIndexOptions Options(Kernel kernel, int tpc = 16) {
  WaveIndexOptions options;
  options.kernel = kernel;
  options.tokens_per_cluster = tpc;
  return options;
}

class WaveIndexKernelTest : public testing::TestWithParam<Kernel> {};

TEST_P(WaveIndexKernelTest, ValidClusteringAndMeans) {
  SCOPED_TRACE(testing::Message() << "seed " << kSeed);
  const int64_t n = 2000;
  const int d = 128;
  const auto keys = ClusteredKeys(kSeed, n, d, 50, 0.3f);
  auto w = ClusterKeys(keys.data(), n, d, Options(GetParam()));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->num_clusters, 125);
  ExpectValidClustering(keys, n, d, 16, *w);
}

TEST_P(WaveIndexKernelTest, Deterministic) {
  const int64_t n = 3000;
  const int d = 64;
  const auto keys = ClusteredKeys(kSeed + 1, n, d, 30, 0.5f);
  auto a = ClusterKeys(keys.data(), n, d, Options(GetParam()));
  auto b = ClusterKeys(keys.data(), n, d, Options(GetParam()));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->assignment, b->assignment);
  EXPECT_EQ(a->sizes, b->sizes);
  EXPECT_EQ(a->centroids, b->centroids);
}

TEST_P(WaveIndexKernelTest, OddSizes) {
  struct Case {
    int64_t n;
    int d;
    int tpc;
  };
  const Case cases[] = {{1, 128, 16}, {17, 128, 16}, {15, 64, 16}, {100, 256, 16}, {33, 3, 16},
                        {16, 1, 16},  {50, 64, 1},   {50, 64, 7},  {2500, 64, 16}, {999, 256, 64}};
  uint32_t seed = kSeed + 100;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message()
                 << "seed " << seed << " n " << c.n << " d " << c.d << " tpc " << c.tpc);
    const auto keys = ClusteredKeys(seed++, c.n, c.d, 5, 0.5f);
    auto w = ClusterKeys(keys.data(), c.n, c.d, Options(GetParam(), c.tpc));
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectValidClustering(keys, c.n, c.d, c.tpc, *w);
  }
}

TEST_P(WaveIndexKernelTest, SingleKeyIsItsOwnCentroid) {
  const std::vector<float> key = {0.5f, -1.25f, 3.0f, 7.5f};
  auto w = ClusterKeys(key.data(), 1, 4, Options(GetParam()));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->num_clusters, 1);
  EXPECT_EQ(w->assignment, std::vector<int32_t>({0}));
  EXPECT_EQ(w->sizes, std::vector<int32_t>({1}));
  EXPECT_EQ(w->centroids, key);
}

// One token per cluster: every key starts as its own centroid and must stay there.
TEST_P(WaveIndexKernelTest, OneTokenPerClusterIsIdentity) {
  const int64_t n = 40;
  const auto keys = ClusteredKeys(kSeed + 2, n, 32, 40, 1.0f);
  auto w = ClusterKeys(keys.data(), n, 32, Options(GetParam(), 1));
  ASSERT_TRUE(w.ok()) << w.status();
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(w->assignment[i], i);
}

TEST_P(WaveIndexKernelTest, RecoversSeparatedModes) {
  // 8 well separated modes, 2 clusters' worth of tokens each: no cluster may mix modes.
  const int64_t n = 256;
  const int d = 64;
  std::mt19937 rng(kSeed + 3);
  std::normal_distribution<float> normal;
  std::vector<float> keys(n * d);
  std::vector<int> mode(n);
  for (int64_t i = 0; i < n; ++i) {
    mode[i] = static_cast<int>(i % 8);
    for (int k = 0; k < d; ++k) {
      keys[i * d + k] = (k % 8 == mode[i] ? 10.0f : 0.0f) + 0.1f * normal(rng) + 0.01f;
    }
  }
  auto w = ClusterKeys(keys.data(), n, d, Options(GetParam()));
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<int> cluster_mode(w->num_clusters, -1);
  for (int64_t i = 0; i < n; ++i) {
    int& m = cluster_mode[w->assignment[i]];
    if (m < 0) m = mode[i];
    EXPECT_EQ(m, mode[i]) << "token " << i;
  }
  EXPECT_GT(Objective(keys, n, d, *w), 0.9);
}

INSTANTIATE_TEST_SUITE_P(Kernels, WaveIndexKernelTest,
                         testing::Values(Kernel::kOwn, Kernel::kFaiss),
                         [](const testing::TestParamInfo<Kernel>& info) {
                           return info.param == Kernel::kOwn ? "Own" : "Faiss";
                         });

TEST(WaveIndexTest, KernelsReachSimilarObjective) {
  SCOPED_TRACE(testing::Message() << "seed " << kSeed + 4);
  const int64_t n = 2048;
  const int d = 128;
  const auto keys = ClusteredKeys(kSeed + 4, n, d, 100, 0.4f);
  auto own = ClusterKeys(keys.data(), n, d, Options(Kernel::kOwn));
  auto faiss = ClusterKeys(keys.data(), n, d, Options(Kernel::kFaiss));
  ASSERT_TRUE(own.ok() && faiss.ok());
  const double own_obj = Objective(keys, n, d, *own), faiss_obj = Objective(keys, n, d, *faiss);
  EXPECT_GT(own_obj, 0.8);
  EXPECT_NEAR(own_obj, faiss_obj, 0.02);
}

// The k-means layer directly: the final assignment is the argmax over the final centroids, and
// zero iterations assign to the initial centroids.
TEST(WaveIndexTest, FinalAssignmentIsArgmaxOfFinalCentroids) {
  const int64_t n = 700;
  const int d = 48;
  auto unit = ClusteredKeys(kSeed + 5, n, d, 20, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    double norm = 0;
    for (int k = 0; k < d; ++k) norm += double{unit[i * d + k]} * unit[i * d + k];
    for (int k = 0; k < d; ++k)
      unit[i * d + k] = static_cast<float>(unit[i * d + k] / std::sqrt(norm));
  }
  for (int iterations : {0, 3}) {
    std::vector<float> centroids(unit.begin(), unit.begin() + 44 * d);
    std::vector<int32_t> assignment;
    ASSERT_TRUE(SphericalKMeansOwn(unit.data(), n, d, iterations, &centroids, &assignment).ok());
    if (iterations == 0) {
      EXPECT_TRUE(std::equal(centroids.begin(), centroids.end(), unit.begin()));
    }
    for (int64_t i = 0; i < n; ++i) {
      double best = -1e300, chosen = 0;
      for (int c = 0; c < 44; ++c) {
        double dot = 0;
        for (int k = 0; k < d; ++k) dot += double{unit[i * d + k]} * centroids[c * d + k];
        best = std::max(best, dot);
        if (c == assignment[i]) chosen = dot;
      }
      EXPECT_LE(best - chosen, 1e-5) << "iterations " << iterations << " token " << i;
    }
  }
}

TEST(WaveIndexTest, BadArguments) {
  const std::vector<float> keys(64 * 8, 1.0f);
  EXPECT_FALSE(ClusterKeys(keys.data(), 0, 8, {}).ok());
  EXPECT_FALSE(ClusterKeys(keys.data(), -5, 8, {}).ok());
  EXPECT_FALSE(ClusterKeys(keys.data(), 64, 0, {}).ok());
  EXPECT_FALSE(ClusterKeys(nullptr, 64, 8, {}).ok());
  WaveIndexOptions bad;
  bad.tokens_per_cluster = 0;
  EXPECT_FALSE(ClusterKeys(keys.data(), 64, 8, bad).ok());
  bad = {};
  bad.iterations = -1;
  EXPECT_FALSE(ClusterKeys(keys.data(), 64, 8, bad).ok());
  std::vector<float> nan_keys = keys;
  nan_keys[77] = std::numeric_limits<float>::quiet_NaN();
  const auto status = ClusterKeys(nan_keys.data(), 64, 8, {}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  nan_keys[77] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(ClusterKeys(nan_keys.data(), 64, 8, {}).ok());
  EXPECT_TRUE(ClusterKeys(keys.data(), 64, 8, {}).ok());  // identical keys are fine
}

}  // namespace
}  // namespace kvwave::index
