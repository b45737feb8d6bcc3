// The trust model of kvwaved: who a session is (its Principal, fixed at Hello) and what it may do.
//
//   Unix socket  the kernel's peer credentials (SO_PEERCRED: uid, gid; SO_PEERGROUPS: the
//                supplementary groups), read at accept;
//                reaching the socket at all is governed by its file permissions (0660).
//   TCP          the daemon token (rpc.tcp_token) admits the session; it has no uid.
//   Either       Hello may carry credentials (tokens): trust.admin_token, and the write_token /
//                read_token of any [trust.namespace.NAME]. A credential that matches no
//                configured token refuses the Hello (PERMISSION_DENIED).
//
// Contexts belong to the session that opened them (rpc/service.cc enforces it; other sessions get
// NOT_FOUND). Administrators (trust.admin_uids on the Unix socket, trust.admin_token anywhere) may
// also list, inspect and drop every session's contexts. Shared prefix blocks belong to a
// namespace: DecideNamespace is THE rule for which sessions read (attach) and write (register and
// persist) blocks in it; every caller (Open, a remote tier) asks it and passes the answer on.
//
// Thread-safety: a TrustPolicy is immutable after construction (trust settings are not
// reloadable); Principal and PeerCredentials are values.
#ifndef KVWAVE_RPC_AUTH_H_
#define KVWAVE_RPC_AUTH_H_

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "config/settings.h"
#include "engine/engine.h"

namespace kvwave::rpc {

// The kernel's account of a Unix-socket peer, as of its connect(2).
struct PeerCredentials {
  bool known = false;  // false over TCP (and if SO_PEERCRED failed)
  uint32_t uid = 0;
  uint32_t gid = 0;              // the primary (effective) gid
  std::vector<uint32_t> groups;  // supplementary gids (SO_PEERGROUPS; empty if unavailable)
  int32_t pid = 0;

  bool InGroup(uint32_t g) const;  // primary or supplementary
};

// SO_PEERCRED (and SO_PEERGROUPS) of a connected Unix socket; unknown (known = false) if
// SO_PEERCRED fails.
PeerCredentials ReadPeerCredentials(int fd);

using engine::PrefixAccess;  // kNone < kRead < kWrite; writing implies reading

// A session's identity after Hello.
struct Principal {
  bool local = false;  // Unix socket
  PeerCredentials peer;
  bool admin = false;
  // Namespaces whose tokens came with Hello: (rule index in the policy, the access granted).
  std::vector<std::pair<size_t, PrefixAccess>> token_grants;
};

// The answer for one (session, namespace).
struct NamespaceGrant {
  PrefixAccess access = PrefixAccess::kNone;
  // The engine's name for the namespace (chain hashes, persisted records): bound namespaces
  // are "ns/NAME"; unlisted ones are scoped to who may share them ("uid/1000/NAME", "tcp/NAME",
  // "open/NAME"), so two scopes never match each other's blocks. Empty when access is kNone.
  std::string scope;
};

class TrustPolicy {
 public:
  static constexpr size_t kMaxCredentials = 64;

  // REQUIRES: `settings` passed config::Load's validation.
  explicit TrustPolicy(const config::Settings& settings);

  // Hello: who the session is. PERMISSION_DENIED when a credential matches no configured token;
  // INVALID_ARGUMENT for more than kMaxCredentials. Tokens are compared in constant time.
  absl::StatusOr<Principal> Authenticate(bool local, const PeerCredentials& peer,
                                         std::span<const std::string> credentials) const;

  // May `who` read or write the shared prefix blocks of namespace `name`, and under which scope.
  NamespaceGrant DecideNamespace(const Principal& who, absl::string_view name) const;

 private:
  config::IdSet admin_uids_;
  std::string admin_token_;
  std::string unlisted_;  // per_uid | shared | off
  std::vector<config::NamespaceRule> rules_;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_AUTH_H_
