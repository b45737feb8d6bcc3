// A GPU lost mid-service (an error the CUDA runtime makes sticky: every later call of the process
// fails) must not leave kvwaved failing every call forever: the request that met it gets the
// error, the server logs it, shuts down as on SIGTERM and kvwaved exits 3 (rpc/server.h). A real
// device loss cannot be caused on this machine (no GPU), so the engine here runs the CPU backend
// behind a backend that reports the GPU lost from its second Attend on, the status exactly as
// gpu/cuda/backend.cc makes it; the server, socket, client and engine are the real ones.
#include "gpu/device_lost.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "config/settings.h"
#include "engine/attention_backend.h"
#include "engine/cpu_backend.h"
#include "engine/engine.h"
#include "kvwave/client.h"
#include "rpc/server.h"

namespace kvwave::rpc {
namespace {

class LostAfterBackend final : public engine::AttentionBackend {
 public:
  LostAfterBackend(std::unique_ptr<engine::AttentionBackend> cpu, int good_calls)
      : cpu_(std::move(cpu)), left_(good_calls) {}
  const char* name() const override { return "lost-after"; }
  absl::Status Attend(std::span<const engine::AttendItem> items) override {
    if (left_.fetch_sub(1) <= 0) {
      return gpu::MarkDeviceLost(absl::InternalError(
          "GPU device lost: cudaStreamSynchronize: cudaErrorIllegalAddress (injected)"));
    }
    return cpu_->Attend(items);
  }

 private:
  std::unique_ptr<engine::AttentionBackend> cpu_;
  std::atomic<int> left_;
};

TEST(DeviceLostTest, TheRequestFailsAndTheServerStopsWithExitCode3) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("kvwave_lost_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  config::Settings settings;
  settings.socket_path = (dir / "kvwaved.sock").string();
  settings.persist_path = "";
  settings.compute_threads = 2;
  settings.io_threads = 1;
  settings.metrics_port = 0;
  engine::EngineDeps deps;
  deps.backend = std::make_unique<LostAfterBackend>(engine::CreateCpuBackend(settings), 1);
  auto engine = engine::Engine::Create(settings, std::move(deps));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Server server(**engine, settings);
  ASSERT_TRUE(server.Start().ok());

  auto client = client::Client::Connect({.socket_path = settings.socket_path});
  ASSERT_TRUE(client.ok()) << client.status();
  const client::ModelShape shape{
      .layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64, .dtype = DType::kF32};
  auto ctx = (*client)->Open({.shape = shape});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  const int64_t n = 40;
  std::vector<float> k(n * 64), v(n * 64), q(2 * 64, 0.5f), out(2 * 64), lse(2);
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>((i * 7) % 13) / 13.0f;
    v[i] = static_cast<float>((i * 5) % 11) / 11.0f;
  }
  ASSERT_TRUE((*client)
                  ->Append(ctx->id, 0, n, std::as_bytes(std::span<const float>(k)),
                           std::as_bytes(std::span<const float>(v)))
                  .ok());
  // Other failures stop nothing: a bad layer, then a good call.
  EXPECT_FALSE((*client)->Attend(ctx->id, 7, q, {}, out, lse).ok());
  EXPECT_TRUE((*client)->Attend(ctx->id, 0, q, {}, out, lse).ok());
  EXPECT_EQ(server.exit_code(), 0);
  // The GPU is lost: this call fails with the backend's message, and the server stops.
  const absl::Status lost = (*client)->Attend(ctx->id, 0, q, {}, out, lse);
  EXPECT_FALSE(lost.ok());
  EXPECT_NE(lost.message().find("GPU device lost"), std::string::npos) << lost;
  server.Wait();  // returns without a signal: the server shut itself down
  EXPECT_EQ(server.exit_code(), 3);
  EXPECT_FALSE(std::filesystem::exists(settings.socket_path));  // stopped listening
  client->reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvwave::rpc
