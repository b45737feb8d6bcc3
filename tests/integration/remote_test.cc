// The remote tier end to end: a real 3-master Redis Cluster on loopback and two real kvwaved
// processes (node A, node B) with separate local stores.
//   - A prefills and seals a prefix; B attaches it from the cluster: the same K/V (Gather) and
//     Attend results identical bit for bit to A's;
//   - kill -9 of A while it writes a block: B never sees the partial block;
//   - the node holding a block stopped: B falls back to prefill within the timeout and attaches
//     again once the node is back;
//   - corrupted values: detected, counted (Prometheus), not served;
//   - an index attach (rows fetched later): rows on a stopped node fail calls within the
//     timeout (Unavailable) and serve once it is back; rows gone fail calls (DataLoss), are
//     counted, and the next Open prefills that block.
// Skipped (with the reason) only when redis-server is not installed.
#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "remote/block_format.h"
#include "remote/local_cluster.h"
#include "remote/redis_cluster.h"
#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kLayers = 2, kDim = 64, kBlock = 64, kRecent = 8, kBlocks = 4;
constexpr int kTokens = kBlocks * kBlock + kRecent;
const client::ModelShape kShape{kLayers, 2, 1, kDim, DType::kF32};
const char kNamespace[] = "team-a";

std::vector<int32_t> DocTokens(int doc) {
  std::vector<int32_t> t(kTokens);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>((doc * 7919 + i * 31) % 8192);
  return t;
}

// K (or V) rows [from, to) of a document's layer: a fixed function of them.
std::vector<float> Rows(int doc, int layer, int64_t from, int64_t to, bool value) {
  std::vector<float> out;
  for (int64_t p = from; p < to; ++p) {
    for (int j = 0; j < kDim; ++j) {
      uint64_t x = (uint64_t(doc) << 40) ^ (uint64_t(layer) << 32) ^ (uint64_t(p) << 8) ^ j ^
                   (value ? 0xabcdefull : 0);
      x *= 0x9e3779b97f4a7c15ull;
      out.push_back(static_cast<float>((x >> 40) % 2001) / 1000.0f - 0.999f);
    }
  }
  return out;
}

void AppendRows(client::Client& c, client::ContextId id, int doc, int64_t from, int64_t to) {
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k = Rows(doc, l, from, to, false), v = Rows(doc, l, from, to, true);
    ASSERT_TRUE(
        c.Append(id, l, to - from, std::as_bytes(std::span(k)), std::as_bytes(std::span(v))).ok());
  }
}

// out and lse of every layer, concatenated, after Seal: seals run in the background, and Seal
// waits for them, so both nodes attend the same segments whatever the timing (until a queued
// seal is published its tokens are attended exactly from the tail, which is not bit-identical).
std::vector<float> AttendAll(client::Client& c, client::ContextId id) {
  EXPECT_TRUE(c.Seal(id).ok());
  std::vector<float> q(kShape.q_heads * kDim), all;
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * static_cast<float>(i)) * 2.0f;
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> out(q.size()), lse(kShape.q_heads);
    EXPECT_TRUE(c.Attend(id, l, q, {}, out, lse).ok());
    all.insert(all.end(), out.begin(), out.end());
    all.insert(all.end(), lse.begin(), lse.end());
  }
  return all;
}

// A counter from the daemon's Prometheus text.
int64_t Metric(client::Client& c, const std::string& name) {
  auto s = c.Stats();
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return -1;
  for (absl::string_view line : absl::StrSplit(s->prometheus_text, '\n')) {
    if (!absl::StartsWith(line, name + " ")) continue;
    double v = 0;
    if (absl::SimpleAtod(line.substr(name.size() + 1), &v)) return static_cast<int64_t>(v);
  }
  ADD_FAILURE() << "no metric " << name;
  return -1;
}

class RemoteTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!remote::LocalRedisCluster::Installed()) return;
    auto c = remote::LocalRedisCluster::Start();
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    if (!remote::LocalRedisCluster::Installed()) {
      GTEST_SKIP() << "redis-server/redis-cli not installed (apt-get install redis-server): "
                      "the remote tier's tests need a real Redis Cluster";
    }
    ASSERT_NE(cluster_, nullptr);
    ASSERT_TRUE(cluster_->FlushAll().ok());
    remote::RedisClusterOptions o;
    o.seeds = cluster_->nodes();
    redis_ = *remote::RedisCluster::Create(o);
  }
  std::unique_ptr<client::LocalDaemon> Node(const std::string& mode, int command_timeout_ms,
                                            int down_retry_ms = 300,
                                            std::vector<std::string> extra = {}) {
    std::vector<std::string> settings = {
        "store.prefill_segment_tokens=" + std::to_string(kBlock),
        "store.recent_tokens=" + std::to_string(kRecent),
        "store.sink_tokens=2",
        "remote.redis=" + cluster_->seeds(),
        "remote.mode=" + mode,
        "remote.connect_timeout_ms=200",
        "remote.command_timeout_ms=" + std::to_string(command_timeout_ms),
        "remote.down_retry_ms=" + std::to_string(down_retry_ms),
        "remote.max_value_bytes=8192"};
    settings.insert(settings.end(), extra.begin(), extra.end());
    return StartDaemon(settings);
  }
  // K and V of every position of layer l, [from, to), through Gather.
  absl::Status GatherRange(client::Client& c, client::ContextId id, int l, int64_t from, int64_t to,
                           std::vector<float>* k, std::vector<float>* v) {
    std::vector<int64_t> pos(to - from);
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = from + static_cast<int64_t>(i);
    k->assign(pos.size() * kDim, 0);
    v->assign(pos.size() * kDim, 0);
    return c.Gather(id, l, pos, std::as_writable_bytes(std::span(*k)),
                    std::as_writable_bytes(std::span(*v)));
  }
  // Node A: prefills document `doc` and waits until its blocks are in the cluster.
  std::unique_ptr<client::LocalDaemon> WriteDocument(int doc, std::vector<float>* attend) {
    auto a = Node("readwrite", 2000);
    auto c = Connect(a->socket_path());
    auto opened = c->Open({kShape, DocTokens(doc), kNamespace});
    EXPECT_TRUE(opened.ok());
    EXPECT_EQ(opened->matched_tokens, 0);
    AppendRows(*c, opened->id, doc, 0, kTokens);
    if (attend != nullptr) *attend = AttendAll(*c, opened->id);
    EXPECT_TRUE(Eventually([&] { return Metric(*c, "kvwave_remote_blocks_written") == kBlocks; }));
    return a;
  }
  // Every manifest in the cluster, decoded, with the node holding it.
  std::map<int64_t, std::pair<std::string, remote::Manifest>> Manifests() {
    std::map<int64_t, std::pair<std::string, remote::Manifest>> out;
    for (const std::string& node : cluster_->nodes()) {
      auto keys = redis_->RunOnNode(node, {"KEYS", "kvw:*:m"});
      EXPECT_TRUE(keys.ok());
      for (size_t i = 0; i < keys->size(); ++i) {
        auto v = redis_->Run({"GET", remote::Reply::StrOf(keys->element(i))});
        auto m = remote::DecodeManifest(v->str());
        EXPECT_TRUE(m.ok()) << m.status();
        if (m.ok()) out[m->record.first_position / kBlock] = {node, *m};
      }
    }
    return out;
  }
  int64_t CountKeys(const std::string& pattern) {
    int64_t n = 0;
    for (const std::string& node : cluster_->nodes()) {
      auto keys = redis_->RunOnNode(node, {"KEYS", pattern});
      n += keys.ok() ? static_cast<int64_t>(keys->size()) : 0;
    }
    return n;
  }

  static remote::LocalRedisCluster* cluster_;
  std::unique_ptr<remote::RedisCluster> redis_;
};
remote::LocalRedisCluster* RemoteTest::cluster_ = nullptr;

// Both attach modes: remote.attach = index (the default: the index now, rows on demand and
// behind) and whole (every byte at the Open).
TEST_F(RemoteTest, NodeBAttachesNodeAsPrefixBitExact) {
  std::vector<float> attend_a;
  auto a = WriteDocument(1, &attend_a);
  const int64_t row_bytes = int64_t{kBlocks} * kLayers * kBlock * kDim * 8;  // K + V, f32
  std::vector<int64_t> retrieved_first;
  // index with no background fetch (every row on demand), index with it, whole.
  for (const auto& [attach, threads] :
       std::vector<std::pair<std::string, int>>{{"index", 0}, {"index", 1}, {"whole", 1}}) {
    SCOPED_TRACE(attach + " fetch_threads=" + std::to_string(threads));
    auto b = Node("read", 1000, 300,
                  {"remote.attach=" + attach, "remote.fetch_threads=" + std::to_string(threads)});
    auto c = Connect(b->socket_path());
    auto opened = c->Open({kShape, DocTokens(1), kNamespace});
    ASSERT_TRUE(opened.ok()) << opened.status();
    // Retrieve over the attached prefix alone (wave index and flat scan): the same top keys in
    // every mode.
    std::vector<int64_t> retrieved;
    for (client::RetrieveMethod method :
         {client::RetrieveMethod::kWave, client::RetrieveMethod::kFlat}) {
      std::vector<float> q(kShape.q_heads * kDim);
      for (size_t i = 0; i < q.size(); ++i) q[i] = std::cos(0.11f * static_cast<float>(i));
      client::RetrieveOptions ro;
      ro.k = 16;
      ro.method = method;
      std::vector<int64_t> pos(kShape.q_heads * ro.k);
      std::vector<float> scores(pos.size());
      ASSERT_TRUE(c->Retrieve(opened->id, 1, q, ro, pos, scores).ok());
      retrieved.insert(retrieved.end(), pos.begin(), pos.end());
    }
    if (retrieved_first.empty()) retrieved_first = retrieved;
    EXPECT_EQ(retrieved, retrieved_first);
    EXPECT_EQ(opened->matched_tokens, kBlocks * kBlock);
    EXPECT_EQ(Metric(*c, "kvwave_remote_blocks_fetched"), kBlocks);
    if (attach == "whole") {
      EXPECT_GT(Metric(*c, "kvwave_remote_bytes_read"), row_bytes);
      EXPECT_EQ(Metric(*c, "kvwave_remote_blocks_attached_lazily"), 0);
    } else {
      EXPECT_EQ(Metric(*c, "kvwave_remote_blocks_attached_lazily"), kBlocks);
    }
    // B uploads only the suffix; Attend is bit for bit A's (same segments, clusters, index).
    AppendRows(*c, opened->id, 1, kBlocks * kBlock, kTokens);
    const std::vector<float> attend_b = AttendAll(*c, opened->id);
    ASSERT_EQ(attend_a.size(), attend_b.size());
    EXPECT_EQ(std::memcmp(attend_a.data(), attend_b.data(), attend_a.size() * sizeof(float)), 0);
    // The attached K/V are exactly what A appended.
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> k, v;
      ASSERT_TRUE(GatherRange(*c, opened->id, l, 0, kBlocks * kBlock, &k, &v).ok());
      EXPECT_EQ(k, Rows(1, l, 0, kBlocks * kBlock, false));
      EXPECT_EQ(v, Rows(1, l, 0, kBlocks * kBlock, true));
    }
    EXPECT_EQ(Metric(*c, "kvwave_remote_kv_lost_segments"), 0);
    // Another namespace shares nothing.
    auto other = c->Open({kShape, DocTokens(1), "team-b"});
    ASSERT_TRUE(other.ok());
    EXPECT_EQ(other->matched_tokens, 0);
  }
}

// After an index attach, before the rows are fetched (remote.fetch_threads = 0: on demand
// only): a node stopped fails the calls that need its rows with Unavailable within the timeout,
// and they succeed once it is back; rows deleted from the cluster fail the calls that need them
// with DataLoss (never wrong data), are counted, and the next Open prefills that block.
TEST_F(RemoteTest, RowsUnreachableOrGoneAfterAnIndexAttachFailCallsNeverServeWrongData) {
  constexpr int kTimeoutMs = 400;
  std::vector<float> attend_a;
  auto a = WriteDocument(5, &attend_a);
  auto manifests = Manifests();
  ASSERT_EQ(manifests.size(), static_cast<size_t>(kBlocks));
  auto b = Node("read", kTimeoutMs, 300, {"remote.attach=index", "remote.fetch_threads=0"});
  auto c = Connect(b->socket_path());
  auto opened = c->Open({kShape, DocTokens(5), kNamespace});
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_EQ(opened->matched_tokens, kBlocks * kBlock);
  EXPECT_EQ(Metric(*c, "kvwave_remote_kv_on_demand_bytes"), 0);
  // 1. The node holding block 1 stopped.
  const int victim = cluster_->IndexOf(manifests[1].first);
  ASSERT_TRUE(cluster_->Pause(victim).ok());
  std::vector<float> k, v;
  const auto t = Clock::now();
  absl::Status s = GatherRange(*c, opened->id, 0, kBlock, 2 * kBlock, &k, &v);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_LT(ms, kTimeoutMs + 3000);  // the timeout, plus slack for a loaded machine
  EXPECT_GE(Metric(*c, "kvwave_remote_kv_unavailable"), 1);
  ASSERT_TRUE(cluster_->Resume(victim).ok());
  ASSERT_TRUE(cluster_->WaitHealthy(30000).ok());
  EXPECT_TRUE(
      Eventually([&] { return GatherRange(*c, opened->id, 0, kBlock, 2 * kBlock, &k, &v).ok(); }));
  EXPECT_EQ(k, Rows(5, 0, kBlock, 2 * kBlock, false));
  EXPECT_EQ(v, Rows(5, 0, kBlock, 2 * kBlock, true));
  // 2. Block 3's rows deleted (evicted, say) after the attach.
  const remote::Manifest& m3 = manifests[3].second;
  for (uint32_t p = 0; p < m3.parts.size(); ++p) {
    if (m3.parts[p].segment % 2 == 0) continue;  // keep the index streams
    auto del = redis_->Run(
        {"DEL", remote::PartKey(m3.record.name_space, m3.record.hash, m3.generation, p)});
    ASSERT_TRUE(del.ok() && del->integer() == 1);
  }
  s = GatherRange(*c, opened->id, 1, 3 * kBlock, 4 * kBlock, &k, &v);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_GE(Metric(*c, "kvwave_remote_kv_lost_segments"), 1);
  // Rows of the other blocks still serve, exactly.
  ASSERT_TRUE(GatherRange(*c, opened->id, 1, 0, 3 * kBlock, &k, &v).ok());
  EXPECT_EQ(v, Rows(5, 1, 0, 3 * kBlock, true));
  ASSERT_TRUE(c->Close(opened->id).ok());
  // 3. The next Open attaches blocks 0-2 and prefills block 3; it serves what was appended.
  auto again = c->Open({kShape, DocTokens(5), kNamespace});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->matched_tokens, 3 * kBlock);
  AppendRows(*c, again->id, 5, 3 * kBlock, kTokens);
  ASSERT_TRUE(GatherRange(*c, again->id, 1, 0, 4 * kBlock, &k, &v).ok());
  EXPECT_EQ(k, Rows(5, 1, 0, 4 * kBlock, false));
  EXPECT_EQ(v, Rows(5, 1, 0, 4 * kBlock, true));
  const std::vector<float> attend_b = AttendAll(*c, again->id);
  ASSERT_EQ(attend_a.size(), attend_b.size());
  EXPECT_EQ(std::memcmp(attend_a.data(), attend_b.data(), attend_a.size() * sizeof(float)), 0);
}

TEST_F(RemoteTest, KilledWriterLeavesNoVisibleBlock) {
  auto a = Node("readwrite", 20000);  // A's writes wait on the stopped nodes until killed
  auto ca = Connect(a->socket_path());
  auto opened = ca->Open({kShape, DocTokens(2), kNamespace});
  ASSERT_TRUE(opened.ok());
  for (int n = 0; n < cluster_->size(); ++n) ASSERT_TRUE(cluster_->Pause(n).ok());
  AppendRows(*ca, opened->id, 2, 0, kTokens);
  // A is mid-write: the parts of its first block are on the wire, unacknowledged.
  const bool sent = Eventually([&] { return Metric(*ca, "kvwave_remote_parts_sent") > 0; });
  EXPECT_EQ(Metric(*ca, "kvwave_remote_blocks_written"), 0);
  ASSERT_EQ(kill(a->pid(), SIGKILL), 0);
  (void)a->Stop(SIGKILL, 5000);
  for (int n = 0; n < cluster_->size(); ++n) ASSERT_TRUE(cluster_->Resume(n).ok());
  ASSERT_TRUE(sent);
  ASSERT_TRUE(cluster_->WaitHealthy(30000).ok());
  // The nodes execute what A had sent: parts without a manifest.
  EXPECT_TRUE(Eventually([&] { return CountKeys("kvw:*") > 0; }));
  EXPECT_EQ(CountKeys("kvw:*:m"), 0);
  auto b = Node("read", 1000);
  auto cb = Connect(b->socket_path());
  auto ob = cb->Open({kShape, DocTokens(2), kNamespace});
  ASSERT_TRUE(ob.ok());
  EXPECT_EQ(ob->matched_tokens, 0);
  EXPECT_EQ(Metric(*cb, "kvwave_remote_blocks_fetched"), 0);
  // B prefills it itself and serves it.
  AppendRows(*cb, ob->id, 2, 0, kTokens);
  std::vector<int64_t> pos = {0, 100, 200};
  std::vector<float> k(pos.size() * kDim), v(pos.size() * kDim);
  ASSERT_TRUE(cb->Gather(ob->id, 1, pos, std::as_writable_bytes(std::span(k)),
                         std::as_writable_bytes(std::span(v)))
                  .ok());
  std::vector<float> want;
  for (int64_t p : pos) {
    auto r = Rows(2, 1, p, p + 1, false);
    want.insert(want.end(), r.begin(), r.end());
  }
  EXPECT_EQ(k, want);
}

TEST_F(RemoteTest, StoppedNodeFallsBackWithinTheTimeoutAndAttachesOnceBack) {
  constexpr int kTimeoutMs = 400;
  auto a = WriteDocument(3, nullptr);
  auto manifests = Manifests();
  ASSERT_EQ(manifests.size(), static_cast<size_t>(kBlocks));
  const int victim = cluster_->IndexOf(manifests[0].first);  // holds block 0
  ASSERT_GE(victim, 0);
  auto b = Node("read", kTimeoutMs, /*down_retry_ms=*/300);
  auto c = Connect(b->socket_path());
  ASSERT_TRUE(cluster_->Pause(victim).ok());
  const auto t = Clock::now();
  auto opened = c->Open({kShape, DocTokens(3), kNamespace});
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->matched_tokens, 0);  // falls back to prefill...
  EXPECT_LT(ms, kTimeoutMs + 3000);      // ...within the timeout (slack: a loaded machine)
  EXPECT_GE(Metric(*c, "kvwave_remote_unavailable"), 1);
  ASSERT_TRUE(c->Close(opened->id).ok());
  ASSERT_TRUE(cluster_->Resume(victim).ok());
  ASSERT_TRUE(cluster_->WaitHealthy(30000).ok());
  // Once the node is back (and its retry time passed) B attaches again.
  EXPECT_TRUE(Eventually([&] {
    auto o = c->Open({kShape, DocTokens(3), kNamespace});
    const bool all = o.ok() && o->matched_tokens == kBlocks * kBlock;
    if (o.ok()) (void)c->Close(o->id);
    return all;
  }));
}

// With remote.attach = whole every byte is checked at the Open (an index attach checks the rows
// when it fetches them: the test above).
TEST_F(RemoteTest, CorruptValuesAreDetectedCountedNotServed) {
  auto a = WriteDocument(4, nullptr);
  auto manifests = Manifests();
  ASSERT_EQ(manifests.size(), static_cast<size_t>(kBlocks));
  // Flip one byte in the middle of a part of block 2.
  const remote::Manifest& m2 = manifests[2].second;
  const std::string key = remote::PartKey(m2.record.name_space, m2.record.hash, m2.generation, 1);
  auto byte = redis_->Run({"GETRANGE", key, "100", "100"});
  ASSERT_TRUE(byte.ok() && byte->str().size() == 1) << byte.status();
  const std::string flipped(1, static_cast<char>(byte->str()[0] ^ 0x01));
  auto set = redis_->Run({"SETRANGE", key, "100", flipped});
  ASSERT_TRUE(set.ok() && set->is_integer()) << set.status();
  auto b = Node("read", 1000, 300, {"remote.attach=whole"});
  auto c = Connect(b->socket_path());
  auto opened = c->Open({kShape, DocTokens(4), kNamespace});
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ(opened->matched_tokens, 2 * kBlock);  // blocks 0 and 1; block 2 is not served
  EXPECT_GE(Metric(*c, "kvwave_remote_blocks_corrupt"), 1);
  EXPECT_EQ(Metric(*c, "kvwave_remote_blocks_fetched"), 2);
  // B prefills the rest; what it serves is what was appended.
  AppendRows(*c, opened->id, 4, 2 * kBlock, kTokens);
  std::vector<int64_t> pos = {2 * kBlock + 100};
  std::vector<float> k(kDim), v(kDim);
  ASSERT_TRUE(c->Gather(opened->id, 0, pos, std::as_writable_bytes(std::span(k)),
                        std::as_writable_bytes(std::span(v)))
                  .ok());
  EXPECT_EQ(v, Rows(4, 0, pos[0], pos[0] + 1, true));
}

}  // namespace
}  // namespace kvwave::testing
