// The GPU wave buffer end to end: tripartite attention of every (layer, KV head) against the CPU
// backend's tripartite attention over the same synthetic clusters, step after step while the
// cache fills and evicts; hit/miss accounting. Skipped without a GPU.
#include "buffer/wave_buffer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "buffer/pinned_allocator.h"
#include "buffer/synthetic_kv.h"

namespace kvwave::buffer {
namespace {

// A wave buffer over synthetic clusters of `shape` (pinned host memory), with the given budgets
// and a page pool of 1/cache_divisor of the KV.
struct Fixture {
  std::unique_ptr<gpu::CudaBackend> backend;
  std::unique_ptr<SyntheticKv> kv;
  std::unique_ptr<WaveBuffer> wb;
  WaveBufferOptions o;
};

void MakeFixture(const SyntheticShape& shape, double retrieval, double estimation,
                 int64_t cache_divisor, Fixture& f, bool fused = true, bool chain = true) {
  auto backend = gpu::CudaBackend::Create({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  f.backend = std::move(*backend);
  auto kv = SyntheticKv::Create(shape, PinnedAllocator());
  ASSERT_TRUE(kv.ok()) << kv.status();
  f.kv = std::move(*kv);
  f.o.layers = shape.layers;
  f.o.heads = shape.heads;
  f.o.g = shape.g;
  f.o.d = shape.d;
  f.o.clusters = shape.clusters;
  f.o.retrieval = retrieval;
  f.o.estimation = estimation;
  f.o.cache_bytes = f.kv->kv_bytes() / cache_divisor;
  f.o.max_cluster_pages = 4;
  f.o.fused_select = fused;
  f.o.chain = chain;
  auto wb = WaveBuffer::Create(f.backend.get(), f.o, f.kv->Units());
  ASSERT_TRUE(wb.ok()) << wb.status();
  f.wb = std::move(*wb);
}

TEST(WaveBufferTest, MatchesCpuTripartiteAcrossSteps) {
  if (!gpu::CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  SyntheticShape shape;
  shape.layers = 3;
  shape.heads = 4;
  shape.g = 4;
  shape.d = 128;
  shape.clusters = 600;
  shape.vary_sizes = true;  // partial pages
  shape.steady_rows = 12;
  shape.seed = std::random_device{}();
  Fixture f;
  ASSERT_NO_FATAL_FAILURE(MakeFixture(shape, 0.05, 0.3, 10, f));
  auto* backend = &f.backend;
  auto* kv = &f.kv;
  auto* wb = &f.wb;
  const WaveBufferOptions& o = f.o;
  const int n = o.heads * o.g * o.d;
  auto q_dev = (*backend)->Allocate(sizeof(float) * n);
  auto out_dev = (*backend)->Allocate(sizeof(float) * n);
  auto lse_dev = (*backend)->Allocate(sizeof(float) * o.heads * o.g);
  ASSERT_TRUE(q_dev.ok() && out_dev.ok() && lse_dev.ok());
  std::mt19937 rng(shape.seed);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> q(n), out(n), lse(o.heads * o.g);
  int64_t hits = 0, misses = 0;
  for (int step = 0; step < 6; ++step) {
    if (step % 2 == 0)
      for (auto& x : q) x = normal(rng);  // odd steps repeat the query: all hits
    for (int layer = 0; layer < o.layers; ++layer) {
      ASSERT_TRUE((*backend)->Copy(q_dev->data(), q.data(), sizeof(float) * n).ok());
      ASSERT_TRUE((*backend)->Memset(out_dev->data(), 0xFF, sizeof(float) * n).ok());
      const WaveCounters before = (*wb)->counters();
      ASSERT_TRUE(
          (*wb)
              ->AttendLayer(layer, q_dev->as<float>(), out_dev->as<float>(), lse_dev->as<float>())
              .ok());
      ASSERT_TRUE((*wb)->Finish().ok());
      WaveCounters st = (*wb)->counters();
      st.hit_clusters -= before.hit_clusters;
      st.miss_clusters -= before.miss_clusters;
      EXPECT_EQ(st.stale_hits, 0);  // Finish after every call: the policy never lags
      ASSERT_TRUE((*backend)->Copy(out.data(), out_dev->data(), sizeof(float) * n).ok());
      ASSERT_TRUE((*backend)->Copy(lse.data(), lse_dev->data(), sizeof(float) * lse.size()).ok());
      ASSERT_TRUE((*backend)->Synchronize().ok());
      if (step % 2 == 1) {
        EXPECT_EQ(st.miss_clusters, 0) << "repeated query, step " << step;
      }
      hits += st.hit_clusters;
      misses += st.miss_clusters;
      EXPECT_EQ(st.hit_clusters + st.miss_clusters, o.heads * (*wb)->retrieval_clusters());
      for (int h = 0; h < o.heads; ++h) {
        std::vector<float> ref(o.g * o.d), ref_lse(o.g);
        ASSERT_TRUE((*kv)
                        ->ReferenceAttend(int64_t{layer} * o.heads + h, q.data() + h * o.g * o.d,
                                          (*wb)->retrieval_clusters(), (*wb)->estimation_clusters(),
                                          ref.data(), ref_lse.data())
                        .ok());
        double num = 0, den = 0;
        for (int i = 0; i < o.g * o.d; ++i) {
          ASSERT_TRUE(std::isfinite(out[h * o.g * o.d + i]));
          num += std::pow(double(out[h * o.g * o.d + i]) - ref[i], 2);
          den += double(ref[i]) * ref[i];
        }
        EXPECT_LT(std::sqrt(num / den), 1e-4) << "step " << step << " layer " << layer;
        for (int j = 0; j < o.g; ++j)
          EXPECT_NEAR(lse[h * o.g + j], ref_lse[j], 1e-4 * (1 + std::abs(ref_lse[j])));
      }
    }
  }
  EXPECT_GT(hits, 0);
  EXPECT_GT(misses, 0);
  const PolicyStats ps = (*wb)->policy_stats();
  EXPECT_GT(ps.evicted, 0);  // a 10% cache over 3 query sets must evict
  EXPECT_TRUE((*wb)->Finish().ok());
}

// Calls queued back to back (no Finish in between): the committer lags the GPU by up to kRing
// calls, so hits may go stale; every output must still match the CPU reference. With the fused
// select/plan/merge path, its attention chained behind the selection (the default) or after an
// event, and with one op per phase.
enum class Pipeline { kUnfused, kFusedEvent, kFusedChained };
class PipelinedTest : public ::testing::TestWithParam<Pipeline> {};

TEST_P(PipelinedTest, CallsMatchCpu) {
  if (!gpu::CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  SyntheticShape shape;
  shape.layers = 5;
  shape.heads = 2;
  shape.g = 4;
  shape.d = 64;
  shape.clusters = 400;
  shape.vary_sizes = true;
  shape.steady_rows = 5;
  shape.seed = std::random_device{}();
  Fixture f;  // a pool of 1/8 of the KV: smaller than the retrieved set of all layers
  ASSERT_NO_FATAL_FAILURE(MakeFixture(shape, 0.08, 0.2, 8, f, GetParam() != Pipeline::kUnfused,
                                      GetParam() == Pipeline::kFusedChained));
  auto* backend = &f.backend;
  auto* kv = &f.kv;
  auto* wb = &f.wb;
  const WaveBufferOptions& o = f.o;
  const int n = o.heads * o.g * o.d, steps = 6, calls = steps * o.layers;
  auto q_dev = (*backend)->Allocate(sizeof(float) * n * calls);
  auto out_dev = (*backend)->Allocate(sizeof(float) * n * calls);
  auto lse_dev = (*backend)->Allocate(sizeof(float) * o.heads * o.g * calls);
  ASSERT_TRUE(q_dev.ok() && out_dev.ok() && lse_dev.ok());
  std::mt19937 rng(shape.seed);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> q(size_t(n) * calls), out(q.size()), lse(size_t(o.heads) * o.g * calls);
  for (int step = 0; step < steps; ++step)
    for (int i = 0; i < n * o.layers; ++i)  // steps 2k and 2k+1 share queries: hits
      q[(size_t(step) * o.layers) * n + i] =
          step % 2 ? q[(size_t(step - 1) * o.layers) * n + i] : normal(rng);
  ASSERT_TRUE((*backend)->Copy(q_dev->data(), q.data(), sizeof(float) * q.size()).ok());
  for (int call = 0; call < calls; ++call) {
    ASSERT_TRUE((*wb)
                    ->AttendLayer(call % o.layers, q_dev->as<float>() + size_t(call) * n,
                                  out_dev->as<float>() + size_t(call) * n,
                                  lse_dev->as<float>() + size_t(call) * o.heads * o.g)
                    .ok());
  }
  ASSERT_TRUE((*wb)->Finish().ok());
  ASSERT_TRUE((*backend)->Copy(out.data(), out_dev->data(), sizeof(float) * out.size()).ok());
  ASSERT_TRUE((*backend)->Copy(lse.data(), lse_dev->data(), sizeof(float) * lse.size()).ok());
  ASSERT_TRUE((*backend)->Synchronize().ok());
  for (int call = 0; call < calls; ++call) {
    const int layer = call % o.layers;
    for (int h = 0; h < o.heads; ++h) {
      std::vector<float> ref(o.g * o.d), ref_lse(o.g);
      const size_t at = size_t(call) * n + size_t(h) * o.g * o.d;
      ASSERT_TRUE((*kv)
                      ->ReferenceAttend(int64_t{layer} * o.heads + h, q.data() + at,
                                        (*wb)->retrieval_clusters(), (*wb)->estimation_clusters(),
                                        ref.data(), ref_lse.data())
                      .ok());
      double num = 0, den = 0;
      for (int i = 0; i < o.g * o.d; ++i) {
        num += std::pow(double(out[at + i]) - ref[i], 2);
        den += double(ref[i]) * ref[i];
      }
      EXPECT_LT(std::sqrt(num / den), 1e-4) << "call " << call << " head " << h;
    }
  }
  const WaveCounters c = (*wb)->counters();
  EXPECT_EQ(c.calls, calls);
  EXPECT_EQ(c.hit_clusters + c.miss_clusters,
            int64_t{calls} * o.heads * (*wb)->retrieval_clusters());
  EXPECT_GT(c.hit_clusters, 0);
  EXPECT_GT((*wb)->policy_stats().evicted, 0);
}

INSTANTIATE_TEST_SUITE_P(WaveBufferTest, PipelinedTest,
                         ::testing::Values(Pipeline::kUnfused, Pipeline::kFusedEvent,
                                           Pipeline::kFusedChained),
                         [](const ::testing::TestParamInfo<Pipeline>& i) {
                           return i.param == Pipeline::kUnfused      ? "Unfused"
                                  : i.param == Pipeline::kFusedEvent ? "FusedEvent"
                                                                     : "FusedChained";
                         });

}  // namespace
}  // namespace kvwave::buffer
