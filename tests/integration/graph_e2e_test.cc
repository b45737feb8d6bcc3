// RetrievalAttention through the real kvwaved (issue 19): prefill queries appended over the
// protocol (shared memory and TCP inline) build a graph per sealed segment; Info says whether a
// context has queries and graphs; Retrieve with method = graph and a full beam equals the flat
// top-k, a small beam scores fewer keys; Attend with method = retrievalattention equals exact
// attention (float64 reference) when its top-k covers every token, and otherwise attends the
// steady zone plus top-k tokens per query head; a context without queries works (wave index) and
// its graph methods are FAILED_PRECONDITION; bad query shapes and options are INVALID_ARGUMENT and
// change nothing; held queries are charged to the memory limit. Printed seeds (KVWAVE_TEST_SEED).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

constexpr int kQHeads = 4, kKvHeads = 2, kDim = 32;
constexpr int64_t kSegment = 512, kRecent = 16;
constexpr int64_t kTokens = 2 * kSegment + kRecent;  // two segments sealed, a tail of kRecent

const client::ModelShape kShape{1, kQHeads, kKvHeads, kDim, DType::kF32};

struct Data {
  std::vector<float> k, v;    // [kTokens x kKvHeads x kDim]
  std::vector<float> q;       // prefill queries [kTokens x kQHeads x kDim]
  std::vector<float> decode;  // one decode query [kQHeads x kDim]
};

Data MakeData(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Data d;
  d.k.resize(size_t{kTokens} * kKvHeads * kDim);
  d.v.resize(d.k.size());
  d.q.resize(size_t{kTokens} * kQHeads * kDim);
  d.decode.resize(kQHeads * kDim);
  for (float& x : d.k) x = normal(rng);
  for (float& x : d.v) x = normal(rng);
  for (float& x : d.q) x = normal(rng) + 0.3f;
  // Peaked attention (logits with a spread of ~4), as a decode step's usually is: its top 100
  // tokens hold nearly all the softmax mass.
  for (float& x : d.decode) x = 4.0f * (normal(rng) + 0.3f);
  return d;
}

std::vector<std::string> GraphDaemonSettings() {
  return {"gpu.mode=off",
          "index.graph=on",
          "index.graph_queries=600",
          "index.graph_degree=16",
          "store.prefill_segment_tokens=" + std::to_string(kSegment),
          "store.recent_tokens=" + std::to_string(kRecent)};
}

std::span<const std::byte> Rows(const std::vector<float>& v, int64_t first, int64_t count,
                                int64_t width) {
  return std::as_bytes(std::span(v)).subspan(first * width * 4, count * width * 4);
}

absl::Status AppendAll(client::Client& c, client::ContextId ctx, const Data& d, bool queries) {
  for (int64_t t = 0; t < kTokens; t += 100) {
    const int64_t n = std::min<int64_t>(100, kTokens - t);
    const auto k = Rows(d.k, t, n, kKvHeads * kDim), v = Rows(d.v, t, n, kKvHeads * kDim);
    absl::Status s = queries ? c.AppendWithQueries(
                                   ctx, 0, n, k, v,
                                   std::span(d.q).subspan(t * kQHeads * kDim, n * kQHeads * kDim))
                             : c.Append(ctx, 0, n, k, v);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// Exact attention of the decode query in float64: out [kQHeads x kDim], lse [kQHeads].
void Exact(const Data& d, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(kQHeads * kDim, 0.0);
  lse.assign(kQHeads, 0.0);
  for (int h = 0; h < kQHeads; ++h) {
    const int kvh = h / (kQHeads / kKvHeads);
    std::vector<double> s(kTokens);
    for (int64_t i = 0; i < kTokens; ++i) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j) {
        dot += double(d.decode[h * kDim + j]) * d.k[(i * kKvHeads + kvh) * kDim + j];
      }
      s[i] = dot / std::sqrt(double(kDim));
    }
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (int64_t i = 0; i < kTokens; ++i) {
      const double w = std::exp(s[i] - mx);
      sum += w;
      for (int j = 0; j < kDim; ++j) out[h * kDim + j] += w * d.v[(i * kKvHeads + kvh) * kDim + j];
    }
    for (int j = 0; j < kDim; ++j) out[h * kDim + j] /= sum;
    lse[h] = mx + std::log(sum);
  }
}

double RelError(const std::vector<float>& got, const std::vector<double>& want, int h) {
  double num = 0, den = 0;
  for (int j = 0; j < kDim; ++j) {
    num += std::pow(got[h * kDim + j] - want[h * kDim + j], 2);
    den += std::pow(want[h * kDim + j], 2);
  }
  return std::sqrt(num / den);
}

void GraphRoundTrip(client::Client& c, const Data& d) {
  auto ctx = c.Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  ASSERT_TRUE(AppendAll(c, ctx->id, d, /*queries=*/true).ok());
  ASSERT_TRUE(c.Seal(ctx->id).ok());  // waits for the background seals and their graphs
  auto info = c.Info(ctx->id);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->has_queries);
  EXPECT_EQ(info->sealed_segments, 2 * kKvHeads);
  EXPECT_EQ(info->graph_segments, 2 * kKvHeads);
  EXPECT_EQ(info->query_tokens, kRecent * kKvHeads);  // the tail's, held until it seals

  // Retrieve: a full beam finds the flat top-k; the default beam scores fewer keys.
  const int k = 10;
  std::vector<int64_t> flat(kQHeads * k), graph(kQHeads * k);
  std::vector<float> flat_s(kQHeads * k), graph_s(kQHeads * k);
  client::RetrieveStats flat_stats, full_stats, small_stats;
  ASSERT_TRUE(c.Retrieve(ctx->id, 0, d.decode, {k, client::RetrieveMethod::kFlat}, flat, flat_s,
                         &flat_stats)
                  .ok());
  client::RetrieveOptions full{k, client::RetrieveMethod::kGraph, -1, 1 << 16};
  auto st = c.Retrieve(ctx->id, 0, d.decode, full, graph, graph_s, &full_stats);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(graph, flat);
  client::RetrieveOptions small{k, client::RetrieveMethod::kGraph, -1, 16};
  ASSERT_TRUE(c.Retrieve(ctx->id, 0, d.decode, small, graph, graph_s, &small_stats).ok());
  EXPECT_LT(small_stats.keys_scored, flat_stats.keys_scored);
  EXPECT_EQ(small_stats.keys_total, flat_stats.keys_total);

  // Attend, RetrievalAttention: top-k past every segment = exact attention.
  std::vector<double> exact, exact_lse;
  Exact(d, exact, exact_lse);
  std::vector<float> out(kQHeads * kDim), lse(kQHeads);
  client::AttendStats stats;
  client::AttendBudget all{-1, -1, client::AttendMethod::kRetrievalAttention, 1 << 16, 1 << 16};
  st = c.Attend(ctx->id, 0, d.decode, all, out, lse, &stats);
  ASSERT_TRUE(st.ok()) << st;
  for (int h = 0; h < kQHeads; ++h) {
    EXPECT_LT(RelError(out, exact, h), 1e-4) << "head " << h;
    EXPECT_NEAR(lse[h], exact_lse[h], 1e-4 * std::max(1.0, std::abs(exact_lse[h])));
  }
  EXPECT_EQ(stats.steady_tokens, (4 + kRecent) * kKvHeads);
  EXPECT_EQ(stats.retrieved_tokens, (2 * kSegment - 4) * kQHeads);
  EXPECT_EQ(stats.total_clusters, 0);
  // The defaults (top-k 100): the steady zone + 100 tokens per query head, a subset of all
  // tokens, so its log-sum-exp is below the exact one.
  client::AttendBudget ra{-1, -1, client::AttendMethod::kRetrievalAttention, 0, 0};
  stats = {};
  ASSERT_TRUE(c.Attend(ctx->id, 0, d.decode, ra, out, lse, &stats).ok());
  EXPECT_EQ(stats.retrieved_tokens, 100 * kQHeads);
  EXPECT_GT(stats.graph_keys_scored, 0);
  EXPECT_LT(stats.graph_keys_scored, 2 * kSegment * kQHeads);
  // Its tokens S are a subset of all: with m = exp(lse_S - lse_all) their share of the softmax
  // mass, out_all = m out_S + (1 - m) out_rest, so |out_S - out_all| <= 2 (1 - m) max |v|.
  for (int h = 0; h < kQHeads; ++h) {
    EXPECT_LE(lse[h], exact_lse[h] + 1e-4) << "head " << h;
    const double m = std::exp(std::min(0.0, lse[h] - exact_lse[h]));
    double max_v = 0, err = 0;
    for (int64_t i = 0; i < kTokens; ++i) {
      double norm = 0;
      for (int j = 0; j < kDim; ++j) {
        norm += std::pow(d.v[(i * kKvHeads + h / (kQHeads / kKvHeads)) * kDim + j], 2);
      }
      max_v = std::max(max_v, std::sqrt(norm));
    }
    for (int j = 0; j < kDim; ++j) err += std::pow(out[h * kDim + j] - exact[h * kDim + j], 2);
    err = std::sqrt(err);
    std::printf("retrievalattention, top-k 100: head %d mass %.4f error %.2e (bound %.2e)\n", h, m,
                err, 2 * (1 - m) * max_v);
    EXPECT_LE(err, 2 * (1 - m) * max_v + 1e-4) << "head " << h;
    EXPECT_GT(m, 0.5) << "head " << h << ": the graphs missed the tokens that matter";
  }
  // One AttendBatch entry with the method gives the same bits as Attend.
  std::vector<float> batch_out(kQHeads * kDim), batch_lse(kQHeads);
  const client::AttendBatchEntry entry{ctx->id, ra};
  ASSERT_TRUE(c.AttendBatch(0, std::span(&entry, 1), d.decode, batch_out, batch_lse).ok());
  EXPECT_EQ(batch_out, out);
  EXPECT_EQ(batch_lse, lse);
  // The server's default method (retroinfer) is the tripartite attention.
  stats = {};
  ASSERT_TRUE(c.Attend(ctx->id, 0, d.decode, {}, out, lse, &stats).ok());
  EXPECT_GT(stats.total_clusters, 0);
  EXPECT_EQ(stats.graph_keys_scored, 0);
  EXPECT_TRUE(c.Close(ctx->id).ok());
}

class GraphE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    port_ = FreeTcpPort();
    std::vector<std::string> settings = GraphDaemonSettings();
    settings.push_back("rpc.tcp_port=" + std::to_string(port_));
    settings.push_back("rpc.tcp_token=t");
    daemon_ = StartDaemon(settings);
    ASSERT_NE(daemon_, nullptr);
  }
  int port_ = 0;
  std::unique_ptr<client::LocalDaemon> daemon_;
};

TEST_F(GraphE2ETest, SharedMemory) {
  auto c = Connect(daemon_->socket_path());
  ASSERT_TRUE(c->uses_shared_memory());
  GraphRoundTrip(*c, MakeData(TestSeed()));
}

TEST_F(GraphE2ETest, TcpInline) {
  client::ClientOptions o;
  o.tcp_port = port_;
  o.token = "t";
  auto c = client::Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_FALSE((*c)->uses_shared_memory());
  GraphRoundTrip(**c, MakeData(TestSeed()));
}

TEST_F(GraphE2ETest, ContextWithoutQueriesWorksSaysSoAndRefusesGraphMethods) {
  auto c = Connect(daemon_->socket_path());
  const Data d = MakeData(TestSeed());
  auto ctx = c->Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok());
  ASSERT_TRUE(AppendAll(*c, ctx->id, d, /*queries=*/false).ok());
  ASSERT_TRUE(c->Seal(ctx->id).ok());
  auto info = c->Info(ctx->id);
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->has_queries);
  EXPECT_EQ(info->graph_segments, 0);
  EXPECT_EQ(info->query_tokens, 0);
  EXPECT_EQ(info->sealed_segments, 2 * kKvHeads);
  std::vector<int64_t> positions(kQHeads * 10);
  std::vector<float> scores(kQHeads * 10);
  client::RetrieveOptions graph{10, client::RetrieveMethod::kGraph};
  absl::Status st = c->Retrieve(ctx->id, 0, d.decode, graph, positions, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("no RetrievalAttention graphs"), std::string::npos) << st;
  std::vector<float> out(kQHeads * kDim), lse(kQHeads);
  st = c->Attend(ctx->id, 0, d.decode, {-1, -1, client::AttendMethod::kRetrievalAttention}, out,
                 lse);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  // The wave index and the tripartite attention serve it.
  EXPECT_TRUE(c->Retrieve(ctx->id, 0, d.decode, {10}, positions, scores).ok());
  EXPECT_TRUE(c->Attend(ctx->id, 0, d.decode, {}, out, lse).ok());
}

TEST_F(GraphE2ETest, BadQueriesAndOptionsAreRefusedAndChangeNothing) {
  auto c = Connect(daemon_->socket_path());
  const Data d = MakeData(TestSeed());
  auto ctx = c->Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok());
  const int64_t n = 50;
  const auto k = Rows(d.k, 0, n, kKvHeads * kDim), v = Rows(d.v, 0, n, kKvHeads * kDim);
  std::vector<float> q(d.q.begin(), d.q.begin() + n * kQHeads * kDim);
  // One float short; one query head short per token; NaN.
  absl::Status st = c->AppendWithQueries(ctx->id, 0, n, k, v, std::span(q).first(q.size() - 1));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  st = c->AppendWithQueries(ctx->id, 0, n, k, v, std::span(q).first(n * (kQHeads - 1) * kDim));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  std::vector<float> nan_q = q;
  nan_q[77] = std::numeric_limits<float>::quiet_NaN();
  st = c->AppendWithQueries(ctx->id, 0, n, k, v, nan_q);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  // Queries for no tokens.
  st = c->AppendWithQueries(ctx->id, 0, 0, {}, {}, std::span(q).first(kQHeads * kDim));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  auto info = c->Info(ctx->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens_per_layer[0], 0);
  EXPECT_FALSE(info->has_queries);
  EXPECT_EQ(info->query_tokens, 0);
  // Good queries now; then out-of-range options.
  ASSERT_TRUE(c->AppendWithQueries(ctx->id, 0, n, k, v, q).ok());
  info = c->Info(ctx->id);
  EXPECT_TRUE(info->has_queries);
  EXPECT_EQ(info->query_tokens, n * kKvHeads);
  std::vector<int64_t> positions(kQHeads * 10);
  std::vector<float> scores(kQHeads * 10), out(kQHeads * kDim), lse(kQHeads);
  for (int beam : {-1, (1 << 16) + 1}) {
    st = c->Retrieve(ctx->id, 0, d.decode, {10, client::RetrieveMethod::kGraph, -1, beam},
                     positions, scores);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << beam << " " << st;
    st = c->Attend(ctx->id, 0, d.decode,
                   {-1, -1, client::AttendMethod::kRetrievalAttention, 0, beam}, out, lse);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << beam << " " << st;
    st = c->Attend(ctx->id, 0, d.decode,
                   {-1, -1, client::AttendMethod::kRetrievalAttention, beam, 0}, out, lse);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << beam << " " << st;
  }
  // With queries but nothing sealed yet: the graph methods answer exactly from the tail.
  st = c->Retrieve(ctx->id, 0, d.decode, {10, client::RetrieveMethod::kGraph}, positions, scores);
  EXPECT_TRUE(st.ok()) << st;
  st = c->Attend(ctx->id, 0, d.decode, {-1, -1, client::AttendMethod::kRetrievalAttention}, out,
                 lse);
  EXPECT_TRUE(st.ok()) << st;
  info = c->Info(ctx->id);
  EXPECT_EQ(info->tokens_per_layer[0], n);
}

// Held queries count against store.memory_limit_bytes: an Append whose queries would pass it is
// refused whole (RESOURCE_EXHAUSTED), while the same K/V without queries fits; what is kept is in
// memory_used_bytes.
TEST(GraphChargeTest, HeldQueriesAreChargedToTheMemoryLimit) {
  // Default segment size: no seal in these appends. 1,500 tokens: K+V 768,000 bytes, queries as
  // much again; the limit (1 MiB) holds the first, not both.
  auto daemon = StartDaemon(
      {"gpu.mode=off", "index.graph=on", "store.memory_limit_bytes=" + std::to_string(1 << 20)});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  auto ctx = c->Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok());
  const int64_t n = 1500;
  std::vector<float> kv(size_t{n} * kKvHeads * kDim, 0.5f), q(size_t{n} * kQHeads * kDim, 0.25f);
  const auto kv_bytes = std::as_bytes(std::span(kv));
  absl::Status st = c->AppendWithQueries(ctx->id, 0, n, kv_bytes, kv_bytes, q);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  auto info = c->Info(ctx->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens_per_layer[0], 0);
  EXPECT_FALSE(info->has_queries);
  // A fifth with queries: charged (K, V and the queries).
  const int64_t m = n / 5;
  auto before = c->Stats();
  ASSERT_TRUE(before.ok());
  st = c->AppendWithQueries(ctx->id, 0, m, kv_bytes.first(m * kKvHeads * kDim * 4),
                            kv_bytes.first(m * kKvHeads * kDim * 4),
                            std::span(q).first(m * kQHeads * kDim));
  ASSERT_TRUE(st.ok()) << st;
  auto after = c->Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_GE(after->memory_used_bytes - before->memory_used_bytes,
            m * (2 * kKvHeads + kQHeads) * kDim * 4);
  // The rest without queries fits (K+V only; the engine drops queries after a token without).
  st = c->Append(ctx->id, 0, n - m, kv_bytes.first((n - m) * kKvHeads * kDim * 4),
                 kv_bytes.first((n - m) * kKvHeads * kDim * 4));
  EXPECT_TRUE(st.ok()) << st;
}

}  // namespace
}  // namespace kvwave::testing
