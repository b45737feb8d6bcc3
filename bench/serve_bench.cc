// kvwave-bench serve: the service boundary. N client processes x M requests of each operation
// against a private kvwaved, over shared memory and over TCP; the same calls made in-process on
// an Engine; memcpy bandwidth measured in the same run. One line per (transport, op): ops/s,
// p50/p99/p999 latency, errors, bandwidth where bytes move.
//
// Bars (issue 4): ping round trip over shared memory <= 20 us p50; bulk Append over shared memory
// >= 50% of memcpy bandwidth.
//
// Method: small ops get an untimed warm-up, then ping and info are timed in interleaved blocks of
// 100, so a burst of other load on the (shared) machine hits both alike; a run of 1,000 pings
// lasts only ~20 ms. Bulk appends: the first context of each run is reported on its own line
// (`*_first`: its tails may take fresh pages from the OS); the rows without the suffix are the
// steady state, with the daemon's host pool warm (store.host_pool_bytes).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/subcommand.h"
#include "config/settings.h"
#include "engine/engine.h"
#include "engine/finite.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"
#include "store/host_memory.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  int clients = 2;
  int requests = 200;
  int append_tokens = 2048;  // per bulk Append: 2048 x 8 heads x 128 x bf16 = 4 MiB of K (+4 V)
  std::string kvwaved;
  std::string csv;
  int io_threads = 0;                  // 0 = the daemon's default (rpc.io_threads)
  std::vector<std::string> overrides;  // settings for kvwaved and the in-process engine
};

// Shape of the bench contexts: 8 KV heads x 128, bf16 (a 70B-class layer).
constexpr int kLayers = 8, kQHeads = 32, kKvHeads = 8, kDim = 128;
constexpr int64_t kRowBytes = int64_t{kKvHeads} * kDim * 2;
constexpr int64_t kQueryTokens = 4096;

struct OpResult {
  std::vector<double> us;  // per-request latency
  int64_t errors = 0;
  double elapsed_s = 0;
  double bytes = 0;  // payload bytes moved (append: K+V)
};
using Results = std::map<std::string, OpResult>;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs `call` `n` times, recording latencies.
void Measure(OpResult& r, int n, double bytes_per_call, const std::function<bool()>& call) {
  const auto start = Clock::now();
  for (int i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    if (!call()) ++r.errors;
    r.us.push_back(Since(t0) * 1e6);
  }
  r.elapsed_s += Since(start);
  r.bytes += bytes_per_call * n;
}

std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = FloatToBf16(normal(rng));
  return v;
}

// The operations, written once against a "backend": the client or the engine.
template <typename Backend>
Results RunOps(Backend& b, const Config& cfg, uint32_t seed) {
  Results res;
  const int64_t chunk = cfg.append_tokens;
  const auto kv = RandomBf16(size_t(std::max<int64_t>(chunk, kQueryTokens)) * kRowBytes / 2, seed);
  const auto kv_bytes = std::as_bytes(std::span<const uint16_t>(kv));
  // A sealed context for the query operations.
  const uint64_t qctx = b.Open();
  b.Append(qctx, 0, kQueryTokens, kv_bytes.first(kQueryTokens * kRowBytes),
           kv_bytes.first(kQueryTokens * kRowBytes));
  b.Seal(qctx);
  std::vector<float> q(kQHeads * kDim), out(kQHeads * kDim), lse(kQHeads), scores(kQHeads * 100);
  std::mt19937 rng(seed);
  for (float& x : q) x = std::normal_distribution<float>(0, 0.5f)(rng);
  std::vector<int64_t> positions(kQHeads * 100), gpos(64);
  for (auto& p : gpos) p = rng() % kQueryTokens;
  std::vector<std::byte> gk(64 * kRowBytes), gv(64 * kRowBytes);
  const int n = cfg.requests;
  OpResult warmup;
  Measure(warmup, 100, 0, [&] { return b.Info(qctx); });
  for (int done = 0; done < n; done += 100) {
    const int block = std::min(100, n - done);
    if constexpr (Backend::kRemote) {
      Measure(res["ping"], block, 0, [&] { return b.Ping(); });
    }
    Measure(res["info"], block, 0, [&] { return b.Info(qctx); });
  }
  Measure(res["attend"], n, 0, [&] { return b.Attend(qctx, q, out, lse); });
  Measure(res["retrieve"], n, 0, [&] { return b.Retrieve(qctx, q, positions, scores); });
  Measure(res["gather64"], n, 128.0 * kRowBytes, [&] { return b.Gather(qctx, gpos, gk, gv); });
  // Bulk appends: a fresh context whenever a layer's tail would reach a segment (no sealing).
  auto run_appends = [&](const char* name, std::span<const std::byte> k,
                         std::span<const std::byte> v) {
    uint64_t ctx = b.Open();
    std::vector<int64_t> tokens(kLayers, 0);
    int layer = 0;
    const int count = std::max(8, n / 8);
    OpResult* r = &res[std::string(name) + "_first"];
    for (int i = 0; i < count; ++i) {
      if (tokens[layer] + chunk > 8192) {
        b.Close(ctx);
        ctx = b.Open();
        std::fill(tokens.begin(), tokens.end(), 0);
        r = &res[name];
      }
      Measure(*r, 1, 2.0 * chunk * kRowBytes, [&] { return b.Append(ctx, layer, chunk, k, v); });
      tokens[layer] += chunk;
      layer = (layer + 1) % kLayers;
    }
    b.Close(ctx);
  };
  run_appends("append", kv_bytes.first(chunk * kRowBytes), kv_bytes.first(chunk * kRowBytes));
  if constexpr (Backend::kRemote) {
    auto region = b.SharedBuffer();
    if (region.size() >= size_t(2 * chunk * kRowBytes)) {  // K/V already in the region
      std::memcpy(region.data(), kv_bytes.data(), chunk * kRowBytes);
      std::memcpy(region.data() + chunk * kRowBytes, kv_bytes.data(), chunk * kRowBytes);
      run_appends("append_zero_copy", region.first(chunk * kRowBytes),
                  region.subspan(chunk * kRowBytes, chunk * kRowBytes));
    }
  }
  b.Close(qctx);
  return res;
}

struct RemoteBackend {
  static constexpr bool kRemote = true;
  client::Client& c;
  uint64_t Open() {
    auto r = c.Open({{kLayers, kQHeads, kKvHeads, kDim, DType::kBF16}, {}, ""});
    return r.ok() ? r->id : 0;
  }
  bool Append(uint64_t ctx, int layer, int64_t n, std::span<const std::byte> k,
              std::span<const std::byte> v) {
    return c.Append(ctx, layer, n, k, v).ok();
  }
  void Seal(uint64_t ctx) { (void)c.Seal(ctx); }
  void Close(uint64_t ctx) { (void)c.Close(ctx); }
  bool Ping() { return c.Ping().ok(); }
  bool Info(uint64_t ctx) { return c.Info(ctx).ok(); }
  bool Attend(uint64_t ctx, std::span<const float> q, std::span<float> out, std::span<float> lse) {
    return c.Attend(ctx, 0, q, {}, out, lse).ok();
  }
  bool Retrieve(uint64_t ctx, std::span<const float> q, std::span<int64_t> p, std::span<float> s) {
    return c.Retrieve(ctx, 0, q, {}, p, s).ok();
  }
  bool Gather(uint64_t ctx, std::span<const int64_t> p, std::span<std::byte> k,
              std::span<std::byte> v) {
    return c.Gather(ctx, 0, p, k, v).ok();
  }
  std::span<std::byte> SharedBuffer() { return c.SharedBuffer(); }
};

struct LocalBackend {
  static constexpr bool kRemote = false;
  engine::Engine& e;
  uint64_t Open() {
    engine::OpenOptions o;
    o.shape = {kLayers, kQHeads, kKvHeads, kDim, DType::kBF16};
    auto r = e.Open(o);
    return r.ok() ? r->id : 0;
  }
  bool Append(uint64_t ctx, int layer, int64_t n, std::span<const std::byte> k,
              std::span<const std::byte> v) {
    return e.Append(ctx, layer, n, k, v).ok();
  }
  void Seal(uint64_t ctx) { (void)e.Seal(ctx); }
  void Close(uint64_t ctx) { (void)e.Close(ctx); }
  bool Info(uint64_t ctx) { return e.Info(ctx).ok(); }
  bool Attend(uint64_t ctx, std::span<const float> q, std::span<float> out, std::span<float> lse) {
    engine::AttendStats st;
    return e.Attend(ctx, 0, q, {}, out, lse, &st).ok();
  }
  bool Retrieve(uint64_t ctx, std::span<const float> q, std::span<int64_t> p, std::span<float> s) {
    engine::RetrieveStats st;
    return e.Retrieve(ctx, 0, q, {}, p, s, &st).ok();
  }
  bool Gather(uint64_t ctx, std::span<const int64_t> p, std::span<std::byte> k,
              std::span<std::byte> v) {
    return e.Gather(ctx, 0, p, k, v).ok();
  }
};

void WriteResults(const Results& r, const std::string& path) {
  std::ofstream f(path);
  for (const auto& [op, o] : r) {
    f << op << " " << o.errors << " " << o.elapsed_s << " " << o.bytes << " " << o.us.size();
    for (double u : o.us) f << " " << u;
    f << "\n";
  }
}

void ReadResults(const std::string& path, Results& into, std::map<std::string, double>& rate) {
  std::ifstream f(path);
  std::string op;
  while (f >> op) {
    OpResult o;
    size_t n;
    f >> o.errors >> o.elapsed_s >> o.bytes >> n;
    o.us.resize(n);
    for (double& u : o.us) f >> u;
    OpResult& agg = into[op];
    agg.errors += o.errors;
    agg.bytes += o.bytes;
    agg.elapsed_s = std::max(agg.elapsed_s, o.elapsed_s);
    agg.us.insert(agg.us.end(), o.us.begin(), o.us.end());
    rate[op] += o.elapsed_s > 0 ? n / o.elapsed_s : 0;  // clients run concurrently: rates add
  }
}

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

double MemcpyGBs() {
  const size_t bytes = size_t{64} << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 0;
  for (int i = 0; i < 10; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(i % 2 ? a.data() : b.data(), i % 2 ? b.data() : a.data(), bytes);
    best = std::max(best, bytes / Since(t0) / 1e9);
  }
  return best;
}

// The finite check Append runs on K and V (engine/finite.h), over one bulk Append's K+V of bf16
// values, best of 10, in GB/s (the same buffer size for memcpy, for scale).
std::pair<double, double> FiniteCheckGBs(size_t bytes) {
  std::vector<uint16_t> kv(bytes / 2);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = FloatToBf16(static_cast<float>(i % 1000) / 999.0f);
  std::vector<uint16_t> copy(kv.size());
  double check = 0, copied = 0;
  for (int i = 0; i < 10; ++i) {
    auto t0 = Clock::now();
    absl::Status st = engine::CheckFinite("kv", std::as_bytes(std::span(kv)), DType::kBF16);
    check = std::max(check, bytes / Since(t0) / 1e9);
    if (!st.ok()) std::abort();
    t0 = Clock::now();
    std::memcpy(copy.data(), kv.data(), bytes);
    copied = std::max(copied, bytes / Since(t0) / 1e9);
  }
  return {check, copied};
}

std::FILE* g_csv = nullptr;

void Print(const std::string& transport, const Results& r,
           const std::map<std::string, double>& rate) {
  for (const auto& [op, o] : r) {
    const double ops =
        rate.count(op) ? rate.at(op) : (o.elapsed_s > 0 ? o.us.size() / o.elapsed_s : 0);
    const double gbs = o.bytes > 0 && o.elapsed_s > 0 ? (o.bytes / o.elapsed_s / 1e9) : 0;
    std::printf("%-10s %-17s %8zu %10.0f %9.1f %9.1f %9.1f %7lld %8.2f\n", transport.c_str(),
                op.c_str(), o.us.size(), ops, Pct(o.us, 0.5), Pct(o.us, 0.99), Pct(o.us, 0.999),
                static_cast<long long>(o.errors), gbs);
    if (g_csv) {
      std::fprintf(g_csv, "%s,%s,%zu,%.1f,%.2f,%.2f,%.2f,%lld,%.3f\n", transport.c_str(),
                   op.c_str(), o.us.size(), ops, Pct(o.us, 0.5), Pct(o.us, 0.99), Pct(o.us, 0.999),
                   static_cast<long long>(o.errors), gbs);
    }
  }
}

// N client processes against the daemon over one transport; merged results.
Results RunClients(const Config& cfg, const client::ClientOptions& co,
                   std::map<std::string, double>& rate) {
  std::vector<pid_t> children;
  std::vector<std::string> files;
  for (int i = 0; i < cfg.clients; ++i) {
    files.push_back("/tmp/kvwave-serve-" + std::to_string(getpid()) + "-" + std::to_string(i));
    const pid_t pid = fork();
    if (pid == 0) {
      auto c = client::Client::Connect(co);
      if (!c.ok()) _exit(2);
      RemoteBackend b{**c};
      WriteResults(RunOps(b, cfg, 100 + i), files.back());
      _exit(0);
    }
    children.push_back(pid);
  }
  Results merged;
  for (size_t i = 0; i < children.size(); ++i) {
    int status = 0;
    waitpid(children[i], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "client %zu failed (status %d)\n", i, status);
    }
    ReadResults(files[i], merged, rate);
    std::remove(files[i].c_str());
  }
  return merged;
}

int RunServe(int argc, char** argv) {
  Config cfg;
  CLI::App app{"kvwave-bench serve: round trips and bandwidth through kvwaved"};
  app.add_option("--clients", cfg.clients, "client processes")->check(CLI::Range(1, 256));
  app.add_option("--requests", cfg.requests, "requests of each small op per client");
  app.add_option("--append-tokens", cfg.append_tokens, "tokens per bulk Append (<= 8192)")
      ->check(CLI::Range(1, 8192));
  app.add_option("--kvwaved", cfg.kvwaved, "kvwaved binary");
  app.add_option("--io-threads", cfg.io_threads, "kvwaved rpc.io_threads (0 = its default)");
  app.add_option("--csv", cfg.csv, "also write CSV here");
  app.add_option("--set", cfg.overrides,
                 "a setting for kvwaved and the in-process engine, section.key=value (repeatable)");
  CLI11_PARSE(app, argc, argv);
  PrintEnvironmentHeader();
  if (!cfg.csv.empty()) {
    g_csv = std::fopen(cfg.csv.c_str(), "w");
    if (g_csv) std::fprintf(g_csv, "transport,op,n,ops_per_s,p50_us,p99_us,p999_us,errors,GBps\n");
  }
  const double memcpy_gbs = MemcpyGBs();
  std::printf("# memcpy bandwidth (64 MiB, best of 10): %.2f GB/s\n", memcpy_gbs);
  const auto [check_gbs, kv_copy_gbs] = FiniteCheckGBs(size_t(2 * cfg.append_tokens * kRowBytes));
  std::printf(
      "# finite check of one bulk Append's K+V (bf16, best of 10): %.2f GB/s; memcpy of it %.2f "
      "GB/s\n",
      check_gbs, kv_copy_gbs);
  std::printf(
      "# shape: %d layers, %d q heads, %d kv heads, dim %d, bf16; bulk Append = %d tokens "
      "= %.1f MiB K+V; %d clients x %d requests\n",
      kLayers, kQHeads, kKvHeads, kDim, cfg.append_tokens,
      2.0 * cfg.append_tokens * kRowBytes / 1048576.0, cfg.clients, cfg.requests);
  const int port = 20000 + getpid() % 20000;
  client::LocalDaemonOptions dopt;
  dopt.binary = cfg.kvwaved;
  dopt.overrides = {"log.level=warn", "rpc.tcp_port=" + std::to_string(port),
                    "rpc.tcp_token=bench"};
  if (cfg.io_threads > 0)
    dopt.overrides.push_back("rpc.io_threads=" + std::to_string(cfg.io_threads));
  dopt.overrides.insert(dopt.overrides.end(), cfg.overrides.begin(), cfg.overrides.end());
  for (const std::string& o : cfg.overrides) std::printf("# setting: %s\n", o.c_str());
  auto daemon = client::LocalDaemon::Start(dopt);
  if (!daemon.ok()) {
    std::fprintf(stderr, "serve: %s\n", daemon.status().ToString().c_str());
    return 1;
  }
  std::printf("%-10s %-17s %8s %10s %9s %9s %9s %7s %8s\n", "transport", "op", "n", "ops/s",
              "p50_us", "p99_us", "p999_us", "errors", "GB/s");
  Results shm_results;
  for (const char* transport : {"shm", "tcp"}) {
    client::ClientOptions co;
    co.socket_path = (*daemon)->socket_path();
    co.shared_memory_bytes = size_t(2 * cfg.append_tokens * kRowBytes) + (8 << 20);
    if (std::string(transport) == "tcp") {
      co.tcp_port = port;
      co.token = "bench";
    }
    std::map<std::string, double> rate;
    Results r = RunClients(cfg, co, rate);
    Print(transport, r, rate);
    if (std::string(transport) == "shm") shm_results = r;
  }
  (*daemon).reset();
  absl::StatusOr<config::Settings> settings = config::LoadFromString("", cfg.overrides);
  // The engine's own host pool takes its idle limit (store.host_pool_bytes) from the settings.
  auto engine = settings.ok() ? engine::Engine::Create(*settings)
                              : absl::StatusOr<std::unique_ptr<engine::Engine>>(settings.status());
  if (engine.ok()) {
    LocalBackend b{**engine};
    Print("inprocess", RunOps(b, cfg, 7), {});
  }
  const double ping_p50 = Pct(shm_results["ping"].us, 0.5);
  const OpResult& zc = shm_results.count("append_zero_copy") ? shm_results["append_zero_copy"]
                                                             : shm_results["append"];
  const OpResult& cold = shm_results["append_first"];  // the daemon's first tails: fresh pages
  const double cold_gbs = cold.elapsed_s > 0 ? cold.bytes / cold.elapsed_s / 1e9 : 0;
  const double append_gbs = zc.elapsed_s > 0 ? zc.bytes / zc.elapsed_s / 1e9 : 0;
  const OpResult& ac = shm_results["append"];
  const double copy_gbs = ac.elapsed_s > 0 ? ac.bytes / ac.elapsed_s / 1e9 : 0;
  std::printf("# bar: ping round trip over shm p50 %.1f us (<= 20): %s\n", ping_p50,
              ping_p50 <= 20 ? "PASS" : "FAIL");
  std::printf(
      "# bar: bulk Append over shm %.2f GB/s zero-copy (%.2f GB/s staged) = %.0f%% of memcpy "
      "%.2f GB/s (>= 50%%): %s\n",
      append_gbs, copy_gbs, 100 * append_gbs / memcpy_gbs, memcpy_gbs,
      append_gbs >= 0.5 * memcpy_gbs ? "PASS" : "FAIL");
  std::printf(
      "# bulk Append over shm into the daemon's first context (fresh pages, staged): %.2f GB/s = "
      "%.0f%% of memcpy\n",
      cold_gbs, 100 * cold_gbs / memcpy_gbs);
  if (g_csv) std::fclose(g_csv);
  return 0;
}

const bool kRegistered = Register(
    {"serve", "round trips / bandwidth through kvwaved (shm, TCP) vs in-process", &RunServe});

}  // namespace
}  // namespace kvwave::bench
