// The sparse path's accuracy (issue 16 item 6, CPU part): on seeded clustered data, at the
// default budgets (1.8% + 23.2%), the output error of Attend and the recall of the exact top-k
// stay within stated bounds; a 100% budget is exact attention; and Attends racing a background
// seal return either the exact (all-tail) answer or the sealed-index answer, never anything
// else. The two-pass ranking (attend.rank = two_pass, issue 18) meets the same bounds, counts
// the keys its second pass scores, never attends more keys exactly than the centroid ranking,
// and finds small sharp targets (a few keys inside clusters whose centroids do not point at them)
// at least as often as the centroid ranking. Seeds are printed and can be set with
// KVWAVE_TEST_SEED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "config/status_macros.h"
#include "engine/engine.h"

namespace kvwave::engine {
namespace {

constexpr int kQHeads = 4, kKvHeads = 2, kDim = 64, kGroup = kQHeads / kKvHeads;
const store::ModelShape kShape{1, kQHeads, kKvHeads, kDim, DType::kF32};

unsigned Seed() {
  if (const char* s = std::getenv("KVWAVE_TEST_SEED")) return static_cast<unsigned>(std::atoll(s));
  return std::random_device{}();
}

// Keys drawn around `centers` topics (a mixture of Gaussians, like real post-RoPE keys that
// cluster), values near their topic's; queries point at one topic each, so attention concentrates
// on a few hundred keys, the regime sparse attention is for.
struct Data {
  int64_t n = 0;
  std::vector<float> k, v;                 // [n x kv_heads x d]
  std::vector<std::vector<float>> topics;  // per KV head, [centers x d]
  std::vector<std::vector<float>> values;  // per KV head, [centers x d]: a topic's typical value
};

Data Clustered(std::mt19937& rng, int64_t n, int centers) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, centers - 1);
  Data d;
  d.n = n;
  d.topics.resize(kKvHeads);
  d.values.resize(kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) {
    d.topics[h].resize(static_cast<size_t>(centers) * kDim);
    d.values[h].resize(d.topics[h].size());
    for (auto& x : d.topics[h]) x = 2.0f * normal(rng);
    for (auto& x : d.values[h]) x = normal(rng);
  }
  d.k.resize(n * kKvHeads * kDim);
  d.v.resize(d.k.size());
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < kKvHeads; ++h) {
      const int c = pick(rng);
      for (int j = 0; j < kDim; ++j) {
        d.k[(i * kKvHeads + h) * kDim + j] = d.topics[h][c * kDim + j] + 0.5f * normal(rng);
        d.v[(i * kKvHeads + h) * kDim + j] = d.values[h][c * kDim + j] + 0.5f * normal(rng);
      }
    }
  }
  return d;
}

std::vector<float> Query(std::mt19937& rng, const Data& d, int centers) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, centers - 1);
  std::vector<float> q(kQHeads * kDim);
  for (int h = 0; h < kQHeads; ++h) {
    const int c = pick(rng);
    for (int j = 0; j < kDim; ++j) {
      q[h * kDim + j] = 0.6f * d.topics[h / kGroup][c * kDim + j] + 0.5f * normal(rng);
    }
  }
  return q;
}

// Float64 attention of query head h over tokens [0, n); also its top-k positions.
void Exact(const Data& d, int64_t n, const std::vector<float>& q, int h, int k,
           std::vector<double>& out, std::vector<int64_t>* top) {
  const int kvh = h / kGroup;
  std::vector<double> logit(n);
  double m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    double dot = 0;
    for (int j = 0; j < kDim; ++j)
      dot += double{q[h * kDim + j]} * d.k[(t * kKvHeads + kvh) * kDim + j];
    logit[t] = dot / std::sqrt(double{kDim});
    m = std::max(m, logit[t]);
  }
  double z = 0;
  out.assign(kDim, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const double w = std::exp(logit[t] - m);
    z += w;
    for (int j = 0; j < kDim; ++j) out[j] += w * d.v[(t * kKvHeads + kvh) * kDim + j];
  }
  for (auto& x : out) x /= z;
  if (top != nullptr) {
    std::vector<int64_t> idx(n);
    for (int64_t t = 0; t < n; ++t) idx[t] = t;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int64_t a, int64_t b) { return logit[a] > logit[b]; });
    top->assign(idx.begin(), idx.begin() + k);
  }
}

double RelError(const float* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    num += (got[j] - want[j]) * (got[j] - want[j]);
    den += want[j] * want[j];
  }
  return std::sqrt(num / den);
}

config::Settings Settings() {
  config::Settings s;
  s.prefill_segment_tokens = 1024;
  s.recent_tokens = 64;
  s.sink_tokens = 4;
  s.compute_threads = 2;
  return s;
}

void AppendAll(Engine& e, ContextId id, const Data& d, int64_t from, int64_t to) {
  const int64_t row = kKvHeads * kDim;
  ASSERT_TRUE(e.Append(id, 0, to - from,
                       std::as_bytes(std::span(d.k).subspan(from * row, (to - from) * row)),
                       std::as_bytes(std::span(d.v).subspan(from * row, (to - from) * row)))
                  .ok());
}

// A context of `e` holding tokens [0, n) of `d`, every segment indexed.
absl::StatusOr<ContextId> SealedContext(Engine& e, const Data& d, int64_t n) {
  KVWAVE_ASSIGN_OR_RETURN(const OpenResult opened, e.Open({kShape, {}, ""}));
  AppendAll(e, opened.id, d, 0, n);
  KVWAVE_RETURN_IF_ERROR(e.Seal(opened.id));
  return opened.id;
}

// Stated bounds, at the default budgets on this data (8192 tokens, 64 topics per KV head, 512
// clusters per head): mean relative output error <= 0.08 and no query head above 0.25; recall
// of the exact top-32 by Retrieve (wave, 5% of the clusters scored) >= 0.95 on average; the 100%
// budget within 2e-5 of float64. Measured over 6 seeds on the development VM with the centroid
// ranking: mean error 0.037-0.042, worst head 0.080-0.102, recall 0.981-0.992, 100% budget <=
// 6.8e-6 (the settings' default ranking is auto = two_pass on the CPU since issue 18: 0.027-0.032).
TEST(AccuracyTest, DefaultBudgetsOnClusteredDataStayWithinBounds) {
  const unsigned seed = Seed();
  std::printf("seed %u (set KVWAVE_TEST_SEED to replay)\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  constexpr int kCenters = 64, kTopK = 32, kQueries = 16;
  const int64_t n = 8192;
  const Data d = Clustered(rng, n, kCenters);
  auto engine = Engine::Create(Settings()).value();
  const ContextId id = engine->Open({kShape, {}, ""}).value().id;
  AppendAll(*engine, id, d, 0, n);
  ASSERT_TRUE(engine->Seal(id).ok());  // every segment indexed

  double err_sum = 0, err_max = 0, exact_max = 0, recall_sum = 0;
  int samples = 0;
  for (int i = 0; i < kQueries; ++i) {
    const std::vector<float> q = Query(rng, d, kCenters);
    std::vector<float> out(q.size()), lse(kQHeads), full(q.size());
    AttendStats stats;
    ASSERT_TRUE(engine->Attend(id, 0, q, AttendBudget{}, out, lse, &stats).ok());
    EXPECT_GT(stats.total_clusters, 0);
    EXPECT_LT(stats.retrieved_clusters, stats.total_clusters);
    ASSERT_TRUE(engine->Attend(id, 0, q, {1.0, 0.0}, full, lse, nullptr).ok());
    std::vector<int64_t> positions(kQHeads * kTopK);
    std::vector<float> scores(positions.size());
    RetrieveOptions ro;
    ro.k = kTopK;
    ASSERT_TRUE(engine->Retrieve(id, 0, q, ro, positions, scores, nullptr).ok());
    for (int h = 0; h < kQHeads; ++h) {
      std::vector<double> want;
      std::vector<int64_t> top;
      Exact(d, n, q, h, kTopK, want, &top);
      const double err = RelError(out.data() + h * kDim, want);
      err_sum += err;
      err_max = std::max(err_max, err);
      exact_max = std::max(exact_max, RelError(full.data() + h * kDim, want));
      int hit = 0;
      for (int64_t t : top) {
        hit += std::count(positions.begin() + h * kTopK, positions.begin() + (h + 1) * kTopK, t);
      }
      recall_sum += double(hit) / kTopK;
      ++samples;
    }
  }
  const double err_mean = err_sum / samples, recall = recall_sum / samples;
  std::printf("default budgets: mean error %.4f, worst head %.4f, recall@%d %.3f; 100%%: %.2e\n",
              err_mean, err_max, kTopK, recall, exact_max);
  EXPECT_LE(err_mean, 0.08);
  EXPECT_LE(err_max, 0.25);
  EXPECT_GE(recall, 0.95);
  EXPECT_LE(exact_max, 2e-5);  // 100% budget = exact attention
}

// Attends while the one seal of this context runs in the background: before it is published the
// 1088 tokens are all in the tail (the answer is exact attention), after it they are a segment
// plus 64 tail tokens (the sealed-index answer at the default budgets). Every answer must be one
// of the two, bit for bit the sealed one or within float32 rounding of the exact one.
TEST(AccuracyTest, AttendsRacingABackgroundSealSeeOneStateOrTheOther) {
  const unsigned seed = Seed();
  std::printf("seed %u (set KVWAVE_TEST_SEED to replay)\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int64_t n = 1024 + 64;
  const Data d = Clustered(rng, n, 16);
  const std::vector<float> q = Query(rng, d, 16);
  std::vector<std::vector<double>> exact(kQHeads);
  for (int h = 0; h < kQHeads; ++h) Exact(d, n, q, h, 1, exact[h], nullptr);

  for (int round = 0; round < 3; ++round) {
    auto engine = Engine::Create(Settings()).value();
    const ContextId id = engine->Open({kShape, {}, ""}).value().id;
    AppendAll(*engine, id, d, 0, n);  // completes the segment: its seal is queued
    std::vector<std::vector<float>> seen;
    while (engine->Info(id).value().sealed_segments == 0) {
      std::vector<float> out(q.size()), lse(kQHeads);
      ASSERT_TRUE(engine->Attend(id, 0, q, AttendBudget{}, out, lse, nullptr).ok());
      seen.push_back(out);
    }
    ASSERT_TRUE(engine->Flush().ok());
    std::vector<float> sealed(q.size()), lse(kQHeads);
    ASSERT_TRUE(engine->Attend(id, 0, q, AttendBudget{}, sealed, lse, nullptr).ok());
    int as_exact = 0, as_sealed = 0;
    for (const auto& out : seen) {
      bool exact_state = true;
      for (int h = 0; h < kQHeads; ++h) {
        exact_state = exact_state && RelError(out.data() + h * kDim, exact[h]) <= 1e-5;
      }
      const bool sealed_state = out == sealed;
      EXPECT_TRUE(exact_state || sealed_state) << "an answer that is neither state";
      as_exact += exact_state;
      as_sealed += sealed_state && !exact_state;
    }
    std::printf("round %d: %zu Attends during the seal: %d exact (tail), %d sealed\n", round,
                seen.size(), as_exact, as_sealed);
  }
}

// attend.estimation_spread = on, on the data of the first test (members scattered normally about
// their topic: the case the correction models): the estimate moves (the setting reaches the
// estimation zone), its error against float64 stays within the first test's bounds and within
// 10% of the error with the correction off, and the 100% budget stays exact. Measured over seeds
// 1-30: 0.98-1.055x the error off, worst head <= 0.21 (the estimated clusters carry little of the
// mass on this data: the correction is about neutral here).
TEST(AccuracyTest, EstimationSpreadOnClusteredDataIsNoWorseAndExactAt100) {
  const unsigned seed = Seed();
  std::printf("seed %u (set KVWAVE_TEST_SEED to replay)\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  constexpr int kCenters = 64, kQueries = 16;
  const int64_t n = 8192;
  const Data d = Clustered(rng, n, kCenters);
  config::Settings with = Settings();
  with.estimation_spread = "on";
  auto off = Engine::Create(Settings()).value();
  auto on = Engine::Create(with).value();
  const absl::StatusOr<ContextId> s0 = SealedContext(*off, d, n), s1 = SealedContext(*on, d, n);
  ASSERT_TRUE(s0.ok()) << s0.status();
  ASSERT_TRUE(s1.ok()) << s1.status();
  const ContextId i0 = *s0, i1 = *s1;
  double err_off = 0, err_on = 0, err_max = 0, exact_max = 0;
  int samples = 0, moved = 0;
  for (int i = 0; i < kQueries; ++i) {
    const std::vector<float> q = Query(rng, d, kCenters);
    std::vector<float> a(q.size()), b(q.size()), full(q.size()), lse(kQHeads);
    ASSERT_TRUE(off->Attend(i0, 0, q, AttendBudget{}, a, lse, nullptr).ok());
    ASSERT_TRUE(on->Attend(i1, 0, q, AttendBudget{}, b, lse, nullptr).ok());
    ASSERT_TRUE(on->Attend(i1, 0, q, {1.0, 0.0}, full, lse, nullptr).ok());
    moved += a != b;
    for (int h = 0; h < kQHeads; ++h) {
      std::vector<double> want;
      Exact(d, n, q, h, 1, want, nullptr);
      err_off += RelError(a.data() + h * kDim, want);
      const double e = RelError(b.data() + h * kDim, want);
      err_on += e;
      err_max = std::max(err_max, e);
      exact_max = std::max(exact_max, RelError(full.data() + h * kDim, want));
      ++samples;
    }
  }
  std::printf(
      "estimation spread: mean error off %.4f, on %.4f (worst head %.4f); 100%%: %.2e; "
      "%d of %d calls moved\n",
      err_off / samples, err_on / samples, err_max, exact_max, moved, kQueries);
  EXPECT_EQ(moved, kQueries);
  EXPECT_LE(err_on / samples, 0.08);
  EXPECT_LE(err_max, 0.25);
  EXPECT_LE(err_on, 1.10 * err_off);
  EXPECT_LE(exact_max, 2e-5);
}

config::Settings CentroidSettings() {
  config::Settings s = Settings();
  s.rank = "centroid";
  return s;
}

config::Settings TwoPassSettings() {
  config::Settings s = Settings();
  s.rank = "two_pass";
  s.rank_overfetch = 2.0;
  return s;
}

// Stated bounds for two_pass at the default budgets on the data of the first test: the same
// (mean error <= 0.08, worst head <= 0.25, 100% budget within 2e-5 of float64). Per call: it
// attends no more keys exactly than the centroid ranking (its cap), and its second pass scores
// at least the keys the centroid ranking retrieves (its candidates include them) and reports
// them; the centroid ranking reports none. Measured over seeds 1-6 on the development VM: mean
// error 0.027-0.032 (centroid 0.036-0.042), worst head 0.060-0.096, 100% <= 7.0e-6; keys attended
// exactly 2.55-2.69% (centroid 2.57-2.71%), scored by the second pass 4.4-4.6%.
TEST(AccuracyTest, TwoPassOnClusteredDataStaysWithinBoundsAndCountsScoredKeys) {
  const unsigned seed = Seed();
  std::printf("seed %u (set KVWAVE_TEST_SEED to replay)\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  constexpr int kCenters = 64, kQueries = 16;
  const int64_t n = 8192;
  const Data d = Clustered(rng, n, kCenters);
  auto centroid = Engine::Create(CentroidSettings()).value();
  auto two_pass = Engine::Create(TwoPassSettings()).value();
  config::Settings auto_settings = Settings();
  auto_settings.rank = "auto";  // two_pass on the CPU backend
  auto automatic = Engine::Create(auto_settings).value();
  const absl::StatusOr<ContextId> rc = SealedContext(*centroid, d, n),
                                  rt = SealedContext(*two_pass, d, n),
                                  ra = SealedContext(*automatic, d, n);
  ASSERT_TRUE(rc.ok()) << rc.status();
  ASSERT_TRUE(rt.ok()) << rt.status();
  ASSERT_TRUE(ra.ok()) << ra.status();
  const ContextId ic = *rc, it = *rt, ia = *ra;

  double err_sum = 0, err_max = 0, exact_max = 0, cerr_sum = 0;
  int64_t scored = 0, exact_two = 0, exact_centroid = 0, keys = 0;
  int samples = 0;
  for (int i = 0; i < kQueries; ++i) {
    const std::vector<float> q = Query(rng, d, kCenters);
    std::vector<float> out(q.size()), cout(q.size()), full(q.size()), lse(kQHeads);
    AttendStats st, sc;
    ASSERT_TRUE(two_pass->Attend(it, 0, q, AttendBudget{}, out, lse, &st).ok());
    ASSERT_TRUE(centroid->Attend(ic, 0, q, AttendBudget{}, cout, lse, &sc).ok());
    ASSERT_TRUE(two_pass->Attend(it, 0, q, {1.0, 0.0}, full, lse, nullptr).ok());
    std::vector<float> aout(q.size());
    ASSERT_TRUE(automatic->Attend(ia, 0, q, AttendBudget{}, aout, lse, nullptr).ok());
    EXPECT_EQ(aout, out) << "rank = auto on the CPU is two_pass";
    EXPECT_EQ(sc.scored_tokens, 0);
    EXPECT_EQ(st.total_clusters, sc.total_clusters);
    EXPECT_LE(st.retrieved_clusters, sc.retrieved_clusters);
    EXPECT_LE(st.retrieved_tokens, sc.retrieved_tokens);
    EXPECT_GE(st.scored_tokens, sc.retrieved_tokens);
    EXPECT_EQ(st.retrieved_clusters + st.estimated_clusters,
              sc.retrieved_clusters + sc.estimated_clusters);
    scored += st.scored_tokens;
    exact_two += st.steady_tokens + st.retrieved_tokens;
    exact_centroid += sc.steady_tokens + sc.retrieved_tokens;
    keys += n * kKvHeads;
    for (int h = 0; h < kQHeads; ++h) {
      std::vector<double> want;
      Exact(d, n, q, h, 1, want, nullptr);
      const double err = RelError(out.data() + h * kDim, want);
      err_sum += err;
      err_max = std::max(err_max, err);
      cerr_sum += RelError(cout.data() + h * kDim, want);
      exact_max = std::max(exact_max, RelError(full.data() + h * kDim, want));
      ++samples;
    }
  }
  std::printf(
      "two_pass: mean error %.4f (centroid %.4f), worst head %.4f; 100%%: %.2e; keys attended "
      "exactly %.2f%% (centroid %.2f%%), scored by the second pass %.2f%%\n",
      err_sum / samples, cerr_sum / samples, err_max, exact_max, 100.0 * exact_two / keys,
      100.0 * exact_centroid / keys, 100.0 * scored / keys);
  EXPECT_LE(err_sum / samples, 0.08);
  EXPECT_LE(err_max, 0.25);
  EXPECT_LE(exact_max, 2e-5);
}

// Small sharp targets, like a pass key in a long text. 16 orthogonal topics (keys 4 e_T + noise);
// needle i (of 16, per KV head) is kNeedleTokens consecutive keys of topic B_i plus a part along
// e_{16+i}. Query i = s e_{16+i} + a e_{A_i} + 0.9 a e_{B_i}: its exact top kNeedleTokens are
// needle i's keys (checked in float64), but by centroid the clusters of topic A_i come first, so
// at a 5% retrieval budget (r = 26 of 512 clusters) the needle's cluster is mostly not retrieved,
// while it is among the 2r candidates two_pass scores. Values are zero except one-hot on the
// needles' keys (d = 64 = 16 x kNeedleTokens), so with no estimation out[slot of key t] > 0
// exactly when key t was attended: that is the recall of the exact top-k.
// Stated bound: two_pass recall >= centroid recall, and >= 0.9. Measured over seeds 10-29 on the
// development VM: two_pass 0.977-1.000, centroid 0.000-0.383.
TEST(AccuracyTest, TwoPassFindsSmallSharpTargetsAtLeastAsOftenAsCentroid) {
  const unsigned seed = Seed();
  std::printf("seed %u (set KVWAVE_TEST_SEED to replay)\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  constexpr int kTopics = 16, kNeedles = 16, kNeedleTokens = 4;
  static_assert(kNeedles * kNeedleTokens == kDim && kTopics + kNeedles <= kDim);
  // Noise: small along the dims queries and needles use, wide along the other 32 (diffuse clusters
  // that a needle cannot carve out a cluster of its own from, as in real keys).
  constexpr float kNoise = 0.05f, kWide = 1.0f, kTopic = 4.0f, kAlong = 3.0f, kS = 4.0f, kA = 10.0f;
  const int64_t n = 8192;
  Data d;
  d.n = n;
  d.k.assign(n * kKvHeads * kDim, 0.0f);
  d.v.assign(d.k.size(), 0.0f);
  std::uniform_int_distribution<int> pick(0, kTopics - 1);
  std::vector<int> topic_of(n * kKvHeads);
  for (auto& t : topic_of) t = pick(rng);
  // Per needle: its run's start (disjoint runs outside the sinks and the recent window) and,
  // per KV head, the topics A (the distractor) and B (the needle's own).
  std::vector<int64_t> start(kNeedles);
  std::vector<int> ta(kNeedles * kKvHeads), tb(kNeedles * kKvHeads);
  for (int i = 0; i < kNeedles; ++i) {
    const int64_t span = (n - 256) / kNeedles;
    start[i] = 64 + i * span + std::uniform_int_distribution<int64_t>(0, span - kNeedleTokens)(rng);
    for (int h = 0; h < kKvHeads; ++h) {
      ta[i * kKvHeads + h] = pick(rng);
      do {
        tb[i * kKvHeads + h] = pick(rng);
      } while (tb[i * kKvHeads + h] == ta[i * kKvHeads + h]);
      for (int t = 0; t < kNeedleTokens; ++t) {
        topic_of[(start[i] + t) * kKvHeads + h] = tb[i * kKvHeads + h];
      }
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    for (int h = 0; h < kKvHeads; ++h) {
      float* k = d.k.data() + (p * kKvHeads + h) * kDim;
      for (int j = 0; j < kDim; ++j) k[j] = (j < kTopics + kNeedles ? kNoise : kWide) * normal(rng);
      k[topic_of[p * kKvHeads + h]] += kTopic;
    }
  }
  for (int i = 0; i < kNeedles; ++i) {
    for (int t = 0; t < kNeedleTokens; ++t) {
      for (int h = 0; h < kKvHeads; ++h) {
        const int64_t row = (start[i] + t) * kKvHeads + h;
        d.k[row * kDim + kTopics + i] += kAlong;
        d.v[row * kDim + i * kNeedleTokens + t] = 1.0f;
      }
    }
  }
  auto centroid = Engine::Create(CentroidSettings()).value();
  auto two_pass = Engine::Create(TwoPassSettings()).value();
  const ContextId ic = centroid->Open({kShape, {}, ""}).value().id;
  const ContextId it = two_pass->Open({kShape, {}, ""}).value().id;
  AppendAll(*centroid, ic, d, 0, n);
  AppendAll(*two_pass, it, d, 0, n);
  ASSERT_TRUE(centroid->Seal(ic).ok());
  ASSERT_TRUE(two_pass->Seal(it).ok());

  int hits_two = 0, hits_centroid = 0, total = 0;
  int64_t exact_two = 0, exact_centroid = 0;
  const AttendBudget budget{0.05, 0.0};  // no estimation: attended keys show in out
  for (int i = 0; i < kNeedles; ++i) {
    std::vector<float> q(kQHeads * kDim);
    for (int h = 0; h < kQHeads; ++h) {
      const int kv = h / kGroup;
      for (int j = 0; j < kDim; ++j) q[h * kDim + j] = 0.05f * normal(rng);
      q[h * kDim + kTopics + i] += kS;
      q[h * kDim + ta[i * kKvHeads + kv]] += kA;
      q[h * kDim + tb[i * kKvHeads + kv]] += 0.9f * kA;
    }
    for (int h = 0; h < kQHeads; ++h) {  // the construction: the top keys are needle i's
      std::vector<double> want;
      std::vector<int64_t> top;
      Exact(d, n, q, h, kNeedleTokens, want, &top);
      std::sort(top.begin(), top.end());
      for (int t = 0; t < kNeedleTokens; ++t) ASSERT_EQ(top[t], start[i] + t) << "head " << h;
    }
    std::vector<float> out_two(q.size()), out_centroid(q.size()), lse(kQHeads);
    AttendStats st, sc;
    ASSERT_TRUE(two_pass->Attend(it, 0, q, budget, out_two, lse, &st).ok());
    ASSERT_TRUE(centroid->Attend(ic, 0, q, budget, out_centroid, lse, &sc).ok());
    EXPECT_LE(st.retrieved_tokens, sc.retrieved_tokens);
    exact_two += st.steady_tokens + st.retrieved_tokens;
    exact_centroid += sc.steady_tokens + sc.retrieved_tokens;
    for (int h = 0; h < kQHeads; ++h) {
      for (int t = 0; t < kNeedleTokens; ++t) {
        const int slot = i * kNeedleTokens + t;
        hits_two += out_two[h * kDim + slot] > 0;
        hits_centroid += out_centroid[h * kDim + slot] > 0;
        ++total;
      }
    }
  }
  const double recall_two = double(hits_two) / total;
  const double recall_centroid = double(hits_centroid) / total;
  std::printf(
      "sharp targets: recall of the exact top-%d: two_pass %.3f, centroid %.3f; keys attended "
      "exactly two_pass %.2f%%, centroid %.2f%%\n",
      kNeedleTokens, recall_two, recall_centroid, 100.0 * exact_two / (kNeedles * n * kKvHeads),
      100.0 * exact_centroid / (kNeedles * n * kKvHeads));
  EXPECT_GE(recall_two, recall_centroid);
  EXPECT_GE(recall_two, 0.9);
}

}  // namespace
}  // namespace kvwave::engine
