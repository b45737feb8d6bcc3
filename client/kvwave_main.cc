// kvwave: command-line client of kvwaved. ping, stats, contexts, drop, demo.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/demo.h"
#include "kvwave/client.h"

namespace kvwave::client {
namespace {

struct Common {
  std::string socket_path = "/tmp/kvwaved.sock";
  std::string host = "127.0.0.1";
  int port = 0;
  std::string token;
  std::vector<std::string> credentials;
  std::string credential_file;
};

// Tokens one per line (blank lines and lines starting with '#' skipped): keeps them out of argv.
absl::Status ReadCredentialFile(const std::string& path, std::vector<std::string>& out) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return absl::NotFoundError("cannot open credential file " + path);
  char line[4096];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    std::string token(line);
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
    if (!token.empty() && token[0] != '#') out.push_back(std::move(token));
  }
  std::fclose(f);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Client>> Dial(const Common& c) {
  ClientOptions o;
  o.socket_path = c.socket_path;
  o.tcp_host = c.host;
  o.tcp_port = c.port;
  o.token = c.token;
  o.credentials = c.credentials;
  if (!c.credential_file.empty()) {
    if (absl::Status st = ReadCredentialFile(c.credential_file, o.credentials); !st.ok()) {
      return st;
    }
  }
  o.shared_memory_bytes = 1 << 20;
  o.client_name = "kvwave-cli";
  return Client::Connect(o);
}

int Fail(const absl::Status& st) {
  std::fprintf(stderr, "kvwave: %s\n", st.ToString().c_str());
  return 1;
}

int Ping(const Common& c, int count) {
  auto client = Dial(c);
  if (!client.ok()) return Fail(client.status());
  std::vector<double> us;
  for (int i = 0; i < count; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (absl::Status st = (*client)->Ping(); !st.ok()) return Fail(st);
    us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  std::printf(
      "pong from kvwaved: session %llu, %s, %d pings, round trip p50 %.1f us, min %.1f us\n",
      static_cast<unsigned long long>((*client)->session_id()),
      (*client)->uses_shared_memory() ? "shared memory" : "inline tensors", count,
      us[us.size() / 2], us.front());
  return 0;
}

int Stats(const Common& c, bool prometheus) {
  auto client = Dial(c);
  if (!client.ok()) return Fail(client.status());
  auto s = (*client)->Stats();
  if (!s.ok()) return Fail(s.status());
  if (prometheus) {
    std::fputs(s->prometheus_text.c_str(), stdout);
    return 0;
  }
  std::printf("uptime %.1f s  sessions %lld (total %lld)  contexts %lld  in flight %lld\n",
              s->uptime_s, static_cast<long long>(s->sessions),
              static_cast<long long>(s->sessions_total), static_cast<long long>(s->contexts),
              static_cast<long long>(s->in_flight));
  std::printf(
      "memory %.1f / %.1f MiB  rss %.1f MiB  segments sealed %lld  tokens appended %lld  "
      "frames rejected %lld\n",
      s->memory_used_bytes / 1048576.0, s->memory_limit_bytes / 1048576.0, s->rss_bytes / 1048576.0,
      static_cast<long long>(s->segments_sealed), static_cast<long long>(s->tokens_appended),
      static_cast<long long>(s->frames_rejected));
  std::printf("host pool: %.1f MiB idle (limit %.1f MiB, not in memory)  hits %lld  misses %lld\n",
              s->host_pool_idle_bytes / 1048576.0, s->host_pool_limit_bytes / 1048576.0,
              static_cast<long long>(s->host_pool_hits),
              static_cast<long long>(s->host_pool_misses));
  std::printf(
      "attention backend: %s  device %d  gpu pool %.1f / %.1f MiB  hits %lld  misses %lld  "
      "pcie %.1f MiB  segments on gpu %lld\n",
      s->attention_backend.c_str(), s->gpu_device, s->gpu_pool_used_bytes / 1048576.0,
      s->gpu_pool_bytes / 1048576.0, static_cast<long long>(s->gpu_hits),
      static_cast<long long>(s->gpu_misses), s->gpu_pcie_bytes / 1048576.0,
      static_cast<long long>(s->gpu_segments_resident));
  std::printf(
      "gpu clients: registrations %lld  mappings %lld  events %lld  device calls %lld  "
      "errors %lld\n",
      static_cast<long long>(s->gpu_device_registrations),
      static_cast<long long>(s->gpu_ipc_mappings), static_cast<long long>(s->gpu_ipc_events),
      static_cast<long long>(s->gpu_device_calls), static_cast<long long>(s->gpu_device_errors));
  std::printf("%-14s %10s %8s %10s %10s %10s %12s %12s\n", "op", "count", "errors", "p50 us",
              "p99 us", "p999 us", "bytes in", "bytes out");
  for (const OpStats& o : s->ops) {
    std::printf("%-14s %10llu %8llu %10.1f %10.1f %10.1f %12llu %12llu\n", o.op.c_str(),
                static_cast<unsigned long long>(o.count), static_cast<unsigned long long>(o.errors),
                o.p50_us, o.p99_us, o.p999_us, static_cast<unsigned long long>(o.bytes_in),
                static_cast<unsigned long long>(o.bytes_out));
  }
  return 0;
}

int Contexts(const Common& c) {
  auto client = Dial(c);
  if (!client.ok()) return Fail(client.status());
  auto list = (*client)->ListContexts();
  if (!list.ok()) return Fail(list.status());
  std::printf("%-20s %-8s %-24s %10s %10s %8s %12s\n", "id", "session", "shape (L/Hq/Hkv/D/type)",
              "tokens", "segments", "graphs", "bytes");
  for (const ContextInfo& i : *list) {
    const int64_t tokens =
        i.tokens_per_layer.empty()
            ? 0
            : *std::max_element(i.tokens_per_layer.begin(), i.tokens_per_layer.end());
    const std::string shape =
        std::to_string(i.shape.layers) + "/" + std::to_string(i.shape.q_heads) + "/" +
        std::to_string(i.shape.kv_heads) + "/" + std::to_string(i.shape.head_dim) + "/" +
        std::string(DTypeName(i.shape.dtype));
    // graphs: sealed segments with a RetrievalAttention graph, "-" for a context without
    // prefill queries (wave index only).
    const std::string graphs = i.has_queries ? std::to_string(i.graph_segments) : "-";
    std::printf("%-20llu %-8llu %-24s %10lld %10lld %8s %12lld\n",
                static_cast<unsigned long long>(i.id),
                static_cast<unsigned long long>(i.session_id), shape.c_str(),
                static_cast<long long>(tokens), static_cast<long long>(i.sealed_segments),
                graphs.c_str(), static_cast<long long>(i.bytes));
  }
  std::printf("%zu context(s)\n", list->size());
  return 0;
}

int Drop(const Common& c, uint64_t id) {
  auto client = Dial(c);
  if (!client.ok()) return Fail(client.status());
  if (absl::Status st = (*client)->Drop(id); !st.ok()) return Fail(st);
  std::printf("dropped context %llu\n", static_cast<unsigned long long>(id));
  return 0;
}

int Main(int argc, char** argv) {
  CLI::App app{"kvwave: client of the kvwave KV-cache store daemon"};
  app.require_subcommand(1);
  Common common;
  app.add_option("--socket", common.socket_path, "kvwaved Unix socket")->capture_default_str();
  app.add_option("--host", common.host, "TCP host (with --port)");
  app.add_option("--port", common.port, "TCP port (0 = use the Unix socket)");
  app.add_option("--token", common.token, "TCP shared secret");
  app.add_option("--credential", common.credentials,
                 "trust-model token (trust.admin_token, a namespace's write/read token); "
                 "repeatable; visible in ps: prefer --credential-file");
  app.add_option("--credential-file", common.credential_file,
                 "file of trust-model tokens, one per line");

  int count = 10;
  auto* ping = app.add_subcommand("ping", "check that kvwaved answers; print the round trip");
  ping->add_option("-n,--count", count, "number of pings")->check(CLI::PositiveNumber);
  bool prometheus = false;
  auto* stats = app.add_subcommand("stats", "per-operation counts and latency, memory, sessions");
  stats->add_flag("--prometheus", prometheus, "print the Prometheus text instead");
  auto* contexts = app.add_subcommand(
      "contexts", "list open contexts (every session's with an administrative credential)");
  uint64_t drop_id = 0;
  auto* drop = app.add_subcommand(
      "drop", "close a context of any session (needs an administrative credential)");
  drop->add_option("id", drop_id, "context id")->required();

  DemoOptions demo_options;
  bool demo_connect = false;
  auto* demo = app.add_subcommand(
      "demo", "start kvwaved, load a trace, Append + Seal + Attend, report error/recall/latency");
  demo->add_flag("--connect", demo_connect, "use the kvwaved on --socket instead of starting one");
  demo->add_option("--kvwaved", demo_options.kvwaved, "kvwaved binary to start");
  demo->add_option("--trace", demo_options.trace, "trace prefix (PREFIX_{q,k,v}.npy)");
  demo->add_flag("--synthetic", demo_options.synthetic, "use synthetic data, not a trace");
  demo->add_option("--queries", demo_options.queries, "last positions used as queries")
      ->check(CLI::Range(1, 4096));
  demo->add_option("--k", demo_options.top_k, "k of Retrieve / recall@k")
      ->check(CLI::Range(1, 4096));
  CLI11_PARSE(app, argc, argv);

  if (*ping) return Ping(common, count);
  if (*stats) return Stats(common, prometheus);
  if (*contexts) return Contexts(common);
  if (*drop) return Drop(common, drop_id);
  if (demo_connect) demo_options.socket_path = common.socket_path;
  return RunDemo(demo_options);
}

}  // namespace
}  // namespace kvwave::client

int main(int argc, char** argv) { return kvwave::client::Main(argc, argv); }
