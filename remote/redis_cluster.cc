#include "remote/redis_cluster.h"

#include <hiredis/hiredis.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "config/status_macros.h"

namespace kvwave::remote {
namespace {

timeval ToTimeval(int64_t ms) {
  timeval tv;
  tv.tv_sec = static_cast<time_t>(ms / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);
  return tv;
}

bool IsRedirect(const Reply& r) {
  if (!r.is_error()) return false;
  const absl::string_view s = r.str();
  return absl::StartsWith(s, "MOVED ") || absl::StartsWith(s, "ASK ");
}

}  // namespace

uint16_t Crc16(absl::string_view bytes) {
  uint16_t crc = 0;
  for (unsigned char c : bytes) {
    crc ^= static_cast<uint16_t>(c) << 8;
    for (int i = 0; i < 8; ++i) {
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

int KeySlot(absl::string_view key) {
  const size_t open = key.find('{');
  if (open != absl::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != absl::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16(key) & (kClusterSlots - 1);
}

// --- Reply ---

Reply::Reply(redisReply* r) : reply_(r) {}
void Reply::Deleter::operator()(redisReply* r) const { freeReplyObject(r); }
bool Reply::is_nil() const { return reply_ == nullptr || reply_->type == REDIS_REPLY_NIL; }
bool Reply::is_error() const { return reply_ != nullptr && reply_->type == REDIS_REPLY_ERROR; }
bool Reply::is_string() const {
  return reply_ != nullptr &&
         (reply_->type == REDIS_REPLY_STRING || reply_->type == REDIS_REPLY_STATUS);
}
bool Reply::is_integer() const { return reply_ != nullptr && reply_->type == REDIS_REPLY_INTEGER; }
bool Reply::is_array() const { return reply_ != nullptr && reply_->type == REDIS_REPLY_ARRAY; }
absl::string_view Reply::str() const { return StrOf(reply_.get()); }
int64_t Reply::integer() const { return IntegerOf(reply_.get()); }
size_t Reply::size() const { return is_array() ? reply_->elements : 0; }
const redisReply* Reply::element(size_t i) const { return reply_->element[i]; }
absl::string_view Reply::StrOf(const redisReply* r) {
  if (r == nullptr || r->str == nullptr) return {};
  return absl::string_view(r->str, r->len);
}
int64_t Reply::IntegerOf(const redisReply* r) {
  return r != nullptr && r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
}

// --- Seeds ---

absl::Status SplitAddress(absl::string_view address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  int p = 0;
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &p) || p < 1 || p > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("redis node '", address, "' is not host:port"));
  }
  *host = std::string(address.substr(0, colon));
  *port = p;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ParseSeeds(absl::string_view list) {
  std::vector<std::string> seeds;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (part.empty()) continue;
    std::string host;
    int port;
    KVWAVE_RETURN_IF_ERROR(SplitAddress(part, &host, &port));
    seeds.emplace_back(part);
  }
  if (seeds.empty()) return absl::InvalidArgumentError("no redis seed node given");
  return seeds;
}

// --- Connections ---

class RedisCluster::Lease {
 public:
  Lease(RedisCluster* owner, std::string node, redisContext* c)
      : owner_(owner), node_(std::move(node)), c_(c) {}
  Lease(Lease&& o) noexcept
      : owner_(o.owner_), node_(std::move(o.node_)), c_(std::exchange(o.c_, nullptr)) {}
  Lease& operator=(Lease&&) = delete;
  ~Lease() {
    if (c_ == nullptr) return;
    if (c_->err != 0) {
      redisFree(c_);
      return;
    }
    absl::MutexLock lock(&owner_->mu_);
    for (auto& n : owner_->nodes_) {
      if (n->address == node_) {
        n->idle.push_back(c_);
        return;
      }
    }
    redisFree(c_);
  }
  redisContext* get() const { return c_; }

 private:
  RedisCluster* owner_;
  std::string node_;
  redisContext* c_;
};

absl::StatusOr<std::unique_ptr<RedisCluster>> RedisCluster::Create(RedisClusterOptions options) {
  if (options.seeds.empty()) return absl::InvalidArgumentError("no redis seed node given");
  for (const std::string& s : options.seeds) {
    std::string host;
    int port;
    KVWAVE_RETURN_IF_ERROR(SplitAddress(s, &host, &port));
  }
  std::unique_ptr<RedisCluster> cluster(new RedisCluster(std::move(options)));
  {
    absl::MutexLock lock(&cluster->mu_);
    cluster->slot_owner_.assign(kClusterSlots, -1);
    for (const std::string& s : cluster->options_.seeds) {
      auto node = std::make_unique<Node>();
      node->address = s;
      (void)SplitAddress(s, &node->host, &node->port);
      cluster->nodes_.push_back(std::move(node));
    }
  }
  (void)cluster->RefreshSlots();  // a cluster down at start is found later
  return cluster;
}

RedisCluster::~RedisCluster() {
  absl::MutexLock lock(&mu_);
  for (auto& n : nodes_) {
    for (redisContext* c : n->idle) redisFree(c);
  }
}

absl::StatusOr<redisContext*> RedisCluster::Connect(const std::string& host, int port) {
  redisContext* c =
      redisConnectWithTimeout(host.c_str(), port, ToTimeval(options_.connect_timeout_ms));
  if (c == nullptr) return absl::UnavailableError("redis: out of memory for a connection");
  if (c->err != 0) {
    std::string why = c->errstr;
    redisFree(c);
    return absl::UnavailableError(absl::StrCat("redis ", host, ":", port, ": ", why));
  }
  // The connect timeout also bounds AUTH; the command timeout applies afterwards.
  redisSetTimeout(c, ToTimeval(options_.connect_timeout_ms));
  redisEnableKeepAlive(c);
  if (!options_.password.empty()) {
    redisReply* r = options_.user.empty()
                        ? static_cast<redisReply*>(redisCommand(
                              c, "AUTH %b", options_.password.data(), options_.password.size()))
                        : static_cast<redisReply*>(redisCommand(
                              c, "AUTH %b %b", options_.user.data(), options_.user.size(),
                              options_.password.data(), options_.password.size()));
    Reply reply(r);
    if (r == nullptr) {  // no answer within the connect timeout (or I/O error): the node is down
      std::string why = c->errstr;
      redisFree(c);
      return absl::UnavailableError(absl::StrCat("redis ", host, ":", port, " AUTH: ", why));
    }
    if (reply.is_error()) {  // WRONGPASS etc.: the credentials, not the node
      std::string why(reply.str());
      redisFree(c);
      return absl::PermissionDeniedError(absl::StrCat("redis ", host, ":", port, " AUTH: ", why));
    }
  }
  redisSetTimeout(c, ToTimeval(options_.command_timeout_ms));
  connections_opened_.fetch_add(1, std::memory_order_relaxed);
  return c;
}

absl::StatusOr<RedisCluster::Lease> RedisCluster::Checkout(const std::string& address) {
  std::string host;
  int port = 0;
  {
    absl::MutexLock lock(&mu_);
    Node* node = nullptr;
    for (auto& n : nodes_) {
      if (n->address == address) node = n.get();
    }
    if (node == nullptr) {  // named by a redirect or the slot map
      nodes_.push_back(std::make_unique<Node>());
      node = nodes_.back().get();
      node->address = address;
      KVWAVE_RETURN_IF_ERROR(SplitAddress(address, &node->host, &node->port));
    }
    if (Clock::now() < node->down_until) {
      fast_failures_.fetch_add(1, std::memory_order_relaxed);
      return absl::UnavailableError(absl::StrCat("redis node ", address, " is marked down"));
    }
    if (!node->idle.empty()) {
      redisContext* c = node->idle.back();
      node->idle.pop_back();
      return Lease(this, address, c);
    }
    host = node->host;
    port = node->port;
  }
  absl::StatusOr<redisContext*> c = Connect(host, port);  // without the lock: may wait
  if (!c.ok()) {
    // Refused credentials do not fix themselves either: back off like a dead node instead of
    // opening a connection (and failing AUTH) on every call.
    if (absl::IsUnavailable(c.status()) || absl::IsPermissionDenied(c.status())) MarkDown(address);
    return c.status();
  }
  return Lease(this, address, *c);
}

void RedisCluster::MarkDown(const std::string& address) {
  node_failures_.fetch_add(1, std::memory_order_relaxed);
  std::vector<redisContext*> drop;
  {
    absl::MutexLock lock(&mu_);
    for (auto& n : nodes_) {
      if (n->address != address) continue;
      n->down_until = Clock::now() + std::chrono::milliseconds(options_.down_retry_ms);
      drop.swap(n->idle);  // pooled connections to a failed node are suspect
    }
  }
  for (redisContext* c : drop) redisFree(c);
}

absl::StatusOr<std::vector<Reply>> RedisCluster::Exchange(const std::string& node,
                                                          std::span<const Command> commands,
                                                          bool asking,
                                                          const std::function<void()>& on_sent) {
  KVWAVE_ASSIGN_OR_RETURN(Lease lease, Checkout(node));
  redisContext* c = lease.get();
  if (asking) redisAppendCommand(c, "ASKING");
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  for (const Command& cmd : commands) {
    argv.clear();
    lens.clear();
    for (absl::string_view a : cmd) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()) !=
        REDIS_OK) {
      c->err = REDIS_ERR_OTHER;  // partly buffered: never pool it
      return absl::ResourceExhaustedError("redis: cannot buffer a command");
    }
  }
  if (on_sent) {
    for (int done = 0; !done;) {
      if (redisBufferWrite(c, &done) != REDIS_OK) {
        std::string why = c->errstr;
        MarkDown(node);
        return absl::UnavailableError(absl::StrCat("redis node ", node, ": ", why));
      }
    }
    on_sent();
  }
  std::vector<Reply> replies;
  replies.reserve(commands.size());
  for (size_t i = 0; i < commands.size() + (asking ? 1 : 0); ++i) {
    void* r = nullptr;
    if (redisGetReply(c, &r) != REDIS_OK || r == nullptr) {
      std::string why = c->errstr;
      if (c->err == 0) c->err = REDIS_ERR_IO;  // never pool a connection in an unknown state
      MarkDown(node);
      return absl::UnavailableError(absl::StrCat("redis node ", node, ": ", why));
    }
    Reply reply(static_cast<redisReply*>(r));
    if (asking && i == 0) continue;
    replies.push_back(std::move(reply));
  }
  commands_.fetch_add(static_cast<int64_t>(commands.size()), std::memory_order_relaxed);
  return replies;
}

// --- Slot map ---

absl::Status RedisCluster::LoadSlotsFrom(const std::string& node) {
  const Command cmd = {"CLUSTER", "SLOTS"};
  KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> replies, Exchange(node, {&cmd, 1}, false));
  const Reply& r = replies[0];
  if (!r.is_array()) {
    return absl::UnavailableError(absl::StrCat("CLUSTER SLOTS from ", node, ": ", r.str()));
  }
  std::string node_host;
  int node_port;
  KVWAVE_RETURN_IF_ERROR(SplitAddress(node, &node_host, &node_port));
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::string>> ranges;
  for (size_t i = 0; i < r.size(); ++i) {
    const redisReply* e = r.element(i);
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2) {
      return absl::UnavailableError("CLUSTER SLOTS: unexpected reply layout");
    }
    const int64_t from = Reply::IntegerOf(e->element[0]), to = Reply::IntegerOf(e->element[1]);
    std::string host(Reply::StrOf(e->element[2]->element[0]));
    if (host.empty() || host == "?") host = node_host;  // "same host as the one asked"
    const int64_t port = Reply::IntegerOf(e->element[2]->element[1]);
    if (from < 0 || to >= kClusterSlots || from > to || port < 1 || port > 65535) {
      return absl::UnavailableError("CLUSTER SLOTS: slot range or port out of bounds");
    }
    ranges.push_back({{from, to}, absl::StrCat(host, ":", port)});
  }
  absl::MutexLock lock(&mu_);
  std::vector<int16_t> owner(kClusterSlots, -1);
  for (const auto& [range, address] : ranges) {
    int16_t index = -1;
    for (size_t n = 0; n < nodes_.size(); ++n) {
      if (nodes_[n]->address == address) index = static_cast<int16_t>(n);
    }
    if (index < 0) {
      nodes_.push_back(std::make_unique<Node>());
      nodes_.back()->address = address;
      KVWAVE_RETURN_IF_ERROR(SplitAddress(address, &nodes_.back()->host, &nodes_.back()->port));
      index = static_cast<int16_t>(nodes_.size() - 1);
    }
    std::fill(owner.begin() + range.first, owner.begin() + range.second + 1, index);
  }
  slot_owner_ = std::move(owner);
  have_map_ = true;
  slot_map_loads_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status RedisCluster::RefreshSlots() {
  std::vector<std::string> candidates;
  {
    absl::MutexLock lock(&mu_);
    next_refresh_ = Clock::now() + std::chrono::milliseconds(options_.down_retry_ms);
    const auto now = Clock::now();
    for (auto& n : nodes_) {
      if (now >= n->down_until) candidates.push_back(n->address);
    }
  }
  absl::Status last = absl::UnavailableError("redis: every known node is marked down");
  for (const std::string& node : candidates) {
    last = LoadSlotsFrom(node);
    if (last.ok()) return last;
  }
  return last;
}

absl::StatusOr<std::string> RedisCluster::SlotOwner(int slot) {
  bool load = false;
  {
    absl::MutexLock lock(&mu_);
    load = !have_map_ || (slot_owner_[slot] < 0 && Clock::now() >= next_refresh_);
  }
  if (load) {
    absl::Status s = RefreshSlots();
    if (!s.ok()) {
      absl::MutexLock lock(&mu_);
      if (!have_map_) return s;
    }
  }
  absl::MutexLock lock(&mu_);
  const int16_t owner = slot_owner_[slot];
  if (owner < 0) return absl::UnavailableError(absl::StrCat("redis: slot ", slot, " is unserved"));
  return nodes_[owner]->address;
}

absl::StatusOr<std::string> RedisCluster::NodeOfSlot(int slot) {
  if (slot < 0 || slot >= kClusterSlots) return absl::InvalidArgumentError("slot out of range");
  return SlotOwner(slot);
}

absl::StatusOr<std::vector<std::string>> RedisCluster::Masters() {
  KVWAVE_RETURN_IF_ERROR(SlotOwner(0).status());
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  std::vector<bool> seen(nodes_.size(), false);
  for (int16_t o : slot_owner_) {
    if (o >= 0 && !seen[o]) {
      seen[o] = true;
      out.push_back(nodes_[o]->address);
    }
  }
  return out;
}

// --- Commands ---

namespace {

// Buffered reads from a blocking socket whose SO_RCVTIMEO is the command timeout.
class SocketReader {
 public:
  explicit SocketReader(int fd) : fd_(fd), buf_(64 << 10) {}
  // A line without its "\r\n".
  absl::StatusOr<std::string> Line() {
    for (;;) {
      for (size_t i = pos_; i + 1 < len_; ++i) {
        if (buf_[i] == '\r' && buf_[i + 1] == '\n') {
          std::string line(buf_.data() + pos_, i - pos_);
          pos_ = i + 2;
          return line;
        }
      }
      if (len_ - pos_ > 64 << 10 >> 1) return absl::DataLossError("redis: reply line too long");
      KVWAVE_RETURN_IF_ERROR(Fill());
    }
  }
  // Exactly n bytes into dst: what is buffered, then straight from the socket.
  absl::Status Exact(char* dst, size_t n) {
    const size_t have = std::min(n, len_ - pos_);
    std::memcpy(dst, buf_.data() + pos_, have);
    pos_ += have;
    for (size_t got = have; got < n;) {
      const ssize_t r = recv(fd_, dst + got, n - got, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return IoError(r);
      got += static_cast<size_t>(r);
    }
    return absl::OkStatus();
  }
  bool drained() const { return pos_ == len_; }

 private:
  absl::Status Fill() {
    if (pos_ > 0) {
      std::memmove(buf_.data(), buf_.data() + pos_, len_ - pos_);
      len_ -= pos_;
      pos_ = 0;
    }
    for (;;) {
      const ssize_t r = recv(fd_, buf_.data() + len_, buf_.size() - len_, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return IoError(r);
      len_ += static_cast<size_t>(r);
      return absl::OkStatus();
    }
  }
  static absl::Status IoError(ssize_t r) {
    if (r == 0) return absl::UnavailableError("connection closed by the server");
    if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::UnavailableError("timed out");
    return absl::UnavailableError(std::strerror(errno));
  }
  int fd_;
  std::vector<char> buf_;
  size_t pos_ = 0, len_ = 0;
};

}  // namespace

absl::Status RedisCluster::ReadBulkReplies(redisContext* c, std::vector<BulkValue>& out,
                                           std::vector<std::string>& redirects) {
  SocketReader in(c->fd);
  for (size_t i = 0; i < out.size(); ++i) {
    KVWAVE_ASSIGN_OR_RETURN(std::string line, in.Line());
    if (line.empty()) return absl::DataLossError("redis: empty reply line");
    if (line[0] == '-') {
      redirects[i] = line.substr(1);
      if (!absl::StartsWith(redirects[i], "MOVED ") && !absl::StartsWith(redirects[i], "ASK ")) {
        return absl::UnavailableError(absl::StrCat("redis: GET failed: ", redirects[i]));
      }
      continue;
    }
    int64_t len = 0;
    if (line[0] != '$' || !absl::SimpleAtoi(absl::string_view(line).substr(1), &len) || len < -1) {
      return absl::DataLossError("redis: unexpected reply to GET");
    }
    if (len == -1) continue;  // nil
    out[i].nil = false;
    out[i].bytes.resize(static_cast<size_t>(len));
    KVWAVE_RETURN_IF_ERROR(in.Exact(out[i].bytes.data(), out[i].bytes.size()));
    char crlf[2];
    KVWAVE_RETURN_IF_ERROR(in.Exact(crlf, 2));
  }
  if (!in.drained()) return absl::DataLossError("redis: bytes after the last reply");
  return absl::OkStatus();
}

absl::Status RedisCluster::GetMany(int slot, std::span<const std::string> keys,
                                   std::vector<BulkValue>& out) {
  KVWAVE_ASSIGN_OR_RETURN(std::string owner, NodeOfSlot(slot));
  out.resize(keys.size());
  for (BulkValue& v : out) v.nil = true;
  std::vector<std::string> redirects(keys.size());
  {
    KVWAVE_ASSIGN_OR_RETURN(Lease lease, Checkout(owner));
    redisContext* c = lease.get();
    if (c->reader->pos != c->reader->len) {  // never expected: bytes hiredis read ahead
      c->err = REDIS_ERR_OTHER;
      return absl::InternalError("redis: connection has unread input");
    }
    for (const std::string& key : keys) {
      const char* argv[2] = {"GET", key.data()};
      const size_t lens[2] = {3, key.size()};
      if (redisAppendCommandArgv(c, 2, argv, lens) != REDIS_OK) {
        c->err = REDIS_ERR_OTHER;
        return absl::ResourceExhaustedError("redis: cannot buffer a command");
      }
    }
    for (int done = 0; !done;) {
      if (redisBufferWrite(c, &done) != REDIS_OK) {
        std::string why = c->errstr;
        MarkDown(owner);
        return absl::UnavailableError(absl::StrCat("redis node ", owner, ": ", why));
      }
    }
    absl::Status s = ReadBulkReplies(c, out, redirects);
    if (!s.ok()) {
      c->err = REDIS_ERR_IO;  // never pool a connection in an unknown state
      if (absl::IsUnavailable(s) && !absl::StrContains(s.message(), "GET failed")) {
        MarkDown(owner);
      }
      return absl::Status(s.code(), absl::StrCat("redis node ", owner, ": ", s.message()));
    }
    commands_.fetch_add(static_cast<int64_t>(keys.size()), std::memory_order_relaxed);
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (redirects[i].empty()) continue;
    const Command cmd = {"GET", keys[i]};
    redisReply* fake = static_cast<redisReply*>(calloc(1, sizeof(redisReply)));
    fake->type = REDIS_REPLY_ERROR;
    fake->str = strdup(redirects[i].c_str());
    fake->len = redirects[i].size();
    KVWAVE_ASSIGN_OR_RETURN(Reply r, FollowRedirect(cmd, Reply(fake)));
    if (r.is_error()) return absl::UnavailableError(absl::StrCat("redis: GET failed: ", r.str()));
    out[i].nil = r.is_nil();
    if (!out[i].nil) out[i].bytes = std::string(r.str());
  }
  return absl::OkStatus();
}

absl::StatusOr<Reply> RedisCluster::FollowRedirect(const Command& command, Reply redirect) {
  for (int hop = 0; hop < options_.max_redirects; ++hop) {
    // "MOVED <slot> <host:port>" or "ASK <slot> <host:port>"
    std::vector<absl::string_view> parts = absl::StrSplit(redirect.str(), ' ');
    int slot = -1;
    if (parts.size() != 3 || !absl::SimpleAtoi(parts[1], &slot) || slot < 0 ||
        slot >= kClusterSlots) {
      return absl::InternalError(absl::StrCat("redis: bad redirect '", redirect.str(), "'"));
    }
    const bool ask = parts[0] == "ASK";
    const std::string target(parts[2]);
    std::string host;
    int port;
    KVWAVE_RETURN_IF_ERROR(SplitAddress(target, &host, &port));
    if (ask) {
      asked_.fetch_add(1, std::memory_order_relaxed);
    } else {
      moved_.fetch_add(1, std::memory_order_relaxed);
      {
        absl::MutexLock lock(&mu_);
        for (size_t n = 0; n < nodes_.size(); ++n) {
          if (nodes_[n]->address == target) slot_owner_[slot] = static_cast<int16_t>(n);
        }
      }
      (void)RefreshSlots();  // the map is stale: a slot moved, others may have too
    }
    KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> r, Exchange(target, {&command, 1}, ask));
    if (!IsRedirect(r[0])) return std::move(r[0]);
    redirect = std::move(r[0]);
  }
  return absl::InternalError("redis: too many redirects");
}

std::vector<absl::StatusOr<Reply>> RedisCluster::RunMany(std::span<const Command> commands) {
  std::vector<absl::StatusOr<Reply>> results;
  results.reserve(commands.size());
  for (size_t i = 0; i < commands.size(); ++i) results.emplace_back(absl::UnknownError("not run"));
  // Group by owner node.
  absl::flat_hash_map<std::string, std::vector<size_t>> groups;
  for (size_t i = 0; i < commands.size(); ++i) {
    if (commands[i].size() < 2) {
      results[i] = absl::InvalidArgumentError("redis: a routed command needs a key");
      continue;
    }
    absl::StatusOr<std::string> owner = SlotOwner(KeySlot(commands[i][1]));
    if (!owner.ok()) {
      results[i] = owner.status();
      continue;
    }
    groups[*owner].push_back(i);
  }
  auto run_group = [&](const std::string& node, const std::vector<size_t>& indices) {
    std::vector<Command> batch;
    batch.reserve(indices.size());
    for (size_t i : indices) batch.push_back(commands[i]);
    absl::StatusOr<std::vector<Reply>> replies = Exchange(node, batch, false);
    for (size_t j = 0; j < indices.size(); ++j) {
      if (!replies.ok()) {
        results[indices[j]] = replies.status();
      } else if (IsRedirect((*replies)[j])) {
        results[indices[j]] = FollowRedirect(commands[indices[j]], std::move((*replies)[j]));
      } else {
        results[indices[j]] = std::move((*replies)[j]);
      }
    }
  };
  if (groups.size() <= 1) {
    for (const auto& [node, indices] : groups) run_group(node, indices);
    return results;
  }
  std::vector<std::thread> threads;
  for (const auto& [node, indices] : groups) {
    threads.emplace_back([&, node = &node, indices = &indices] { run_group(*node, *indices); });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

absl::StatusOr<Reply> RedisCluster::Run(const Command& command) {
  return std::move(RunMany({&command, 1})[0]);
}

absl::StatusOr<std::vector<Reply>> RedisCluster::Pipeline(int slot,
                                                          std::span<const Command> commands,
                                                          const std::function<void()>& on_sent) {
  KVWAVE_ASSIGN_OR_RETURN(std::string owner, NodeOfSlot(slot));
  KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> replies, Exchange(owner, commands, false, on_sent));
  for (size_t i = 0; i < replies.size(); ++i) {
    if (!IsRedirect(replies[i])) continue;
    KVWAVE_ASSIGN_OR_RETURN(replies[i], FollowRedirect(commands[i], std::move(replies[i])));
  }
  return replies;
}

absl::StatusOr<Reply> RedisCluster::RunOnNode(const std::string& node, const Command& command) {
  KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> r, Exchange(node, {&command, 1}, false));
  return std::move(r[0]);
}

RedisClusterStats RedisCluster::stats() const {
  RedisClusterStats s;
  s.commands = commands_.load(std::memory_order_relaxed);
  s.moved = moved_.load(std::memory_order_relaxed);
  s.asked = asked_.load(std::memory_order_relaxed);
  s.slot_map_loads = slot_map_loads_.load(std::memory_order_relaxed);
  s.node_failures = node_failures_.load(std::memory_order_relaxed);
  s.fast_failures = fast_failures_.load(std::memory_order_relaxed);
  s.connections_opened = connections_opened_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  const auto now = Clock::now();
  std::vector<bool> master(nodes_.size(), false);
  for (int16_t o : slot_owner_) {
    if (o >= 0) master[o] = true;
  }
  for (size_t n = 0; n < nodes_.size(); ++n) {
    if (!master[n]) continue;
    ++s.nodes;
    if (now < nodes_[n]->down_until) ++s.nodes_down;
  }
  return s;
}

}  // namespace kvwave::remote
