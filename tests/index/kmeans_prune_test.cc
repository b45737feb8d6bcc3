// The bound-pruned spherical k-means must make exactly the choices of the unpruned one: same
// assignment and bit-identical centroids, on synthetic clustered data (with exact ties) and on
// real post-RoPE keys from a trace.
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "index/kmeans.h"
#include "index/wave_index.h"

namespace kvwave::index {
namespace {

constexpr uint32_t kSeed = 424242;
constexpr char kTracePath[] = "/work/shared/data/traces/dd16k_k.npy";

// n rows around `modes` random centres plus a shared offset; rows are never zero.
std::vector<float> ClusteredRows(uint32_t seed, int64_t n, int d, int modes, float noise) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> centres(static_cast<size_t>(modes) * d), offset(d), rows(n * d);
  for (auto& v : centres) v = normal(rng);
  for (auto& v : offset) v = normal(rng);
  for (int64_t i = 0; i < n; ++i) {
    const int mode = static_cast<int>(rng() % modes);
    for (int k = 0; k < d; ++k) {
      const float v = offset[k] + centres[mode * d + k] + noise * normal(rng);
      rows[i * d + k] = v == 0.0f ? 1e-3f : v;
    }
  }
  return rows;
}

std::vector<float> Normalized(std::vector<float> rows, int64_t n, int d) {
  for (int64_t i = 0; i < n; ++i) {
    double sq = 0.0;
    for (int k = 0; k < d; ++k) sq += double{rows[i * d + k]} * rows[i * d + k];
    const double inv = 1.0 / std::sqrt(sq);
    for (int k = 0; k < d; ++k) rows[i * d + k] = static_cast<float>(rows[i * d + k] * inv);
  }
  return rows;
}

struct KMeansRun {
  std::vector<float> centroids;
  std::vector<int32_t> assignment;
  std::vector<KMeansPassStats> stats;
};

KMeansRun KMeans(const std::vector<float>& unit, int64_t n, int d, int clusters, int iterations,
                 bool prune) {
  KMeansRun run;
  for (int c = 0; c < clusters; ++c) {
    const int64_t token = int64_t{c} * n / clusters;
    run.centroids.insert(run.centroids.end(), unit.begin() + token * d,
                         unit.begin() + (token + 1) * d);
  }
  EXPECT_TRUE(SphericalKMeansOwn(unit.data(), n, d, iterations, &run.centroids, &run.assignment,
                                 prune, &run.stats)
                  .ok());
  return run;
}

// Pruned vs unpruned on one data set; returns the pruned run's scored fraction of all pairs.
double ExpectSameAsUnpruned(const std::vector<float>& unit, int64_t n, int d, int clusters,
                            int iterations) {
  const KMeansRun pruned = KMeans(unit, n, d, clusters, iterations, true);
  const KMeansRun full = KMeans(unit, n, d, clusters, iterations, false);
  EXPECT_EQ(pruned.assignment, full.assignment);
  EXPECT_EQ(pruned.centroids, full.centroids);  // bit-identical: same members, same order
  // A pruned pass that finds convergence is followed by one full (final) pass.
  EXPECT_GE(pruned.stats.size(), full.stats.size());
  EXPECT_LE(pruned.stats.size(), full.stats.size() + 1);
  EXPECT_TRUE(!pruned.stats.empty() && pruned.stats.back().full) << "final pass must be full";
  const double panels = (clusters + 15) / 16;
  double scored = 0.0;
  for (const KMeansPassStats& pass : pruned.stats) scored += pass.scored_pairs / (n * panels);
  return scored / static_cast<double>(pruned.stats.size());
}

TEST(KMeansPruneTest, SameAsUnprunedOnClusteredData) {
  struct Case {
    int64_t n;
    int d, modes, clusters, iterations;
    float noise;
  };
  const Case cases[] = {{2048, 128, 40, 128, 10, 0.5f}, {3000, 64, 200, 188, 10, 0.3f},
                        {1000, 17, 10, 63, 7, 1.0f},    {500, 128, 5, 500, 3, 0.2f},
                        {777, 96, 30, 1, 4, 0.5f},      {4096, 128, 64, 256, 25, 0.8f},
                        {300, 8, 3, 40, 2, 2.0f},       {1200, 256, 50, 75, 1, 0.4f}};
  uint32_t seed = kSeed;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "seed " << seed << " n " << c.n << " d " << c.d
                                    << " clusters " << c.clusters << " iters " << c.iterations);
    const auto unit = Normalized(ClusteredRows(seed++, c.n, c.d, c.modes, c.noise), c.n, c.d);
    ExpectSameAsUnpruned(unit, c.n, c.d, c.clusters, c.iterations);
  }
}

// Exact duplicates make exact score ties between equal centroids: the lowest index must win in
// both runs.
TEST(KMeansPruneTest, SameAsUnprunedWithDuplicateRows) {
  const int64_t n = 1600;
  const int d = 32;
  auto unit = Normalized(ClusteredRows(kSeed + 50, n, d, 12, 0.6f), n, d);
  for (int64_t i = 1; i < n; i += 3) std::copy_n(&unit[(i - 1) * d], d, &unit[i * d]);
  SCOPED_TRACE(testing::Message() << "seed " << kSeed + 50);
  ExpectSameAsUnpruned(unit, n, d, 100, 10);
}

// Guards the point of the exercise: the bounds must actually skip work on clustered data.
TEST(KMeansPruneTest, PruningSkipsMostPairsOnSeparatedClusters) {
  const int64_t n = 4096;
  const int d = 64;
  const auto unit = Normalized(ClusteredRows(kSeed + 60, n, d, 64, 0.2f), n, d);
  SCOPED_TRACE(testing::Message() << "seed " << kSeed + 60);
  const KMeansRun pruned = KMeans(unit, n, d, 256, 10, true);
  const double panels = 16;
  ASSERT_GE(pruned.stats.size(), 4u);
  // Passes 0, 1 and the final pass score everything; the ones between must score less.
  for (size_t pass = 2; pass + 1 < pruned.stats.size(); ++pass) {
    EXPECT_LT(pruned.stats[pass].scored_pairs, 0.5 * n * panels) << "pass " << pass;
  }
}

TEST(KMeansPruneTest, WaveIndexOptionPruneGivesSameClusters) {
  const int64_t n = 2500;
  const int d = 128;
  const auto keys = ClusteredRows(kSeed + 70, n, d, 60, 0.5f);
  WaveIndexOptions pruned_options, full_options;
  full_options.prune = false;
  auto pruned = ClusterKeys(keys.data(), n, d, pruned_options);
  auto full = ClusterKeys(keys.data(), n, d, full_options);
  ASSERT_TRUE(pruned.ok() && full.ok());
  EXPECT_EQ(pruned->assignment, full->assignment);
  EXPECT_EQ(pruned->sizes, full->sizes);
  EXPECT_EQ(pruned->centroids, full->centroids);
}

// Reads the float16 key trace of shape (layers, tokens, 1, d); false if absent or unexpected.
bool ReadTraceKeys(int64_t* layers, int64_t* tokens, int* d, std::vector<float>* keys) {
  std::ifstream file(kTracePath, std::ios::binary);
  if (!file) return false;
  const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0 || bytes[6] != 1) return false;
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
  const std::string header = bytes.substr(10, header_len);
  if (header.find("'<f2'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos ||
      header.find("(3, 16384, 1, 128)") == std::string::npos) {
    return false;
  }
  *layers = 3, *tokens = 16384, *d = 128;
  const size_t count = static_cast<size_t>(*layers * *tokens * *d);
  if (bytes.size() < 10 + header_len + 2 * count) return false;
  const auto* half = reinterpret_cast<const uint8_t*>(bytes.data() + 10 + header_len);
  keys->resize(count);
  for (size_t i = 0; i < count; ++i) {
    (*keys)[i] = _cvtsh_ss(static_cast<uint16_t>(half[2 * i] | half[2 * i + 1] << 8));
  }
  return true;
}

TEST(KMeansPruneTest, SameAsUnprunedOnTraceKeys) {
  int64_t layers = 0, tokens = 0;
  int d = 0;
  std::vector<float> keys;
  if (!ReadTraceKeys(&layers, &tokens, &d, &keys)) GTEST_SKIP() << kTracePath << " not found";
  const int64_t segment = 8192;
  for (int64_t layer = 0; layer < layers; ++layer) {
    for (int64_t first = 0; first + segment <= tokens; first += segment) {
      SCOPED_TRACE(testing::Message() << "layer " << layer << " tokens " << first << "..");
      const float* seg = keys.data() + (layer * tokens + first) * d;
      WaveIndexOptions pruned_options, full_options;
      full_options.prune = false;
      auto pruned = ClusterKeys(seg, segment, d, pruned_options);
      auto full = ClusterKeys(seg, segment, d, full_options);
      ASSERT_TRUE(pruned.ok() && full.ok());
      EXPECT_EQ(pruned->assignment, full->assignment);
      EXPECT_EQ(pruned->centroids, full->centroids);
    }
  }
}

}  // namespace
}  // namespace kvwave::index
