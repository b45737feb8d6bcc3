#include "rpc/auth.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"

namespace kvwave::rpc {
namespace {

// Constant time in the contents (not the length) of the strings.
bool TokenEquals(const std::string& presented, const std::string& configured) {
  if (configured.empty() || presented.size() != configured.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < presented.size(); ++i) {
    diff |= static_cast<unsigned char>(presented[i] ^ configured[i]);
  }
  return diff == 0;
}

PrefixAccess Max(PrefixAccess a, PrefixAccess b) { return a < b ? b : a; }

// True when the peer's primary or a supplementary group is in `gids`.
bool InAny(const PeerCredentials& peer, const config::IdSet& gids) {
  if (gids.any) return true;
  for (uint32_t g : gids.ids) {
    if (peer.InGroup(g)) return true;
  }
  return false;
}

}  // namespace

PeerCredentials ReadPeerCredentials(int fd) {
  PeerCredentials out;
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && len == sizeof(cred)) {
    out.known = true;
    out.uid = cred.uid;
    out.gid = cred.gid;
    out.pid = cred.pid;
  }
  if (!out.known) return out;
  // The kernel copies the peer's groups as of connect(2); ERANGE tells the size needed.
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t bytes = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &bytes) == 0) {
      out.groups.assign(groups.begin(), groups.begin() + bytes / sizeof(gid_t));
      break;
    }
    if (errno != ERANGE) break;
    groups.resize(bytes / sizeof(gid_t) + 1);
  }
  return out;
}

bool PeerCredentials::InGroup(uint32_t g) const {
  return g == gid || std::find(groups.begin(), groups.end(), g) != groups.end();
}

TrustPolicy::TrustPolicy(const config::Settings& settings)
    : admin_token_(settings.admin_token),
      unlisted_(settings.unlisted_namespaces),
      rules_(settings.namespaces) {
  absl::StatusOr<config::IdSet> admins = config::ParseIdSet(settings.admin_uids, geteuid());
  if (admins.ok()) admin_uids_ = *std::move(admins);  // else none: Load has refused it already
}

absl::StatusOr<Principal> TrustPolicy::Authenticate(
    bool local, const PeerCredentials& peer, std::span<const std::string> credentials) const {
  if (credentials.size() > kMaxCredentials) {
    return absl::InvalidArgumentError(
        absl::StrCat(credentials.size(), " credentials at Hello, at most ", kMaxCredentials));
  }
  Principal who;
  who.local = local;
  who.peer = local ? peer : PeerCredentials{};
  who.admin = who.peer.known && admin_uids_.Contains(who.peer.uid);
  for (size_t c = 0; c < credentials.size(); ++c) {
    const std::string& token = credentials[c];
    bool matched = false;
    if (TokenEquals(token, admin_token_)) {
      who.admin = true;
      matched = true;
    }
    for (size_t r = 0; r < rules_.size(); ++r) {
      PrefixAccess access = PrefixAccess::kNone;
      if (TokenEquals(token, rules_[r].write_token)) access = PrefixAccess::kWrite;
      if (TokenEquals(token, rules_[r].read_token)) access = Max(access, PrefixAccess::kRead);
      if (access == PrefixAccess::kNone) continue;
      who.token_grants.emplace_back(r, access);
      matched = true;
    }
    if (!matched) {
      return absl::PermissionDeniedError(
          absl::StrCat("credential ", c, " of Hello matches no configured token"));
    }
  }
  return who;
}

NamespaceGrant TrustPolicy::DecideNamespace(const Principal& who, absl::string_view name) const {
  NamespaceGrant grant;
  const auto rule = std::find_if(rules_.begin(), rules_.end(),
                                 [&](const config::NamespaceRule& r) { return r.name == name; });
  if (rule != rules_.end()) {
    const size_t index = static_cast<size_t>(rule - rules_.begin());
    if (who.peer.known) {
      if (rule->write_uids.Contains(who.peer.uid) || InAny(who.peer, rule->write_gids)) {
        grant.access = PrefixAccess::kWrite;
      } else if (rule->read_uids.Contains(who.peer.uid) || InAny(who.peer, rule->read_gids)) {
        grant.access = PrefixAccess::kRead;
      }
    }
    for (const auto& [r, access] : who.token_grants) {
      if (r == index) grant.access = Max(grant.access, access);
    }
    if (grant.access != PrefixAccess::kNone) grant.scope = absl::StrCat("ns/", name);
    return grant;
  }
  if (unlisted_ == "shared") {
    grant.access = PrefixAccess::kWrite;
    grant.scope = absl::StrCat("open/", name);
  } else if (unlisted_ == "per_uid" && who.peer.known) {
    grant.access = PrefixAccess::kWrite;
    grant.scope = absl::StrCat("uid/", who.peer.uid, "/", name);
  } else if (unlisted_ == "per_uid" && !who.local) {
    grant.access = PrefixAccess::kWrite;
    grant.scope = absl::StrCat("tcp/", name);
  }
  return grant;
}

}  // namespace kvwave::rpc
