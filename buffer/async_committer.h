// A single worker thread that runs jobs in submission order, off the caller's critical path
// (the wave buffer's LRU commits and the admission copies they queue).
//
// Thread-safety: Submit, WaitFor and Drain may be called from any thread. Jobs run one at a time,
// in order, on the worker; a job must not call WaitFor/Drain of its own committer.
#ifndef KVWAVE_BUFFER_ASYNC_COMMITTER_H_
#define KVWAVE_BUFFER_ASYNC_COMMITTER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>

#include "absl/synchronization/mutex.h"

namespace kvwave::buffer {

class AsyncCommitter {
 public:
  AsyncCommitter();
  ~AsyncCommitter();  // runs the queued jobs, then joins
  AsyncCommitter(const AsyncCommitter&) = delete;
  AsyncCommitter& operator=(const AsyncCommitter&) = delete;

  // Queues `job`; returns its ticket (1, 2, ...).
  uint64_t Submit(std::function<void()> job);
  // Blocks until the job with `ticket` (and all before it) has run.
  void WaitFor(uint64_t ticket);
  void Drain();
  uint64_t done() const;

 private:
  void Loop();
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t submitted_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t done_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_ASYNC_COMMITTER_H_
