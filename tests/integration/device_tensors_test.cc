// Device tensors (issue 17) against a kvwaved that attends on the CPU (this machine, CI): every
// device call is a clear error for that call, and the session keeps working. The GPU path itself
// is tested on a GPU machine by tests/gpu_cuda/ipc_test.cc.
#include <string>
#include <vector>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

TEST(DeviceTensorsTest, CpuDaemonAnswersNoGpuBackendAndKeepsServing) {
  auto daemon = StartDaemon({"gpu.mode=off"});
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  auto ctx = c->Open({{1, 4, 1, 64, DType::kF32}, {}, ""});
  ASSERT_TRUE(ctx.ok());
  std::vector<float> kv(100 * 64, 0.5f), q(4 * 64, 1.0f), out(q.size()), lse(4);
  auto bytes = std::as_bytes(std::span<const float>(kv));
  ASSERT_TRUE(c->Append(ctx->id, 0, 100, bytes, bytes).ok());

  client::DeviceHandles h;
  h.device_uuid = std::string(16, '\x01');
  h.q = {std::string(64, 'q'), 0, 1024};
  h.out = {std::string(64, 'o'), 0, 1024};
  h.lse = {std::string(64, 'l'), 0, 64};
  h.q_ready_event = std::string(64, 'e');
  h.out_ready_event = std::string(64, 'f');
  auto reg = c->RegisterDeviceHandles(h);
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kFailedPrecondition) << reg.status();
  EXPECT_NE(reg.status().message().find("no GPU backend"), std::string::npos) << reg.status();
  const absl::Status call = c->AttendDevice(1, ctx->id, 0, {}, {}, nullptr);
  EXPECT_EQ(call.code(), absl::StatusCode::kNotFound) << call;
  EXPECT_NE(call.message().find("not open in this session"), std::string::npos) << call;
  EXPECT_EQ(c->UnregisterDeviceBuffers(1).code(), absl::StatusCode::kNotFound);
  // Host pointers are not device buffers (a CPU build of the client: UNIMPLEMENTED).
  auto host = c->RegisterDeviceBuffers(q.data(), q.size() * 4, out.data(), out.size() * 4,
                                       lse.data(), lse.size() * 4);
  EXPECT_FALSE(host.ok());
  std::printf("register: %s\nattend on no registration: %s\nhost pointers: %s\n",
              reg.status().ToString().c_str(), call.ToString().c_str(),
              host.status().ToString().c_str());
  // The session is untouched: host tensors over the memfd still work.
  ASSERT_TRUE(c->Attend(ctx->id, 0, q, {}, out, lse).ok());
  EXPECT_NEAR(out[0], 0.5f, 1e-6);
  auto s = c->Stats();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->gpu_device_registrations, 0);
  EXPECT_TRUE(c->Ping().ok());
}

}  // namespace
}  // namespace kvwave::testing
