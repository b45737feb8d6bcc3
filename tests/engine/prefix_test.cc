// Shared prefixes and persistence through the engine: attach, divergence, restart from RocksDB,
// eviction at the memory limit and reload, and a randomized model-based test of open / append /
// seal / close / restart against a simple model (a printed seed replays a run).
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "engine/engine.h"

namespace kvwave::engine {
namespace {

constexpr int kLayers = 2, kQHeads = 2, kKvHeads = 1, kDim = 16, kBlock = 64, kRecent = 8;
const store::ModelShape kShape{kLayers, kQHeads, kKvHeads, kDim, DType::kF32};

config::Settings PrefixSettings(const std::string& path, int64_t limit = int64_t{1} << 30) {
  config::Settings s;
  s.prefill_segment_tokens = kBlock;
  s.decode_segment_tokens = 64;
  s.recent_tokens = kRecent;
  s.sink_tokens = 2;
  s.compute_threads = 1;
  s.persist_path = path;
  s.durability = "sync";
  s.memory_limit_bytes = limit;
  return s;
}

// K/V of a position depend on the whole token prefix up to it (as in a real model), so sharing the
// wrong block shows up as wrong rows. Returns [n x kv_heads x d] floats for positions [from, to).
std::vector<float> KvOf(const std::vector<int32_t>& tokens, int layer, int64_t from, int64_t to,
                        bool value) {
  std::vector<float> out;
  uint64_t h = 0x9e3779b97f4a7c15ull * (layer + 1) + (value ? 77 : 0);
  for (int64_t p = 0; p < to; ++p) {
    h = (h ^ static_cast<uint64_t>(tokens[p])) * 0x100000001b3ull;
    if (p < from) continue;
    uint64_t x = h;
    for (int j = 0; j < kKvHeads * kDim; ++j) {
      x ^= x >> 33;
      x *= 0xff51afd7ed558ccdull;
      x ^= x >> 29;
      out.push_back(static_cast<float>(x % 2001) / 1000.0f - 1.0f + 0.001f);
    }
  }
  return out;
}

std::span<const std::byte> Bytes(const std::vector<float>& v) {
  return std::as_bytes(std::span(v));
}

void AppendRange(Engine& e, ContextId id, const std::vector<int32_t>& tokens, int64_t from,
                 int64_t to) {
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k = KvOf(tokens, l, from, to, false), v = KvOf(tokens, l, from, to, true);
    ASSERT_TRUE(e.Append(id, l, to - from, Bytes(k), Bytes(v)).ok());
  }
}

// Gathers positions [0, n) of every layer and compares them with KvOf.
void ExpectContent(Engine& e, ContextId id, const std::vector<int32_t>& tokens, int64_t n) {
  std::vector<int64_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = i;
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k(n * kKvHeads * kDim), v(k.size());
    ASSERT_TRUE(e.Gather(id, l, pos, std::as_writable_bytes(std::span(k)),
                         std::as_writable_bytes(std::span(v)))
                    .ok());
    EXPECT_EQ(k, KvOf(tokens, l, 0, n, false)) << "layer " << l;
    EXPECT_EQ(v, KvOf(tokens, l, 0, n, true)) << "layer " << l;
  }
}

std::vector<int32_t> RandomTokens(std::mt19937& rng, int64_t n) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 8192);
  return t;
}

std::string TempDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/kvwave_" + name + "_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

TEST(PrefixTest, SecondContextAttachesAndDivergesSafely) {
  auto engine = Engine::Create(PrefixSettings("")).value();
  std::mt19937 rng(1);
  std::vector<int32_t> a = RandomTokens(rng, 3 * kBlock + 30);
  const ContextId ca = engine->Open({kShape, a}).value().id;
  AppendRange(*engine, ca, a, 0, a.size());
  ASSERT_TRUE(engine->Flush().ok());  // the background seals done
  EXPECT_EQ(engine->Stats().prefix_blocks_registered, 3);

  std::vector<int32_t> b(a.begin(), a.begin() + 2 * kBlock + 5);  // diverges inside block 2
  for (int i = 0; i < kBlock; ++i) b.push_back(5000 + i);
  OpenResult rb = engine->Open({kShape, b}).value();
  EXPECT_EQ(rb.matched_tokens, 2 * kBlock);
  AppendRange(*engine, rb.id, b, rb.matched_tokens, b.size());
  ExpectContent(*engine, rb.id, b, b.size());
  ExpectContent(*engine, ca, a, a.size());  // the shared blocks did not change

  // Full attention over the attached context is exact: compare with a context built from scratch.
  const ContextId fresh = engine->Open({kShape}).value().id;
  AppendRange(*engine, fresh, b, 0, b.size());
  std::vector<float> q(kQHeads * kDim, 0.3f), o1(q.size()), o2(q.size()), l1(kQHeads), l2(kQHeads);
  for (int l = 0; l < kLayers; ++l) {
    ASSERT_TRUE(engine->Attend(rb.id, l, q, {1.0, 0.0}, o1, l1, nullptr).ok());
    ASSERT_TRUE(engine->Attend(fresh, l, q, {1.0, 0.0}, o2, l2, nullptr).ok());
    for (size_t i = 0; i < o1.size(); ++i) EXPECT_NEAR(o1[i], o2[i], 1e-5);
  }
}

TEST(PrefixTest, RestartReloadsPersistedBlocks) {
  const std::string dir = TempDir("restart");
  std::mt19937 rng(2);
  std::vector<int32_t> a = RandomTokens(rng, 3 * kBlock + kRecent);
  {
    auto engine = Engine::Create(PrefixSettings(dir)).value();
    const ContextId ca = engine->Open({kShape, a}).value().id;
    AppendRange(*engine, ca, a, 0, a.size());
    EXPECT_EQ(engine->Stats().prefix_blocks_registered, 3);
  }
  auto engine = Engine::Create(PrefixSettings(dir)).value();
  EXPECT_EQ(engine->Stats().prefix_blocks_known, 3);
  OpenResult r = engine->Open({kShape, a}).value();
  EXPECT_EQ(r.matched_tokens, 3 * kBlock);
  EXPECT_EQ(engine->Stats().prefix_reloads, 3);
  AppendRange(*engine, r.id, a, r.matched_tokens, a.size());
  ExpectContent(*engine, r.id, a, a.size());
  std::filesystem::remove_all(dir);
}

TEST(PrefixTest, MemoryLimitEvictsPersistedBlocksAndReloadsThem) {
  const std::string dir = TempDir("evict");
  // Room for about one context of 6 blocks at a time.
  auto engine = Engine::Create(PrefixSettings(dir, 300 << 10)).value();
  std::mt19937 rng(3);
  std::vector<int32_t> a = RandomTokens(rng, 6 * kBlock + kRecent);
  std::vector<int32_t> c = RandomTokens(rng, 6 * kBlock + kRecent);
  ContextId ca = engine->Open({kShape, a}).value().id;
  AppendRange(*engine, ca, a, 0, a.size());
  ASSERT_TRUE(engine->Close(ca).ok());
  ASSERT_TRUE(engine->Flush().ok());
  const int64_t used_after_a = engine->Stats().memory_used_bytes;
  EXPECT_GT(used_after_a, 0);  // a's blocks stay cached after Close
  const ContextId cc = engine->Open({kShape, c}).value().id;
  AppendRange(*engine, cc, c, 0, c.size());  // needs a's memory
  EXPECT_GT(engine->Stats().prefix_evictions, 0);
  ASSERT_TRUE(engine->Close(cc).ok());
  // c's last seals run in the background; until they finish their memory is reserved and cannot
  // be evicted, so a reload of a's blocks may not fit and the match would stop early (a match
  // stops at a block that does not reload). Wait for them: then c's blocks are cached and
  // evictable, and a's six blocks must all come back.
  ASSERT_TRUE(engine->Flush().ok());
  OpenResult again = engine->Open({kShape, a}).value();
  EXPECT_EQ(again.matched_tokens, 6 * kBlock);
  EXPECT_GT(engine->Stats().prefix_reloads, 0);
  AppendRange(*engine, again.id, a, again.matched_tokens, a.size());
  ExpectContent(*engine, again.id, a, a.size());
  std::filesystem::remove_all(dir);
}

TEST(PrefixTest, RandomizedAgainstModel) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::printf("PrefixTest.RandomizedAgainstModel seed %u\n", seed);
  std::mt19937 rng(seed);
  const std::string dir = TempDir("model");
  auto engine = Engine::Create(PrefixSettings(dir)).value();
  // A few documents; contexts take a random document prefix, sometimes with a divergent tail.
  std::vector<std::vector<int32_t>> docs;
  for (int i = 0; i < 3; ++i) docs.push_back(RandomTokens(rng, 5 * kBlock));
  struct Ctx {
    std::vector<int32_t> tokens;
    int64_t appended = 0;
    bool decoding = false;
  };
  std::map<ContextId, Ctx> open;
  std::set<std::vector<int32_t>> registered;  // token prefixes of registered blocks (the model)
  auto register_blocks = [&](const Ctx& c) {
    for (int64_t end = kBlock; end + kRecent <= c.appended && end <= (int64_t)c.tokens.size();
         end += kBlock) {
      registered.insert(std::vector<int32_t>(c.tokens.begin(), c.tokens.begin() + end));
    }
  };
  for (int step = 0; step < 60; ++step) {
    const int op = rng() % 10;
    if (op < 3 || open.empty()) {  // open
      Ctx c;
      const auto& doc = docs[rng() % docs.size()];
      const int64_t keep = rng() % (doc.size() + 1);
      c.tokens.assign(doc.begin(), doc.begin() + keep);
      for (int64_t i = keep; i < (int64_t)doc.size(); ++i) c.tokens.push_back(9000 + rng() % 50);
      int64_t expect = 0;
      while (registered.count(
          std::vector<int32_t>(c.tokens.begin(), c.tokens.begin() + expect + kBlock))) {
        expect += kBlock;
        if (expect + kBlock > (int64_t)c.tokens.size()) break;
      }
      OpenResult r = engine->Open({kShape, c.tokens}).value();
      ASSERT_EQ(r.matched_tokens, expect) << "step " << step;
      c.appended = r.matched_tokens;
      open[r.id] = c;
    } else if (op < 7) {  // append a chunk
      auto it = std::next(open.begin(), rng() % open.size());
      Ctx& c = it->second;
      const int64_t n = std::min<int64_t>(c.tokens.size() - c.appended, 1 + rng() % 100);
      if (n <= 0) continue;
      AppendRange(*engine, it->first, c.tokens, c.appended, c.appended + n);
      c.appended += n;
      if (!c.decoding) register_blocks(c);
    } else if (op < 8) {  // seal: ends prefill
      auto it = std::next(open.begin(), rng() % open.size());
      ASSERT_TRUE(engine->Seal(it->first).ok());
      if (!it->second.decoding) register_blocks(it->second);
      it->second.decoding = true;
    } else if (op < 9) {  // check and close
      auto it = std::next(open.begin(), rng() % open.size());
      ExpectContent(*engine, it->first, it->second.tokens, it->second.appended);
      ASSERT_TRUE(engine->Close(it->first).ok());
      open.erase(it);
    } else {  // restart: contexts go, registered (sync-persisted) blocks stay
      engine.reset();
      engine = Engine::Create(PrefixSettings(dir)).value();
      open.clear();
      EXPECT_EQ(engine->Stats().prefix_blocks_known, static_cast<int64_t>(registered.size()));
    }
  }
  for (auto& [id, c] : open) ExpectContent(*engine, id, c.tokens, c.appended);
  engine.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvwave::engine
