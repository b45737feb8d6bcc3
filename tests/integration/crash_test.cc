// Persistence through the real daemon: kill -9 of kvwaved during a write-heavy load and a restart
// (every block acknowledged in sync mode is back and verifies; in async mode what comes back
// verifies), and bytes flipped in the stored files (detected, dropped, reported, never served).
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

constexpr int kLayers = 2, kDim = 128, kBlock = 64, kRecent = 8, kBlocksPerDoc = 4;
const client::ModelShape kShape{kLayers, 2, 1, kDim, DType::kF32};

std::vector<std::string> PersistSettings(const std::string& dir, const std::string& durability) {
  return {"persist.path=" + dir, "persist.durability=" + durability,
          "store.prefill_segment_tokens=" + std::to_string(kBlock),
          "store.recent_tokens=" + std::to_string(kRecent), "store.sink_tokens=2"};
}

std::vector<int32_t> DocTokens(int doc) {
  std::vector<int32_t> t(kBlocksPerDoc * kBlock + kRecent);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>((doc * 7919 + i * 31) % 8192);
  t[0] = 10000 + doc;  // every document differs from its first token
  return t;
}

// K (or V) rows of positions [from, to) of a document's layer: a fixed function of them.
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

std::string FreshDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/kvwave_crash_" + name + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

// Writes documents until stopped or the daemon dies; records the blocks each document has
// acknowledged (every layer's Append covering the block returned OK).
void WriteDocuments(const std::string& socket, std::atomic<bool>& stop, std::map<int, int>& acked,
                    std::mutex& mu) {
  auto c = Connect(socket);
  if (c == nullptr) return;
  for (int doc = 0; !stop.load(); ++doc) {
    std::vector<int32_t> tokens = DocTokens(doc);
    auto opened = c->Open({kShape, tokens, ""});
    if (!opened.ok()) return;
    for (int64_t at = 0; at < static_cast<int64_t>(tokens.size()); at += 24) {
      const int64_t to = std::min<int64_t>(tokens.size(), at + 24);
      for (int l = 0; l < kLayers; ++l) {
        std::vector<float> k = Rows(doc, l, at, to, false), v = Rows(doc, l, at, to, true);
        if (!c->Append(opened->id, l, to - at, std::as_bytes(std::span(k)),
                       std::as_bytes(std::span(v)))
                 .ok()) {
          return;  // the daemon is gone
        }
      }
      std::lock_guard lock(mu);
      acked[doc] = static_cast<int>(std::min<int64_t>((to - kRecent) / kBlock, kBlocksPerDoc));
    }
    (void)c->Close(opened->id);
  }
}

// Reopens every document on the restarted daemon; returns blocks matched per document, and
// checks that everything it serves is exactly what was written.
std::map<int, int> Verify(const std::string& socket, const std::map<int, int>& docs) {
  auto c = Connect(socket);
  std::map<int, int> matched;
  for (const auto& [doc, blocks] : docs) {
    auto opened = c->Open({kShape, DocTokens(doc), ""});
    EXPECT_TRUE(opened.ok()) << opened.status();
    if (!opened.ok()) continue;
    const int64_t n = opened->matched_tokens;
    EXPECT_EQ(n % kBlock, 0);
    matched[doc] = static_cast<int>(n / kBlock);
    std::vector<int64_t> pos(n);
    for (int64_t i = 0; i < n; ++i) pos[i] = i;
    for (int l = 0; l < kLayers && n > 0; ++l) {
      std::vector<float> k(n * kDim), v(n * kDim);
      EXPECT_TRUE(c->Gather(opened->id, l, pos, std::as_writable_bytes(std::span(k)),
                            std::as_writable_bytes(std::span(v)))
                      .ok());
      EXPECT_EQ(k, Rows(doc, l, 0, n, false)) << "doc " << doc << " layer " << l;
      EXPECT_EQ(v, Rows(doc, l, 0, n, true)) << "doc " << doc << " layer " << l;
    }
    (void)c->Close(opened->id);
  }
  return matched;
}

void KillDuringLoad(const std::string& durability) {
  const std::string dir = FreshDir(durability);
  auto daemon = StartDaemon(PersistSettings(dir, durability));
  ASSERT_NE(daemon, nullptr);
  std::atomic<bool> stop{false};
  std::map<int, int> acked;
  std::mutex mu;
  std::thread writer(WriteDocuments, daemon->socket_path(), std::ref(stop), std::ref(acked),
                     std::ref(mu));
  const unsigned seed = TestSeed();
  std::printf("crash test (%s)\n", durability.c_str());
  // Kill at a random point of the load, measured in acknowledged blocks (not in time).
  const int kill_after = 1 + static_cast<int>(seed % 12);
  EXPECT_TRUE(Eventually(
      [&] {
        std::lock_guard lock(mu);
        int total = 0;
        for (auto& [doc, blocks] : acked) total += blocks;
        return total >= kill_after;
      },
      60000));
  ASSERT_EQ(kill(daemon->pid(), SIGKILL), 0);
  stop = true;
  writer.join();
  (void)daemon->Stop(SIGKILL, 5000);
  daemon.reset();
  std::map<int, int> snapshot;
  {
    std::lock_guard lock(mu);
    snapshot = acked;
  }
  int total = 0;
  for (auto& [doc, blocks] : snapshot) total += blocks;
  ASSERT_GT(total, 0) << "the load acknowledged nothing before the kill";

  auto restarted = StartDaemon(PersistSettings(dir, durability));
  ASSERT_NE(restarted, nullptr);
  std::map<int, int> matched = Verify(restarted->socket_path(), snapshot);
  int back = 0;
  for (const auto& [doc, blocks] : snapshot) {
    back += std::min(blocks, matched[doc]);
    if (durability == "sync")
      EXPECT_GE(matched[doc], blocks) << "acknowledged block lost, doc " << doc;
  }
  std::printf("crash test (%s): %d blocks acknowledged, %d back after kill -9\n",
              durability.c_str(), total, back);
  restarted.reset();
  std::filesystem::remove_all(dir);
}

TEST(CrashTest, SyncModeKeepsEveryAcknowledgedBlock) { KillDuringLoad("sync"); }

TEST(CrashTest, AsyncModeServesOnlyVerifiedBlocks) { KillDuringLoad("async"); }

TEST(CrashTest, CorruptRecordIsDetectedDroppedAndReported) {
  const std::string dir = FreshDir("corrupt");
  std::map<int, int> docs;
  {
    auto daemon = StartDaemon(PersistSettings(dir, "sync"));
    ASSERT_NE(daemon, nullptr);
    auto c = Connect(daemon->socket_path());
    for (int doc = 0; doc < 3; ++doc) {
      std::vector<int32_t> tokens = DocTokens(doc);
      auto opened = c->Open({kShape, tokens, ""});
      ASSERT_TRUE(opened.ok());
      for (int l = 0; l < kLayers; ++l) {
        std::vector<float> k = Rows(doc, l, 0, tokens.size(), false);
        std::vector<float> v = Rows(doc, l, 0, tokens.size(), true);
        ASSERT_TRUE(c->Append(opened->id, l, tokens.size(), std::as_bytes(std::span(k)),
                              std::as_bytes(std::span(v)))
                        .ok());
      }
      docs[doc] = kBlocksPerDoc;
    }
    ASSERT_EQ(daemon->Stop(SIGTERM, 30000).value_or(-1), 0);
  }
  // Flip bytes in the middle of every blob file: segments (over 64 KiB here) live there, and only
  // kvwave's own checksum guards them on read.
  int flipped = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string ext = entry.path().extension();
    if (ext != ".blob") continue;
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    const auto size = std::filesystem::file_size(entry.path());
    for (auto at = size / 3; at < size * 2 / 3; at += 4099) {
      f.seekg(at);
      char b = 0;
      f.read(&b, 1);
      b = static_cast<char>(b ^ 0x5a);
      f.seekp(at);
      f.write(&b, 1);
      ++flipped;
    }
  }
  ASSERT_GT(flipped, 0);
  auto daemon = StartDaemon(PersistSettings(dir, "sync"));
  ASSERT_NE(daemon, nullptr);
  std::map<int, int> matched = Verify(daemon->socket_path(), docs);  // serves only correct rows
  int lost = 0;
  for (const auto& [doc, blocks] : docs) lost += blocks - matched[doc];
  auto c = Connect(daemon->socket_path());
  auto stats = c->Stats();
  ASSERT_TRUE(stats.ok());
  std::printf("corruption: %d of %d blocks dropped, %lld corrupt records reported\n", lost,
              3 * kBlocksPerDoc, static_cast<long long>(stats->persist_corrupt_records));
  EXPECT_GT(lost, 0);
  EXPECT_GT(stats->persist_corrupt_records, 0);
  daemon.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvwave::testing
