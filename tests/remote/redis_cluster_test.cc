// The Redis Cluster client against a real 3-master cluster on loopback (remote/local_cluster.h):
// slot hashing agrees with the server's CLUSTER KEYSLOT, keys on every node round-trip, MOVED
// and ASK are followed, a stopped node fails calls within the timeout and is used again once it
// is back. Skipped (with the reason) only when redis-server is not installed.
#include "remote/redis_cluster.h"

#include <chrono>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "remote/local_cluster.h"

namespace kvwave::remote {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t Seed() {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (set KVWAVE_TEST_SEED to repeat)\n", (unsigned long long)seed);
  return seed;
}

class RedisClusterTest : public ::testing::Test {
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
  }
  std::unique_ptr<RedisCluster> Client(int64_t command_timeout_ms = 1000,
                                       int64_t down_retry_ms = 300) {
    RedisClusterOptions o;
    o.seeds = {cluster_->nodes()[0]};  // one seed: the rest comes from CLUSTER SLOTS
    o.connect_timeout_ms = 200;
    o.command_timeout_ms = command_timeout_ms;
    o.down_retry_ms = down_retry_ms;
    auto c = RedisCluster::Create(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
  // The server's own slot of a key.
  int ServerSlot(RedisCluster& c, const std::string& key) {
    auto r = c.RunOnNode(cluster_->nodes()[0], {"CLUSTER", "KEYSLOT", key});
    EXPECT_TRUE(r.ok() && r->is_integer()) << (r.ok() ? std::string(r->str()) : "");
    return r.ok() ? static_cast<int>(r->integer()) : -1;
  }
  // The node id of a node (CLUSTER MYID).
  std::string NodeId(RedisCluster& c, const std::string& node) {
    auto r = c.RunOnNode(node, {"CLUSTER", "MYID"});
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::string(r->str()) : "";
  }

  static LocalRedisCluster* cluster_;
};
LocalRedisCluster* RedisClusterTest::cluster_ = nullptr;

TEST(KeySlotTest, KnownValues) {
  EXPECT_EQ(Crc16("123456789"), 0x31C3);  // the CRC16/XMODEM check value
  EXPECT_EQ(KeySlot("foo"), 12182);       // from the Redis Cluster specification
  EXPECT_EQ(KeySlot("{user1000}.following"), KeySlot("user1000"));
  EXPECT_EQ(KeySlot("foo{}{bar}"), KeySlot("foo{}{bar}"));  // empty tag: the whole key
  EXPECT_NE(KeySlot("foo{}{bar}"), KeySlot("bar"));
  EXPECT_EQ(KeySlot("foo{{bar}}zap"), KeySlot("{bar"));
}

TEST(SeedsTest, ParsesAndRejects) {
  auto s = ParseSeeds(" 127.0.0.1:7000, host:7001 ,");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, (std::vector<std::string>{"127.0.0.1:7000", "host:7001"}));
  EXPECT_FALSE(ParseSeeds("").ok());
  EXPECT_FALSE(ParseSeeds("host").ok());
  EXPECT_FALSE(ParseSeeds("host:0").ok());
  EXPECT_FALSE(ParseSeeds("host:70000").ok());
  EXPECT_FALSE(ParseSeeds(":7000").ok());
}

TEST_F(RedisClusterTest, SlotsAgreeWithTheServer) {
  auto c = Client();
  std::mt19937_64 rng(Seed());
  for (int i = 0; i < 200; ++i) {
    std::string key;
    const int len = 1 + static_cast<int>(rng() % 40);
    for (int j = 0; j < len; ++j) key.push_back("ab{}:xyz0123456789"[rng() % 18]);
    ASSERT_EQ(KeySlot(key), ServerSlot(*c, key)) << "key '" << key << "'";
  }
}

TEST_F(RedisClusterTest, KeysOnEveryNodeRoundTrip) {
  auto c = Client();
  auto masters = c->Masters();
  ASSERT_TRUE(masters.ok()) << masters.status();
  EXPECT_EQ(masters->size(), 3u);
  std::vector<std::string> keys, values;
  std::set<std::string> nodes_used;
  for (int i = 0; i < 300; ++i) {
    keys.push_back(absl::StrCat("k", i));
    values.push_back(std::string(1000 + i, static_cast<char>('a' + i % 26)));
    nodes_used.insert(*c->NodeOfSlot(KeySlot(keys.back())));
  }
  EXPECT_EQ(nodes_used.size(), 3u);
  std::vector<Command> sets, gets;
  for (size_t i = 0; i < keys.size(); ++i) {
    sets.push_back({"SET", keys[i], values[i]});
    gets.push_back({"GET", keys[i]});
  }
  for (auto& r : c->RunMany(sets)) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->str(), "OK");
  }
  auto got = c->RunMany(gets);
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_EQ(got[i]->str(), values[i]);
  }
  // A pipeline on one slot (hash tag).
  std::vector<std::string> tagged = {"{t}a", "{t}b", "{t}c"};
  std::vector<Command> cmds;
  for (auto& k : tagged) cmds.push_back({"SET", k, k});
  auto p = c->Pipeline(KeySlot("{t}"), cmds);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->size(), 3u);
  auto r = c->Run({"GET", "{t}b"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->str(), "{t}b");
  EXPECT_TRUE(c->Run({"GET", "absent"})->is_nil());
}

TEST_F(RedisClusterTest, FollowsMovedAndAsk) {
  auto c = Client();
  auto stale = Client();  // keeps the old map
  const std::string key = "moving-key";
  const int slot = KeySlot(key);
  const std::string from = *c->NodeOfSlot(slot);
  std::string to;
  for (const std::string& n : cluster_->nodes()) {
    if (n != from) to = n;
  }
  const std::string from_id = NodeId(*c, from), to_id = NodeId(*c, to);
  // ASK: the slot is migrating from -> to and the key is not on `from`: from answers ASK.
  ASSERT_TRUE(
      c->RunOnNode(to, {"CLUSTER", "SETSLOT", std::to_string(slot), "IMPORTING", from_id}).ok());
  ASSERT_TRUE(
      c->RunOnNode(from, {"CLUSTER", "SETSLOT", std::to_string(slot), "MIGRATING", to_id}).ok());
  auto set = c->Run({"SET", key, "v1"});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->str(), "OK") << set->str();
  EXPECT_GE(c->stats().asked, 1);
  auto direct = c->RunOnNode(to, {"DBSIZE"});
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(direct->integer(), 1);  // it landed on the importing node
  // MOVED: the slot now belongs to `to` on every node; the stale client is redirected.
  for (const std::string& n : cluster_->nodes()) {
    ASSERT_TRUE(c->RunOnNode(n, {"CLUSTER", "SETSLOT", std::to_string(slot), "NODE", to_id}).ok());
  }
  auto get = stale->Run({"GET", key});
  ASSERT_TRUE(get.ok()) << get.status();
  EXPECT_EQ(get->str(), "v1");
  EXPECT_GE(stale->stats().moved, 1);
  EXPECT_EQ(*stale->NodeOfSlot(slot), to);  // the map was updated
  // Give the slot back so later tests see the original layout.
  ASSERT_TRUE(c->Run({"DEL", key}).ok());
  for (const std::string& n : cluster_->nodes()) {
    ASSERT_TRUE(
        c->RunOnNode(n, {"CLUSTER", "SETSLOT", std::to_string(slot), "NODE", from_id}).ok());
  }
  ASSERT_TRUE(cluster_->WaitHealthy(20000).ok());
}

TEST_F(RedisClusterTest, StoppedNodeFailsWithinTheTimeoutAndRecovers) {
  constexpr int64_t kTimeoutMs = 300;
  auto c = Client(kTimeoutMs, /*down_retry_ms=*/200);
  // One key per node.
  std::vector<std::string> key_of(3);
  for (int i = 0; key_of[0].empty() || key_of[1].empty() || key_of[2].empty(); ++i) {
    const std::string k = absl::StrCat("n", i);
    key_of[cluster_->IndexOf(*c->NodeOfSlot(KeySlot(k)))] = k;
  }
  for (auto& k : key_of) ASSERT_TRUE(c->Run({"SET", k, "x"}).ok());
  const int victim = 1;
  ASSERT_TRUE(cluster_->Pause(victim).ok());
  auto t = Clock::now();
  auto r = c->Run({"GET", key_of[victim]});
  const double first_ms = std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  // Bounded by the command timeout (generous slack for a loaded 2-core machine).
  EXPECT_LT(first_ms, kTimeoutMs + 2000);
  // Marked down: the next call fails at once; the other nodes still serve.
  t = Clock::now();
  EXPECT_TRUE(absl::IsUnavailable(c->Run({"GET", key_of[victim]}).status()));
  EXPECT_GE(c->stats().fast_failures, 1);
  EXPECT_EQ(c->stats().nodes_down, 1);
  for (int n = 0; n < 3; ++n) {
    if (n == victim) continue;
    auto ok = c->Run({"GET", key_of[n]});
    ASSERT_TRUE(ok.ok()) << ok.status();
    EXPECT_EQ(ok->str(), "x");
  }
  ASSERT_TRUE(cluster_->Resume(victim).ok());
  // Back: after down_retry_ms the node is tried again and answers.
  bool back = false;
  const auto give_up = Clock::now() + std::chrono::seconds(20);
  while (!back && Clock::now() < give_up) {
    auto again = c->Run({"GET", key_of[victim]});
    back = again.ok() && again->str() == "x";
    if (!back) std::this_thread::sleep_for(std::chrono::milliseconds(10));  // poll interval
  }
  EXPECT_TRUE(back);
  ASSERT_TRUE(cluster_->WaitHealthy(20000).ok());
}

}  // namespace
}  // namespace kvwave::remote
