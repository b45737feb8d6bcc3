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
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/subcommand.h"
#include "engine/engine.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
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

int Run(int argc, char** argv) {
  CLI::App app{"cached prefix attach vs rebuild; RocksDB reload vs disk"};
  int64_t tokens = 131072;
  int layers = 8, q_heads = 4, kv_heads = 1, head_dim = 128;
  std::string dir = "/tmp/kvwave-prefix-bench";
  app.add_option("--tokens", tokens, "prefix length");
  app.add_option("--layers", layers);
  app.add_option("--q-heads", q_heads);
  app.add_option("--kv-heads", kv_heads);
  app.add_option("--head-dim", head_dim);
  app.add_option("--dir", dir, "RocksDB directory (removed first)");
  CLI11_PARSE(app, argc, argv);
  PrintEnvironmentHeader();
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

const bool kRegistered =
    Register({"prefix", "cached-prefix attach vs rebuild; RocksDB reload vs disk", &Run});

}  // namespace
}  // namespace kvwave::bench
