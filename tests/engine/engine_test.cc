// Engine tests: exactness at a 100% budget, sealing across uneven chunks, Gather round trips,
// Retrieve against a brute-force top-k, the memory limit, and bad arguments.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "config/dtype.h"

namespace kvwave::engine {
namespace {

config::Settings SmallSettings() {
  config::Settings s;
  s.prefill_segment_tokens = 256;
  s.decode_segment_tokens = 64;
  s.recent_tokens = 16;
  s.sink_tokens = 4;
  s.compute_threads = 2;
  return s;
}

// Token-major K/V of one layer: [n x kv_heads x d] floats, plus their encoding in `dtype`.
struct LayerData {
  std::vector<float> k, v;  // values as stored (already rounded to dtype)
  std::vector<std::byte> k_bytes, v_bytes;
};

LayerData RandomLayer(std::mt19937& rng, int64_t n, const store::ModelShape& shape) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t count = n * shape.kv_heads * shape.head_dim;
  LayerData d;
  d.k.resize(count);
  d.v.resize(count);
  for (auto& x : d.k) x = normal(rng) + 0.3f;  // a shared offset, like real keys
  for (auto& x : d.v) x = normal(rng);
  const size_t es = ElementSize(shape.dtype);
  d.k_bytes.resize(count * es);
  d.v_bytes.resize(count * es);
  FromFloat(d.k.data(), shape.dtype, d.k_bytes.data(), count);
  FromFloat(d.v.data(), shape.dtype, d.v_bytes.data(), count);
  ToFloat(d.k_bytes.data(), shape.dtype, d.k.data(), count);  // the rounded values
  ToFloat(d.v_bytes.data(), shape.dtype, d.v.data(), count);
  return d;
}

// Float64 exact attention of query head h over all n tokens.
void ReferenceAttention(const LayerData& d, const store::ModelShape& s, int64_t n,
                        const std::vector<float>& q, int h, std::vector<double>& out, double& lse) {
  const int kvh = h / s.group();
  const int dim = s.head_dim;
  std::vector<double> logit(n);
  double m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    double dot = 0;
    for (int j = 0; j < dim; ++j) {
      dot += double{q[h * dim + j]} * d.k[(t * s.kv_heads + kvh) * dim + j];
    }
    logit[t] = dot / std::sqrt(double(dim));
    m = std::max(m, logit[t]);
  }
  double z = 0;
  out.assign(dim, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const double w = std::exp(logit[t] - m);
    z += w;
    for (int j = 0; j < dim; ++j) out[j] += w * d.v[(t * s.kv_heads + kvh) * dim + j];
  }
  for (auto& x : out) x /= z;
  lse = m + std::log(z);
}

double RelativeError(const float* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    num += (got[j] - want[j]) * (got[j] - want[j]);
    den += want[j] * want[j];
  }
  return std::sqrt(num / den);
}

// Appends `n` tokens of `d` to `layer` in random chunk sizes.
void AppendInChunks(Engine& e, ContextId id, int layer, const LayerData& d,
                    const store::ModelShape& s, int64_t n, std::mt19937& rng) {
  const int64_t tb = s.TokenBytesPerLayer();
  std::uniform_int_distribution<int64_t> chunk(1, 97);
  for (int64_t at = 0; at < n;) {
    const int64_t c = std::min(n - at, chunk(rng));
    ASSERT_TRUE(e.Append(id, layer, c, std::span(d.k_bytes).subspan(at * tb, c * tb),
                         std::span(d.v_bytes).subspan(at * tb, c * tb))
                    .ok());
    at += c;
  }
}

struct ShapeCase {
  int q_heads, kv_heads, head_dim;
  DType dtype;
};

class EngineExactTest : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(EngineExactTest, FullBudgetEqualsExactAttention) {
  const ShapeCase c = GetParam();
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  store::ModelShape shape{2, c.q_heads, c.kv_heads, c.head_dim, c.dtype};
  auto engine = Engine::Create(SmallSettings()).value();
  const ContextId id = engine->Open({shape}).value().id;
  const int64_t n = 700;  // 2 prefill segments + tail, then decode segments
  std::vector<LayerData> layers;
  for (int l = 0; l < 2; ++l) layers.push_back(RandomLayer(rng, n, shape));
  // Layers in reverse order, uneven chunks, an explicit Seal in the middle.
  for (int l = 1; l >= 0; --l) AppendInChunks(*engine, id, l, layers[l], shape, 600, rng);
  ASSERT_TRUE(engine->Seal(id).ok());
  const int64_t tb = shape.TokenBytesPerLayer();
  for (int l = 0; l < 2; ++l) {
    for (int64_t t = 600; t < n; ++t) {  // decode: one token at a time
      ASSERT_TRUE(engine
                      ->Append(id, l, 1, std::span(layers[l].k_bytes).subspan(t * tb, tb),
                               std::span(layers[l].v_bytes).subspan(t * tb, tb))
                      .ok());
    }
  }
  ContextInfo info = engine->Info(id).value();
  EXPECT_EQ(info.tokens_per_layer, (std::vector<int64_t>{n, n}));
  EXPECT_GE(info.sealed_segments, 2 * c.kv_heads * 3);

  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> q(shape.q_heads * shape.head_dim);
    for (auto& x : q) x = normal(rng) * 0.5f + 0.2f;
    std::vector<float> out(q.size()), lse(shape.q_heads);
    AttendStats stats;
    ASSERT_TRUE(engine->Attend(id, l, q, {1.0, 0.0}, out, lse, &stats).ok());
    EXPECT_EQ(stats.steady_tokens + stats.retrieved_tokens, n * shape.kv_heads);
    for (int h = 0; h < shape.q_heads; ++h) {
      std::vector<double> want;
      double want_lse;
      ReferenceAttention(layers[l], shape, n, q, h, want, want_lse);
      EXPECT_LT(RelativeError(out.data() + h * shape.head_dim, want), 2e-5) << "head " << h;
      EXPECT_NEAR(lse[h], want_lse, 1e-4 * std::max(1.0, std::abs(want_lse)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, EngineExactTest,
                         ::testing::Values(ShapeCase{4, 1, 128, DType::kF32},
                                           ShapeCase{8, 2, 64, DType::kBF16},
                                           ShapeCase{8, 8, 64, DType::kF16},
                                           ShapeCase{16, 2, 128, DType::kBF16}));

TEST(EngineTest, GatherReturnsEveryTokenAfterSealing) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  store::ModelShape shape{1, 4, 2, 64, DType::kBF16};
  auto engine = Engine::Create(SmallSettings()).value();
  const ContextId id = engine->Open({shape}).value().id;
  const int64_t n = 1000;
  LayerData d = RandomLayer(rng, n, shape);
  AppendInChunks(*engine, id, 0, d, shape, n, rng);
  std::vector<int64_t> positions(n);
  for (int64_t i = 0; i < n; ++i) positions[i] = (i * 7919) % n;  // a permutation
  const int64_t tb = shape.TokenBytesPerLayer();
  std::vector<std::byte> k(n * tb), v(n * tb);
  auto expect_all = [&] {
    ASSERT_TRUE(engine->Gather(id, 0, positions, k, v).ok());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(std::memcmp(k.data() + i * tb, d.k_bytes.data() + positions[i] * tb, tb), 0) << i;
      ASSERT_EQ(std::memcmp(v.data() + i * tb, d.v_bytes.data() + positions[i] * tb, tb), 0) << i;
    }
  };
  expect_all();                       // whatever the background seals have published by now
  ASSERT_TRUE(engine->Flush().ok());  // every queued seal done
  EXPECT_GE(engine->Info(id).value().sealed_segments, 2 * 3);
  expect_all();
}

TEST(EngineTest, FlatRetrieveMatchesBruteForceTopK) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  store::ModelShape shape{1, 4, 1, 128, DType::kF32};
  auto engine = Engine::Create(SmallSettings()).value();
  const ContextId id = engine->Open({shape}).value().id;
  const int64_t n = 900;
  LayerData d = RandomLayer(rng, n, shape);
  AppendInChunks(*engine, id, 0, d, shape, n, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(4 * 128);
  for (auto& x : q) x = normal(rng);
  RetrieveOptions opt;
  opt.k = 50;
  opt.method = RetrieveMethod::kFlat;
  std::vector<int64_t> pos(4 * 50);
  std::vector<float> scores(4 * 50);
  RetrieveStats stats;
  ASSERT_TRUE(engine->Retrieve(id, 0, q, opt, pos, scores, &stats).ok());
  EXPECT_EQ(stats.keys_total, 4 * n);
  for (int h = 0; h < 4; ++h) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int j = 0; j < 128; ++j) dot += double{q[h * 128 + j]} * d.k[t * 128 + j];
      all.emplace_back(-dot, t);
    }
    std::sort(all.begin(), all.end());
    for (int i = 0; i < 50; ++i) EXPECT_EQ(pos[h * 50 + i], all[i].second) << h << " " << i;
  }
  // The wave search scores fewer keys and still finds most of the top-k (once the background
  // seals are published: until then every token is in the tail, scored exactly).
  ASSERT_TRUE(engine->Flush().ok());
  opt.method = RetrieveMethod::kWave;
  opt.cluster_budget = 0.3;
  RetrieveStats wave_stats;
  ASSERT_TRUE(engine->Retrieve(id, 0, q, opt, pos, scores, &wave_stats).ok());
  EXPECT_LT(wave_stats.keys_scored, wave_stats.keys_total);
}

TEST(EngineTest, MemoryLimitRejectsAppendAndChangesNothing) {
  config::Settings s = SmallSettings();
  s.memory_limit_bytes = 1 << 20;
  auto engine = Engine::Create(s).value();
  store::ModelShape shape{1, 4, 1, 128, DType::kF32};
  const ContextId id = engine->Open({shape}).value().id;
  const int64_t opened = engine->Stats().memory_used_bytes;  // the context's own bookkeeping
  EXPECT_GT(opened, 0);
  std::mt19937 rng(7);
  const int64_t n = 1000;  // 1000 * 2 * 512 B = 1 MB of K/V plus index: over the limit
  LayerData d = RandomLayer(rng, n, shape);
  ASSERT_TRUE(engine
                  ->Append(id, 0, 100, std::span(d.k_bytes).first(100 * 512),
                           std::span(d.v_bytes).first(100 * 512))
                  .ok());
  const int64_t used = engine->Stats().memory_used_bytes;
  EXPECT_EQ(used - opened, 2 * 100 * 512);
  absl::Status st = engine->Append(id, 0, n, d.k_bytes, d.v_bytes);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(engine->Stats().memory_used_bytes, used);
  EXPECT_EQ(engine->Info(id).value().tokens_per_layer[0], 100);
  ASSERT_TRUE(engine->Close(id).ok());
  EXPECT_EQ(engine->Stats().memory_used_bytes, 0);
}

TEST(EngineTest, BadArgumentsReturnErrors) {
  auto engine = Engine::Create(SmallSettings()).value();
  store::ModelShape bad{1, 6, 4, 128, DType::kF32};  // 6 query heads over 4 KV heads
  EXPECT_EQ(engine->Open({bad}).status().code(), absl::StatusCode::kInvalidArgument);
  bad = {1, 4, 1, 100, DType::kF32};  // head dim not a multiple of 8
  EXPECT_EQ(engine->Open({bad}).status().code(), absl::StatusCode::kInvalidArgument);

  store::ModelShape shape{2, 4, 1, 64, DType::kF32};
  const ContextId id = engine->Open({shape}).value().id;
  std::vector<std::byte> k(3 * 256), v(3 * 256);
  EXPECT_EQ(engine->Append(id + 99, 0, 3, k, v).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine->Append(id, 2, 3, k, v).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Append(id, -1, 3, k, v).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Append(id, 0, 4, k, v).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(engine->Append(id, 0, 3, k, v).ok());
  std::vector<float> q(4 * 64, 0.5f), out(4 * 64), lse(4);
  std::vector<float> short_q(3 * 64, 0.5f);
  EXPECT_EQ(engine->Attend(id, 0, short_q, {}, out, lse, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Attend(id, 0, q, {0.9, 0.9}, out, lse, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine->Attend(id, 0, q, {}, out, lse, nullptr).ok());
  std::vector<int64_t> pos = {0, 3};
  std::vector<std::byte> gk(2 * 256), gv(2 * 256);
  EXPECT_EQ(engine->Gather(id, 0, pos, gk, gv).code(), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(engine->Close(id).ok());
  EXPECT_EQ(engine->Close(id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine->Attend(id, 0, q, {}, out, lse, nullptr).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvwave::engine
