// Background indexing threads: where the engine runs the k-means of segments being sealed, off
// the Append that completed them (engine/engine_impl.cc schedules one job per (context, layer)
// with pending seals; a job drains that layer's queue in order).
//
// Each worker is a plain thread at a lower scheduling priority (nice +10 where the OS allows it,
// so foreground requests win a contended core) that runs its jobs inside a oneTBB arena of one
// slot of its own: the k-means' inner parallel loops stay on that thread instead of spreading
// over the request threads' cores.
//
// Thread-safety: Submit may be called from any thread; the destructor runs every job already
// submitted, then joins (callers make their jobs return quickly first, e.g. by marking their
// contexts closed).
#ifndef KVWAVE_ENGINE_SEAL_WORKERS_H_
#define KVWAVE_ENGINE_SEAL_WORKERS_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvwave::engine {

class SealWorkers {
 public:
  // threads >= 1.
  explicit SealWorkers(int threads);
  ~SealWorkers();
  SealWorkers(const SealWorkers&) = delete;
  SealWorkers& operator=(const SealWorkers&) = delete;

  void Submit(std::function<void()> job);
  // Waits until every job submitted so far (and any submitted meanwhile) has run and been
  // destroyed, with whatever it held.
  void WaitIdle();
  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void Loop();
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !jobs_.empty(); }

  absl::Mutex mu_;
  std::deque<std::function<void()>> jobs_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // jobs taken and not yet destroyed
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

// Threads for attend.seal_threads (0 = max(1, cores / 4)).
int SealThreads(int64_t setting);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_SEAL_WORKERS_H_
