// The trust part of the settings that the flat key table cannot express: the [trust.namespace.NAME]
// tables (one per bound prefix namespace), their command-line overrides
// ("trust.namespace.NAME.FIELD=value"), their cross-key checks and their --print-config text.
// Internal to kvwave_config (settings.cc); the rest of kvwave reads Settings::namespaces.
//
// Thread-safety: stateless functions.
#ifndef KVWAVE_CONFIG_TRUST_SETTINGS_H_
#define KVWAVE_CONFIG_TRUST_SETTINGS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "config/settings.h"
#include "toml.hpp"

namespace kvwave::config {

inline constexpr absl::string_view kNamespaceTablePrefix = "trust.namespace.";

// `tables`: the value of [trust.namespace] (a table of NAME -> table of fields).
[[nodiscard]] absl::Status ApplyNamespaceToml(const toml::value& tables, Settings& s);
// `key` starts with kNamespaceTablePrefix: "trust.namespace.NAME.FIELD" (NAME may hold dots).
[[nodiscard]] absl::Status ApplyNamespaceOverride(absl::string_view key, absl::string_view value,
                                                  Settings& s);
// admin_uids parses; tokens are long enough and never shared between roles that differ.
[[nodiscard]] absl::Status ValidateTrust(const Settings& s);
// Commented TOML describing a [trust.namespace.NAME] table, for PrintDefaults.
std::string NamespaceTableHelp();

}  // namespace kvwave::config

#endif  // KVWAVE_CONFIG_TRUST_SETTINGS_H_
