// The RetrievalAttention graph through the engine (issue 19): AppendWithQueries holds the prefill
// queries (charged) until the segment's seal builds its graph, which equals the benchmark's build
// (GraphIndex::Build on the same keys, queries and options); Retrieve with method = graph and a
// full beam gives the flat top-k, and a small beam scores fewer keys; a context without queries
// (or with index.graph = off) has no graphs, says so in Info, and its graph Retrieve is refused
// (FAILED_PRECONDITION); graphs built by the background seal race Retrieve; bad query sizes are
// errors that change nothing. Printed seeds; KVWAVE_TEST_SEED overrides.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include "config/dtype.h"
#include "engine/engine.h"
#include "index/graph_index.h"
#include "rocksdb/db.h"
#include "store/persist.h"
#include "store/persist_format.h"

namespace kvwave::engine {
namespace {

uint64_t Seed(uint64_t fallback) {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : fallback;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

config::Settings GraphSettings(bool graph_on) {
  config::Settings s;
  s.prefill_segment_tokens = 512;
  s.decode_segment_tokens = 64;
  s.recent_tokens = 16;
  s.sink_tokens = 4;
  s.compute_threads = 2;
  s.graph = graph_on ? "on" : "off";
  s.graph_queries = 600;
  s.graph_degree = 16;
  return s;
}

const store::ModelShape kShape{1, 4, 2, 32, DType::kF32};  // 2 KV heads, group 2

struct Data {
  std::vector<float> k, v, q;  // [n x kv_heads x d], [n x q_heads x d]
};

Data RandomData(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  Data data;
  data.k.resize(n * kShape.kv_heads * kShape.head_dim);
  data.v.resize(data.k.size());
  data.q.resize(n * kShape.q_heads * kShape.head_dim);
  for (auto& x : data.k) x = normal(rng);
  for (auto& x : data.v) x = normal(rng);
  for (auto& x : data.q) x = normal(rng) + 0.3f;
  return data;
}

std::span<const std::byte> Bytes(const std::vector<float>& v, int64_t first, int64_t count) {
  return std::as_bytes(std::span(v)).subspan(first * sizeof(float), count * sizeof(float));
}

// Appends tokens [0, n) in chunks, with queries when `with_queries`.
void AppendAll(Engine& engine, ContextId id, const Data& data, int64_t n, bool with_queries) {
  const int64_t kv = kShape.kv_heads * kShape.head_dim, qd = kShape.q_heads * kShape.head_dim;
  for (int64_t t = 0; t < n; t += 100) {
    const int64_t c = std::min<int64_t>(100, n - t);
    absl::Status s =
        with_queries
            ? engine.AppendWithQueries(id, 0, c, Bytes(data.k, t * kv, c * kv),
                                       Bytes(data.v, t * kv, c * kv),
                                       std::span(data.q).subspan(t * qd, c * qd))
            : engine.Append(id, 0, c, Bytes(data.k, t * kv, c * kv), Bytes(data.v, t * kv, c * kv));
    ASSERT_TRUE(s.ok()) << s;
  }
}

TEST(GraphEngineTest, SealBuildsTheBenchGraphAndReleasesTheQueries) {
  auto engine = Engine::Create(GraphSettings(true)).value();
  const ContextId id = engine->Open({kShape}).value().id;
  const int64_t n = 1100;  // two prefill segments of 512 + a tail of 76
  const Data data = RandomData(n, Seed(41));
  const int64_t before = engine->Stats().memory_used_bytes;
  AppendAll(*engine, id, data, 300, true);
  ContextInfo info = engine->Info(id).value();
  EXPECT_EQ(info.query_tokens, 300 * kShape.kv_heads);  // held until sealed, and charged
  EXPECT_GE(engine->Stats().memory_used_bytes - before,
            300 * kShape.q_heads * kShape.head_dim * static_cast<int64_t>(sizeof(float)));
  // The rest (the first 300 again would be out of order: append tokens [300, n)).
  const int64_t kv = kShape.kv_heads * kShape.head_dim, qd = kShape.q_heads * kShape.head_dim;
  for (int64_t t = 300; t < n; t += 100) {
    const int64_t c = std::min<int64_t>(100, n - t);
    ASSERT_TRUE(engine
                    ->AppendWithQueries(id, 0, c, Bytes(data.k, t * kv, c * kv),
                                        Bytes(data.v, t * kv, c * kv),
                                        std::span(data.q).subspan(t * qd, c * qd))
                    .ok());
  }
  ASSERT_TRUE(engine->Flush().ok());  // the background seals (and their graphs) are done
  info = engine->Info(id).value();
  EXPECT_EQ(info.sealed_segments, 2 * kShape.kv_heads);
  EXPECT_EQ(info.graph_segments, 2 * kShape.kv_heads);
  EXPECT_EQ(info.query_tokens, (n - 2 * 512) * kShape.kv_heads);  // only the tail's remain

  // The graph of segment 1 of KV head 1 equals the benchmark's build on the same inputs: compare
  // what they retrieve with a small beam for many queries (the graph itself is internal).
  const int d = kShape.head_dim, group = 2, h = 1;
  std::vector<float> keys, queries;
  for (int64_t t = 512; t < 1024; ++t) {
    keys.insert(keys.end(), data.k.begin() + (t * 2 + h) * d, data.k.begin() + (t * 2 + h + 1) * d);
    queries.insert(queries.end(), data.q.begin() + (t * 4 + h * group) * d,
                   data.q.begin() + (t * 4 + (h + 1) * group) * d);
  }
  index::GraphIndexOptions options;  // the engine's: from its settings
  options.max_queries = 600;
  options.max_degree = 16;
  options.pivots_per_query = static_cast<int>(GraphSettings(true).graph_pivots);
  auto bench = index::GraphIndex::Build(keys.data(), 512, queries.data(), 1024, d, options);
  ASSERT_TRUE(bench.ok()) << bench.status();
  // With a beam of 10 the engine's answer from segment 1 is exactly its graph's search; so every
  // result of the bench graph's search that beats the engine's 10th score must be in the
  // engine's answer (at position 512 + id) — true only if the two graphs agree.
  std::mt19937_64 rng(Seed(42));
  std::normal_distribution<float> normal;
  int agree = 0, total = 0;
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<float> q(kShape.q_heads * d);
    for (auto& x : q) x = normal(rng) + 0.3f;
    RetrieveOptions ro;
    ro.method = RetrieveMethod::kGraph;
    ro.k = 10;
    ro.beam = 10;
    std::vector<int64_t> positions(kShape.q_heads * ro.k);
    std::vector<float> scores(positions.size());
    ASSERT_TRUE(engine->Retrieve(id, 0, q, ro, positions, scores, nullptr).ok());
    for (int qh = h * group; qh < (h + 1) * group; ++qh) {
      const index::GraphSearchResult r = bench->Search(q.data() + qh * d, 10, 10);
      for (size_t i = 0; i < r.ids.size(); ++i) {
        const int64_t pos = 512 + r.ids[i];
        // Every bench result that beats the engine's 10th score must be in the engine's answer.
        if (r.scores[i] / std::sqrt(float(d)) <= scores[qh * ro.k + ro.k - 1]) continue;
        ++total;
        agree +=
            std::count(positions.begin() + qh * ro.k, positions.begin() + (qh + 1) * ro.k, pos) > 0;
      }
    }
  }
  EXPECT_EQ(agree, total);
  EXPECT_GT(total, 0);
}

// Exact top-k positions of query head qh over tokens [0, n).
std::vector<int64_t> FlatTopK(const Data& data, int64_t n, const float* q, int qh, int k) {
  const int d = kShape.head_dim, kvh = qh / 2;
  std::vector<std::pair<double, int64_t>> s;
  for (int64_t t = 0; t < n; ++t) {
    double dot = 0;
    for (int j = 0; j < d; ++j) dot += double{q[qh * d + j]} * data.k[(t * 2 + kvh) * d + j];
    s.emplace_back(-dot, t);
  }
  std::sort(s.begin(), s.end());
  std::vector<int64_t> top;
  for (int i = 0; i < k; ++i) top.push_back(s[i].second);
  return top;
}

TEST(GraphEngineTest, FullBeamIsExactAndSmallBeamScoresFewerKeys) {
  for (const bool with_queries : {true, false}) {
    auto engine = Engine::Create(GraphSettings(true)).value();
    const ContextId id = engine->Open({kShape}).value().id;
    const int64_t n = 1600;
    const Data data = RandomData(n, Seed(43));
    AppendAll(*engine, id, data, n, with_queries);
    ASSERT_TRUE(engine->Flush().ok());  // the background seals (and their graphs) are done
    const ContextInfo info = engine->Info(id).value();
    EXPECT_EQ(info.graph_segments, with_queries ? info.sealed_segments : 0);
    EXPECT_GT(info.sealed_segments, 0);
    std::mt19937_64 rng(Seed(44));
    std::normal_distribution<float> normal;
    for (int trial = 0; trial < 10; ++trial) {
      std::vector<float> q(kShape.q_heads * kShape.head_dim);
      for (auto& x : q) x = normal(rng) + 0.3f;
      for (const int32_t beam : {100000, 24}) {
        RetrieveOptions ro;
        ro.method = RetrieveMethod::kGraph;
        ro.k = 8;
        ro.beam = beam;
        std::vector<int64_t> positions(kShape.q_heads * ro.k);
        std::vector<float> scores(positions.size());
        RetrieveStats stats;
        const absl::Status st = engine->Retrieve(id, 0, q, ro, positions, scores, &stats);
        if (!with_queries) {  // nothing to search: refused, not answered by a silent scan
          EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
          continue;
        }
        ASSERT_TRUE(st.ok()) << st;
        if (beam == 24) {  // the graphs score fewer keys than there are
          EXPECT_LT(stats.keys_scored, stats.keys_total);
          continue;
        }
        for (int qh = 0; qh < kShape.q_heads; ++qh) {
          const std::vector<int64_t> got(positions.begin() + qh * ro.k,
                                         positions.begin() + (qh + 1) * ro.k);
          EXPECT_EQ(got, FlatTopK(data, n, q.data(), qh, ro.k)) << "head " << qh;
        }
      }
    }
  }
}

// Attend with retrievalattention runs the steady zone through the backend (zero budgets, in a task
// of its own) and the graphs' tokens on the calling thread, merged by log-sum-exp: with a top-k
// and beam past every token, that is exact attention over all of them (float64 reference), and
// the steady zone is counted once (sinks + tail per KV head).
TEST(GraphEngineTest, RetrievalAttentionAtFullTopKIsExactAttention) {
  auto engine = Engine::Create(GraphSettings(true)).value();
  const ContextId id = engine->Open({kShape}).value().id;
  const int64_t n = 1600;  // three prefill segments of 512 and a tail of 64
  const Data data = RandomData(n, Seed(48));
  AppendAll(*engine, id, data, n, true);
  ASSERT_TRUE(engine->Flush().ok());
  ASSERT_EQ(engine->Info(id).value().graph_segments, 3 * kShape.kv_heads);
  std::mt19937_64 rng(Seed(49));
  std::normal_distribution<float> normal;
  const int d = kShape.head_dim;
  double worst = 0, worst_lse = 0;
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<float> q(kShape.q_heads * d);
    for (auto& x : q) x = normal(rng) + 0.3f;
    AttendBudget budget;
    budget.method = AttendMethod::kRetrievalAttention;
    budget.graph_top_k = 100000;
    budget.beam = 100000;
    std::vector<float> out(q.size(), std::nanf("")), lse(kShape.q_heads, std::nanf(""));
    AttendStats stats;
    ASSERT_TRUE(engine->Attend(id, 0, q, budget, out, lse, &stats).ok());
    EXPECT_EQ(stats.steady_tokens, (4 + (n - 3 * 512)) * kShape.kv_heads);
    for (int qh = 0; qh < kShape.q_heads; ++qh) {
      const int kvh = qh / 2;
      std::vector<double> logit(n);
      double m = -1e300;
      for (int64_t t = 0; t < n; ++t) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += double{q[qh * d + j]} * data.k[(t * 2 + kvh) * d + j];
        logit[t] = dot / std::sqrt(double(d));
        m = std::max(m, logit[t]);
      }
      double sum = 0;
      std::vector<double> want(d, 0.0);
      for (int64_t t = 0; t < n; ++t) {
        const double w = std::exp(logit[t] - m);
        sum += w;
        for (int j = 0; j < d; ++j) want[j] += w * data.v[(t * 2 + kvh) * d + j];
      }
      for (int j = 0; j < d; ++j) {
        worst = std::max(worst, std::fabs(want[j] / sum - out[qh * d + j]));
      }
      worst_lse = std::max(worst_lse, std::fabs(m + std::log(sum) - lse[qh]));
    }
  }
  std::printf("retrievalattention, full top-k, vs float64: out %.2e, lse %.2e\n", worst, worst_lse);
  EXPECT_LT(worst, 1e-5);
  EXPECT_LT(worst_lse, 1e-4);
}

// Graphs are built by the background seal while Retrieve runs: every answer stays the exact
// top-k of the tokens appended before it (full beam), whatever has been sealed or graphed yet.
TEST(GraphEngineTest, BackgroundGraphBuildsRaceRetrieve) {
  auto engine = Engine::Create(GraphSettings(true)).value();
  const ContextId id = engine->Open({kShape}).value().id;
  const int64_t n = 2200;
  const Data data = RandomData(n, Seed(46));
  std::mt19937_64 rng(Seed(47));
  std::normal_distribution<float> normal;
  const int64_t kv = kShape.kv_heads * kShape.head_dim, qd = kShape.q_heads * kShape.head_dim;
  int checks = 0;
  for (int64_t t = 0; t < n; t += 100) {
    ASSERT_TRUE(engine
                    ->AppendWithQueries(id, 0, 100, Bytes(data.k, t * kv, 100 * kv),
                                        Bytes(data.v, t * kv, 100 * kv),
                                        std::span(data.q).subspan(t * qd, 100 * qd))
                    .ok());
    std::vector<float> q(kShape.q_heads * kShape.head_dim);
    for (auto& x : q) x = normal(rng) + 0.3f;
    RetrieveOptions ro;
    ro.method = RetrieveMethod::kGraph;
    ro.k = 5;
    ro.beam = 100000;
    std::vector<int64_t> positions(kShape.q_heads * ro.k);
    std::vector<float> scores(positions.size());
    ASSERT_TRUE(engine->Retrieve(id, 0, q, ro, positions, scores, nullptr).ok());
    for (int qh = 0; qh < kShape.q_heads; ++qh) {
      const std::vector<int64_t> got(positions.begin() + qh * ro.k,
                                     positions.begin() + (qh + 1) * ro.k);
      EXPECT_EQ(got, FlatTopK(data, t + 100, q.data(), qh, ro.k)) << "after " << t + 100;
      ++checks;
    }
  }
  ASSERT_TRUE(engine->Flush().ok());
  const ContextInfo info = engine->Info(id).value();
  EXPECT_EQ(info.graph_segments, info.sealed_segments);
  EXPECT_GE(info.sealed_segments, 2 * kShape.kv_heads);
  EXPECT_EQ(checks, 22 * kShape.q_heads);
}

// Graphs travel with their segments: a second context attaching the prefix block (same engine)
// and a context attaching it after a restart (reloaded from RocksDB, its graph checked against
// the segment's keys) search the same graphs: the same answer, bit for bit, with the same keys
// scored, for Retrieve (small beam) and Attend (retrievalattention).
TEST(GraphEngineTest, GraphsAreSharedWithPrefixBlocksAndReloadedFromRocksDb) {
  const std::string dir =
      ::testing::TempDir() + "/kvwave_graph_persist_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  config::Settings s = GraphSettings(true);
  s.persist_path = dir;
  s.durability = "sync";
  const int64_t n = 2 * 512 + 16, block = 512;
  const Data data = RandomData(n, Seed(48));
  std::mt19937_64 rng(Seed(49));
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 30000);
  std::vector<float> q(kShape.q_heads * kShape.head_dim);
  std::normal_distribution<float> normal;
  for (auto& x : q) x = normal(rng) + 0.3f;
  struct Answer {
    std::vector<int64_t> positions;
    std::vector<float> scores, out, lse;
    int64_t keys_scored = 0, graph_keys_scored = 0;
    bool operator==(const Answer&) const = default;
  };
  auto ask = [&](Engine& engine, ContextId id) {
    Answer a;
    RetrieveOptions ro;
    ro.method = RetrieveMethod::kGraph;
    ro.k = 8;
    ro.beam = 24;
    a.positions.resize(kShape.q_heads * ro.k);
    a.scores.resize(a.positions.size());
    RetrieveStats rs;
    EXPECT_TRUE(engine.Retrieve(id, 0, q, ro, a.positions, a.scores, &rs).ok());
    a.keys_scored = rs.keys_scored;
    AttendBudget ra;
    ra.method = AttendMethod::kRetrievalAttention;
    ra.graph_top_k = 20;
    ra.beam = 24;
    a.out.resize(q.size());
    a.lse.resize(kShape.q_heads);
    AttendStats as;
    EXPECT_TRUE(engine.Attend(id, 0, q, ra, a.out, a.lse, &as).ok());
    a.graph_keys_scored = as.graph_keys_scored;
    return a;
  };
  const int64_t kv = kShape.kv_heads * kShape.head_dim;
  auto append_tail = [&](Engine& engine, ContextId id) {  // tokens past the shared blocks
    ASSERT_TRUE(engine
                    .Append(id, 0, n - 2 * block,
                            Bytes(data.k, 2 * block * kv, (n - 2 * block) * kv),
                            Bytes(data.v, 2 * block * kv, (n - 2 * block) * kv))
                    .ok());
  };
  Answer first;
  {
    auto engine = Engine::Create(s).value();
    const ContextId a = engine->Open({kShape, ids, "ns"}).value().id;
    AppendAll(*engine, a, data, n, /*with_queries=*/true);
    ASSERT_TRUE(engine->Flush().ok());  // sealed, graphed, registered and durable
    EXPECT_EQ(engine->Info(a).value().graph_segments, 2 * kShape.kv_heads);
    first = ask(*engine, a);
    EXPECT_GT(first.keys_scored, 0);
    EXPECT_GT(first.graph_keys_scored, 0);
    const OpenResult b = engine->Open({kShape, ids, "ns"}).value();
    EXPECT_EQ(b.matched_tokens, 2 * block);
    ContextInfo info = engine->Info(b.id).value();
    EXPECT_EQ(info.graph_segments, 2 * kShape.kv_heads);  // shared with the blocks
    EXPECT_FALSE(info.has_queries);
    append_tail(*engine, b.id);
    EXPECT_TRUE(ask(*engine, b.id) == first) << "shared block, same engine";
  }
  auto engine = Engine::Create(s).value();  // a restart: the blocks come back from RocksDB
  const OpenResult c = engine->Open({kShape, ids, "ns"}).value();
  EXPECT_EQ(c.matched_tokens, 2 * block);
  EXPECT_EQ(engine->Info(c.id).value().graph_segments, 2 * kShape.kv_heads);
  EXPECT_GT(engine->Stats().prefix_reloads, 0);
  append_tail(*engine, c.id);
  EXPECT_TRUE(ask(*engine, c.id) == first) << "reloaded from RocksDB";
  engine.reset();

  // A flipped byte in a graph record (its checksum): the block is corrupt, never served, counted.
  {
    store::PersistOptions po;
    po.path = dir;
    po.write_behind = false;
    auto persist = store::PersistStore::Open(po).value();
    std::string key, value;  // the first graph record: a segment key + 'g'
    std::unique_ptr<rocksdb::Iterator> it(persist->TEST_db()->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      if (it->key().size() == store::kSegmentKeyBytes + 1 && it->key()[0] == store::kSegmentTag) {
        key = it->key().ToString();
        value = it->value().ToString();
        break;
      }
    }
    ASSERT_FALSE(key.empty()) << "no graph record persisted";
    value[value.size() / 2] ^= 0x40;
    ASSERT_TRUE(persist->TEST_db()->Put(rocksdb::WriteOptions(), key, value).ok());
  }
  engine = Engine::Create(s).value();
  const OpenResult d = engine->Open({kShape, ids, "ns"}).value();
  EXPECT_LT(d.matched_tokens, 2 * block);  // the block of that graph (and any after it) dropped
  EXPECT_EQ(engine->Stats().persist_corrupt_records, 1);
  engine.reset();
  std::filesystem::remove_all(dir);
}

TEST(GraphEngineTest, GraphOffIgnoresQueriesAndBadQueriesChangeNothing) {
  auto engine = Engine::Create(GraphSettings(false)).value();
  const ContextId id = engine->Open({kShape}).value().id;
  const Data data = RandomData(700, Seed(45));
  AppendAll(*engine, id, data, 700, true);
  ContextInfo info = engine->Info(id).value();
  EXPECT_EQ(info.graph_segments, 0);
  EXPECT_EQ(info.query_tokens, 0);
  const int64_t kv = kShape.kv_heads * kShape.head_dim;
  std::vector<float> short_q(kShape.q_heads * kShape.head_dim * 3 - 1, 0.0f);
  EXPECT_FALSE(
      engine
          ->AppendWithQueries(id, 0, 3, Bytes(data.k, 0, 3 * kv), Bytes(data.v, 0, 3 * kv), short_q)
          .ok());
  std::vector<float> nan_q(kShape.q_heads * kShape.head_dim * 3, std::nanf(""));
  EXPECT_FALSE(
      engine->AppendWithQueries(id, 0, 3, Bytes(data.k, 0, 3 * kv), Bytes(data.v, 0, 3 * kv), nan_q)
          .ok());
  EXPECT_EQ(engine->Info(id).value().tokens_per_layer[0], 700);
}

}  // namespace
}  // namespace kvwave::engine
