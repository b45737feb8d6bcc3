// The trust settings: [trust.namespace.NAME] tables from TOML and from overrides, id lists, and
// the checks that refuse a weak or reused token.
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "config/settings.h"

namespace kvwave::config {
namespace {

const NamespaceRule* Rule(const Settings& s, const std::string& name) {
  for (const NamespaceRule& r : s.namespaces) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

TEST(TrustSettingsTest, DefaultsBindNothingAndAdministerAsTheDaemonsUid) {
  auto s = LoadFromString("", {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->namespaces.empty());
  EXPECT_EQ(s->admin_uids, "self");
  EXPECT_EQ(s->unlisted_namespaces, "per_uid");
  EXPECT_TRUE(s->admin_token.empty());
}

TEST(TrustSettingsTest, NamespaceTablesFromTomlAndOverrides) {
  const std::string toml =
      "[trust]\nadmin_uids = \"0, 1000\"\n"
      "[trust.namespace.prod]\nwrite_uids = [1001, 1002]\nread_gids = \"*\"\n"
      "write_token = \"0123456789abcdef-w\"\n"
      "[trust.namespace.\"a.b\"]\nread_uids = \"self\"\n";
  std::vector<std::string> overrides = {"trust.namespace.prod.read_token=0123456789abcdef-r",
                                        "trust.namespace.a.b.write_gids=7,8",
                                        "trust.namespace.new.read_uids=5"};
  auto s = LoadFromString(toml, overrides);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->namespaces.size(), 3u);
  const NamespaceRule* prod = Rule(*s, "prod");
  ASSERT_NE(prod, nullptr);
  EXPECT_EQ(prod->write_uids.ids, (std::vector<uint32_t>{1001, 1002}));
  EXPECT_TRUE(prod->write_uids.Contains(1002));
  EXPECT_FALSE(prod->write_uids.Contains(1003));
  EXPECT_TRUE(prod->read_gids.any);
  EXPECT_TRUE(prod->read_gids.Contains(12345));
  EXPECT_EQ(prod->write_token, "0123456789abcdef-w");
  EXPECT_EQ(prod->read_token, "0123456789abcdef-r");
  const NamespaceRule* dotted = Rule(*s, "a.b");
  ASSERT_NE(dotted, nullptr);
  EXPECT_EQ(dotted->read_uids.ids, (std::vector<uint32_t>{static_cast<uint32_t>(geteuid())}));
  EXPECT_EQ(dotted->write_gids.ids, (std::vector<uint32_t>{7, 8}));
  ASSERT_NE(Rule(*s, "new"), nullptr);
  EXPECT_EQ(Rule(*s, "new")->read_uids.ids, (std::vector<uint32_t>{5}));
}

TEST(TrustSettingsTest, BadValuesAreErrorsNamingTheKey) {
  struct Case {
    std::string override;
    std::string key_in_error;
  };
  const std::vector<Case> cases = {
      {"trust.namespace.prod.write_uids=10,abc", "trust.namespace.prod.write_uids"},
      {"trust.namespace.prod.colour=blue", "trust.namespace.prod.colour"},
      {"trust.namespace.prod.write_token=short", "trust.namespace.prod.write_token"},
      {"trust.admin_uids=root", "trust.admin_uids"},
      {"trust.admin_token=tooshort", "trust.admin_token"},
      {"trust.unlisted_namespaces=everyone", "trust.unlisted_namespaces"},
      {"trust.namespace..read_uids=1", "trust.namespace"},
  };
  for (const Case& c : cases) {
    auto s = LoadFromString("", std::vector<std::string>{c.override});
    ASSERT_FALSE(s.ok()) << c.override;
    EXPECT_NE(s.status().message().find(c.key_in_error), absl::string_view::npos)
        << c.override << ": " << s.status();
  }
  auto bad_toml = LoadFromString("[trust.namespace.prod]\nwrite_uids = [1, \"x\"]\n", {});
  EXPECT_FALSE(bad_toml.ok());
}

TEST(TrustSettingsTest, OneTokenMayNotServeTwoRoles) {
  const std::string t = "0123456789abcdef-shared";
  for (const std::vector<std::string>& overrides : std::vector<std::vector<std::string>>{
           {"trust.admin_token=" + t, "trust.namespace.x.read_token=" + t},
           {"trust.namespace.x.write_token=" + t, "trust.namespace.x.read_token=" + t},
           {"rpc.tcp_port=1", "rpc.tcp_token=" + t, "trust.admin_token=" + t}}) {
    auto s = LoadFromString("", overrides);
    ASSERT_FALSE(s.ok()) << overrides[0];
    EXPECT_NE(s.status().message().find("same token"), absl::string_view::npos) << s.status();
  }
}

TEST(TrustSettingsTest, PrintedDefaultsDescribeTheNamespaceTableAndLoadBack) {
  const std::string printed = PrintDefaults();
  EXPECT_NE(printed.find("[trust.namespace.NAME]"), std::string::npos);
  EXPECT_NE(printed.find("admin_uids = \"self\""), std::string::npos);
  auto s = LoadFromString(printed, {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->namespaces.empty());
}

}  // namespace
}  // namespace kvwave::config
