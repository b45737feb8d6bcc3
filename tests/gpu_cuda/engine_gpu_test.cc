// The engine with the CUDA attention backend against the CPU backend, on the same engine state:
// the engine is given a backend that forwards every event to both and every Attend to both (the
// CUDA backend's output is returned, the CPU's compared with it under the same layer lock), so
// background seals racing the calls cannot make the two see different contexts. Scenarios:
// prefill + decode appends of several contexts from several threads, shared prefixes, eviction
// to RocksDB and reload, budgets 0 / default / 100% (100% also against float64 full attention
// over the engine's Gather); after each, the GPU cache back to its baseline (no segment resident,
// no page held). Seeds are printed (KVWAVE_TEST_SEED overrides). Skipped without a GPU.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "buffer/pinned_allocator.h"
#include "config/status_macros.h"
#include "engine/attention_backend.h"
#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_attention_backend.h"
#include "engine/engine.h"
#include "gpu/cuda_backend.h"
#include "store/host_memory.h"

namespace kvwave::engine {
namespace {

constexpr int kLayers = 2, kQHeads = 8, kKvHeads = 2, kDim = 128;
const store::ModelShape kShape{kLayers, kQHeads, kKvHeads, kDim, DType::kBF16};

uint64_t Seed() {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (KVWAVE_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
}

// Forwards to the CUDA backend and to the CPU backend; Attend returns the CUDA results and
// records how far the CPU's are from them.
class TeeBackend final : public AttentionBackend {
 public:
  TeeBackend(std::unique_ptr<AttentionBackend> gpu, std::unique_ptr<AttentionBackend> cpu)
      : gpu_(std::move(gpu)), cpu_(std::move(cpu)) {}
  const char* name() const override { return "tee"; }
  absl::Status OnOpen(const store::Context& c) override {
    (void)cpu_->OnOpen(c);
    return gpu_->OnOpen(c);
  }
  absl::Status OnAppend(const store::Context& c, int32_t l, int64_t n) override {
    (void)cpu_->OnAppend(c, l, n);
    return gpu_->OnAppend(c, l, n);
  }
  absl::Status OnPublish(const store::Context& c, int32_t l, int32_t s) override {
    (void)cpu_->OnPublish(c, l, s);
    return gpu_->OnPublish(c, l, s);
  }
  void OnClose(const store::Context& c) override {
    cpu_->OnClose(c);
    gpu_->OnClose(c);
  }
  absl::Status Attend(std::span<const AttendItem> items) override {
    std::vector<std::vector<float>> out(items.size()), lse(items.size());
    std::vector<AttendStats> stats(items.size());
    std::vector<AttendItem> mine(items.begin(), items.end());
    for (size_t i = 0; i < items.size(); ++i) {
      out[i].resize(items[i].out.size());
      lse[i].resize(items[i].lse.size());
      mine[i].out = out[i];
      mine[i].lse = lse[i];
      mine[i].stats = &stats[i];
    }
    KVWAVE_RETURN_IF_ERROR(cpu_->Attend(mine));
    std::vector<AttendStats> gstats(items.size());
    std::vector<AttendItem> theirs(items.begin(), items.end());
    for (size_t i = 0; i < items.size(); ++i) theirs[i].stats = &gstats[i];
    KVWAVE_RETURN_IF_ERROR(gpu_->Attend(theirs));
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < items.size(); ++i) {
      double num = 0, den = 0, lnum = 0, lden = 0;
      bool finite = true;
      for (size_t j = 0; j < out[i].size(); ++j) {
        const double g = items[i].out[j], c = out[i][j];
        finite = finite && std::isfinite(g);
        num += (g - c) * (g - c);
        den += c * c;
      }
      for (size_t j = 0; j < lse[i].size(); ++j) {
        const double g = items[i].lse[j], c = lse[i][j];
        lnum += (g - c) * (g - c);
        lden += c * c;
      }
      const double err = finite ? std::sqrt(num / std::max(den, 1e-30)) : 1e30;
      worst_ = std::max(worst_, err);
      worst_lse_ = std::max(worst_lse_, std::sqrt(lnum / std::max(lden, 1e-30)));
      const bool mismatch = gstats[i].retrieved_clusters != stats[i].retrieved_clusters ||
                            gstats[i].retrieved_tokens != stats[i].retrieved_tokens ||
                            gstats[i].steady_tokens != stats[i].steady_tokens ||
                            gstats[i].total_clusters != stats[i].total_clusters;
      if (mismatch) ++stat_mismatches_;
      if ((mismatch || err > 2e-3) && ++reported_ <= 5)
        std::printf(
            "call %ld: budget %.3f/%.3f err %.2e; gpu vs cpu: retrieved %ld/%ld clusters %ld/%ld "
            "tokens, steady %ld/%ld, total %ld/%ld\n",
            long(calls_), items[i].budget.retrieval, items[i].budget.estimation, err,
            long(gstats[i].retrieved_clusters), long(stats[i].retrieved_clusters),
            long(gstats[i].retrieved_tokens), long(stats[i].retrieved_tokens),
            long(gstats[i].steady_tokens), long(stats[i].steady_tokens),
            long(gstats[i].total_clusters), long(stats[i].total_clusters));
      if (gstats[i].retrieved_clusters > 0) ++calls_with_retrieval_;
      ++calls_;
      *items[i].stats = gstats[i];
    }
    return absl::OkStatus();
  }
  BackendStats Stats() const override { return gpu_->Stats(); }
  // Seals index with the backend under test (the GPU's k-means), and both sides see its result.
  absl::StatusOr<index::WaveClusters> ClusterKeys(const float* keys, int64_t n, int32_t d,
                                                  const index::WaveIndexOptions& o) override {
    return gpu_->ClusterKeys(keys, n, d, o);
  }

  double worst() const {
    std::lock_guard<std::mutex> l(mu_);
    return worst_;
  }
  double worst_lse() const {
    std::lock_guard<std::mutex> l(mu_);
    return worst_lse_;
  }
  int64_t calls() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_;
  }
  int64_t stat_mismatches() const {
    std::lock_guard<std::mutex> l(mu_);
    return stat_mismatches_;
  }
  int64_t calls_with_retrieval() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_with_retrieval_;
  }

 private:
  std::unique_ptr<AttentionBackend> gpu_, cpu_;
  mutable std::mutex mu_;
  double worst_ = 0, worst_lse_ = 0;
  int64_t calls_ = 0, stat_mismatches_ = 0, calls_with_retrieval_ = 0, reported_ = 0;
};

config::Settings TestSettings(const std::string& persist = "", int64_t limit = int64_t{2} << 30) {
  config::Settings s;
  s.prefill_segment_tokens = 512;
  s.decode_segment_tokens = 128;
  s.recent_tokens = 16;
  s.sink_tokens = 4;
  s.compute_threads = 2;
  s.memory_limit_bytes = limit;
  s.persist_path = persist;
  s.durability = "sync";
  s.gpu_mode = "on";
  s.rank = "centroid";  // the GPU's ranking, on both sides of the tee (auto is two_pass on the CPU)
  s.estimation_spread = "off";  // the GPU's estimation (no key spreads; off is the default too)
  s.gpu_cache_bytes = 4 << 20;  // small: evictions
  return s;
}

struct Harness {
  std::unique_ptr<Engine> engine;
  TeeBackend* tee = nullptr;
};

// KVWAVE_TEST_TEE_CPU=1: both sides of the tee on the CPU (checks the harness without a GPU).
bool TeeOnCpu() { return std::getenv("KVWAVE_TEST_TEE_CPU") != nullptr; }

Harness Make(const config::Settings& s) {
  Harness h;
  absl::StatusOr<std::unique_ptr<AttentionBackend>> gpu =
      TeeOnCpu() ? CreateCpuBackend(s) : CreateCudaAttentionBackend(s, nullptr);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!gpu.ok()) return h;
  auto tee = std::make_unique<TeeBackend>(std::move(*gpu), CreateCpuBackend(s));
  h.tee = tee.get();
  EngineDeps deps;
  deps.backend = std::move(tee);
  deps.host_pool = std::make_shared<store::HostPool>(
      TeeOnCpu() ? store::MappedHostAllocator() : buffer::PinnedAllocator(), s.host_pool_bytes);
  auto e = Engine::Create(s, std::move(deps));
  EXPECT_TRUE(e.ok()) << e.status();
  if (e.ok()) h.engine = std::move(*e);
  return h;
}

// Keys around a few random directions per (layer, head) (clusters for the index to find),
// values random; bf16. Returns [n x kv_heads x d] of keys or values.
std::vector<uint16_t> Rows(std::mt19937_64& rng, int64_t n, bool keys) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> out(n * kKvHeads * kDim);
  static thread_local std::vector<float> centres;
  if (centres.empty()) {
    centres.resize(16 * kDim);
    std::mt19937_64 r2(12345);
    for (float& x : centres) x = nd(r2);
  }
  for (int64_t t = 0; t < n; ++t) {
    const int c = static_cast<int>(rng() % 16);
    for (int j = 0; j < kKvHeads * kDim; ++j)
      out[t * kKvHeads * kDim + j] =
          FloatToBf16(keys ? centres[c * kDim + j % kDim] + 0.5f * nd(rng) : nd(rng));
  }
  return out;
}

void Append(Engine& e, ContextId id, std::mt19937_64& rng, int64_t total) {
  for (int64_t done = 0; done < total;) {  // in chunks, as a client streams a prefill
    const int64_t n = std::min<int64_t>(256, total - done);
    done += n;
    for (int l = 0; l < kLayers; ++l) {
      auto k = Rows(rng, n, true), v = Rows(rng, n, false);
      const absl::Status s =
          e.Append(id, l, n, std::as_bytes(std::span(k)), std::as_bytes(std::span(v)));
      ASSERT_TRUE(s.ok()) << s << " (memory used " << e.Stats().memory_used_bytes << ")";
    }
  }
}

// Float64 attention over every position of the context (through Gather).
std::vector<float> Full64(Engine& e, ContextId id, int layer, const std::vector<float>& q) {
  const int64_t n = e.Info(id)->tokens_per_layer[layer];
  std::vector<int64_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = i;
  std::vector<uint16_t> k(n * kKvHeads * kDim), v(k.size());
  EXPECT_TRUE(e.Gather(id, layer, pos, std::as_writable_bytes(std::span(k)),
                       std::as_writable_bytes(std::span(v)))
                  .ok());
  const int g = kQHeads / kKvHeads;
  std::vector<float> out(kQHeads * kDim);
  for (int qh = 0; qh < kQHeads; ++qh) {
    const int h = qh / g;
    std::vector<double> logit(n);
    double m = -1e300;
    for (int64_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j)
        dot += double(q[qh * kDim + j]) * Bf16ToFloat(k[(t * kKvHeads + h) * kDim + j]);
      logit[t] = dot / std::sqrt(double(kDim));
      m = std::max(m, logit[t]);
    }
    std::vector<double> acc(kDim, 0);
    double z = 0;
    for (int64_t t = 0; t < n; ++t) {
      const double w = std::exp(logit[t] - m);
      z += w;
      for (int j = 0; j < kDim; ++j) acc[j] += w * Bf16ToFloat(v[(t * kKvHeads + h) * kDim + j]);
    }
    for (int j = 0; j < kDim; ++j) out[qh * kDim + j] = static_cast<float>(acc[j] / z);
  }
  return out;
}

double Rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> RandomQ(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(kQHeads * kDim);
  for (float& x : q) x = 2.f * nd(rng);
  return q;
}

void ExpectGpuCacheEmpty(const Harness& h) {
  const BackendStats s = h.engine->Stats().backend;
  EXPECT_EQ(s.segments_resident, 0);
  EXPECT_EQ(s.pool_used_bytes, 0);
}

class EngineGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu::CudaBackend::DeviceAvailable() && !TeeOnCpu())
      GTEST_SKIP() << "skipped: no CUDA device";
    seed_ = Seed();
  }
  uint64_t seed_ = 0;
};

// Prefill, the explicit Seal, then decode steps (one token per layer, segments sealing every
// 128 tokens in the background) on several contexts from several threads, with budgets cycling
// through 0, default and 100%.
TEST_F(EngineGpuTest, PrefillAndDecodeOfSeveralContextsMatchCpu) {
  Harness h = Make(TestSettings());
  ASSERT_NE(h.engine, nullptr);
  constexpr int kThreads = 3;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  std::vector<double> full_err(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed_ + t);
      auto open = h.engine->Open({kShape, {}, ""});
      if (!open.ok()) {
        ++failures;
        return;
      }
      const ContextId id = open->id;
      Append(*h.engine, id, rng, 700 + 400 * t);  // prefill
      if (!h.engine->Seal(id).ok()) ++failures;
      const AttendBudget budgets[3] = {{0, 0}, {}, {1.0, 0}};
      for (int step = 0; step < 260; ++step) {
        Append(*h.engine, id, rng, 1);
        for (int l = 0; l < kLayers; ++l) {
          const std::vector<float> q = RandomQ(rng);
          std::vector<float> out(q.size()), lse(kQHeads);
          const AttendBudget b = budgets[step % 3];
          if (!h.engine->Attend(id, l, q, b, out, lse, nullptr).ok()) ++failures;
          if (step % 99 == 2 && l == 0)  // a 100% step: exact attention
            full_err[t] = std::max(full_err[t], Rel(out, Full64(*h.engine, id, l, q)));
        }
      }
      if (!h.engine->Close(id).ok()) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LT(h.tee->worst(), 2e-3);
  EXPECT_LT(h.tee->worst_lse(), 1e-4);
  EXPECT_EQ(h.tee->stat_mismatches(), 0);
  EXPECT_GT(h.tee->calls_with_retrieval(), 0);
  for (double e : full_err) EXPECT_LT(e, 2e-3);
  std::printf("calls %ld, worst GPU-vs-CPU %.2e, hits %ld misses %ld\n", long(h.tee->calls()),
              h.tee->worst(), long(h.engine->Stats().backend.hits),
              long(h.engine->Stats().backend.misses));
  if (!TeeOnCpu()) EXPECT_GT(h.engine->Stats().backend.hits, 0);
  // The background seals clustered on the GPU.
  const BackendStats bs = h.engine->Stats().backend;
  std::printf("k-means: %ld segments on the GPU, %ld on the CPU\n", long(bs.kmeans_gpu),
              long(bs.kmeans_cpu));
  if (!TeeOnCpu()) {
    EXPECT_GT(bs.kmeans_gpu, 0);
    EXPECT_EQ(bs.kmeans_cpu, 0);
  }
  ExpectGpuCacheEmpty(h);
}

// AttendBatch through the engine: one GPU pipeline a layer for contexts of different lengths
// (the shortest without a sealed segment at first), each item with its own budget (0 / default /
// 100%, the 100% ones also against float64 full attention), decode appends between steps sealing
// in the background; the GPU cache back to its baseline after.
TEST_F(EngineGpuTest, AttendBatchOfDifferentLengthsMatchesCpu) {
  Harness h = Make(TestSettings());
  ASSERT_NE(h.engine, nullptr);
  std::mt19937_64 rng(seed_);
  constexpr int kB = 4;
  const int64_t lengths[kB] = {100, 700, 1500, 2600};
  std::vector<ContextId> ids;
  for (int i = 0; i < kB; ++i) {
    auto open = h.engine->Open({kShape, {}, ""});
    ASSERT_TRUE(open.ok()) << open.status();
    ids.push_back(open->id);
    Append(*h.engine, open->id, rng, lengths[i]);
    if (i > 0) ASSERT_TRUE(h.engine->Seal(open->id).ok());
  }
  const AttendBudget budgets[3] = {{0, 0}, {}, {1.0, 0}};
  const size_t qd = size_t{kQHeads} * kDim;
  double full_err = 0;
  int full_checked = 0;
  for (int step = 0; step < 150; ++step) {
    for (ContextId id : ids) Append(*h.engine, id, rng, 1);
    for (int l = 0; l < kLayers; ++l) {
      std::vector<AttendBatchItem> items(kB);
      std::vector<float> q, out(kB * qd, std::nanf("")), lse(kB * kQHeads, std::nanf(""));
      std::vector<AttendStats> stats(kB);
      for (int i = 0; i < kB; ++i) {
        items[i].context = ids[i];
        items[i].budget = budgets[(step + i) % 3];
        const std::vector<float> qi = RandomQ(rng);
        q.insert(q.end(), qi.begin(), qi.end());
      }
      const absl::Status st = h.engine->AttendBatch(l, items, q, out, lse, stats);
      ASSERT_TRUE(st.ok()) << st;
      if (step % 37 != 5) continue;
      for (int i = 0; i < kB; ++i) {
        if (items[i].budget.retrieval != 1.0) continue;
        const std::vector<float> qi(q.begin() + i * qd, q.begin() + (i + 1) * qd);
        const std::vector<float> oi(out.begin() + i * qd, out.begin() + (i + 1) * qd);
        full_err = std::max(full_err, Rel(oi, Full64(*h.engine, ids[i], l, qi)));
        ++full_checked;
      }
    }
  }
  EXPECT_GT(full_checked, 0);
  EXPECT_LT(full_err, 2e-3);
  EXPECT_LT(h.tee->worst(), 2e-3);
  EXPECT_LT(h.tee->worst_lse(), 1e-4);
  EXPECT_EQ(h.tee->stat_mismatches(), 0);
  EXPECT_GT(h.tee->calls_with_retrieval(), 0);
  std::printf("batched calls %ld, worst GPU-vs-CPU %.2e, 100%% vs float64 %.2e\n",
              long(h.tee->calls()), h.tee->worst(), full_err);
  for (ContextId id : ids) ASSERT_TRUE(h.engine->Close(id).ok());
  ExpectGpuCacheEmpty(h);
}

// The CUDA backend's ClusterKeys (the GPU k-means of background seals): a valid clustering
// (sizes and centroids are those of its own assignment) as good as the CPU kernel's; bad input
// gets the CPU kernel's error.
TEST_F(EngineGpuTest, ClusterKeysOnTheGpuMatchesTheCpuKernel) {
  config::Settings s = TestSettings();
  auto backend = TeeOnCpu() ? CreateCpuBackend(s) : CreateCudaAttentionBackend(s, nullptr);
  ASSERT_TRUE(backend.ok()) << backend.status();
  std::mt19937_64 rng(seed_);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const int64_t n : {int64_t{8192}, int64_t{1024}, int64_t{37}}) {
    std::vector<float> centres(64 * kDim), keys(n * kDim);
    for (float& x : centres) x = nd(rng);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = static_cast<int64_t>(rng() % 64);
      for (int j = 0; j < kDim; ++j)
        keys[i * kDim + j] = centres[c * kDim + j] + 0.4f * nd(rng) + 1.f;
    }
    const index::WaveIndexOptions o;
    auto gpu = (*backend)->ClusterKeys(keys.data(), n, kDim, o);
    auto cpu = index::ClusterKeys(keys.data(), n, kDim, o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    ASSERT_EQ(gpu->num_clusters, cpu->num_clusters);
    const int64_t k = gpu->num_clusters;
    ASSERT_EQ(static_cast<int64_t>(gpu->assignment.size()), n);
    std::vector<int64_t> count(k, 0);
    std::vector<double> sum(k * kDim, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = gpu->assignment[i];
      ASSERT_GE(c, 0);
      ASSERT_LT(c, k);
      ++count[c];
      for (int j = 0; j < kDim; ++j) sum[c * kDim + j] += keys[i * kDim + j];
    }
    double err = 0, norm = 0;
    for (int64_t c = 0; c < k; ++c) {
      EXPECT_EQ(gpu->sizes[c], count[c]);
      for (int j = 0; j < kDim; ++j) {
        const double want = count[c] > 0 ? sum[c * kDim + j] / count[c] : 0.0;
        err += std::pow(gpu->centroids[c * kDim + j] - want, 2);
        norm += want * want;
      }
    }
    EXPECT_LT(std::sqrt(err / norm), 1e-5) << "n " << n;
    // Quality: the mean squared distance of a key to its centroid, within 10% of the CPU's.
    auto spread = [&](const index::WaveClusters& w) {
      double d2 = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int j = 0; j < kDim; ++j)
          d2 += std::pow(keys[i * kDim + j] - w.centroids[w.assignment[i] * kDim + j], 2);
      return d2 / n;
    };
    const double g = spread(*gpu), c = spread(*cpu);
    std::printf("n %ld: spread GPU %.4f CPU %.4f\n", long(n), g, c);
    EXPECT_LT(g, 1.10 * c) << "n " << n;
  }
  std::vector<float> bad(16 * kDim, 1.f);
  bad[5] = std::nanf("");
  EXPECT_EQ((*backend)->ClusterKeys(bad.data(), 16, kDim, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  index::WaveIndexOptions zero;
  zero.tokens_per_cluster = 0;
  EXPECT_EQ((*backend)->ClusterKeys(bad.data() + kDim, 8, kDim, zero).status().code(),
            absl::StatusCode::kInvalidArgument);
  if (!TeeOnCpu()) {
    EXPECT_EQ((*backend)->Stats().kmeans_gpu, 3);
    EXPECT_EQ((*backend)->Stats().kmeans_cpu, 2);
  }
}

std::vector<int32_t> Tokens(std::mt19937_64& rng, int64_t n) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 30000);
  return t;
}

// Contexts attaching a shared prefix (the same segments, cached once on the GPU), eviction of
// the persisted blocks at the memory limit, and after a restart their reload from RocksDB.
TEST_F(EngineGpuTest, SharedPrefixesEvictionAndReloadMatchCpu) {
  const std::string dir = ::testing::TempDir() + "/kvwave_engine_gpu_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  // Room for one document and two short suffixes, not for two documents (~5 MB each).
  // One document holds ~5.9 MB, with two attached suffixes ~7.1 MB: a second document evicts.
  Harness h = Make(TestSettings(dir, int64_t{9} << 20));
  ASSERT_NE(h.engine, nullptr);
  std::mt19937_64 rng(seed_);
  const std::vector<int32_t> doc = Tokens(rng, 4 * 512 + 40);
  auto attend_all = [&](ContextId id) {
    for (int l = 0; l < kLayers; ++l)
      for (const AttendBudget& b :
           {AttendBudget{}, AttendBudget{1.0, 0}, AttendBudget{0.05, 0.5}}) {
        const std::vector<float> q = RandomQ(rng);
        std::vector<float> out(q.size()), lse(kQHeads);
        ASSERT_TRUE(h.engine->Attend(id, l, q, b, out, lse, nullptr).ok());
      }
  };
  // A writes the document's blocks; B and C attach them and diverge.
  auto a = h.engine->Open({kShape, doc, ""});
  ASSERT_TRUE(a.ok()) << a.status();
  Append(*h.engine, a->id, rng, static_cast<int64_t>(doc.size()));
  attend_all(a->id);
  std::vector<ContextId> attached;
  for (int i = 0; i < 2; ++i) {
    std::vector<int32_t> mine = doc;
    mine.resize(3 * 512);
    const std::vector<int32_t> tail = Tokens(rng, 300);
    mine.insert(mine.end(), tail.begin(), tail.end());
    auto r = h.engine->Open({kShape, mine, ""});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->matched_tokens, 3 * 512);
    Append(*h.engine, r->id, rng, static_cast<int64_t>(mine.size()) - r->matched_tokens);
    attend_all(r->id);
    attached.push_back(r->id);
  }
  if (!TeeOnCpu()) EXPECT_GT(h.engine->Stats().backend.segments_resident, 0);
  for (ContextId id : attached) ASSERT_TRUE(h.engine->Close(id).ok());
  ASSERT_TRUE(h.engine->Close(a->id).ok());
  ASSERT_TRUE(h.engine->Flush().ok());
  ExpectGpuCacheEmpty(h);
  // Another document pushes the first out of memory; reopening the first reloads it.
  const std::vector<int32_t> other = Tokens(rng, 4 * 512 + 40);
  auto c = h.engine->Open({kShape, other, ""});
  ASSERT_TRUE(c.ok());
  Append(*h.engine, c->id, rng, static_cast<int64_t>(other.size()));
  attend_all(c->id);
  ASSERT_TRUE(h.engine->Close(c->id).ok());
  EXPECT_GT(h.engine->Stats().prefix_evictions, 0);
  EXPECT_LT(h.tee->worst(), 2e-3);
  EXPECT_LT(h.tee->worst_lse(), 1e-4);
  EXPECT_EQ(h.tee->stat_mismatches(), 0);
  ExpectGpuCacheEmpty(h);
  // A restart: the document's blocks come back from RocksDB (new segments for the GPU).
  h.engine.reset();
  h = Make(TestSettings(dir, int64_t{64} << 20));
  ASSERT_NE(h.engine, nullptr);
  auto again = h.engine->Open({kShape, doc, ""});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->matched_tokens, 4 * 512);
  Append(*h.engine, again->id, rng, static_cast<int64_t>(doc.size()) - again->matched_tokens);
  attend_all(again->id);
  const EngineStats st = h.engine->Stats();
  std::printf("reloads %ld matched %ld\n", long(st.prefix_reloads), long(again->matched_tokens));
  EXPECT_GT(st.prefix_reloads, 0);
  if (!TeeOnCpu()) EXPECT_GT(st.backend.segments_resident, 0);
  ASSERT_TRUE(h.engine->Close(again->id).ok());
  EXPECT_LT(h.tee->worst(), 2e-3);
  EXPECT_LT(h.tee->worst_lse(), 1e-4);
  EXPECT_EQ(h.tee->stat_mismatches(), 0);
  ExpectGpuCacheEmpty(h);
  h.engine.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvwave::engine
