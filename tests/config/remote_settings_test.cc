// The remote.* settings block: defaults, TOML, bounds and the cross-key rule (a remote mode
// other than off needs seed nodes).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config/settings.h"

namespace kvwave::config {
namespace {

TEST(RemoteSettingsTest, DefaultsAreOff) {
  auto s = LoadFromString("", {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->remote_mode, "off");
  EXPECT_TRUE(s->remote_redis.empty());
  EXPECT_EQ(s->remote_connect_timeout_ms, 200);
  EXPECT_EQ(s->remote_command_timeout_ms, 1000);
  EXPECT_EQ(s->remote_max_value_bytes, int64_t{8} << 20);
  EXPECT_EQ(s->remote_attach, "index");
  EXPECT_EQ(s->remote_fetch_threads, 1);
  EXPECT_EQ(s->remote_fetch_chunk_bytes, int64_t{512} << 10);
  EXPECT_EQ(s->remote_fetch_quiet_ms, 20);
}

TEST(RemoteSettingsTest, TomlBlockLoads) {
  auto s = LoadFromString(
      "[remote]\nredis = \"10.0.0.1:7000,10.0.0.2:7000\"\nmode = \"readwrite\"\n"
      "command_timeout_ms = 250\nqueue_bytes = 1048576\nmax_value_bytes = 65536\n"
      "user = \"prod\"\npassword = \"secret\"\nattach = \"whole\"\nfetch_threads = 0\n"
      "fetch_chunk_bytes = 65536\nfetch_quiet_ms = 0\n",
      {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->remote_mode, "readwrite");
  EXPECT_EQ(s->remote_redis, "10.0.0.1:7000,10.0.0.2:7000");
  EXPECT_EQ(s->remote_command_timeout_ms, 250);
  EXPECT_EQ(s->remote_queue_bytes, 1 << 20);
  EXPECT_EQ(s->remote_user, "prod");
  EXPECT_EQ(s->remote_attach, "whole");
  EXPECT_EQ(s->remote_fetch_threads, 0);
  EXPECT_EQ(s->remote_fetch_chunk_bytes, 65536);
  EXPECT_EQ(s->remote_fetch_quiet_ms, 0);
}

TEST(RemoteSettingsTest, BadValuesAreRefusedByName) {
  std::vector<std::vector<std::string>> bad = {
      {"remote.mode=sometimes", "remote.redis=h:1"},
      {"remote.mode=read"},  // no seed nodes
      {"remote.max_value_bytes=1000"},
      {"remote.max_value_bytes=1073741824"},  // Redis refuses values over 512 MB
      {"remote.command_timeout_ms=0"},
      {"remote.attach=sometimes"},
      {"remote.fetch_threads=-1"},
      {"remote.fetch_threads=1000"},
      {"remote.fetch_chunk_bytes=100"},
      {"remote.fetch_quiet_ms=-1"},
  };
  for (const auto& overrides : bad) {
    auto s = LoadFromString("", overrides);
    ASSERT_FALSE(s.ok()) << overrides[0];
    EXPECT_NE(s.status().message().find("remote."), std::string::npos) << s.status();
  }
}

}  // namespace
}  // namespace kvwave::config
