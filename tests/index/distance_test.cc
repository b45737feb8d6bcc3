#include "index/distance.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "index/kmeans_assign.h"

namespace kvwave::index {
namespace {

constexpr uint32_t kSeed = 20240611;

std::vector<float> RandomVector(std::mt19937& rng, int64_t size) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(size);
  for (auto& x : v) {
    do x = dist(rng);
    while (x == 0.0f);
  }
  return v;
}

// float64 reference and the scale its float32 error is measured against (sum of |a_k b_k|).
void DotReference(const float* a, const float* b, int d, double* dot, double* scale) {
  *dot = 0.0;
  *scale = 0.0;
  for (int k = 0; k < d; ++k) {
    *dot += double{a[k]} * b[k];
    *scale += std::fabs(double{a[k]} * b[k]);
  }
}

const int kDims[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 128, 256, 300};

TEST(DistanceTest, DotMatchesFloat64) {
  std::mt19937 rng(kSeed);
  for (int d : kDims) {
    SCOPED_TRACE(testing::Message() << "seed " << kSeed << " d " << d);
    for (int rep = 0; rep < 20; ++rep) {
      const auto a = RandomVector(rng, d), b = RandomVector(rng, d);
      double ref, scale;
      DotReference(a.data(), b.data(), d, &ref, &scale);
      EXPECT_LE(std::fabs(Dot(a.data(), b.data(), d) - ref), 1e-5 * scale);
    }
  }
}

TEST(DistanceTest, DotRowsMatchesFloat64) {
  std::mt19937 rng(kSeed + 1);
  for (int d : kDims) {
    SCOPED_TRACE(testing::Message() << "seed " << kSeed + 1 << " d " << d);
    const int64_t n = 37;
    const auto q = RandomVector(rng, d), rows = RandomVector(rng, n * d);
    std::vector<float> out(n, -1.0f);
    DotRows(q.data(), rows.data(), n, d, out.data());
    for (int64_t i = 0; i < n; ++i) {
      double ref, scale;
      DotReference(q.data(), rows.data() + i * d, d, &ref, &scale);
      EXPECT_LE(std::fabs(out[i] - ref), 1e-5 * scale) << "row " << i;
    }
  }
}

TEST(DistanceTest, DotRowsMultiMatchesFloat64) {
  std::mt19937 rng(kSeed + 2);
  for (int d : kDims) {
    for (int m : {1, 2, 5}) {
      SCOPED_TRACE(testing::Message() << "seed " << kSeed + 2 << " d " << d << " m " << m);
      const int64_t n = 23;
      const auto qs = RandomVector(rng, int64_t{m} * d), rows = RandomVector(rng, n * d);
      std::vector<float> out(m * n, -1.0f);
      DotRowsMulti(qs.data(), m, rows.data(), n, d, out.data());
      for (int h = 0; h < m; ++h) {
        for (int64_t i = 0; i < n; ++i) {
          double ref, scale;
          DotReference(qs.data() + h * d, rows.data() + i * d, d, &ref, &scale);
          EXPECT_LE(std::fabs(out[h * n + i] - ref), 1e-5 * scale) << "h " << h << " i " << i;
        }
      }
    }
  }
}

// The fused GEMM + argmax kernel against a float64 scan: the chosen centroid's exact score must
// equal the best exact score (up to float32 rounding), and best_score must be that score.
TEST(KMeansAssignTest, MatchesFloat64Argmax) {
  std::mt19937 rng(kSeed + 3);
  for (int d : {1, 5, 8, 64, 128, 256}) {
    for (int c : {1, 2, 15, 16, 17, 40}) {
      for (int64_t n : {1, 5, 6, 7, 48, 49, 301}) {
        SCOPED_TRACE(testing::Message()
                     << "seed " << kSeed + 3 << " d " << d << " C " << c << " n " << n);
        const auto x = RandomVector(rng, n * d), cen = RandomVector(rng, int64_t{c} * d);
        CentroidPanels panels;
        panels.Pack(cen.data(), c, d);
        std::vector<int32_t> got(n, -1);
        std::vector<float> best(n);
        AssignMaxInnerProduct(x.data(), n, panels, got.data(), best.data());
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_GE(got[i], 0);
          ASSERT_LT(got[i], c);
          double best_ref = -1e300, chosen = 0.0, scale = 0.0, s;
          for (int j = 0; j < c; ++j) {
            double dot;
            DotReference(x.data() + i * d, cen.data() + j * d, d, &dot, &s);
            scale = std::max(scale, s);
            best_ref = std::max(best_ref, dot);
            if (j == got[i]) chosen = dot;
          }
          EXPECT_LE(best_ref - chosen, 2e-5 * scale) << "row " << i;
          EXPECT_LE(std::fabs(best[i] - chosen), 1e-5 * scale) << "row " << i;
        }
      }
    }
  }
}

TEST(KMeansAssignTest, ParallelEqualsSerial) {
  std::mt19937 rng(kSeed + 4);
  const int64_t n = 5000;
  const int d = 128, c = 333;
  const auto x = RandomVector(rng, n * d), cen = RandomVector(rng, int64_t{c} * d);
  CentroidPanels panels;
  panels.Pack(cen.data(), c, d);
  std::vector<int32_t> serial(n), parallel(n);
  std::vector<float> serial_best(n), parallel_best(n);
  AssignMaxInnerProduct(x.data(), n, panels, serial.data(), serial_best.data(), false);
  AssignMaxInnerProduct(x.data(), n, panels, parallel.data(), parallel_best.data(), true);
  EXPECT_EQ(serial, parallel);
  EXPECT_EQ(serial_best, parallel_best);
}

TEST(KMeansAssignTest, TiesGoToLowestIndex) {
  const int d = 8, c = 20;
  std::vector<float> cen(c * d, 0.5f);  // all centroids equal
  std::vector<float> x(3 * d, 1.0f);
  CentroidPanels panels;
  panels.Pack(cen.data(), c, d);
  std::vector<int32_t> got(3, -1);
  AssignMaxInnerProduct(x.data(), 3, panels, got.data(), nullptr);
  EXPECT_EQ(got, std::vector<int32_t>({0, 0, 0}));
}

// ScorePanels on a random subset of (vector, panel) pairs: each scored pair's top two against a
// float64 scan of that panel; unscored pairs untouched; with every pair scored, the best over
// panels must be AssignMaxInnerProduct's answer, bit for bit.
TEST(KMeansAssignTest, ScorePanelsMatchesFloat64AndFullAssign) {
  std::mt19937 rng(kSeed + 5);
  for (int d : {3, 64, 128}) {
    for (int c : {1, 16, 17, 70}) {
      const int64_t n = 97;
      SCOPED_TRACE(testing::Message() << "seed " << kSeed + 5 << " d " << d << " C " << c);
      const auto x = RandomVector(rng, n * d), cen = RandomVector(rng, int64_t{c} * d);
      CentroidPanels panels;
      panels.Pack(cen.data(), c, d);
      const int num_panels = panels.num_panels(), words = PanelMaskWords(num_panels);
      for (bool all : {false, true}) {
        std::vector<uint64_t> need(n * words, 0);
        for (int64_t i = 0; i < n; ++i) {
          for (int p = 0; p < num_panels; ++p) {
            if (all || rng() % 3 == 0) need[i * words + p / 64] |= uint64_t{1} << (p % 64);
          }
        }
        PanelTop2 untouched;
        untouched.index = -7;
        std::vector<PanelTop2> out(n * num_panels, untouched);
        ScorePanels(x.data(), n, panels, need.data(), out.data());
        std::vector<int32_t> assign(n);
        std::vector<float> assign_best(n);
        AssignMaxInnerProduct(x.data(), n, panels, assign.data(), assign_best.data());
        for (int64_t i = 0; i < n; ++i) {
          const PanelTop2* winner = nullptr;
          for (int p = 0; p < num_panels; ++p) {
            const PanelTop2& got = out[i * num_panels + p];
            if (((need[i * words + p / 64] >> (p % 64)) & 1) == 0) {
              EXPECT_EQ(got.index, -7);
              continue;
            }
            if (winner == nullptr || got.best > winner->best) winner = &got;
            std::vector<double> ref;
            double scale = 0.0, dot, s;
            for (int j = p * 16; j < std::min(c, p * 16 + 16); ++j) {
              DotReference(x.data() + i * d, cen.data() + int64_t{j} * d, d, &dot, &s);
              ref.push_back(dot);
              scale = std::max(scale, s);
            }
            ASSERT_GE(got.index, p * 16);
            ASSERT_LT(got.index, std::min(c, p * 16 + 16));
            std::sort(ref.rbegin(), ref.rend());
            EXPECT_LE(std::fabs(got.best - ref[0]), 1e-5 * scale) << "row " << i;
            DotReference(x.data() + i * d, cen.data() + int64_t{got.index} * d, d, &dot, &s);
            EXPECT_LE(std::fabs(got.best - dot), 1e-5 * scale) << "row " << i;
            if (ref.size() > 1) {
              EXPECT_LE(std::fabs(got.second - ref[1]), 1e-5 * scale) << "row " << i;
            } else {
              EXPECT_EQ(got.second, -std::numeric_limits<float>::infinity());
            }
          }
          if (all) {
            ASSERT_NE(winner, nullptr);
            EXPECT_EQ(winner->index, assign[i]) << "row " << i;
            EXPECT_EQ(winner->best, assign_best[i]) << "row " << i;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvwave::index
