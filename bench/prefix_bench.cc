// kvwave-bench prefix: serving a request over a cached long prefix vs uploading and indexing it,
// and reloading persisted prefix blocks from RocksDB vs the disk's sequential read speed.
//
// One run, one engine with persistence in --dir:
//   build   Open(token ids) + Append every layer + Seal + one Attend per layer  (what a request
//           without a cache pays)
//   attach  Open(same token ids) on the warm cache + one Attend per layer
//   reload  a new engine over the same RocksDB: Open(same token ids) reloads every block
//   disk    sequential read() of a file of the same size in --dir, with the same cache state
// Keys and values are synthetic (clustered Gaussian); the model shape is the real trace's model.
//
// --remote: node B attaching the prefix from a Redis Cluster (remote/remote_tier.h) vs
// prefilling and indexing it itself, in one run, with three engines that share nothing but the
// cluster (a private 3-master cluster on loopback unless --redis names one):
//   local   remote.mode=off: Open + Append + Seal + Attend          (B rebuilding it; run twice,
//           before and after A, the baseline is their mean)
//   A       remote.mode=readwrite: the same, blocks written behind; then Flush (the drain)
//   B       remote.mode=read, empty: Open(same ids) attaches from the cluster, appends the
//           recent suffix, Attend per layer (checked bit for bit against A's); with
//           remote.attach = index --attach-repeats times (fresh nodes, one after the other: every
//           sample, the median is the bar's number, the slowest is shown too), then once whole
// and A's bulk-Append rate against the local runs' (the write-behind must stay off it).
// That rate is then measured again as --append-pairs alternating pairs (remote on / off, the
// order swapped every pair, each on a fresh engine and context of the same data, in a namespace
// of its own so that no pair attaches an earlier one's blocks; a remote-on engine's write-behind
// is drained, untimed, before the next sample): every pair's ratio, the median (the bar's
// number) and min/max. --pair-tokens sets their prefix (default --tokens); --pairs-only skips
// the attach measurements; --pairs-null makes both samples of a pair remote-off (an A/A run: the
// method's own noise on this machine).
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "bench/subcommand.h"
#include "engine/engine.h"
#include "remote/local_cluster.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// CPU seconds (user + system) of this process so far.
double CpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
         u.ru_stime.tv_usec / 1e6;
}

// Minor page faults of this process so far (first touches of fresh pages).
int64_t MinorFaults() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// CPU seconds of the local cluster's redis-server processes so far (0 without one).
double RedisCpuSeconds(const remote::LocalRedisCluster* cluster) {
  if (cluster == nullptr) return 0;
  double total = 0;
  for (int n = 0; n < cluster->size(); ++n) {
    std::ifstream f("/proc/" + std::to_string(cluster->pid(n)) + "/stat");
    std::string line;
    std::getline(f, line);
    // Fields after the ")" of the command: state is field 3; utime, stime are 14 and 15.
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::string field;
    double utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
      if (i == 14) utime = std::stod(field);
      if (i == 15) stime = std::stod(field);
    }
    total += (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
  }
  return total;
}

// Tries to drop the page cache (root only); returns whether it worked.
bool DropPageCache() {
  sync();
  std::ofstream f("/proc/sys/vm/drop_caches");
  if (!f) return false;
  f << "3\n";
  f.flush();
  return static_cast<bool>(f);
}

double SequentialReadGBs(const std::string& path, int64_t bytes, bool cold) {
  {
    std::vector<char> chunk(8 << 20, 'x');
    std::ofstream out(path, std::ios::binary);
    for (int64_t w = 0; w < bytes; w += chunk.size()) out.write(chunk.data(), chunk.size());
  }
  sync();
  if (cold) DropPageCache();
  int fd = open(path.c_str(), O_RDONLY);
  std::vector<char> buf(8 << 20);
  auto t = Clock::now();
  int64_t total = 0;
  for (ssize_t r; (r = read(fd, buf.data(), buf.size())) > 0;) total += r;
  const double s = Since(t);
  close(fd);
  std::filesystem::remove(path);
  return total / s / 1e9;
}

// Where `perf record --control fifo:CTL` listens (empty: nowhere): enabled around each of B's
// index attaches only, so that a profile holds nothing else.
std::string g_perf_fifo;
void PerfControl(const char* what) {
  if (g_perf_fifo.empty()) return;
  std::ofstream f(g_perf_fifo);
  f << what << "\n";
}

struct PairOptions {
  int pairs = 5;       // alternating remote on / off pairs of A's bulk Append
  int64_t tokens = 0;  // their prefix (0: the run's --tokens)
  bool only = false;   // skip the attach measurements
  bool null = false;   // both samples remote off: the noise floor of the method
};

struct AttachOptions {
  int fetch_threads = 1;     // remote.fetch_threads of node B
  int repeats = 3;           // nodes B attaching with remote.attach = index, one after the other
  int64_t chunk_bytes = -1;  // remote.fetch_chunk_bytes of node B (-1: the default)
  int64_t quiet_ms = -1;     // remote.fetch_quiet_ms of node B (-1: the default)
};

int RunRemote(const config::Settings& base, const store::ModelShape& shape, int64_t tokens,
              const std::string& redis, int64_t max_value_bytes, const AttachOptions& attach,
              const PairOptions& pairs);

int Run(int argc, char** argv) {
  CLI::App app{"cached prefix attach vs rebuild; RocksDB reload vs disk; --remote: Redis Cluster"};
  int64_t tokens = 131072;
  int layers = 8, q_heads = 4, kv_heads = 1, head_dim = 128;
  std::string dir = "/tmp/kvwave-prefix-bench";
  bool remote = false;
  std::string redis;
  int64_t max_value_bytes = int64_t{8} << 20;
  app.add_option("--tokens", tokens, "prefix length");
  app.add_option("--layers", layers);
  app.add_option("--q-heads", q_heads);
  app.add_option("--kv-heads", kv_heads);
  app.add_option("--head-dim", head_dim);
  app.add_option("--dir", dir, "RocksDB directory (removed first)");
  app.add_flag("--remote", remote, "measure the Redis Cluster tier instead (node B attaching)");
  app.add_option("--redis", redis, "seed nodes of an existing cluster (default: start one)");
  app.add_option("--max-value-bytes", max_value_bytes, "remote.max_value_bytes");
  AttachOptions attach;
  app.add_option("--fetch-threads", attach.fetch_threads, "remote.fetch_threads of node B");
  app.add_option("--attach-repeats", attach.repeats,
                 "--remote: nodes B attaching (index), each fresh; the bar's number is the median")
      ->check(CLI::Range(1, 100));
  app.add_option("--fetch-chunk-bytes", attach.chunk_bytes, "remote.fetch_chunk_bytes of node B");
  app.add_option("--fetch-quiet-ms", attach.quiet_ms, "remote.fetch_quiet_ms of node B");
  app.add_option("--perf-fifo", g_perf_fifo,
                 "--remote: perf record --control fifo, enabled around B's index attaches");
  PairOptions pairs;
  app.add_option("--append-pairs", pairs.pairs,
                 "--remote: alternating on/off pairs of A's bulk Append (0: none)")
      ->check(CLI::Range(0, 1000));
  app.add_option("--pair-tokens", pairs.tokens,
                 "--remote: prefix of those pairs (default --tokens)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  app.add_flag("--pairs-only", pairs.only, "--remote: only the Append pairs, no attach");
  app.add_flag("--pairs-null", pairs.null, "--remote: both samples of a pair remote off (A/A)");
  CLI11_PARSE(app, argc, argv);
  PrintEnvironmentHeader();
  if (remote) {
    config::Settings settings;
    settings.memory_limit_bytes = int64_t{20} << 30;
    return RunRemote(settings, {layers, q_heads, kv_heads, head_dim, DType::kF16}, tokens, redis,
                     max_value_bytes, attach, pairs);
  }
  std::filesystem::remove_all(dir);
  config::Settings settings;
  settings.persist_path = dir;
  settings.durability = "async";
  settings.memory_limit_bytes = int64_t{20} << 30;
  store::ModelShape shape{layers, q_heads, kv_heads, head_dim, DType::kF16};
  std::printf("# shape %s, prefix %lld tokens, synthetic clustered keys\n",
              store::ToString(shape).c_str(), (long long)tokens);

  std::mt19937 rng(42);
  // The prefix plus the recent window, so that every block of the prefix is sealed and shared.
  const int64_t appended = tokens + settings.recent_tokens;
  std::vector<int32_t> ids(appended);
  for (auto& t : ids) t = static_cast<int32_t>(rng() % 8192);
  const int64_t row = int64_t{kv_heads} * head_dim;
  std::vector<float> centers(256 * row), kf(appended * row), vf(appended * row);
  std::normal_distribution<float> normal;
  for (auto& x : centers) x = normal(rng);
  for (int64_t t = 0; t < appended; ++t) {
    const float* c = &centers[(rng() % 256) * row];
    for (int64_t j = 0; j < row; ++j) {
      kf[t * row + j] = c[j] + 0.3f * normal(rng);
      vf[t * row + j] = normal(rng);
    }
  }
  std::vector<uint16_t> k(kf.size()), v(vf.size());
  FromFloat(kf.data(), DType::kF16, k.data(), k.size());
  FromFloat(vf.data(), DType::kF16, v.data(), v.size());
  std::vector<float> q(q_heads * head_dim), out(q.size()), lse(q_heads);
  for (auto& x : q) x = normal(rng);
  auto attend_all = [&](engine::Engine& e, engine::ContextId id) {
    for (int l = 0; l < layers; ++l) {
      if (!e.Attend(id, l, q, {}, out, lse, nullptr).ok()) std::abort();
    }
  };

  auto engine = engine::Engine::Create(settings).value();
  auto t = Clock::now();
  const engine::ContextId a = engine->Open({shape, ids}).value().id;
  for (int l = 0; l < layers; ++l) {
    if (!engine->Append(a, l, appended, std::as_bytes(std::span(k)), std::as_bytes(std::span(v)))
             .ok()) {
      std::fprintf(stderr, "append failed\n");
      return 1;
    }
  }
  if (!engine->Seal(a).ok()) return 1;
  attend_all(*engine, a);
  const double build_s = Since(t);

  t = Clock::now();
  engine::OpenResult b = engine->Open({shape, ids}).value();
  attend_all(*engine, b.id);
  const double attach_s = Since(t);
  if (!engine->Flush().ok()) return 1;
  const engine::EngineStats st = engine->Stats();
  const int64_t bytes = st.persist_bytes_written;
  engine.reset();

  const bool cold = DropPageCache();
  engine = engine::Engine::Create(settings).value();
  t = Clock::now();
  engine::OpenResult c = engine->Open({shape, ids}).value();
  const double reload_s = Since(t);
  const double disk = SequentialReadGBs(dir + "/seqread.tmp", bytes, cold);

  std::printf("%-34s %12s\n", "measure", "value");
  std::printf("%-34s %12.3f s\n", "build (upload + index + Attend)", build_s);
  std::printf("%-34s %12.4f s  (matched %lld tokens)\n", "attach (cached) + Attend", attach_s,
              (long long)b.matched_tokens);
  std::printf("%-34s %12.1f x\n", "attach speedup over build", build_s / attach_s);
  std::printf("%-34s %12.3f s  (matched %lld tokens, %lld blocks)\n", "reload from RocksDB",
              reload_s, (long long)c.matched_tokens, (long long)engine->Stats().prefix_reloads);
  std::printf("%-34s %12.2f GB/s (%.0f MB, page cache %s)\n", "reload throughput",
              bytes / reload_s / 1e9, bytes / 1e6, cold ? "dropped" : "warm: not root");
  std::printf("%-34s %12.2f GB/s\n", "disk sequential read, same size", disk);
  std::printf("%-34s %12.2f\n", "reload / disk", bytes / reload_s / 1e9 / disk);
  engine.reset();
  std::filesystem::remove_all(dir);
  return 0;
}

// Synthetic clustered K/V of `appended` tokens, as f16, and random token ids.
struct Workload {
  std::vector<int32_t> ids;
  std::vector<uint16_t> k, v;
  std::vector<float> q;
};

Workload MakeWorkload(const store::ModelShape& shape, int64_t appended) {
  std::mt19937 rng(42);
  Workload w;
  w.ids.resize(appended);
  for (auto& t : w.ids) t = static_cast<int32_t>(rng() % 8192);
  const int64_t row = int64_t{shape.kv_heads} * shape.head_dim;
  std::vector<float> centers(256 * row), kf(appended * row), vf(appended * row);
  std::normal_distribution<float> normal;
  for (auto& x : centers) x = normal(rng);
  for (int64_t t = 0; t < appended; ++t) {
    const float* c = &centers[(rng() % 256) * row];
    for (int64_t j = 0; j < row; ++j) {
      kf[t * row + j] = c[j] + 0.3f * normal(rng);
      vf[t * row + j] = normal(rng);
    }
  }
  w.k.resize(kf.size());
  w.v.resize(vf.size());
  FromFloat(kf.data(), DType::kF16, w.k.data(), w.k.size());
  FromFloat(vf.data(), DType::kF16, w.v.data(), w.v.size());
  w.q.resize(shape.q_heads * shape.head_dim);
  for (auto& x : w.q) x = normal(rng);
  return w;
}

// out and lse of one Attend per layer.
std::vector<float> AttendLayers(engine::Engine& e, engine::ContextId id,
                                const store::ModelShape& shape, const std::vector<float>& q) {
  std::vector<float> all, out(q.size()), lse(shape.q_heads);
  for (int l = 0; l < shape.layers; ++l) {
    if (!e.Attend(id, l, q, {}, out, lse, nullptr).ok()) std::abort();
    all.insert(all.end(), out.begin(), out.end());
    all.insert(all.end(), lse.begin(), lse.end());
  }
  return all;
}

struct BuildResult {
  double append_s = 0;  // the Append calls alone
  double build_s = 0;   // Open + Append + Seal + Attend
  double cpu_s = 0;     // this process's CPU seconds over the build
  std::vector<float> attend;
};

// What a node without a cache pays: Open(ids) + Append every layer + Seal + Attend per layer.
BuildResult Build(engine::Engine& e, const store::ModelShape& shape, const Workload& w) {
  const int64_t n = static_cast<int64_t>(w.ids.size());
  BuildResult r;
  const double cpu = CpuSeconds();
  auto t = Clock::now();
  engine::OpenOptions options;
  options.shape = shape;
  options.token_ids = w.ids;
  const engine::ContextId id = e.Open(options).value().id;
  auto ta = Clock::now();
  for (int l = 0; l < shape.layers; ++l) {
    if (!e.Append(id, l, n, std::as_bytes(std::span(w.k)), std::as_bytes(std::span(w.v))).ok()) {
      std::fprintf(stderr, "append failed\n");
      std::abort();
    }
  }
  r.append_s = Since(ta);
  if (!e.Seal(id).ok()) std::abort();
  r.attend = AttendLayers(e, id, shape, w.q);
  r.build_s = Since(t);
  r.cpu_s = CpuSeconds() - cpu;
  if (!e.Close(id).ok()) std::abort();
  return r;
}

// Node B (an empty engine, remote.mode = read) attaching the prefix from the cluster: Open,
// the recent suffix, one Attend per layer (first_*), then until the background fetch made every
// row local (all_*, from the Open), and one Attend per layer again.
struct Attached {
  int64_t matched = 0;
  double open_s = 0, suffix_s = 0, attend_s = 0;  // the parts of first_s
  double open_cpu = 0, open_redis_cpu = 0;        // CPU seconds of the Open
  int64_t open_faults = 0, first_faults = 0;      // minor page faults: Open; to first Attend
  double first_s = 0, first_cpu = 0, first_redis_cpu = 0;
  double first_bytes = 0, first_index_bytes = 0, first_demand_bytes = 0, first_behind_bytes = 0;
  int64_t first_ranges = 0;
  double all_s = 0, all_cpu = 0, all_redis_cpu = 0, all_bytes = 0;
  int64_t lost = 0, unavailable = 0;
  std::vector<float> attend, attend_after;
};

Attached AttachFromCluster(const config::Settings& settings, const store::ModelShape& shape,
                           const Workload& w, const remote::LocalRedisCluster* cluster) {
  Attached r;
  auto e = engine::Engine::Create(settings).value();
  const int64_t appended = static_cast<int64_t>(w.ids.size());
  const bool profiled = settings.remote_attach == "index";
  if (profiled) PerfControl("enable");
  const double cpu = CpuSeconds(), redis_cpu = RedisCpuSeconds(cluster);
  const int64_t faults = MinorFaults();
  auto t = Clock::now();
  engine::OpenOptions options;
  options.shape = shape;
  options.token_ids = w.ids;
  const engine::OpenResult b = e->Open(options).value();
  r.open_s = Since(t);
  r.open_faults = MinorFaults() - faults;
  r.open_cpu = CpuSeconds() - cpu;
  r.open_redis_cpu = RedisCpuSeconds(cluster) - redis_cpu;
  r.matched = b.matched_tokens;
  const int64_t suffix = appended - b.matched_tokens;
  const int64_t row = int64_t{shape.kv_heads} * shape.head_dim;
  for (int l = 0; l < shape.layers; ++l) {
    auto k = std::as_bytes(std::span(w.k)).subspan(b.matched_tokens * row * 2);
    auto v = std::as_bytes(std::span(w.v)).subspan(b.matched_tokens * row * 2);
    if (!e->Append(b.id, l, suffix, k, v).ok()) std::abort();
  }
  r.suffix_s = Since(t) - r.open_s;
  r.attend = AttendLayers(*e, b.id, shape, w.q);
  r.first_s = Since(t);
  r.attend_s = r.first_s - r.open_s - r.suffix_s;
  r.first_faults = MinorFaults() - faults;
  r.first_cpu = CpuSeconds() - cpu;
  r.first_redis_cpu = RedisCpuSeconds(cluster) - redis_cpu;
  if (profiled) PerfControl("disable");
  engine::EngineStats st = e->Stats();
  r.first_index_bytes = static_cast<double>(st.remote_bytes_read);
  r.first_demand_bytes = static_cast<double>(st.remote_kv_on_demand_bytes);
  r.first_behind_bytes = static_cast<double>(st.remote_kv_behind_bytes);
  r.first_bytes = r.first_index_bytes + r.first_demand_bytes + r.first_behind_bytes;
  r.first_ranges = st.remote_kv_on_demand_ranges;
  e->WaitRemoteFetches();
  r.all_s = Since(t);
  r.all_cpu = CpuSeconds() - cpu;
  r.all_redis_cpu = RedisCpuSeconds(cluster) - redis_cpu;
  st = e->Stats();
  r.all_bytes = static_cast<double>(st.remote_bytes_read + st.remote_kv_on_demand_bytes +
                                    st.remote_kv_behind_bytes);
  r.lost = st.remote_kv_lost_segments;
  r.unavailable = st.remote_kv_unavailable;
  r.attend_after = AttendLayers(*e, b.id, shape, w.q);
  return r;
}

// One sample of A's bulk Append: a fresh engine (remote.mode from `settings`), Open(ids) in
// namespace `ns`, Append every layer (timed alone: the bar's number), Seal (Open + Append + Seal
// timed too); a remote-on engine's write-behind is then drained, untimed, so that it does not
// run into the next sample.
struct AppendSample {
  double append_s = 0;         // the Append calls alone
  double build_s = 0;          // Open + Append + Seal
  int64_t blocks_at_end = 0;   // blocks registered (sealed in every layer) when Append returned
  int64_t written_at_end = 0;  // of them, written to the cluster by then
};

AppendSample SampleAppend(const config::Settings& settings, const store::ModelShape& shape,
                          const Workload& w, const std::string& ns) {
  auto e = engine::Engine::Create(settings).value();
  const int64_t n = static_cast<int64_t>(w.ids.size());
  AppendSample r;
  engine::OpenOptions options;
  options.shape = shape;
  options.token_ids = w.ids;
  options.prefix_namespace = ns;
  auto t = Clock::now();
  const engine::OpenResult opened = e->Open(options).value();
  if (opened.matched_tokens != 0) {
    std::fprintf(stderr, "append pair: namespace %s was not fresh\n", ns.c_str());
    std::abort();
  }
  auto ta = Clock::now();
  for (int l = 0; l < shape.layers; ++l) {
    if (!e->Append(opened.id, l, n, std::as_bytes(std::span(w.k)), std::as_bytes(std::span(w.v)))
             .ok()) {
      std::fprintf(stderr, "append failed\n");
      std::abort();
    }
  }
  r.append_s = Since(ta);
  const engine::EngineStats st = e->Stats();
  r.blocks_at_end = st.prefix_blocks_registered;
  r.written_at_end = st.remote_blocks_written;
  if (!e->Seal(opened.id).ok()) std::abort();
  r.build_s = Since(t);
  if (!e->Close(opened.id).ok()) std::abort();
  if (!e->Flush().ok()) std::fprintf(stderr, "remote flush reported an error\n");
  return r;
}

int RunAttach(const config::Settings& base, config::Settings remote_settings,
              const store::ModelShape& shape, int64_t tokens, int64_t max_value_bytes,
              const AttachOptions& attach, const remote::LocalRedisCluster* cluster);

double Median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  const size_t m = x.size() / 2;
  return x.size() % 2 == 1 ? x[m] : (x[m - 1] + x[m]) / 2;
}

// A's bulk Append rate, remote tier on (readwrite) vs off, as `pairs` alternating pairs.
// Returns the median ratio (rate on / rate off).
double AppendPairs(const config::Settings& off, const config::Settings& on,
                   const store::ModelShape& shape, int64_t tokens, int pairs) {
  const int64_t appended = tokens + off.recent_tokens;
  const Workload w = MakeWorkload(shape, appended);
  const double rows = static_cast<double>(appended) * shape.layers;
  const std::string tag = absl::StrCat("append-pair-", getpid(), "-",
                                       Clock::now().time_since_epoch().count() % 1000000007, "-");
  std::printf(
      "# A's bulk Append, remote tier on (readwrite, write-behind) vs off: %d alternating pairs "
      "(on/off, then off/on, ...), each sample a fresh engine and context of the same data, "
      "prefix %lld tokens (%lld rows), a namespace per sample; a remote-on engine's "
      "write-behind drained (untimed) before the next sample\n",
      pairs, (long long)tokens, (long long)rows);
  std::printf("%-5s %-7s %10s %10s %9s %12s %12s %9s %16s\n", "pair", "order", "on s", "off s",
              "ratio", "on rows/s", "off rows/s", "build", "blocks@Append");
  std::vector<double> ratios, build_ratios;
  for (int i = 0; i < pairs; ++i) {
    const bool on_first = i % 2 == 0;
    AppendSample s_on, s_off;
    const std::string ns = absl::StrCat(tag, i);
    if (on_first) {
      s_on = SampleAppend(on, shape, w, ns + "-on");
      s_off = SampleAppend(off, shape, w, ns + "-off");
    } else {
      s_off = SampleAppend(off, shape, w, ns + "-off");
      s_on = SampleAppend(on, shape, w, ns + "-on");
    }
    const double ratio = s_off.append_s / s_on.append_s;
    const double build_ratio = s_off.build_s / s_on.build_s;
    ratios.push_back(ratio);
    build_ratios.push_back(build_ratio);
    std::printf("%-5d %-7s %10.3f %10.3f %8.1f%% %12.0f %12.0f %8.1f%% %9lld/%lld w\n", i,
                on_first ? "on,off" : "off,on", s_on.append_s, s_off.append_s, 100 * ratio,
                rows / s_on.append_s, rows / s_off.append_s, 100 * build_ratio,
                (long long)s_on.blocks_at_end, (long long)s_on.written_at_end);
    std::fflush(stdout);
  }
  const double median = Median(ratios);
  std::printf("%-44s %12.1f %%  (min %.1f %%, max %.1f %%, %d pairs)\n",
              "A: Append rate on/off, median of pairs", 100 * median,
              100 * *std::min_element(ratios.begin(), ratios.end()),
              100 * *std::max_element(ratios.begin(), ratios.end()), pairs);
  std::printf("%-44s %12.1f %%  (min %.1f %%, max %.1f %%)\n",
              "A: Open+Append+Seal rate on/off, median", 100 * Median(build_ratios),
              100 * *std::min_element(build_ratios.begin(), build_ratios.end()),
              100 * *std::max_element(build_ratios.begin(), build_ratios.end()));
  std::printf("%-44s %12s  (bar: median >= 90 %%)\n", "A: Append bar",
              median >= 0.9 ? "PASS" : "FAIL");
  return median;
}

int RunRemote(const config::Settings& base, const store::ModelShape& shape, int64_t tokens,
              const std::string& redis, int64_t max_value_bytes, const AttachOptions& attach,
              const PairOptions& pairs) {
  const int64_t pair_tokens = pairs.tokens > 0 ? pairs.tokens : tokens;
  const double kv_bytes = 2.0 * (pairs.only ? pair_tokens : std::max(tokens, pair_tokens)) *
                          shape.layers * shape.kv_heads * shape.head_dim * 2;
  std::unique_ptr<remote::LocalRedisCluster> cluster;
  std::string seeds = redis;
  if (seeds.empty()) {
    remote::LocalClusterOptions o;
    o.maxmemory_bytes = static_cast<int64_t>(kv_bytes * 2.5 / o.masters) + (int64_t{256} << 20);
    auto c = remote::LocalRedisCluster::Start(o);
    if (!c.ok()) {
      std::fprintf(stderr, "cannot start a Redis Cluster: %s\n", c.status().ToString().c_str());
      return 1;
    }
    cluster = *std::move(c);
    seeds = cluster->seeds();
    std::printf(
        "# redis cluster: 3 masters on loopback (%s), maxmemory %lld MB each, "
        "allkeys-lru\n",
        seeds.c_str(), (long long)(o.maxmemory_bytes >> 20));
  }
  config::Settings remote_settings = base;
  remote_settings.remote_redis = seeds;
  remote_settings.remote_max_value_bytes = max_value_bytes;
  remote_settings.remote_queue_bytes = int64_t{64} << 30;  // measure, never drop
  remote_settings.remote_command_timeout_ms = 10000;
  config::Settings node_a = remote_settings;
  node_a.remote_mode = "readwrite";
  const int rc = pairs.only ? 0
                            : RunAttach(base, remote_settings, shape, tokens, max_value_bytes,
                                        attach, cluster.get());
  if (pairs.pairs > 0) {
    std::printf("# shape %s, remote.max_value_bytes %lld%s\n", store::ToString(shape).c_str(),
                (long long)max_value_bytes,
                pair_tokens != tokens ? " (the pairs use a shorter prefix than --tokens)" : "");
    if (pairs.null) {
      std::printf("# NULL RUN (--pairs-null): the 'on' samples below are remote OFF too\n");
    }
    AppendPairs(base, pairs.null ? base : node_a, shape, pair_tokens, pairs.pairs);
  }
  return rc;
}

// The attach measurements (the file comment's local / A / B runs) over the cluster.
int RunAttach(const config::Settings& base, config::Settings remote_settings,
              const store::ModelShape& shape, int64_t tokens, int64_t max_value_bytes,
              const AttachOptions& attach, const remote::LocalRedisCluster* cluster) {
  const int64_t appended = tokens + base.recent_tokens;
  const double kv_bytes = 2.0 * tokens * shape.layers * shape.kv_heads * shape.head_dim * 2;
  std::printf(
      "# shape %s, prefix %lld tokens (KV %.0f MB), synthetic clustered keys, "
      "remote.max_value_bytes %lld\n",
      store::ToString(shape).c_str(), (long long)tokens, kv_bytes / 1e6,
      (long long)max_value_bytes);
  const Workload w = MakeWorkload(shape, appended);

  auto build_locally = [&] {
    auto e = engine::Engine::Create(base).value();
    return Build(*e, shape, w);
  };
  const BuildResult local1 = build_locally();
  BuildResult a;
  double drain_s = 0;
  engine::EngineStats a_stats;
  {
    remote_settings.remote_mode = "readwrite";
    auto e = engine::Engine::Create(remote_settings).value();
    a = Build(*e, shape, w);
    auto t = Clock::now();
    if (!e->Flush().ok()) std::fprintf(stderr, "remote flush reported an error\n");
    drain_s = Since(t);
    a_stats = e->Stats();
  }
  const BuildResult local2 = build_locally();

  remote_settings.remote_mode = "read";
  remote_settings.remote_fetch_threads = attach.fetch_threads;
  if (attach.chunk_bytes >= 0) remote_settings.remote_fetch_chunk_bytes = attach.chunk_bytes;
  if (attach.quiet_ms >= 0) remote_settings.remote_fetch_quiet_ms = attach.quiet_ms;
  // B attaching with remote.attach = index (the default), `repeats` fresh nodes one after the
  // other: the bar's number is the median of their attach + suffix + first Attend of every
  // layer; then until every row is local.
  remote_settings.remote_attach = "index";
  std::vector<Attached> lazies;
  for (int i = 0; i < attach.repeats; ++i) {
    lazies.push_back(AttachFromCluster(remote_settings, shape, w, cluster));
  }
  std::vector<size_t> by_time(lazies.size());
  for (size_t i = 0; i < by_time.size(); ++i) by_time[i] = i;
  std::sort(by_time.begin(), by_time.end(),
            [&](size_t x, size_t y) { return lazies[x].first_s < lazies[y].first_s; });
  // The median sample (the lower middle one of an even count).
  const Attached& lazy = lazies[by_time[(by_time.size() - 1) / 2]];
  // The same with remote.attach = whole (every byte before Open returns), for comparison.
  remote_settings.remote_attach = "whole";
  const Attached whole = AttachFromCluster(remote_settings, shape, w, cluster);
  auto same_bits = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  bool same = same_bits(whole.attend, a.attend);
  for (const Attached& l : lazies) {
    same = same && same_bits(l.attend, a.attend) && same_bits(l.attend_after, a.attend) &&
           l.matched == tokens;
  }

  const double local_build = (local1.build_s + local2.build_s) / 2;
  const double local_append = (local1.append_s + local2.append_s) / 2;
  const double rows = static_cast<double>(appended) * shape.layers;
  std::printf("%-44s %12s\n", "measure", "value");
  std::printf("%-44s %12.3f s  (runs %.3f, %.3f)\n", "B rebuilds: Open+Append+Seal+Attend, local",
              local_build, local1.build_s, local2.build_s);
  const double local_cpu = (local1.cpu_s + local2.cpu_s) / 2;
  auto report = [&](const char* name, const Attached& r) {
    std::printf("%-44s %12.4f s  (Open %.4f s, matched %lld of %lld tokens)\n",
                absl::StrCat("B attach(", name, ") + suffix + Attend").c_str(), r.first_s, r.open_s,
                (long long)r.matched, (long long)tokens);
    std::printf("%-44s %12.4f s  (suffix Append %.4f s, first Attend of %d layers %.4f s)\n",
                "  after the Open", r.suffix_s + r.attend_s, r.suffix_s, shape.layers, r.attend_s);
    std::printf(
        "%-44s %12.3f s  (kvwave %.3f s + redis-server %.3f s; kvwave page faults: %lld "
        "in the Open, %lld to the first Attend)\n",
        "  CPU time of the Open", r.open_cpu + r.open_redis_cpu, r.open_cpu, r.open_redis_cpu,
        (long long)r.open_faults, (long long)r.first_faults);
    std::printf("%-44s %12.1f x\n", absl::StrCat("  speed-up over rebuild, wall").c_str(),
                local_build / r.first_s);
    std::printf("%-44s %12.3f s  (kvwave %.3f s + redis-server %.3f s; rebuild %.3f s)\n",
                "  CPU time to first Attend", r.first_cpu + r.first_redis_cpu, r.first_cpu,
                r.first_redis_cpu, local_cpu);
    std::printf("%-44s %12.1f x\n", "  speed-up over rebuild, CPU time",
                local_cpu / (r.first_cpu + r.first_redis_cpu));
    std::printf(
        "%-44s %12.0f MB  (attach %.0f MB, on demand %.0f MB in %lld GETRANGE, behind "
        "%.0f MB)\n",
        "  bytes moved by the first Attend", r.first_bytes / 1e6, r.first_index_bytes / 1e6,
        r.first_demand_bytes / 1e6, (long long)r.first_ranges, r.first_behind_bytes / 1e6);
    std::printf("%-44s %12.3f s  (CPU %.3f s: kvwave %.3f + redis-server %.3f; %.0f MB moved)\n",
                "  until every row is local", r.all_s, r.all_cpu + r.all_redis_cpu, r.all_cpu,
                r.all_redis_cpu, r.all_bytes / 1e6);
    std::printf("%-44s %12lld / %lld\n", "  lost / unavailable row fetches", (long long)r.lost,
                (long long)r.unavailable);
  };
  std::printf("%-44s", absl::StrCat("B attach(index) samples, ", lazies.size(), " nodes").c_str());
  for (const Attached& l : lazies) std::printf(" %.4f", l.first_s);
  std::printf(" s  (Open:");
  for (const Attached& l : lazies) std::printf(" %.4f", l.open_s);
  std::printf("; page faults to the first Attend:");
  for (const Attached& l : lazies) std::printf(" %lld", (long long)l.first_faults);
  std::printf(")\n");
  const Attached& slowest = lazies[by_time.back()];
  std::printf("%-44s %12.1f x  (slowest sample %.4f s; median below)\n",
              "  speed-up over rebuild, wall, slowest", local_build / slowest.first_s,
              slowest.first_s);
  report("index", lazy);
  report("whole", whole);
  std::printf("%-44s %12s\n", "B's Attend == A's, bit for bit (both modes)", same ? "yes" : "NO");
  std::printf("%-44s %12.0f MB  (%lld blocks, %lld dropped, %lld errors)\n", "bytes written by A",
              a_stats.remote_bytes_written / 1e6, (long long)a_stats.remote_blocks_written,
              (long long)a_stats.remote_queue_dropped, (long long)a_stats.remote_write_errors);
  std::printf("%-44s %12.3f s\n", "A: write-behind drain after its build", drain_s);
  std::printf("%-44s %12.3f s  (%.2f x local)\n", "A: Open+Append+Seal+Attend, remote on",
              a.build_s, a.build_s / local_build);
  std::printf("%-44s %12.0f rows/s  (local %.0f rows/s)\n", "A: bulk Append rate, remote on",
              rows / a.append_s, rows / local_append);
  std::printf("%-44s %12.1f %%  (one sample: the bar's number is the pairs' median)\n",
              "A: Append rate vs local", 100.0 * local_append / a.append_s);
  std::printf("%-44s %12.1f %%\n", "A: build rate vs local", 100.0 * local_build / a.build_s);
  return same && whole.matched == tokens ? 0 : 1;
}

const bool kRegistered =
    Register({"prefix", "cached-prefix attach vs rebuild; RocksDB reload vs disk", &Run});

}  // namespace
}  // namespace kvwave::bench
