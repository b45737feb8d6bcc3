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
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/decode/bench_util.h"
#include "buffer/pinned_allocator.h"
#include "buffer/synthetic_kv.h"
#include "buffer/wave_buffer.h"
#include "config/settings.h"
#include "engine/attention_backend.h"
#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_attention_backend.h"
#include "engine/engine.h"
#include "gpu/cuda_backend.h"
#include "store/host_memory.h"

namespace kvwave {
namespace {

using bench_decode::Clock;
using bench_decode::Median;
using bench_decode::Ms;

struct Options {
  std::vector<int64_t> contexts = {32768, 131072, 524288, 1048576};
  int layers = 32, kv_heads = 8, g = 4, d = 128, batch = 1;
  double host_gib = 48, cache = 0.05, retrieval = 0.018, estimation = 0.232, rho = 0.9;
  int steps = 30, warmup = 10, pps = 16, slots = 8;
  bool full = true;
  bool engine_only = false;  // time only the engine (e.g. under a profiler); wave columns -1
  bool bf16 = true;          // the bare buffers score bf16 centroid copies (as the engine does)
  // Trace replay (--trace): the shared model's dump (PREFIX_{q,k,v}.npy, float16).
  std::string trace;
  int decode = 1024, trace_warmup = 64;
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

// Per-call host timings of one path between two snapshots (microseconds per call).
struct HostTimes {
  double enqueue = 0, slot_wait = 0, result_wait = 0, commit = 0;
  double lock = 0, sync = 0, launch = 0;  // parts of enqueue (bare buffer)
  double commit_gpu = 0, commit_order = 0, commit_policy = 0, commit_queue = 0;  // parts of commit
};

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
  // Queries: AR(1) per (context, layer, KV head), the group's heads around it; one set per step,
  // the same for the three paths.
  std::mt19937 rng(77 + context);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> walk(int64_t{B} * sub * H * D);
  for (auto& x : walk) x = nd(rng);
  const float a = float(o.rho), noise = std::sqrt(1.f - a * a);
  std::vector<float> qs(per_item * B * sub);  // [layer][b][q heads x d]
  auto make_queries = [&] {
    for (auto& x : walk) x = a * x + noise * nd(rng);
    for (int l = 0; l < sub; ++l)
      for (int b = 0; b < B; ++b) {
        float* q = qs.data() + (int64_t{l} * B + b) * per_item;
        for (int h = 0; h < H; ++h)
          for (int j = 0; j < G; ++j)
            for (int e = 0; e < D; ++e)
              q[(h * G + j) * D + e] =
                  2.5f * (walk[((int64_t{b} * sub + l) * H + h) * D + e] + 0.3f * nd(rng));
      }
  };
  const int64_t total_bytes = static_cast<int64_t>(layer_bytes * sub);

  // (a) the engine's CUDA backend; the bare wave buffer twice (layer by layer, and pipelined),
  // each with its own pool of the same size. Every step runs the three on the same queries and
  // the same contexts, in an order that rotates (none always first after the appends).
  config::Settings settings;
  settings.gpu_cache_bytes = static_cast<int64_t>(o.cache * total_bytes);
  auto backend = engine::CreateCudaAttentionBackend(settings, nullptr);
  CHECK_OK(backend.status());
  buffer::WaveBufferOptions w;
  w.heads = H;
  w.g = G;
  w.d = D;
  w.cache_bytes = settings.gpu_cache_bytes;
  w.exact_pages_per_split = o.pps;
  w.slots = o.slots;
  w.bf16_scores = o.bf16;  // true: as the engine's backend
  std::unique_ptr<buffer::WaveBuffer> wbs[2];
  std::vector<buffer::WaveBuffer::SpaceId> spaces[2];
  for (int i = 0; i < 2; ++i) {
    auto wb = buffer::WaveBuffer::Create(w);
    CHECK_OK(wb.status());
    wbs[i] = std::move(*wb);
    for (int j = 0; j < B * sub; ++j) spaces[i].push_back(*wbs[i]->OpenSpace());
  }
  gpu::CudaBackend& gb = *wbs[0]->backend();
  auto qd = gb.Allocate(sizeof(float) * per_item * B * sub);
  auto od = gb.Allocate(sizeof(float) * per_item * B * sub);
  auto ld = gb.Allocate(sizeof(float) * H * G * B * sub);
  CHECK_OK(qd.status());
  CHECK_OK(od.status());
  CHECK_OK(ld.status());

  std::vector<std::vector<float>> out(B), lse(B);
  for (int b = 0; b < B; ++b) out[b].resize(per_item), lse[b].resize(H * G);
  std::vector<engine::AttendStats> stats(B);
  auto engine_step = [&] {
    double ms = 0;
    for (int l = 0; l < sub; ++l) {
      std::vector<engine::AttendItem> items(B);
      for (int b = 0; b < B; ++b) {
        items[b].context = &ctxs[b]->context();
        items[b].layer = l;
        items[b].budget = engine::AttendBudget{o.retrieval, o.estimation};
        items[b].q = std::span<const float>(qs.data() + (int64_t{l} * B + b) * per_item, per_item);
        items[b].out = out[b];
        items[b].lse = lse[b];
        items[b].stats = &stats[b];
      }
      const auto t1 = Clock::now();
      CHECK_OK((*backend)->Attend(items));
      ms += Ms(t1, Clock::now());
    }
    return ms * scale;
  };
  // The bare buffer: layer by layer, each waited for before the next is queued (what a model's
  // decode can do: layer l+1's query needs layer l's output), or all layers queued back to back
  // with one wait (queries known in advance: a lower bound).
  auto wave_step = [&](int i, bool piped) {
    buffer::WaveBuffer& wb = *wbs[i];
    CHECK_OK(gb.Copy(qd->data(), qs.data(), sizeof(float) * qs.size()));
    CHECK_OK(gb.Synchronize());
    CHECK_OK(wb.WaitForCalls());
    const auto t1 = Clock::now();
    for (int l = 0; l < sub; ++l) {
      for (int b = 0; b < B; ++b) {
        const int64_t j = int64_t{l} * B + b;
        CHECK_OK(wb.AttendLayer(spaces[i][j], ctxs[b]->layer(l), qd->as<float>() + j * per_item,
                                od->as<float>() + j * per_item, ld->as<float>() + j * H * G,
                                {o.retrieval, o.estimation}));
      }
      if (!piped) CHECK_OK(wb.WaitForCalls());
    }
    CHECK_OK(wb.WaitForCalls());
    return Ms(t1, Clock::now()) * scale;
  };
  std::vector<double> engine_ms, wave_ms, piped_ms, step_ratio;
  engine::BackendStats es0;
  buffer::WaveCounters wc0[2];
  for (int s = 0; s < steps; ++s) {
    for (int l = 0; l < sub; ++l)
      for (int b = 0; b < B; ++b) CHECK_OK(ctxs[b]->AppendToken(l, 99 + s * 1000 + l));
    make_queries();
    if (s == o.warmup) {
      for (auto& wb : wbs) CHECK_OK(wb->Finish());
      es0 = (*backend)->Stats();
      for (int i = 0; i < 2; ++i) wc0[i] = wbs[i]->counters();
    }
    double t[3];
    for (int k = 0; k < 3; ++k) {
      const int which = (s + k) % 3;
      if (which != 0 && o.engine_only) {
        t[which] = -1;
        continue;
      }
      t[which] = which == 0 ? engine_step() : wave_step(which - 1, which == 2);
    }
    if (s >= o.warmup) {
      engine_ms.push_back(t[0]);
      wave_ms.push_back(t[1]);
      piped_ms.push_back(t[2]);
      step_ratio.push_back(t[0] / t[1]);
    }
  }
  for (auto& wb : wbs) CHECK_OK(wb->Finish());
  const engine::BackendStats es = (*backend)->Stats();
  buffer::WaveCounters wc[2];
  for (int i = 0; i < 2; ++i) wc[i] = wbs[i]->counters();
  auto ratio = [](int64_t hit, int64_t miss) {
    return double(hit) / std::max<int64_t>(1, hit + miss);
  };
  const double engine_hit = ratio(es.hit_pages - es0.hit_pages, es.miss_pages - es0.miss_pages);
  const double wave_hit =
      ratio(wc[0].hit_pages - wc0[0].hit_pages, wc[0].miss_pages - wc0[0].miss_pages);
  const double piped_hit =
      ratio(wc[1].hit_pages - wc0[1].hit_pages, wc[1].miss_pages - wc0[1].miss_pages);
  // PCIe: the engine's misses (K and V rows read from host) per timed step, all layers.
  const double pcie_mb = double(es.pcie_bytes - es0.pcie_bytes) / o.steps * scale / 1e6;
  const double engine_calls = std::max<int64_t>(1, es.calls - es0.calls);
  const double wave_calls = std::max<int64_t>(1, wc[0].calls - wc0[0].calls);
  const HostTimes eh{.enqueue = (es.enqueue_us - es0.enqueue_us) / engine_calls,
                     .slot_wait = (es.slot_wait_us - es0.slot_wait_us) / engine_calls,
                     .result_wait = (es.result_wait_us - es0.result_wait_us) / engine_calls,
                     .commit = (es.commit_us - es0.commit_us) / engine_calls,
                     .commit_gpu = (es.commit_gpu_us - es0.commit_gpu_us) / engine_calls,
                     .commit_order = (es.commit_order_us - es0.commit_order_us) / engine_calls,
                     .commit_policy = (es.commit_policy_us - es0.commit_policy_us) / engine_calls,
                     .commit_queue = (es.commit_queue_us - es0.commit_queue_us) / engine_calls};
  const HostTimes wh{
      .enqueue = (wc[0].enqueue_us - wc0[0].enqueue_us) / wave_calls,
      .slot_wait = (wc[0].wait_us - wc0[0].wait_us) / wave_calls,
      .commit = (wc[0].commit_us - wc0[0].commit_us) / wave_calls,
      .lock = (wc[0].lock_us - wc0[0].lock_us) / wave_calls,
      .sync = (wc[0].sync_us - wc0[0].sync_us) / wave_calls,
      .launch = (wc[0].launch_us - wc0[0].launch_us) / wave_calls,
      .commit_gpu = (wc[0].commit_gpu_us - wc0[0].commit_gpu_us) / wave_calls,
      .commit_order = (wc[0].commit_order_us - wc0[0].commit_order_us) / wave_calls,
      .commit_policy = (wc[0].commit_policy_us - wc0[0].commit_policy_us) / wave_calls,
      .commit_queue = (wc[0].commit_queue_us - wc0[0].commit_queue_us) / wave_calls};
  for (auto& c : ctxs) (*backend)->OnClose(c->context());
  backend->reset();
  for (auto sp : spaces[1]) CHECK_OK(wbs[1]->CloseSpace(sp));
  wbs[1].reset();

  double full_hbm = -1, full_pcie = -1;
  if (o.full) {
    full_pcie =
        TimeFull(gb, ctxs, G, false, qd->as<float>(), od->as<float>(), ld->as<float>()) * o.layers;
    const double free_need = layer_bytes * 1.1;
    if (free_need < 60.0 * (1 << 30))
      full_hbm =
          TimeFull(gb, ctxs, G, true, qd->as<float>(), od->as<float>(), ld->as<float>()) * o.layers;
  }
  for (auto sp : spaces[0]) CHECK_OK(wbs[0]->CloseSpace(sp));
  std::sort(engine_ms.begin(), engine_ms.end());
  std::sort(wave_ms.begin(), wave_ms.end());
  const double e = Median(engine_ms), wv = Median(wave_ms), wp = Median(piped_ms);
  // engine/wave step by step (same queries, same contexts, same step): its median too.
  std::printf(
      "%8ld %5d %3d/%-3d  engine %8.3f ms  wave %8.3f ms  engine/wave %.3f (per step %.3f)  "
      "wave-pipelined %8.3f ms  engine/pipelined %.3f  full-hbm %8.3f ms  full-pcie %9.3f ms  "
      "pcie/engine %6.1fx  "
      "page-hit engine %.3f wave %.3f pipelined %.3f  PCIe %.1f MB/step  pool %.2f GiB  "
      "engine min/max %.3f/%.3f wave min/max %.3f/%.3f  per call us: engine enqueue %.1f "
      "slot-wait %.1f result-wait %.1f commit %.1f (gpu %.1f order %.1f policy %.1f queue %.1f) | "
      "wave enqueue %.1f (locks %.1f sync %.1f launch %.1f) slot-wait %.1f commit %.1f (gpu %.1f "
      "order %.1f policy %.1f queue %.1f)\n",
      long(context), B, sub, o.layers, e, wv, e / wv, Median(step_ratio), wp, e / wp, full_hbm,
      full_pcie, full_pcie > 0 ? full_pcie / e : 0, engine_hit, wave_hit, piped_hit, pcie_mb,
      es.pool_bytes / double(1 << 30), engine_ms.front(), engine_ms.back(), wave_ms.front(),
      wave_ms.back(), eh.enqueue, eh.slot_wait, eh.result_wait, eh.commit, eh.commit_gpu,
      eh.commit_order, eh.commit_policy, eh.commit_queue, wh.enqueue, wh.lock, wh.sync, wh.launch,
      wh.slot_wait, wh.commit, wh.commit_gpu, wh.commit_order, wh.commit_policy, wh.commit_queue);
  std::fflush(stdout);
}

// A float16 .npy array (C order): its shape and elements.
struct Npy {
  std::vector<int64_t> shape;
  std::vector<uint16_t> data;
};

absl::StatusOr<Npy> LoadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    return absl::InvalidArgumentError(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n = 0;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(header.data(), header_len);
  if (header.find("'<f2'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos)
    return absl::InvalidArgumentError(path + ": want little-endian float16 in C order: " + header);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'shape': \\(([0-9, ]*)\\)")))
    return absl::InvalidArgumentError(path + ": no shape in " + header);
  Npy out;
  int64_t count = 1;
  const std::string dims = m[1];
  const std::regex number("[0-9]+");
  for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it) {
    out.shape.push_back(std::stoll(it->str()));
    count *= out.shape.back();
  }
  out.data.resize(count);
  f.read(reinterpret_cast<char*>(out.data.data()), static_cast<std::streamsize>(2 * count));
  if (!f) return absl::InvalidArgumentError(path + ": short file");
  return out;
}

// The shared model's real decode queries against AR(1) queries, through the engine with the CUDA
// backend (real k-means indexes from background seals): a context of the trace's first N tokens
// minus the last `decode`, then `decode` steps appending one token per layer and attending with
// that position's query. Reports the page hit ratio of the GPU cache (after trace_warmup steps)
// for each query source. AR(1): per (layer, query head), the real decode queries' mean and
// standard deviation per dimension, around which x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t walks.
void RunTrace(const Options& o, int64_t tokens) {
  auto q = LoadNpy(o.trace + "_q.npy");
  auto k = LoadNpy(o.trace + "_k.npy");
  auto v = LoadNpy(o.trace + "_v.npy");
  CHECK_OK(q.status());
  CHECK_OK(k.status());
  CHECK_OK(v.status());
  const int L = static_cast<int>(q->shape[0]), QH = static_cast<int>(q->shape[2]),
            KVH = static_cast<int>(k->shape[2]), D = static_cast<int>(q->shape[3]);
  const int64_t T = q->shape[1];
  if (tokens > T || tokens <= o.decode) {
    std::printf("trace %s: %ld tokens, cannot replay %ld\n", o.trace.c_str(), long(T),
                long(tokens));
    return;
  }
  const int64_t P = tokens - o.decode;
  auto qrow = [&](int l, int64_t t, int h) { return q->data.data() + ((l * T + t) * QH + h) * D; };
  // AR(1) statistics of the decode window's real queries.
  std::vector<double> mean(int64_t{L} * QH * D, 0), sd(mean.size(), 0);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < QH; ++h)
      for (int e = 0; e < D; ++e) {
        double s1 = 0, s2 = 0;
        for (int64_t t = P; t < tokens; ++t) {
          const double x = F16ToFloat(qrow(l, t, h)[e]);
          s1 += x;
          s2 += x * x;
        }
        const int64_t i = (int64_t{l} * QH + h) * D + e;
        mean[i] = s1 / o.decode;
        sd[i] = std::sqrt(std::max(0.0, s2 / o.decode - mean[i] * mean[i]));
      }
  for (const char* source : {"real", "ar1"}) {
    const bool real = std::string(source) == "real";
    config::Settings st;
    st.gpu_mode = "on";
    st.memory_limit_bytes = int64_t{16} << 30;
    const int64_t kv_bytes = tokens * L * KVH * D * 2 * 2;
    st.gpu_cache_bytes = static_cast<int64_t>(o.cache * kv_bytes);
    auto pool = std::make_shared<store::HostPool>(gpu::CudaBackend::DeviceAvailable()
                                                      ? buffer::PinnedAllocator()
                                                      : store::MappedHostAllocator(),
                                                  st.host_pool_bytes);
    // Without a device (a smoke test of the replay): the CPU backend, no cache to report.
    auto backend = gpu::CudaBackend::DeviceAvailable()
                       ? engine::CreateCudaAttentionBackend(st, pool)
                       : engine::CreateCpuBackend(st);
    CHECK_OK(backend.status());
    engine::EngineDeps deps;
    deps.backend = std::move(*backend);
    deps.host_pool = pool;
    auto eng = engine::Engine::Create(st, std::move(deps));
    CHECK_OK(eng.status());
    engine::Engine& e = **eng;
    engine::OpenOptions oo;
    oo.shape = store::ModelShape{L, QH, KVH, D, DType::kBF16};
    auto ctx = e.Open(oo);
    CHECK_OK(ctx.status());
    const auto t0 = Clock::now();
    std::vector<uint16_t> kb, vb;
    auto rows = [&](int l, int64_t from, int64_t n) {
      kb.resize(n * KVH * D);
      vb.resize(kb.size());
      const int64_t base = (l * T + from) * KVH * D;
      for (size_t i = 0; i < kb.size(); ++i) {
        kb[i] = FloatToBf16(F16ToFloat(k->data[base + i]));
        vb[i] = FloatToBf16(F16ToFloat(v->data[base + i]));
      }
      return e.Append(ctx->id, l, n, std::as_bytes(std::span(kb)), std::as_bytes(std::span(vb)));
    };
    for (int64_t from = 0; from < P; from += 8192)
      for (int l = 0; l < L; ++l) CHECK_OK(rows(l, from, std::min<int64_t>(8192, P - from)));
    CHECK_OK(e.Seal(ctx->id));  // the prefill indexed (as a client's prefill ends)
    const double prefill_s = Ms(t0, Clock::now()) / 1e3;
    std::mt19937 rng(4242);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> walk(mean.size());
    for (float& x : walk) x = nd(rng);
    const float rho = float(o.rho), noise = std::sqrt(1.f - rho * rho);
    std::vector<float> qf(int64_t{QH} * D), out(qf.size()), lse(QH);
    engine::BackendStats s0;
    std::vector<double> step_ms;
    int64_t retrieved = 0, steps = 0;
    for (int64_t t = P; t < tokens; ++t) {
      if (t - P == o.trace_warmup) s0 = e.Stats().backend;
      for (float& x : walk) x = rho * x + noise * nd(rng);
      double ms = 0;
      for (int l = 0; l < L; ++l) {
        CHECK_OK(rows(l, t, 1));
        for (int h = 0; h < QH; ++h)
          for (int d = 0; d < D; ++d) {
            const int64_t i = (int64_t{l} * QH + h) * D + d;
            qf[h * D + d] = real ? F16ToFloat(qrow(l, t, h)[d]) : float(mean[i] + sd[i] * walk[i]);
          }
        engine::AttendStats as;
        const auto t1 = Clock::now();
        CHECK_OK(e.Attend(ctx->id, l, qf, engine::AttendBudget{o.retrieval, o.estimation}, out, lse,
                          &as));
        ms += Ms(t1, Clock::now());
        if (t - P >= o.trace_warmup) retrieved += as.retrieved_tokens;
      }
      if (t - P >= o.trace_warmup) step_ms.push_back(ms), ++steps;
    }
    const engine::BackendStats s1 = e.Stats().backend;
    CHECK_OK(e.Close(ctx->id));
    const int64_t hp = s1.hit_pages - s0.hit_pages, mp = s1.miss_pages - s0.miss_pages;
    const int64_t hc = s1.hits - s0.hits, mc = s1.misses - s0.misses;
    std::printf(
        "trace %s %ld tokens (%ld prefill + %d decode steps, %d layers, %d/%d heads, d %d) queries "
        "%-4s  page-hit %.3f  cluster-hit %.3f  retrieved %.0f tokens/step  attend %.3f ms/step "
        "(%d layers)  pool %.1f MiB  k-means GPU %ld CPU %ld  prefill+seal %.1f s\n",
        o.trace.c_str(), long(tokens), long(P), o.decode, L, QH, KVH, D, source,
        double(hp) / std::max<int64_t>(1, hp + mp), double(hc) / std::max<int64_t>(1, hc + mc),
        double(retrieved) / std::max<int64_t>(1, steps), Median(step_ms), L,
        s1.pool_bytes / double(1 << 20), long(s1.kmeans_gpu), long(s1.kmeans_cpu), prefill_s);
    std::fflush(stdout);
  }
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
  app.add_option("--slots", o.slots, "calls in flight of the bare buffers (the engine's: 8)");
  app.add_option("--warmup", o.warmup);
  app.add_option("--rho", o.rho);
  app.add_option("--full", o.full, "also time full attention (HBM and pinned host)");
  app.add_option("--engine-only", o.engine_only, "time the engine alone (wave columns -1)");
  app.add_option("--bf16", o.bf16, "bare buffers: score bf16 copies of the centroids");
  app.add_option("--trace", o.trace,
                 "replay a trace (PREFIX_{q,k,v}.npy) through the engine: real vs AR(1) queries");
  app.add_option("--decode", o.decode, "trace: decode steps (the last tokens of each context)");
  CLI11_PARSE(app, argc, argv);
  if (!o.trace.empty()) {
    for (int64_t c : o.contexts) kvwave::RunTrace(o, c);
    return 0;
  }
  if (!kvwave::gpu::CudaBackend::DeviceAvailable()) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  std::printf(
      "# context batch layers-timed  per decode step (all %d layers); bare buffers: %d slots, %s "
      "scores; engine: one batched call a layer\n",
      o.layers, o.slots, o.bf16 ? "bf16" : "float32");
  for (int64_t c : o.contexts) kvwave::Run(o, c);
  return 0;
}
