// AttendBatch (issue 16 item 5): one call for a decode step of several contexts of different
// lengths equals one Attend per context, and bad batches are refused whole.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <vector>

#include "engine/engine.h"

namespace kvwave::engine {
namespace {

constexpr int kQHeads = 4, kKvHeads = 2, kDim = 32;

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

config::Settings Small() {
  config::Settings s;
  s.prefill_segment_tokens = 256;
  s.recent_tokens = 16;
  s.compute_threads = 2;
  return s;
}

TEST(BatchTest, EqualsOneAttendPerContext) {
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  auto engine = Engine::Create(Small()).value();
  const store::ModelShape shape{2, kQHeads, kKvHeads, kDim, DType::kF32};
  std::vector<AttendBatchItem> items;
  for (int64_t n : {0, 5, 300, 1100, 2000}) {  // empty, tail only, one segment, several
    const ContextId id = engine->Open({shape, {}, ""}).value().id;
    for (int l = 0; l < 2 && n > 0; ++l) {
      std::vector<float> k = Random(rng, n * kKvHeads * kDim), v = Random(rng, k.size());
      ASSERT_TRUE(
          engine->Append(id, l, n, std::as_bytes(std::span(k)), std::as_bytes(std::span(v))).ok());
    }
    ASSERT_TRUE(engine->Seal(id).ok());
    items.push_back({id, {0.05 * items.size(), 0.2}});
  }
  items.back().budget = {1.0, 0.0};
  const size_t b = items.size(), qd = kQHeads * kDim;
  const std::vector<float> q = Random(rng, b * qd);
  std::vector<float> out(b * qd), lse(b * kQHeads);
  std::vector<AttendStats> stats(b);
  ASSERT_TRUE(engine->AttendBatch(1, items, q, out, lse, stats).ok());
  for (size_t i = 0; i < b; ++i) {
    std::vector<float> o(qd), l(kQHeads);
    AttendStats s;
    ASSERT_TRUE(engine
                    ->Attend(items[i].context, 1, std::span(q).subspan(i * qd, qd), items[i].budget,
                             o, l, &s)
                    .ok());
    for (size_t j = 0; j < qd; ++j) ASSERT_EQ(out[i * qd + j], o[j]) << i << " " << j;
    for (int h = 0; h < kQHeads; ++h) ASSERT_EQ(lse[i * kQHeads + h], l[h]) << i;
    EXPECT_EQ(stats[i].total_clusters, s.total_clusters);
    EXPECT_EQ(stats[i].retrieved_tokens, s.retrieved_tokens);
    EXPECT_EQ(stats[i].steady_tokens, s.steady_tokens);
  }
  EXPECT_GT(stats.back().total_clusters, stats[2].total_clusters);  // lengths differ
  // Stats may be omitted.
  ASSERT_TRUE(engine->AttendBatch(1, items, q, out, lse, {}).ok());
}

TEST(BatchTest, BadBatchesAreRefusedWhole) {
  auto engine = Engine::Create(Small()).value();
  const store::ModelShape shape{1, kQHeads, kKvHeads, kDim, DType::kF32};
  const ContextId a = engine->Open({shape, {}, ""}).value().id;
  const ContextId b = engine->Open({shape, {}, ""}).value().id;
  const ContextId other =
      engine->Open({{1, kQHeads, kKvHeads, 2 * kDim, DType::kF32}, {}, ""}).value().id;
  const size_t qd = kQHeads * kDim;
  std::vector<float> q(2 * qd, 0.5f), out(2 * qd, -7.0f), lse(2 * kQHeads);
  auto code = [&](std::vector<AttendBatchItem> items, int layer = 0) {
    return engine
        ->AttendBatch(layer, items, std::span(q).first(items.size() * qd),
                      std::span(out).first(items.size() * qd),
                      std::span(lse).first(items.size() * kQHeads), {})
        .code();
  };
  EXPECT_EQ(code({}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{a, {}}, {a, {}}}), absl::StatusCode::kInvalidArgument);      // twice
  EXPECT_EQ(code({{a, {}}, {other, {}}}), absl::StatusCode::kInvalidArgument);  // shapes
  EXPECT_EQ(code({{a, {}}, {999, {}}}), absl::StatusCode::kNotFound);
  EXPECT_EQ(code({{a, {}}, {b, {0.9, 0.9}}}), absl::StatusCode::kInvalidArgument);  // budget
  EXPECT_EQ(code({{a, {}}, {b, {}}}, 1), absl::StatusCode::kInvalidArgument);       // layer
  for (float x : out) EXPECT_EQ(x, -7.0f);  // nothing written by a refused batch
  q[3] = NAN;
  EXPECT_EQ(code({{a, {}}, {b, {}}}), absl::StatusCode::kInvalidArgument);  // not finite
  q[3] = 0.5f;
  EXPECT_EQ(code({{a, {}}, {b, {}}}), absl::StatusCode::kOk);  // empty contexts: lse -inf
}

}  // namespace
}  // namespace kvwave::engine
