// kvwave-bench seal: bulk Append throughput into a context that seals a segment every
// `--segment` tokens (the k-means of each runs on the background seal threads) against one that
// never seals, in the same run, alternating (issue 16 item 3: the sealing one must reach >= 80%).
//
// Per round and mode: a fresh in-process engine and context, `--tokens` tokens appended to every
// layer in chunks of `--chunk` (layers interleaved, as a prefill does), timed from the first
// Append to the last one's return. Then, for the sealing mode, how many segments were already
// published when the appends returned, and how long Seal() took to finish the rest (it drains
// the background queue on the caller's thread).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/subcommand.h"
#include "config/dtype.h"
#include "engine/engine.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Options {
  int layers = 2, q_heads = 32, kv_heads = 8, dim = 128;
  int64_t tokens = 32768, chunk = 2048, segment = 8192;
  int rounds = 3;
  int seal_threads = 0;
};

struct Result {
  double append_s = 0, seal_s = 0;
  int64_t published_at_return = 0, segments = 0;
};

Result RunOnce(const Options& o, bool seals, const std::vector<std::byte>& k,
               const std::vector<std::byte>& v) {
  config::Settings s;
  s.memory_limit_bytes = int64_t{16} << 30;
  s.prefill_segment_tokens = seals ? o.segment : int64_t{1} << 20;  // 1M: never reached here
  s.seal_threads = o.seal_threads;
  auto engine = engine::Engine::Create(s).value();
  const store::ModelShape shape{o.layers, o.q_heads, o.kv_heads, o.dim, DType::kBF16};
  const engine::ContextId id = engine->Open({shape, {}, ""}).value().id;
  const int64_t tb = shape.TokenBytesPerLayer();
  Result r;
  const auto t0 = Clock::now();
  for (int64_t at = 0; at < o.tokens; at += o.chunk) {
    const int64_t n = std::min(o.chunk, o.tokens - at);
    for (int l = 0; l < o.layers; ++l) {
      const absl::Status st = engine->Append(id, l, n, std::span(k).subspan(at * tb, n * tb),
                                             std::span(v).subspan(at * tb, n * tb));
      if (!st.ok()) {
        std::fprintf(stderr, "append: %s\n", st.ToString().c_str());
        std::exit(1);
      }
    }
  }
  const auto t1 = Clock::now();
  r.append_s = Seconds(t0, t1);
  r.published_at_return = engine->Info(id).value().sealed_segments;
  if (seals) {
    // Seal() also seals the last partial segment; count only what the appends queued.
    const auto t2 = Clock::now();
    if (!engine->Seal(id).ok()) std::exit(1);
    r.seal_s = Seconds(t2, Clock::now());
  }
  r.segments = engine->Info(id).value().sealed_segments;
  (void)engine->Close(id);
  return r;
}

int RunSeal(int argc, char** argv) {
  Options o;
  CLI::App app{"kvwave-bench seal: bulk Append with background sealing vs never sealing"};
  app.add_option("--layers", o.layers);
  app.add_option("--q-heads", o.q_heads);
  app.add_option("--kv-heads", o.kv_heads);
  app.add_option("--dim", o.dim);
  app.add_option("--tokens", o.tokens, "tokens appended per layer");
  app.add_option("--chunk", o.chunk, "tokens per Append");
  app.add_option("--segment", o.segment, "store.prefill_segment_tokens of the sealing context");
  app.add_option("--rounds", o.rounds);
  app.add_option("--seal-threads", o.seal_threads, "attend.seal_threads (0 = default)");
  CLI11_PARSE(app, argc, argv);
  PrintEnvironmentHeader();
  const int64_t elems = o.tokens * o.kv_heads * o.dim;
  std::vector<float> f(elems);
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  std::vector<std::byte> k(elems * 2), v(elems * 2);
  for (auto& x : f) x = normal(rng);
  FromFloat(f.data(), DType::kBF16, k.data(), elems);
  for (auto& x : f) x = normal(rng);
  FromFloat(f.data(), DType::kBF16, v.data(), elems);
  const double gb = 2.0 * elems * 2 * o.layers / 1e9;  // K and V bytes of all layers
  std::printf(
      "# layers %d, kv heads %d, d %d, bf16; %lld tokens per layer in Appends of %lld; "
      "segment %lld; %.3f GB appended per run\n",
      o.layers, o.kv_heads, o.dim, static_cast<long long>(o.tokens),
      static_cast<long long>(o.chunk), static_cast<long long>(o.segment), gb);
  std::printf(
      "round,mode,append_s,append_GBps,segments_published_at_return,seal_drain_s,"
      "segments_total\n");
  std::vector<double> ratios;
  for (int round = 0; round < o.rounds; ++round) {
    // Alternate which mode goes first, so drift on a shared machine hits both.
    const bool seal_first = round % 2 == 0;
    Result rs, rn;
    for (int i = 0; i < 2; ++i) {
      const bool seals = (i == 0) == seal_first;
      Result r = RunOnce(o, seals, k, v);
      std::printf("%d,%s,%.4f,%.3f,%lld,%.3f,%lld\n", round, seals ? "seals" : "never", r.append_s,
                  gb / r.append_s, static_cast<long long>(r.published_at_return), r.seal_s,
                  static_cast<long long>(r.segments));
      std::fflush(stdout);
      (seals ? rs : rn) = r;
    }
    ratios.push_back(rn.append_s / rs.append_s);
  }
  std::sort(ratios.begin(), ratios.end());
  std::printf(
      "# append throughput, sealing / never sealing: median %.3f (min %.3f, max %.3f) "
      "over %zu rounds; bar >= 0.80\n",
      ratios[ratios.size() / 2], ratios.front(), ratios.back(), ratios.size());
  return 0;
}

const bool kRegistered = Register(
    {"seal", "bulk Append with background sealing vs a context that never seals", &RunSeal});

}  // namespace
}  // namespace kvwave::bench
