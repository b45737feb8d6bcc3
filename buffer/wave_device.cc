// Calls on device q / out / lse ordered by another party's events (WaveBuffer::AttendDeviceBatch):
// the daemon's path for GPU clients (issue 17). One call per slot, as AttendLayer, plus:
//
//   stream C:  [Sync uploads] -> (host waits here only for a direct upload) -> wait(q ready)
//              -> selection + plan -> estimation -> exact attention -> [done(slot)] ...
//              ... last call of the batch -> record(signal)
//
// so the client's q is read only after its "q ready", and its out / lse are final at "signal".
#include <chrono>
#include <mutex>

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
  absl::Status status;
  void* wait = wait_event;  // the first call waits; the rest follow it on stream C
  for (const DeviceCall& c : calls) {
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
    status = BeginDevice(*slot, c, wait);
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

absl::Status WaveBuffer::BeginDevice(int slot, const DeviceCall& call, void* wait_event) {
  Slot& s = *slots_[slot];
  auto give_back = [&](absl::Status status) {
    // Nothing will commit this slot; what was queued is left to finish on the streams.
    (void)SynchronizeAll();
    std::lock_guard<std::mutex> lock(slot_mu_);
    s.holders = 0;
    free_slots_.push_back(slot);
    slot_cv_.notify_one();
    return status;
  };
  const WaveBudget& budget = call.budget;
  if (!(budget.retrieval >= 0 && budget.retrieval <= 1 && budget.estimation >= 0 &&
        budget.estimation <= 1))
    return give_back(absl::InvalidArgumentError("wave buffer: budgets are fractions in [0, 1]"));
  if (call.q == nullptr || call.out == nullptr || call.lse == nullptr)
    return give_back(absl::InvalidArgumentError("wave buffer: a device call needs q, out, lse"));
  std::shared_ptr<Space> sp;
  {
    std::lock_guard<std::mutex> lock(spaces_mu_);
    auto it = spaces_.find(call.space);
    if (it != spaces_.end()) sp = it->second;
  }
  if (sp == nullptr)
    return give_back(absl::NotFoundError(absl::StrCat("no wave space ", call.space)));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_.ok()) return give_back(error_);
  }
  s.holders = 1;  // the commit job
  const auto t1 = Clock::now();
  absl::Status status;
  {
    std::lock_guard<std::mutex> space_lock(sp->mu);
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    if (sp->closed) status = absl::NotFoundError(absl::StrCat("no wave space ", call.space));
    int64_t uploaded = 0;
    if (status.ok() && !call.heads.empty()) {
      int64_t before = 0;
      {
        std::lock_guard<std::mutex> c(mu_);
        before = counters_.upload_bytes;
      }
      status = Sync(*sp, call.heads, s, Upload{});
      std::lock_guard<std::mutex> c(mu_);
      uploaded = counters_.upload_bytes - before;
    }
    // Rows too many for the slot's staging were copied straight from the host rows, which the
    // caller may change once this returns: wait for those copies (and the calls before them),
    // never for the client's work (queued after this).
    if (status.ok() && uploaded > static_cast<int64_t>(s.staging.size() / 2)) {
      status = backend_->RecordEvent(kDoneEvent + slot, kComputeStream);
      if (status.ok()) status = backend_->SynchronizeEvent(kDoneEvent + slot);
    }
    if (status.ok() && wait_event != nullptr)
      status = backend_->WaitForeignEvent(kComputeStream, wait_event);
    if (status.ok()) status = Enqueue(*sp, call.q, call.out, call.lse, budget, slot);
    if (status.ok()) status = backend_->RecordEvent(kDoneEvent + slot, kComputeStream);
    if (status.ok()) {
      const ZoneCounts z = ZoneClusters(budget, sp->clusters);
      s.estimated = sp->clusters > 0 ? z.estimation : 0;
      if (call.stats != nullptr) {
        call.stats->steady_tokens += s.steady_rows;
        call.stats->total_clusters += s.total_clusters;
        if (s.planned) call.stats->estimated_clusters += int64_t{o_.heads} * s.estimated;
      }
      committers_[slot]->Submit([this, slot] { Commit(slot); });
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.enqueue_us += Us(t1, Clock::now());
    if (status.ok()) ++counters_.calls;
  }
  if (!status.ok()) return give_back(status);
  return absl::OkStatus();
}

}  // namespace kvwave::buffer
