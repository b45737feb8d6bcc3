// A Redis Cluster client on hiredis (which has no cluster support): routes each command by the
// hash slot of its key (CRC16 of the key or of its {hash tag}, mod 16384) through a slot map
// loaded from CLUSTER SLOTS, follows MOVED (updates the map, reloads it) and ASK (ASKING, then the
// command, on the importing node), and bounds every network wait:
//   connect_timeout_ms  TCP connect (and AUTH) to a node
//   command_timeout_ms  the longest wait of any read or write of a command or its reply
// A node whose connect or I/O fails is marked down for down_retry_ms: calls routed to it fail at
// once with Unavailable (the caller degrades to local-only) until the next try after that, so a
// dead or stopped node costs one timeout per down_retry_ms, and a node that comes back is used
// again at the next try. AUTH refused by a node (wrong user or password) fails the call with
// PermissionDenied and marks the node down the same way.
//
// Connections: a pool of idle hiredis connections per node; a call checks one out for its
// duration (so concurrent calls never share one), and a connection that saw an error is closed.
//
// Thread-safety: every method is thread-safe.
#ifndef KVWAVE_REMOTE_REDIS_CLUSTER_H_
#define KVWAVE_REMOTE_REDIS_CLUSTER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

struct redisReply;
struct redisContext;

namespace kvwave::remote {

inline constexpr int kClusterSlots = 16384;

// CRC16-CCITT (XModem), the checksum Redis Cluster hashes keys with.
uint16_t Crc16(absl::string_view bytes);
// The hash slot of a key: of the part between the first '{' and the next '}' when that part is
// not empty, else of the whole key.
int KeySlot(absl::string_view key);

// One reply (owns the hiredis object). Strings are views into it.
class Reply {
 public:
  Reply() = default;
  explicit Reply(redisReply* r);
  Reply(Reply&&) noexcept = default;
  Reply& operator=(Reply&&) noexcept = default;

  bool is_nil() const;
  bool is_error() const;
  bool is_string() const;  // a bulk or status string
  bool is_integer() const;
  bool is_array() const;
  absl::string_view str() const;  // string, status or error text
  int64_t integer() const;
  size_t size() const;  // array elements
  // An element of an array (a view: valid while this reply lives).
  const redisReply* element(size_t i) const;
  static absl::string_view StrOf(const redisReply* r);
  static int64_t IntegerOf(const redisReply* r);

 private:
  struct Deleter {
    void operator()(redisReply* r) const;
  };
  std::unique_ptr<redisReply, Deleter> reply_;
};

// A GET result read straight from the socket into its own buffer (GetMany).
struct BulkValue {
  bool nil = true;  // the key does not exist
  std::string bytes;
};

// A command: its arguments (the key, when it has one, is argument 1). Views: the bytes must
// outlive the call.
using Command = std::vector<absl::string_view>;

struct RedisClusterOptions {
  std::vector<std::string> seeds;  // "host:port"
  int64_t connect_timeout_ms = 200;
  int64_t command_timeout_ms = 1000;
  int64_t down_retry_ms = 1000;  // a failed node is not tried again for this long
  std::string user;              // AUTH user (Redis ACL); empty = "default"
  std::string password;          // empty = no AUTH
  int max_redirects = 5;
};

struct RedisClusterStats {
  int64_t commands = 0;
  int64_t moved = 0;           // MOVED redirects followed
  int64_t asked = 0;           // ASK redirects followed
  int64_t slot_map_loads = 0;  // CLUSTER SLOTS loaded
  int64_t node_failures = 0;   // connects or I/O that failed or timed out
  int64_t fast_failures = 0;   // calls refused at once because their node was marked down
  int64_t connections_opened = 0;
  int64_t nodes = 0;       // known masters now
  int64_t nodes_down = 0;  // marked down now
};

class RedisCluster {
 public:
  // Parses the seeds and tries to load the slot map (a cluster that is down at start is not an
  // error: the map is loaded at the first call that finds one). InvalidArgument on a bad seed.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<RedisCluster>> Create(
      RedisClusterOptions options);
  ~RedisCluster();
  RedisCluster(const RedisCluster&) = delete;
  RedisCluster& operator=(const RedisCluster&) = delete;

  // One command routed by its key (argument 1). A Redis error reply is returned as a Reply with
  // is_error(); network failures and timeouts are Unavailable.
  [[nodiscard]] absl::StatusOr<Reply> Run(const Command& command);

  // Commands whose keys all hash to `slot`, pipelined on one connection; replies in order. A
  // command redirected by MOVED/ASK is retried alone on the node it names. `on_sent` (optional)
  // runs once every command has been written to the socket, before the replies are read.
  [[nodiscard]] absl::StatusOr<std::vector<Reply>> Pipeline(
      int slot, std::span<const Command> commands, const std::function<void()>& on_sent = {});

  // GET of keys that all hash to `slot`, pipelined on one connection, each value read from the
  // socket directly into its BulkValue (one copy; no hiredis reply object: for large values).
  // Redirected keys are retried alone on the node named.
  // `out` is resized to keys.size(); reuse it across calls: buffers of the same size are
  // refilled in place (no zero-fill, no fresh pages).
  [[nodiscard]] absl::Status GetMany(int slot, std::span<const std::string> keys,
                                     std::vector<BulkValue>& out);

  // Commands on any keys: grouped by node, each node's group pipelined, the groups run in
  // parallel (one thread per node). One result per command, in order.
  std::vector<absl::StatusOr<Reply>> RunMany(std::span<const Command> commands);

  // A command on a given node ("host:port" as in the slot map), no routing (CLUSTER INFO,
  // DBSIZE, FLUSHALL ...).
  [[nodiscard]] absl::StatusOr<Reply> RunOnNode(const std::string& node, const Command& command);
  // The masters of the current slot map (loads it if none).
  [[nodiscard]] absl::StatusOr<std::vector<std::string>> Masters();
  // The master now serving `slot` (from the map; loads it if none).
  [[nodiscard]] absl::StatusOr<std::string> NodeOfSlot(int slot);
  // Reloads the slot map now.
  [[nodiscard]] absl::Status RefreshSlots();

  RedisClusterStats stats() const;
  const RedisClusterOptions& options() const { return options_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Node {
    std::string address;  // "host:port"
    std::string host;
    int port = 0;
    std::vector<redisContext*> idle;  // pooled connections
    Clock::time_point down_until{};   // marked down until then
  };
  class Lease;  // a checked-out connection

  explicit RedisCluster(RedisClusterOptions options) : options_(std::move(options)) {}
  absl::StatusOr<Lease> Checkout(const std::string& node);
  absl::StatusOr<redisContext*> Connect(const std::string& host, int port);
  void MarkDown(const std::string& node);
  absl::StatusOr<std::string> SlotOwner(int slot);
  absl::Status LoadSlotsFrom(const std::string& node);
  // Sends commands on one connection and reads every reply (after ASKING when asking).
  absl::StatusOr<std::vector<Reply>> Exchange(const std::string& node,
                                              std::span<const Command> commands, bool asking,
                                              const std::function<void()>& on_sent = {});
  // Follows MOVED/ASK for one command whose reply was a redirect.
  absl::StatusOr<Reply> FollowRedirect(const Command& command, Reply redirect);
  // Reads `keys.size()` GET replies from c's socket into `out`; redirect texts into
  // `redirects` (empty string = none).
  absl::Status ReadBulkReplies(redisContext* c, std::vector<BulkValue>& out,
                               std::vector<std::string>& redirects);

  const RedisClusterOptions options_;
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Node>> nodes_ ABSL_GUARDED_BY(mu_);
  std::vector<int16_t> slot_owner_ ABSL_GUARDED_BY(mu_);  // node index per slot, -1 = unknown
  bool have_map_ ABSL_GUARDED_BY(mu_) = false;
  Clock::time_point next_refresh_ ABSL_GUARDED_BY(mu_){};
  // Statistics: relaxed, they order nothing.
  mutable std::atomic<int64_t> commands_{0}, moved_{0}, asked_{0}, slot_map_loads_{0},
      node_failures_{0}, fast_failures_{0}, connections_opened_{0};
};

// Splits "host:port,host:port" (spaces allowed) into seeds; InvalidArgument on a bad entry.
[[nodiscard]] absl::StatusOr<std::vector<std::string>> ParseSeeds(absl::string_view list);
// "host:port" -> host, port.
[[nodiscard]] absl::Status SplitAddress(absl::string_view address, std::string* host, int* port);

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_REDIS_CLUSTER_H_
