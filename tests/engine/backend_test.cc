// The attention backend seam (engine/attention_backend.h): the events a backend hears and their
// order, segment identity across contexts sharing a prefix, Attend reaching the backend, and
// backend selection from gpu.mode (engine/backend_select.h).
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/attention_backend.h"
#include "engine/backend_select.h"
#include "engine/cpu_backend.h"
#include "engine/engine.h"

namespace kvwave::engine {
namespace {

constexpr int kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 16, kBlock = 64, kRecent = 8;
const store::ModelShape kShape{kLayers, kQHeads, kKvHeads, kDim, DType::kF32};

config::Settings SmallSettings() {
  config::Settings s;
  s.prefill_segment_tokens = kBlock;
  s.decode_segment_tokens = 64;
  s.recent_tokens = kRecent;
  s.sink_tokens = 2;
  s.compute_threads = 2;
  return s;
}

// Wraps the CPU backend and checks the contract as events arrive: per (context, layer) the tail
// length and segment count it expects, from OnAppend and OnPublish alone.
class RecordingBackend final : public AttentionBackend {
 public:
  explicit RecordingBackend(const config::Settings& s) : cpu_(CreateCpuBackend(s)) {}
  const char* name() const override { return "recording"; }

  absl::Status OnOpen(const store::Context& ctx) override {
    absl::MutexLock lock(&mu_);
    log_.push_back("open " + std::to_string(ctx.id()));
    EXPECT_EQ(open_.count(ctx.id()), 0u);
    open_.insert(ctx.id());
    for (int32_t l = 0; l < ctx.shape().layers; ++l) {
      const auto& head = ctx.layer(l).heads[0];
      Unit& u = units_[{ctx.id(), l}];
      u.segments = static_cast<int64_t>(head.segments.size());
      u.tail = head.tail.size();
      for (const auto& seg : head.segments) opened_with_ids_.push_back(seg->id());
    }
    return absl::OkStatus();
  }
  absl::Status OnAppend(const store::Context& ctx, int32_t layer, int64_t n) override {
    absl::MutexLock lock(&mu_);
    EXPECT_TRUE(open_.count(ctx.id()));
    Unit& u = units_[{ctx.id(), layer}];
    u.tail += n;
    for (const auto& head : ctx.layer(layer).heads) EXPECT_EQ(head.tail.size(), u.tail);
    ++appends_;
    return absl::OkStatus();
  }
  absl::Status OnPublish(const store::Context& ctx, int32_t layer, int32_t count) override {
    absl::MutexLock lock(&mu_);
    EXPECT_TRUE(open_.count(ctx.id()));
    Unit& u = units_[{ctx.id(), layer}];
    int64_t sealed = 0;
    const auto& head0 = ctx.layer(layer).heads[0];
    for (int32_t i = 0; i < count; ++i) {
      sealed += head0.segments[head0.segments.size() - 1 - i]->num_tokens();
    }
    u.segments += count;
    u.tail -= sealed;
    for (const auto& head : ctx.layer(layer).heads) {
      EXPECT_EQ(static_cast<int64_t>(head.segments.size()), u.segments);
      EXPECT_EQ(head.tail.size(), u.tail);
      for (const auto& seg : head.segments) published_ids_.insert(seg->id());
    }
    ++publishes_;
    return absl::OkStatus();
  }
  void OnClose(const store::Context& ctx) override {
    absl::MutexLock lock(&mu_);
    EXPECT_EQ(open_.erase(ctx.id()), 1u);
    log_.push_back("close " + std::to_string(ctx.id()));
  }
  absl::Status Attend(std::span<const AttendItem> items) override {
    {
      absl::MutexLock lock(&mu_);
      attend_items_ += static_cast<int64_t>(items.size());
    }
    return cpu_->Attend(items);
  }

  struct Unit {
    int64_t segments = 0, tail = 0;
  };
  absl::Mutex mu_;
  std::unique_ptr<AttentionBackend> cpu_;
  std::set<ContextId> open_;
  std::map<std::pair<ContextId, int32_t>, Unit> units_;
  std::vector<std::string> log_;
  std::vector<uint64_t> opened_with_ids_;
  std::set<uint64_t> published_ids_;
  int64_t appends_ = 0, publishes_ = 0, attend_items_ = 0;
};

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

TEST(BackendTest, EventsFollowTheContractAndSharedSegmentsKeepTheirIds) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  auto owned = std::make_unique<RecordingBackend>(SmallSettings());
  RecordingBackend* rec = owned.get();
  EngineDeps deps;
  deps.backend = std::move(owned);
  auto engine = Engine::Create(SmallSettings(), std::move(deps)).value();

  std::vector<int32_t> tokens(3 * kBlock);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % 1000);
  const ContextId a = engine->Open({kShape, tokens, ""}).value().id;
  const int64_t tb = kShape.TokenBytesPerLayer() / static_cast<int64_t>(sizeof(float));
  for (int l = 0; l < kLayers; ++l) {
    // Uneven chunks, the whole prompt.
    for (int64_t at = 0; at < static_cast<int64_t>(tokens.size());) {
      const int64_t n = std::min<int64_t>(tokens.size() - at, 1 + rng() % 50);
      std::vector<float> k = Random(rng, n * tb), v = Random(rng, n * tb);
      ASSERT_TRUE(
          engine->Append(a, l, n, std::as_bytes(std::span(k)), std::as_bytes(std::span(v))).ok());
      at += n;
    }
  }
  ASSERT_TRUE(engine->Seal(a).ok());
  {
    absl::MutexLock lock(&rec->mu_);
    // Every token but the recent ones is sealed, in blocks; each layer's three blocks published.
    EXPECT_GE(rec->publishes_, 2 * kLayers);
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_EQ(rec->units_[std::make_pair(a, l)].tail, kRecent) << l;
      EXPECT_EQ(rec->units_[std::make_pair(a, l)].segments, 3) << l;
    }
  }
  // A second context over the same prompt attaches a's first two blocks (the third is only
  // full-block-aligned up to what a sealed whole): the same Segment objects, the same ids.
  const OpenResult b = engine->Open({kShape, tokens, ""}).value();
  EXPECT_GE(b.matched_tokens, 2 * kBlock);
  {
    absl::MutexLock lock(&rec->mu_);
    ASSERT_FALSE(rec->opened_with_ids_.empty());
    for (uint64_t id : rec->opened_with_ids_) EXPECT_TRUE(rec->published_ids_.count(id)) << id;
  }
  // Attend reaches the backend with one item per call.
  std::vector<float> q = Random(rng, kQHeads * kDim), out(q.size()), lse(kQHeads);
  ASSERT_TRUE(engine->Attend(b.id, 1, q, {0.1, 0.2}, out, lse, nullptr).ok());
  {
    absl::MutexLock lock(&rec->mu_);
    EXPECT_EQ(rec->attend_items_, 1);
  }
  // Background seals hold their context until they finish (OnClose comes with the last
  // reference): wait for them first, so that Close is the last reference here.
  ASSERT_TRUE(engine->Flush().ok());
  ASSERT_TRUE(engine->Close(a).ok());
  ASSERT_TRUE(engine->Close(b.id).ok());
  {
    absl::MutexLock lock(&rec->mu_);
    EXPECT_TRUE(rec->open_.empty());  // both closed (no call was in flight)
    EXPECT_EQ(rec->log_.back(), "close " + std::to_string(b.id));
  }
  EXPECT_EQ(engine->Stats().backend.name, "cpu");  // RecordingBackend reports the default stats
}

TEST(BackendTest, CpuBackendStatsAreZeros) {
  auto engine = Engine::Create(SmallSettings()).value();
  const BackendStats s = engine->Stats().backend;
  EXPECT_EQ(s.name, "cpu");
  EXPECT_EQ(s.device, -1);
  EXPECT_EQ(s.pool_bytes + s.hits + s.misses + s.pcie_bytes, 0);
}

TEST(BackendTest, SelectionFollowsGpuMode) {
  config::Settings s = SmallSettings();
  s.gpu_mode = "off";
  absl::StatusOr<SelectedDeps> off = SelectEngineDeps(s);
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_STREQ(off->deps.backend->name(), "cpu");
  ASSERT_NE(off->deps.host_pool, nullptr);

  s.gpu_mode = "auto";
  absl::StatusOr<SelectedDeps> auto_deps = SelectEngineDeps(s);
  ASSERT_TRUE(auto_deps.ok()) << auto_deps.status();  // auto never fails: the CPU at worst

  s.gpu_mode = "on";
  absl::StatusOr<SelectedDeps> on = SelectEngineDeps(s);
  if (on.ok()) {
    EXPECT_STREQ(on->deps.backend->name(), "cuda");
  } else {
    EXPECT_EQ(on.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(on.status().message().find("gpu.mode = on, but"), std::string::npos) << on.status();
    std::printf("gpu.mode = on here: %s\n", std::string(on.status().message()).c_str());
  }
  // The engine takes what was selected.
  auto engine = Engine::Create(s = SmallSettings(), std::move(off->deps)).value();
  EXPECT_EQ(engine->Stats().backend.name, "cpu");
}

}  // namespace
}  // namespace kvwave::engine
