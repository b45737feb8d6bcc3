// Device-tensor operations of kvwave::client::Client (issue 17): registration of device buffers
// and the event pair, and AttendDevice ordered on the caller's stream:
//
//   caller's stream:  ... q written -> record(q ready) ................ wait(out ready) -> ...
//   request/reply:                     send AttendDevice -> reply ----^
//   kvwaved stream C:                       wait(q ready) -> attention -> record(out ready)
#include <mutex>

#include "absl/strings/str_cat.h"
#include "client/client_cuda.h"
#include "client/client_impl.h"
#include "config/status_macros.h"

namespace kvwave::client {
namespace pb = rpc::pb;

namespace {

void SetBuffer(const DeviceBufferHandle& h, pb::DeviceBuffer* out) {
  out->set_ipc_handle(h.ipc_handle);
  out->set_offset(h.offset);
  out->set_bytes(h.bytes);
}

}  // namespace

absl::StatusOr<uint64_t> Client::RegisterDeviceHandles(const DeviceHandles& h) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::RegisterDeviceRequest req;
  req.set_device_uuid(h.device_uuid);
  SetBuffer(h.q, req.mutable_q());
  SetBuffer(h.out, req.mutable_out());
  SetBuffer(h.lse, req.mutable_lse());
  req.set_q_ready_event(h.q_ready_event);
  req.set_out_ready_event(h.out_ready_event);
  pb::RegisterDeviceResponse resp;
  KVWAVE_RETURN_IF_ERROR(impl_->Call(pb::REGISTER_DEVICE, req, resp));
  return resp.registration();
}

absl::StatusOr<uint64_t> Client::RegisterDeviceBuffers(const void* q, size_t q_bytes, void* out,
                                                       size_t out_bytes, void* lse,
                                                       size_t lse_bytes) {
  Impl::DeviceEvents ev;
  KVWAVE_ASSIGN_OR_RETURN(
      DeviceHandles h,
      cuda::MakeHandles(q, q_bytes, out, out_bytes, lse, lse_bytes, &ev.q_ready, &ev.out_ready));
  absl::StatusOr<uint64_t> id = RegisterDeviceHandles(h);
  if (!id.ok()) {
    cuda::DestroyEvent(ev.q_ready);
    cuda::DestroyEvent(ev.out_ready);
    return id.status();
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->device_events_[*id] = ev;
  return id;
}

absl::Status Client::UnregisterDeviceBuffers(uint64_t registration) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::UnregisterDeviceRequest req;
  req.set_registration(registration);
  pb::UnregisterDeviceResponse resp;
  const absl::Status st = impl_->Call(pb::UNREGISTER_DEVICE, req, resp);
  // kvwaved closed its side after the last call's work; the events are ours to destroy (a
  // stream still waiting on one keeps what it needs: cudaEventDestroy is deferred by CUDA).
  auto it = impl_->device_events_.find(registration);
  if (it != impl_->device_events_.end()) {
    cuda::DestroyEvent(it->second.q_ready);
    cuda::DestroyEvent(it->second.out_ready);
    impl_->device_events_.erase(it);
  }
  return st;
}

absl::Status Client::AttendDevice(uint64_t registration, ContextId ctx, int32_t layer,
                                  const DeviceOffsets& offsets, const AttendBudget& budget,
                                  CUstream_st* stream, AttendStats* stats) {
  const AttendBatchEntry entry{ctx, budget};
  AttendStats local;
  return AttendBatchDevice(registration, layer, std::span<const AttendBatchEntry>(&entry, 1),
                           offsets, stream,
                           std::span<AttendStats>(stats != nullptr ? stats : &local, 1));
}

absl::Status Client::AttendBatchDevice(uint64_t registration, int32_t layer,
                                       std::span<const AttendBatchEntry> entries,
                                       const DeviceOffsets& offsets, CUstream_st* stream,
                                       std::span<AttendStats> stats) {
  if (!stats.empty() && stats.size() != entries.size()) {
    return absl::InvalidArgumentError("stats must be empty or one per entry");
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->BeginCall();
  pb::AttendDeviceRequest req;
  req.set_registration(registration);
  req.set_layer(layer);
  for (const AttendBatchEntry& e : entries) SetEntry(e, req.add_entries());
  req.set_q_offset(offsets.q);
  req.set_out_offset(offsets.out);
  req.set_lse_offset(offsets.lse);
  auto it = impl_->device_events_.find(registration);
  const Impl::DeviceEvents* ev = it != impl_->device_events_.end() ? &it->second : nullptr;
  if (ev != nullptr) KVWAVE_RETURN_IF_ERROR(cuda::Record(ev->q_ready, stream));
  pb::AttendDeviceResponse resp;
  const absl::Status st = impl_->Call(pb::ATTEND_DEVICE, req, resp);
  // Also after an error: kvwaved records "out ready" after whatever it queued.
  if (ev != nullptr) KVWAVE_RETURN_IF_ERROR(cuda::Wait(stream, ev->out_ready));
  KVWAVE_RETURN_IF_ERROR(st);
  return CopyStats(resp.stats(), stats, "attend_device");
}

}  // namespace kvwave::client
