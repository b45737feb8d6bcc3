// Calls on device q / out / lse ordered by another party's events (WaveBuffer::AttendDeviceBatch):
// the daemon's path for GPU clients (issue 17). The batched pipeline of AttendHostBatch (one
// upload, one set of launches for every (call, head), one plan, one commit), on device memory:
//
//   stream C:  [uploads] -> (host waits here only for a direct upload) -> wait(q ready)
//              -> selection + plan -> estimation -> exact attention -> [done(slot)] ...
//              ... last batch of the calls -> record(signal)
//
// so the client's q is read only after its "q ready", and its out / lse are final at "signal".
// Calls whose q / out / lse follow the previous call's in memory (a client's [B x heads x d]
// tensors) share one pipeline; a call that does not starts another (after the first, which
// carries the wait).
#include <chrono>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "buffer/wave_buffer.h"
#include "buffer/wave_buffer_internal.h"
#include "config/status_macros.h"

namespace kvwave::buffer {
namespace {

using Clock = std::chrono::steady_clock;
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

}  // namespace

absl::Status WaveBuffer::AttendDeviceBatch(std::span<const DeviceCall> calls, void* wait_event,
                                           void* signal_event) {
  const std::span<const HostCall> all = calls;
  const size_t qn = static_cast<size_t>(o_.heads) * o_.g * o_.d, rows = qn / o_.d;
  auto follows = [&](const HostCall& a, const HostCall& b) {
    return a.q != nullptr && a.out != nullptr && a.lse != nullptr && b.q == a.q + qn &&
           b.out == a.out + qn && b.lse == a.lse + rows;
  };
  absl::Status status;
  void* wait = wait_event;  // the first batch waits; the rest follow it on stream C
  for (size_t at = 0; at < all.size();) {
    size_t n = 1;
    while (at + n < all.size() && follows(all[at + n - 1], all[at + n])) ++n;
    const std::span<const HostCall> part =
        all.subspan(at, n).first(BatchPrefix(all.subspan(at, n)));
    at += part.size();
    for (const HostCall& c : part) {
      if (c.q == nullptr || c.out == nullptr || c.lse == nullptr) {
        status = absl::InvalidArgumentError("wave buffer: a device call needs q, out, lse");
        break;
      }
    }
    if (!status.ok()) break;
    const auto t0 = Clock::now();
    absl::StatusOr<int> slot = AcquireSlot();
    if (!slot.ok()) {
      status = slot.status();
      break;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      counters_.wait_us += Us(t0, Clock::now());
    }
    status = Begin(*slot, part, false, wait);
    if (!status.ok()) break;
    wait = nullptr;
  }
  if (signal_event != nullptr) {
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    const absl::Status st = backend_->RecordForeignEvent(signal_event, kComputeStream);
    if (status.ok()) status = st;
  }
  return status;
}

}  // namespace kvwave::buffer
