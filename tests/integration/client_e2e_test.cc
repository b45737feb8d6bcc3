// The C++ client and the CLI against the real kvwaved: results checked against a float64
// reference, over shared memory, zero-copy shared memory and TCP (inline tensors).
#include <netinet/in.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

constexpr int kLayers = 2, kQHeads = 8, kKvHeads = 2, kDim = 64;
constexpr int64_t kTokens = 3000;

struct Data {
  std::vector<float> k, v;  // per layer [kTokens x kKvHeads x kDim], layers concatenated
  std::vector<float> q;     // [kQHeads x kDim]
};

Data MakeData(uint32_t seed) {
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Data d;
  d.k.resize(size_t(kLayers) * kTokens * kKvHeads * kDim);
  d.v.resize(d.k.size());
  d.q.resize(kQHeads * kDim);
  for (float& x : d.k) x = normal(rng);
  for (float& x : d.v) x = normal(rng);
  for (float& x : d.q) x = 0.5f * normal(rng);
  return d;
}

// Exact attention of layer `l` in float64: out [kQHeads x kDim], and top-k positions per head.
void Exact(const Data& d, int l, int top_k, std::vector<double>& out,
           std::vector<std::vector<int64_t>>& top) {
  out.assign(kQHeads * kDim, 0.0);
  top.assign(kQHeads, {});
  const float* k = &d.k[size_t(l) * kTokens * kKvHeads * kDim];
  const float* v = &d.v[size_t(l) * kTokens * kKvHeads * kDim];
  for (int h = 0; h < kQHeads; ++h) {
    const int kvh = h / (kQHeads / kKvHeads);
    std::vector<double> s(kTokens);
    for (int64_t i = 0; i < kTokens; ++i) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j)
        dot += double(d.q[h * kDim + j]) * k[(i * kKvHeads + kvh) * kDim + j];
      s[i] = dot / std::sqrt(double(kDim));
    }
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (int64_t i = 0; i < kTokens; ++i) {
      const double w = std::exp(s[i] - mx);
      sum += w;
      for (int j = 0; j < kDim; ++j) out[h * kDim + j] += w * v[(i * kKvHeads + kvh) * kDim + j];
    }
    for (int j = 0; j < kDim; ++j) out[h * kDim + j] /= sum;
    std::vector<int64_t> idx(kTokens);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(),
                      [&](int64_t a, int64_t b) { return s[a] > s[b]; });
    top[h].assign(idx.begin(), idx.begin() + top_k);
  }
}

void RoundTrip(client::Client& c, const Data& d, bool zero_copy) {
  auto ctx = c.Open({{kLayers, kQHeads, kKvHeads, kDim, DType::kF32}, {}, ""});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  const size_t layer_floats = size_t(kTokens) * kKvHeads * kDim;
  for (int l = 0; l < kLayers; ++l) {
    std::span<const float> k(&d.k[l * layer_floats], layer_floats);
    std::span<const float> v(&d.v[l * layer_floats], layer_floats);
    if (zero_copy) {  // place K/V in the shared region and pass them by offset
      auto region = c.SharedBuffer();
      ASSERT_GE(region.size(), 2 * layer_floats * 4);
      std::memcpy(region.data(), k.data(), layer_floats * 4);
      std::memcpy(region.data() + layer_floats * 4, v.data(), layer_floats * 4);
      ASSERT_TRUE(c.Append(ctx->id, l, kTokens, region.subspan(0, layer_floats * 4),
                           region.subspan(layer_floats * 4, layer_floats * 4))
                      .ok());
    } else {
      ASSERT_TRUE(c.Append(ctx->id, l, kTokens, std::as_bytes(k), std::as_bytes(v)).ok());
    }
  }
  ASSERT_TRUE(c.Seal(ctx->id).ok());
  for (int l = 0; l < kLayers; ++l) {
    std::vector<double> exact;
    std::vector<std::vector<int64_t>> top;
    Exact(d, l, 20, exact, top);
    std::vector<float> out(kQHeads * kDim), lse(kQHeads);
    client::AttendStats stats;
    ASSERT_TRUE(c.Attend(ctx->id, l, d.q, {1.0, 0.0}, out, lse, &stats).ok());
    for (int h = 0; h < kQHeads; ++h) {
      double num = 0, den = 0;
      for (int j = 0; j < kDim; ++j) {
        num += std::pow(out[h * kDim + j] - exact[h * kDim + j], 2);
        den += std::pow(exact[h * kDim + j], 2);
      }
      EXPECT_LT(std::sqrt(num / den), 1e-4) << "layer " << l << " head " << h;
    }
    std::vector<int64_t> positions(kQHeads * 20);
    std::vector<float> scores(kQHeads * 20);
    client::RetrieveOptions ro;
    ro.k = 20;
    ro.method = client::RetrieveMethod::kFlat;
    client::RetrieveStats rs;
    ASSERT_TRUE(c.Retrieve(ctx->id, l, d.q, ro, positions, scores, &rs).ok());
    int hits = 0;
    for (int h = 0; h < kQHeads; ++h) {
      for (int i = 0; i < 20; ++i) {
        hits += std::count(top[h].begin(), top[h].end(), positions[h * 20 + i]) > 0;
      }
    }
    EXPECT_GE(hits, kQHeads * 20 - 2) << "flat retrieval must match exact top-k";
    // Gather gives back exactly the appended rows.
    std::vector<int64_t> want = {0, 17, kTokens - 1, 1234};
    std::vector<float> gk(want.size() * kKvHeads * kDim), gv(gk.size());
    ASSERT_TRUE(c.Gather(ctx->id, l, want, std::as_writable_bytes(std::span<float>(gk)),
                         std::as_writable_bytes(std::span<float>(gv)))
                    .ok());
    for (size_t r = 0; r < want.size(); ++r) {
      for (int j = 0; j < kKvHeads * kDim; ++j) {
        const size_t src = l * layer_floats + want[r] * kKvHeads * kDim + j;
        ASSERT_EQ(gk[r * kKvHeads * kDim + j], d.k[src]);
        ASSERT_EQ(gv[r * kKvHeads * kDim + j], d.v[src]);
      }
    }
  }
  auto info = c.Info(ctx->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens_per_layer.size(), size_t(kLayers));
  EXPECT_EQ(info->tokens_per_layer[0], kTokens);
  EXPECT_EQ(info->session_id, c.session_id());
  EXPECT_TRUE(c.Close(ctx->id).ok());
  EXPECT_EQ(c.Close(ctx->id).code(), absl::StatusCode::kNotFound);
}

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

class ClientE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    port_ = FreePort();
    daemon_ =
        StartDaemon({"rpc.tcp_port=" + std::to_string(port_), "rpc.tcp_token=t", "gpu.mode=off"});
    ASSERT_NE(daemon_, nullptr);
  }
  int port_ = 0;
  std::unique_ptr<client::LocalDaemon> daemon_;
};

TEST_F(ClientE2ETest, SharedMemory) {
  auto c = Connect(daemon_->socket_path(), size_t{8} << 20);
  ASSERT_TRUE(c->uses_shared_memory());
  RoundTrip(*c, MakeData(101), /*zero_copy=*/false);
}

TEST_F(ClientE2ETest, SharedMemoryZeroCopy) {
  auto c = Connect(daemon_->socket_path(), size_t{8} << 20);
  RoundTrip(*c, MakeData(102), /*zero_copy=*/true);
}

TEST_F(ClientE2ETest, SharedRegionTooSmallFallsBackToInline) {
  auto c = Connect(daemon_->socket_path(), 4096);
  ASSERT_TRUE(c->uses_shared_memory());
  RoundTrip(*c, MakeData(103), /*zero_copy=*/false);
}

// The reply wait polls first (ClientOptions::poll_us), then blocks: both ends of that range give
// the same results, over shared memory and TCP.
TEST_F(ClientE2ETest, SameResultsWithoutAndWithLongPolling) {
  for (int poll_us : {0, 100000}) {
    SCOPED_TRACE(poll_us);
    client::ClientOptions o;
    o.socket_path = daemon_->socket_path();
    o.shared_memory_bytes = size_t{8} << 20;
    o.poll_us = poll_us;
    auto c = client::Client::Connect(o);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE((*c)->Ping().ok());
    RoundTrip(**c, MakeData(110 + poll_us % 7), /*zero_copy=*/false);
    o.tcp_port = port_;
    o.token = "t";
    auto t = client::Client::Connect(o);
    ASSERT_TRUE(t.ok()) << t.status();
    RoundTrip(**t, MakeData(120 + poll_us % 7), /*zero_copy=*/false);
  }
}

TEST_F(ClientE2ETest, TcpInline) {
  client::ClientOptions o;
  o.tcp_port = port_;
  o.token = "t";
  auto c = client::Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  RoundTrip(**c, MakeData(104), /*zero_copy=*/false);
}

// AttendBatch through the daemon: contexts of different lengths, one request, one reply, equal
// to one Attend per context; over shared memory and TCP; another session's context is refused.
TEST_F(ClientE2ETest, AttendBatchEqualsOneAttendPerContext) {
  client::ClientOptions o;
  o.socket_path = daemon_->socket_path();
  o.shared_memory_bytes = size_t{8} << 20;
  auto shm = client::Client::Connect(o);
  ASSERT_TRUE(shm.ok()) << shm.status();
  o.tcp_port = port_;
  o.token = "t";
  auto tcp = client::Client::Connect(o);
  ASSERT_TRUE(tcp.ok()) << tcp.status();
  for (client::Client* c : {shm->get(), tcp->get()}) {
    const Data d = MakeData(130);
    std::vector<client::AttendBatchEntry> entries;
    for (int64_t n : {int64_t{40}, int64_t{900}, kTokens}) {
      auto ctx = c->Open({{kLayers, kQHeads, kKvHeads, kDim, DType::kF32}, {}, ""});
      ASSERT_TRUE(ctx.ok()) << ctx.status();
      for (int l = 0; l < kLayers; ++l) {
        const size_t off = size_t(l) * kTokens * kKvHeads * kDim, len = n * kKvHeads * kDim;
        ASSERT_TRUE(c->Append(ctx->id, l, n, std::as_bytes(std::span(d.k).subspan(off, len)),
                              std::as_bytes(std::span(d.v).subspan(off, len)))
                        .ok());
      }
      entries.push_back({ctx->id, {-1, -1}});  // the server's default budgets
    }
    entries[0].budget = {1.0, 0.0};
    const size_t qd = kQHeads * kDim, b = entries.size();
    std::vector<float> q;
    for (size_t i = 0; i < b; ++i) q.insert(q.end(), d.q.begin(), d.q.end());
    std::vector<float> out(b * qd), lse(b * kQHeads);
    std::vector<client::AttendStats> stats(b);
    ASSERT_TRUE(c->AttendBatch(1, entries, q, out, lse, stats).ok());
    for (size_t i = 0; i < b; ++i) {
      std::vector<float> one(qd), one_lse(kQHeads);
      ASSERT_TRUE(c->Attend(entries[i].ctx, 1, d.q, entries[i].budget, one, one_lse).ok());
      for (size_t j = 0; j < qd; ++j) ASSERT_EQ(out[i * qd + j], one[j]) << i << " " << j;
      for (int h = 0; h < kQHeads; ++h) ASSERT_EQ(lse[i * kQHeads + h], one_lse[h]);
    }
    // Unsealed (under a segment): every token is in the steady zone, per KV head.
    EXPECT_EQ(stats[0].steady_tokens, 40 * kKvHeads);
    EXPECT_EQ(stats[2].steady_tokens, kTokens * kKvHeads);
    // A context of another session is not this session's to attend.
    auto other = Connect(daemon_->socket_path());
    auto foreign = other->Open({{kLayers, kQHeads, kKvHeads, kDim, DType::kF32}, {}, ""});
    ASSERT_TRUE(foreign.ok());
    std::vector<client::AttendBatchEntry> mixed = {entries[0], {foreign->id, {}}};
    EXPECT_EQ(c->AttendBatch(1, mixed, std::span(q).first(2 * qd), std::span(out).first(2 * qd),
                             std::span(lse).first(2 * kQHeads))
                  .code(),
              absl::StatusCode::kNotFound);
  }
}

TEST_F(ClientE2ETest, ListAndDropAcrossSessions) {
  auto owner = Connect(daemon_->socket_path());
  auto admin = Connect(daemon_->socket_path());
  auto ctx = owner->Open({{1, 2, 1, 64, DType::kF16}, {}, ""});
  ASSERT_TRUE(ctx.ok());
  auto list = admin->ListContexts();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].id, ctx->id);
  EXPECT_EQ((*list)[0].session_id, owner->session_id());
  EXPECT_EQ((*list)[0].shape.dtype, DType::kF16);
  EXPECT_TRUE(admin->Drop(ctx->id).ok());
  EXPECT_EQ(owner->Seal(ctx->id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(admin->Drop(ctx->id).code(), absl::StatusCode::kNotFound);
}

std::string RunCli(const std::string& args, int* rc) {
  const std::string cmd = BinaryDir() + "/client/kvwave " + args + " 2>&1";
  std::FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  *rc = WEXITSTATUS(pclose(p));
  return out;
}

TEST_F(ClientE2ETest, Cli) {
  auto owner = Connect(daemon_->socket_path());
  auto ctx = owner->Open({{3, 4, 2, 128, DType::kBF16}, {}, ""});
  ASSERT_TRUE(ctx.ok());
  const std::string s = "--socket " + daemon_->socket_path() + " ";
  int rc;
  std::string out = RunCli(s + "ping -n 3", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("pong"), std::string::npos) << out;
  out = RunCli(s + "contexts", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find(std::to_string(ctx->id)), std::string::npos) << out;
  EXPECT_NE(out.find("3/4/2/128/bf16"), std::string::npos) << out;
  out = RunCli(s + "stats", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("open"), std::string::npos) << out;
  // The test daemon attends on the CPU (CI has no GPU): the backend line says so, with zeros.
  EXPECT_NE(out.find("attention backend: cpu  device -1  gpu pool 0.0 / 0.0 MiB  hits 0"),
            std::string::npos)
      << out;
  out = RunCli(s + "stats --prometheus", &rc);
  EXPECT_NE(out.find("kvwave_request_seconds_bucket"), std::string::npos) << out;
  EXPECT_NE(out.find("kvwave_attention_backend{backend=\"cpu\"} 1"), std::string::npos) << out;
  EXPECT_NE(out.find("kvwave_gpu_pcie_bytes 0"), std::string::npos) << out;
  out = RunCli(s + "drop " + std::to_string(ctx->id), &rc);
  EXPECT_EQ(rc, 0) << out;
  out = RunCli(s + "drop " + std::to_string(ctx->id), &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("NOT_FOUND"), std::string::npos) << out;
  out = RunCli("--socket /tmp/does-not-exist.sock ping", &rc);
  EXPECT_NE(rc, 0);
}

}  // namespace
}  // namespace kvwave::testing
