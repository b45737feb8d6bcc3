#include "config/trust_settings.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "config/status_macros.h"

namespace kvwave::config {
namespace {

constexpr size_t kMinTokenBytes = 16;
constexpr size_t kMaxNamespaceBytes = 256;

// The fields of a [trust.namespace.NAME] table.
enum class Field { kWriteUids, kWriteGids, kReadUids, kReadGids, kWriteToken, kReadToken };
struct FieldSpec {
  absl::string_view name;
  Field field;
  absl::string_view description;
};
constexpr FieldSpec kFields[] = {
    {"write_uids", Field::kWriteUids, "Unix-socket peer uids that may write (and read)"},
    {"write_gids", Field::kWriteGids, "Unix-socket peer groups that may write (and read)"},
    {"read_uids", Field::kReadUids, "Unix-socket peer uids that may read"},
    {"read_gids", Field::kReadGids, "Unix-socket peer groups that may read"},
    {"write_token", Field::kWriteToken, "Hello credential that may write (and read)"},
    {"read_token", Field::kReadToken, "Hello credential that may read"},
};

const FieldSpec* FindField(absl::string_view name) {
  for (const FieldSpec& f : kFields) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

NamespaceRule& RuleFor(absl::string_view name, Settings& s) {
  for (NamespaceRule& r : s.namespaces) {
    if (r.name == name) return r;
  }
  NamespaceRule& r = s.namespaces.emplace_back();
  r.name = std::string(name);
  return r;
}

absl::Status CheckName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNamespaceBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "trust.namespace: a namespace name must have 1 to ", kMaxNamespaceBytes, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status SetField(NamespaceRule& rule, const FieldSpec& spec, absl::string_view text) {
  const std::string key = absl::StrCat(kNamespaceTablePrefix, rule.name, ".", spec.name);
  auto ids = [&](IdSet& out, uint32_t self) -> absl::Status {
    absl::StatusOr<IdSet> parsed = ParseIdSet(text, self);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("setting ", key, ": ", parsed.status().message()));
    }
    out = *std::move(parsed);
    return absl::OkStatus();
  };
  switch (spec.field) {
    case Field::kWriteUids:
      return ids(rule.write_uids, geteuid());
    case Field::kWriteGids:
      return ids(rule.write_gids, getegid());
    case Field::kReadUids:
      return ids(rule.read_uids, geteuid());
    case Field::kReadGids:
      return ids(rule.read_gids, getegid());
    case Field::kWriteToken:
      rule.write_token = std::string(text);
      return absl::OkStatus();
    case Field::kReadToken:
      rule.read_token = std::string(text);
      return absl::OkStatus();
  }
  return absl::InternalError("unhandled namespace field");
}

// A field's TOML value as override text: a string as is, an array of integers joined by commas.
absl::StatusOr<std::string> FieldText(absl::string_view key, const toml::value& v) {
  if (v.is_string()) return static_cast<std::string>(v.as_string());
  if (v.is_array()) {
    std::vector<std::string> parts;
    for (const toml::value& e : v.as_array()) {
      if (!e.is_integer()) break;
      parts.push_back(absl::StrCat(static_cast<int64_t>(e.as_integer())));
    }
    if (parts.size() == v.as_array().size()) return absl::StrJoin(parts, ",");
  }
  return absl::InvalidArgumentError(absl::StrCat("setting ", key, " has the wrong type"));
}

absl::Status CheckToken(absl::string_view key, const std::string& token) {
  if (!token.empty() && token.size() < kMinTokenBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("setting ", key, ": a token needs at least ", kMinTokenBytes, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

bool IdSet::Contains(uint32_t id) const {
  return any || std::find(ids.begin(), ids.end(), id) != ids.end();
}

absl::StatusOr<IdSet> ParseIdSet(absl::string_view text, uint32_t self) {
  IdSet set;
  for (absl::string_view part : absl::StrSplit(text, absl::ByAnyChar(", "), absl::SkipEmpty())) {
    uint32_t id;
    if (part == "*") {
      set.any = true;
    } else if (part == "self") {
      set.ids.push_back(self);
    } else if (absl::SimpleAtoi(part, &id)) {
      set.ids.push_back(id);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part, "' is not a number, \"self\" or \"*\""));
    }
  }
  return set;
}

absl::Status ApplyNamespaceToml(const toml::value& tables, Settings& s) {
  if (!tables.is_table()) {
    return absl::InvalidArgumentError("trust.namespace must be a table of [trust.namespace.NAME]");
  }
  for (const auto& [name, body] : tables.as_table()) {
    KVWAVE_RETURN_IF_ERROR(CheckName(name));
    const std::string prefix = absl::StrCat(kNamespaceTablePrefix, name);
    if (!body.is_table()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, " must be a table"));
    }
    NamespaceRule& rule = RuleFor(name, s);
    for (const auto& [field, v] : body.as_table()) {
      const std::string key = absl::StrCat(prefix, ".", field);
      const FieldSpec* spec = FindField(field);
      if (spec == nullptr) return absl::InvalidArgumentError("unknown setting '" + key + "'");
      KVWAVE_ASSIGN_OR_RETURN(std::string text, FieldText(key, v));
      KVWAVE_RETURN_IF_ERROR(SetField(rule, *spec, text));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyNamespaceOverride(absl::string_view key, absl::string_view value, Settings& s) {
  absl::string_view rest = key;
  absl::ConsumePrefix(&rest, kNamespaceTablePrefix);
  const size_t dot = rest.rfind('.');
  const FieldSpec* spec =
      dot == absl::string_view::npos ? nullptr : FindField(rest.substr(dot + 1));
  if (spec == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("unknown setting '", key, "'"));
  const absl::string_view name = rest.substr(0, dot);
  KVWAVE_RETURN_IF_ERROR(CheckName(name));
  return SetField(RuleFor(name, s), *spec, value);
}

absl::Status ValidateTrust(const Settings& s) {
  absl::StatusOr<IdSet> admins = ParseIdSet(s.admin_uids, geteuid());
  if (!admins.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("setting trust.admin_uids: ", admins.status().message()));
  }
  KVWAVE_RETURN_IF_ERROR(CheckToken("trust.admin_token", s.admin_token));
  // A token grants what every role holding it grants; two roles on one token is a mistake that
  // widens one of them (every TCP client would be an administrator, say).
  std::vector<std::pair<std::string, std::string>> tokens;  // (token, the key that holds it)
  auto add = [&](const std::string& token, std::string key) -> absl::Status {
    if (token.empty()) return absl::OkStatus();
    if (key != "rpc.tcp_token") KVWAVE_RETURN_IF_ERROR(CheckToken(key, token));
    for (const auto& [other, other_key] : tokens) {
      if (other == token) {
        return absl::InvalidArgumentError(
            absl::StrCat("settings ", other_key, " and ", key, " hold the same token"));
      }
    }
    tokens.emplace_back(token, std::move(key));
    return absl::OkStatus();
  };
  KVWAVE_RETURN_IF_ERROR(add(s.tcp_token, "rpc.tcp_token"));
  KVWAVE_RETURN_IF_ERROR(add(s.admin_token, "trust.admin_token"));
  for (const NamespaceRule& r : s.namespaces) {
    const std::string prefix = absl::StrCat(kNamespaceTablePrefix, r.name, ".");
    KVWAVE_RETURN_IF_ERROR(add(r.write_token, prefix + "write_token"));
    KVWAVE_RETURN_IF_ERROR(add(r.read_token, prefix + "read_token"));
  }
  return absl::OkStatus();
}

std::string NamespaceTableHelp() {
  std::string out =
      "\n# [trust.namespace.NAME]: binds prefix namespace NAME to credentials; there is one such\n"
      "# table per bound namespace and none by default. Writers register (share, persist) the\n"
      "# blocks their contexts seal in NAME and read its blocks; readers attach its blocks only.\n"
      "# uid/gid lists: \"1000, 1001\", \"self\" (kvwaved's own id), \"*\" (any peer), or TOML\n"
      "# arrays of integers. Tokens: at least 16 bytes, each used by one role only.\n"
      "# Override on the command line as trust.namespace.NAME.FIELD=value.\n"
      "# [trust.namespace.example]\n";
  for (const FieldSpec& f : kFields) {
    const std::string line = absl::StrCat("# ", f.name, " = \"\"");
    absl::StrAppend(&out, line, std::string(22 - std::min<size_t>(line.size(), 21), ' '), "# ",
                    f.description, "\n");
  }
  return out;
}

}  // namespace kvwave::config
