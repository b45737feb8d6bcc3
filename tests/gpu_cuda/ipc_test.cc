// GPU clients through the real kvwaved (issue 17): this test process is the client, a kvwaved
// child process (gpu.mode = on) the server; q / out / lse live in this process's device memory
// and cross by CUDA IPC. Checks:
//   - AttendDevice / AttendBatchDevice equal the engine's Attend / AttendBatch of the same
//     daemon (host tensors, same contexts, same kernels) bit for bit, at the default budgets and
//     at 100% (which also equals float64 full attention over the appended K/V);
//   - faults: offsets outside a buffer, a buffer too small for the shape, unaligned offsets, a
//     forged handle, another GPU's uuid, a size past the allocation, an unknown registration:
//     each a clear error for that call, the session keeps working;
//   - a client killed with SIGKILL while holding registrations (and one killed mid-calls): the
//     daemon stays up, its registrations, mappings and events go back to zero and the GPU's free
//     memory to its baseline (a mapping left open would keep the dead client's buffers).
// Random contexts and queries; the seed is printed (KVWAVE_TEST_SEED). Skipped without a GPU.
#include <cuda_runtime.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "config/dtype.h"
#include "gpu/cuda_backend.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"

extern char** environ;

namespace kvwave {
namespace {

namespace kc = client;
constexpr int kLayers = 2, kQHeads = 8, kKvHeads = 2, kDim = 128, kGroup = kQHeads / kKvHeads;
constexpr int64_t kTokens = 20000;  // two sealed 8K segments + a tail
const kc::ModelShape kShape{kLayers, kQHeads, kKvHeads, kDim, DType::kBF16};

uint64_t Seed() {
  const char* env = std::getenv("KVWAVE_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (KVWAVE_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
}

bool Eventually(const std::function<bool()>& pred, int timeout_ms = 30000) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < give_up) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

std::unique_ptr<kc::LocalDaemon> StartGpuDaemon() {
  kc::LocalDaemonOptions o;
  const char* bin = std::getenv("KVWAVE_KVWAVED");
  o.binary = kc::FindKvwaved(bin != nullptr ? bin : "");
  o.overrides = {"log.level=warn", "gpu.mode=on", "gpu.cache_bytes=268435456"};
  auto d = kc::LocalDaemon::Start(o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : nullptr;
}

std::unique_ptr<kc::Client> Connect(const std::string& socket) {
  kc::ClientOptions o;
  o.socket_path = socket;
  auto c = kc::Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// One context's K/V (bf16, [tokens x kv_heads x d] per layer) drawn around random centres.
struct Kv {
  std::vector<std::vector<uint16_t>> k, v;  // [layer]
};

Kv MakeKv(std::mt19937_64& rng, int64_t tokens) {
  std::normal_distribution<float> nd;
  Kv kv;
  std::vector<float> centres(64 * kDim);
  for (float& x : centres) x = nd(rng);
  std::uniform_int_distribution<int> pick(0, 63);
  for (int l = 0; l < kLayers; ++l) {
    std::vector<uint16_t> k(tokens * kKvHeads * kDim), v(k.size());
    for (int64_t r = 0; r < tokens * kKvHeads; ++r) {
      const float* c = centres.data() + pick(rng) * kDim;
      for (int e = 0; e < kDim; ++e) {
        k[r * kDim + e] = FloatToBf16(c[e] + 0.5f * nd(rng));
        v[r * kDim + e] = FloatToBf16(nd(rng));
      }
    }
    kv.k.push_back(std::move(k));
    kv.v.push_back(std::move(v));
  }
  return kv;
}

// Opens a context, appends `kv` in chunks, and waits until its two segments per (layer, KV head)
// are sealed (background seals: a later Attend then sees the same index every time).
uint64_t OpenWithKv(kc::Client& c, const Kv& kv, int64_t tokens) {
  auto ctx = c.Open({kShape, {}, ""});
  EXPECT_TRUE(ctx.ok()) << ctx.status();
  const int64_t row = int64_t{kKvHeads} * kDim;
  for (int l = 0; l < kLayers; ++l)
    for (int64_t at = 0; at < tokens; at += 4096) {
      const int64_t n = std::min<int64_t>(4096, tokens - at);
      auto k = std::as_bytes(std::span(kv.k[l].data() + at * row, n * row));
      auto v = std::as_bytes(std::span(kv.v[l].data() + at * row, n * row));
      EXPECT_TRUE(c.Append(ctx->id, l, n, k, v).ok());
    }
  const int64_t want = (tokens / 8192) * kLayers * kKvHeads;
  EXPECT_TRUE(Eventually([&] {
    auto info = c.Info(ctx->id);
    return info.ok() && info->sealed_segments >= want;
  })) << "segments not sealed";
  return ctx->id;
}

// Float64 full attention of one query [q_heads x d] over `kv` layer l: out, lse.
void Reference(const Kv& kv, int l, int64_t tokens, const float* q, std::vector<double>& out,
               std::vector<double>& lse) {
  out.assign(kQHeads * kDim, 0);
  lse.assign(kQHeads, 0);
  const double scale = 1.0 / std::sqrt(double(kDim));
  std::vector<double> s(tokens);
  for (int h = 0; h < kQHeads; ++h) {
    const int kvh = h / kGroup;
    double mx = -INFINITY;
    for (int64_t t = 0; t < tokens; ++t) {
      const uint16_t* k = kv.k[l].data() + (t * kKvHeads + kvh) * kDim;
      double dot = 0;
      for (int e = 0; e < kDim; ++e) dot += double(q[h * kDim + e]) * Bf16ToFloat(k[e]);
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    double sum = 0;
    for (int64_t t = 0; t < tokens; ++t) sum += std::exp(s[t] - mx);
    for (int64_t t = 0; t < tokens; ++t) {
      const double p = std::exp(s[t] - mx) / sum;
      const uint16_t* v = kv.v[l].data() + (t * kKvHeads + kvh) * kDim;
      for (int e = 0; e < kDim; ++e) out[h * kDim + e] += p * Bf16ToFloat(v[e]);
    }
    lse[h] = mx + std::log(sum);
  }
}

// Device buffers of this process for q / out / lse of up to `batch` items (+ room for offsets).
struct DeviceIo {
  float *q = nullptr, *out = nullptr, *lse = nullptr;
  size_t q_bytes = 0, lse_bytes = 0;
  cudaStream_t stream = nullptr;
  explicit DeviceIo(int batch) {
    q_bytes = sizeof(float) * batch * kQHeads * kDim;
    lse_bytes = sizeof(float) * batch * kQHeads;
    EXPECT_EQ(cudaMalloc(&q, q_bytes), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&out, q_bytes), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&lse, lse_bytes), cudaSuccess);
    EXPECT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  }
  ~DeviceIo() {
    cudaStreamSynchronize(stream);
    cudaFree(q);
    cudaFree(out);
    cudaFree(lse);
    cudaStreamDestroy(stream);
  }
};

class IpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("KVWAVE_IPC_CHILD") != nullptr) GTEST_SKIP() << "child process";
    if (!gpu::CudaBackend::DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

// AttendDevice (one context) and AttendBatchDevice (two, at offsets) vs the host path of the
// same daemon, bit for bit; at 100% also vs float64.
TEST_F(IpcTest, DeviceEqualsHostPathBitForBit) {
  std::mt19937_64 rng(Seed());
  auto daemon = StartGpuDaemon();
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const int64_t tokens2 = kTokens - 1234;
  const Kv kv1 = MakeKv(rng, kTokens), kv2 = MakeKv(rng, tokens2);
  const uint64_t ctx1 = OpenWithKv(*c, kv1, kTokens), ctx2 = OpenWithKv(*c, kv2, tokens2);
  constexpr int kBatch = 3;  // room for two items at an offset of one
  DeviceIo io(kBatch);
  auto reg = c->RegisterDeviceBuffers(io.q, io.q_bytes, io.out, io.q_bytes, io.lse, io.lse_bytes);
  ASSERT_TRUE(reg.ok()) << reg.status();
  const size_t qn = kQHeads * kDim;
  std::normal_distribution<float> nd;
  double worst_full = 0;
  int compared = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const bool full = trial % 2 == 1;
    const kc::AttendBudget budget = full ? kc::AttendBudget{1.0, 0.0} : kc::AttendBudget{};
    const int l = trial % kLayers;
    std::vector<float> q(kBatch * qn);
    for (float& x : q) x = 2.0f * nd(rng);
    // Poison out / lse, then one context at offset 0 on the device path.
    CUDA_OK(cudaMemsetAsync(io.out, 0xff, io.q_bytes, io.stream));
    CUDA_OK(cudaMemsetAsync(io.lse, 0xff, io.lse_bytes, io.stream));
    CUDA_OK(cudaMemcpyAsync(io.q, q.data(), sizeof(float) * qn, cudaMemcpyHostToDevice, io.stream));
    kc::AttendStats st;
    ASSERT_TRUE(c->AttendDevice(*reg, ctx1, l, {}, budget, io.stream, &st).ok());
    std::vector<float> dout(qn), dlse(kQHeads);
    CUDA_OK(cudaMemcpyAsync(dout.data(), io.out, sizeof(float) * qn, cudaMemcpyDeviceToHost,
                            io.stream));
    CUDA_OK(cudaMemcpyAsync(dlse.data(), io.lse, sizeof(float) * kQHeads, cudaMemcpyDeviceToHost,
                            io.stream));
    CUDA_OK(cudaStreamSynchronize(io.stream));
    std::vector<float> hout(qn), hlse(kQHeads);
    ASSERT_TRUE(c->Attend(ctx1, l, std::span(q.data(), qn), budget, hout, hlse).ok());
    EXPECT_EQ(std::memcmp(dout.data(), hout.data(), sizeof(float) * qn), 0) << "trial " << trial;
    EXPECT_EQ(std::memcmp(dlse.data(), hlse.data(), sizeof(float) * kQHeads), 0) << trial;
    EXPECT_GT(st.total_clusters, 0);
    ++compared;
    if (full) {
      std::vector<double> rout, rlse;
      Reference(kv1, l, kTokens, q.data(), rout, rlse);
      double num = 0, den = 0;
      for (size_t i = 0; i < qn; ++i) {
        num += (dout[i] - rout[i]) * (dout[i] - rout[i]);
        den += rout[i] * rout[i];
      }
      const double rel = std::sqrt(num / den);
      worst_full = std::max(worst_full, rel);
      EXPECT_LT(rel, 1e-4) << "100% budget vs float64, trial " << trial;
      for (int h = 0; h < kQHeads; ++h) EXPECT_NEAR(dlse[h], rlse[h], 1e-3) << h;
    }
    // Two contexts at q / out offsets of one item (lse: of 16 floats, 16-byte aligned).
    const uint64_t qo = sizeof(float) * qn, lo = sizeof(float) * kQHeads;
    CUDA_OK(cudaMemsetAsync(io.out, 0xff, io.q_bytes, io.stream));
    CUDA_OK(cudaMemcpyAsync(io.q + qn, q.data() + qn, sizeof(float) * 2 * qn,
                            cudaMemcpyHostToDevice, io.stream));
    const kc::AttendBatchEntry entries[2] = {{ctx2, budget}, {ctx1, budget}};
    ASSERT_TRUE(c->AttendBatchDevice(*reg, l, entries, {qo, qo, lo}, io.stream).ok());
    std::vector<float> bout(2 * qn), blse(2 * kQHeads);
    CUDA_OK(cudaMemcpyAsync(bout.data(), io.out + qn, sizeof(float) * 2 * qn,
                            cudaMemcpyDeviceToHost, io.stream));
    CUDA_OK(cudaMemcpyAsync(blse.data(), io.lse + kQHeads, sizeof(float) * 2 * kQHeads,
                            cudaMemcpyDeviceToHost, io.stream));
    CUDA_OK(cudaStreamSynchronize(io.stream));
    std::vector<float> hbout(2 * qn), hblse(2 * kQHeads);
    ASSERT_TRUE(c->AttendBatch(l, entries, std::span(q.data() + qn, 2 * qn), hbout, hblse).ok());
    EXPECT_EQ(std::memcmp(bout.data(), hbout.data(), sizeof(float) * 2 * qn), 0) << trial;
    EXPECT_EQ(std::memcmp(blse.data(), hblse.data(), sizeof(float) * 2 * kQHeads), 0) << trial;
    compared += 2;
  }
  std::printf("device vs host path: %d items bit-equal; 100%% budget vs float64: worst %.3g\n",
              compared, worst_full);
  auto s = c->Stats();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->gpu_device_registrations, 1);
  EXPECT_EQ(s->gpu_ipc_mappings, 3);
  EXPECT_EQ(s->gpu_ipc_events, 2);
  EXPECT_EQ(s->gpu_device_errors, 0);
  ASSERT_TRUE(c->UnregisterDeviceBuffers(*reg).ok());
  s = c->Stats();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->gpu_device_registrations, 0);
  EXPECT_EQ(s->gpu_ipc_mappings, 0);
  EXPECT_EQ(s->gpu_ipc_events, 0);
}

// Real handles of this process's buffers (to forge variants of them).
kc::DeviceHandles Handles(const DeviceIo& io, cudaEvent_t* qe, cudaEvent_t* oe) {
  kc::DeviceHandles h;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  h.device_uuid.assign(reinterpret_cast<const char*>(&prop.uuid), 16);
  auto mem = [](const void* p, size_t bytes) {
    cudaIpcMemHandle_t m;
    EXPECT_EQ(cudaIpcGetMemHandle(&m, const_cast<void*>(p)), cudaSuccess);
    return kc::DeviceBufferHandle{std::string(reinterpret_cast<const char*>(&m), sizeof(m)), 0,
                                  bytes};
  };
  h.q = mem(io.q, io.q_bytes);
  h.out = mem(io.out, io.q_bytes);
  h.lse = mem(io.lse, io.lse_bytes);
  EXPECT_EQ(cudaEventCreateWithFlags(qe, cudaEventInterprocess | cudaEventDisableTiming),
            cudaSuccess);
  EXPECT_EQ(cudaEventCreateWithFlags(oe, cudaEventInterprocess | cudaEventDisableTiming),
            cudaSuccess);
  cudaIpcEventHandle_t e;
  cudaIpcGetEventHandle(&e, *qe);
  h.q_ready_event.assign(reinterpret_cast<const char*>(&e), sizeof(e));
  cudaIpcGetEventHandle(&e, *oe);
  h.out_ready_event.assign(reinterpret_cast<const char*>(&e), sizeof(e));
  return h;
}

TEST_F(IpcTest, BadBuffersAndHandlesFailThatCallOnly) {
  std::mt19937_64 rng(Seed());
  auto daemon = StartGpuDaemon();
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  const Kv kv = MakeKv(rng, 9000);
  const uint64_t ctx = OpenWithKv(*c, kv, 9000);
  DeviceIo io(2), small(1);
  auto reg = c->RegisterDeviceBuffers(io.q, io.q_bytes, io.out, io.q_bytes, io.lse, io.lse_bytes);
  ASSERT_TRUE(reg.ok()) << reg.status();
  // A q buffer of 64 bytes: registered fine, too small for any call.
  auto tiny =
      c->RegisterDeviceBuffers(small.q, 64, small.out, small.q_bytes, small.lse, small.lse_bytes);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  auto good_call = [&] {
    const absl::Status st = c->AttendDevice(*reg, ctx, 0, {}, {}, io.stream);
    return st.ok() && cudaStreamSynchronize(io.stream) == cudaSuccess;
  };
  std::vector<float> q(2 * kQHeads * kDim, 0.25f);
  CUDA_OK(cudaMemcpy(io.q, q.data(), io.q_bytes, cudaMemcpyHostToDevice));
  ASSERT_TRUE(good_call());
  auto expect = [&](absl::Status st, absl::StatusCode code, const char* words, const char* what) {
    EXPECT_EQ(st.code(), code) << what << ": " << st;
    EXPECT_NE(st.message().find(words), std::string::npos) << what << ": " << st;
    std::printf("%-28s -> %s\n", what, st.ToString().c_str());
    EXPECT_TRUE(good_call()) << "after " << what;
    EXPECT_TRUE(c->Ping().ok());
  };
  const uint64_t item = sizeof(float) * kQHeads * kDim;
  expect(c->AttendDevice(*reg, ctx, 0, {io.q_bytes, 0, 0}, {}, io.stream),
         absl::StatusCode::kOutOfRange, "pass the registered", "q offset past the buffer");
  expect(c->AttendDevice(*reg, ctx, 0, {0, item + 16, 0}, {}, io.stream),
         absl::StatusCode::kOutOfRange, "pass the registered", "out offset past the end");
  expect(c->AttendDevice(*reg, ctx, 0, {0, 0, uint64_t{1} << 62}, {}, io.stream),
         absl::StatusCode::kOutOfRange, "pass the registered", "huge lse offset");
  expect(c->AttendDevice(*reg, ctx, 0, {4, 0, 0}, {}, io.stream),
         absl::StatusCode::kInvalidArgument, "multiple of 16", "unaligned q offset");
  expect(c->AttendDevice(*tiny, ctx, 0, {}, {}, small.stream), absl::StatusCode::kOutOfRange,
         "pass the registered", "q buffer too small");
  expect(c->AttendDevice(987654, ctx, 0, {}, {}, io.stream), absl::StatusCode::kNotFound,
         "not open in this session", "unknown registration");
  cudaEvent_t qe, oe;
  const kc::DeviceHandles real = Handles(io, &qe, &oe);
  kc::DeviceHandles forged = real;
  std::uniform_int_distribution<int> byte(0, 255);
  for (char& ch : forged.q.ipc_handle) ch = static_cast<char>(byte(rng));
  expect(c->RegisterDeviceHandles(forged).status(), absl::StatusCode::kInvalidArgument,
         "refused the handle", "forged memory handle");
  forged = real;
  for (char& ch : forged.q_ready_event) ch = static_cast<char>(byte(rng));
  expect(c->RegisterDeviceHandles(forged).status(), absl::StatusCode::kInvalidArgument,
         "refused the handle", "forged event handle");
  forged = real;
  forged.q.ipc_handle.resize(10);
  expect(c->RegisterDeviceHandles(forged).status(), absl::StatusCode::kInvalidArgument, "64 bytes",
         "short handle");
  forged = real;
  forged.device_uuid[3] ^= 0x5a;
  expect(c->RegisterDeviceHandles(forged).status(), absl::StatusCode::kInvalidArgument,
         "another GPU", "another GPU's uuid");
  forged = real;
  forged.out.bytes = uint64_t{1} << 40;
  expect(c->RegisterDeviceHandles(forged).status(), absl::StatusCode::kOutOfRange,
         "pass the allocation", "size past the allocation");
  // The real handles register fine (the same allocations, mapped once: shared mappings).
  auto again = c->RegisterDeviceHandles(real);
  ASSERT_TRUE(again.ok()) << again.status();
  auto s = c->Stats();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->gpu_device_registrations, 3);
  EXPECT_EQ(s->gpu_ipc_mappings, 6);  // io's three (shared by reg and again), small's three
  c.reset();                          // the session ends: everything closed
  auto observer = Connect(daemon->socket_path());
  ASSERT_NE(observer, nullptr);
  EXPECT_TRUE(Eventually([&] {
    auto st = observer->Stats();
    return st.ok() && st->gpu_device_registrations == 0 && st->gpu_ipc_mappings == 0 &&
           st->gpu_ipc_events == 0 && st->sessions == 1;
  }));
  cudaEventDestroy(qe);
  cudaEventDestroy(oe);
  EXPECT_TRUE(daemon->Running());
}

// The child of the kill tests: registers 3 x 64 MiB of device buffers, attends once (or, with
// KVWAVE_IPC_CHILD_LOOP, forever), writes a byte to fd 3 after each call, then waits to be killed.
TEST(IpcChild, HoldsRegistrations) {
  const char* socket = std::getenv("KVWAVE_IPC_CHILD");
  if (socket == nullptr) GTEST_SKIP() << "only as the kill tests' child";
  std::mt19937_64 rng(7);
  auto c = Connect(socket);
  ASSERT_NE(c, nullptr);
  const Kv kv = MakeKv(rng, 9000);
  const uint64_t ctx = OpenWithKv(*c, kv, 9000);
  void *q, *out, *lse;
  const size_t big = size_t{64} << 20;
  CUDA_OK(cudaMalloc(&q, big));
  CUDA_OK(cudaMalloc(&out, big));
  CUDA_OK(cudaMalloc(&lse, big));
  CUDA_OK(cudaMemset(q, 0, big));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  auto reg = c->RegisterDeviceBuffers(q, big, out, big, lse, big);
  ASSERT_TRUE(reg.ok()) << reg.status();
  const bool loop = std::getenv("KVWAVE_IPC_CHILD_LOOP") != nullptr;
  do {
    ASSERT_TRUE(c->AttendDevice(*reg, ctx, 0, {}, {}, stream).ok());
    if (!loop) CUDA_OK(cudaStreamSynchronize(stream));
    ASSERT_EQ(write(3, "x", 1), 1);
  } while (loop);
  char b;
  (void)read(0, &b, 1);  // the parent never writes: blocks until killed
}

// Spawns this binary as IpcChild.HoldsRegistrations; returns its pid and the progress pipe.
pid_t SpawnChild(const std::string& socket, bool loop, int* progress, int* hold) {
  int p[2], h[2];
  if (pipe(p) != 0 || pipe(h) != 0) return -1;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, p[1], 3);
  posix_spawn_file_actions_adddup2(&fa, h[0], 0);
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) env_s.push_back(*e);
  env_s.push_back("KVWAVE_IPC_CHILD=" + socket);
  if (loop) env_s.push_back("KVWAVE_IPC_CHILD_LOOP=1");
  std::vector<char*> env;
  for (auto& s : env_s) env.push_back(s.data());
  env.push_back(nullptr);
  std::string self = "/proc/self/exe", filter = "--gtest_filter=IpcChild.HoldsRegistrations";
  char* argv[] = {self.data(), filter.data(), nullptr};
  pid_t pid = -1;
  if (posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv, env.data()) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  close(p[1]);
  close(h[0]);
  *progress = p[0];
  *hold = h[1];
  return pid;
}

void KillClientAndCheckBaseline(bool mid_calls) {
  auto daemon = StartGpuDaemon();
  ASSERT_NE(daemon, nullptr);
  auto observer = Connect(daemon->socket_path());
  ASSERT_NE(observer, nullptr);
  // Warm the daemon up with the child's shape (its wave buffer is made once), then the baseline.
  {
    std::mt19937_64 rng(1);
    auto c = Connect(daemon->socket_path());
    const Kv kv = MakeKv(rng, 9000);
    const uint64_t ctx = OpenWithKv(*c, kv, 9000);
    std::vector<float> q(kQHeads * kDim, 0.5f), out(q.size()), lse(kQHeads);
    ASSERT_TRUE(c->Attend(ctx, 0, q, {}, out, lse).ok());
    // Device calls back to back, as the child's: every slot of the wave buffer sized for them.
    DeviceIo io(1);
    CUDA_OK(cudaMemcpy(io.q, q.data(), io.q_bytes, cudaMemcpyHostToDevice));
    auto reg = c->RegisterDeviceBuffers(io.q, io.q_bytes, io.out, io.q_bytes, io.lse, io.lse_bytes);
    ASSERT_TRUE(reg.ok()) << reg.status();
    for (int i = 0; i < 40; ++i)
      ASSERT_TRUE(c->AttendDevice(*reg, ctx, i % kLayers, {}, {}, io.stream).ok());
    CUDA_OK(cudaStreamSynchronize(io.stream));
    ASSERT_TRUE(c->UnregisterDeviceBuffers(*reg).ok());
  }
  ASSERT_TRUE(Eventually([&] {
    auto s = observer->Stats();
    return s.ok() && s->sessions == 1 && s->contexts == 0;
  }));
  size_t free0 = 0, total = 0;
  CUDA_OK(cudaMemGetInfo(&free0, &total));
  for (int round = 0; round < 2; ++round) {
    int progress = -1, hold = -1;
    const pid_t child = SpawnChild(daemon->socket_path(), mid_calls, &progress, &hold);
    ASSERT_GT(child, 0);
    for (int done = 0; done < (mid_calls ? 5 + 7 * round : 1);) {
      char buf[16];
      const ssize_t n = read(progress, buf, sizeof(buf));
      ASSERT_GT(n, 0) << "the child died before its calls";
      done += static_cast<int>(n);
    }
    auto s = observer->Stats();
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->gpu_device_registrations, 1);
    EXPECT_EQ(s->gpu_ipc_mappings, 3);
    size_t free1 = 0;
    CUDA_OK(cudaMemGetInfo(&free1, &total));
    ASSERT_EQ(kill(child, SIGKILL), 0);
    int status = 0;
    waitpid(child, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status));
    close(progress);
    close(hold);
    const bool back = Eventually([&] {
      auto st = observer->Stats();
      return st.ok() && st->gpu_device_registrations == 0 && st->gpu_ipc_mappings == 0 &&
             st->gpu_ipc_events == 0 && st->sessions == 1 && st->contexts == 0;
    });
    EXPECT_TRUE(back) << "registrations not released after the client's kill";
    // The dead client's 192 MiB come back only if kvwaved unmapped them (slack: 32 MiB).
    size_t free2 = 0;
    EXPECT_TRUE(Eventually([&] {
      return cudaMemGetInfo(&free2, &total) == cudaSuccess && free2 + (size_t{32} << 20) >= free0;
    }));
    std::printf("round %d (%s): GPU free %.1f MiB before, %.1f with the client, %.1f after\n",
                round, mid_calls ? "killed mid-calls" : "killed holding", free0 / 1048576.0,
                free1 / 1048576.0, free2 / 1048576.0);
    EXPECT_TRUE(daemon->Running());
    EXPECT_TRUE(observer->Ping().ok());
  }
}

TEST_F(IpcTest, ClientKilledHoldingRegistrationsReleasesThem) { KillClientAndCheckBaseline(false); }
TEST_F(IpcTest, ClientKilledMidCallsReleasesThem) { KillClientAndCheckBaseline(true); }

}  // namespace
}  // namespace kvwave
