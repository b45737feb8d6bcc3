// kvwave-decode-bench: one decode step of Attend (tripartite attention through the wave buffer,
// KV in pinned host memory, a GPU page cache) against full attention with the KV on the GPU and
// full attention streaming the KV from pinned host memory, Llama-3-8B's shape by default.
//
// Data: synthetic clustered keys (buffer/synthetic_kv.h: 16-token clusters around random centres,
// oracle clustering, 64 steady tokens), queries an AR(1) walk per (layer, head) (rho = --rho) so
// that consecutive steps overlap as decode queries do. Where a context's KV for all layers passes
// --host-gib, a subset of layers is timed (one after another, as in decode) and scaled by
// layers / subset; the table says so. Roofline: the bytes each method must move over the measured
// HBM (device-to-device copy) and PCIe (pinned host-to-device copy) bandwidths.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "buffer/pinned_allocator.h"
#include "buffer/synthetic_kv.h"
#include "buffer/wave_buffer.h"
#include "gpu/cuda_backend.h"
#include "index/wave_index.h"

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
  int heads = 8;  // kv_heads x batch: a batch's sequences are units of the same layer call
  double host_gib = 16, cache = 0.05, retrieval = 0.018, estimation = 0.232, rho = 0.9;
  int steps = 12, warmup = 6, pps = 16;
  bool profile = true;      // one more pass with per-phase GPU timing
  bool probe = false;       // only the zero-copy read probe
  bool fuse = true;         // WaveBufferOptions::fused_select
  bool chain = true;        // WaveBufferOptions::chain
  bool pdl = true;          // CudaBackendOptions::dependent_launch
  bool bf16_scores = true;  // WaveBufferOptions::bf16_scores
  std::string json;
};

struct Bandwidth {
  double hbm = 0, pcie = 0;  // bytes/s
};

Bandwidth MeasureBandwidth(gpu::CudaBackend* b) {
  const size_t bytes = size_t{2} << 30;
  auto d1 = b->Allocate(bytes), d2 = b->Allocate(bytes);
  auto h = store::HostBuffer::Allocate(buffer::PinnedAllocator(), bytes);
  CHECK_OK(d1.status());
  CHECK_OK(d2.status());
  CHECK_OK(h.status());
  std::memset(h->data(), 1, bytes);
  Bandwidth bw;
  std::vector<double> hbm, pcie;
  for (int i = 0; i < 6; ++i) {
    auto t0 = Clock::now();
    CHECK_OK(b->Copy(d2->data(), d1->data(), bytes));
    CHECK_OK(b->Synchronize());
    auto t1 = Clock::now();
    CHECK_OK(b->Copy(d1->data(), h->data(), bytes));
    CHECK_OK(b->Synchronize());
    auto t2 = Clock::now();
    if (i == 0) continue;
    hbm.push_back(2.0 * bytes / (Ms(t0, t1) * 1e-3));  // read + write
    pcie.push_back(double(bytes) / (Ms(t1, t2) * 1e-3));
  }
  bw.hbm = Median(hbm);
  bw.pcie = Median(pcie);
  return bw;
}

// Full attention over every page of `layers` layers, with K/V at kbase/vbase (device or pinned
// host, same layout as kv). Returns the median ms per pass over all listed layers.
double TimeFull(gpu::CudaBackend* b, const buffer::SyntheticKv& kv, const std::byte* kbase,
                const std::byte* vbase, const std::byte* steady_k, const std::byte* steady_v,
                const float* q, float* out, float* lse, int reps) {
  const auto& s = kv.shape();
  const size_t row = s.d * 2;
  std::vector<gpu::DeviceBuffer> descr;
  std::vector<const gpu::PageRef*> pages;
  std::vector<const int32_t*> offs;
  int64_t max_pages = 0;
  for (int l = 0; l < s.layers; ++l) {
    std::vector<gpu::PageRef> p;
    std::vector<int32_t> off = {0};
    for (int h = 0; h < s.heads; ++h) {
      const int64_t u = int64_t{l} * s.heads + h;
      const std::byte* sk = steady_k + row * s.steady_rows * u;
      const std::byte* sv = steady_v + row * s.steady_rows * u;
      for (int r = 0; r < s.steady_rows; r += 8)
        p.push_back({sk + r * row, sv + r * row, std::min(8, s.steady_rows - r), 0});
      const int64_t base = kv.k(u) - kv.k(0);
      for (int64_t r = 0; r < kv.rows(u); r += 8)  // fixed-size clusters: no padding
        p.push_back({kbase + base + r * row, vbase + base + r * row, 8, 0});
      off.push_back(static_cast<int32_t>(p.size()));
      max_pages = std::max<int64_t>(max_pages, off[h + 1] - off[h]);
    }
    auto buf = b->Allocate(sizeof(gpu::PageRef) * p.size() + sizeof(int32_t) * off.size() + 16);
    CHECK_OK(buf.status());
    CHECK_OK(b->Copy(buf->data(), p.data(), sizeof(gpu::PageRef) * p.size()));
    auto* o = buf->as<std::byte>() + sizeof(gpu::PageRef) * p.size();
    CHECK_OK(b->Copy(o, off.data(), sizeof(int32_t) * off.size()));
    pages.push_back(buf->as<gpu::PageRef>());
    offs.push_back(reinterpret_cast<const int32_t*>(o));
    descr.push_back(std::move(*buf));
  }
  CHECK_OK(b->Synchronize());
  std::vector<double> times;
  for (int rep = 0; rep <= reps; ++rep) {
    CHECK_OK(b->RecordEvent(8, 0));
    for (int l = 0; l < s.layers; ++l) {
      gpu::ExactArgs a;
      a.q = q + int64_t{l} * s.heads * s.g * s.d;
      a.heads = s.heads;
      a.g = s.g;
      a.d = s.d;
      a.scale = 1.0f / std::sqrt(float(s.d));
      a.kv_type = DType::kBF16;
      a.pages = pages[l];
      a.page_offsets = offs[l];
      a.max_pages_per_head = max_pages;
      a.out = out;
      a.lse = lse;
      CHECK_OK(b->ExactAttention(a));
    }
    CHECK_OK(b->RecordEvent(9, 0));
    CHECK_OK(b->Synchronize());
    auto ms = b->ElapsedMs(8, 9);
    CHECK_OK(ms.status());
    if (rep > 0 || reps == 0) times.push_back(*ms);
  }
  return Median(times);
}

struct Row {
  int64_t context = 0;
  int timed_layers = 0;
  double attend_ms = 0, full_gpu_ms = -1, full_host_ms = 0;
  double hit_ratio = 0, pcie_bytes = 0, hbm_bytes = 0;
  double attend_roof_ms = 0, full_gpu_roof_ms = 0, full_host_roof_ms = 0;
  double check_err = -1;
  int64_t pool_pages = 0, overflow = 0;
  buffer::WaveCounters counters, profile;
};

Row RunContext(gpu::CudaBackend* b, const Options& o, int64_t context, const Bandwidth& bw) {
  Row row;
  row.context = context;
  const double layer_bytes = double(context) * o.heads * o.d * 2 * 2;
  const int sub = std::clamp<int>(int(o.host_gib * double(1 << 30) / layer_bytes), 1, o.layers);
  row.timed_layers = sub;
  const double scale = double(o.layers) / sub;
  buffer::SyntheticShape shape;
  shape.layers = sub;
  shape.heads = o.heads;
  shape.g = o.g;
  shape.d = o.d;
  shape.steady_rows = 64;
  shape.clusters = (context - shape.steady_rows) / shape.cluster_tokens;
  shape.seed = 1234 + context;
  auto t0 = Clock::now();
  auto kv = buffer::SyntheticKv::Create(shape, buffer::PinnedAllocator());
  CHECK_OK(kv.status());
  std::fprintf(stderr, "context %ld: %d layers, %.1f GiB pinned, generated in %.1f s\n",
               long(context), sub, (*kv)->kv_bytes() / double(1 << 30), Ms(t0, Clock::now()) / 1e3);
  buffer::WaveBufferOptions w;
  w.layers = sub;
  w.heads = o.heads;
  w.g = o.g;
  w.d = o.d;
  w.clusters = shape.clusters;
  w.retrieval = o.retrieval;
  w.estimation = o.estimation;
  w.cache_bytes = static_cast<int64_t>(o.cache * (*kv)->kv_bytes());
  w.max_cluster_pages = 2;
  w.exact_pages_per_split = o.pps;
  w.fused_select = o.fuse;
  w.chain = o.chain;
  w.bf16_scores = o.bf16_scores;
  auto wb = buffer::WaveBuffer::Create(b, w, (*kv)->Units());
  CHECK_OK(wb.status());
  row.pool_pages = (*wb)->pool_pages();

  // Queries: AR(1) per (layer, head) across steps; g heads = shared walk + own noise.
  const int steps = o.warmup + o.steps;
  const int64_t per_layer = int64_t{o.heads} * o.g * o.d;
  std::vector<float> q(int64_t{steps} * sub * per_layer);
  std::mt19937 rng(77 + context);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> walk(sub * o.heads * o.d);
  for (auto& x : walk) x = nd(rng);
  const float a = float(o.rho), bnoise = std::sqrt(1.f - a * a);
  for (int s = 0; s < steps; ++s) {
    for (auto& x : walk) x = a * x + bnoise * nd(rng);
    for (int l = 0; l < sub; ++l)
      for (int h = 0; h < o.heads; ++h)
        for (int j = 0; j < o.g; ++j)
          for (int e = 0; e < o.d; ++e)
            q[((int64_t{s} * sub + l) * o.heads * o.g + h * o.g + j) * o.d + e] =
                2.5f * (walk[(l * o.heads + h) * o.d + e] + 0.3f * nd(rng));
  }
  auto q_dev = b->Allocate(sizeof(float) * q.size());
  auto out = b->Allocate(sizeof(float) * per_layer);
  auto lse = b->Allocate(sizeof(float) * o.heads * o.g);
  CHECK_OK(q_dev.status());
  CHECK_OK(out.status());
  CHECK_OK(lse.status());
  CHECK_OK(b->Copy(q_dev->data(), q.data(), sizeof(float) * q.size()));
  CHECK_OK(b->Synchronize());

  std::vector<double> times;
  buffer::WaveCounters at_warm;
  for (int s = 0; s < steps; ++s) {
    if (s == o.warmup) {
      CHECK_OK((*wb)->Finish());
      at_warm = (*wb)->counters();
    }
    auto t1 = Clock::now();
    for (int l = 0; l < sub; ++l) {
      CHECK_OK((*wb)->AttendLayer(l, q_dev->as<float>() + (int64_t{s} * sub + l) * per_layer,
                                  out->as<float>(), lse->as<float>()));
    }
    CHECK_OK(b->Synchronize(0));
    const double ms = Ms(t1, Clock::now());
    if (s >= o.warmup) times.push_back(ms * scale);
    if (s == steps - 1) {  // check layer sub-1 of the last step against the CPU backend
      std::vector<float> got(per_layer), ref(o.g * o.d), ref_lse(o.g);
      CHECK_OK(b->Copy(got.data(), out->data(), sizeof(float) * per_layer));
      CHECK_OK(b->Synchronize());
      double num = 0, den = 0;
      for (int h = 0; h < o.heads; ++h) {
        const float* qq = q.data() + (int64_t{s} * sub + sub - 1) * per_layer + h * o.g * o.d;
        CHECK_OK((*kv)->ReferenceAttend(int64_t{sub - 1} * o.heads + h, qq,
                                        (*wb)->retrieval_clusters(), (*wb)->estimation_clusters(),
                                        ref.data(), ref_lse.data()));
        for (int i = 0; i < o.g * o.d; ++i) {
          num += std::pow(double(got[h * o.g * o.d + i]) - ref[i], 2);
          den += double(ref[i]) * ref[i];
        }
      }
      row.check_err = std::sqrt(num / den);
    }
  }
  CHECK_OK((*wb)->Finish());
  buffer::WaveCounters total = (*wb)->counters();
  total.hit_clusters -= at_warm.hit_clusters;
  total.miss_clusters -= at_warm.miss_clusters;
  total.hit_pages -= at_warm.hit_pages;
  total.miss_pages -= at_warm.miss_pages;
  total.stale_hits -= at_warm.stale_hits;
  total.pcie_bytes -= at_warm.pcie_bytes;
  total.exact_rows -= at_warm.exact_rows;
  total.enqueue_us -= at_warm.enqueue_us;
  total.wait_us -= at_warm.wait_us;
  total.commit_us -= at_warm.commit_us;
  total.record_wait_us -= at_warm.record_wait_us;
  total.calls -= at_warm.calls;
  row.counters = total;
  row.overflow = (*wb)->policy_stats().overflow;
  const int64_t estimation_clusters = (*wb)->estimation_clusters();
  const double calls = double(total.calls);
  std::fprintf(stderr,
               "context %ld per layer call (host us): enqueue %.1f, wait for ring %.1f; committer "
               "thread: wait for record %.1f, policy + update %.1f; stale hits %ld\n",
               long(context), total.enqueue_us / calls, total.wait_us / calls,
               total.record_wait_us / calls, total.commit_us / calls, long(total.stale_hits));
  if (o.profile) {  // per-phase GPU time, each call synchronised (not part of the timing above)
    wb->reset();
    buffer::WaveBufferOptions wp = w;
    wp.profile = true;
    auto pb = buffer::WaveBuffer::Create(b, wp, (*kv)->Units());
    CHECK_OK(pb.status());
    for (int s = 0; s < steps; ++s)
      for (int l = 0; l < sub; ++l)
        CHECK_OK((*pb)->AttendLayer(l, q_dev->as<float>() + (int64_t{s} * sub + l) * per_layer,
                                    out->as<float>(), lse->as<float>()));
    CHECK_OK((*pb)->Finish());
    row.profile = (*pb)->counters();
    const double pc = double(row.profile.calls) / 1e3;  // ms -> us per call
    std::fprintf(
        stderr,
        "context %ld per layer call (GPU us, profiled): score %.1f, top-k %.1f, plan %.1f, "
        "exact %.1f, estimate+merge %.1f\n",
        long(context), row.profile.score_ms / pc, row.profile.topk_ms / pc,
        row.profile.plan_ms / pc, row.profile.exact_ms / pc, row.profile.estimate_ms / pc);
    pb->reset();
  }
  row.attend_ms = Median(times);
  const double n_steps = o.steps;
  row.hit_ratio =
      double(total.hit_pages) / std::max<int64_t>(1, total.hit_pages + total.miss_pages);
  row.pcie_bytes = total.pcie_bytes / n_steps * scale;
  // HBM bytes Attend must move per step: centroids (bf16 or float32) + sizes of every cluster,
  // centroids and value sums of the estimation zone (float32), exact rows read (hits and steady
  // from the pool; misses come over PCIe), the stash of the misses into the execution buffer,
  // admission copies (read + write).
  const double units = double(o.layers) * o.heads, rowb = o.d * 2.0;
  const double meta = units * shape.clusters * (o.d * (o.bf16_scores ? 2.0 : 4.0) + 4) +
                      units * estimation_clusters * o.d * 8.0;
  const double exact = 2 * rowb * total.exact_rows / n_steps * scale;
  const double miss = row.pcie_bytes;
  row.hbm_bytes = meta + exact + miss /*stash write*/ + 2 * miss /*admission*/;
  row.attend_roof_ms = 1e3 * std::max(row.hbm_bytes / bw.hbm, row.pcie_bytes / bw.pcie);
  const double full_bytes = double(context) * o.layers * o.heads * o.d * 2 * 2;
  row.full_gpu_roof_ms = 1e3 * full_bytes / bw.hbm;
  row.full_host_roof_ms = 1e3 * full_bytes / bw.pcie;
  wb->reset();

  // Steady zone copies on both sides, then (a) KV on the GPU, (b) KV streamed from pinned host.
  const size_t srow = o.d * 2 * size_t{64};
  std::vector<std::byte> sk(srow * sub * o.heads), sv(sk.size());
  const auto units_l = (*kv)->Units();
  for (size_t u = 0; u < units_l.size(); ++u) {
    std::memcpy(sk.data() + srow * u, units_l[u].steady_k, srow);
    std::memcpy(sv.data() + srow * u, units_l[u].steady_v, srow);
  }
  auto sk_dev = b->Allocate(sk.size()), sv_dev = b->Allocate(sv.size());
  CHECK_OK(sk_dev.status());
  CHECK_OK(sv_dev.status());
  CHECK_OK(b->Copy(sk_dev->data(), sk.data(), sk.size()));
  CHECK_OK(b->Copy(sv_dev->data(), sv.data(), sv.size()));
  const size_t kv_half = (*kv)->rows(0) * size_t(o.d) * 2 * (*kv)->units();
  {
    auto kd = b->Allocate(kv_half), vd = b->Allocate(kv_half);
    if (kd.ok() && vd.ok()) {
      CHECK_OK(b->Copy(kd->data(), (*kv)->k(0), kv_half));
      CHECK_OK(b->Copy(vd->data(), (*kv)->v(0), kv_half));
      CHECK_OK(b->Synchronize());
      row.full_gpu_ms = scale * TimeFull(b, **kv, kd->as<std::byte>(), vd->as<std::byte>(),
                                         sk_dev->as<std::byte>(), sv_dev->as<std::byte>(),
                                         q_dev->as<float>(), out->as<float>(), lse->as<float>(), 5);
    }
  }
  row.full_host_ms = scale * TimeFull(b, **kv, (*kv)->k(0), (*kv)->v(0), sk_dev->as<std::byte>(),
                                      sv_dev->as<std::byte>(), q_dev->as<float>(), out->as<float>(),
                                      lse->as<float>(), context > 200000 ? 1 : 3);
  return row;
}

// Index build of one 8192-token segment of one (layer, KV head), d = 128, 10 rounds: spherical
// k-means on the GPU vs index::ClusterKeys on the host's cores (TBB), the same keys.
void TimeKMeans(gpu::CudaBackend* b) {
  const int64_t n = 8192;
  const int d = 128;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> centres(64 * d), keys(n * d);
  for (auto& x : centres) x = nd(rng);
  for (int64_t i = 0; i < n; ++i)
    for (int e = 0; e < d; ++e) keys[i * d + e] = centres[(rng() % 64) * d + e] + 0.6f * nd(rng);
  const int64_t k = n / 16;
  auto kd = b->Allocate(sizeof(float) * n * d), ad = b->Allocate(sizeof(int32_t) * n),
       sd = b->Allocate(sizeof(int32_t) * k), cd = b->Allocate(sizeof(float) * k * d);
  CHECK_OK(kd.status());
  CHECK_OK(ad.status());
  CHECK_OK(sd.status());
  CHECK_OK(cd.status());
  CHECK_OK(b->Copy(kd->data(), keys.data(), sizeof(float) * n * d));
  gpu::KMeansArgs a;
  a.keys = kd->as<float>();
  a.n = n;
  a.d = d;
  a.clusters = k;
  a.assignment = ad->as<int32_t>();
  a.sizes = sd->as<int32_t>();
  a.centroids = cd->as<float>();
  std::vector<double> gpu_ms, cpu_ms;
  for (int r = 0; r < 6; ++r) {
    CHECK_OK(b->Synchronize());
    auto t0 = Clock::now();
    CHECK_OK(b->SphericalKMeans(a));
    CHECK_OK(b->Synchronize());
    if (r > 0) gpu_ms.push_back(Ms(t0, Clock::now()));
  }
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    auto c = index::ClusterKeys(keys.data(), n, d, {});
    CHECK_OK(c.status());
    cpu_ms.push_back(Ms(t0, Clock::now()));
  }
  std::printf(
      "# index build, 8192 keys x d=128, 512 clusters, 10 rounds: GPU %.2f ms, CPU (%u "
      "threads) %.2f ms\n",
      Median(gpu_ms), std::thread::hardware_concurrency(), Median(cpu_ms));
}

// Zero-copy read rates from pinned host memory, scattered vs sequential (a diagnostic for the
// exact phase, whose misses are scattered 2 KB pages): GatherPages into HBM with 2 KB and 4 KB
// pieces, and ExactAttention reading the pages in place.
void ProbePcie(gpu::CudaBackend* b) {
  const size_t span = size_t{8} << 30, page = 2048;
  auto host = store::HostBuffer::Allocate(buffer::PinnedAllocator(), span);
  CHECK_OK(host.status());
  std::memset(host->data(), 1, span);
  const int64_t pages = 1600;  // ~3.2 MB: one layer's misses at 128K (K only; V alike)
  auto dst = b->Allocate(page * pages * 2);
  CHECK_OK(dst.status());
  std::mt19937_64 rng(9);
  auto run_gather = [&](bool scattered, size_t piece, bool bulk = false) {
    const int64_t n = int64_t(page * pages / piece);
    std::vector<const void*> src(n);
    std::vector<void*> to(n);
    std::vector<int32_t> bytes(n, int32_t(piece));
    for (int64_t i = 0; i < n; ++i) {
      const size_t off = scattered ? (rng() % (span / piece)) * piece : size_t(i) * piece;
      src[i] = host->data() + off;
      to[i] = dst->as<std::byte>() + i * piece;
    }
    auto meta = b->Allocate(n * (2 * sizeof(void*) + sizeof(int32_t)) + 64);
    CHECK_OK(meta.status());
    auto* m = meta->as<std::byte>();
    CHECK_OK(b->Copy(m, src.data(), n * sizeof(void*)));
    CHECK_OK(b->Copy(m + n * sizeof(void*), to.data(), n * sizeof(void*)));
    CHECK_OK(b->Copy(m + 2 * n * sizeof(void*), bytes.data(), n * sizeof(int32_t)));
    std::vector<double> ms;
    for (int r = 0; r < 12; ++r) {
      CHECK_OK(b->RecordEvent(30, 0));
      CHECK_OK(b->GatherPages(reinterpret_cast<const void* const*>(m),
                              reinterpret_cast<void* const*>(m + n * sizeof(void*)),
                              reinterpret_cast<const int32_t*>(m + 2 * n * sizeof(void*)), n,
                              int64_t(piece), 0, bulk));
      CHECK_OK(b->RecordEvent(31, 0));
      CHECK_OK(b->Synchronize());
      auto e = b->ElapsedMs(30, 31);
      CHECK_OK(e.status());
      if (r >= 2) ms.push_back(*e);
    }
    return double(page * pages) / (Median(ms) * 1e-3) / 1e9;
  };
  auto run_exact = [&](bool scattered) {
    const int heads = 8, g = 4, d = 128;
    std::vector<gpu::PageRef> refs(pages);
    std::vector<int32_t> off(heads + 1);
    for (int64_t i = 0; i < pages; ++i) {
      const size_t o = scattered ? (rng() % (span / page / 2)) * page * 2 : size_t(i) * page * 2;
      refs[i] = gpu::PageRef{host->data() + o, host->data() + o + page, 8, 0};
    }
    for (int h = 0; h <= heads; ++h) off[h] = int32_t(pages * h / heads);
    auto meta = b->Allocate(sizeof(gpu::PageRef) * pages + sizeof(int32_t) * (heads + 1));
    auto q = b->Allocate(sizeof(float) * heads * g * d),
         out = b->Allocate(sizeof(float) * heads * g * d),
         lse = b->Allocate(sizeof(float) * heads * g);
    CHECK_OK(meta.status());
    CHECK_OK(b->Copy(meta->data(), refs.data(), sizeof(gpu::PageRef) * pages));
    auto* o = meta->as<std::byte>() + sizeof(gpu::PageRef) * pages;
    CHECK_OK(b->Copy(o, off.data(), sizeof(int32_t) * (heads + 1)));
    CHECK_OK(b->Memset(q->data(), 0, sizeof(float) * heads * g * d));
    gpu::ExactArgs a;
    a.q = q->as<float>();
    a.heads = heads;
    a.g = g;
    a.d = d;
    a.scale = 0.1f;
    a.pages = meta->as<gpu::PageRef>();
    a.page_offsets = reinterpret_cast<const int32_t*>(o);
    a.max_pages_per_head = pages / heads + 1;
    a.pages_per_split = 8;
    a.out = out->as<float>();
    a.lse = lse->as<float>();
    std::vector<double> ms;
    for (int r = 0; r < 12; ++r) {
      CHECK_OK(b->RecordEvent(30, 0));
      CHECK_OK(b->ExactAttention(a, 0));
      CHECK_OK(b->RecordEvent(31, 0));
      CHECK_OK(b->Synchronize());
      auto e = b->ElapsedMs(30, 31);
      CHECK_OK(e.status());
      if (r >= 2) ms.push_back(*e);
    }
    return double(2 * page * pages) / (Median(ms) * 1e-3) / 1e9;  // K and V
  };
  std::printf(
      "# zero-copy probe (8 GiB pinned span, 3.2 MB per pass): gather 2 KB scattered %.1f "
      "GB/s, sequential %.1f; gather 4 KB scattered %.1f, 16 KB scattered %.1f; exact "
      "attention over 2 KB K+V pages scattered %.1f GB/s, sequential %.1f\n",
      run_gather(true, 2048), run_gather(false, 2048), run_gather(true, 4096),
      run_gather(true, 16384), run_exact(true), run_exact(false));
  // The same gathers with the SMs' bulk-copy engine (cp.async.bulk) instead of loads.
  std::printf(
      "# zero-copy probe, bulk copies: gather 2 KB scattered %.1f GB/s, sequential %.1f; 4 KB "
      "scattered %.1f, 16 KB scattered %.1f\n",
      run_gather(true, 2048, true), run_gather(false, 2048, true), run_gather(true, 4096, true),
      run_gather(true, 16384, true));
}

int Main(int argc, char** argv) {
  CLI::App app{"decode step: Attend (wave buffer) vs full attention on GPU / streamed from host"};
  Options o;
  std::string contexts = "32768,131072,524288,1048576";
  app.add_option("--contexts", contexts, "context lengths, comma separated");
  app.add_option("--layers", o.layers);
  app.add_option("--host-gib", o.host_gib,
                 "host KV per context; beyond it a layer subset is timed");
  app.add_option("--cache", o.cache, "GPU cache, fraction of the KV");
  app.add_option("--retrieval", o.retrieval);
  app.add_option("--estimation", o.estimation);
  app.add_option("--rho", o.rho, "AR(1) coefficient of the queries across steps");
  app.add_option("--batch", o.batch, "sequences decoded together (each its own KV)");
  app.add_option("--profile", o.profile, "extra pass timing each phase on the GPU");
  app.add_option("--pps", o.pps, "exact attention: pages per split");
  app.add_option("--pdl", o.pdl,
                 "programmatic dependent launch in the fused select (1) or not (0)");
  app.add_option("--fuse", o.fuse, "wave buffer: fused score/top-k/plan and merge (1) or not (0)");
  app.add_option("--chain", o.chain,
                 "wave buffer: estimation and exact attention as dependent launches behind the "
                 "selection (1) or after an event (0)");
  app.add_option("--bf16-scores", o.bf16_scores,
                 "wave buffer: score clusters with bf16 centroids (1) or float32 (0)");
  app.add_flag("--probe", o.probe, "only measure zero-copy read rates (scattered vs sequential)");
  app.add_option("--steps", o.steps);
  app.add_option("--warmup", o.warmup);
  app.add_option("--json", o.json);
  CLI11_PARSE(app, argc, argv);
  o.heads = o.kv_heads * o.batch;
  o.contexts.clear();
  for (auto p : absl::StrSplit(contexts, ',')) o.contexts.push_back(std::stoll(std::string(p)));
  gpu::CudaBackendOptions bo;
  bo.dependent_launch = o.pdl;
  auto backend = gpu::CudaBackend::Create(bo);
  CHECK_OK(backend.status());
  gpu::CudaBackend* b = backend->get();
  const Bandwidth bw = MeasureBandwidth(b);
  std::printf("# kvwave-decode-bench: %d layers x %d KV heads x %d q/KV, d=%d, bf16, batch %d\n",
              o.layers, o.kv_heads, o.g, o.d, o.batch);
  std::printf(
      "# data: synthetic clustered keys (16-token clusters, oracle clustering), AR(1) "
      "queries rho=%.2f; cache %.0f%% of KV; retrieval %.1f%% + estimation %.1f%% of "
      "clusters\n",
      o.rho, 100 * o.cache, 100 * o.retrieval, 100 * o.estimation);
  std::printf(
      "# wave buffer: %s select/plan/merge, %d pages per split, dependent launch %s, attention "
      "%s, scores from %s centroids, cache updates on their own stream\n",
      o.fuse ? "fused" : "unfused", o.pps, o.pdl ? "on" : "off",
      o.fuse && o.chain ? "chained behind the selection" : "after an event",
      o.bf16_scores ? "bf16" : "f32");
  std::printf("# measured: HBM %.0f GB/s (D2D copy, read+write), PCIe %.1f GB/s (pinned H2D)\n",
              bw.hbm / 1e9, bw.pcie / 1e9);
  TimeKMeans(b);
  if (o.probe) {
    ProbePcie(b);
    return 0;
  }
  std::vector<Row> rows;
  for (int64_t c : o.contexts) {
    rows.push_back(RunContext(b, o, c, bw));
    const Row& r = rows.back();
    std::fprintf(stderr,
                 "done %ld: attend %.3f ms (roof %.3f) hit %.3f gpu %.3f host %.1f err %.1e\n",
                 long(c), r.attend_ms, r.attend_roof_ms, r.hit_ratio, r.full_gpu_ms, r.full_host_ms,
                 r.check_err);
  }
  std::printf("%8s %6s %10s %9s %6s %10s %10s %9s %6s %11s %9s %12s %9s %9s %8s\n", "context",
              "layers", "attend_ms", "roof_ms", "x_roof", "hit_ratio", "pcie_MB", "hbm_MB",
              "gpu_ms", "gpu_roof_ms", "host_ms", "host_roof_ms", "vs_gpu", "vs_host", "err");
  for (const Row& r : rows) {
    std::printf(
        "%8ld %3d/%-2d %10.3f %9.3f %6.2f %10.3f %10.1f %9.1f %6.2f %11.3f %9.1f %12.1f "
        "%9.2f %9.1f %8.1e\n",
        long(r.context), r.timed_layers, o.layers, r.attend_ms, r.attend_roof_ms,
        r.attend_ms / r.attend_roof_ms, r.hit_ratio, r.pcie_bytes / 1e6, r.hbm_bytes / 1e6,
        r.full_gpu_ms, r.full_gpu_roof_ms, r.full_host_ms, r.full_host_roof_ms,
        r.full_gpu_ms / r.attend_ms, r.full_host_ms / r.attend_ms, r.check_err);
  }
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    std::fprintf(f, "{\"hbm_Bps\": %.4g, \"pcie_Bps\": %.4g, \"rows\": [\n", bw.hbm, bw.pcie);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(
          f,
          "  {\"context\": %ld, \"timed_layers\": %d, \"layers\": %d, \"attend_ms\": %.4f, "
          "\"attend_roofline_ms\": %.4f, \"hit_ratio\": %.4f, \"pcie_bytes\": %.4g, "
          "\"hbm_bytes\": %.4g, \"full_gpu_ms\": %.4f, \"full_gpu_roofline_ms\": %.4f, "
          "\"full_host_ms\": %.4f, \"full_host_roofline_ms\": %.4f, \"pool_pages\": %ld, "
          "\"overflow\": %ld, \"check_rel_err\": %.3g, \"batch\": %d, \"stale_hits\": %ld, "
          "\"commit_us_per_call\": %.2f, \"enqueue_us_per_call\": %.2f, "
          "\"gpu_us_per_call\": {\"score\": %.2f, \"topk\": %.2f, \"plan\": %.2f, "
          "\"exact\": %.2f, \"estimate_merge\": %.2f}}%s\n",
          long(r.context), r.timed_layers, o.layers, r.attend_ms, r.attend_roof_ms, r.hit_ratio,
          r.pcie_bytes, r.hbm_bytes, r.full_gpu_ms, r.full_gpu_roof_ms, r.full_host_ms,
          r.full_host_roof_ms, long(r.pool_pages), long(r.overflow), r.check_err, o.batch,
          long(r.counters.stale_hits),
          r.counters.commit_us / std::max<int64_t>(1, r.counters.calls),
          r.counters.enqueue_us / std::max<int64_t>(1, r.counters.calls),
          1e3 * r.profile.score_ms / std::max<int64_t>(1, r.profile.calls),
          1e3 * r.profile.topk_ms / std::max<int64_t>(1, r.profile.calls),
          1e3 * r.profile.plan_ms / std::max<int64_t>(1, r.profile.calls),
          1e3 * r.profile.exact_ms / std::max<int64_t>(1, r.profile.calls),
          1e3 * r.profile.estimate_ms / std::max<int64_t>(1, r.profile.calls),
          i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace kvwave

int main(int argc, char** argv) { return kvwave::Main(argc, argv); }
