// Tests of the RetrievalAttention graph index: exactness with a full queue, reachability,
// determinism, the parallel multi-head search, and argument errors. Random data, printed seeds.
#include "index/graph_index.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace kvwave::index {
namespace {

std::vector<float> RandomRows(int64_t n, int d, uint64_t seed, float shift) {
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> rows(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < d; ++j) rows[i * d + j] = normal(rng) + (j % 3 == 0 ? shift : 0.0f);
  }
  return rows;
}

// Exact top-k by a float64 reference.
std::vector<int32_t> ReferenceTopK(const std::vector<float>& keys, int64_t n, int d, const float* q,
                                   int k) {
  std::vector<std::pair<double, int32_t>> scored;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += double{q[j]} * keys[i * d + j];
    scored.emplace_back(-s, static_cast<int32_t>(i));
  }
  std::sort(scored.begin(), scored.end());
  std::vector<int32_t> top;
  for (int i = 0; i < k; ++i) top.push_back(scored[i].second);
  return top;
}

// (dimension, entry points, prune by inner product, position links)
class GraphIndexExactTest : public ::testing::TestWithParam<std::tuple<int, int, bool, int>> {};

TEST_P(GraphIndexExactTest, FullQueueFindsExactTopK) {
  const auto [d, entries, by_ip, position_links] = GetParam();
  const int64_t n = 600, m = 400;
  const std::vector<float> keys = RandomRows(n, d, 11 + d, 0.0f);
  const std::vector<float> queries = RandomRows(m, d, 12 + d, 0.7f);  // shifted: OOD queries
  GraphIndexOptions options;
  options.query_neighbors = 16;
  options.max_degree = 8;
  options.max_queries = 200;
  options.entry_points = entries;
  options.prune_by_ip = by_ip;
  options.position_links = position_links;
  auto graph = GraphIndex::Build(keys.data(), n, queries.data(), m, d, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  const std::set<int32_t> distinct(graph->entry_points().begin(), graph->entry_points().end());
  EXPECT_EQ(distinct.size(), graph->entry_points().size());  // each entry is scored once
  EXPECT_LE(static_cast<int>(distinct.size()), entries);
  EXPECT_GT(distinct.size(), entries > 1 ? 1u : 0u);
  const std::vector<float> tests = RandomRows(20, d, 13 + d, 0.7f);
  GraphSearchScratch scratch;
  for (int i = 0; i < 20; ++i) {
    const float* q = tests.data() + i * d;
    GraphSearchResult r = graph->Search(q, 10, static_cast<int>(n), &scratch);
    EXPECT_EQ(r.scanned, n);  // everything is reachable, so a full queue scores every key
    EXPECT_EQ(r.ids, ReferenceTopK(keys, n, d, q, 10)) << "query " << i;
    for (size_t j = 0; j < r.ids.size(); ++j) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += double{q[c]} * keys[r.ids[j] * d + c];
      EXPECT_NEAR(r.scores[j], s, 1e-4 * std::max(1.0, std::abs(s)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, GraphIndexExactTest,
                         ::testing::Values(std::make_tuple(32, 1, false, 0),
                                           std::make_tuple(20, 1, false, 1),
                                           std::make_tuple(32, 8, false, 2),
                                           std::make_tuple(20, 8, true, 0)));

TEST(GraphIndexTest, EveryKeyReachableFromEntry) {
  const int d = 16;
  const int64_t n = 800;
  const std::vector<float> keys = RandomRows(n, d, 21, 0.0f);
  const std::vector<float> queries = RandomRows(100, d, 22, 1.5f);  // few queries: many orphans
  GraphIndexOptions options;
  options.query_neighbors = 8;
  options.max_degree = 6;
  options.refine_queue = 0;
  options.position_links = 0;  // token-order links alone would connect everything
  auto graph = GraphIndex::Build(keys.data(), n, queries.data(), 100, d, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  std::vector<char> seen(n, 0);
  std::vector<int32_t> stack = {graph->entry_point()};
  seen[graph->entry_point()] = 1;
  while (!stack.empty()) {
    const int32_t u = stack.back();
    stack.pop_back();
    for (int32_t v : graph->Neighbors(u)) {
      ASSERT_GE(v, 0);
      ASSERT_LT(v, n);
      if (!seen[v]) {
        seen[v] = 1;
        stack.push_back(v);
      }
    }
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), n);
  EXPECT_GT(graph->connect_edges(), 0);
}

TEST(GraphIndexTest, SmallQueueHasHighRecall) {
  const int d = 32;
  const int64_t n = 2000;
  const std::vector<float> keys = RandomRows(n, d, 31, 0.0f);
  const std::vector<float> queries = RandomRows(2000, d, 32, 0.5f);
  auto graph = GraphIndex::Build(keys.data(), n, queries.data(), 2000, d, GraphIndexOptions{});
  ASSERT_TRUE(graph.ok()) << graph.status();
  const std::vector<float> tests = RandomRows(50, d, 33, 0.5f);
  double recall = 0;
  int64_t scanned = 0;
  for (int i = 0; i < 50; ++i) {
    GraphSearchResult r = graph->Search(tests.data() + i * d, 10, 64);
    const std::vector<int32_t> exact = ReferenceTopK(keys, n, d, tests.data() + i * d, 10);
    const std::set<int32_t> truth(exact.begin(), exact.end());
    for (int32_t id : r.ids) recall += truth.count(id) / 10.0;
    scanned += r.scanned;
  }
  EXPECT_GT(recall / 50, 0.85);
  EXPECT_LT(scanned / 50, n);  // a bounded queue scores only part of the keys
}

TEST(GraphIndexTest, PositionLinksJoinNeighbouringTokens) {
  const int d = 16;
  const int64_t n = 300;
  const std::vector<float> keys = RandomRows(n, d, 51, 0.0f);
  const std::vector<float> queries = RandomRows(200, d, 52, 0.5f);
  GraphIndexOptions options;
  options.position_links = 2;
  auto graph = GraphIndex::Build(keys.data(), n, queries.data(), 200, d, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  for (int32_t u = 0; u < n; ++u) {
    const auto out = graph->Neighbors(u);
    for (int32_t v = std::max(0, u - 2); v <= std::min<int32_t>(n - 1, u + 2); ++v) {
      if (v != u) {
        EXPECT_NE(std::find(out.begin(), out.end(), v), out.end()) << u << "->" << v;
      }
    }
    EXPECT_EQ(std::set<int32_t>(out.begin(), out.end()).size(), out.size()) << "key " << u;
  }
}

TEST(GraphIndexTest, BuildIsDeterministicForASeed) {
  const int d = 24;
  const int64_t n = 700, m = 900;
  const std::vector<float> keys = RandomRows(n, d, 41, 0.0f);
  const std::vector<float> queries = RandomRows(m, d, 42, 0.5f);
  GraphIndexOptions options;
  options.max_queries = 300;
  options.entry_points = 16;
  options.seed = 7;
  auto a = GraphIndex::Build(keys.data(), n, queries.data(), m, d, options);
  auto b = GraphIndex::Build(keys.data(), n, queries.data(), m, d, options);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(std::ranges::equal(a->entry_points(), b->entry_points()));
  ASSERT_EQ(a->num_edges(), b->num_edges());
  for (int32_t u = 0; u < n; ++u) {
    const auto na = a->Neighbors(u), nb = b->Neighbors(u);
    ASSERT_TRUE(std::equal(na.begin(), na.end(), nb.begin(), nb.end())) << "key " << u;
  }
  options.seed = 8;  // another sample of queries gives another graph
  auto c = GraphIndex::Build(keys.data(), n, queries.data(), m, d, options);
  ASSERT_TRUE(c.ok());
  bool differs = c->num_edges() != a->num_edges();
  for (int32_t u = 0; u < n && !differs; ++u) {
    const auto na = a->Neighbors(u), nc = c->Neighbors(u);
    differs = !std::equal(na.begin(), na.end(), nc.begin(), nc.end());
  }
  EXPECT_TRUE(differs);
}

TEST(GraphIndexTest, SearchHeadsMatchesSerialSearch) {
  const int d = 16;
  const int64_t n = 500;
  const std::vector<float> keys0 = RandomRows(n, d, 51, 0.0f), keys1 = RandomRows(n, d, 52, 0.0f);
  const std::vector<float> queries = RandomRows(400, d, 53, 0.3f);
  auto g0 = GraphIndex::Build(keys0.data(), n, queries.data(), 400, d, GraphIndexOptions{});
  auto g1 = GraphIndex::Build(keys1.data(), n, queries.data(), 400, d, GraphIndexOptions{});
  ASSERT_TRUE(g0.ok() && g1.ok());
  const GraphIndex* graphs[] = {&*g0, &*g1};
  const std::vector<float> heads = RandomRows(4, d, 54, 0.3f);  // 4 query heads over 2 graphs
  std::vector<GraphSearchResult> out;
  ASSERT_TRUE(SearchHeads(graphs, heads.data(), 4, 5, 32, &out).ok());
  ASSERT_EQ(out.size(), 4u);
  for (int h = 0; h < 4; ++h) {
    GraphSearchResult serial = graphs[h / 2]->Search(heads.data() + h * d, 5, 32);
    EXPECT_EQ(out[h].ids, serial.ids);
    EXPECT_EQ(out[h].scanned, serial.scanned);
  }
  EXPECT_FALSE(SearchHeads(graphs, heads.data(), 3, 5, 32, &out).ok());
}

TEST(GraphIndexTest, RecentEntriesAreScoredAndFullQueueStaysExact) {
  const int d = 16;
  const int64_t n = 500;
  const std::vector<float> keys = RandomRows(n, d, 81, 0.0f);
  const std::vector<float> queries = RandomRows(300, d, 82, 0.7f);
  GraphIndexOptions options;
  options.query_neighbors = 16;
  options.max_degree = 8;
  auto plain = GraphIndex::Build(keys.data(), n, queries.data(), 300, d, options);
  options.recent_entries = 7;
  auto recent = GraphIndex::Build(keys.data(), n, queries.data(), 300, d, options);
  ASSERT_TRUE(plain.ok() && recent.ok());
  ASSERT_EQ(plain->num_edges(), recent->num_edges());  // the build ignores it
  const std::vector<float> tests = RandomRows(10, d, 83, 0.7f);
  for (int i = 0; i < 10; ++i) {
    const float* q = tests.data() + i * d;
    GraphSearchResult r = recent->Search(q, 10, static_cast<int>(n));
    EXPECT_EQ(r.scanned, n);  // entries and recent keys are scored once each
    EXPECT_EQ(r.ids, ReferenceTopK(keys, n, d, q, 10)) << "query " << i;
    // With the smallest queue the last keys are still scored: at least as many as the entries.
    EXPECT_GE(recent->Search(q, 1, 1).scanned, 7);
  }
}

TEST(GraphIndexTest, RejectsBadArguments) {
  const std::vector<float> rows = RandomRows(10, 4, 61, 0.0f);
  EXPECT_FALSE(GraphIndex::Build(rows.data(), 0, rows.data(), 10, 4, {}).ok());
  EXPECT_FALSE(GraphIndex::Build(rows.data(), 10, rows.data(), 0, 4, {}).ok());
  EXPECT_FALSE(GraphIndex::Build(rows.data(), 10, rows.data(), 10, 0, {}).ok());
  GraphIndexOptions bad;
  bad.max_degree = 0;
  auto s = GraphIndex::Build(rows.data(), 10, rows.data(), 10, 4, bad);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  GraphIndexOptions bad_recent;
  bad_recent.recent_entries = -1;
  EXPECT_EQ(GraphIndex::Build(rows.data(), 10, rows.data(), 10, 4, bad_recent).status().code(),
            absl::StatusCode::kInvalidArgument);
  GraphIndexOptions no_entry;
  no_entry.entry_points = 0;
  EXPECT_EQ(GraphIndex::Build(rows.data(), 10, rows.data(), 10, 4, no_entry).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TopKIndicesTest, MatchesFullSortWithTiesByIndex) {
  std::mt19937_64 rng(71);
  std::vector<float> scores(1000);
  for (float& s : scores) s = static_cast<float>(rng() % 50) + 0.5f;  // many ties
  std::vector<int32_t> all(1000);
  for (int i = 0; i < 1000; ++i) all[i] = i;
  std::stable_sort(all.begin(), all.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  const std::vector<int32_t> top = TopKIndices(scores.data(), 1000, 37);
  EXPECT_EQ(top, std::vector<int32_t>(all.begin(), all.begin() + 37));
  EXPECT_EQ(TopKIndices(scores.data(), 5, 10).size(), 5u);
}

}  // namespace
}  // namespace kvwave::index
