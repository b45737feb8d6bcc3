// The remote tier against a real 3-master Redis Cluster on loopback: blocks written (directly and
// behind) come back bit-exact; a block with a part missing, a corrupt or truncated part, a
// manifest of another format version, or a record that is not the prefix asked for is detected,
// counted and never served, and the run ends before it; a stopped node fails writes within the
// timeout and the write-behind queue stays bounded without blocking; a Redis ACL user is fenced to
// its namespace's keys and a wrong password only misses. Skipped (with the reason)
// only when redis-server is not installed.
#include "remote/remote_tier.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <optional>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "remote/block_format.h"
#include "remote/local_cluster.h"
#include "store/segment_codec.h"
#include "tests/store/store_test_util.h"

namespace kvwave::remote {
namespace {

using store::testing::ExpectSameSegment;
using store::testing::RandomSegment;
using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

constexpr int32_t kBlockTokens = 48;

struct TestBlock {
  store::BlockRecord record;
  store::BlockSegments segments;
};

// A chain of `n` blocks of a 2-layer, 2-KV-head model with random content.
std::vector<TestBlock> MakeChain(int n, uint64_t seed, store::MemoryBudget& budget,
                                 int32_t block_tokens = kBlockTokens, int32_t head_dim = 16,
                                 int32_t steady = 0, const std::string& name_space = "tenant/a") {
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::vector<TestBlock> chain(n);
  store::BlockHash parent;
  for (int b = 0; b < n; ++b) {
    store::BlockRecord& r = chain[b].record;
    r.shape = store::ModelShape{
        .layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = head_dim, .dtype = DType::kBF16};
    r.name_space = name_space;  // escaped in the keys
    r.model_id = "test-model";
    r.first_position = int64_t{block_tokens} * b;
    r.tokens.resize(block_tokens);
    for (auto& t : r.tokens) t = static_cast<int32_t>(rng() % 50000);
    r.parent = parent;
    r.hash = store::ChainBlockHash(parent, r.name_space, r.model_id, r.tokens);
    parent = r.hash;
    for (int i = 0; i < 4; ++i) {
      chain[b].segments.push_back(RandomSegment({.tokens = block_tokens,
                                                 .head_dim = head_dim,
                                                 .steady = b == 0 ? steady : 0,
                                                 .clusters = std::max(5, block_tokens / 16),
                                                 .first_position = r.first_position,
                                                 .dtype = DType::kBF16},
                                                rng, budget));
    }
  }
  return chain;
}

std::vector<store::BlockRecord> Records(const std::vector<TestBlock>& chain) {
  std::vector<store::BlockRecord> out;
  for (const TestBlock& b : chain) out.push_back(b.record);
  return out;
}

class RemoteTierTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!LocalRedisCluster::Installed()) return;
    auto c = LocalRedisCluster::Start();
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    if (!LocalRedisCluster::Installed()) {
      GTEST_SKIP() << "redis-server/redis-cli not installed (apt-get install redis-server): "
                      "the remote tier's tests need a real Redis Cluster";
    }
    ASSERT_NE(cluster_, nullptr);
    ASSERT_TRUE(cluster_->FlushAll().ok());
    const char* env = std::getenv("KVWAVE_TEST_SEED");
    seed_ = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("seed %llu (set KVWAVE_TEST_SEED to repeat)\n", (unsigned long long)seed_);
  }
  std::unique_ptr<RemoteTier> Tier(int64_t max_value_bytes = 1100, int64_t queue_bytes = 1 << 30,
                                   int64_t command_timeout_ms = 1000, int fetch_threads = 0,
                                   const std::string& user = "", const std::string& password = "",
                                   const std::function<void(RemoteTierOptions&)>& adjust = {}) {
    RemoteTierOptions o;
    o.cluster.user = user;
    o.cluster.password = password;
    o.fetch_threads = fetch_threads;
    o.cluster.seeds = {cluster_->nodes()[0]};
    o.cluster.command_timeout_ms = command_timeout_ms;
    o.cluster.down_retry_ms = 100;
    o.write = true;
    o.max_value_bytes = max_value_bytes;  // small: segments are cut into several parts
    o.queue_max_bytes = queue_bytes;
    if (adjust) adjust(o);
    auto t = RemoteTier::Create(o);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : nullptr;
  }
  // Runs a command on the node that holds `key`.
  Reply Raw(RemoteTier& tier, const Command& cmd) {
    auto r = tier.cluster().Run(cmd);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : Reply();
  }
  std::vector<store::BlockSegments> Fetch(RemoteTier& tier, const std::vector<TestBlock>& chain) {
    return tier.FetchRun(Records(chain), store::DefaultHostAllocator(), budget_);
  }
  std::vector<store::BlockSegments> FetchLazy(RemoteTier& tier,
                                              const std::vector<TestBlock>& chain) {
    return tier.FetchRun(Records(chain), store::DefaultHostAllocator(), budget_, /*lazy=*/true);
  }
  // The keys of block b's KV-stream parts (odd streams), per segment.
  std::vector<std::vector<std::string>> KvPartKeys(RemoteTier& tier, const TestBlock& b) {
    auto m =
        DecodeManifest(Raw(tier, {"GET", ManifestKey(b.record.name_space, b.record.hash)}).str());
    EXPECT_TRUE(m.ok()) << m.status();
    std::vector<std::vector<std::string>> out(m.ok() ? m->segment_bytes.size() / 2 : 0);
    for (uint32_t p = 0; m.ok() && p < m->parts.size(); ++p) {
      if (m->parts[p].segment % 2 == 1) {
        out[m->parts[p].segment / 2].push_back(
            PartKey(b.record.name_space, b.record.hash, m->generation, p));
      }
    }
    return out;
  }

  static LocalRedisCluster* cluster_;
  store::MemoryBudget budget_{int64_t{1} << 30};
  uint64_t seed_ = 0;
};
LocalRedisCluster* RemoteTierTest::cluster_ = nullptr;

TEST(BlockFormatTest, ManifestRoundTripsAndRejectsDamage) {
  Manifest m;
  m.record.shape = store::ModelShape{1, 1, 1, 16, DType::kF32};
  m.record.tokens = {1, 2, 3};
  m.record.hash = {7, 9};
  m.generation = 42;
  m.segment_bytes = {10, 0};  // one segment: its index stream and an empty KV stream
  m.parts = {{0, 0, 6, 111}, {0, 6, 4, 222}};
  const std::string v = EncodeManifest(m);
  auto back = DecodeManifest(v);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, m);
  for (size_t cut : {size_t{0}, size_t{5}, v.size() / 2, v.size() - 1}) {
    EXPECT_TRUE(absl::IsDataLoss(DecodeManifest(v.substr(0, cut)).status())) << cut;
  }
  std::string flipped = v;
  flipped[v.size() / 2] ^= 1;
  EXPECT_TRUE(absl::IsDataLoss(DecodeManifest(flipped).status()));
  std::string other = v;
  TEST_SetVersion(other, kRemoteFormatVersion + 1);
  EXPECT_TRUE(IsVersionMismatch(DecodeManifest(other).status()));
  // Parts that do not tile the segment.
  Manifest gap = m;
  gap.parts[1].offset = 7;
  EXPECT_TRUE(absl::IsDataLoss(DecodeManifest(EncodeManifest(gap)).status()));
  EXPECT_EQ(EscapeNamespace("a/b c_d.e-f"), "a%2fb%20c_d.e-f");
  EXPECT_EQ(KeySlot(ManifestKey("x", m.record.hash)), BlockSlot(m.record.hash));
  EXPECT_EQ(KeySlot(PartKey("y", m.record.hash, 5, 3)), BlockSlot(m.record.hash));
}

TEST_F(RemoteTierTest, BlocksRoundTripBitExact) {
  auto chain = MakeChain(4, seed_, budget_);
  auto tier = Tier();
  ASSERT_TRUE(tier->WriteBlock(chain[0].record, chain[0].segments).ok());
  ASSERT_TRUE(tier->WriteBlock(chain[1].record, chain[1].segments).ok());
  // The rest written behind.
  EXPECT_TRUE(tier->Enqueue(chain[2].record, chain[2].segments));
  EXPECT_TRUE(tier->Enqueue(chain[3].record, chain[3].segments));
  ASSERT_TRUE(tier->Flush().ok());
  const RemoteStats w = tier->stats();
  EXPECT_EQ(w.blocks_written, 4);
  EXPECT_GT(w.parts_sent, 4 * 4);  // several parts per segment
  auto reader = Tier();
  auto got = Fetch(*reader, chain);
  ASSERT_EQ(got.size(), 4u);
  for (int b = 0; b < 4; ++b) {
    ASSERT_EQ(got[b].size(), 4u);
    for (int s = 0; s < 4; ++s) ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
  }
  const RemoteStats r = reader->stats();
  EXPECT_EQ(r.blocks_fetched, 4);
  EXPECT_GE(r.bytes_read, 4 * 4 * 1000);
  EXPECT_EQ(r.blocks_corrupt + r.blocks_partial + r.blocks_version_mismatch, 0);
  // A longer request stops at the first block the cluster does not have.
  auto more = MakeChain(5, seed_, budget_);
  EXPECT_EQ(Fetch(*reader, more).size(), 4u);
}

TEST_F(RemoteTierTest, PartialBlockIsNeverServed) {
  auto chain = MakeChain(3, seed_, budget_);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  // A part of block 1 disappears (eviction, or a writer that died before its manifest).
  auto manifest = DecodeManifest(
      Raw(*tier, {"GET", ManifestKey(chain[1].record.name_space, chain[1].record.hash)}).str());
  ASSERT_TRUE(manifest.ok());
  const std::string part = PartKey(chain[1].record.name_space, chain[1].record.hash,
                                   manifest->generation, manifest->parts.size() / 2);
  EXPECT_EQ(Raw(*tier, {"DEL", part}).integer(), 1);
  EXPECT_EQ(Fetch(*tier, chain).size(), 1u);
  EXPECT_EQ(tier->stats().blocks_partial, 1);
  // No manifest at all: a plain miss, nothing served.
  EXPECT_EQ(
      Raw(*tier, {"DEL", ManifestKey(chain[0].record.name_space, chain[0].record.hash)}).integer(),
      1);
  EXPECT_EQ(Fetch(*tier, chain).size(), 0u);
}

TEST_F(RemoteTierTest, CorruptTruncatedAndOtherVersionAreCountedNotServed) {
  auto chain = MakeChain(3, seed_, budget_);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto part_key = [&](int b, size_t p) {
    auto m = DecodeManifest(
        Raw(*tier, {"GET", ManifestKey(chain[b].record.name_space, chain[b].record.hash)}).str());
    EXPECT_TRUE(m.ok());
    return PartKey(chain[b].record.name_space, chain[b].record.hash, m->generation, p);
  };
  // One byte of block 2's third part flipped.
  const std::string k2 = part_key(2, 2);
  std::string v2(Raw(*tier, {"GET", k2}).str());
  v2[v2.size() / 2] ^= 0x40;
  ASSERT_EQ(Raw(*tier, {"SET", k2, v2}).str(), "OK");
  EXPECT_EQ(Fetch(*tier, chain).size(), 2u);
  EXPECT_EQ(tier->stats().blocks_corrupt, 1);
  // Block 1's first part truncated. (Blocks past the first bad one may be read in parallel
  // before the run is cut, so counts below are lower bounds where they could be re-counted.)
  const std::string k1 = part_key(1, 0);
  std::string v1(Raw(*tier, {"GET", k1}).str());
  ASSERT_EQ(Raw(*tier, {"SET", k1, v1.substr(0, v1.size() - 9)}).str(), "OK");
  EXPECT_EQ(Fetch(*tier, chain).size(), 1u);
  EXPECT_GE(tier->stats().blocks_corrupt, 2);
  // Block 0's manifest from a future format version.
  const std::string mk = ManifestKey(chain[0].record.name_space, chain[0].record.hash);
  std::string m0(Raw(*tier, {"GET", mk}).str());
  TEST_SetVersion(m0, kRemoteFormatVersion + 1);
  ASSERT_EQ(Raw(*tier, {"SET", mk, m0}).str(), "OK");
  EXPECT_EQ(Fetch(*tier, chain).size(), 0u);
  EXPECT_EQ(tier->stats().blocks_version_mismatch, 1);
  EXPECT_EQ(tier->stats().blocks_fetched, 3);  // 2 + 1 + 0
}

TEST_F(RemoteTierTest, ARecordThatIsNotThePrefixAskedForIsRejected) {
  auto chain = MakeChain(1, seed_, budget_);
  auto tier = Tier();
  ASSERT_TRUE(tier->WriteBlock(chain[0].record, chain[0].segments).ok());
  std::vector<store::BlockRecord> wanted = Records(chain);
  wanted[0].model_id = "another-model";  // same key, different expectation
  EXPECT_TRUE(tier->FetchRun(wanted, store::DefaultHostAllocator(), budget_).empty());
  EXPECT_EQ(tier->stats().blocks_corrupt, 1);
}

TEST_F(RemoteTierTest, StoppedNodeBoundsWritesAndTheQueue) {
  auto chain = MakeChain(2, seed_, budget_);
  int64_t block_bytes = 0;
  for (auto& s : chain[0].segments) block_bytes += s->bytes();
  auto tier = Tier(1100, /*queue_bytes=*/block_bytes, /*command_timeout_ms=*/300);
  const int victim =
      cluster_->IndexOf(*tier->cluster().NodeOfSlot(BlockSlot(chain[0].record.hash)));
  ASSERT_TRUE(cluster_->Pause(victim).ok());
  const auto t = std::chrono::steady_clock::now();
  EXPECT_TRUE(tier->Enqueue(chain[0].record, chain[0].segments));
  EXPECT_FALSE(tier->Enqueue(chain[1].record, chain[1].segments));  // over the bound: dropped
  EXPECT_EQ(tier->stats().queue_dropped, 1);
  const absl::Status flushed = tier->Flush();  // the write gives up at the timeout
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  EXPECT_TRUE(absl::IsUnavailable(flushed)) << flushed;
  EXPECT_LT(ms, 300 + 3000);  // the timeout plus slack for a loaded machine
  EXPECT_EQ(tier->stats().write_errors, 1);
  // Reads of that node's blocks are misses meanwhile, not hangs.
  EXPECT_TRUE(Fetch(*tier, chain).empty());
  ASSERT_TRUE(cluster_->Resume(victim).ok());
  ASSERT_TRUE(cluster_->WaitHealthy(20000).ok());
  // Back: written and read again once the node is retried.
  absl::Status s;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  do {
    s = tier->WriteBlock(chain[0].record, chain[0].segments);
    if (s.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // poll: down_retry_ms is 100
  } while (std::chrono::steady_clock::now() < give_up);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(Fetch(*tier, chain).size(), 1u);
}

// Redis's own eviction (a cluster with a small maxmemory and allkeys-lru) removes manifests and
// parts as it likes: every block is then either served whole and bit-exact, or not at all.
TEST_F(RemoteTierTest, RedisEvictionNeverServesAHole) {
  LocalClusterOptions small;
  small.maxmemory_bytes = 16 << 20;  // per node; the blocks below total ~58 MB
  auto tiny = LocalRedisCluster::Start(small);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  auto chain = MakeChain(96, seed_, budget_, /*block_tokens=*/512, /*head_dim=*/64);
  RemoteTierOptions o;
  o.cluster.seeds = (*tiny)->nodes();
  o.write = true;
  // One part per segment: Redis's LRU clock ticks once a second, so within this test eviction
  // is close to random among the keys, and a block of few keys has a chance to stay whole.
  o.max_value_bytes = 1 << 20;
  auto tier = RemoteTier::Create(o);
  ASSERT_TRUE(tier.ok()) << tier.status();
  int written = 0;
  for (auto& b : chain) written += (*tier)->WriteBlock(b.record, b.segments).ok() ? 1 : 0;
  EXPECT_GT(written, 0);
  int served = 0;
  for (auto& b : chain) {
    auto got = (*tier)->FetchRun({&b.record, 1}, store::DefaultHostAllocator(), budget_);
    if (got.empty()) continue;
    ++served;
    ASSERT_EQ(got[0].size(), b.segments.size());
    for (size_t s = 0; s < b.segments.size(); ++s) ExpectSameSegment(*got[0][s], *b.segments[s]);
  }
  const RemoteStats st = (*tier)->stats();
  std::printf("written %d of %zu, served %d, partial %lld\n", written, chain.size(), served,
              (long long)st.blocks_partial);
  EXPECT_GT(served, 0);
  EXPECT_LT(served, static_cast<int>(chain.size()));  // Redis evicted some
  EXPECT_EQ(st.blocks_corrupt + st.blocks_version_mismatch, 0);
}

// Lazy reads (remote.attach = index): the attach moves the indexes (meta index, permutation,
// sinks) only; the rows come on demand, cluster by cluster, each verified against its checksum,
// and come out bit-exact.
TEST_F(RemoteTierTest, LazyAttachMovesTheIndexAndFetchesClustersOnDemandBitExact) {
  auto chain = MakeChain(3, seed_, budget_, kBlockTokens, 16, /*steady=*/3);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/0);
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 3u);
  int64_t row_bytes = 0;
  for (int b = 0; b < 3; ++b) {
    for (int s = 0; s < 4; ++s) {
      const store::Segment& seg = *got[b][s];
      const store::Segment& want = *chain[b].segments[s];
      row_bytes +=
          2 * (want.num_rows() - want.steady_rows()) * static_cast<int64_t>(want.row_bytes());
      ASSERT_NE(seg.pending(), nullptr);
      EXPECT_FALSE(seg.rows_resident());
      // The index is whole at once: meta index, permutation, sinks.
      EXPECT_EQ(seg.centroids(), want.centroids());
      EXPECT_EQ(seg.value_sums(), want.value_sums());
      EXPECT_EQ(seg.sizes(), want.sizes());
      EXPECT_EQ(seg.token_of_rows(), want.token_of_rows());
      EXPECT_EQ(seg.bytes(), want.bytes());  // charged in full at the attach
      EXPECT_EQ(std::memcmp(seg.key_row(0), want.key_row(0), want.steady_rows() * want.row_bytes()),
                0);
    }
  }
  RemoteStats st = reader->stats();
  EXPECT_EQ(st.blocks_attached_lazily, 3);
  EXPECT_LT(st.bytes_read, row_bytes);  // the rows did not move
  EXPECT_EQ(st.kv.on_demand_bytes, 0);
  // Two clusters of one segment, on demand: exactly their rows.
  std::mt19937 rng(static_cast<unsigned>(seed_));
  const store::Segment& seg = *got[1][2];
  const store::Segment& want = *chain[1].segments[2];
  std::vector<int32_t> some = {static_cast<int32_t>(rng() % seg.num_clusters())};
  some.push_back((some[0] + 1 + static_cast<int32_t>(rng() % (seg.num_clusters() - 1))) %
                 seg.num_clusters());
  std::sort(some.begin(), some.end());
  const store::ClusterWant w{&seg, some};
  ASSERT_TRUE(store::EnsureClusters({&w, 1}).ok());
  for (int32_t c : some) {
    ASSERT_EQ(seg.pending()->state(c), store::PendingRows::kResident);
    const size_t n = (seg.cluster_end_row(c) - seg.cluster_row(c)) * seg.row_bytes();
    EXPECT_EQ(std::memcmp(seg.key_row(seg.cluster_row(c)), want.key_row(want.cluster_row(c)), n),
              0);
    EXPECT_EQ(
        std::memcmp(seg.value_row(seg.cluster_row(c)), want.value_row(want.cluster_row(c)), n), 0);
  }
  st = reader->stats();
  EXPECT_GT(st.kv.on_demand_bytes, 0);
  EXPECT_LT(st.kv.on_demand_bytes, 2 * static_cast<int64_t>(seg.num_rows() * seg.row_bytes()));
  // Then everything, bit-exact.
  for (int b = 0; b < 3; ++b) {
    for (int s = 0; s < 4; ++s) {
      ASSERT_TRUE(store::EnsureAllRows(*got[b][s]).ok());
      EXPECT_TRUE(got[b][s]->rows_resident());
      ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
    }
  }
  EXPECT_EQ(reader->stats().kv.lost_segments, 0);
}

// An index attach charges each segment in full at the attach (its rows included, before they
// arrive), so fetching never allocates; the run ends where the memory limit does.
TEST_F(RemoteTierTest, LazyAttachChargesTheWholeSegmentAndStopsAtTheLimit) {
  auto chain = MakeChain(3, seed_, budget_);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  int64_t bytes[3] = {0, 0, 0};  // per block (padding differs from block to block)
  for (int b = 0; b < 3; ++b) {
    for (const auto& seg : chain[b].segments) bytes[b] += seg->bytes();
  }
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/0);
  store::MemoryBudget tight(bytes[0] + bytes[1] + bytes[2] / 2);
  auto got = reader->FetchRun(Records(chain), store::DefaultHostAllocator(), tight, /*lazy=*/true);
  // The third block does not fit; the first two do, whichever node answers first (blocks are
  // charged in chain order before they are read).
  ASSERT_EQ(got.size(), 2u);
  int64_t charged = 0;
  for (const auto& block : got) {
    for (const auto& seg : block) charged += seg->bytes();
  }
  EXPECT_EQ(charged, bytes[0] + bytes[1]);
  EXPECT_EQ(tight.used(), charged);
  // Fetching the rows takes nothing more.
  for (const auto& block : got) {
    for (const auto& seg : block) ASSERT_TRUE(store::EnsureAllRows(*seg).ok());
  }
  EXPECT_EQ(tight.used(), charged);
  got.clear();
  EXPECT_EQ(tight.used(), 0);
}

// Many small blocks spread over the three nodes, read in parallel, and a memory limit that fits
// exactly the first k of them (k from 0 to all): exactly k attach, whole or index-only, every
// time, however the nodes' answers interleave; the budget then holds exactly their bytes, and
// nothing once they are dropped.
TEST_F(RemoteTierTest, AttachNearTheLimitKeepsExactlyTheBlocksThatFitInChainOrder) {
  constexpr int kBlocks = 24;
  auto chain = MakeChain(kBlocks, seed_, budget_, /*block_tokens=*/16);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  std::vector<int64_t> bytes(kBlocks, 0);
  std::vector<std::string> nodes;
  for (int b = 0; b < kBlocks; ++b) {
    for (const auto& seg : chain[b].segments) bytes[b] += seg->bytes();
    auto node = tier->cluster().NodeOfSlot(BlockSlot(chain[b].record.hash));
    ASSERT_TRUE(node.ok()) << node.status();
    nodes.push_back(*node);
  }
  std::sort(nodes.begin(), nodes.end());
  ASSERT_GE(std::unique(nodes.begin(), nodes.end()) - nodes.begin(), 2)
      << "the blocks must be read from several nodes in parallel";
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/0);
  std::mt19937 rng(static_cast<unsigned>(seed_));
  std::vector<int> ks = {0, 1, 2, kBlocks - 1, kBlocks};
  for (int i = 0; i < 6; ++i) ks.push_back(static_cast<int>(rng() % (kBlocks + 1)));
  for (const bool lazy : {true, false}) {
    for (const int k : ks) {
      // Room for blocks [0, k) and, when k < kBlocks, all of block k but one byte: room the
      // segments of later blocks would take first were blocks charged as their reads complete.
      int64_t limit = 0;
      for (int b = 0; b < k; ++b) limit += bytes[b];
      const int64_t fit = limit;
      if (k < kBlocks) limit += bytes[k] - 1;
      store::MemoryBudget tight(limit);
      auto got = reader->FetchRun(Records(chain), store::DefaultHostAllocator(), tight, lazy);
      ASSERT_EQ(got.size(), static_cast<size_t>(k)) << "lazy " << lazy << ", limit " << limit;
      EXPECT_EQ(tight.used(), fit) << "lazy " << lazy << ", k " << k;
      for (int b = 0; b < k; ++b) {
        ASSERT_EQ(got[b].size(), 4u);
        for (int s = 0; s < 4; ++s) {
          EXPECT_EQ(got[b][s]->first_position(), chain[b].record.first_position);
          EXPECT_EQ(got[b][s]->bytes(), chain[b].segments[s]->bytes());
          if (!lazy) ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
        }
      }
      got.clear();
      EXPECT_EQ(tight.used(), 0);
    }
  }
  const RemoteStats st = reader->stats();
  EXPECT_EQ(st.blocks_partial + st.blocks_corrupt + st.blocks_version_mismatch + st.unavailable, 0);
}

TEST_F(RemoteTierTest, LazyBackgroundFetchCompletesEveryRowBitExact) {
  auto chain = MakeChain(3, seed_, budget_, kBlockTokens, 16, /*steady=*/2);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/2);
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 3u);
  reader->fetcher().WaitIdle();
  for (int b = 0; b < 3; ++b) {
    for (int s = 0; s < 4; ++s) {
      EXPECT_TRUE(got[b][s]->rows_resident());
      ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
    }
  }
  const RemoteStats st = reader->stats();
  EXPECT_EQ(st.kv.behind_segments, 12);
  EXPECT_EQ(st.kv.queued, 0);
  EXPECT_EQ(st.kv.lost_segments + st.kv.unavailable, 0);
}

// The background reads wait while a read a caller waits for runs (an urgent scope: an attach,
// an on-demand fetch), and on-demand fetches go on meanwhile; once it ends they complete every
// row, bit for bit.
TEST_F(RemoteTierTest, LazyBackgroundFetchWaitsForUrgentReads) {
  auto chain = MakeChain(2, seed_, budget_, kBlockTokens, 16, /*steady=*/2);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/1, "", "",
                     [](RemoteTierOptions& o) { o.fetch_quiet_ms = 0; });
  std::optional<KvFetcher::UrgentScope> urgent(reader->fetcher().Urgent());
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 2u);
  reader->fetcher().TEST_WaitBehindHeld();  // a worker holds a segment and waits
  EXPECT_EQ(reader->stats().kv.behind_bytes, 0);
  EXPECT_EQ(reader->stats().kv.behind_ranges, 0);
  for (const auto& block : got) {
    for (const auto& seg : block) EXPECT_FALSE(seg->rows_resident());
  }
  // On demand is not held back.
  ASSERT_TRUE(store::EnsureAllRows(*got[1][3]).ok());
  ExpectSameSegment(*got[1][3], *chain[1].segments[3]);
  EXPECT_EQ(reader->stats().kv.behind_bytes, 0);
  urgent.reset();
  reader->fetcher().WaitIdle();
  for (int b = 0; b < 2; ++b) {
    for (int s = 0; s < 4; ++s) {
      EXPECT_TRUE(got[b][s]->rows_resident());
      ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
    }
  }
  const RemoteStats st = reader->stats();
  EXPECT_GT(st.kv.behind_bytes, 0);
  EXPECT_GE(st.kv.behind_held, 1);
  EXPECT_EQ(st.kv.behind_segments, 8);
  EXPECT_EQ(st.kv.lost_segments + st.kv.unavailable, 0);
}

// ... and for remote.fetch_quiet_ms after the last one ended: with a quiet time longer than the
// test, no background read starts after the attach; on-demand fetches work; stopping the tier
// ends the wait.
TEST_F(RemoteTierTest, LazyBackgroundFetchWaitsForTheQuietTimeAfterAnAttach) {
  auto chain = MakeChain(2, seed_, budget_);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/1, "", "",
                     [](RemoteTierOptions& o) { o.fetch_quiet_ms = 3600 * 1000; });
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 2u);
  reader->fetcher().TEST_WaitBehindHeld();
  ASSERT_TRUE(store::EnsureAllRows(*got[0][0]).ok());
  ExpectSameSegment(*got[0][0], *chain[0].segments[0]);
  reader->fetcher().TEST_WaitBehindHeld();  // held again after that on-demand read
  const RemoteStats st = reader->stats();
  EXPECT_EQ(st.kv.behind_bytes, 0);
  EXPECT_EQ(st.kv.behind_segments, 0);
  EXPECT_FALSE(got[1][0]->rows_resident());
  reader.reset();  // Stop: the held worker ends
}

// Background reads are cut into chunks of remote.fetch_chunk_bytes (whole clusters): with a
// chunk smaller than any cluster, one GETRANGE per cluster (more where one crosses parts), and
// every row arrives bit for bit.
TEST_F(RemoteTierTest, LazyBackgroundFetchReadsChunksOfWholeClusters) {
  auto chain = MakeChain(2, seed_, budget_, kBlockTokens, 16, /*steady=*/2);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/2, "", "", [](RemoteTierOptions& o) {
    o.fetch_quiet_ms = 0;
    o.fetch_chunk_bytes = 1;
  });
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 2u);
  reader->fetcher().WaitIdle();
  int64_t clusters_with_rows = 0;
  for (int b = 0; b < 2; ++b) {
    for (int s = 0; s < 4; ++s) {
      EXPECT_TRUE(got[b][s]->rows_resident());
      ExpectSameSegment(*got[b][s], *chain[b].segments[s]);
      for (int32_t c = 0; c < got[b][s]->num_clusters(); ++c) {
        clusters_with_rows += got[b][s]->cluster_end_row(c) > got[b][s]->cluster_row(c);
      }
    }
  }
  const RemoteStats st = reader->stats();
  EXPECT_GE(st.kv.behind_ranges, clusters_with_rows);
  EXPECT_EQ(st.kv.behind_segments, 8);
  EXPECT_EQ(st.kv.lost_segments + st.kv.unavailable, 0);
}

// Rows gone (evicted, deleted) or corrupt after a lazy attach: the call that needs them fails
// with DataLoss, nothing wrong is ever served, and the tier does not attach that block again.
TEST_F(RemoteTierTest, LazyRowsGoneOrCorruptAfterTheAttachAreLostNeverServed) {
  auto chain = MakeChain(2, seed_, budget_);
  auto tier = Tier();
  for (auto& b : chain) ASSERT_TRUE(tier->WriteBlock(b.record, b.segments).ok());
  auto reader = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/0);
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 2u);
  // Block 0: segment 1's KV parts deleted.
  const auto kv0 = KvPartKeys(*tier, chain[0]);
  for (const std::string& k : kv0[1]) {
    EXPECT_EQ(Raw(*tier, {"DEL", k}).integer(), 1);
  }
  absl::Status s = store::EnsureAllRows(*got[0][1]);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(got[0][1]->pending()->any_lost());
  // Block 1: one byte of segment 2's first KV part flipped (same length: STRLEN cannot see it).
  const std::string k = KvPartKeys(*tier, chain[1])[2][0];
  const std::string at = std::to_string(kPartHeaderBytes + 5);
  const std::string byte(Raw(*tier, {"GETRANGE", k, at, at}).str());
  ASSERT_EQ(byte.size(), 1u);
  ASSERT_TRUE(Raw(*tier, {"SETRANGE", k, at, std::string(1, byte[0] ^ 0x10)}).is_integer());
  s = store::EnsureAllRows(*got[1][2]);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  // Other segments still verify and serve their own rows.
  ASSERT_TRUE(store::EnsureAllRows(*got[1][0]).ok());
  ExpectSameSegment(*got[1][0], *chain[1].segments[0]);
  EXPECT_EQ(reader->stats().kv.lost_segments, 2);
  // This tier attaches neither block again: both are remembered as lost.
  EXPECT_TRUE(FetchLazy(*reader, chain).empty());
  EXPECT_TRUE(reader
                  ->FetchRun({&chain[1].record, 1}, store::DefaultHostAllocator(), budget_,
                             /*lazy=*/true)
                  .empty());
  EXPECT_GE(reader->stats().blocks_corrupt, 2);
  // Another reader sees block 0's missing parts at the attach (STRLEN): partial, skipped.
  auto fresh = Tier(1100, 1 << 30, 1000, /*fetch_threads=*/0);
  EXPECT_TRUE(FetchLazy(*fresh, chain).empty());
  EXPECT_EQ(fresh->stats().blocks_partial, 1);
}

// A node stopped after a lazy attach: the rows it holds fail the call within the timeout
// (Unavailable, not lost), and come once it is back.
TEST_F(RemoteTierTest, LazyRowsOfAStoppedNodeFailWithinTheTimeoutAndComeBack) {
  auto chain = MakeChain(1, seed_, budget_);
  auto tier = Tier();
  ASSERT_TRUE(tier->WriteBlock(chain[0].record, chain[0].segments).ok());
  auto reader = Tier(1100, 1 << 30, /*command_timeout_ms=*/300, /*fetch_threads=*/0);
  auto got = FetchLazy(*reader, chain);
  ASSERT_EQ(got.size(), 1u);
  const int victim =
      cluster_->IndexOf(*reader->cluster().NodeOfSlot(BlockSlot(chain[0].record.hash)));
  ASSERT_TRUE(cluster_->Pause(victim).ok());
  const auto t = std::chrono::steady_clock::now();
  absl::Status s = store::EnsureAllRows(*got[0][0]);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_LT(ms, 300 + 3000);  // the timeout plus slack for a loaded machine
  EXPECT_FALSE(got[0][0]->pending()->any_lost());
  ASSERT_TRUE(cluster_->Resume(victim).ok());
  ASSERT_TRUE(cluster_->WaitHealthy(20000).ok());
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  do {
    s = store::EnsureAllRows(*got[0][0]);
    if (s.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // poll: down_retry_ms is 100
  } while (std::chrono::steady_clock::now() < give_up);
  ASSERT_TRUE(s.ok()) << s;
  ExpectSameSegment(*got[0][0], *chain[0].segments[0]);
}

// Redis ACL fences a namespace off: a user limited to `kvw:tenant%2fa:*` (the escaped namespace
// "tenant/a") and to the commands the tier sends, created on every node. With it the tier writes
// and reads "tenant/a" bit-exact; a write to "tenant/b" is refused by every node (an error status,
// counted, nothing stored) and a "tenant/b" block that is in the cluster is not served; a wrong
// password fails AUTH with PermissionDenied within the connect timeout and the tier only misses.
TEST_F(RemoteTierTest, AclUserIsFencedToItsNamespaceAndAWrongPasswordOnlyMisses) {
  const std::string user = "kvw-tenant-a", password = "pw-a";
  auto admin = Tier();  // the default user: every key and command
  for (const std::string& node : cluster_->nodes()) {
    auto r = admin->cluster().RunOnNode(
        node, {"ACL", "SETUSER", user, "reset", "on", ">" + password, "~kvw:tenant%2fa:*", "+get",
               "+set", "+strlen", "+getrange", "+cluster|slots", "+asking"});
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->str(), "OK") << node;
  }
  auto dbsize = [&] {
    int64_t keys = 0;
    for (const std::string& node : cluster_->nodes()) {
      auto r = admin->cluster().RunOnNode(node, {"DBSIZE"});
      EXPECT_TRUE(r.ok() && r->is_integer());
      keys += r.ok() ? r->integer() : 0;
    }
    return keys;
  };
  auto a = MakeChain(3, seed_, budget_);
  auto b = MakeChain(3, seed_ + 1, budget_, kBlockTokens, 16, 0, "tenant/b");
  auto tenant = Tier(1100, 1 << 30, 1000, 0, user, password);

  // (2) Another namespace: every write is refused (NOPERM), counted, and leaves no key.
  absl::Status denied = tenant->WriteBlock(b[0].record, b[0].segments);
  EXPECT_FALSE(denied.ok());
  EXPECT_NE(denied.message().find("NOPERM"), std::string::npos) << denied;
  EXPECT_TRUE(tenant->Enqueue(b[1].record, b[1].segments));
  EXPECT_FALSE(tenant->Flush().ok());
  EXPECT_GE(tenant->stats().write_errors, 1);
  EXPECT_EQ(tenant->stats().blocks_written, 0);
  EXPECT_EQ(dbsize(), 0);
  // A "tenant/b" block written by someone allowed to is not served to this user.
  ASSERT_TRUE(admin->WriteBlock(b[0].record, b[0].segments).ok());
  EXPECT_EQ(tenant
                ->FetchRun(std::span<const store::BlockRecord>(&b[0].record, 1),
                           store::DefaultHostAllocator(), budget_)
                .size(),
            0u);
  EXPECT_GE(tenant->stats().unavailable, 1);
  EXPECT_EQ(tenant->stats().blocks_fetched, 0);

  // (1) Its own namespace: written (directly and behind) and read back bit-exact.
  ASSERT_TRUE(tenant->WriteBlock(a[0].record, a[0].segments).ok());
  EXPECT_TRUE(tenant->Enqueue(a[1].record, a[1].segments));
  EXPECT_TRUE(tenant->Enqueue(a[2].record, a[2].segments));
  ASSERT_TRUE(tenant->Flush().ok());
  EXPECT_EQ(tenant->stats().blocks_written, 3);
  auto reader = Tier(1100, 1 << 30, 1000, 0, user, password);
  auto got = Fetch(*reader, a);
  ASSERT_EQ(got.size(), 3u);
  for (int blk = 0; blk < 3; ++blk) {
    ASSERT_EQ(got[blk].size(), 4u);
    for (int s = 0; s < 4; ++s) ExpectSameSegment(*got[blk][s], *a[blk].segments[s]);
  }
  const RemoteStats rs = reader->stats();
  EXPECT_EQ(rs.blocks_fetched, 3);
  EXPECT_EQ(rs.unavailable + rs.blocks_corrupt + rs.blocks_partial, 0);

  // (3) A wrong password: AUTH fails with a clear status within the connect timeout.
  constexpr int64_t kConnectMs = 200, kSlackMs = 2000;  // slack: a loaded 2-core machine
  RedisClusterOptions wrong;
  wrong.seeds = {cluster_->nodes()[0]};
  wrong.connect_timeout_ms = kConnectMs;
  wrong.down_retry_ms = 0;  // try the node on every call: each one must fail AUTH by itself
  wrong.user = user;
  wrong.password = "not-" + password;
  auto client = RedisCluster::Create(wrong);
  ASSERT_TRUE(client.ok()) << client.status();
  auto t = Clock::now();
  auto get = (*client)->RunOnNode(cluster_->nodes()[0],
                                  {"GET", ManifestKey("tenant/a", a[0].record.hash)});
  EXPECT_LT(MsSince(t), kConnectMs + kSlackMs);
  EXPECT_TRUE(absl::IsPermissionDenied(get.status())) << get.status();
  EXPECT_NE(get.status().message().find("WRONGPASS"), std::string::npos) << get.status();
  // The tier with it degrades to misses: nothing served, writes refused, no wait past the bound.
  auto bad = Tier(1100, 1 << 30, 1000, 0, user, "not-" + password);
  t = Clock::now();
  EXPECT_EQ(Fetch(*bad, a).size(), 0u);
  EXPECT_FALSE(bad->WriteBlock(a[0].record, a[0].segments).ok());
  EXPECT_TRUE(bad->Enqueue(a[1].record, a[1].segments));
  EXPECT_FALSE(bad->Flush().ok());
  EXPECT_LT(MsSince(t), 3 * kConnectMs + kSlackMs);
  const RemoteStats bs = bad->stats();
  EXPECT_EQ(bs.blocks_fetched, 0);
  EXPECT_GE(bs.unavailable, 1);
  EXPECT_EQ(bs.blocks_written, 0);
  EXPECT_GE(bs.write_errors, 1);
  EXPECT_GE(bs.cluster.node_failures, 1);  // marked down, not retried on every call
  // The blocks the right user wrote are untouched.
  EXPECT_EQ(Fetch(*reader, a).size(), 3u);
  // Leave no ACL user behind for the next tests.
  for (const std::string& node : cluster_->nodes()) {
    ASSERT_TRUE(admin->cluster().RunOnNode(node, {"ACL", "DELUSER", user}).ok());
  }
}

}  // namespace
}  // namespace kvwave::remote
