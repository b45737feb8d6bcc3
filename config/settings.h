// kvwave's settings: one declarative table (name, type, default, bounds, reloadable, description)
// and the immutable, validated struct it fills. Load once (defaults, then a TOML file, then
// command-line overrides "section.key=value"); every consumer reads the struct.
//
// Thread-safety: a Settings value is immutable after Load; share it by const reference or copy.
// The table is a constant.
#ifndef KVWAVE_CONFIG_SETTINGS_H_
#define KVWAVE_CONFIG_SETTINGS_H_

#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvwave::config {

// A set of uids or gids as written in the settings: "1000, 1001", "self" (the effective id of
// the process that loads the settings: the daemon), "*" (any), "" (none).
struct IdSet {
  bool any = false;
  std::vector<uint32_t> ids;
  bool Contains(uint32_t id) const;
};
// `self` replaces the word "self". An unparsable entry is an error naming it.
[[nodiscard]] absl::StatusOr<IdSet> ParseIdSet(absl::string_view text, uint32_t self);

// [trust.namespace.NAME]: binds prefix namespace NAME to the credentials that may read (attach
// its shared blocks) or write (register and persist blocks in it; writing implies reading).
struct NamespaceRule {
  std::string name;
  // Unix-socket peers (SO_PEERCRED); a gid matches the peer's primary or a supplementary group.
  IdSet write_uids, write_gids, read_uids, read_gids;
  std::string write_token, read_token;  // Hello credentials (any transport)
};

struct Settings {
  // store
  int64_t memory_limit_bytes = int64_t{8} << 30;
  int64_t host_pool_bytes = int64_t{1} << 30;  // idle KV blocks kept for reuse
  std::string pinned_memory = "auto";          // auto | on | off (host KV pinned for the GPU)
  int64_t prefill_segment_tokens = 8192;
  int64_t decode_segment_tokens = 1024;
  int64_t page_tokens = 8;
  int64_t sink_tokens = 4;
  int64_t recent_tokens = 64;
  // index
  int64_t tokens_per_cluster = 16;
  int64_t kmeans_iterations = 10;
  std::string kmeans_kernel = "own";  // "own" (SIMD + TBB) or "faiss"
  // RetrievalAttention graph per sealed segment (issue 19; engine/graph_ops.h)
  std::string graph = "off";     // off | on
  int64_t graph_queries = 4096;  // prefill queries sampled per segment graph (0 = all held)
  int64_t graph_pivots = 16;     // pivots per sampled query
  int64_t graph_degree = 32;     // M
  int64_t graph_beam = 128;      // default beam (queue) of Retrieve method = graph
  // attend
  std::string attend_method = "retroinfer";  // retroinfer | retrievalattention
  int64_t graph_top_k = 100;  // retrievalattention: graph tokens attended per query head
  double retrieval_budget = 0.018;
  // Capped at 1 - retrieval_budget where a request takes the defaults: 1 = every cluster not
  // retrieved. 1.8% retrieved + the rest, ranked two_pass on the CPU, chosen by measurement
  // (issue 18, README "Quality"): the paper's 0.232 lost 2.4% in loss at 8K, the rest 0.4%.
  double estimation_budget = 1.0;
  // How the retrieval zone's clusters are chosen (engine/head_ops.cc): "centroid" ranks every
  // cluster by its centroid; "two_pass" takes the top rank_overfetch x r clusters by centroid,
  // scores their member keys, and retrieves the r whose best member key scores highest; "auto"
  // is two_pass where the backend implements it (the CPU backend) and centroid on the GPU.
  std::string rank = "auto";
  double rank_overfetch = 2.0;
  // The estimation zone's spread correction (gpu/attention_cpu.h EstimateAttention with the
  // segments' key spreads): "on" or "off" (CPU backend only). Measured (README "Quality"): lower
  // loss and higher top-1 at 8K on every stretch tried, but much worse at 16K (top-1 81% -> 73%),
  // so off by default.
  std::string estimation_spread = "off";
  int64_t compute_threads = 0;  // 0 = one per core
  int64_t seal_threads = 0;     // background indexing threads (0 = max(1, cores / 4))
  // gpu (the attention backend)
  std::string gpu_mode = "auto";  // auto | on | off
  int64_t gpu_device = 0;
  double gpu_cache_fraction = 0.05;  // page pool as a fraction of the resident KV
  int64_t gpu_cache_bytes = 0;       // > 0: the page pool's size, overriding the fraction
  // rpc
  std::string socket_path = "/tmp/kvwaved.sock";
  int64_t tcp_port = 0;  // 0 = TCP off
  std::string tcp_token;
  int64_t max_frame_bytes = int64_t{256} << 20;
  int64_t io_threads = 1;
  int64_t io_poll_us = 50;   // io threads poll this long after an event before sleeping
  int64_t metrics_port = 0;  // 0 = no Prometheus endpoint
  int64_t default_deadline_ms = 30000;
  int64_t max_sessions = 4096;
  // rpc limits (issue 15): what a peer can make kvwaved hold, and for how long
  std::string tcp_bind = "127.0.0.1";      // address of the TCP listener
  std::string metrics_bind = "127.0.0.1";  // address of the Prometheus endpoint
  int64_t metrics_max_connections = 16;
  int64_t preauth_max_frame_bytes = int64_t{64} << 10;  // frame limit before Hello succeeds
  int64_t handshake_timeout_ms = 10000;
  int64_t idle_timeout_ms = 0;                         // 0 = never
  int64_t max_queued_reply_bytes = int64_t{64} << 20;  // per connection
  int64_t max_in_flight_per_connection = 256;
  int64_t max_region_bytes = int64_t{64} << 30;  // one session's shared region
  int64_t max_mapped_bytes = int64_t{1} << 40;   // all sessions' regions together
  // persistence
  std::string persist_path;          // empty = no persistence
  std::string durability = "async";  // none | async | sync
  // remote tier (Redis Cluster; remote/remote_tier.h)
  std::string remote_redis;         // seed nodes "host:port,host:port"
  std::string remote_mode = "off";  // off | read | readwrite
  int64_t remote_connect_timeout_ms = 200;
  int64_t remote_command_timeout_ms = 1000;
  int64_t remote_down_retry_ms = 2000;
  int64_t remote_queue_bytes = int64_t{1} << 30;
  int64_t remote_max_value_bytes = int64_t{8} << 20;
  std::string remote_attach = "index";  // index | whole
  int64_t remote_fetch_threads = 1;
  int64_t remote_fetch_chunk_bytes = int64_t{512} << 10;
  int64_t remote_fetch_quiet_ms = 20;
  std::string remote_user;
  std::string remote_password;
  // logging
  std::string log_level = "info";  // trace debug info warn error off
  // trust (rpc/auth.h): who may share prefix blocks in which namespace; who is an administrator
  std::string admin_uids = "self";              // Unix-socket peers with administrative rights
  std::string admin_token;                      // a Hello credential with administrative rights
  std::string unlisted_namespaces = "per_uid";  // per_uid | shared | off
  std::vector<NamespaceRule> namespaces;        // [trust.namespace.NAME] tables, by name
};

using Value = std::variant<int64_t, double, bool, std::string>;

struct Key {
  absl::string_view name;  // "section.key"
  enum class Type { kInt, kDouble, kBool, kString } type;
  Value default_value;
  double min = 0;  // bounds for numbers (inclusive)
  double max = 0;
  std::vector<absl::string_view> choices;  // allowed strings (empty: any)
  bool reloadable = false;
  absl::string_view description;
};

// The table of every key, in a stable order.
std::span<const Key> AllKeys();

// Defaults, then the TOML file (if path is not empty), then overrides "section.key=value".
// An unknown key, a value of the wrong type, or one out of bounds is an error naming the key.
[[nodiscard]] absl::StatusOr<Settings> Load(absl::string_view toml_path,
                                            std::span<const std::string> overrides);

// Loads from TOML text instead of a file (for tests and embedded defaults).
[[nodiscard]] absl::StatusOr<Settings> LoadFromString(absl::string_view toml_text,
                                                      std::span<const std::string> overrides);

// Copies the reloadable keys of `fresh` into `current`; returns the names that changed.
std::vector<std::string> ApplyReloadable(const Settings& fresh, Settings& current);

// Every key with its default, type, bounds, reloadability and description, as commented TOML.
std::string PrintDefaults();

// The value of one key in `s`, as text (for stats and logs).
std::string ValueOf(const Settings& s, absl::string_view key);

}  // namespace kvwave::config

#endif  // KVWAVE_CONFIG_SETTINGS_H_
