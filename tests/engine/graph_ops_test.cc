// Tests of the per-segment graph (engine/graph_ops.h): a graph built from a sealed segment equals
// the benchmark's build (index::GraphIndex::Build on the same float32 keys, options and seed), for
// f32 and f16 segments with sinks and a cluster-permuted layout; graph retrieval with a full
// beam, and retrieval of segments without a graph, equal the exact top-k (float64 reference) over
// the segments and the tail; a graph survives encode/decode/FromParts over the segment's keys;
// bad arguments are errors. Printed seeds; KVWAVE_TEST_SEED overrides them.
#include "engine/graph_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "index/graph_codec.h"

namespace kvwave::engine {
namespace {

uint64_t Seed(uint64_t fallback) {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : fallback;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

constexpr int kDim = 32;

// One (layer, KV head): float32 keys by position (what the caller appended, rounded to the
// dtype), the sealed segments, and the tail.
struct Fixture {
  DType dtype;
  std::vector<float> keys;    // [positions x d], as stored (rounded to dtype)
  std::vector<float> values;  // [positions x d], as stored
  std::vector<float> queries;
  store::MemoryBudget budget{int64_t{1} << 30};
  std::unique_ptr<store::HeadKv> head;

  Fixture(DType dt, int segments, int32_t seg_tokens, int32_t tail_tokens, uint64_t seed)
      : dtype(dt) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    const int64_t n = int64_t{segments} * seg_tokens + tail_tokens;
    std::vector<float> raw(static_cast<size_t>(n * kDim));
    for (auto& x : raw) x = normal(rng);
    std::vector<std::byte> stored(raw.size() * ElementSize(dt));
    FromFloat(raw.data(), dt, stored.data(), raw.size());
    keys.resize(raw.size());
    ToFloat(stored.data(), dt, keys.data(), raw.size());
    for (auto& x : raw) x = normal(rng);
    std::vector<std::byte> stored_values(raw.size() * ElementSize(dt));
    FromFloat(raw.data(), dt, stored_values.data(), raw.size());
    values.resize(raw.size());
    ToFloat(stored_values.data(), dt, values.data(), raw.size());
    queries.resize(static_cast<size_t>(n * 2 * kDim));  // 2 query heads per token
    for (auto& x : queries) x = normal(rng) + 0.3f;
    head = std::make_unique<store::HeadKv>(store::Tail(kDim, dt, store::DefaultHostAllocator()));
    const size_t row = kDim * ElementSize(dt);
    for (int s = 0; s < segments; ++s) {
      const int32_t steady = s == 0 ? 4 : 0, clusters = 7;
      std::vector<int32_t> assignment(seg_tokens - steady), sizes(clusters, 0);
      for (size_t i = 0; i < assignment.size(); ++i)
        ++sizes[assignment[i] = (i * 5 + 3) % clusters];
      std::vector<float> centroids(clusters * kDim, 0.0f);
      store::MemoryCharge reserved =
          budget.Reserve(store::Segment::MaxBytes(seg_tokens, kDim, dt, 8, 16)).value();
      store::SegmentInput in;
      in.first_position = int64_t{s} * seg_tokens;
      in.num_tokens = seg_tokens;
      in.steady_tokens = steady;
      in.head_dim = kDim;
      in.dtype = dt;
      in.keys = stored.data() + in.first_position * row;
      in.values = stored_values.data() + in.first_position * row;
      in.num_clusters = clusters;
      in.assignment = assignment;
      in.centroids = centroids;
      in.sizes = sizes;
      head->segments.push_back(
          store::Segment::Build(in, store::DefaultHostAllocator(), reserved).value());
    }
    const int64_t tail0 = int64_t{segments} * seg_tokens;
    head->tail.StartAt(tail0);
    if (tail_tokens > 0) {
      store::MemoryCharge charge = budget.Reserve(2 * tail_tokens * row).value();
      EXPECT_TRUE(head->tail
                      .Append(stored.data() + tail0 * row, stored_values.data() + tail0 * row,
                              tail_tokens, row, std::move(charge))
                      .ok());
    }
  }

  HeadParams Params() const {
    HeadParams p;
    p.head_dim = kDim;
    p.dtype = dtype;
    p.group = 2;
    return p;
  }
  // The prefill queries of segment s's tokens (both query heads), token-major.
  std::span<const float> SegmentQueries(int s) const {
    const store::Segment& seg = *head->segments[s];
    return {queries.data() + seg.first_position() * 2 * kDim,
            static_cast<size_t>(seg.num_tokens()) * 2 * kDim};
  }
};

index::GraphIndexOptions SmallOptions() {
  index::GraphIndexOptions o;
  o.query_neighbors = 20;
  o.max_degree = 12;
  o.max_queries = 300;
  o.pivots_per_query = 4;
  o.seed = 5;
  return o;
}

TEST(GraphOpsTest, SegmentGraphEqualsTheBenchBuildForTheSameSeed) {
  for (DType dt : {DType::kF32, DType::kF16}) {
    Fixture f(dt, 2, 400, 0, Seed(31));
    for (int s = 0; s < 2; ++s) {
      const store::Segment& seg = *f.head->segments[s];
      auto graph = BuildSegmentGraph(seg, f.SegmentQueries(s), SmallOptions());
      ASSERT_TRUE(graph.ok()) << graph.status();
      const std::span<const float> q = f.SegmentQueries(s);
      auto bench = index::GraphIndex::Build(
          f.keys.data() + seg.first_position() * kDim, seg.num_tokens(), q.data(),
          static_cast<int64_t>(q.size() / kDim), kDim, SmallOptions());
      ASSERT_TRUE(bench.ok()) << bench.status();
      EXPECT_EQ((*graph)->ToParts(), bench->ToParts()) << "dtype " << static_cast<int>(dt);
    }
  }
}

// Exact top-k over every position by a float64 reference, scores scaled by 1/sqrt(d).
std::vector<int64_t> ReferenceTopK(const Fixture& f, const float* q, int k) {
  const int64_t n = static_cast<int64_t>(f.keys.size()) / kDim;
  std::vector<std::pair<double, int64_t>> scored;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < kDim; ++j) s += double{q[j]} * f.keys[i * kDim + j];
    scored.emplace_back(-s, i);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<int64_t> top;
  for (int i = 0; i < k; ++i) top.push_back(scored[i].second);
  return top;
}

TEST(GraphOpsTest, FullBeamAndNoGraphBothGiveTheExactTopK) {
  Fixture f(DType::kF32, 3, 300, 57, Seed(32));
  std::vector<std::shared_ptr<const index::GraphIndex>> graphs(3), none(3);
  for (int s = 0; s < 3; ++s) {
    if (s == 1) continue;  // one segment without a graph (not built yet): scanned exactly
    graphs[s] =
        BuildSegmentGraph(*f.head->segments[s], f.SegmentQueries(s), SmallOptions()).value();
  }
  std::mt19937_64 rng(Seed(33));
  std::normal_distribution<float> normal;
  const int k = 10;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> q(2 * kDim);
    for (auto& x : q) x = normal(rng) + 0.3f;
    for (const auto* set : {&graphs, &none}) {
      std::vector<int64_t> positions(2 * k);
      std::vector<float> scores(2 * k);
      RetrieveStats stats;
      ASSERT_TRUE(RetrieveGraphHead(f.Params(), *f.head, *set, q.data(), k, 100000,
                                    positions.data(), scores.data(), &stats)
                      .ok());
      for (int h = 0; h < 2; ++h) {
        const std::vector<int64_t> want = ReferenceTopK(f, q.data() + h * kDim, k);
        const std::vector<int64_t> got(positions.begin() + h * k, positions.begin() + (h + 1) * k);
        EXPECT_EQ(got, want) << "trial " << trial << " head " << h;
        for (int i = 0; i + 1 < k; ++i) EXPECT_GE(scores[h * k + i], scores[h * k + i + 1]);
      }
      EXPECT_EQ(stats.keys_total, 2 * (3 * 300 + 57));
      EXPECT_GT(stats.keys_scored, 0);
    }
  }
}

TEST(GraphOpsTest, SmallBeamScansFewerKeysWithHighRecall) {
  Fixture f(DType::kF32, 1, 2000, 0, Seed(34));
  index::GraphIndexOptions o = SmallOptions();
  o.max_queries = 2000;
  std::vector<std::shared_ptr<const index::GraphIndex>> graphs = {
      BuildSegmentGraph(*f.head->segments[0], f.SegmentQueries(0), o).value()};
  const int k = 10;
  int found = 0, wanted = 0;
  RetrieveStats stats;
  for (int i = 0; i < 50; ++i) {  // prefill queries of this segment, as decode queries would be
    const float* q = f.queries.data() + int64_t{i} * 37 * 2 * kDim;
    std::vector<int64_t> positions(2 * k);
    std::vector<float> scores(2 * k);
    ASSERT_TRUE(RetrieveGraphHead(f.Params(), *f.head, graphs, q, k, 64, positions.data(),
                                  scores.data(), &stats)
                    .ok());
    for (int h = 0; h < 2; ++h) {
      const std::vector<int64_t> want = ReferenceTopK(f, q + h * kDim, k);
      for (int64_t w : want) {
        found += std::count(positions.begin() + h * k, positions.begin() + (h + 1) * k, w);
      }
      wanted += k;
    }
  }
  std::printf("recall@%d %.3f, keys scored %ld of %ld\n", k, static_cast<double>(found) / wanted,
              static_cast<long>(stats.keys_scored), static_cast<long>(stats.keys_total));
  EXPECT_GE(static_cast<double>(found) / wanted, 0.9);
  EXPECT_LT(stats.keys_scored, stats.keys_total / 2);  // far fewer than a flat scan
}

// Attention of q (one head) over `positions` of the fixture, float64: out [d], lse.
void ReferenceAttention(const Fixture& f, const float* q, const std::vector<int64_t>& positions,
                        std::vector<double>& out, double& lse) {
  const double scale = 1.0 / std::sqrt(double{kDim});
  std::vector<double> s;
  for (int64_t pos : positions) {
    double dot = 0;
    for (int j = 0; j < kDim; ++j) dot += double{q[j]} * f.keys[pos * kDim + j];
    s.push_back(dot * scale);
  }
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0;
  out.assign(kDim, 0.0);
  for (size_t i = 0; i < positions.size(); ++i) {
    const double w = std::exp(s[i] - mx);
    sum += w;
    for (int j = 0; j < kDim; ++j) out[j] += w * f.values[positions[i] * kDim + j];
  }
  for (double& x : out) x /= sum;
  lse = mx + std::log(sum);
}

// RetrievalAttention's split (AttendGraphHead) against float64 attention over the tokens it
// must pick: the sinks, the tail, every token of a segment without a graph, and per query head
// the best top_k of the graphs' own searches (sinks excluded); then, with a beam and top_k past
// every segment's size, exact attention over everything.
TEST(GraphOpsTest, GraphAttentionEqualsTheReferenceOverItsTokens) {
  for (DType dt : {DType::kF32, DType::kF16}) {
    Fixture f(dt, 3, 300, 57, Seed(38));
    std::vector<std::shared_ptr<const index::GraphIndex>> graphs(3);
    for (int s : {0, 2}) {  // segment 1 has no graph: attended exactly
      graphs[s] =
          BuildSegmentGraph(*f.head->segments[s], f.SegmentQueries(s), SmallOptions()).value();
    }
    std::mt19937_64 rng(Seed(39));
    std::normal_distribution<float> normal;
    const int64_t n = static_cast<int64_t>(f.keys.size()) / kDim;
    for (int trial = 0; trial < 10; ++trial) {
      std::vector<float> q(2 * kDim);
      for (auto& x : q) x = normal(rng) + 0.3f;
      for (const auto& [top_k, beam] : {std::pair{12, 30}, std::pair{100000, 100000}}) {
        std::vector<float> out(2 * kDim), lse(2);
        AttendStats stats;
        ASSERT_TRUE(AttendGraphHead(f.Params(), *f.head, graphs, q.data(), top_k, beam, out.data(),
                                    lse.data(), &stats)
                        .ok());
        int64_t graph_tokens = 0;
        for (int h = 0; h < 2; ++h) {
          const float* qh = q.data() + h * kDim;
          std::vector<int64_t> positions = {0, 1, 2, 3};                 // sinks
          for (int64_t t = 3 * 300; t < n; ++t) positions.push_back(t);  // tail
          for (int64_t t = 300; t < 600; ++t) positions.push_back(t);    // no graph
          std::vector<std::pair<float, int64_t>> hits;
          for (int s : {0, 2}) {
            const index::GraphSearchResult r = graphs[s]->Search(qh, top_k, std::max(beam, top_k));
            for (size_t i = 0; i < r.ids.size(); ++i) {
              if (s == 0 && r.ids[i] < 4) continue;
              hits.emplace_back(r.scores[i], int64_t{s} * 300 + r.ids[i]);
            }
          }
          std::sort(hits.begin(), hits.end(), [](auto& a, auto& b) { return a.first > b.first; });
          hits.resize(std::min<size_t>(hits.size(), top_k));
          graph_tokens += static_cast<int64_t>(hits.size());
          for (const auto& hit : hits) positions.push_back(hit.second);
          if (top_k > n) {
            EXPECT_EQ(static_cast<int64_t>(positions.size()), n);  // everything
          }
          std::vector<double> want;
          double want_lse;
          ReferenceAttention(f, qh, positions, want, want_lse);
          double num = 0, den = 0;
          for (int j = 0; j < kDim; ++j) {
            num += std::pow(out[h * kDim + j] - want[j], 2);
            den += std::pow(want[j], 2);
          }
          EXPECT_LT(std::sqrt(num / den), 1e-5)
              << "dtype " << static_cast<int>(dt) << " trial " << trial << " top_k " << top_k;
          EXPECT_NEAR(lse[h], want_lse, 1e-5 * std::max(1.0, std::abs(want_lse)));
        }
        EXPECT_EQ(stats.steady_tokens, 4 + 57);
        EXPECT_EQ(stats.retrieved_tokens, graph_tokens + 300);
        EXPECT_GT(stats.graph_keys_scored, 0);
      }
    }
  }
  Fixture f(DType::kF32, 1, 100, 0, Seed(40));
  std::vector<std::shared_ptr<const index::GraphIndex>> none(1);
  std::vector<float> q(2 * kDim, 1.0f), out(2 * kDim), lse(2);
  EXPECT_FALSE(
      AttendGraphHead(f.Params(), *f.head, none, q.data(), 0, 10, out.data(), lse.data(), nullptr)
          .ok());
}

TEST(GraphOpsTest, GraphRoundTripsThroughItsRecordOverTheSegmentKeys) {
  Fixture f(DType::kF16, 1, 500, 0, Seed(35));
  const store::Segment& seg = *f.head->segments[0];
  auto graph = BuildSegmentGraph(seg, f.SegmentQueries(0), SmallOptions()).value();
  const std::string bytes = index::EncodeGraph(graph->ToParts());
  auto parts = index::DecodeGraph(bytes);
  ASSERT_TRUE(parts.ok()) << parts.status();
  const std::vector<float> keys = SegmentKeysInTokenOrder(seg);
  auto back = index::GraphIndex::FromParts(keys.data(), seg.num_tokens(), kDim, *std::move(parts));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToParts(), graph->ToParts());
  const float* q = f.queries.data();
  EXPECT_EQ(back->Search(q, 10, 30).ids, graph->Search(q, 10, 30).ids);
}

TEST(GraphOpsTest, BadArgumentsAreErrors) {
  Fixture f(DType::kF32, 2, 200, 0, Seed(36));
  const store::Segment& seg = *f.head->segments[0];
  EXPECT_FALSE(BuildSegmentGraph(seg, {}, SmallOptions()).ok());
  std::vector<float> ragged(kDim + 1, 1.0f);
  EXPECT_FALSE(BuildSegmentGraph(seg, ragged, SmallOptions()).ok());
  std::vector<std::shared_ptr<const index::GraphIndex>> three(3), two(2);
  std::vector<float> q(2 * kDim, 1.0f);
  std::vector<int64_t> positions(20);
  std::vector<float> scores(20);
  EXPECT_FALSE(RetrieveGraphHead(f.Params(), *f.head, three, q.data(), 10, 20, positions.data(),
                                 scores.data(), nullptr)
                   .ok());
  EXPECT_FALSE(RetrieveGraphHead(f.Params(), *f.head, two, q.data(), 0, 20, positions.data(),
                                 scores.data(), nullptr)
                   .ok());
  // A graph over another number of tokens than its segment's.
  Fixture g(DType::kF32, 1, 150, 0, Seed(37));
  two[1] = BuildSegmentGraph(*g.head->segments[0], g.SegmentQueries(0), SmallOptions()).value();
  EXPECT_FALSE(RetrieveGraphHead(f.Params(), *f.head, two, q.data(), 10, 20, positions.data(),
                                 scores.data(), nullptr)
                   .ok());
}

}  // namespace
}  // namespace kvwave::engine
