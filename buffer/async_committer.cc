#include "buffer/async_committer.h"

#include <utility>

namespace kvwave::buffer {

AsyncCommitter::AsyncCommitter() : worker_([this] { Loop(); }) {}

AsyncCommitter::~AsyncCommitter() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  worker_.join();
}

uint64_t AsyncCommitter::Submit(std::function<void()> job) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(job));
  return ++submitted_;
}

void AsyncCommitter::WaitFor(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  std::pair<const uint64_t*, uint64_t> arg{&done_, ticket};
  mu_.Await(absl::Condition(
      +[](std::pair<const uint64_t*, uint64_t>* a) { return *a->first >= a->second; }, &arg));
}

void AsyncCommitter::Drain() {
  uint64_t last;
  {
    absl::MutexLock lock(&mu_);
    last = submitted_;
  }
  WaitFor(last);
}

uint64_t AsyncCommitter::done() const {
  absl::MutexLock lock(&mu_);
  return done_;
}

void AsyncCommitter::Loop() {
  for (;;) {
    std::function<void()> job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](AsyncCommitter* c)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return c->stop_ || !c->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // stop_ and nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
    absl::MutexLock lock(&mu_);
    ++done_;
  }
}

}  // namespace kvwave::buffer
