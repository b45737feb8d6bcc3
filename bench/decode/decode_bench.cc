// kvwave-decode-bench: one decode step (every layer) of the engine's Attend with the CUDA backend
// against the bare wave buffer and full attention, Llama-3-8B's shape by default (32 layers,
// 32 query / 8 KV heads, d 128, bf16), batch 1 or more.
//
//   engine   the CUDA AttentionBackend's Attend (what Engine::Attend / AttendBatch call, with the
//            layer's host state synced at each call): host q in, host out/lse back, one call per
//            layer carrying the batch's contexts;
//   wave     the bare wave buffer: WaveBuffer::AttendLayer with q/out/lse on the device, each
//            layer waited for before the next (a model's decode order); wave-pipelined: the
//            step's layers queued back to back, one wait at the end (queries known up front);
//   full-hbm full attention (the backend's exact-attention kernel) with every layer's KV in HBM;
//   full-pcie the same kernel reading the KV straight from pinned host memory (zero-copy).
// Contexts: synthetic, built as sealed 8K-token segments with oracle clusters (16 tokens mean)
// plus a 64-token tail (buffer/synthetic_kv.h); every step appends one token to each layer
// before attending (the engine's decode order), which the next Attend uploads. Queries: an AR(1)
// walk per (layer, head) (rho = --rho) so consecutive steps overlap as decode queries do. Where
// all layers of the batch pass --host-gib, a subset of layers is built and timed, and the step
// time scaled by 32 / subset (printed). Full attention: one layer timed, x layers.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "buffer/pinned_allocator.h"
#include "buffer/synthetic_kv.h"
#include "buffer/wave_buffer.h"
#include "config/settings.h"
#include "engine/attention_backend.h"
#include "engine/cuda/cuda_attention_backend.h"
#include "gpu/cuda_backend.h"

namespace kvwave {
namespace {

using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    absl::Status s_ = (expr);                                                        \
    if (!s_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

struct Options {
  std::vector<int64_t> contexts = {32768, 131072, 524288, 1048576};
  int layers = 32, kv_heads = 8, g = 4, d = 128, batch = 1;
  double host_gib = 48, cache = 0.05, retrieval = 0.018, estimation = 0.232, rho = 0.9;
  int steps = 10, warmup = 5, pps = 16;
  bool full = true;
};

// Full attention over every row of layer 0 of the contexts (steady pages + cluster pages), the
// K/V read at kbase (device copy) or from the pinned host rows. Returns median ms per layer.
double TimeFull(gpu::CudaBackend& b,
                const std::vector<std::unique_ptr<buffer::SyntheticContext>>& ctxs, int g, bool hbm,
                const float* q, float* out, float* lse) {
  std::vector<gpu::PageRef> pages;
  std::vector<int32_t> off = {0};
  std::vector<gpu::DeviceBuffer> copies;
  const size_t row = 2 * ctxs[0]->shape().d;
  int64_t max_pages = 0;
  for (const auto& c : ctxs) {
    for (const store::HeadKv& head : c->layer(0)) {
      for (const auto& seg : head.segments) {
        const std::byte* k = seg->key_row(0);
        const std::byte* v = seg->value_row(0);
        if (hbm) {
          auto dk = b.Allocate(row * seg->num_rows()), dv = b.Allocate(row * seg->num_rows());
          CHECK_OK(dk.status());
          CHECK_OK(dv.status());
          CHECK_OK(b.Copy(dk->data(), k, row * seg->num_rows()));
          CHECK_OK(b.Copy(dv->data(), v, row * seg->num_rows()));
          k = dk->as<std::byte>();
          v = dv->as<std::byte>();
          copies.push_back(std::move(*dk));
          copies.push_back(std::move(*dv));
        }
        for (int64_t r = 0; r < seg->num_rows(); r += 8)
          pages.push_back({k + r * row, v + r * row,
                           static_cast<int32_t>(std::min<int64_t>(8, seg->num_rows() - r)), 0});
      }
      off.push_back(static_cast<int32_t>(pages.size()));
      max_pages = std::max<int64_t>(max_pages, off.back() - off[off.size() - 2]);
    }
  }
  const int heads = static_cast<int>(off.size()) - 1;
  auto pd = b.Allocate(sizeof(gpu::PageRef) * pages.size());
  auto od = b.Allocate(sizeof(int32_t) * off.size());
  CHECK_OK(pd.status());
  CHECK_OK(od.status());
  CHECK_OK(b.Copy(pd->data(), pages.data(), sizeof(gpu::PageRef) * pages.size()));
  CHECK_OK(b.Copy(od->data(), off.data(), sizeof(int32_t) * off.size()));
  CHECK_OK(b.Synchronize());
  std::vector<double> times;
  for (int rep = 0; rep < 6; ++rep) {
    gpu::ExactArgs a;
    a.q = q;
    a.heads = heads;
    a.g = g;
    a.d = ctxs[0]->shape().d;
    a.scale = 1.0f / std::sqrt(float(a.d));
    a.kv_type = DType::kBF16;
    a.pages = pd->as<gpu::PageRef>();
    a.page_offsets = od->as<int32_t>();
    a.max_pages_per_head = max_pages;
    a.out = out;
    a.lse = lse;
    CHECK_OK(b.RecordEvent(0, 0));
    CHECK_OK(b.ExactAttention(a));
    CHECK_OK(b.RecordEvent(1, 0));
    CHECK_OK(b.Synchronize());
    auto ms = b.ElapsedMs(0, 1);
    CHECK_OK(ms.status());
    if (rep > 0) times.push_back(*ms);
  }
  return Median(times);
}

void Run(const Options& o, int64_t context) {
  const int B = o.batch, H = o.kv_heads, G = o.g, D = o.d;
  const double layer_bytes = double(context) * H * D * 2 * 2 * B;
  const int sub = std::clamp<int>(int(o.host_gib * double(1 << 30) / layer_bytes), 1, o.layers);
  const double scale = double(o.layers) / sub;
  auto t0 = Clock::now();
  std::vector<std::unique_ptr<buffer::SyntheticContext>> ctxs;
  for (int b = 0; b < B; ++b) {
    buffer::SyntheticShape s;
    s.layers = sub;
    s.heads = H;
    s.d = D;
    s.q_heads = H * G;
    s.tokens = context;
    s.tail_tokens = 64;
    s.vary_sizes = false;
    s.seed = 1234 + context + 17 * b;
    s.id = 100 + b;
    auto c = buffer::SyntheticContext::Create(s, buffer::PinnedAllocator());
    CHECK_OK(c.status());
    ctxs.push_back(std::move(*c));
  }
  std::fprintf(stderr, "context %ld batch %d: %d of %d layers built (%.1f GiB pinned) in %.1f s\n",
               long(context), B, sub, o.layers, layer_bytes * sub / double(1 << 30),
               Ms(t0, Clock::now()) / 1e3);
  const int steps = o.warmup + o.steps;
  const int64_t per_item = int64_t{H} * G * D;
  // Queries: AR(1) per (context, layer, KV head), the group's heads around it.
  std::mt19937 rng(77 + context);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> walk(int64_t{B} * sub * H * D);
  for (auto& x : walk) x = nd(rng);
  const float a = float(o.rho), noise = std::sqrt(1.f - a * a);
  auto queries = [&](int64_t b, int l, std::vector<float>& q) {
    q.resize(per_item);
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < G; ++j)
        for (int e = 0; e < D; ++e)
          q[(h * G + j) * D + e] = 2.5f * (walk[((b * sub + l) * H + h) * D + e] + 0.3f * nd(rng));
  };
  auto advance = [&] {
    for (auto& x : walk) x = a * x + noise * nd(rng);
  };
  const int64_t total_bytes = static_cast<int64_t>(layer_bytes * sub);

  // (a) the engine's CUDA backend.
  config::Settings settings;
  settings.gpu_cache_bytes = static_cast<int64_t>(o.cache * total_bytes);
  auto backend = engine::CreateCudaAttentionBackend(settings, nullptr);
  CHECK_OK(backend.status());
  std::vector<double> engine_ms;
  std::vector<std::vector<float>> q(B), out(B), lse(B);
  for (int b = 0; b < B; ++b) out[b].resize(per_item), lse[b].resize(H * G);
  std::vector<engine::AttendStats> stats(B);
  for (int s = 0; s < steps; ++s) {
    advance();
    for (int l = 0; l < sub; ++l)
      for (int b = 0; b < B; ++b) CHECK_OK(ctxs[b]->AppendToken(l, 99 + s * 1000 + l));
    double ms = 0;
    for (int l = 0; l < sub; ++l) {
      std::vector<engine::AttendItem> items(B);
      for (int b = 0; b < B; ++b) {
        queries(b, l, q[b]);
        items[b].context = &ctxs[b]->context();
        items[b].layer = l;
        items[b].budget = engine::AttendBudget{o.retrieval, o.estimation};
        items[b].q = q[b];
        items[b].out = out[b];
        items[b].lse = lse[b];
        items[b].stats = &stats[b];
      }
      const auto t1 = Clock::now();
      CHECK_OK((*backend)->Attend(items));
      ms += Ms(t1, Clock::now());
    }
    if (s >= o.warmup) engine_ms.push_back(ms * scale);
  }
  const engine::BackendStats es = (*backend)->Stats();
  for (auto& c : ctxs) (*backend)->OnClose(c->context());
  backend->reset();

  // The bare wave buffer on the same contexts (device q/out/lse, layers queued back to back).
  buffer::WaveBufferOptions w;
  w.heads = H;
  w.g = G;
  w.d = D;
  w.cache_bytes = settings.gpu_cache_bytes;
  w.exact_pages_per_split = o.pps;
  w.bf16_scores = false;  // as the engine's backend
  auto wb = buffer::WaveBuffer::Create(w);
  CHECK_OK(wb.status());
  gpu::CudaBackend& gb = *(*wb)->backend();
  std::vector<buffer::WaveBuffer::SpaceId> spaces;
  for (int i = 0; i < B * sub; ++i) spaces.push_back(*(*wb)->OpenSpace());
  auto qd = gb.Allocate(sizeof(float) * per_item * B * sub);
  auto od = gb.Allocate(sizeof(float) * per_item * B * sub);
  auto ld = gb.Allocate(sizeof(float) * H * G * B * sub);
  CHECK_OK(qd.status());
  CHECK_OK(od.status());
  CHECK_OK(ld.status());
  // Two timings of the bare buffer per step: layer by layer, each waited for before the next is
  // queued (what a model's decode can do: layer l+1's query needs layer l's output), and all
  // layers queued back to back with one wait (queries known in advance: a lower bound).
  std::vector<double> wave_ms, piped_ms;
  std::vector<float> qs(per_item * B * sub);
  buffer::WaveCounters at_warm;
  for (int s = 0; s < 2 * steps; ++s) {
    const bool piped = s >= steps;
    advance();
    for (int l = 0; l < sub; ++l)
      for (int b = 0; b < B; ++b) {
        CHECK_OK(ctxs[b]->AppendToken(l, 7 + s * 1000 + l));
        queries(b, l, q[b]);
        std::copy(q[b].begin(), q[b].end(), qs.begin() + (int64_t{l} * B + b) * per_item);
      }
    CHECK_OK(gb.Copy(qd->data(), qs.data(), sizeof(float) * qs.size()));
    CHECK_OK(gb.Synchronize());
    CHECK_OK((*wb)->WaitForCalls());
    if (s == o.warmup) {
      CHECK_OK((*wb)->Finish());
      at_warm = (*wb)->counters();
    }
    const auto t1 = Clock::now();
    for (int l = 0; l < sub; ++l) {
      for (int b = 0; b < B; ++b) {
        const int64_t i = int64_t{l} * B + b;
        CHECK_OK((*wb)->AttendLayer(spaces[i], ctxs[b]->layer(l), qd->as<float>() + i * per_item,
                                    od->as<float>() + i * per_item, ld->as<float>() + i * H * G,
                                    {o.retrieval, o.estimation}));
      }
      if (!piped) CHECK_OK((*wb)->WaitForCalls());
    }
    CHECK_OK((*wb)->WaitForCalls());
    const double ms = Ms(t1, Clock::now()) * scale;
    if (!piped && s >= o.warmup) wave_ms.push_back(ms);
    if (piped && s >= steps + o.warmup) piped_ms.push_back(ms);
    if (s == steps - 1) CHECK_OK((*wb)->Finish());
  }
  CHECK_OK((*wb)->Finish());
  const buffer::WaveCounters wc = (*wb)->counters();
  const double hit =
      double(wc.hit_pages - at_warm.hit_pages) /
      std::max<int64_t>(1, wc.hit_pages + wc.miss_pages - at_warm.hit_pages - at_warm.miss_pages);
  // Counted from the first timed step of the layer-by-layer phase to the end of the pipelined one.
  const double pcie_mb =
      (wc.pcie_bytes - at_warm.pcie_bytes) / double(2 * o.steps + o.warmup) * scale / 1e6;

  double full_hbm = -1, full_pcie = -1;
  if (o.full) {
    full_pcie =
        TimeFull(gb, ctxs, G, false, qd->as<float>(), od->as<float>(), ld->as<float>()) * o.layers;
    const double free_need = layer_bytes * 1.1;
    if (free_need < 60.0 * (1 << 30))
      full_hbm =
          TimeFull(gb, ctxs, G, true, qd->as<float>(), od->as<float>(), ld->as<float>()) * o.layers;
  }
  for (auto sp : spaces) CHECK_OK((*wb)->CloseSpace(sp));
  const double e = Median(engine_ms), wv = Median(wave_ms), wp = Median(piped_ms);
  std::printf(
      "%8ld %5d %3d/%-3d  engine %8.3f ms  wave %8.3f ms  engine/wave %.3f  wave-pipelined %8.3f "
      "ms  engine/pipelined %.3f  full-hbm %8.3f ms  full-pcie %9.3f ms  pcie/engine %6.1fx  hit "
      "%.3f  PCIe %.1f MB/step  pool %.2f GiB  hits %ld misses %ld\n",
      long(context), B, sub, o.layers, e, wv, e / wv, wp, e / wp, full_hbm, full_pcie,
      full_pcie > 0 ? full_pcie / e : 0, hit, pcie_mb, es.pool_bytes / double(1 << 30),
      long(es.hits), long(es.misses));
  std::fflush(stdout);
}

}  // namespace
}  // namespace kvwave

int main(int argc, char** argv) {
  kvwave::Options o;
  CLI::App app("kvwave-decode-bench: engine (CUDA backend) vs bare wave buffer vs full attention");
  app.add_option("--contexts", o.contexts, "context lengths")->delimiter(',');
  app.add_option("--batch", o.batch, "sequences per step");
  app.add_option("--layers", o.layers);
  app.add_option("--host-gib", o.host_gib, "pinned KV built per run (sets the layer subset)");
  app.add_option("--cache", o.cache, "page pool as a fraction of the built KV");
  app.add_option("--retrieval", o.retrieval);
  app.add_option("--estimation", o.estimation);
  app.add_option("--steps", o.steps);
  app.add_option("--warmup", o.warmup);
  app.add_option("--rho", o.rho);
  app.add_option("--full", o.full, "also time full attention (HBM and pinned host)");
  CLI11_PARSE(app, argc, argv);
  if (!kvwave::gpu::CudaBackend::DeviceAvailable()) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  std::printf("# context batch layers-timed  per decode step (all %d layers)\n", o.layers);
  for (int64_t c : o.contexts) kvwave::Run(o, c);
  return 0;
}
