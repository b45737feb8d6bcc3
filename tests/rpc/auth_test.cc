// TrustPolicy (rpc/auth.h): who is an administrator and what each principal may do in a
// namespace, for every kind of credential; and SO_PEERCRED on a real socket pair.
#include "rpc/auth.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace kvwave::rpc {
namespace {

const std::string kAdmin = "admin-0123456789abcdef";
const std::string kWrite = "write-0123456789abcdef";
const std::string kRead = "read-0123456789abcdef";

config::Settings PolicySettings(const std::string& unlisted) {
  std::vector<std::string> overrides = {
      "trust.admin_uids=0, 42",
      "trust.admin_token=" + kAdmin,
      "trust.unlisted_namespaces=" + unlisted,
      "trust.namespace.prod.write_uids=100",
      "trust.namespace.prod.write_gids=500",
      "trust.namespace.prod.read_uids=200",
      "trust.namespace.prod.read_gids=600",
      "trust.namespace.prod.write_token=" + kWrite,
      "trust.namespace.prod.read_token=" + kRead,
  };
  auto s = config::LoadFromString("", overrides);
  EXPECT_TRUE(s.ok()) << s.status();
  return *s;
}

PeerCredentials Peer(uint32_t uid, uint32_t gid, std::vector<uint32_t> groups = {}) {
  PeerCredentials p;
  p.known = true;
  p.uid = uid;
  p.gid = gid;
  p.groups = std::move(groups);
  p.pid = 1;
  return p;
}

Principal Who(const TrustPolicy& p, bool local, PeerCredentials peer,
              std::vector<std::string> credentials = {}) {
  auto who = p.Authenticate(local, peer, credentials);
  EXPECT_TRUE(who.ok()) << who.status();
  return who.ok() ? *who : Principal{};
}

TEST(TrustPolicyTest, BoundNamespaceGrantsByUidGidAndToken) {
  const TrustPolicy p(PolicySettings("per_uid"));
  struct Case {
    bool local;
    PeerCredentials peer;
    std::vector<std::string> credentials;
    PrefixAccess want;
  };
  const std::vector<Case> cases = {
      {true, Peer(100, 1), {}, PrefixAccess::kWrite},         // write uid
      {true, Peer(1, 500), {}, PrefixAccess::kWrite},         // write gid
      {true, Peer(200, 1), {}, PrefixAccess::kRead},          // read uid
      {true, Peer(1, 600), {}, PrefixAccess::kRead},          // read gid
      {true, Peer(1, 1, {3, 600}), {}, PrefixAccess::kRead},  // supplementary read gid
      {true, Peer(1, 1, {500}), {}, PrefixAccess::kWrite},    // supplementary write gid
      {true, Peer(1, 1, {2, 3}), {}, PrefixAccess::kNone},    // a stranger
      {true, Peer(200, 1), {kWrite}, PrefixAccess::kWrite},   // token raises a reader
      {false, {}, {kRead}, PrefixAccess::kRead},              // TCP with the read token
      {false, {}, {}, PrefixAccess::kNone},                   // TCP: no uid, no token
      {false, Peer(100, 500), {}, PrefixAccess::kNone},       // TCP ignores any peer given
      {true, Peer(0, 0), {kAdmin}, PrefixAccess::kNone},      // admin is not a namespace right
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const NamespaceGrant g = p.DecideNamespace(Who(p, c.local, c.peer, c.credentials), "prod");
    EXPECT_EQ(g.access, c.want) << "case " << i;
    EXPECT_EQ(g.scope, c.want == PrefixAccess::kNone ? "" : "ns/prod") << "case " << i;
  }
}

TEST(TrustPolicyTest, AdministratorsByUidOrTokenOnly) {
  const TrustPolicy p(PolicySettings("per_uid"));
  EXPECT_TRUE(Who(p, true, Peer(42, 1)).admin);
  EXPECT_FALSE(Who(p, true, Peer(43, 42)).admin);  // a gid is not a uid
  EXPECT_FALSE(Who(p, false, Peer(42, 1)).admin);  // no uid over TCP
  EXPECT_TRUE(Who(p, false, {}, {kAdmin}).admin);
  EXPECT_FALSE(Who(p, true, Peer(100, 1), {kWrite}).admin);
  auto bad = p.Authenticate(true, Peer(1, 1), std::vector<std::string>{kAdmin + "x"});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kPermissionDenied);
  std::vector<std::string> many(TrustPolicy::kMaxCredentials + 1, kRead);
  EXPECT_EQ(p.Authenticate(true, Peer(1, 1), many).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TrustPolicyTest, UnlistedNamespacesFollowThePolicy) {
  const TrustPolicy per_uid(PolicySettings("per_uid"));
  const NamespaceGrant a = per_uid.DecideNamespace(Who(per_uid, true, Peer(7, 1)), "x");
  const NamespaceGrant b = per_uid.DecideNamespace(Who(per_uid, true, Peer(8, 1)), "x");
  const NamespaceGrant t = per_uid.DecideNamespace(Who(per_uid, false, {}), "x");
  EXPECT_EQ(a.access, PrefixAccess::kWrite);
  EXPECT_EQ(b.access, PrefixAccess::kWrite);
  EXPECT_EQ(t.access, PrefixAccess::kWrite);
  EXPECT_NE(a.scope, b.scope);
  EXPECT_NE(a.scope, t.scope);
  EXPECT_NE(a.scope, "ns/x");  // never the scope of a bound namespace of that name

  const TrustPolicy shared(PolicySettings("shared"));
  EXPECT_EQ(shared.DecideNamespace(Who(shared, true, Peer(7, 1)), "x").scope,
            shared.DecideNamespace(Who(shared, false, {}), "x").scope);

  const TrustPolicy off(PolicySettings("off"));
  EXPECT_EQ(off.DecideNamespace(Who(off, true, Peer(0, 0)), "x").access, PrefixAccess::kNone);
}

TEST(TrustPolicyTest, PeerCredentialsOfASocketPairAreOurs) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  const PeerCredentials c = ReadPeerCredentials(fds[0]);
  EXPECT_TRUE(c.known);
  EXPECT_EQ(c.uid, geteuid());
  EXPECT_EQ(c.gid, getegid());
  EXPECT_EQ(c.pid, getpid());
  std::vector<gid_t> mine(static_cast<size_t>(getgroups(0, nullptr)));
  mine.resize(static_cast<size_t>(getgroups(static_cast<int>(mine.size()), mine.data())));
  EXPECT_EQ(c.groups, std::vector<uint32_t>(mine.begin(), mine.end()));
  close(fds[0]);
  close(fds[1]);
  EXPECT_FALSE(ReadPeerCredentials(-1).known);
}

}  // namespace
}  // namespace kvwave::rpc
