#include "config/settings.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

namespace kvwave::config {
namespace {

TEST(SettingsTest, DefaultsMatchTheTable) {
  auto s = LoadFromString("", {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->prefill_segment_tokens, 8192);
  EXPECT_EQ(s->decode_segment_tokens, 1024);
  EXPECT_DOUBLE_EQ(s->retrieval_budget, 0.018);
  for (const Key& key : AllKeys()) {
    EXPECT_FALSE(ValueOf(*s, key.name).empty()) << key.name;
    EXPECT_FALSE(key.description.empty()) << key.name;
  }
}

TEST(SettingsTest, TomlThenOverrides) {
  std::vector<std::string> overrides = {"store.sink_tokens=8", "attend.retrieval_budget=0.05"};
  auto s = LoadFromString(
      "[store]\nsink_tokens = 2\nrecent_tokens = 32\n[rpc]\nsocket_path = \"/tmp/x.sock\"\n",
      overrides);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->sink_tokens, 8);  // the override wins
  EXPECT_EQ(s->recent_tokens, 32);
  EXPECT_EQ(s->socket_path, "/tmp/x.sock");
  EXPECT_DOUBLE_EQ(s->retrieval_budget, 0.05);
}

TEST(SettingsTest, ErrorsNameTheKey) {
  auto unknown = LoadFromString("[store]\nsegment_tokenz = 5\n", {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("store.segment_tokenz"), absl::string_view::npos);

  auto range = LoadFromString("[attend]\nretrieval_budget = 1.5\n", {});
  ASSERT_FALSE(range.ok());
  EXPECT_NE(range.status().message().find("attend.retrieval_budget"), absl::string_view::npos);

  auto type = LoadFromString("[store]\npage_tokens = \"eight\"\n", {});
  ASSERT_FALSE(type.ok());
  EXPECT_NE(type.status().message().find("store.page_tokens"), absl::string_view::npos);

  std::vector<std::string> bad = {"persist.durability=sometimes"};
  auto choice = LoadFromString("", bad);
  ASSERT_FALSE(choice.ok());
  EXPECT_NE(choice.status().message().find("persist.durability"), absl::string_view::npos);

  std::vector<std::string> nokey = {"nonsense"};
  EXPECT_FALSE(LoadFromString("", nokey).ok());
  EXPECT_FALSE(LoadFromString("this is not toml [", {}).ok());
  EXPECT_FALSE(Load("/nonexistent/kvwave.toml", {}).ok());
}

TEST(SettingsTest, CrossKeyRules) {
  // The budgets need not sum to 1: the daemon caps the default estimation at what retrieval
  // leaves (rpc/service_ops.cc).
  std::vector<std::string> o = {"attend.retrieval_budget=0.6", "attend.estimation_budget=0.6"};
  EXPECT_TRUE(LoadFromString("", o).ok());
  std::vector<std::string> tcp = {"rpc.tcp_port=9000"};
  EXPECT_FALSE(LoadFromString("", tcp).ok());  // TCP needs a token
}

TEST(SettingsTest, LoadsAFileAndPrintedDefaultsLoadBack) {
  const std::string path = ::testing::TempDir() + "/kvwave_defaults.toml";
  std::ofstream(path) << PrintDefaults();
  auto s = Load(path, {});
  ASSERT_TRUE(s.ok()) << s.status();
  Settings defaults;
  for (const Key& key : AllKeys()) EXPECT_EQ(ValueOf(*s, key.name), ValueOf(defaults, key.name));
}

TEST(SettingsTest, ApplyReloadableChangesOnlyReloadableKeys) {
  Settings current;
  std::vector<std::string> o = {"log.level=debug", "store.sink_tokens=9"};
  Settings fresh = LoadFromString("", o).value();
  std::vector<std::string> changed = ApplyReloadable(fresh, current);
  EXPECT_EQ(changed, std::vector<std::string>{"log.level"});
  EXPECT_EQ(current.log_level, "debug");
  EXPECT_EQ(current.sink_tokens, 4);
}

}  // namespace
}  // namespace kvwave::config
