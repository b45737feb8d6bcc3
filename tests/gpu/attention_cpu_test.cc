// Tests of the CPU reference backend (gpu/attention_cpu.h) against float64 references computed
// in this file, on fresh random non-zero inputs. Every test prints its seed; set KVWAVE_TEST_SEED
// to replay one.
#include "gpu/attention_cpu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "config/dtype.h"
#include "gpu/simd_avx2.h"

namespace kvwave::gpu::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

uint32_t FreshSeed() {
  uint32_t seed = std::random_device{}();
  if (const char* env = std::getenv("KVWAVE_TEST_SEED")) seed = std::strtoul(env, nullptr, 10);
  std::cout << "[ seed     ] KVWAVE_TEST_SEED=" << seed << "\n";
  return seed;
}

// Normal samples; never exactly zero in practice, and rejected if they are.
std::vector<float> RandomNormal(std::mt19937& rng, size_t n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> x(n);
  for (float& e : x) {
    do e = dist(rng);
    while (e == 0.0f);
  }
  return x;
}

// Keys and values of `rows` tokens stored as `type`, plus the float32 values of what is stored
// (the inputs the float64 reference sees). Values have a non-zero mean per column so the output
// does not cancel to near zero.
struct KvRows {
  DType type = DType::kF32;
  int64_t rows = 0;
  std::vector<uint8_t> k_raw, v_raw;
  std::vector<float> k, v;

  KvSpan Span() const { return KvSpan{k_raw.data(), v_raw.data(), rows}; }
};

KvRows MakeRows(std::mt19937& rng, int64_t rows, int d, DType type,
                const std::vector<float>& v_mean) {
  KvRows kv;
  kv.type = type;
  kv.rows = rows;
  const size_t n = static_cast<size_t>(rows) * d;
  std::vector<float> k = RandomNormal(rng, n, 1.0f);
  std::vector<float> v = RandomNormal(rng, n, 0.5f);
  for (size_t i = 0; i < n; ++i) v[i] += v_mean[i % d];
  kv.k_raw.resize(n * ElementSize(type) + 1);  // +1: never a zero-byte vector
  kv.v_raw.resize(n * ElementSize(type) + 1);
  kv.k.resize(n);
  kv.v.resize(n);
  if (n == 0) return kv;  // memcpy from an empty vector's null data() is undefined
  FromFloat(k.data(), type, kv.k_raw.data(), n);
  FromFloat(v.data(), type, kv.v_raw.data(), n);
  ToFloat(kv.k_raw.data(), type, kv.k.data(), n);
  ToFloat(kv.v_raw.data(), type, kv.v.data(), n);
  return kv;
}

std::vector<float> ValueMean(std::mt19937& rng, int d) {
  std::uniform_real_distribution<float> mag(0.5f, 1.5f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> m(d);
  for (float& e : m) e = sign(rng) ? mag(rng) : -mag(rng);
  return m;
}

struct RefResult {
  std::vector<double> out;  // [g x d]
  std::vector<double> lse;  // [g]
};

// float64 attention of g heads over the rows of every KvRows in `sets`, with weights
// mult_i * exp(s_i) and value rows scaled by vscale_i (both 1 for plain attention).
RefResult ReferenceAttention(const std::vector<float>& q, int g, int d, float scale,
                             const std::vector<const float*>& keys,
                             const std::vector<const float*>& values,
                             const std::vector<double>& mult, const std::vector<double>& vscale) {
  RefResult r{std::vector<double>(static_cast<size_t>(g) * d, 0.0), std::vector<double>(g, -kInf)};
  const size_t n = keys.size();
  for (int h = 0; h < g; ++h) {
    std::vector<double> s(n);
    double m = -kInf;
    for (size_t i = 0; i < n; ++i) {
      double dot = 0.0;
      for (int c = 0; c < d; ++c) dot += double{q[h * d + c]} * double{keys[i][c]};
      s[i] = double{scale} * dot;
      if (mult[i] > 0) m = std::max(m, s[i]);
    }
    if (m == -kInf) continue;
    double den = 0.0;
    for (size_t i = 0; i < n; ++i) {
      if (mult[i] <= 0) continue;
      const double e = std::exp(s[i] - m);
      den += mult[i] * e;
      for (int c = 0; c < d; ++c) r.out[h * d + c] += mult[i] * vscale[i] * e * values[i][c];
    }
    for (int c = 0; c < d; ++c) r.out[h * d + c] /= den;
    r.lse[h] = m + std::log(den);
  }
  return r;
}

RefResult ReferenceExact(const std::vector<float>& q, int g, int d, float scale,
                         const std::vector<const KvRows*>& sets) {
  std::vector<const float*> keys, values;
  for (const KvRows* kv : sets) {
    for (int64_t i = 0; i < kv->rows; ++i) {
      keys.push_back(kv->k.data() + i * d);
      values.push_back(kv->v.data() + i * d);
    }
  }
  const std::vector<double> ones(keys.size(), 1.0);
  return ReferenceAttention(q, g, d, scale, keys, values, ones, ones);
}

// max over heads of ||out_h - ref_h|| / ||ref_h||; NaN if any term is NaN.
double OutRelError(const float* out, const std::vector<double>& ref, int g, int d) {
  double worst = 0.0;
  for (int h = 0; h < g; ++h) {
    double num = 0.0, den = 0.0;
    for (int c = 0; c < d; ++c) {
      const double diff = double{out[h * d + c]} - ref[h * d + c];
      num += diff * diff;
      den += ref[h * d + c] * ref[h * d + c];
    }
    const double err = std::sqrt(num / den);
    if (!(err <= worst)) worst = err;  // a NaN error wins
  }
  return worst;
}

// max over heads of |lse_h - ref_h| / max(1, |ref_h|); NaN if any term is NaN.
double LseRelError(const float* lse, const std::vector<double>& ref, int g) {
  double worst = 0.0;
  for (int h = 0; h < g; ++h) {
    const double err = lse[h] == ref[h]
                           ? 0.0  // both -inf for an empty head
                           : std::abs(lse[h] - ref[h]) / std::max(1.0, std::abs(ref[h]));
    if (!(err <= worst)) worst = err;  // a NaN error wins
  }
  return worst;
}

// Checks (out, lse) errors against their bounds and prints them, so the margins are visible.
void ExpectErrors(const std::string& what, double out_err, double out_bound, double lse_err,
                  double lse_bound) {
  std::cout << "[ error    ] " << what << ": out " << out_err << " (bound " << out_bound
            << "), lse " << lse_err << " (bound " << lse_bound << ")\n";
  EXPECT_LT(out_err, out_bound) << what;
  EXPECT_LT(lse_err, lse_bound) << what;
}

// ---------------------------------------------------------------------------------------------
// Exact attention over D x g x dtype.

using ExactParam = std::tuple<int, int, DType>;

class ExactAttentionTest : public ::testing::TestWithParam<ExactParam> {};

TEST_P(ExactAttentionTest, MatchesFloat64OnRoundedInputs) {
  const auto [d, g, type] = GetParam();
  std::mt19937 rng(FreshSeed());
  const std::vector<float> v_mean = ValueMean(rng, d);
  // Span sizes cross the 32-row blocks and include empty spans.
  const std::vector<int64_t> sizes = {0, 1, 37, 0, 64, 203, 5, 0};
  std::vector<KvRows> rows;
  for (int64_t n : sizes) rows.push_back(MakeRows(rng, n, d, type, v_mean));
  std::vector<KvSpan> spans;
  std::vector<const KvRows*> sets;
  for (const KvRows& kv : rows) {
    spans.push_back(kv.Span());
    sets.push_back(&kv);
  }
  const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(g) * d, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  std::vector<float> out(static_cast<size_t>(g) * d, 123.0f), lse(g, 123.0f);
  ASSERT_TRUE(ExactAttention(q.data(), g, d, scale, type, spans, out.data(), lse.data()).ok());
  const RefResult ref = ReferenceExact(q, g, d, scale, sets);
  ExpectErrors(absl::StrCat("d=", d, " g=", g, " ", std::string(DTypeName(type))),
               OutRelError(out.data(), ref.out, g, d), 1e-5, LseRelError(lse.data(), ref.lse, g),
               1e-6);
}

INSTANTIATE_TEST_SUITE_P(
    AllShapes, ExactAttentionTest,
    ::testing::Combine(::testing::Values(64, 128, 256), ::testing::Values(1, 4, 8),
                       ::testing::Values(DType::kF32, DType::kBF16, DType::kF16)),
    [](const ::testing::TestParamInfo<ExactParam>& info) {
      return absl::StrCat("d", std::get<0>(info.param), "_g", std::get<1>(info.param), "_",
                          std::string(DTypeName(std::get<2>(info.param))));
    });

TEST(ExactAttention, StableWithLargeScores) {
  // Scores above 88 overflow a float32 exp() without the running maximum: each head is rescaled
  // so that its largest score is 150.
  const int d = 128, g = 4, n = 500;
  std::mt19937 rng(FreshSeed());
  const KvRows kv = MakeRows(rng, n, d, DType::kF32, ValueMean(rng, d));
  std::vector<float> q = RandomNormal(rng, static_cast<size_t>(g) * d, 1.0f);
  for (int h = 0; h < g; ++h) {
    double best = 0.0;
    for (int i = 0; i < n; ++i) {
      double dot = 0.0;
      for (int c = 0; c < d; ++c) dot += double{q[h * d + c]} * kv.k[i * d + c];
      best = std::max(best, dot);
    }
    ASSERT_GT(best, 0.0);
    for (int c = 0; c < d; ++c) q[h * d + c] *= static_cast<float>(150.0 / best);
  }
  const float scale = 1.0f;
  std::vector<KvSpan> spans = {kv.Span()};
  std::vector<float> out(g * d), lse(g);
  ASSERT_TRUE(
      ExactAttention(q.data(), g, d, scale, DType::kF32, spans, out.data(), lse.data()).ok());
  const RefResult ref = ReferenceExact(q, g, d, scale, {&kv});
  for (int h = 0; h < g; ++h) ASSERT_GT(ref.lse[h], 140.0) << "scores not large enough";
  // s carries an absolute float32 error ~|s| * 6e-8 ~ 1e-5, so the weights are good to ~1e-5.
  ExpectErrors("large scores", OutRelError(out.data(), ref.out, g, d), 2e-5,
               LseRelError(lse.data(), ref.lse, g), 1e-6);
}

TEST(ExactAttention, EmptyInputGivesZeroAndMinusInfinity) {
  const int d = 64, g = 4;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  for (const std::vector<KvSpan>& spans :
       {std::vector<KvSpan>{}, std::vector<KvSpan>{{nullptr, nullptr, 0}, {nullptr, nullptr, 0}}}) {
    std::vector<float> out(g * d, 7.0f), lse(g, 7.0f);
    ASSERT_TRUE(
        ExactAttention(q.data(), g, d, 0.125f, DType::kBF16, spans, out.data(), lse.data()).ok());
    for (float o : out) EXPECT_EQ(o, 0.0f);
    for (float l : lse) EXPECT_EQ(l, -INFINITY);
  }
}

TEST(ExactAttention, RejectsBadArguments) {
  const int d = 64, g = 2;
  std::mt19937 rng(FreshSeed());
  const KvRows kv = MakeRows(rng, 10, d, DType::kF16, ValueMean(rng, d));
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  std::vector<float> out(g * d), lse(g);
  const std::vector<KvSpan> good = {kv.Span()};
  auto run = [&](const float* qp, int gg, int dd, DType t, std::vector<KvSpan> spans, float* o,
                 float* l) { return ExactAttention(qp, gg, dd, 0.1f, t, spans, o, l); };
  EXPECT_TRUE(run(q.data(), g, d, DType::kF16, good, out.data(), lse.data()).ok());
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(run(nullptr, g, d, DType::kF16, good, out.data(), lse.data()).code(), kInvalid);
  EXPECT_EQ(run(q.data(), 0, d, DType::kF16, good, out.data(), lse.data()).code(), kInvalid);
  EXPECT_EQ(run(q.data(), g, 0, DType::kF16, good, out.data(), lse.data()).code(), kInvalid);
  EXPECT_EQ(run(q.data(), 1, 12, DType::kF16, good, out.data(), lse.data()).code(), kInvalid);
  EXPECT_EQ(run(q.data(), g, d, DType::kF16, good, nullptr, lse.data()).code(), kInvalid);
  EXPECT_EQ(run(q.data(), g, d, DType::kF16, good, out.data(), nullptr).code(), kInvalid);
  EXPECT_EQ(run(q.data(), g, d, static_cast<DType>(9), good, out.data(), lse.data()).code(),
            kInvalid);
  EXPECT_EQ(
      run(q.data(), g, d, DType::kF16, {{nullptr, kv.v_raw.data(), 3}}, out.data(), lse.data())
          .code(),
      kInvalid);
  EXPECT_EQ(
      run(q.data(), g, d, DType::kF16, {{kv.k_raw.data(), nullptr, 3}}, out.data(), lse.data())
          .code(),
      kInvalid);
  EXPECT_EQ(run(q.data(), g, d, DType::kF16, {{kv.k_raw.data(), kv.v_raw.data(), -1}}, out.data(),
                lse.data())
                .code(),
            kInvalid);
}

// ---------------------------------------------------------------------------------------------
// Estimation.

// Cluster table: centroids, value sums and sizes of num_clusters clusters.
struct Clusters {
  std::vector<float> centroids, value_sums;
  std::vector<int32_t> sizes;
};

TEST(EstimateAttention, OneTokenClustersEqualExactAttention) {
  const int d = 128, g = 4, n = 300;
  std::mt19937 rng(FreshSeed());
  const KvRows kv = MakeRows(rng, n, d, DType::kF32, ValueMean(rng, d));
  std::vector<int32_t> sizes(n, 1);
  // A random subset in random order, plus clusters of size 0 that must be skipped.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> listed(order.begin(), order.begin() + 170);
  for (int i = 170; i < 180; ++i) {
    sizes[order[i]] = 0;
    listed.insert(listed.begin() + (i - 170) * 15, order[i]);
  }
  std::vector<KvSpan> spans;  // the exact zone: one span per non-empty listed token
  for (int32_t j : listed) {
    if (sizes[j] > 0) spans.push_back({kv.k.data() + j * d, kv.v.data() + j * d, 1});
  }
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> est(g * d), est_lse(g), exact(g * d), exact_lse(g);
  ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, kv.k.data(), kv.v.data(), sizes.data(), n,
                                listed, est.data(), est_lse.data())
                  .ok());
  ASSERT_TRUE(
      ExactAttention(q.data(), g, d, scale, DType::kF32, spans, exact.data(), exact_lse.data())
          .ok());
  const std::vector<double> exact_d(exact.begin(), exact.end());
  const std::vector<double> exact_lse_d(exact_lse.begin(), exact_lse.end());
  ExpectErrors("estimate vs exact", OutRelError(est.data(), exact_d, g, d), 1e-5,
               LseRelError(est_lse.data(), exact_lse_d, g), 1e-6);
}

TEST(EstimateAttention, MatchesFloat64Formula) {
  const int d = 64, g = 8, n = 400;
  std::mt19937 rng(FreshSeed());
  Clusters c;
  c.centroids = RandomNormal(rng, n * d, 1.0f);
  const std::vector<float> v_mean = ValueMean(rng, d);
  c.value_sums = RandomNormal(rng, n * d, 0.5f);
  c.sizes.resize(n);
  std::uniform_int_distribution<int32_t> size_dist(0, 40);
  for (int j = 0; j < n; ++j) {
    c.sizes[j] = size_dist(rng);
    for (int col = 0; col < d; ++col) c.value_sums[j * d + col] += c.sizes[j] * v_mean[col];
  }
  std::uniform_int_distribution<int32_t> pick(0, n - 1);
  std::vector<int32_t> listed(250);
  for (int32_t& j : listed) j = pick(rng);  // repeats allowed: each listing counts
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  const float scale = 1.5f / std::sqrt(static_cast<float>(d));
  std::vector<float> out(g * d), lse(g);
  ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, c.centroids.data(), c.value_sums.data(),
                                c.sizes.data(), n, listed, out.data(), lse.data())
                  .ok());
  std::vector<const float*> keys, values;
  std::vector<double> mult, vscale;
  for (int32_t j : listed) {
    keys.push_back(c.centroids.data() + j * d);
    values.push_back(c.value_sums.data() + j * d);
    mult.push_back(c.sizes[j]);
    vscale.push_back(c.sizes[j] > 0 ? 1.0 / c.sizes[j] : 0.0);
  }
  const RefResult ref = ReferenceAttention(q, g, d, scale, keys, values, mult, vscale);
  ExpectErrors("estimate vs float64", OutRelError(out.data(), ref.out, g, d), 1e-5,
               LseRelError(lse.data(), ref.lse, g), 1e-6);
}

// With key spreads: weight of cluster j for head h = size_j e^{scale q_h.c_j + scale^2 |q_h|^2
// spread_j / 2}, against float64; all-zero spreads change no bit.
TEST(EstimateAttention, SpreadsMatchFloat64FormulaAndZeroSpreadsChangeNothing) {
  const int d = 64, g = 4, n = 300;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> cent = RandomNormal(rng, n * d, 0.3f);
  const std::vector<float> vsum = RandomNormal(rng, n * d, 1.0f);
  std::vector<int32_t> sizes(n);
  std::vector<float> spreads(n), zeros(n, 0.0f);
  std::uniform_int_distribution<int32_t> size_dist(0, 24);
  std::uniform_real_distribution<float> spread_dist(0.0f, 0.5f);
  for (int j = 0; j < n; ++j) sizes[j] = size_dist(rng), spreads[j] = spread_dist(rng);
  std::vector<int32_t> listed(n);
  for (int j = 0; j < n; ++j) listed[j] = j;
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> out(g * d), lse(g), out0(g * d), lse0(g), out_plain(g * d), lse_plain(g);
  ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, cent.data(), vsum.data(), sizes.data(), n,
                                listed, out.data(), lse.data(), spreads.data())
                  .ok());
  ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, cent.data(), vsum.data(), sizes.data(), n,
                                listed, out0.data(), lse0.data(), zeros.data())
                  .ok());
  ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, cent.data(), vsum.data(), sizes.data(), n,
                                listed, out_plain.data(), lse_plain.data())
                  .ok());
  EXPECT_EQ(out0, out_plain);
  EXPECT_EQ(lse0, lse_plain);
  for (int h = 0; h < g; ++h) {
    const float* qh = q.data() + h * d;
    double qq = 0;
    for (int e = 0; e < d; ++e) qq += double{qh[e]} * qh[e];
    std::vector<double> logit(n, -kInf);
    double m = -kInf;
    for (int j = 0; j < n; ++j) {
      if (sizes[j] == 0) continue;
      double dot = 0;
      for (int e = 0; e < d; ++e) dot += double{qh[e]} * cent[j * d + e];
      logit[j] = std::log(double{sizes[j]}) + scale * dot + 0.5 * scale * scale * qq * spreads[j];
      m = std::max(m, logit[j]);
    }
    double total = 0;
    std::vector<double> acc(d, 0.0);
    for (int j = 0; j < n; ++j) {
      if (sizes[j] == 0) continue;
      const double w = std::exp(logit[j] - m);
      total += w;
      for (int e = 0; e < d; ++e) acc[e] += w * vsum[j * d + e] / sizes[j];
    }
    EXPECT_NEAR(lse[h], m + std::log(total), 1e-5 * (1 + std::abs(m))) << "head " << h;
    for (int e = 0; e < d; ++e) {
      const double want = acc[e] / total;
      EXPECT_NEAR(out[h * d + e], want, 1e-5 * (1 + std::abs(want))) << "head " << h;
    }
  }
}

// On clusters whose members scatter normally about their centroid, the spread correction brings
// the estimated log-mass of a cluster (its lse alone) closer to the members' true one.
TEST(EstimateAttention, SpreadsBringTheMassOfNormalMembersCloser) {
  const int d = 64, g = 1, members = 16, clusters = 200;
  std::mt19937 rng(FreshSeed());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const std::vector<float> q = RandomNormal(rng, d, 1.0f);
  std::uniform_real_distribution<float> sigma_dist(0.2f, 1.0f);
  double err_plain = 0, err_spread = 0;
  for (int c = 0; c < clusters; ++c) {
    const float sigma = sigma_dist(rng);
    const std::vector<float> centre = RandomNormal(rng, d, 1.0f);
    std::vector<float> keys = RandomNormal(rng, members * d, sigma);
    std::vector<float> mean(d, 0.0f), vsum(d, 1.0f * members);
    for (int i = 0; i < members; ++i)
      for (int e = 0; e < d; ++e)
        keys[i * d + e] += centre[e], mean[e] += keys[i * d + e] / members;
    double spread = 0, m = -kInf;
    std::vector<double> s(members);
    for (int i = 0; i < members; ++i) {
      double dot = 0;
      for (int e = 0; e < d; ++e) {
        spread += std::pow(double{keys[i * d + e]} - mean[e], 2);
        dot += double{q[e]} * keys[i * d + e];
      }
      s[i] = scale * dot;
      m = std::max(m, s[i]);
    }
    double sum = 0;
    for (double x : s) sum += std::exp(x - m);
    const double true_lse = m + std::log(sum);
    const std::vector<float> spreads = {static_cast<float>(spread / (members * d))};
    const std::vector<int32_t> sizes = {members}, listed = {0};
    std::vector<float> out(d), lse(1), lse_spread(1);
    ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, mean.data(), vsum.data(), sizes.data(), 1,
                                  listed, out.data(), lse.data())
                    .ok());
    ASSERT_TRUE(EstimateAttention(q.data(), g, d, scale, mean.data(), vsum.data(), sizes.data(), 1,
                                  listed, out.data(), lse_spread.data(), spreads.data())
                    .ok());
    err_plain += std::abs(lse[0] - true_lse);
    err_spread += std::abs(lse_spread[0] - true_lse);
  }
  std::cout << "mean |log-mass error|: plain " << err_plain / clusters << ", with spreads "
            << err_spread / clusters << "\n";
  EXPECT_LT(err_spread, 0.5 * err_plain);
}

TEST(EstimateAttention, EmptyClustersOnlyAndBadArguments) {
  const int d = 64, g = 2, n = 5;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> cent = RandomNormal(rng, n * d, 1.0f);
  const std::vector<float> vsum = RandomNormal(rng, n * d, 1.0f);
  std::vector<int32_t> sizes = {0, 0, 3, 0, 1};
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  std::vector<float> out(g * d, 5.0f), lse(g, 5.0f);
  auto run = [&](std::vector<int32_t> listed) {
    return EstimateAttention(q.data(), g, d, 0.1f, cent.data(), vsum.data(), sizes.data(), n,
                             listed, out.data(), lse.data());
  };
  ASSERT_TRUE(run({0, 1, 3}).ok());
  for (float o : out) EXPECT_EQ(o, 0.0f);
  for (float l : lse) EXPECT_EQ(l, -INFINITY);
  ASSERT_TRUE(run({}).ok());
  for (float l : lse) EXPECT_EQ(l, -INFINITY);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(run({2, 5}).code(), kInvalid);
  EXPECT_EQ(run({-1}).code(), kInvalid);
  sizes[4] = -2;
  EXPECT_EQ(run({4}).code(), kInvalid);
  EXPECT_EQ(EstimateAttention(q.data(), g, d, 0.1f, nullptr, vsum.data(), sizes.data(), n,
                              std::vector<int32_t>{2}, out.data(), lse.data())
                .code(),
            kInvalid);
  EXPECT_EQ(EstimateAttention(q.data(), g, 20, 0.1f, cent.data(), vsum.data(), sizes.data(), n,
                              std::vector<int32_t>{2}, out.data(), lse.data())
                .code(),
            kInvalid);
}

// ---------------------------------------------------------------------------------------------
// Log-sum-exp merge.

TEST(MergeLse, TwoHalvesEqualAttentionOverTheUnion) {
  const int d = 128, g = 8;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> v_mean = ValueMean(rng, d);
  std::vector<KvRows> a_rows, b_rows;
  for (int64_t n : {40, 0, 90}) a_rows.push_back(MakeRows(rng, n, d, DType::kBF16, v_mean));
  for (int64_t n : {7, 150}) b_rows.push_back(MakeRows(rng, n, d, DType::kBF16, v_mean));
  std::vector<KvSpan> a_spans, b_spans, all_spans;
  std::vector<const KvRows*> all_sets;
  for (const KvRows& kv : a_rows) a_spans.push_back(kv.Span()), all_sets.push_back(&kv);
  for (const KvRows& kv : b_rows) b_spans.push_back(kv.Span()), all_sets.push_back(&kv);
  all_spans = a_spans;
  all_spans.insert(all_spans.end(), b_spans.begin(), b_spans.end());
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> oa(g * d), la(g), ob(g * d), lb(g), ou(g * d), lu(g);
  ASSERT_TRUE(
      ExactAttention(q.data(), g, d, scale, DType::kBF16, a_spans, oa.data(), la.data()).ok());
  ASSERT_TRUE(
      ExactAttention(q.data(), g, d, scale, DType::kBF16, b_spans, ob.data(), lb.data()).ok());
  ASSERT_TRUE(
      ExactAttention(q.data(), g, d, scale, DType::kBF16, all_spans, ou.data(), lu.data()).ok());
  MergeLse(oa.data(), la.data(), ob.data(), lb.data(), g, d);
  const RefResult ref = ReferenceExact(q, g, d, scale, all_sets);
  ExpectErrors("merged vs float64", OutRelError(oa.data(), ref.out, g, d), 1e-5,
               LseRelError(la.data(), ref.lse, g), 1e-6);
  const std::vector<double> ou_d(ou.begin(), ou.end()), lu_d(lu.begin(), lu.end());
  ExpectErrors("merged vs union", OutRelError(oa.data(), ou_d, g, d), 1e-5,
               LseRelError(la.data(), lu_d, g), 1e-6);
}

TEST(MergeLse, EmptySideIsTheIdentity) {
  const int d = 64, g = 3;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> x = RandomNormal(rng, g * d, 1.0f);
  const std::vector<float> lx = RandomNormal(rng, g, 4.0f);
  const std::vector<float> empty_out(g * d, 0.0f), empty_lse(g, -INFINITY);
  // Non-empty a, empty b.
  std::vector<float> o = x, l = lx;
  MergeLse(o.data(), l.data(), empty_out.data(), empty_lse.data(), g, d);
  EXPECT_EQ(o, x);
  EXPECT_EQ(l, lx);
  // Empty a, non-empty b.
  o = empty_out;
  l = empty_lse;
  MergeLse(o.data(), l.data(), x.data(), lx.data(), g, d);
  EXPECT_EQ(o, x);
  EXPECT_EQ(l, lx);
  // Both empty.
  o = empty_out;
  l = empty_lse;
  MergeLse(o.data(), l.data(), empty_out.data(), empty_lse.data(), g, d);
  EXPECT_EQ(o, empty_out);
  for (float e : l) EXPECT_EQ(e, -INFINITY);
}

// ---------------------------------------------------------------------------------------------
// The vectorised exp under the softmax.

TEST(SimdExp, MatchesFloat64Exp) {
  std::mt19937 rng(FreshSeed());
  std::uniform_real_distribution<float> dist(-87.0f, 88.0f);
  std::vector<float> x(4096), y(4096);
  for (float& e : x) e = dist(rng);
  x[0] = -87.0f;
  x[1] = 88.0f;
  x[2] = 1e-7f;
  x[3] = -1e-7f;
  // Odd length: exercises the tail. The shift moves the sum into float range.
  const float shift = 80.0f;
  const int64_t n = static_cast<int64_t>(x.size()) - 3;
  const float sum = simd::ExpShiftedSum(x.data(), shift, n, y.data());
  double worst = 0.0, ref_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float arg = x[i] - shift;  // the argument the kernel sees
    const double ref = std::exp(double{arg});
    ref_sum += ref;
    const double err = arg < -87.3f ? y[i] : std::abs(y[i] - ref) / ref;
    if (!(err <= worst)) worst = err;
  }
  std::cout << "[ error    ] exp: max relative " << worst << " (bound 5e-7)\n";
  EXPECT_LT(worst, 5e-7);
  EXPECT_NEAR(sum, ref_sum, 1e-5 * ref_sum);
  // Unshifted, over the whole range.
  for (int64_t i = 0; i < n; ++i) {
    float one;
    simd::ExpShiftedSum(&x[i], 0.0f, 1, &one);
    const double ref = std::exp(double{x[i]});
    ASSERT_LT(std::abs(one - ref) / ref, 5e-7) << "x=" << x[i];
  }
  // Underflow and -inf give exactly 0.
  const float low[3] = {-INFINITY, -200.0f, -88.0f};
  float low_out[3] = {1.0f, 1.0f, 1.0f};
  EXPECT_EQ(simd::ExpShiftedSum(low, 0.0f, 3, low_out), 0.0f);
  for (float e : low_out) EXPECT_EQ(e, 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Scoring and top-k.

TEST(CentroidLogits, MatchesFloat64) {
  const int d = 128, g = 4, n = 203;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> q = RandomNormal(rng, g * d, 1.0f);
  const std::vector<float> cent = RandomNormal(rng, n * d, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> logits(g * n);
  CentroidLogits(q.data(), g, d, scale, cent.data(), n, logits.data());
  double num = 0.0, den = 0.0;
  for (int h = 0; h < g; ++h) {
    for (int j = 0; j < n; ++j) {
      double ref = 0.0;
      for (int c = 0; c < d; ++c) ref += double{q[h * d + c]} * cent[j * d + c];
      ref *= scale;
      num += (logits[h * n + j] - ref) * (logits[h * n + j] - ref);
      den += ref * ref;
    }
  }
  EXPECT_LT(std::sqrt(num / den), 1e-6);
}

TEST(GroupSoftmaxSum, SumsToGroupSizeAndMatchesFloat64) {
  const int g = 8, n = 500;
  std::mt19937 rng(FreshSeed());
  const std::vector<float> logits = RandomNormal(rng, g * n, 3.0f);
  std::vector<int32_t> sizes(n);
  std::uniform_int_distribution<int32_t> size_dist(0, 9);  // ~10% empty
  for (int32_t& s : sizes) s = size_dist(rng);
  std::vector<float> scores(n);
  GroupSoftmaxSum(logits.data(), g, n, sizes.data(), scores.data());
  std::vector<double> ref(n, 0.0);
  for (int h = 0; h < g; ++h) {
    double m = -kInf, sum = 0.0;
    for (int j = 0; j < n; ++j) {
      if (sizes[j] > 0) m = std::max(m, double{logits[h * n + j]});
    }
    for (int j = 0; j < n; ++j) {
      if (sizes[j] > 0) sum += std::exp(logits[h * n + j] - m);
    }
    for (int j = 0; j < n; ++j) {
      if (sizes[j] > 0) ref[j] += std::exp(logits[h * n + j] - m) / sum;
    }
  }
  double total = 0.0;
  int empty = 0;
  for (int j = 0; j < n; ++j) {
    if (sizes[j] == 0) {
      EXPECT_EQ(scores[j], -INFINITY) << j;
      ++empty;
      continue;
    }
    EXPECT_NEAR(scores[j], ref[j], 1e-5 * ref[j]) << j;
    total += scores[j];
  }
  EXPECT_GT(empty, 0);
  EXPECT_NEAR(total, g, 1e-5 * g);
}

TEST(TopK, MatchesFullSort) {
  const int n = 2000;
  std::mt19937 rng(FreshSeed());
  std::uniform_int_distribution<int> level(-40, 40);  // few distinct values: many ties
  std::uniform_int_distribution<int> special(0, 19);
  std::vector<float> scores(n);
  for (float& s : scores) {
    switch (special(rng)) {
      case 0:
        s = -INFINITY;
        break;
      case 1:
        s = INFINITY;
        break;
      case 2:
        s = NAN;
        break;
      default:
        s = 0.25f * static_cast<float>(level(rng)) + 0.1f;
    }
  }
  std::vector<int32_t> finite;
  for (int j = 0; j < n; ++j) {
    if (std::isfinite(scores[j])) finite.push_back(j);
  }
  std::stable_sort(finite.begin(), finite.end(),
                   [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  const int64_t num_finite = static_cast<int64_t>(finite.size());
  for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{17}, int64_t{256}, num_finite - 1, num_finite,
                    int64_t{n + 10}}) {
    std::vector<int32_t> out(std::max<int64_t>(k, 1), -1);
    const int64_t got = TopK(scores.data(), n, k, out.data());
    const int64_t want = std::min(k, num_finite);
    ASSERT_EQ(got, want) << "k=" << k;
    for (int64_t i = 0; i < want; ++i) ASSERT_EQ(out[i], finite[i]) << "k=" << k << " i=" << i;
  }
}

}  // namespace
}  // namespace kvwave::gpu::cpu
