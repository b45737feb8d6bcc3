// The graph build's exact top-N on the GPU (CudaBackend::ExactTopN, issue 19): on fresh random
// inputs its lists equal the CPU kernel's (index::ExactTopN) bit for bit — exact ties, odd
// dimensions, N up to 1024 and queries in many chunks included — so a graph built with it is the
// same graph; bad input is an error; the engine's CUDA backend runs it for the graphs of its
// background seals (counted in its stats) and its graphs equal a CPU engine's; its
// retrievalattention Attend (the steady zone on the GPU, the graph tokens on the CPU threads)
// equals the CPU engine's. Seeds printed (KVWAVE_TEST_SEED overrides). Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#include "config/dtype.h"
#include "engine/cuda/cuda_attention_backend.h"
#include "engine/engine.h"
#include "gpu/cuda_backend.h"
#include "index/exact_topn.h"
#include "index/graph_index.h"

namespace kvwave {
namespace {

uint64_t Seed() {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (KVWAVE_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
}

std::vector<float> Normal(std::mt19937_64& rng, size_t n, float mean = 0.f) {
  std::normal_distribution<float> nd(mean, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

class GraphGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu::CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
    seed_ = Seed();
  }
  std::unique_ptr<gpu::CudaBackend> Backend(int64_t workspace_bytes) {
    gpu::CudaBackendOptions o;
    o.num_streams = 1;
    o.num_events = 1;
    o.workspace_bytes = workspace_bytes;
    auto b = gpu::CudaBackend::Create(o);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }
  uint64_t seed_ = 0;
};

TEST_F(GraphGpuTest, ListsEqualTheCpuKernelsBitForBit) {
  std::mt19937_64 rng(seed_);
  auto backend = Backend(int64_t{64} << 20);
  ASSERT_NE(backend, nullptr);
  gpu::TopNBuffers buffers;
  struct Shape {
    int64_t n, m;
    int d, nn;
  };
  for (const Shape s : {Shape{1000, 300, 128, 100}, Shape{257, 70, 36, 17},
                        Shape{4099, 33, 64, 1024}, Shape{64, 5, 8, 64}, Shape{3, 2, 5, 1}}) {
    std::vector<float> keys = Normal(rng, s.n * s.d), queries = Normal(rng, s.m * s.d, 0.2f);
    // Exact ties: a tenth of the keys are copies of others (equal scores; the lower key wins).
    for (int64_t i = 0; i < s.n / 10; ++i) {
      const int64_t from = rng() % s.n, to = rng() % s.n;
      std::copy_n(keys.data() + from * s.d, s.d, keys.data() + to * s.d);
    }
    std::vector<int32_t> gpu(s.m * s.nn, -7), cpu(s.m * s.nn, -9);
    ASSERT_TRUE(gpu::ExactTopNHost(*backend, buffers, keys.data(), s.n, queries.data(), s.m, s.d,
                                   s.nn, gpu.data())
                    .ok());
    ASSERT_TRUE(
        index::ExactTopN(keys.data(), s.n, queries.data(), s.m, s.d, s.nn, cpu.data()).ok());
    int64_t differ = 0;
    for (size_t i = 0; i < cpu.size(); ++i) differ += gpu[i] != cpu[i];
    EXPECT_EQ(differ, 0) << "n " << s.n << " m " << s.m << " d " << s.d << " N " << s.nn;
    // And the lists are right, against float64 scores: non-increasing, and the N-th beats every
    // key left out (up to float32 rounding of the dot products).
    for (int64_t q = 0; q < s.m; ++q) {
      std::vector<double> score(s.n);
      for (int64_t k = 0; k < s.n; ++k) {
        double dot = 0;
        for (int j = 0; j < s.d; ++j) dot += double{queries[q * s.d + j]} * keys[k * s.d + j];
        score[k] = dot;
      }
      std::vector<char> in(s.n, 0);
      for (int r = 0; r < s.nn; ++r) {
        const int32_t k = gpu[q * s.nn + r];
        ASSERT_GE(k, 0);
        ASSERT_LT(k, s.n);
        in[k] = 1;
        if (r > 0) {
          EXPECT_LE(score[k], score[gpu[q * s.nn + r - 1]] + 1e-4);
        }
      }
      const double last = score[gpu[q * s.nn + s.nn - 1]];
      for (int64_t k = 0; k < s.n; ++k) {
        if (!in[k]) {
          EXPECT_LE(score[k], last + 1e-4) << "query " << q << " key " << k;
        }
      }
    }
  }
}

TEST_F(GraphGpuTest, ManyChunksGiveTheSameLists) {
  std::mt19937_64 rng(seed_);
  const int64_t n = 1000, m = 50;
  const int d = 128, nn = 100;
  // A workspace for 3 queries (4 n + 4 (N + 1) bytes each): 17 chunks.
  auto backend = Backend(3 * (4 * n + 4 * (nn + 1)));
  ASSERT_NE(backend, nullptr);
  gpu::TopNBuffers buffers;
  std::vector<float> keys = Normal(rng, n * d), queries = Normal(rng, m * d);
  std::vector<int32_t> gpu(m * nn), cpu(m * nn);
  ASSERT_TRUE(
      gpu::ExactTopNHost(*backend, buffers, keys.data(), n, queries.data(), m, d, nn, gpu.data())
          .ok());
  ASSERT_TRUE(index::ExactTopN(keys.data(), n, queries.data(), m, d, nn, cpu.data()).ok());
  EXPECT_EQ(gpu, cpu);
}

TEST_F(GraphGpuTest, BadInputIsAnError) {
  std::mt19937_64 rng(seed_);
  auto backend = Backend(int64_t{16} << 20);
  ASSERT_NE(backend, nullptr);
  gpu::TopNBuffers buffers;
  const int d = 16;
  std::vector<float> keys = Normal(rng, 2000 * d), queries = Normal(rng, 4 * d);
  std::vector<int32_t> out(4 * 2000);
  // N past 1024 (the ordering kernel's block) or past n.
  EXPECT_EQ(gpu::ExactTopNHost(*backend, buffers, keys.data(), 2000, queries.data(), 4, d, 1025,
                               out.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      gpu::ExactTopNHost(*backend, buffers, keys.data(), 10, queries.data(), 4, d, 11, out.data())
          .code(),
      absl::StatusCode::kInvalidArgument);
  // A NaN key with N = n: every query has fewer than N finite scores.
  keys[3 * d + 5] = std::nanf("");
  EXPECT_EQ(
      gpu::ExactTopNHost(*backend, buffers, keys.data(), 40, queries.data(), 4, d, 40, out.data())
          .code(),
      absl::StatusCode::kInvalidArgument);
  // A workspace too small for one query: ResourceExhausted, before any launch.
  auto tiny = Backend(1024);
  ASSERT_NE(tiny, nullptr);
  gpu::TopNBuffers tiny_buffers;
  EXPECT_EQ(gpu::ExactTopNHost(*tiny, tiny_buffers, keys.data() + 10 * d, 1000, queries.data(), 4,
                               d, 10, out.data())
                .code(),
            absl::StatusCode::kResourceExhausted);
  // And the backend still answers right afterwards.
  std::vector<int32_t> gpu(4 * 10), cpu(4 * 10);
  ASSERT_TRUE(gpu::ExactTopNHost(*backend, buffers, keys.data() + 10 * d, 1000, queries.data(), 4,
                                 d, 10, gpu.data())
                  .ok());
  ASSERT_TRUE(
      index::ExactTopN(keys.data() + 10 * d, 1000, queries.data(), 4, d, 10, cpu.data()).ok());
  EXPECT_EQ(gpu, cpu);
}

TEST_F(GraphGpuTest, GraphBuiltWithTheGpuTopNIsTheSameGraph) {
  std::mt19937_64 rng(seed_);
  const int64_t n = 3000, m = 2000;
  const int d = 128;
  // Keys around 40 directions (clusters, as attention keys are), queries near some of them.
  std::vector<float> centres = Normal(rng, 40 * d), keys = Normal(rng, n * d);
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < d; ++j)
      keys[i * d + j] = 0.5f * keys[i * d + j] + centres[(i % 40) * d + j];
  }
  std::vector<float> queries = Normal(rng, m * d, 0.1f);
  auto backend = Backend(int64_t{64} << 20);
  ASSERT_NE(backend, nullptr);
  gpu::TopNBuffers buffers;
  index::GraphIndexOptions cpu_options;
  index::GraphIndexOptions gpu_options = cpu_options;
  gpu_options.exact_topn = [&](const float* k, int64_t kn, const float* q, int64_t qm, int kd,
                               int nn, int32_t* out) {
    return gpu::ExactTopNHost(*backend, buffers, k, kn, q, qm, kd, nn, out);
  };
  auto cpu = index::GraphIndex::Build(keys.data(), n, queries.data(), m, d, cpu_options);
  auto gpu = index::GraphIndex::Build(keys.data(), n, queries.data(), m, d, gpu_options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_FALSE(cpu->build_profile().topn_elsewhere);
  EXPECT_TRUE(gpu->build_profile().topn_elsewhere);
  EXPECT_TRUE(cpu->ToParts() == gpu->ToParts());
  EXPECT_GT(gpu->num_edges(), n);
  // A failing top-N elsewhere falls back to the CPU kernel: still the same graph.
  index::GraphIndexOptions failing = cpu_options;
  failing.exact_topn = [](const float*, int64_t, const float*, int64_t, int, int, int32_t*) {
    return absl::InternalError("no");
  };
  auto fallback = index::GraphIndex::Build(keys.data(), n, queries.data(), m, d, failing);
  ASSERT_TRUE(fallback.ok());
  EXPECT_FALSE(fallback->build_profile().topn_elsewhere);
  EXPECT_TRUE(cpu->ToParts() == fallback->ToParts());
}

// The engine on the CUDA backend builds its segments' graphs with the GPU's top-N: the same
// graphs as an engine on the CPU backend (graph Retrieve answers equal for many queries), and the
// backend counts them.
TEST_F(GraphGpuTest, EngineOnTheGpuBuildsTheCpuEnginesGraphs) {
  const store::ModelShape shape{1, 4, 2, 64, DType::kBF16};
  config::Settings s;
  s.prefill_segment_tokens = 1024;
  s.recent_tokens = 16;
  s.sink_tokens = 4;
  s.compute_threads = 2;
  s.graph = "on";
  s.graph_queries = 1500;
  s.gpu_cache_bytes = int64_t{64} << 20;
  auto gpu_backend = engine::CreateCudaAttentionBackend(s, nullptr);
  ASSERT_TRUE(gpu_backend.ok()) << gpu_backend.status();
  engine::AttentionBackend* raw = gpu_backend->get();
  engine::EngineDeps deps;
  deps.backend = std::move(*gpu_backend);
  auto on_gpu = engine::Engine::Create(s, std::move(deps));
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  auto on_cpu = engine::Engine::Create(s);
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();

  std::mt19937_64 rng(seed_);
  const int64_t n = 2200;  // two prefill segments and a tail
  const int d = shape.head_dim;
  std::vector<float> kf = Normal(rng, n * shape.kv_heads * d), vf = Normal(rng, kf.size());
  std::vector<float> q = Normal(rng, n * shape.q_heads * d, 0.3f);
  std::vector<uint16_t> k16(kf.size()), v16(vf.size());
  FromFloat(kf.data(), DType::kBF16, k16.data(), k16.size());
  FromFloat(vf.data(), DType::kBF16, v16.data(), v16.size());
  std::vector<engine::ContextId> ids;
  for (engine::Engine* e : {on_gpu->get(), on_cpu->get()}) {
    engine::OpenOptions open;
    open.shape = shape;
    const engine::ContextId id = e->Open(open).value().id;
    ids.push_back(id);
    ASSERT_TRUE(e->AppendWithQueries(id, 0, n, std::as_bytes(std::span(k16)),
                                     std::as_bytes(std::span(v16)), q)
                    .ok());
    ASSERT_TRUE(e->Flush().ok());
    EXPECT_EQ(e->Info(id).value().graph_segments, 2 * shape.kv_heads);
  }
  EXPECT_EQ(raw->Stats().topn_gpu, 2 * shape.kv_heads);
  EXPECT_EQ(raw->Stats().topn_cpu, 0);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<float> query = Normal(rng, shape.q_heads * d, 0.3f);
    engine::RetrieveOptions ro;
    ro.method = engine::RetrieveMethod::kGraph;
    ro.k = 10;
    ro.beam = 12;
    std::vector<int64_t> pos[2];
    std::vector<float> score[2];
    for (int e = 0; e < 2; ++e) {
      pos[e].resize(shape.q_heads * ro.k);
      score[e].resize(pos[e].size());
      engine::Engine& engine = e == 0 ? **on_gpu : **on_cpu;
      ASSERT_TRUE(engine.Retrieve(ids[e], 0, query, ro, pos[e], score[e], nullptr).ok());
    }
    EXPECT_EQ(pos[0], pos[1]) << "trial " << trial;
    EXPECT_EQ(score[0], score[1]) << "trial " << trial;
  }
  // retrievalattention: the GPU engine attends the steady zone on the GPU and the graphs' tokens
  // on the CPU threads; the CPU engine all on the CPU. Same tokens, so the same result up to
  // float32 rounding; at a top-k of every token both are exact attention.
  double worst = 0, worst_lse = 0;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> query = Normal(rng, shape.q_heads * d, 0.3f);
    engine::AttendBudget budget;
    budget.method = engine::AttendMethod::kRetrievalAttention;
    budget.graph_top_k = trial % 2 == 0 ? 64 : static_cast<int32_t>(n);
    budget.beam = budget.graph_top_k;
    std::vector<float> out[2], lse[2];
    engine::AttendStats stats[2];
    for (int e = 0; e < 2; ++e) {
      out[e].assign(shape.q_heads * d, std::nanf(""));
      lse[e].assign(shape.q_heads, std::nanf(""));
      engine::Engine& engine = e == 0 ? **on_gpu : **on_cpu;
      ASSERT_TRUE(engine.Attend(ids[e], 0, query, budget, out[e], lse[e], &stats[e]).ok());
    }
    EXPECT_EQ(stats[0].steady_tokens, stats[1].steady_tokens);
    EXPECT_EQ(stats[0].retrieved_tokens, stats[1].retrieved_tokens);
    EXPECT_GT(stats[0].steady_tokens, 0);
    for (size_t i = 0; i < out[0].size(); ++i) {
      worst = std::max(worst, double(std::fabs(out[0][i] - out[1][i])));
    }
    for (size_t i = 0; i < lse[0].size(); ++i) {
      worst_lse = std::max(worst_lse, double(std::fabs(lse[0][i] - lse[1][i])));
    }
  }
  std::printf("retrievalattention GPU vs CPU engine: out %.2e, lse %.2e\n", worst, worst_lse);
  EXPECT_LT(worst, 2e-3);
  EXPECT_LT(worst_lse, 1e-4);
}

}  // namespace
}  // namespace kvwave
