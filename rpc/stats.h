// Server statistics: per-operation counts, errors, bytes and latency histograms, plus the
// connection counters; rendered into a StatsResponse and as Prometheus text.
//
// Latencies go into log-scale buckets (4 per power of two of microseconds, 1 us .. ~70 min), so a
// quantile is exact to within ~19%.
//
// Thread-safety: Record*/counters are lock-free (relaxed atomics: each counter is independent and
// readers only need an eventually consistent snapshot); Snapshot and Prometheus may run
// concurrently with recording.
#ifndef KVWAVE_RPC_STATS_H_
#define KVWAVE_RPC_STATS_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "rpc/kvwave_rpc.pb.h"
#include "rpc/wire.h"

namespace kvwave::rpc {

class LatencyHistogram {
 public:
  static constexpr int kBuckets = 128;
  void Record(double micros);
  uint64_t Count() const;
  // The q-quantile (0..1) in microseconds (upper edge of its bucket); 0 when empty.
  double Quantile(double q) const;
  double MeanMicros() const;
  // Upper edge in microseconds of bucket i.
  static double BucketUpperMicros(int i);
  uint64_t BucketCount(int i) const { return buckets_[i].load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
  std::atomic<uint64_t> sum_ns_{0};
};

class ServerStats {
 public:
  ServerStats();

  void RecordOp(uint16_t op, bool ok, double micros, uint64_t bytes_in, uint64_t bytes_out);
  void SessionOpened() {
    sessions_.fetch_add(1, std::memory_order_relaxed);
    sessions_total_.fetch_add(1, std::memory_order_relaxed);
  }
  void SessionClosed() { sessions_.fetch_sub(1, std::memory_order_relaxed); }
  void FrameRejected() { frames_rejected_.fetch_add(1, std::memory_order_relaxed); }

  int64_t sessions() const { return sessions_.load(std::memory_order_relaxed); }
  // Fills ops, sessions, sessions_total, frames_rejected, uptime and rss of `out`.
  void Fill(pb::StatsResponse& out) const;
  // Prometheus text exposition of a filled StatsResponse plus the histograms.
  std::string Prometheus(const pb::StatsResponse& filled) const;

 private:
  struct Op {
    std::atomic<uint64_t> count{0}, errors{0}, bytes_in{0}, bytes_out{0};
    LatencyHistogram latency;
  };
  std::array<Op, kMaxOp + 1> ops_;
  std::atomic<int64_t> sessions_{0}, sessions_total_{0}, frames_rejected_{0};
  std::chrono::steady_clock::time_point start_;
};

// Resident set size of this process in bytes (from /proc/self/statm); 0 if unknown.
int64_t ResidentBytes();

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_STATS_H_
