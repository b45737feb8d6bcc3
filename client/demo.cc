#include "client/demo.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "client/trace_file.h"
#include "config/status_macros.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"

namespace kvwave::client {
namespace {

using Clock = std::chrono::steady_clock;

// The demo's data: per layer K and V as raw bytes of `shape.dtype`, queries as float32.
struct DemoData {
  std::string description;
  ModelShape shape;
  int64_t tokens = 0;
  std::vector<std::span<const std::byte>> k, v;  // per layer, [tokens x kv_heads x D]
  std::vector<std::vector<float>> q;             // per layer, [queries x q_heads x D]
  int queries = 0;
  std::optional<trace::Trace> trace;      // keeps the mapping alive
  std::vector<std::vector<float>> owned;  // synthetic K/V storage
};

absl::Status LoadTrace(const std::string& prefix, int queries, DemoData& d) {
  KVWAVE_ASSIGN_OR_RETURN(trace::Trace t, trace::Trace::Open(prefix));
  d.trace = std::move(t);
  const trace::Trace& tr = *d.trace;
  d.shape = {static_cast<int32_t>(tr.layers), static_cast<int32_t>(tr.q_heads),
             static_cast<int32_t>(tr.kv_heads), static_cast<int32_t>(tr.head_dim), tr.k.dtype()};
  d.tokens = tr.tokens;
  d.queries = static_cast<int>(std::min<int64_t>(queries, tr.tokens));
  const size_t es = ElementSize(tr.k.dtype());
  const size_t layer_bytes = static_cast<size_t>(d.tokens * d.shape.TokenBytesPerLayer());
  for (int64_t l = 0; l < tr.layers; ++l) {
    d.k.emplace_back(static_cast<const std::byte*>(tr.k.data()) + tr.KvIndex(l, 0, 0) * es,
                     layer_bytes);
    d.v.emplace_back(static_cast<const std::byte*>(tr.v.data()) + tr.KvIndex(l, 0, 0) * es,
                     layer_bytes);
    std::vector<float>& q = d.q.emplace_back(size_t(d.queries) * tr.q_heads * tr.head_dim);
    tr.q.CopyFloats(tr.QIndex(l, tr.tokens - d.queries, 0), static_cast<int64_t>(q.size()),
                    q.data());
  }
  d.description = absl::StrFormat(
      "trace %s: %d layers x %d tokens, %d q heads, %d kv heads, "
      "head dim %d, %s",
      prefix, tr.layers, tr.tokens, tr.q_heads, tr.kv_heads, tr.head_dim, DTypeName(tr.k.dtype()));
  return absl::OkStatus();
}

// Clustered keys (so an index has structure to find) and queries near random keys.
void MakeSynthetic(int queries, DemoData& d) {
  d.shape = {2, 8, 2, 128, DType::kF32};
  d.tokens = 16384;
  d.queries = queries;
  std::mt19937_64 rng(20250101);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t D = d.shape.head_dim, H = d.shape.kv_heads;
  // References into `owned` must survive the emplace_backs below: no reallocation.
  d.owned.reserve(2 * d.shape.layers);
  for (int l = 0; l < d.shape.layers; ++l) {
    std::vector<float> centers(64 * D);
    for (float& c : centers) c = 2.f * normal(rng);
    auto& k = d.owned.emplace_back(size_t(d.tokens * H * D));
    auto& v = d.owned.emplace_back(size_t(d.tokens * H * D));
    for (int64_t i = 0; i < d.tokens * H; ++i) {
      const float* c = &centers[(rng() % 64) * D];
      for (int64_t j = 0; j < D; ++j) {
        k[i * D + j] = c[j] + 0.5f * normal(rng);
        v[i * D + j] = normal(rng);
      }
    }
    d.k.push_back(std::as_bytes(std::span<const float>(k)));
    d.v.push_back(std::as_bytes(std::span<const float>(v)));
    // Each query head looks for one key cluster (as real heads do), so attention concentrates.
    auto& q = d.q.emplace_back(size_t(queries) * d.shape.q_heads * D);
    for (size_t row = 0; row < q.size() / D; ++row) {
      const float* c = &centers[(rng() % 64) * D];
      for (int64_t j = 0; j < D; ++j) q[row * D + j] = 0.25f * c[j] + 0.3f * normal(rng);
    }
  }
  d.description = absl::StrFormat(
      "SYNTHETIC data (no trace found): %d layers x %d tokens, %d q heads, %d kv heads, head dim "
      "%d, f32, 64 key clusters per layer",
      d.shape.layers, d.tokens, d.shape.q_heads, d.shape.kv_heads, d.shape.head_dim);
}

// Exact attention and top-k of every (layer, query, head) in float64.
struct Reference {
  std::vector<double> out;                // [layers][queries][q_heads][D]
  std::vector<std::vector<int64_t>> top;  // [layers*queries*q_heads] -> k positions
};

void ComputeReference(const DemoData& d, int top_k, Reference& ref) {
  const int L = d.shape.layers, Hq = d.shape.q_heads, g = d.shape.q_heads / d.shape.kv_heads;
  const int64_t D = d.shape.head_dim, N = d.tokens, Hkv = d.shape.kv_heads;
  ref.out.assign(size_t(L) * d.queries * Hq * D, 0.0);
  ref.top.assign(size_t(L) * d.queries * Hq, {});
  const double scale = 1.0 / std::sqrt(double(D));
  for (int l = 0; l < L; ++l) {
    std::vector<float> k(size_t(N * Hkv * D)), v(k.size());
    ToFloat(d.k[l].data(), d.shape.dtype, k.data(), k.size());
    ToFloat(d.v[l].data(), d.shape.dtype, v.data(), v.size());
    // float64 copies laid out so the inner loops are element-wise (they vectorise without
    // reassociating a reduction): keys transposed [kv head][D][N], values [kv head][N][D].
    std::vector<double> kt(k.size()), vd(v.size());
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t j = 0; j < D; ++j) {
          kt[(h * D + j) * N + i] = k[(i * Hkv + h) * D + j];
          vd[(h * N + i) * D + j] = v[(i * Hkv + h) * D + j];
        }
      }
    }
    auto work = [&](int first, int stride) {
      std::vector<double> s(N);
      std::vector<int64_t> idx(N);
      for (int qi = first; qi < d.queries; qi += stride) {
        for (int h = 0; h < Hq; ++h) {
          const float* q = &d.q[l][(size_t(qi) * Hq + h) * D];
          const int64_t kvh = h / g;
          std::fill(s.begin(), s.end(), 0.0);
          for (int64_t j = 0; j < D; ++j) {
            const double qj = double(q[j]) * scale;
            const double* kr = &kt[(kvh * D + j) * N];
            for (int64_t i = 0; i < N; ++i) s[i] += qj * kr[i];
          }
          const double mx = *std::max_element(s.begin(), s.end());
          double sum = 0;
          double* o = &ref.out[((size_t(l) * d.queries + qi) * Hq + h) * D];
          for (int64_t i = 0; i < N; ++i) {
            const double w = std::exp(s[i] - mx);
            sum += w;
            const double* vr = &vd[(kvh * N + i) * D];
            for (int64_t j = 0; j < D; ++j) o[j] += w * vr[j];
          }
          for (int64_t j = 0; j < D; ++j) o[j] /= sum;
          std::iota(idx.begin(), idx.end(), 0);
          const int64_t kk = std::min<int64_t>(top_k, N);
          std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(),
                            [&](int64_t a, int64_t b) { return s[a] > s[b]; });
          ref.top[(size_t(l) * d.queries + qi) * Hq + h].assign(idx.begin(), idx.begin() + kk);
        }
      }
    };
    const int threads = std::max(1u, std::min(4u, std::thread::hardware_concurrency()));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(work, t, threads);
    for (auto& t : pool) t.join();
  }
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int Run(const DemoOptions& options, Client& client, DemoData& d) {
  auto fail = [](const absl::Status& st) {
    std::fprintf(stderr, "demo: %s\n", st.ToString().c_str());
    return 1;
  };
  std::printf("data:     %s\n", d.description.c_str());
  std::printf("queries:  the last %d positions, each attending to all %lld tokens\n", d.queries,
              static_cast<long long>(d.tokens));
  auto opened = client.Open({d.shape, {}, "demo"});
  if (!opened.ok()) return fail(opened.status());
  const ContextId ctx = opened->id;

  auto t0 = Clock::now();
  const int64_t row = d.shape.TokenBytesPerLayer();
  for (int l = 0; l < d.shape.layers; ++l) {
    for (int64_t t = 0; t < d.tokens; t += options.append_chunk) {
      const int64_t n = std::min<int64_t>(options.append_chunk, d.tokens - t);
      absl::Status st = client.Append(ctx, l, n, d.k[l].subspan(t * row, n * row),
                                      d.v[l].subspan(t * row, n * row));
      if (!st.ok()) return fail(st);
    }
  }
  const double append_s = Seconds(t0);
  const double kv_mib = 2.0 * d.shape.layers * d.tokens * row / 1048576.0;
  std::printf("append:   %.1f MiB of K+V in %.3f s (%.0f MiB/s, %s)\n", kv_mib, append_s,
              kv_mib / append_s, client.uses_shared_memory() ? "shared memory" : "inline");
  t0 = Clock::now();
  if (absl::Status st = client.Seal(ctx); !st.ok()) return fail(st);
  auto info = client.Info(ctx);
  std::printf("seal:     %.3f s, %lld sealed segments, %.1f MiB in the store\n", Seconds(t0),
              info.ok() ? static_cast<long long>(info->sealed_segments) : -1LL,
              info.ok() ? info->bytes / 1048576.0 : -1.0);

  std::printf("exact:    computing the float64 reference ...\n");
  std::fflush(stdout);
  t0 = Clock::now();
  Reference ref;
  ComputeReference(d, options.top_k, ref);
  std::printf("          done in %.2f s\n", Seconds(t0));

  const int Hq = d.shape.q_heads;
  const int64_t D = d.shape.head_dim;
  std::vector<float> out(Hq * D), lse(Hq), scores(size_t(Hq) * options.top_k);
  std::vector<int64_t> positions(size_t(Hq) * options.top_k);
  std::vector<double> attend_us, retrieve_us, errors, recalls;
  int64_t scored = 0, total = 0, retrieved = 0, estimated = 0, clusters = 0;
  for (int l = 0; l < d.shape.layers; ++l) {
    for (int qi = 0; qi < d.queries; ++qi) {
      std::span<const float> q(&d.q[l][size_t(qi) * Hq * D], Hq * D);
      AttendStats as;
      auto t1 = Clock::now();
      if (absl::Status st = client.Attend(ctx, l, q, {}, out, lse, &as); !st.ok()) return fail(st);
      attend_us.push_back(Seconds(t1) * 1e6);
      retrieved += as.retrieved_clusters;
      estimated += as.estimated_clusters;
      clusters += as.total_clusters;
      RetrieveStats rs;
      RetrieveOptions ro;
      ro.k = options.top_k;
      t1 = Clock::now();
      if (absl::Status st = client.Retrieve(ctx, l, q, ro, positions, scores, &rs); !st.ok()) {
        return fail(st);
      }
      retrieve_us.push_back(Seconds(t1) * 1e6);
      scored += rs.keys_scored;
      total += rs.keys_total;
      for (int h = 0; h < Hq; ++h) {
        const double* exact = &ref.out[((size_t(l) * d.queries + qi) * Hq + h) * D];
        double num = 0, den = 0;
        for (int64_t j = 0; j < D; ++j) {
          num += (out[h * D + j] - exact[j]) * (out[h * D + j] - exact[j]);
          den += exact[j] * exact[j];
        }
        errors.push_back(std::sqrt(num / std::max(den, 1e-300)));
        const auto& top = ref.top[(size_t(l) * d.queries + qi) * Hq + h];
        int hit = 0;
        for (int i = 0; i < options.top_k; ++i) {
          hit += std::count(top.begin(), top.end(), positions[size_t(h) * options.top_k + i]) > 0;
        }
        recalls.push_back(double(hit) / top.size());
      }
    }
  }
  const double mean_err = std::accumulate(errors.begin(), errors.end(), 0.0) / errors.size();
  const double mean_recall = std::accumulate(recalls.begin(), recalls.end(), 0.0) / recalls.size();
  std::printf(
      "attend:   %zu calls (budget: server default), clusters retrieved %.2f%% + "
      "estimated %.2f%% of %lld\n",
      attend_us.size(), 100.0 * retrieved / std::max<int64_t>(1, clusters),
      100.0 * estimated / std::max<int64_t>(1, clusters),
      static_cast<long long>(clusters / std::max<size_t>(1, attend_us.size())));
  std::printf(
      "          output error vs exact (relative L2, per head): mean %.4f  p50 %.4f  "
      "p99 %.4f  max %.4f\n",
      mean_err, Percentile(errors, 0.5), Percentile(errors, 0.99), Percentile(errors, 1.0));
  std::printf("          latency (client round trip): p50 %.0f us  p99 %.0f us\n",
              Percentile(attend_us, 0.5), Percentile(attend_us, 0.99));
  std::printf(
      "retrieve: recall@%d vs exact top-%d: mean %.3f  p10 %.3f; keys scored %.2f%%; "
      "latency p50 %.0f us  p99 %.0f us\n",
      options.top_k, options.top_k, mean_recall, Percentile(recalls, 0.1),
      100.0 * scored / std::max<int64_t>(1, total), Percentile(retrieve_us, 0.5),
      Percentile(retrieve_us, 0.99));
  // Sanity: a budget of 100% must be exact attention (checks the whole path, not the index).
  std::vector<double> full_errors;
  for (int qi = 0; qi < std::min(d.queries, 16); ++qi) {
    std::span<const float> q(&d.q[0][size_t(qi) * Hq * D], Hq * D);
    if (absl::Status st = client.Attend(ctx, 0, q, {1.0, 0.0}, out, lse); !st.ok()) {
      return fail(st);
    }
    for (int h = 0; h < Hq; ++h) {
      const double* exact = &ref.out[(size_t(qi) * Hq + h) * D];
      double num = 0, den = 0;
      for (int64_t j = 0; j < D; ++j) {
        num += (out[h * D + j] - exact[j]) * (out[h * D + j] - exact[j]);
        den += exact[j] * exact[j];
      }
      full_errors.push_back(std::sqrt(num / std::max(den, 1e-300)));
    }
  }
  std::printf("check:    budget 100%% (exact path), layer 0, %zu heads: max relative error %.2e\n",
              full_errors.size(), Percentile(full_errors, 1.0));
  if (absl::Status st = client.Close(ctx); !st.ok()) return fail(st);
  return 0;
}

}  // namespace

int RunDemo(const DemoOptions& options) {
  const auto start = Clock::now();
  std::unique_ptr<LocalDaemon> daemon;
  std::string socket = options.socket_path;
  if (socket.empty()) {
    LocalDaemonOptions o;
    o.binary = options.kvwaved;
    o.log_path = absl::StrFormat("/tmp/kvwave-demo-%d.log", getpid());
    o.overrides = {"log.level=warn"};
    auto started = LocalDaemon::Start(o);
    if (!started.ok()) {
      std::fprintf(stderr, "demo: cannot start kvwaved: %s\n", started.status().ToString().c_str());
      return 1;
    }
    daemon = *std::move(started);
    socket = daemon->socket_path();
    std::printf("daemon:   started %s (pid %d) on %s with embedded defaults; log %s\n",
                FindKvwaved(options.kvwaved).c_str(), daemon->pid(), socket.c_str(),
                o.log_path.c_str());
  } else {
    std::printf("daemon:   connecting to %s\n", socket.c_str());
  }
  DemoData data;
  std::string prefix = options.trace;
#ifdef KVWAVE_SOURCE_DIR
  if (prefix.empty() && !options.synthetic) prefix = trace::DefaultTracePrefix(KVWAVE_SOURCE_DIR);
#endif
  if (!options.synthetic && !prefix.empty()) {
    if (absl::Status st = LoadTrace(prefix, options.queries, data); !st.ok()) {
      std::fprintf(stderr, "demo: %s\n", st.ToString().c_str());
      return 1;
    }
  } else {
    MakeSynthetic(options.queries, data);
  }
  ClientOptions co;
  co.socket_path = socket;
  co.shared_memory_bytes = size_t{32} << 20;
  co.client_name = "kvwave-demo";
  auto client = Client::Connect(co);
  if (!client.ok()) {
    std::fprintf(stderr, "demo: %s\n", client.status().ToString().c_str());
    return 1;
  }
  const int rc = Run(options, **client, data);
  client->reset();
  if (daemon) {
    absl::StatusOr<int> code = daemon->Stop(SIGTERM, 15000);
    std::printf("daemon:   stopped (SIGTERM), exit code %d\n", code.ok() ? *code : -1);
  }
  std::printf("total:    %.1f s\n", Seconds(start));
  return rc;
}

}  // namespace kvwave::client
