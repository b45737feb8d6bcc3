// Sessions and the daemon's life: clients killed mid-request, 1,000 clients that connect and
// vanish, graceful shutdown with a request in flight, SIGHUP, the session limit, TCP with a token,
// the socket file's permissions and ownership. No test sleeps to synchronise: they wait on
// replies, pipes, waitpid, inotify events or (Eventually) a polled counter.
#include <netinet/in.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <fstream>
#include <random>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

namespace pb = rpc::pb;

client::ServerStats StatsOf(client::Client& c) {
  auto s = c.Stats();
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : client::ServerStats{};
}

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(LifecycleTest, ClientKilledMidRequestReleasesItsContexts) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto observer = Connect(daemon->socket_path());
  const client::ServerStats base = StatsOf(*observer);
  const std::vector<float> kv = RandomFloats(8000 * 2 * 128, 3);
  for (int round = 0; round < 3; ++round) {
    int progress[2];  // the child writes a byte after each request it completes
    ASSERT_EQ(pipe(progress), 0);
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      close(progress[0]);
      client::ClientOptions o;
      o.socket_path = daemon->socket_path();
      auto c = client::Client::Connect(o);
      if (!c.ok()) _exit(2);
      auto ctx = (*c)->Open({{4, 8, 2, 128, DType::kF32}, {}, ""});
      if (!ctx.ok()) _exit(3);
      auto bytes = std::as_bytes(std::span<const float>(kv));
      for (int i = 0;; ++i) {  // append until killed; Seal mid-way keeps the engine busy
        (void)(*c)->Append(ctx->id, i % 4, 8000, bytes, bytes);
        if (i % 4 == 3) (void)(*c)->Seal(ctx->id);
        if (write(progress[1], "x", 1) != 1) _exit(4);
      }
    }
    close(progress[1]);
    // Wait until the child holds a context with data and has done 2 + 3 * round more requests
    // (a different point of its work each round), then kill it mid-request.
    ASSERT_TRUE(Eventually(
        [&] { return StatsOf(*observer).memory_used_bytes > base.memory_used_bytes + (8 << 20); },
        20000));
    for (int done = 0; done < 2 + 3 * round;) {
      char buf[16];
      const ssize_t n = read(progress[0], buf, sizeof(buf));
      ASSERT_GT(n, 0) << "the client died";
      done += static_cast<int>(n);
    }
    close(progress[0]);
    kill(child, SIGKILL);
    int status;
    waitpid(child, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status));
  }
  EXPECT_TRUE(Eventually(
      [&] {
        const auto s = StatsOf(*observer);
        return s.contexts == base.contexts && s.memory_used_bytes == base.memory_used_bytes &&
               s.sessions == 1 && s.in_flight == 0;
      },
      20000));
  const auto after = StatsOf(*observer);
  EXPECT_EQ(after.contexts, base.contexts);
  EXPECT_EQ(after.memory_used_bytes, base.memory_used_bytes);
  EXPECT_EQ(after.sessions, 1);
  EXPECT_EQ(after.in_flight, 0);
  EXPECT_TRUE(observer->Ping().ok());
}

// A client that queues requests and closes its socket before their replies are written: the
// daemon's writes to it fail (EPIPE) and cost only that connection. (A daemon that let SIGPIPE
// kill it failed this, and ClientKilledMidRequestReleasesItsContexts now and then.)
TEST(LifecycleTest, ClientGoneBeforeItsRepliesLeavesTheDaemonUp) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto observer = Connect(daemon->socket_path());
  std::string burst;  // pings in one write; the replies outlast the connection
  for (uint64_t i = 0; i < 4000; ++i) {
    rpc::FrameHeader h;
    h.type = pb::PING;
    h.request_id = i + 2;
    auto frame = rpc::EncodeFrame(h, pb::PingRequest());
    ASSERT_TRUE(frame.ok());
    burst += *frame;
  }
  for (int round = 0; round < 40; ++round) {
    RawConnection c(daemon->socket_path());
    ASSERT_TRUE(c.Hello(0)) << "round " << round << (daemon->Running() ? "" : ": kvwaved is gone");
    ASSERT_TRUE(c.SendBytes(burst.data(), burst.size())) << round;
  }  // closed here, with replies still being written
  EXPECT_TRUE(Eventually([&] { return StatsOf(*observer).sessions == 1; }));
  EXPECT_TRUE(daemon->Running());
  EXPECT_TRUE(observer->Ping().ok());
}

TEST(LifecycleTest, ThousandClientsConnectAndVanish) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto observer = Connect(daemon->socket_path());
  // Warm up (first allocations of the engine and the server), then take the baseline.
  {
    auto c = Connect(daemon->socket_path());
    auto ctx = c->Open({{1, 4, 1, 64, DType::kF32}, {}, ""});
    ASSERT_TRUE(ctx.ok());
  }
  ASSERT_TRUE(Eventually([&] { return StatsOf(*observer).sessions == 1; }));
  const client::ServerStats base = StatsOf(*observer);
  const std::vector<float> kv = RandomFloats(256 * 64, 5);
  auto bytes = std::as_bytes(std::span<const float>(kv));
  for (int i = 0; i < 1000; ++i) {
    switch (i % 4) {
      case 0: {  // connect, say nothing, vanish
        RawConnection c(daemon->socket_path());
        ASSERT_TRUE(c.ok()) << i;
        break;
      }
      case 1: {  // half a header, vanish
        RawConnection c(daemon->socket_path());
        c.SendBytes("KVW1\x01", 5);
        break;
      }
      case 2: {  // hello with a region, then vanish
        RawConnection c(daemon->socket_path());
        ASSERT_TRUE(c.Hello(1 << 16)) << i;
        break;
      }
      case 3: {  // open a context, fill it, vanish without closing
        client::ClientOptions o;
        o.socket_path = daemon->socket_path();
        o.shared_memory_bytes = 1 << 20;
        auto c = client::Client::Connect(o);
        ASSERT_TRUE(c.ok()) << c.status();
        auto ctx = (*c)->Open({{1, 4, 1, 64, DType::kF32}, {}, ""});
        ASSERT_TRUE(ctx.ok());
        ASSERT_TRUE((*c)->Append(ctx->id, 0, 256, bytes, bytes).ok());
        break;
      }
    }
  }
  EXPECT_TRUE(Eventually(
      [&] {
        const auto s = StatsOf(*observer);
        return s.sessions == 1 && s.contexts == base.contexts &&
               s.memory_used_bytes == base.memory_used_bytes;
      },
      30000));
  const auto after = StatsOf(*observer);
  EXPECT_EQ(after.sessions, 1);
  EXPECT_EQ(after.contexts, base.contexts);
  EXPECT_EQ(after.memory_used_bytes, base.memory_used_bytes);
  EXPECT_GE(after.sessions_total, base.sessions_total + 1000);
  // RSS: allocator caches may keep some pages; it must not grow with the number of clients.
  std::printf("rss: baseline %.1f MiB, after 1000 clients %.1f MiB\n", base.rss_bytes / 1048576.0,
              after.rss_bytes / 1048576.0);
  EXPECT_LT(after.rss_bytes, base.rss_bytes + (48 << 20));
  EXPECT_LE(after.host_pool_idle_bytes, after.host_pool_limit_bytes);
  EXPECT_TRUE(observer->Ping().ok());
}

// Freed KV blocks stay resident for the next context, up to store.host_pool_bytes; they are not
// charged as used memory, and the stats show them.
TEST(LifecycleTest, HostPoolKeepsFreedBlocksWithinItsLimit) {
  auto daemon = StartDaemon({"store.host_pool_bytes=" + std::to_string(24 << 20)});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const client::ServerStats base = StatsOf(*c);
  EXPECT_EQ(base.host_pool_limit_bytes, 24 << 20);
  const std::vector<float> kv = RandomFloats(2000 * 2 * 128, 9);
  const auto bytes = std::as_bytes(std::span<const float>(kv));
  auto fill = [&] {  // 4 layers x 2 heads x 2000 rows x 512 B: 1 MiB tails, 16 MiB in all
    auto ctx = c->Open({{4, 4, 2, 128, DType::kF32}, {}, ""});
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    for (int layer = 0; layer < 4; ++layer) {
      ASSERT_TRUE(c->Append(ctx->id, layer, 2000, bytes, bytes).ok());
    }
    EXPECT_GE(StatsOf(*c).memory_used_bytes, base.memory_used_bytes + 4 * 2 * 2000 * 512 * 2);
    ASSERT_TRUE(c->Close(ctx->id).ok());
  };
  fill();
  ASSERT_TRUE(Eventually([&] { return StatsOf(*c).memory_used_bytes == base.memory_used_bytes; }));
  const client::ServerStats after_first = StatsOf(*c);
  EXPECT_GT(after_first.host_pool_idle_bytes, 8 << 20);
  EXPECT_LE(after_first.host_pool_idle_bytes, 24 << 20);
  fill();
  ASSERT_TRUE(Eventually([&] { return StatsOf(*c).memory_used_bytes == base.memory_used_bytes; }));
  const client::ServerStats after_second = StatsOf(*c);
  EXPECT_GT(after_second.host_pool_hits, after_first.host_pool_hits) << "the second reused blocks";
  EXPECT_LE(after_second.host_pool_idle_bytes, 24 << 20);
  EXPECT_NE(after_second.prometheus_text.find("kvwave_host_pool_idle_bytes"), std::string::npos);
}

TEST(LifecycleTest, GracefulShutdownDrainsInFlightRequests) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  RawConnection c(daemon->socket_path());
  ASSERT_TRUE(c.Hello(0));
  pb::OpenRequest open;
  open.mutable_shape()->set_layers(1);
  open.mutable_shape()->set_q_heads(8);
  open.mutable_shape()->set_kv_heads(2);
  open.mutable_shape()->set_head_dim(128);
  open.mutable_shape()->set_dtype(pb::F32);
  ASSERT_TRUE(c.SendFrame(pb::OPEN, 1, open));
  auto f = c.ReadFrame(5000);
  pb::OpenResponse opened;
  ASSERT_TRUE(opened.ParseFromArray(f->body.data(), static_cast<int>(f->body.size())));
  const std::vector<float> kv = RandomFloats(8000 * 2 * 128, 11);
  pb::AppendRequest req;
  req.set_context_id(opened.context_id());
  req.set_layer(0);
  req.set_tokens(8000);
  req.mutable_k()->set_data(kv.data(), kv.size() * 4);
  req.mutable_v()->set_data(kv.data(), kv.size() * 4);
  ASSERT_TRUE(c.SendFrame(pb::APPEND, 2, req));
  pb::SealRequest seal;
  seal.set_context_id(opened.context_id());
  ASSERT_TRUE(c.SendFrame(pb::SEAL, 3, seal));
  // The daemon has read both requests once nothing we sent is left unread in the socket.
  ASSERT_TRUE(Eventually([&] {
    int unread = -1;
    return ioctl(c.fd(), TIOCOUTQ, &unread) == 0 && unread == 0;
  }));
  kill(daemon->pid(), SIGTERM);
  // Both requests sent before SIGTERM are answered (OK, or UNAVAILABLE if the server read the
  // Seal only after draining began), then the connection closes and kvwaved exits 0.
  int answered = 0;
  while (auto reply = c.ReadFrame(30000)) {
    const int code = StatusCodeOf(*reply);
    EXPECT_TRUE(code == 0 || code == static_cast<int>(absl::StatusCode::kUnavailable)) << code;
    ++answered;
  }
  EXPECT_EQ(answered, 2);
  auto code = daemon->Stop(SIGTERM, 30000);  // a repeated SIGTERM does not force; just waits
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);
}

TEST(LifecycleTest, SighupKeepsServingAndSessionLimitHolds) {
  const std::string dir = ::testing::TempDir();
  const std::string config = dir + "kvwave-sighup-" + std::to_string(getpid()) + ".toml";
  const std::string log = dir + "kvwave-sighup-" + std::to_string(getpid()) + ".log";
  auto write_config = [&](int64_t max_frame_bytes, bool with_namespace) {
    std::ofstream(config)
        << "[rpc]\nmax_sessions = 3\nmax_frame_bytes = " << max_frame_bytes
        << "\n[log]\nlevel = \"info\"\n"
        << (with_namespace ? "[trust.namespace.docs]\nwrite_token = \"secret-w-0123456789abcdef\"\n"
                           : "");
  };
  write_config(int64_t{256} << 20, false);
  client::LocalDaemonOptions o;
  o.config_path = config;
  o.log_path = log;
  o.overrides = {"log.level=info"};
  auto daemon = StartDaemonWith(o);
  ASSERT_NE(daemon, nullptr);
  auto a = Connect(daemon->socket_path());
  auto b = Connect(daemon->socket_path());
  auto c = Connect(daemon->socket_path());
  ASSERT_TRUE(a && b && c);
  client::ClientOptions co;
  co.socket_path = daemon->socket_path();
  auto fourth = client::Client::Connect(co);
  EXPECT_FALSE(fourth.ok());
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted) << fourth.status();
  // A key SIGHUP cannot apply changes: kvwaved keeps serving and says it needs a restart.
  write_config(int64_t{128} << 20, true);
  kill(daemon->pid(), SIGHUP);
  ASSERT_TRUE(Eventually([&] {
    return ReadTextFile(log).find("SIGHUP: reloaded") != std::string::npos;
  })) << ReadTextFile(log);
  const std::string logged = ReadTextFile(log);
  EXPECT_NE(logged.find("rpc.max_frame_bytes changed (268435456 -> 134217728) but is not "
                        "reloadable: restart kvwaved"),
            std::string::npos)
      << logged;
  // So do the trust tables; the tokens in them are never logged.
  EXPECT_NE(logged.find("[trust.namespace.*] tables changed but are not reloadable"),
            std::string::npos)
      << logged;
  EXPECT_EQ(logged.find("secret-w"), std::string::npos) << logged;
  EXPECT_TRUE(daemon->Running());
  EXPECT_TRUE(a->Ping().ok());
  EXPECT_EQ(a->server_max_frame_bytes(), uint64_t{256} << 20);
  unlink(config.c_str());
  unlink(log.c_str());
}

// Issue 15 #13: the socket was bound (0777 under umask 0) and chmod'ed afterwards. It must only
// ever appear at its path already 0660: moved into place (IN_MOVED_TO), never created there.
TEST(LifecycleTest, SocketAppearsOnlyWithItsFinalPermissions) {
  const std::string dir = ::testing::TempDir() + "kvwave-sock-" + std::to_string(getpid());
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  const std::string path = dir + "/kvwaved.sock";
  const int watch = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  ASSERT_GE(watch, 0);
  ASSERT_GE(inotify_add_watch(watch, dir.c_str(), IN_CREATE | IN_MOVED_TO), 0);
  const mode_t old_umask = umask(0);  // the daemon inherits it
  client::LocalDaemonOptions o;
  o.socket_path = path;
  auto daemon = StartDaemonWith(o);
  umask(old_umask);
  ASSERT_NE(daemon, nullptr);
  struct stat st;
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  bool created = false, moved = false;
  alignas(inotify_event) char buf[4096];
  for (ssize_t n; (n = read(watch, buf, sizeof(buf))) > 0;) {
    for (char* p = buf; p < buf + n;) {
      const auto* e = reinterpret_cast<const inotify_event*>(p);
      if (e->len > 0 && std::string(e->name) == "kvwaved.sock") {
        created |= (e->mask & IN_CREATE) != 0;
        moved |= (e->mask & IN_MOVED_TO) != 0;
      }
      p += sizeof(inotify_event) + e->len;
    }
  }
  close(watch);
  EXPECT_FALSE(created) << "the socket was created at its path (with the umask's permissions)";
  EXPECT_TRUE(moved);
  ASSERT_TRUE(daemon->Stop(SIGTERM, 20000).ok());
  rmdir(dir.c_str());
}

// Issue 15 #13: on shutdown kvwaved unlinked its socket path even when another server owned it
// by then. It removes only the socket it created.
TEST(LifecycleTest, ShutdownLeavesAnotherServersSocket) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  const std::string path = daemon->socket_path();
  ASSERT_EQ(unlink(path.c_str()), 0);  // someone else takes the path over
  const int other = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(bind(other, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  auto code = daemon->Stop(SIGTERM, 20000);
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);
  struct stat st;
  EXPECT_EQ(lstat(path.c_str(), &st), 0) << "kvwaved removed a socket it did not create";
  close(other);
  unlink(path.c_str());
  // And its own socket it does remove.
  auto second = StartDaemon();
  ASSERT_NE(second, nullptr);
  const std::string own = second->socket_path();
  ASSERT_TRUE(second->Stop(SIGTERM, 20000).ok());
  EXPECT_NE(lstat(own.c_str(), &st), 0);
}

TEST(LifecycleTest, SecondSigintForcesExit) {
  auto daemon = StartDaemon();
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  kill(daemon->pid(), SIGINT);
  kill(daemon->pid(), SIGINT);
  auto code = daemon->Stop(0, 20000);  // signal 0: just wait
  ASSERT_TRUE(code.ok());
  // Either the drain finished before the second signal was handled (0) or it was forced (130).
  EXPECT_TRUE(*code == 0 || *code == 130) << *code;
}

TEST(LifecycleTest, TcpNeedsTheToken) {
  const int port = FreeTcpPort();
  auto daemon = StartDaemon({"rpc.tcp_port=" + std::to_string(port), "rpc.tcp_token=s3cret"});
  ASSERT_NE(daemon, nullptr);
  client::ClientOptions o;
  o.tcp_port = port;
  o.token = "wrong";
  auto bad = client::Client::Connect(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kPermissionDenied);
  o.token = "s3cret";
  auto good = client::Client::Connect(o);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_FALSE((*good)->uses_shared_memory());
  EXPECT_TRUE((*good)->Ping().ok());
}

}  // namespace
}  // namespace kvwave::testing
