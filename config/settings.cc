#include "config/settings.h"

#include <cmath>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "config/status_macros.h"
#include "config/trust_settings.h"
#include "toml.hpp"

namespace kvwave::config {
namespace {

using Member = std::variant<int64_t Settings::*, double Settings::*, bool Settings::*,
                            std::string Settings::*>;

struct Entry {
  Key key;
  Member member;
};

constexpr double kI64Max = 9.0e18;

// The table. Order = print order. Bounds are inclusive.
const std::vector<Entry>& Table() {
  using T = Key::Type;
  static const std::vector<Entry> table = {
      {{"store.memory_limit_bytes",
        T::kInt,
        int64_t{8} << 30,
        1 << 20,
        kI64Max,
        {},
        false,
        "host bytes the store may hold (KV, indexes); an append past it gets RESOURCE_EXHAUSTED"},
       &Settings::memory_limit_bytes},
      {{"store.host_pool_bytes",
        T::kInt,
        int64_t{1} << 30,
        0,
        kI64Max,
        {},
        true,
        "freed KV blocks (>= 64 KiB) kept resident for reuse, at most this many bytes; not charged "
        "to store.memory_limit_bytes, reported in stats (0 = give every block back)"},
       &Settings::host_pool_bytes},
      {{"store.pinned_memory",
        T::kString,
        std::string("auto"),
        0,
        0,
        {"auto", "on", "off"},
        false,
        "host KV in pinned, GPU-mapped memory (cudaHostAlloc): auto = when kvwaved is built with "
        "CUDA and a GPU is present; on = required (start-up fails otherwise); off = never"},
       &Settings::pinned_memory},
      {{"store.prefill_segment_tokens",
        T::kInt,
        int64_t{8192},
        64,
        1 << 20,
        {},
        false,
        "tokens per sealed segment during prefill"},
       &Settings::prefill_segment_tokens},
      {{"store.decode_segment_tokens",
        T::kInt,
        int64_t{1024},
        64,
        1 << 20,
        {},
        false,
        "tokens per sealed segment after prefill (decoded tokens)"},
       &Settings::decode_segment_tokens},
      {{"store.page_tokens",
        T::kInt,
        int64_t{8},
        1,
        256,
        {},
        false,
        "tokens per page; clusters are whole pages"},
       &Settings::page_tokens},
      {{"store.sink_tokens",
        T::kInt,
        int64_t{4},
        0,
        1024,
        {},
        false,
        "first tokens of a context always attended exactly (steady zone)"},
       &Settings::sink_tokens},
      {{"store.recent_tokens",
        T::kInt,
        int64_t{64},
        0,
        1 << 16,
        {},
        false,
        "latest tokens always attended exactly (steady zone); never sealed"},
       &Settings::recent_tokens},
      {{"index.tokens_per_cluster",
        T::kInt,
        int64_t{16},
        1,
        4096,
        {},
        false,
        "average tokens per wave-index cluster"},
       &Settings::tokens_per_cluster},
      {{"index.kmeans_iterations",
        T::kInt,
        int64_t{10},
        0,
        1000,
        {},
        false,
        "spherical k-means iterations per segment"},
       &Settings::kmeans_iterations},
      {{"index.kmeans_kernel",
        T::kString,
        std::string("own"),
        0,
        0,
        {"own", "faiss"},
        false,
        "k-means implementation: own (SIMD + TBB) or faiss"},
       &Settings::kmeans_kernel},
      {{"index.graph",
        T::kString,
        std::string("off"),
        0,
        0,
        {"off", "on"},
        false,
        "RetrievalAttention graph per sealed segment, from the queries appended with its tokens"},
       &Settings::graph},
      {{"index.graph_queries",
        T::kInt,
        int64_t{4096},
        0,
        int64_t{1} << 24,
        {},
        false,
        "prefill queries sampled per segment graph (0 = all held)"},
       &Settings::graph_queries},
      {{"index.graph_pivots",
        T::kInt,
        int64_t{16},
        1,
        4096,
        {},
        false,
        "graph: each sampled query's best keys that become pivots"},
       &Settings::graph_pivots},
      {{"index.graph_degree", T::kInt, int64_t{32}, 1, 256, {}, false, "graph: out-degree bound M"},
       &Settings::graph_degree},
      {{"index.graph_beam",
        T::kInt,
        int64_t{128},
        1,
        1 << 16,
        {},
        true,
        "default beam (search queue per segment) of Retrieve with method = graph"},
       &Settings::graph_beam},
      {{"attend.method",
        T::kString,
        std::string("retroinfer"),
        0,
        0,
        {"retroinfer", "retrievalattention"},
        true,
        "default Attend: retroinfer (tripartite over the wave index) or retrievalattention "
        "(steady zone + the graph's top-k tokens, exact; needs index.graph = on and queries)"},
       &Settings::attend_method},
      {{"attend.graph_top_k",
        T::kInt,
        int64_t{100},
        1,
        1 << 16,
        {},
        true,
        "retrievalattention: tokens the graphs retrieve per query head, attended exactly"},
       &Settings::graph_top_k},
      {{"attend.retrieval_budget",
        T::kDouble,
        0.018,
        0.0,
        1.0,
        {},
        true,
        "default fraction of clusters attended exactly (retrieval zone)"},
       &Settings::retrieval_budget},
      {{"attend.estimation_budget",
        T::kDouble,
        1.0,
        0.0,
        1.0,
        {},
        true,
        "default fraction of clusters estimated from centroid and value sum, capped at what the "
        "retrieval budget leaves (1 = every cluster not retrieved)"},
       &Settings::estimation_budget},
      {{"attend.rank",
        T::kString,
        std::string("auto"),
        0,
        0,
        {"auto", "centroid", "two_pass"},
        false,
        "ranking of the retrieval zone: centroid (q.c per cluster), two_pass (the top "
        "rank_overfetch x r clusters by centroid re-ranked by their best member key; CPU backend "
        "only) or auto (two_pass on the CPU backend, centroid on the GPU)"},
       &Settings::rank},
      {{"attend.rank_overfetch",
        T::kDouble,
        2.0,
        1.0,
        64.0,
        {},
        false,
        "two_pass: clusters whose member keys are scored, as a multiple of the retrieval zone"},
       &Settings::rank_overfetch},
      {{"attend.estimation_spread",
        T::kString,
        std::string("off"),
        0,
        0,
        {"off", "on"},
        false,
        "on: each estimated cluster's weight also counts the spread of its member keys, "
        "e^{scale^2 |q|^2 s / 2} (s: their mean per-dimension variance about the centroid; the "
        "centroid's e^{q.c} alone under-counts them); CPU backend only. Off by default: it helped "
        "at 8K and hurt at 16K (README, Quality)"},
       &Settings::estimation_spread},
      {{"attend.compute_threads",
        T::kInt,
        int64_t{0},
        0,
        1024,
        {},
        false,
        "threads of the compute arena (0 = one per core)"},
       &Settings::compute_threads},
      {{"attend.seal_threads",
        T::kInt,
        int64_t{0},
        0,
        256,
        {},
        false,
        "background threads that index sealed segments (k-means), at low priority "
        "(0 = max(1, cores / 4))"},
       &Settings::seal_threads},
      {{"gpu.mode",
        T::kString,
        std::string("auto"),
        0,
        0,
        {"auto", "on", "off"},
        false,
        "attention backend: auto = the GPU when kvwaved is built with CUDA and a device is "
        "present, else the CPU; on = the GPU (start-up fails without one); off = the CPU"},
       &Settings::gpu_mode},
      {{"gpu.device",
        T::kInt,
        int64_t{0},
        0,
        1024,
        {},
        false,
        "CUDA device index of the GPU backend"},
       &Settings::gpu_device},
      {{"gpu.cache_fraction",
        T::kDouble,
        0.05,
        0.0,
        1.0,
        {},
        false,
        "the GPU page pool's size as a fraction of the resident KV (ignored when "
        "gpu.cache_bytes > 0)"},
       &Settings::gpu_cache_fraction},
      {{"gpu.cache_bytes",
        T::kInt,
        int64_t{0},
        0,
        kI64Max,
        {},
        false,
        "the GPU page pool's size in bytes (0 = use gpu.cache_fraction)"},
       &Settings::gpu_cache_bytes},
      {{"rpc.socket_path",
        T::kString,
        std::string("/tmp/kvwaved.sock"),
        0,
        0,
        {},
        false,
        "Unix socket path (filesystem permissions are the access control)"},
       &Settings::socket_path},
      {{"rpc.tcp_port",
        T::kInt,
        int64_t{0},
        0,
        65535,
        {},
        false,
        "TCP port, on rpc.tcp_bind (0 = TCP off)"},
       &Settings::tcp_port},
      {{"rpc.tcp_token",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "shared secret a TCP client must present at handshake (required when TCP is on)"},
       &Settings::tcp_token},
      {{"rpc.max_frame_bytes",
        T::kInt,
        int64_t{256} << 20,
        4096,
        int64_t{1} << 32,
        {},
        false,
        "largest frame accepted; larger frames close the connection"},
       &Settings::max_frame_bytes},
      {{"rpc.io_threads",
        T::kInt,
        int64_t{1},
        1,
        256,
        {},
        false,
        "Asio io threads (they only move bytes; compute runs in the TBB arena)"},
       &Settings::io_threads},
      {{"rpc.io_poll_us",
        T::kInt,
        int64_t{50},
        0,
        100000,
        {},
        false,
        "after handling an event an io thread keeps polling (yielding the CPU) this long before "
        "it sleeps in epoll: a request arriving meanwhile needs no wake-up (0 = sleep at once)"},
       &Settings::io_poll_us},
      {{"rpc.metrics_port",
        T::kInt,
        int64_t{0},
        0,
        65535,
        {},
        false,
        "HTTP port of the Prometheus endpoint, on rpc.metrics_bind (0 = off)"},
       &Settings::metrics_port},
      {{"rpc.default_deadline_ms",
        T::kInt,
        int64_t{30000},
        1,
        3600000,
        {},
        true,
        "deadline of a request that names none"},
       &Settings::default_deadline_ms},
      {{"rpc.max_sessions",
        T::kInt,
        int64_t{4096},
        1,
        1 << 20,
        {},
        true,
        "concurrent client sessions; more are refused at handshake"},
       &Settings::max_sessions},
      // rpc limits (issue 15): what a peer can make kvwaved hold, and for how long.
      {{"rpc.tcp_bind",
        T::kString,
        std::string("127.0.0.1"),
        0,
        0,
        {},
        false,
        "address the TCP listener binds: an IPv4 or IPv6 literal (0.0.0.0 or :: = every "
        "interface; keep loopback or a private interface)"},
       &Settings::tcp_bind},
      {{"rpc.metrics_bind",
        T::kString,
        std::string("127.0.0.1"),
        0,
        0,
        {},
        false,
        "address the Prometheus endpoint binds (it has no authentication)"},
       &Settings::metrics_bind},
      {{"rpc.metrics_max_connections",
        T::kInt,
        int64_t{16},
        1,
        4096,
        {},
        false,
        "concurrent connections to the Prometheus endpoint; more are closed at accept"},
       &Settings::metrics_max_connections},
      {{"rpc.preauth_max_frame_bytes",
        T::kInt,
        int64_t{64} << 10,
        1024,
        int64_t{16} << 20,
        {},
        false,
        "largest frame accepted before Hello succeeds (what an unauthenticated peer can make "
        "kvwaved buffer per connection)"},
       &Settings::preauth_max_frame_bytes},
      {{"rpc.handshake_timeout_ms",
        T::kInt,
        int64_t{10000},
        1,
        3600000,
        {},
        false,
        "a connection whose Hello has not succeeded this long after accept is closed"},
       &Settings::handshake_timeout_ms},
      {{"rpc.idle_timeout_ms",
        T::kInt,
        int64_t{0},
        0,
        int64_t{7} * 24 * 3600 * 1000,
        {},
        false,
        "a session with no request in flight, no reply queued and no frame received for this "
        "long is closed (0 = never)"},
       &Settings::idle_timeout_ms},
      {{"rpc.max_queued_reply_bytes",
        T::kInt,
        int64_t{64} << 20,
        int64_t{1} << 16,
        int64_t{1} << 40,
        {},
        false,
        "per connection: bytes of replies computed or being computed and not yet read by the "
        "client; past it requests wait before they run (one always may run)"},
       &Settings::max_queued_reply_bytes},
      {{"rpc.max_in_flight_per_connection",
        T::kInt,
        int64_t{256},
        1,
        65536,
        {},
        false,
        "per connection: requests computed at once; further pipelined frames wait unread"},
       &Settings::max_in_flight_per_connection},
      {{"rpc.max_region_bytes",
        T::kInt,
        int64_t{64} << 30,
        4096,
        int64_t{1} << 46,
        {},
        false,
        "largest shared-memory region one session may pass at Hello (it is mapped, so it costs "
        "address space even when sparse)"},
       &Settings::max_region_bytes},
      {{"rpc.max_mapped_bytes",
        T::kInt,
        int64_t{1} << 40,
        4096,
        int64_t{1} << 46,
        {},
        false,
        "shared-memory regions of all sessions together; a Hello past it gets "
        "RESOURCE_EXHAUSTED"},
       &Settings::max_mapped_bytes},
      {{"persist.path",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "RocksDB directory for sealed segments (empty = no persistence)"},
       &Settings::persist_path},
      {{"persist.durability",
        T::kString,
        std::string("async"),
        0,
        0,
        {"none", "async", "sync"},
        false,
        "none: never flushed; async: written behind; sync: acknowledged after fsync"},
       &Settings::durability},
      {{"remote.redis",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "seed nodes of the Redis Cluster of the remote tier, \"host:port,host:port\" (the rest "
        "of the cluster is learnt from CLUSTER SLOTS)"},
       &Settings::remote_redis},
      {{"remote.mode",
        T::kString,
        std::string("off"),
        0,
        0,
        {"off", "read", "readwrite"},
        false,
        "remote tier: off; read = Open also attaches prefix blocks found in the cluster; "
        "readwrite = and blocks this daemon seals are written behind to it"},
       &Settings::remote_mode},
      {{"remote.connect_timeout_ms",
        T::kInt,
        int64_t{200},
        1,
        60000,
        {},
        false,
        "longest wait to connect (and authenticate) to a cluster node"},
       &Settings::remote_connect_timeout_ms},
      {{"remote.command_timeout_ms",
        T::kInt,
        int64_t{1000},
        1,
        600000,
        {},
        false,
        "longest wait for any read or write of a command or reply; a node that passes it is "
        "treated as down (local-only for its blocks)"},
       &Settings::remote_command_timeout_ms},
      {{"remote.down_retry_ms",
        T::kInt,
        int64_t{2000},
        10,
        3600000,
        {},
        false,
        "a node that failed is not asked again for this long (calls on its slots fail at once)"},
       &Settings::remote_down_retry_ms},
      {{"remote.queue_bytes",
        T::kInt,
        int64_t{1} << 30,
        0,
        kI64Max,
        {},
        false,
        "write-behind queue bound (segment bytes of blocks waiting to be written); a block "
        "sealed while it is full is not written (counted), never waited for"},
       &Settings::remote_queue_bytes},
      {{"remote.max_value_bytes",
        T::kInt,
        int64_t{8} << 20,
        4096,
        int64_t{512} << 20,
        {},
        false,
        "largest value written to Redis; a segment's bytes are cut into parts of at most this "
        "(Redis refuses values over 512 MB)"},
       &Settings::remote_max_value_bytes},
      {{"remote.attach",
        T::kString,
        std::string("index"),
        0,
        0,
        {"index", "whole"},
        false,
        "how Open attaches a block from the cluster: index = its meta index and sinks now, its "
        "key/value rows on demand (the clusters an Attend retrieves) and in the background; "
        "whole = every byte before Open returns (always so under the CUDA backend)"},
       &Settings::remote_attach},
      {{"remote.fetch_threads",
        T::kInt,
        int64_t{1},
        0,
        64,
        {},
        false,
        "background threads that fetch the rows of blocks attached with remote.attach = index "
        "(0: rows come only on demand)"},
       &Settings::remote_fetch_threads},
      {{"remote.fetch_chunk_bytes",
        T::kInt,
        int64_t{512} << 10,
        4096,
        int64_t{512} << 20,
        {},
        false,
        "key/value bytes one background row read asks for (whole clusters): an on-demand read "
        "waits for at most one such read, on the node and for a cluster it holds"},
       &Settings::remote_fetch_chunk_bytes},
      {{"remote.fetch_quiet_ms",
        T::kInt,
        int64_t{20},
        0,
        60000,
        {},
        false,
        "background row reads pause while an attach or an on-demand row read runs, and for "
        "this long after the last one (so they do not compete with an attach and the first "
        "Attend of every layer after it)"},
       &Settings::remote_fetch_quiet_ms},
      {{"remote.user",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "Redis ACL user (empty = default); an ACL user per namespace can fence tenants off by "
        "key pattern kvw:<namespace>:*"},
       &Settings::remote_user},
      {{"remote.password",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "Redis password (empty = no AUTH)"},
       &Settings::remote_password},
      {{"log.level",
        T::kString,
        std::string("info"),
        0,
        0,
        {"trace", "debug", "info", "warn", "error", "off"},
        true,
        "log level of every subsystem"},
       &Settings::log_level},
      // trust: see rpc/auth.h and the README's "Trust model"; namespace bindings are the
      // [trust.namespace.NAME] tables of config/trust_settings.h.
      {{"trust.admin_uids",
        T::kString,
        std::string("self"),
        0,
        0,
        {},
        false,
        "Unix-socket peer uids (SO_PEERCRED) with administrative rights: list or drop any "
        "context; \"1000, 1001\", \"self\" = kvwaved's own uid, \"\" = none"},
       &Settings::admin_uids},
      {{"trust.admin_token",
        T::kString,
        std::string(),
        0,
        0,
        {},
        false,
        "a Hello credential (Unix socket or TCP) with administrative rights; empty = none"},
       &Settings::admin_token},
      {{"trust.unlisted_namespaces",
        T::kString,
        std::string("per_uid"),
        0,
        0,
        {"per_uid", "shared", "off"},
        false,
        "prefix namespaces without a [trust.namespace.NAME] table: per_uid = shared only among "
        "Unix peers of one uid (TCP sessions form one more scope); shared = every session reads "
        "and writes them (no protection from poisoning); off = not shared at all"},
       &Settings::unlisted_namespaces},
  };
  return table;
}

const Entry* Find(absl::string_view name) {
  for (const Entry& e : Table()) {
    if (e.key.name == name) return &e;
  }
  return nullptr;
}

absl::Status CheckBounds(const Key& key, double v) {
  if (!(v >= key.min && v <= key.max)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "setting ", key.name, " = ", v, " is out of range [", key.min, ", ", key.max, "]"));
  }
  return absl::OkStatus();
}

// Stores a typed value into `s` after checking type, bounds and choices.
absl::Status Assign(const Entry& e, const Value& value, Settings& s) {
  const Key& key = e.key;
  auto wrong_type = [&] {
    return absl::InvalidArgumentError(absl::StrCat("setting ", key.name, " has the wrong type"));
  };
  switch (key.type) {
    case Key::Type::kInt: {
      const int64_t* v = std::get_if<int64_t>(&value);
      if (v == nullptr) return wrong_type();
      KVWAVE_RETURN_IF_ERROR(CheckBounds(key, static_cast<double>(*v)));
      s.*std::get<int64_t Settings::*>(e.member) = *v;
      return absl::OkStatus();
    }
    case Key::Type::kDouble: {
      double v;
      if (const double* d = std::get_if<double>(&value)) {
        v = *d;
      } else if (const int64_t* i = std::get_if<int64_t>(&value)) {
        v = static_cast<double>(*i);
      } else {
        return wrong_type();
      }
      KVWAVE_RETURN_IF_ERROR(CheckBounds(key, v));
      s.*std::get<double Settings::*>(e.member) = v;
      return absl::OkStatus();
    }
    case Key::Type::kBool: {
      const bool* v = std::get_if<bool>(&value);
      if (v == nullptr) return wrong_type();
      s.*std::get<bool Settings::*>(e.member) = *v;
      return absl::OkStatus();
    }
    case Key::Type::kString: {
      const std::string* v = std::get_if<std::string>(&value);
      if (v == nullptr) return wrong_type();
      if (!key.choices.empty() &&
          std::find(key.choices.begin(), key.choices.end(), *v) == key.choices.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("setting ", key.name, " = '", *v,
                         "' is not one of: ", absl::StrJoin(key.choices, ", ")));
      }
      s.*std::get<std::string Settings::*>(e.member) = *v;
      return absl::OkStatus();
    }
  }
  return wrong_type();
}

// Parses override text according to the key's type.
absl::StatusOr<Value> ParseText(const Key& key, absl::string_view text) {
  switch (key.type) {
    case Key::Type::kInt: {
      int64_t v;
      if (absl::SimpleAtoi(text, &v)) return Value(v);
      break;
    }
    case Key::Type::kDouble: {
      double v;
      if (absl::SimpleAtod(text, &v)) return Value(v);
      break;
    }
    case Key::Type::kBool: {
      bool v;
      if (absl::SimpleAtob(text, &v)) return Value(v);
      break;
    }
    case Key::Type::kString:
      return Value(std::string(text));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("setting ", key.name, ": cannot parse '", text, "'"));
}

absl::StatusOr<Value> FromToml(const Key& key, const toml::value& v) {
  if (v.is_integer()) return Value(static_cast<int64_t>(v.as_integer()));
  if (v.is_floating()) return Value(static_cast<double>(v.as_floating()));
  if (v.is_boolean()) return Value(v.as_boolean());
  if (v.is_string()) return Value(static_cast<std::string>(v.as_string()));
  return absl::InvalidArgumentError(absl::StrCat("setting ", key.name, " has the wrong type"));
}

absl::Status ApplyToml(const toml::value& root, Settings& s) {
  if (!root.is_table()) return absl::InvalidArgumentError("config: top level is not a table");
  for (const auto& [section, body] : root.as_table()) {
    if (!body.is_table()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown setting '", section, "'"));
    }
    for (const auto& [name, v] : body.as_table()) {
      std::string full = absl::StrCat(section, ".", name);
      if (absl::StrCat(full, ".") == kNamespaceTablePrefix) {
        KVWAVE_RETURN_IF_ERROR(ApplyNamespaceToml(v, s));
        continue;
      }
      const Entry* e = Find(full);
      if (e == nullptr) return absl::InvalidArgumentError("unknown setting '" + full + "'");
      KVWAVE_ASSIGN_OR_RETURN(Value value, FromToml(e->key, v));
      KVWAVE_RETURN_IF_ERROR(Assign(*e, value, s));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyOverrides(std::span<const std::string> overrides, Settings& s) {
  for (const std::string& o : overrides) {
    size_t eq = o.find('=');
    if (eq == std::string::npos) {
      return absl::InvalidArgumentError("override '" + o + "' is not key=value");
    }
    std::string name = o.substr(0, eq);
    if (absl::StartsWith(name, kNamespaceTablePrefix)) {
      KVWAVE_RETURN_IF_ERROR(ApplyNamespaceOverride(name, o.substr(eq + 1), s));
      continue;
    }
    const Entry* e = Find(name);
    if (e == nullptr) return absl::InvalidArgumentError("unknown setting '" + name + "'");
    KVWAVE_ASSIGN_OR_RETURN(Value value, ParseText(e->key, o.substr(eq + 1)));
    KVWAVE_RETURN_IF_ERROR(Assign(*e, value, s));
  }
  return absl::OkStatus();
}

// Cross-key rules that one key's bounds cannot express.
absl::Status ValidateTogether(const Settings& s) {
  if (s.tcp_port != 0 && s.tcp_token.empty()) {
    return absl::InvalidArgumentError("rpc.tcp_port is set but rpc.tcp_token is empty");
  }
  if (s.remote_mode != "off" && s.remote_redis.empty()) {
    return absl::InvalidArgumentError("remote.mode is " + s.remote_mode +
                                      " but remote.redis names no seed node");
  }
  if (s.sink_tokens >= s.prefill_segment_tokens) {
    return absl::InvalidArgumentError(
        "store.sink_tokens must be below store.prefill_segment_tokens");
  }
  KVWAVE_RETURN_IF_ERROR(ValidateTrust(s));
  return absl::OkStatus();
}

std::string Render(const Settings& s, const Entry& e) {
  return std::visit(
      [&](auto member) -> std::string {
        const auto& v = s.*member;
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, std::string>) {
          return absl::StrCat("\"", v, "\"");
        } else if constexpr (std::is_same_v<V, bool>) {
          return v ? "true" : "false";
        } else {
          return absl::StrCat(v);
        }
      },
      e.member);
}

}  // namespace

std::span<const Key> AllKeys() {
  static const std::vector<Key> keys = [] {
    std::vector<Key> k;
    for (const Entry& e : Table()) k.push_back(e.key);
    return k;
  }();
  return keys;
}

absl::StatusOr<Settings> LoadFromString(absl::string_view toml_text,
                                        std::span<const std::string> overrides) {
  Settings s;
  if (!toml_text.empty()) {
    toml::value root;
    try {
      std::istringstream in{std::string(toml_text)};
      root = toml::parse(in, "config");
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat("config does not parse: ", e.what()));
    }
    KVWAVE_RETURN_IF_ERROR(ApplyToml(root, s));
  }
  KVWAVE_RETURN_IF_ERROR(ApplyOverrides(overrides, s));
  KVWAVE_RETURN_IF_ERROR(ValidateTogether(s));
  return s;
}

absl::StatusOr<Settings> Load(absl::string_view toml_path, std::span<const std::string> overrides) {
  Settings s;
  if (!toml_path.empty()) {
    toml::value root;
    try {
      root = toml::parse(std::string(toml_path));
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("config ", toml_path, " does not load: ", e.what()));
    }
    KVWAVE_RETURN_IF_ERROR(ApplyToml(root, s));
  }
  KVWAVE_RETURN_IF_ERROR(ApplyOverrides(overrides, s));
  KVWAVE_RETURN_IF_ERROR(ValidateTogether(s));
  return s;
}

std::vector<std::string> ApplyReloadable(const Settings& fresh, Settings& current) {
  std::vector<std::string> changed;
  for (const Entry& e : Table()) {
    if (!e.key.reloadable || Render(fresh, e) == Render(current, e)) continue;
    std::visit([&](auto member) { current.*member = fresh.*member; }, e.member);
    changed.emplace_back(e.key.name);
  }
  return changed;
}

std::string PrintDefaults() {
  Settings defaults;
  std::string out = "# kvwave settings: every key with its default.\n";
  std::string section;
  for (const Entry& e : Table()) {
    absl::string_view name = e.key.name;
    size_t dot = name.find('.');
    std::string sec(name.substr(0, dot));
    if (sec != section) {
      absl::StrAppend(&out, "\n[", sec, "]\n");
      section = sec;
    }
    std::string bounds;
    if (e.key.type == Key::Type::kInt || e.key.type == Key::Type::kDouble) {
      bounds = absl::StrCat(" range [", e.key.min, ", ", e.key.max, "]");
    } else if (!e.key.choices.empty()) {
      bounds = absl::StrCat(" one of {", absl::StrJoin(e.key.choices, ", "), "}");
    }
    absl::StrAppend(&out, "# ", e.key.description, ".", bounds,
                    e.key.reloadable ? " Reloadable (SIGHUP)." : "", "\n", name.substr(dot + 1),
                    " = ", Render(defaults, e), "\n");
  }
  absl::StrAppend(&out, NamespaceTableHelp());
  return out;
}

std::string ValueOf(const Settings& s, absl::string_view key) {
  const Entry* e = Find(key);
  return e == nullptr ? std::string() : Render(s, *e);
}

}  // namespace kvwave::config
