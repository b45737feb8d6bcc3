// kvwave-ipc-bench: one decode step (every layer) of a GPU client attending through kvwaved with
// device tensors (CUDA IPC, issue 17) against the engine's in-process GPU Attend and the
// host-tensor path through kvwaved, same run, Llama-3-8B's shape by default (32 layers, 32 query
// / 8 KV heads, d 128, bf16), batch B (--batch: B contexts of the same length, one call a layer
// carrying all of them: AttendBatch / AttendBatchDevice; B = 1: Attend / AttendDevice):
//
//   inproc   Engine::Attend in this process (CUDA backend): host q in, host out/lse back, each
//            layer complete before the next (what an in-process server gets);
//   ipc      kvwaved (child process) on this process's device buffers: per layer, the layer's q
//            is produced on the client's stream (a device-to-device copy, after the stream waited
//            for the previous layer's "out ready", as a model's next projection would), then
//            AttendDevice (records "q ready", sends, waits for the reply, stream waits "out
//            ready"); one stream synchronisation at the end of the step;
//   host     kvwaved with host tensors over the shared-memory region (Client::Attend).
//
// Both engines get the same K/V (clustered synthetic keys, one layer's rows reused for every
// layer), sealed into 8K segments by their own GPU k-means (Seal ends the prefill), the same
// settings and budgets; each step appends one token per layer to both, then times the three
// paths on the same queries (AR(1) walks, as kvwave-decode-bench) in an order that rotates.
// Prints one line per context with per-step and per-layer medians and the ratios.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/decode/bench_util.h"
#include "config/settings.h"
#include "engine/backend_select.h"
#include "engine/engine.h"
#include "gpu/cuda_backend.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"

namespace kvwave {
namespace {

using bench_decode::Clock;
using bench_decode::Median;
using bench_decode::Ms;
#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Options {
  std::vector<int64_t> contexts = {131072};
  int layers = 32, kv_heads = 8, g = 4, d = 128;
  double cache = 0.05, retrieval = 0.018, estimation = 0.232, rho = 0.9;
  int steps = 20, warmup = 5, batch = 1;
  std::string kvwaved;
};

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// One layer's K/V rows [tokens x kv_heads x d] (bf16): keys around 512 centres per head.
void MakeLayer(const Options& o, int64_t tokens, std::vector<uint16_t>& k,
               std::vector<uint16_t>& v) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> centres(int64_t{o.kv_heads} * 512 * o.d), noise(1 << 16);
  for (float& x : centres) x = nd(rng);
  for (float& x : noise) x = nd(rng);
  k.resize(tokens * o.kv_heads * o.d);
  v.resize(k.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int h = 0; h < o.kv_heads; ++h) {
      const uint64_t r = Mix(t * 131 + h);
      const float* c = centres.data() + (int64_t{h} * 512 + r % 512) * o.d;
      uint16_t* kr = k.data() + (t * o.kv_heads + h) * o.d;
      uint16_t* vr = v.data() + (t * o.kv_heads + h) * o.d;
      for (int e = 0; e < o.d; ++e) {
        const uint64_t s = Mix(r + e);
        kr[e] = FloatToBf16(c[e] + 0.5f * noise[s & 0xffff]);
        vr[e] = FloatToBf16(noise[(s >> 16) & 0xffff]);
      }
    }
}

void Run(const Options& o, int64_t context) {
  const int L = o.layers, Hq = o.kv_heads * o.g, D = o.d, B = o.batch;
  const int64_t qn = int64_t{Hq} * D;
  const int64_t kv_bytes = context * o.kv_heads * D * 2 * 2 * L * B;
  const int64_t cache_bytes = static_cast<int64_t>(o.cache * kv_bytes);
  const int64_t limit = kv_bytes + (int64_t{8} << 30);
  const store::ModelShape shape{L, Hq, o.kv_heads, D, DType::kBF16};

  // kvwaved child and a client with a region large enough for one 8K-token chunk of K and V.
  client::LocalDaemonOptions dopt;
  dopt.binary = client::FindKvwaved(o.kvwaved);
  dopt.overrides = {"log.level=warn", "gpu.mode=on",
                    "gpu.cache_bytes=" + std::to_string(cache_bytes),
                    "store.memory_limit_bytes=" + std::to_string(limit)};
  auto daemon = client::LocalDaemon::Start(dopt);
  CHECK_OK(daemon.status());
  client::ClientOptions copt;
  copt.socket_path = (*daemon)->socket_path();
  copt.shared_memory_bytes = size_t{128} << 20;
  copt.deadline_ms = 300000;  // Seal of the whole prefill runs in one request
  auto cl = client::Client::Connect(copt);
  CHECK_OK(cl.status());
  client::Client& c = **cl;

  // The in-process engine with the same settings.
  config::Settings s;
  s.gpu_mode = "on";
  s.gpu_cache_bytes = cache_bytes;
  s.memory_limit_bytes = limit;
  auto deps = engine::SelectEngineDeps(s);
  CHECK_OK(deps.status());
  auto eng = engine::Engine::Create(s, std::move(deps->deps));
  CHECK_OK(eng.status());
  engine::Engine& e = **eng;

  const auto t0 = Clock::now();
  std::vector<uint16_t> k, v;
  MakeLayer(o, context, k, v);
  // B contexts in each engine; context b's rows are the layer's rows rotated by b * 4099 tokens
  // (same statistics, other positions).
  std::vector<uint64_t> eids(B), cids(B);
  for (int b = 0; b < B; ++b) {
    auto ectx = e.Open({shape, {}, ""});
    CHECK_OK(ectx.status());
    auto cctx = c.Open({{L, Hq, o.kv_heads, D, DType::kBF16}, {}, ""});
    CHECK_OK(cctx.status());
    eids[b] = ectx->id;
    cids[b] = cctx->id;
  }
  const int64_t row = int64_t{o.kv_heads} * D;
  std::vector<uint16_t> kr(k.size()), vr(v.size());
  for (int b = 0; b < B; ++b) {
    const int64_t shift = (int64_t{b} * 4099 % context) * row;
    std::rotate_copy(k.begin(), k.begin() + shift, k.end(), kr.begin());
    std::rotate_copy(v.begin(), v.begin() + shift, v.end(), vr.begin());
    for (int l = 0; l < L; ++l)
      for (int64_t at = 0; at < context; at += 8192) {
        const int64_t n = std::min<int64_t>(8192, context - at);
        auto kb = std::as_bytes(std::span(kr.data() + at * row, n * row));
        auto vb = std::as_bytes(std::span(vr.data() + at * row, n * row));
        CHECK_OK(e.Append(eids[b], l, n, kb, vb));
        CHECK_OK(c.Append(cids[b], l, n, kb, vb));
        if (at + n >= context && (l + 1) % 8 == 0)
          std::fprintf(stderr, "  context %d: %d layers appended (%.1f s)\n", b, l + 1,
                       Ms(t0, Clock::now()) / 1e3);
      }
  }
  const auto t1 = Clock::now();
  for (int b = 0; b < B; ++b) {
    CHECK_OK(e.Seal(eids[b]));
    CHECK_OK(c.Seal(cids[b]));
  }
  std::fprintf(stderr,
               "context %ld x %d: %d layers (%.1f GiB each engine) appended in %.1f s, sealed "
               "in %.1f s\n",
               long(context), B, L, kv_bytes / double(1 << 30), Ms(t0, t1) / 1e3,
               Ms(t1, Clock::now()) / 1e3);

  // Device buffers of the client: the registered q / out / lse (one layer's item) and the
  // step's queries (one per layer) that the "model" copies into q.
  float *q_reg, *out_reg, *lse_reg, *q_src;
  const int64_t bq = qn * B;  // one layer's queries (or outputs) of the batch
  CHECK_CUDA(cudaMalloc(&q_reg, sizeof(float) * bq));
  CHECK_CUDA(cudaMalloc(&out_reg, sizeof(float) * bq));
  CHECK_CUDA(cudaMalloc(&lse_reg, sizeof(float) * Hq * B));
  CHECK_CUDA(cudaMalloc(&q_src, sizeof(float) * bq * L));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto reg = c.RegisterDeviceBuffers(q_reg, sizeof(float) * bq, out_reg, sizeof(float) * bq,
                                     lse_reg, sizeof(float) * Hq * B);
  CHECK_OK(reg.status());

  std::mt19937 rng(77 + context);
  std::normal_distribution<float> nd;
  std::vector<float> walk(int64_t{L} * B * o.kv_heads * D), qs(bq * L);  // qs: [L][B][qn]
  for (float& x : walk) x = nd(rng);
  const float a = float(o.rho), noise = std::sqrt(1.f - a * a);
  auto make_queries = [&] {
    for (float& x : walk) x = a * x + noise * nd(rng);
    for (int64_t lb = 0; lb < int64_t{L} * B; ++lb)
      for (int h = 0; h < o.kv_heads; ++h)
        for (int j = 0; j < o.g; ++j)
          for (int x = 0; x < D; ++x)
            qs[lb * qn + (h * o.g + j) * D + x] =
                2.5f * (walk[(lb * o.kv_heads + h) * D + x] + 0.3f * nd(rng));
  };
  const client::AttendBudget cb{o.retrieval, o.estimation};
  const engine::AttendBudget eb{o.retrieval, o.estimation};
  std::vector<float> out(bq), lse(Hq * B);
  std::vector<engine::AttendBatchItem> eitems(B);
  std::vector<client::AttendBatchEntry> citems(B);
  for (int b = 0; b < B; ++b) {
    eitems[b] = {eids[b], eb};
    citems[b] = {cids[b], cb};
  }
  std::vector<engine::AttendStats> estats(B);
  std::vector<double> reply_us;
  auto inproc_step = [&] {
    const auto a0 = Clock::now();
    for (int l = 0; l < L; ++l) {
      const std::span<const float> q(qs.data() + l * bq, bq);
      if (B == 1)
        CHECK_OK(e.Attend(eids[0], l, q, eb, out, lse, nullptr));
      else
        CHECK_OK(e.AttendBatch(l, eitems, q, out, lse, estats));
    }
    return Ms(a0, Clock::now());
  };
  auto host_step = [&] {
    const auto a0 = Clock::now();
    for (int l = 0; l < L; ++l) {
      const std::span<const float> q(qs.data() + l * bq, bq);
      if (B == 1)
        CHECK_OK(c.Attend(cids[0], l, q, cb, out, lse));
      else
        CHECK_OK(c.AttendBatch(l, citems, q, out, lse));
    }
    return Ms(a0, Clock::now());
  };
  auto ipc_step = [&] {
    CHECK_CUDA(cudaMemcpy(q_src, qs.data(), sizeof(float) * bq * L, cudaMemcpyHostToDevice));
    const auto a0 = Clock::now();
    for (int l = 0; l < L; ++l) {
      CHECK_CUDA(cudaMemcpyAsync(q_reg, q_src + l * bq, sizeof(float) * bq,
                                 cudaMemcpyDeviceToDevice, stream));
      const auto r0 = Clock::now();
      if (B == 1)
        CHECK_OK(c.AttendDevice(*reg, cids[0], l, {}, cb, stream));
      else
        CHECK_OK(c.AttendBatchDevice(*reg, l, citems, {}, stream));
      reply_us.push_back(Ms(r0, Clock::now()) * 1e3);
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    return Ms(a0, Clock::now());
  };
  std::vector<double> t_in, t_ipc, t_host, ratio;
  int64_t mismatches = 0;
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < L; ++l) {  // the decode order: this step's token, then attention
        const int64_t at = (step * 7919 + l * 31 + b * 4099) % context;
        auto kb = std::as_bytes(std::span(k.data() + at * row, row));
        auto vb = std::as_bytes(std::span(v.data() + at * row, row));
        CHECK_OK(e.Append(eids[b], l, 1, kb, vb));
        CHECK_OK(c.Append(cids[b], l, 1, kb, vb));
      }
    make_queries();
    if (step == o.warmup) reply_us.clear();
    double t[3];
    for (int r = 0; r < 3; ++r) {
      const int which = (step + r) % 3;
      t[which] = which == 0 ? inproc_step() : which == 1 ? ipc_step() : host_step();
    }
    if (step >= o.warmup) {
      t_in.push_back(t[0]);
      t_ipc.push_back(t[1]);
      t_host.push_back(t[2]);
      ratio.push_back(t[1] / t[0]);
    }
    // The last layer's result of both kvwaved paths on the same queries: equal bit for bit.
    std::vector<float> dout(bq);
    CHECK_CUDA(cudaMemcpy(dout.data(), out_reg, sizeof(float) * bq, cudaMemcpyDeviceToHost));
    std::vector<float> hout(bq), hlse(Hq * B);
    const std::span<const float> ql(qs.data() + (L - 1) * bq, bq);
    if (B == 1)
      CHECK_OK(c.Attend(cids[0], L - 1, ql, cb, hout, hlse));
    else
      CHECK_OK(c.AttendBatch(L - 1, citems, ql, hout, hlse));
    if (std::memcmp(dout.data(), hout.data(), sizeof(float) * bq) != 0) ++mismatches;
  }
  auto st = c.Stats();
  CHECK_OK(st.status());
  const double in = Median(t_in), ipc = Median(t_ipc), host = Median(t_host);
  std::printf(
      "%8ld %2d  inproc %7.3f ms/step (%6.1f us/layer)  ipc %7.3f ms/step (%6.1f us/layer)  host "
      "%7.3f ms/step (%6.1f us/layer)  ipc/inproc %.3f (per-step median %.3f)  host/inproc %.3f  "
      "ipc min/max %.3f/%.3f  inproc min/max %.3f/%.3f  ipc reply p50 %.1f us  "
      "ipc-vs-host bit-mismatch steps %ld/%d  daemon device calls %ld errors %ld\n",
      long(context), B, in, in * 1e3 / L, ipc, ipc * 1e3 / L, host, host * 1e3 / L, ipc / in,
      Median(ratio), host / in, *std::min_element(t_ipc.begin(), t_ipc.end()),
      *std::max_element(t_ipc.begin(), t_ipc.end()), *std::min_element(t_in.begin(), t_in.end()),
      *std::max_element(t_in.begin(), t_in.end()), Median(reply_us), long(mismatches),
      o.warmup + o.steps, long(st->gpu_device_calls), long(st->gpu_device_errors));
  std::fflush(stdout);
  CHECK_OK(c.UnregisterDeviceBuffers(*reg));
  cudaFree(q_reg);
  cudaFree(out_reg);
  cudaFree(lse_reg);
  cudaFree(q_src);
  cudaStreamDestroy(stream);
  for (int b = 0; b < B; ++b) CHECK_OK(e.Close(eids[b]));
}

}  // namespace
}  // namespace kvwave

int main(int argc, char** argv) {
  kvwave::Options o;
  CLI::App app(
      "kvwave-ipc-bench: attention through kvwaved with device tensors (CUDA IPC) vs "
      "the in-process engine vs host tensors");
  app.add_option("--contexts", o.contexts, "context lengths")->delimiter(',');
  app.add_option("--layers", o.layers);
  app.add_option("--batch", o.batch, "contexts per call (one call a layer carries them all)")
      ->check(CLI::Range(1, 64));
  app.add_option("--cache", o.cache, "page pool as a fraction of the KV");
  app.add_option("--retrieval", o.retrieval);
  app.add_option("--estimation", o.estimation);
  app.add_option("--steps", o.steps);
  app.add_option("--warmup", o.warmup);
  app.add_option("--rho", o.rho);
  app.add_option("--kvwaved", o.kvwaved, "kvwaved binary (default: beside this one, or PATH)");
  CLI11_PARSE(app, argc, argv);
  if (!kvwave::gpu::CudaBackend::DeviceAvailable()) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
#ifndef NDEBUG
  std::printf("# WARNING: debug build\n");
#endif
  std::printf(
      "# kvwave-ipc-bench: batch %d, %d layers, %d/%d heads, d %d, budgets %.3f + %.3f, pool "
      "%.0f%% "
      "of KV, %d steps after %d warm-up\n",
      o.batch, o.layers, o.kv_heads * o.g, o.kv_heads, o.d, o.retrieval, o.estimation,
      o.cache * 100, o.steps, o.warmup);
  for (int64_t c : o.contexts) kvwave::Run(o, c);
  return 0;
}
