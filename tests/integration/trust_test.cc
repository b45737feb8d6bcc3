// The trust model against the real daemon (README "Trust model", rpc/auth.h): shared prefix blocks
// of a bound namespace come only from its writers (a reader's or a stranger's junk is neither
// served nor persisted across a restart), namespaces and per-uid scopes never see each other's
// blocks, contexts belong to their session (others get NOT_FOUND, exactly as for an id that does
// not exist) while an administrator may list and drop them, and context ids are not sequential.
#include <grp.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <set>

#include "absl/strings/str_replace.h"
#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

constexpr int kLayers = 2, kQHeads = 2, kDim = 64, kBlock = 64, kRecent = 8;
constexpr int64_t kTokens = 2 * kBlock + kRecent;  // two shareable blocks, then the recent tail
const client::ModelShape kShape{kLayers, kQHeads, 1, kDim, DType::kF32};

const std::string kAdminToken = "admin-token-0123456789";
const std::string kProdWrite = "prod-write-0123456789";
const std::string kOtherWrite = "other-write-0123456789";
const std::string kOtherRead = "other-read-0123456789";
const std::string kTcpToken = "tcp-token";

int FreePort() {
  int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &len);
  close(probe);
  return ntohs(addr.sin_port);
}

// "prod": written by holders of kProdWrite, read by Unix peers of this test's uid. "other":
// written by kOtherWrite, read by kOtherRead, nobody by uid. No uid is an administrator; the
// admin token is.
std::vector<std::string> TrustSettings(const std::string& dir, int tcp_port) {
  return {"persist.path=" + dir,
          "persist.durability=sync",
          "store.prefill_segment_tokens=" + std::to_string(kBlock),
          "store.recent_tokens=" + std::to_string(kRecent),
          "store.sink_tokens=2",
          "rpc.tcp_port=" + std::to_string(tcp_port),
          "rpc.tcp_token=" + kTcpToken,
          "trust.admin_uids=",
          "trust.admin_token=" + kAdminToken,
          "trust.namespace.prod.write_token=" + kProdWrite,
          "trust.namespace.prod.read_uids=self",
          "trust.namespace.other.write_token=" + kOtherWrite,
          "trust.namespace.other.read_token=" + kOtherRead};
}

std::string FreshDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/kvwave_trust_" + name + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

std::vector<int32_t> DocTokens(int doc) {
  std::vector<int32_t> t(kTokens);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>((doc * 7919 + i * 31) % 8192);
  return t;
}

// K (or V) rows [0, kTokens) of a layer: a fixed function of (seed, layer, position), never zero.
std::vector<float> Rows(uint64_t seed, int layer, bool value) {
  std::vector<float> out;
  for (int64_t p = 0; p < kTokens; ++p) {
    for (int j = 0; j < kDim; ++j) {
      uint64_t x = (seed << 40) ^ (uint64_t(layer) << 32) ^ (uint64_t(p) << 8) ^ j ^
                   (value ? 0xabcdefull : 0);
      x *= 0x9e3779b97f4a7c15ull;
      out.push_back(static_cast<float>((x >> 40) % 2001) / 1000.0f - 1.0005f);
    }
  }
  return out;
}

std::unique_ptr<client::Client> ConnectAs(const std::string& socket, int tcp_port,
                                          std::vector<std::string> credentials) {
  client::ClientOptions o;
  o.socket_path = socket;
  o.shared_memory_bytes = size_t{4} << 20;
  if (tcp_port != 0) {
    o.tcp_port = tcp_port;
    o.token = kTcpToken;
  }
  o.credentials = std::move(credentials);
  auto c = client::Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// Opens `doc` in `ns` and appends all its rows (seed `seed`); returns the open result.
client::OpenResult Write(client::Client& c, const std::string& ns, int doc, uint64_t seed) {
  auto opened = c.Open({kShape, DocTokens(doc), ns});
  EXPECT_TRUE(opened.ok()) << opened.status();
  if (!opened.ok()) return {};
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k = Rows(seed, l, false), v = Rows(seed, l, true);
    EXPECT_TRUE(
        c.Append(opened->id, l, kTokens, std::as_bytes(std::span(k)), std::as_bytes(std::span(v)))
            .ok());
  }
  return *opened;
}

// Opens `doc` in `ns`; returns (matched tokens, access) and checks that the matched rows are the
// rows of `seed` bit for bit. Closes the context.
std::pair<int64_t, client::PrefixAccess> Read(client::Client& c, const std::string& ns, int doc,
                                              uint64_t seed) {
  auto opened = c.Open({kShape, DocTokens(doc), ns});
  EXPECT_TRUE(opened.ok()) << opened.status();
  if (!opened.ok()) return {-1, client::PrefixAccess::kNone};
  const int64_t n = opened->matched_tokens;
  if (n > 0) {
    std::vector<int64_t> positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = i;
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> k(n * kDim), v(n * kDim);
      EXPECT_TRUE(c.Gather(opened->id, l, positions, std::as_writable_bytes(std::span(k)),
                           std::as_writable_bytes(std::span(v)))
                      .ok());
      const std::vector<float> want_k = Rows(seed, l, false), want_v = Rows(seed, l, true);
      EXPECT_TRUE(std::equal(k.begin(), k.end(), want_k.begin())) << "layer " << l;
      EXPECT_TRUE(std::equal(v.begin(), v.end(), want_v.begin())) << "layer " << l;
    }
  }
  EXPECT_TRUE(c.Close(opened->id).ok());
  return {n, opened->prefix_access};
}

int64_t Stat(client::Client& c, int64_t client::ServerStats::*field) {
  auto s = c.Stats();
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? (*s).*field : -1;
}

constexpr uint64_t kJunk = 666, kTruth = 1;

TEST(TrustTest, PoisonFromAnUnauthorisedWriterIsNeitherServedNorPersisted) {
  const std::string dir = FreshDir("poison");
  int port = FreePort();
  {
    auto daemon = StartDaemon(TrustSettings(dir, port));
    ASSERT_NE(daemon, nullptr);
    // A reader of "prod" (by uid) and a TCP session with only the daemon token both open the
    // victim's token ids in "prod" and append junk: neither is registered.
    auto poisoner = ConnectAs(daemon->socket_path(), 0, {});
    auto remote = ConnectAs(daemon->socket_path(), port, {});
    ASSERT_NE(poisoner, nullptr);
    ASSERT_NE(remote, nullptr);
    EXPECT_EQ(Write(*poisoner, "prod", 1, kJunk).prefix_access, client::PrefixAccess::kRead);
    EXPECT_EQ(Write(*remote, "prod", 1, kJunk + 1).prefix_access, client::PrefixAccess::kNone);
    EXPECT_EQ(Stat(*poisoner, &client::ServerStats::prefix_blocks_registered), 0);
    auto reader = ConnectAs(daemon->socket_path(), 0, {});
    auto [matched, access] = Read(*reader, "prod", 1, kTruth);
    EXPECT_EQ(matched, 0) << "a reader was served blocks that no writer of prod wrote";
    EXPECT_EQ(access, client::PrefixAccess::kRead);
    ASSERT_TRUE(daemon->Stop(SIGTERM, 30000).ok());
  }
  port = FreePort();
  {
    auto daemon = StartDaemon(TrustSettings(dir, port));
    ASSERT_NE(daemon, nullptr);
    auto reader = ConnectAs(daemon->socket_path(), 0, {});
    EXPECT_EQ(Stat(*reader, &client::ServerStats::prefix_blocks_known), 0) << "junk was persisted";
    EXPECT_EQ(Read(*reader, "prod", 1, kTruth).first, 0);
    // The writer's blocks are shared and persisted (so the checks above can fail).
    auto writer = ConnectAs(daemon->socket_path(), 0, {kProdWrite});
    EXPECT_EQ(Write(*writer, "prod", 1, kTruth).prefix_access, client::PrefixAccess::kWrite);
    EXPECT_EQ(Read(*reader, "prod", 1, kTruth).first, 2 * kBlock);
    ASSERT_TRUE(daemon->Stop(SIGTERM, 30000).ok());
  }
  port = FreePort();
  auto daemon = StartDaemon(TrustSettings(dir, port));
  ASSERT_NE(daemon, nullptr);
  auto reader = ConnectAs(daemon->socket_path(), 0, {});
  EXPECT_EQ(Read(*reader, "prod", 1, kTruth).first, 2 * kBlock);
  // A reader appending after the shared prefix still works; its own blocks stay private.
  EXPECT_EQ(Write(*reader, "prod", 2, kJunk).prefix_access, client::PrefixAccess::kRead);
  auto other_reader = ConnectAs(daemon->socket_path(), 0, {});
  EXPECT_EQ(Read(*other_reader, "prod", 2, kJunk).first, 0);
  std::filesystem::remove_all(dir);
}

TEST(TrustTest, NamespacesAndScopesSeeNothingOfEachOther) {
  const std::string dir = FreshDir("scopes");
  const int port = FreePort();
  auto daemon = StartDaemon(TrustSettings(dir, port));
  ASSERT_NE(daemon, nullptr);
  const std::string& socket = daemon->socket_path();
  auto writer = ConnectAs(socket, 0, {kOtherWrite});
  ASSERT_NE(writer, nullptr);
  EXPECT_EQ(Write(*writer, "other", 3, kTruth).prefix_access, client::PrefixAccess::kWrite);

  // A Unix peer that reads "prod" by uid has no right to "other", and "prod" has no such blocks.
  auto prod_reader = ConnectAs(socket, 0, {});
  EXPECT_EQ(Read(*prod_reader, "other", 3, kTruth),
            std::make_pair(int64_t{0}, client::PrefixAccess::kNone));
  EXPECT_EQ(Read(*prod_reader, "prod", 3, kTruth).first, 0);
  // The read token of "other", over the Unix socket and over TCP.
  auto other_reader = ConnectAs(socket, 0, {kOtherRead});
  EXPECT_EQ(Read(*other_reader, "other", 3, kTruth),
            std::make_pair(int64_t{2} * kBlock, client::PrefixAccess::kRead));
  auto tcp_reader = ConnectAs(socket, port, {kOtherRead});
  EXPECT_EQ(Read(*tcp_reader, "other", 3, kTruth).first, 2 * kBlock);
  EXPECT_EQ(Read(*tcp_reader, "prod", 3, kTruth).first, 0);

  // An unlisted namespace is scoped per uid: shared by this uid's Unix peers, invisible to TCP.
  auto scratch_writer = ConnectAs(socket, 0, {});
  EXPECT_EQ(Write(*scratch_writer, "scratch", 4, kTruth).prefix_access,
            client::PrefixAccess::kWrite);
  auto same_uid = ConnectAs(socket, 0, {});
  EXPECT_EQ(Read(*same_uid, "scratch", 4, kTruth).first, 2 * kBlock);
  auto tcp = ConnectAs(socket, port, {});
  EXPECT_EQ(Read(*tcp, "scratch", 4, kTruth).first, 0);
  EXPECT_EQ(Read(*same_uid, "other", 4, kTruth).first, 0);
  std::filesystem::remove_all(dir);
}

// The message of a NOT_FOUND with the context id replaced, to compare errors across ids.
std::string Shape(const absl::Status& s, client::ContextId id) {
  return absl::StrReplaceAll(s.message(), {{std::to_string(id), "<id>"}});
}

TEST(TrustTest, ContextsBelongToTheirSessionAndAdminsMayListAndDropThem) {
  const std::string dir = FreshDir("owner");
  const int port = FreePort();
  auto daemon = StartDaemon(TrustSettings(dir, port));
  ASSERT_NE(daemon, nullptr);
  const std::string& socket = daemon->socket_path();
  auto a = ConnectAs(socket, 0, {});
  auto b = ConnectAs(socket, 0, {});
  auto tcp = ConnectAs(socket, port, {});
  ASSERT_TRUE(a && b && tcp);
  auto ctx = a->Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  auto own = b->Open({kShape, {}, ""});
  ASSERT_TRUE(own.ok()) << own.status();
  const client::ContextId id = ctx->id, missing = id ^ 0x5a5a5a5a5a5a5a5aull;

  const std::vector<float> rows = Rows(7, 0, false);
  std::span<const std::byte> kv = std::as_bytes(std::span(rows).first(kDim));
  std::vector<float> q(kQHeads * kDim, 0.25f), out(q.size()), lse(kQHeads);
  std::vector<int64_t> positions = {0};
  std::vector<float> g(kDim);
  for (client::Client* other : {b.get(), tcp.get()}) {
    // Every operation on A's context fails exactly as on an id that does not exist.
    const absl::Status info = other->Info(id).status();
    EXPECT_EQ(info.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(Shape(info, id), Shape(other->Info(missing).status(), missing));
    const absl::Status drop = other->Drop(id);
    EXPECT_EQ(drop.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(Shape(drop, id), Shape(other->Drop(missing), missing));
    EXPECT_EQ(other->Append(id, 0, 1, kv, kv).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(other->Attend(id, 0, q, {}, out, lse).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(other
                  ->Gather(id, 0, positions, std::as_writable_bytes(std::span(g)),
                           std::as_writable_bytes(std::span(g)))
                  .code(),
              absl::StatusCode::kNotFound);
    EXPECT_EQ(other->Seal(id).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(other->Close(id).code(), absl::StatusCode::kNotFound);
    auto list = other->ListContexts();
    ASSERT_TRUE(list.ok()) << list.status();
    for (const client::ContextInfo& i : *list) EXPECT_NE(i.id, id);
  }
  auto b_list = b->ListContexts();
  ASSERT_TRUE(b_list.ok());
  ASSERT_EQ(b_list->size(), 1u);
  EXPECT_EQ((*b_list)[0].id, own->id);
  // A's context is untouched.
  EXPECT_TRUE(a->Append(id, 0, 1, kv, kv).ok());
  EXPECT_TRUE(a->Attend(id, 0, q, {}, out, lse).ok());
  auto info = a->Info(id);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->tokens_per_layer[0], 1);

  // The admin token, over TCP and the Unix socket: list everything, inspect and drop A's context.
  auto tcp_admin = ConnectAs(socket, port, {kAdminToken});
  auto admin = ConnectAs(socket, 0, {kAdminToken});
  ASSERT_TRUE(tcp_admin && admin);
  auto all = tcp_admin->ListContexts();
  ASSERT_TRUE(all.ok()) << all.status();
  std::set<client::ContextId> ids;
  for (const client::ContextInfo& i : *all) ids.insert(i.id);
  EXPECT_EQ(ids, (std::set<client::ContextId>{id, own->id}));
  auto admin_info = admin->Info(id);
  ASSERT_TRUE(admin_info.ok()) << admin_info.status();
  EXPECT_EQ(admin_info->session_id, a->session_id());
  EXPECT_TRUE(admin->Drop(id).ok());
  EXPECT_EQ(a->Info(id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(a->Append(id, 0, 1, kv, kv).code(), absl::StatusCode::kNotFound);

  // A credential that matches nothing is refused at Hello.
  client::ClientOptions o;
  o.socket_path = socket;
  o.credentials = {"not-a-configured-token-000"};
  EXPECT_EQ(client::Client::Connect(o).status().code(), absl::StatusCode::kPermissionDenied);
  std::filesystem::remove_all(dir);
}

// Runs `checks` in a child process as uid/gid 65534 (nobody); returns its exit code (0 = every
// check held, else the number of the first that failed; 100+ = could not become nobody).
template <typename Checks>
int AsNobody(Checks checks) {
  const pid_t pid = fork();
  if (pid == 0) {
    const gid_t groups[] = {4242};  // a supplementary group, bound to namespace "grp" below
    if (setgroups(1, groups) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(100);
    _exit(checks());
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 200;
}

// The SO_PEERCRED path with a real second uid: its namespace rights come from its uid and its
// supplementary groups, it sees nothing of root's per-uid scope or contexts, and it is not an
// administrator.
TEST(TrustTest, ASecondUidIsAuthorisedByItsPeerCredentials) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to connect as a second uid";
  const std::string dir = FreshDir("uid");
  auto daemon =
      StartDaemon({"persist.path=" + dir, "persist.durability=sync",
                   "store.prefill_segment_tokens=" + std::to_string(kBlock),
                   "store.recent_tokens=" + std::to_string(kRecent), "store.sink_tokens=2",
                   "trust.namespace.team.write_uids=65534", "trust.namespace.team.read_uids=self",
                   "trust.namespace.grp.read_gids=4242"});
  ASSERT_NE(daemon, nullptr);
  const std::string socket = daemon->socket_path();
  ASSERT_EQ(chmod(socket.c_str(), 0666), 0);  // let nobody reach the socket
  auto root = ConnectAs(socket, 0, {});
  ASSERT_NE(root, nullptr);
  EXPECT_EQ(Write(*root, "scratch", 5, kTruth).prefix_access, client::PrefixAccess::kWrite);
  EXPECT_EQ(Write(*root, "team", 6, kJunk).prefix_access, client::PrefixAccess::kRead);
  auto ctx = root->Open({kShape, {}, ""});
  ASSERT_TRUE(ctx.ok());
  const client::ContextId id = ctx->id;

  const int failed = AsNobody([&]() -> int {
    client::ClientOptions o;
    o.socket_path = socket;
    o.shared_memory_bytes = size_t{4} << 20;
    auto c = client::Client::Connect(o);
    if (!c.ok()) return 1;
    auto scratch = (*c)->Open({kShape, DocTokens(5), "scratch"});  // root's per-uid scope
    if (!scratch.ok() || scratch->matched_tokens != 0) return 2;
    if ((*c)->Info(id).status().code() != absl::StatusCode::kNotFound) return 3;
    if ((*c)->Drop(id).code() != absl::StatusCode::kNotFound) return 4;
    auto list = (*c)->ListContexts();  // not an administrator: only its own context
    if (!list.ok() || list->size() != 1 || (*list)[0].id != scratch->id) return 5;
    auto grp = (*c)->Open({kShape, DocTokens(6), "grp"});  // a reader by supplementary group
    if (!grp.ok() || grp->prefix_access != client::PrefixAccess::kRead) return 8;
    auto team = (*c)->Open({kShape, DocTokens(6), "team"});  // a writer by uid
    if (!team.ok() || team->prefix_access != client::PrefixAccess::kWrite) return 6;
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> k = Rows(kTruth, l, false), v = Rows(kTruth, l, true);
      if (!(*c)->Append(team->id, l, kTokens, std::as_bytes(std::span(k)),
                        std::as_bytes(std::span(v)))
               .ok()) {
        return 7;
      }
    }
    return 0;
  });
  EXPECT_EQ(failed, 0) << "check " << failed << " failed in the child running as nobody";
  // root reads "team" by uid: the blocks nobody wrote, not root's own junk.
  EXPECT_EQ(Read(*root, "team", 6, kTruth).first, 2 * kBlock);
  std::filesystem::remove_all(dir);
}

TEST(TrustTest, ContextIdsAreNotSequential) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  std::vector<client::ContextId> ids;
  for (int i = 0; i < 32; ++i) {
    auto ctx = c->Open({kShape, {}, ""});
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ids.push_back(ctx->id);
  }
  EXPECT_EQ(std::set<client::ContextId>(ids.begin(), ids.end()).size(), ids.size());
  // 64 random bits: two of 32 ids within 2^32 of each other has probability ~2^-23.
  int close_pairs = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_NE(ids[i], 0u);
    for (size_t j = 0; j < i; ++j) {
      const uint64_t d = ids[i] > ids[j] ? ids[i] - ids[j] : ids[j] - ids[i];
      close_pairs += d < (uint64_t{1} << 32);
    }
  }
  EXPECT_EQ(close_pairs, 0) << "context ids " << ids[0] << ", " << ids[1] << ", " << ids[2];
}

}  // namespace
}  // namespace kvwave::testing
