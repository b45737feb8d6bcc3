// The dynamic GPU wave buffer against the CPU backend's tripartite attention (engine/head_ops.h,
// float32) and a float64 full-attention reference: live contexts that grow by decode appends and
// seal new segments, several contexts at once from several threads, shared prefix segments,
// multi-page clusters, budgets 0 / default / 100%, and the cache's accounting back to its baseline
// after every scenario. Seeds are printed (KVWAVE_TEST_SEED overrides). Skipped without a GPU.
#include "buffer/wave_buffer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "buffer/pinned_allocator.h"
#include "buffer/synthetic_kv.h"
#include "engine/head_ops.h"

namespace kvwave::buffer {
namespace {

uint64_t Seed() {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (KVWAVE_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
}

std::vector<float> RandomQ(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> q(n);
  for (float& x : q) x = dist(rng);
  return q;
}

double RelError(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return 1e30;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Float64 attention of g query heads over every token of one head (sealed rows and tail).
void FullAttention64(const store::HeadKv& head, const float* q, int g, int d, float* out) {
  std::vector<const std::byte*> ks, vs;
  for (const auto& seg : head.segments)
    for (int64_t r = 0; r < seg->num_rows(); ++r)
      if (seg->token_of_row(r) >= 0) ks.push_back(seg->key_row(r)), vs.push_back(seg->value_row(r));
  for (int64_t t = 0; t < head.tail.size(); ++t)
    ks.push_back(head.tail.key_row(t)), vs.push_back(head.tail.value_row(t));
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<float> k(d), v(d);
  for (int j = 0; j < g; ++j) {
    std::vector<double> logit(ks.size());
    double m = -1e300;
    for (size_t t = 0; t < ks.size(); ++t) {
      ToFloat(ks[t], DType::kBF16, k.data(), d);
      double dot = 0;
      for (int e = 0; e < d; ++e) dot += double(q[j * d + e]) * k[e];
      logit[t] = dot * scale;
      m = std::max(m, logit[t]);
    }
    std::vector<double> acc(d, 0.0);
    double z = 0;
    for (size_t t = 0; t < ks.size(); ++t) {
      const double w = std::exp(logit[t] - m);
      z += w;
      ToFloat(vs[t], DType::kBF16, v.data(), d);
      for (int e = 0; e < d; ++e) acc[e] += w * v[e];
    }
    for (int e = 0; e < d; ++e) out[j * d + e] = static_cast<float>(acc[e] / z);
  }
}

class WaveBufferTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu::CudaBackend::DeviceAvailable()) GTEST_SKIP() << "skipped: no CUDA device";
    seed_ = Seed();
    rng_.seed(seed_);
  }
  std::unique_ptr<WaveBuffer> MakeBuffer(int heads, int g, int64_t cache_bytes,
                                         bool bf16_scores = true) {
    WaveBufferOptions o;
    o.heads = heads;
    o.g = g;
    o.d = 128;
    o.cache_bytes = cache_bytes;
    o.bf16_scores = bf16_scores;
    auto wb = WaveBuffer::Create(o);
    EXPECT_TRUE(wb.ok()) << wb.status();
    return wb.ok() ? std::move(*wb) : nullptr;
  }
  // Attends layer l of ctx on the GPU and on the CPU; returns the relative error.
  double Compare(WaveBuffer& wb, WaveBuffer::SpaceId space, const SyntheticContext& ctx, int l,
                 const WaveBudget& budget, int g, double* full_error = nullptr) {
    const auto heads = ctx.layer(l);
    const int H = static_cast<int>(heads.size()), d = ctx.shape().d;
    const std::vector<float> q = RandomQ(rng_, size_t(H) * g * d);
    std::vector<float> out(q.size(), std::nanf("")), lse(size_t(H) * g, std::nanf(""));
    WaveCallStats stats;
    const absl::Status st =
        wb.AttendHost(space, heads, q.data(), out.data(), lse.data(), budget, &stats);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<float> ref(q.size()), ref_lse(lse.size()), full(q.size());
    engine::HeadParams p;
    p.head_dim = d;
    p.dtype = DType::kBF16;
    p.group = g;
    engine::AttendBudget b{budget.retrieval, budget.estimation};
    engine::AttendStats cpu_stats;
    for (int h = 0; h < H; ++h) {
      EXPECT_TRUE(engine::AttendHead(p, heads[h], q.data() + h * g * d, b, ref.data() + h * g * d,
                                     ref_lse.data() + h * g, &cpu_stats)
                      .ok());
      if (full_error != nullptr)
        FullAttention64(heads[h], q.data() + h * g * d, g, d, full.data() + h * g * d);
    }
    EXPECT_EQ(stats.retrieved_clusters, cpu_stats.retrieved_clusters);
    EXPECT_EQ(stats.retrieved_tokens, cpu_stats.retrieved_tokens);
    EXPECT_EQ(stats.steady_tokens, cpu_stats.steady_tokens);
    EXPECT_EQ(stats.total_clusters, cpu_stats.total_clusters);
    if (full_error != nullptr) *full_error = RelError(out, full);
    const double lse_err = RelError(lse, ref_lse);
    EXPECT_LT(lse_err, 1e-4) << "lse";
    return RelError(out, ref);
  }
  void ExpectBaseline(const WaveBuffer& wb) {
    const WaveAccounting a = wb.accounting();
    EXPECT_EQ(a.spaces, 0);
    EXPECT_EQ(a.segments, 0);
    EXPECT_EQ(a.keys, 0);
    EXPECT_EQ(a.table_entries, 0);
    EXPECT_EQ(a.cached_clusters, 0);
    EXPECT_EQ(a.free_pages, a.pool_pages);
    EXPECT_EQ(a.busy_slots, 0);
  }
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

SyntheticShape Shape(int layers, int heads, int64_t tokens, uint64_t seed) {
  SyntheticShape s;
  s.layers = layers;
  s.heads = heads;
  s.tokens = tokens;
  s.segment_tokens = 2048;
  s.tail_tokens = 70;
  s.big_cluster_every = 7;  // clusters of up to 8 x 31 rows: many pages each
  s.seed = seed;
  return s;
}

// Decode steps on a growing context: every step appends a token to each layer and attends it; a
// new segment is sealed midway (k-means on the CPU, engine::SealHead) and joins the space.
TEST_F(WaveBufferTest, LiveContextMatchesCpuAcrossDecodeAndSealing) {
  const int L = 2, H = 4, g = 4;
  auto ctx = SyntheticContext::Create(Shape(L, H, 5000, seed_), PinnedAllocator());
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  auto wb = MakeBuffer(H, g, (*ctx)->layer_bytes() * L / 10);
  ASSERT_NE(wb, nullptr);
  std::vector<WaveBuffer::SpaceId> spaces;
  for (int l = 0; l < L; ++l) spaces.push_back(*wb->OpenSpace());
  store::MemoryBudget budget(int64_t{1} << 40);
  engine::HeadParams seal;
  seal.head_dim = 128;
  seal.dtype = DType::kBF16;
  seal.group = g;
  seal.allocator = PinnedAllocator();
  for (int step = 0; step < 24; ++step) {
    for (int l = 0; l < L; ++l) {
      ASSERT_TRUE((*ctx)->AppendToken(l, seed_ + step * 131 + l).ok());
      if (step == 12) {  // seal 64 tail tokens into a new segment on every head of the layer
        for (store::HeadKv& head : (*ctx)->mutable_layer(l)) {
          auto charge = budget.Reserve(engine::SealReserveBytes(seal, 64));
          ASSERT_TRUE(charge.ok());
          ASSERT_TRUE(engine::SealHead(seal, 64, head, *charge).ok());
        }
      }
      const double err = Compare(*wb, spaces[l], **ctx, l, WaveBudget{}, g);
      EXPECT_LT(err, 2e-3) << "step " << step << " layer " << l;
    }
  }
  ASSERT_TRUE(wb->Finish().ok());
  const WaveCounters c = wb->counters();
  EXPECT_GT(c.hit_clusters, 0);
  EXPECT_GT(c.miss_clusters, 0);
  for (auto s : spaces) ASSERT_TRUE(wb->CloseSpace(s).ok());
  ExpectBaseline(*wb);
}

// Budgets 0 (steady zone only), default and 100% (every cluster exact: full attention, checked
// against float64), float32 scores, a pool too small for one call's clusters (overflow).
TEST_F(WaveBufferTest, BudgetsZeroDefaultAndFull) {
  const int H = 2, g = 8;
  auto ctx = SyntheticContext::Create(Shape(1, H, 3000, seed_), PinnedAllocator());
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  for (int64_t cache : {(*ctx)->layer_bytes() / 4, int64_t{64} << 10}) {
    auto wb = MakeBuffer(H, g, cache, /*bf16_scores=*/cache < 100000);
    ASSERT_NE(wb, nullptr);
    auto space = wb->OpenSpace();
    ASSERT_TRUE(space.ok());
    for (int rep = 0; rep < 3; ++rep) {
      double full = 0;
      EXPECT_LT(Compare(*wb, *space, **ctx, 0, WaveBudget{0, 0}, g), 2e-3) << "budget 0";
      EXPECT_LT(Compare(*wb, *space, **ctx, 0, WaveBudget{}, g), 2e-3) << "default";
      EXPECT_LT(Compare(*wb, *space, **ctx, 0, WaveBudget{1.0, 0}, g, &full), 2e-3) << "100%";
      EXPECT_LT(full, 2e-3) << "100% vs float64 full attention";
      EXPECT_LT(Compare(*wb, *space, **ctx, 0, WaveBudget{0, 1.0}, g), 2e-3) << "all estimated";
    }
    ASSERT_TRUE(wb->Finish().ok());
    ASSERT_TRUE(wb->CloseSpace(*space).ok());
    ExpectBaseline(*wb);
  }
}

// Contexts sharing a prefix (the same segment objects) in one pool, attended from several
// threads at once: the shared segments are registered once, results match the CPU, and closing
// everything returns the cache to its baseline.
TEST_F(WaveBufferTest, SharedPrefixesFromSeveralThreads) {
  const int H = 4, g = 4, kContexts = 4;
  auto base = SyntheticContext::Create(Shape(1, H, 6000, seed_), PinnedAllocator());
  ASSERT_TRUE(base.ok()) << base.status();
  std::vector<std::unique_ptr<SyntheticContext>> ctxs;
  for (int i = 0; i < kContexts; ++i) {
    auto c = SyntheticContext::Create(Shape(1, H, 4500 + 700 * i, seed_ + 1 + i), PinnedAllocator(),
                                      base->get(), 2);
    ASSERT_TRUE(c.ok()) << c.status();
    ctxs.push_back(std::move(*c));
  }
  auto wb = MakeBuffer(H, g, (*base)->layer_bytes() / 3);
  ASSERT_NE(wb, nullptr);
  std::vector<WaveBuffer::SpaceId> spaces;
  for (int i = 0; i < kContexts; ++i) spaces.push_back(*wb->OpenSpace());
  std::vector<std::thread> threads;
  std::vector<double> worst(kContexts, 0);
  std::vector<uint64_t> seeds(kContexts);
  for (int i = 0; i < kContexts; ++i) seeds[i] = rng_();
  for (int i = 0; i < kContexts; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937_64 rng(seeds[i]);
      for (int step = 0; step < 12; ++step) {
        const auto heads = ctxs[i]->layer(0);
        const std::vector<float> q = RandomQ(rng, size_t(H) * g * 128);
        std::vector<float> out(q.size()), lse(size_t(H) * g), ref(q.size()), ref_lse(lse.size());
        if (!wb->AttendHost(spaces[i], heads, q.data(), out.data(), lse.data(), WaveBudget{},
                            nullptr)
                 .ok()) {
          worst[i] = 1e30;
          return;
        }
        engine::HeadParams p;
        p.head_dim = 128;
        p.dtype = DType::kBF16;
        p.group = g;
        for (int h = 0; h < H; ++h)
          (void)engine::AttendHead(p, heads[h], q.data() + h * g * 128, engine::AttendBudget{},
                                   ref.data() + h * g * 128, ref_lse.data() + h * g, nullptr);
        worst[i] = std::max(worst[i], RelError(out, ref));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kContexts; ++i) EXPECT_LT(worst[i], 2e-3) << "context " << i;
  ASSERT_TRUE(wb->Finish().ok());
  // 2 shared segments + each context's own, per head.
  int64_t own = 0;
  for (const auto& c : ctxs) own += static_cast<int64_t>(c->layer(0)[0].segments.size()) - 2;
  EXPECT_EQ(wb->accounting().segments, H * (2 + own));
  EXPECT_GT(wb->counters().hit_clusters, 0);
  for (int i = 0; i < kContexts; ++i) {
    ASSERT_TRUE(wb->CloseSpace(spaces[i]).ok());
    if (i == 0)
      EXPECT_EQ(wb->accounting().segments,
                H * (2 + own - (int64_t(ctxs[0]->layer(0)[0].segments.size()) - 2)));
  }
  ExpectBaseline(*wb);
}

// Batched Attend: one pipeline for calls on several contexts of different lengths (two sharing a
// prefix, so one batch may miss the same cluster twice; one attended twice in the batch), each
// call with its own budget (0, default, 100% or another), decode appends between batches (the
// batch's syncs upload the new rows), float32 and bf16 scores; every call against the CPU, the
// 100% ones also against float64 full attention; the cache back to its baseline after.
TEST_F(WaveBufferTest, BatchOfContextsMatchesCpu) {
  const int H = 4, g = 4, B = 5, d = 128;
  for (const bool bf16 : {false, true}) {
    auto base = SyntheticContext::Create(Shape(1, H, 6000, seed_ + 99), PinnedAllocator());
    ASSERT_TRUE(base.ok()) << base.status();
    std::vector<std::unique_ptr<SyntheticContext>> ctxs;
    int64_t bytes = 0;
    for (int i = 0; i < B; ++i) {
      auto c = i < 2 ? SyntheticContext::Create(Shape(1, H, 4500 + 900 * i, seed_ + 1 + i),
                                                PinnedAllocator(), base->get(), 2)
                     : SyntheticContext::Create(Shape(1, H, 900 + 2100 * i, seed_ + 7 * i),
                                                PinnedAllocator());
      ASSERT_TRUE(c.ok()) << c.status();
      bytes += (*c)->layer_bytes();
      ctxs.push_back(std::move(*c));
    }
    auto wb = MakeBuffer(H, g, bytes / 6, bf16);
    ASSERT_NE(wb, nullptr);
    std::vector<WaveBuffer::SpaceId> spaces;
    for (int i = 0; i < B; ++i) spaces.push_back(*wb->OpenSpace());
    const WaveBudget budgets[4] = {{0, 0}, {}, {1.0, 0}, {0.05, 0.2}};
    engine::HeadParams p;
    p.head_dim = d;
    p.dtype = DType::kBF16;
    p.group = g;
    int64_t full_checked = 0;
    for (int step = 0; step < 8; ++step) {
      for (int i = 0; i < B; ++i)
        ASSERT_TRUE(ctxs[i]->AppendToken(0, seed_ + 1000 * step + i).ok());
      // Calls: every context, then context 3 again (the same space twice in one batch).
      std::vector<int> of = {0, 1, 2, 3, 4, 3};
      const size_t n = of.size();
      std::vector<std::vector<float>> q(n), out(n), lse(n);
      std::vector<WaveBuffer::HostCall> calls(n);
      std::vector<WaveCallStats> stats(n);
      for (size_t j = 0; j < n; ++j) {
        const int i = of[j];
        q[j] = RandomQ(rng_, size_t(H) * g * d);
        out[j].assign(q[j].size(), std::nanf(""));
        lse[j].assign(size_t(H) * g, std::nanf(""));
        calls[j] = {spaces[i],     ctxs[i]->layer(0),       q[j].data(), out[j].data(),
                    lse[j].data(), budgets[(step + j) % 4], &stats[j]};
      }
      const absl::Status st = wb->AttendHostBatch(calls);
      ASSERT_TRUE(st.ok()) << st;
      for (size_t j = 0; j < n; ++j) {
        const int i = of[j];
        const auto heads = ctxs[i]->layer(0);
        const WaveBudget& b = calls[j].budget;
        std::vector<float> ref(q[j].size()), ref_lse(lse[j].size()), full(q[j].size());
        engine::AttendStats cpu;
        for (int h = 0; h < H; ++h) {
          ASSERT_TRUE(engine::AttendHead(p, heads[h], q[j].data() + h * g * d,
                                         engine::AttendBudget{b.retrieval, b.estimation},
                                         ref.data() + h * g * d, ref_lse.data() + h * g, &cpu)
                          .ok());
          if (b.retrieval == 1.0)
            FullAttention64(heads[h], q[j].data() + h * g * d, g, d, full.data() + h * g * d);
        }
        const std::string where = "bf16 " + std::to_string(bf16) + " step " + std::to_string(step) +
                                  " call " + std::to_string(j);
        EXPECT_LT(RelError(out[j], ref), 2e-3) << where;
        EXPECT_LT(RelError(lse[j], ref_lse), 1e-4) << where;
        EXPECT_EQ(stats[j].retrieved_clusters, cpu.retrieved_clusters) << where;
        EXPECT_EQ(stats[j].retrieved_tokens, cpu.retrieved_tokens) << where;
        EXPECT_EQ(stats[j].steady_tokens, cpu.steady_tokens) << where;
        EXPECT_EQ(stats[j].total_clusters, cpu.total_clusters) << where;
        if (b.retrieval == 1.0) {
          EXPECT_LT(RelError(out[j], full), 2e-3) << where << " vs float64 full attention";
          ++full_checked;
        }
        if (b.retrieval == 0 && b.estimation == 0) {
          EXPECT_EQ(stats[j].retrieved_clusters, 0) << where;
        }
      }
    }
    EXPECT_GT(full_checked, 0);
    ASSERT_TRUE(wb->Finish().ok());
    const WaveCounters c = wb->counters();
    EXPECT_GT(c.hit_clusters, 0);
    EXPECT_GT(c.miss_clusters, 0);
    EXPECT_EQ(c.calls, 8 * 6);
    EXPECT_TRUE(wb->policy_stats().admitted > 0);
    for (auto sp : spaces) ASSERT_TRUE(wb->CloseSpace(sp).ok());
    ExpectBaseline(*wb);
  }
}

// A batch whose calls are all steady-only (budget 0, or no sealed segment yet) and one of a single
// call after a larger batch (the slots' per-head buffers sized for more heads than it uses).
TEST_F(WaveBufferTest, BatchesOfSteadyOnlyAndShrinkingSizes) {
  const int H = 2, g = 8, d = 128;
  auto a = SyntheticContext::Create(Shape(1, H, 3000, seed_), PinnedAllocator());
  SyntheticShape tiny = Shape(1, H, 40, seed_ + 3);
  tiny.tail_tokens = 40;  // nothing sealed
  auto t = SyntheticContext::Create(tiny, PinnedAllocator());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(t.ok()) << t.status();
  auto wb = MakeBuffer(H, g, (*a)->layer_bytes() / 4, false);
  ASSERT_NE(wb, nullptr);
  const WaveBuffer::SpaceId sa = *wb->OpenSpace(), st = *wb->OpenSpace();
  engine::HeadParams p;
  p.head_dim = d;
  p.dtype = DType::kBF16;
  p.group = g;
  auto check = [&](std::vector<std::pair<const SyntheticContext*, WaveBudget>> items,
                   std::vector<WaveBuffer::SpaceId> ids) {
    const size_t n = items.size();
    std::vector<std::vector<float>> q(n), out(n), lse(n);
    std::vector<WaveBuffer::HostCall> calls(n);
    for (size_t j = 0; j < n; ++j) {
      q[j] = RandomQ(rng_, size_t(H) * g * d);
      out[j].assign(q[j].size(), std::nanf(""));
      lse[j].assign(size_t(H) * g, std::nanf(""));
      calls[j] = {ids[j],        items[j].first->layer(0), q[j].data(), out[j].data(),
                  lse[j].data(), items[j].second,          nullptr};
    }
    ASSERT_TRUE(wb->AttendHostBatch(calls).ok());
    for (size_t j = 0; j < n; ++j) {
      std::vector<float> ref(q[j].size()), ref_lse(lse[j].size());
      for (int h = 0; h < H; ++h)
        ASSERT_TRUE(engine::AttendHead(
                        p, items[j].first->layer(0)[h], q[j].data() + h * g * d,
                        engine::AttendBudget{items[j].second.retrieval, items[j].second.estimation},
                        ref.data() + h * g * d, ref_lse.data() + h * g, nullptr)
                        .ok());
      EXPECT_LT(RelError(out[j], ref), 2e-3) << "call " << j << " of " << n;
    }
  };
  check({{t->get(), WaveBudget{}}, {a->get(), WaveBudget{0, 0}}}, {st, sa});  // nothing ranked
  check({{a->get(), WaveBudget{}}, {t->get(), WaveBudget{}}, {a->get(), WaveBudget{1.0, 0}}},
        {sa, st, sa});
  check({{t->get(), WaveBudget{}}}, {st});
  check({{a->get(), WaveBudget{0, 1.0}}}, {sa});
  ASSERT_TRUE(wb->Finish().ok());
  ASSERT_TRUE(wb->CloseSpace(sa).ok());
  ASSERT_TRUE(wb->CloseSpace(st).ok());
  ExpectBaseline(*wb);
}

TEST_F(WaveBufferTest, BadInputIsRejected) {
  auto wb = MakeBuffer(2, 4, 1 << 20);
  ASSERT_NE(wb, nullptr);
  std::vector<float> q(2 * 4 * 128), out(q.size()), lse(8);
  EXPECT_EQ(
      wb->AttendHost(12345, {}, q.data(), out.data(), lse.data(), WaveBudget{}, nullptr).code(),
      absl::StatusCode::kNotFound);
  auto space = wb->OpenSpace();
  ASSERT_TRUE(space.ok());
  auto ctx = SyntheticContext::Create(Shape(1, 3, 3000, seed_), PinnedAllocator());
  ASSERT_TRUE(ctx.ok());
  EXPECT_EQ(wb->AttendHost(*space, (*ctx)->layer(0), q.data(), out.data(), lse.data(), WaveBudget{},
                           nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);  // 3 heads for a 2-head buffer
  EXPECT_EQ(
      wb->AttendHost(*space, {}, q.data(), out.data(), lse.data(), WaveBudget{1.5, 0}, nullptr)
          .code(),
      absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(wb->CloseSpace(*space).ok());
  EXPECT_EQ(wb->CloseSpace(*space).code(), absl::StatusCode::kNotFound);
  ExpectBaseline(*wb);
}

}  // namespace
}  // namespace kvwave::buffer
