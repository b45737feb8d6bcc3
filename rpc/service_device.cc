// GPU clients (issue 17): registration of device buffers and an interprocess event pair by
// their CUDA IPC handles, and AttendDevice on them. The handles are opened by the engine's
// backend (a daemon without a GPU backend answers FAILED_PRECONDITION); a registration belongs
// to its session and is closed with it (rpc/service.cc ReleaseSession).
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "rpc/service.h"
#include "rpc/service_call.h"

namespace kvwave::rpc {
namespace {

engine::DeviceBufferSpec Spec(const pb::DeviceBuffer& b) {
  return {b.ipc_handle(), b.offset(), b.bytes()};
}

}  // namespace

absl::Status Service::DoRegisterDevice(Call& call, const pb::RegisterDeviceRequest& req,
                                       pb::RegisterDeviceResponse& resp) {
  if (!call.session.local()) {
    return absl::FailedPreconditionError(
        "device buffers: only over the Unix socket (a client on this host's GPU)");
  }
  engine::DeviceBuffersSpec spec;
  spec.device_uuid = req.device_uuid();
  spec.q = Spec(req.q());
  spec.out = Spec(req.out());
  spec.lse = Spec(req.lse());
  spec.q_ready = req.q_ready_event();
  spec.out_ready = req.out_ready_event();
  KVWAVE_ASSIGN_OR_RETURN(std::unique_ptr<engine::DeviceBuffers> buffers,
                          engine_.OpenDeviceBuffers(spec));
  const uint64_t id =
      call.session.AddDevice(std::make_shared<DeviceRegistration>(std::move(buffers)));
  if (id == 0) {
    return absl::ResourceExhaustedError(absl::StrCat("device buffers: a session holds at most ",
                                                     Session::kMaxDeviceRegistrations,
                                                     " registrations"));
  }
  resp.set_registration(id);
  return absl::OkStatus();
}

absl::Status Service::DoUnregisterDevice(Call& call, const pb::UnregisterDeviceRequest& req,
                                         pb::UnregisterDeviceResponse& resp) {
  std::shared_ptr<DeviceRegistration> reg = call.session.RemoveDevice(req.registration());
  if (reg == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("device registration ", req.registration(), " is not open in this session"));
  }
  // Closed here (after its last call's GPU work) unless a call still holds it.
  reg.reset();
  return absl::OkStatus();
}

absl::Status Service::DoAttendDevice(Call& call, const pb::AttendDeviceRequest& req,
                                     pb::AttendDeviceResponse& resp) {
  std::shared_ptr<DeviceRegistration> reg = call.session.Device(req.registration());
  if (reg == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("device registration ", req.registration(), " is not open in this session"));
  }
  std::vector<engine::AttendBatchItem> items;
  KVWAVE_RETURN_IF_ERROR(BatchItems(call.session, req.layer(), req.entries(), items).status());
  std::vector<engine::AttendStats> stats(items.size());
  std::lock_guard<std::mutex> lock(reg->mu);
  KVWAVE_RETURN_IF_ERROR(
      engine_.AttendBatchDevice(req.layer(), items, *reg->buffers,
                                {req.q_offset(), req.out_offset(), req.lse_offset()}, stats));
  for (const engine::AttendStats& st : stats) FillAttendStats(st, resp.add_stats());
  return absl::OkStatus();
}

}  // namespace kvwave::rpc
