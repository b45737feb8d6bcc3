#include "engine/seal_workers.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#include "tbb/task_arena.h"

namespace kvwave::engine {

SealWorkers::SealWorkers(int threads) {
  for (int i = 0; i < std::max(1, threads); ++i) threads_.emplace_back([this] { Loop(); });
}

SealWorkers::~SealWorkers() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void SealWorkers::Submit(std::function<void()> job) {
  absl::MutexLock lock(&mu_);
  jobs_.push_back(std::move(job));
}

void SealWorkers::WaitIdle() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](SealWorkers* w)
           ABSL_NO_THREAD_SAFETY_ANALYSIS { return w->jobs_.empty() && w->running_ == 0; },
      this));
}

void SealWorkers::Loop() {
  // Linux applies a nice value per thread; failing to lower the priority only costs fairness.
  (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  tbb::task_arena arena(1);
  for (;;) {
    std::function<void()> job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &SealWorkers::Ready));
      if (jobs_.empty()) return;  // stopping, and every job has run
      job = std::move(jobs_.front());
      jobs_.pop_front();
      ++running_;
    }
    arena.execute([&] { job(); });
    job = nullptr;  // what the job held goes before it counts as done
    {
      absl::MutexLock lock(&mu_);
      --running_;
    }
  }
}

int SealThreads(int64_t setting) {
  if (setting > 0) return static_cast<int>(setting);
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::max(1u, cores / 4));
}

}  // namespace kvwave::engine
