// What the two GPU decode benchmarks (decode_bench.cc, ipc_bench.cc) share: wall-clock
// milliseconds, the median of samples, and CHECK_OK, which ends the benchmark on an error status.
#ifndef KVWAVE_BENCH_DECODE_BENCH_UTIL_H_
#define KVWAVE_BENCH_DECODE_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/status/status.h"

namespace kvwave::bench_decode {

using Clock = std::chrono::steady_clock;

inline double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace kvwave::bench_decode

#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    absl::Status s_ = (expr);                                                        \
    if (!s_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

#endif  // KVWAVE_BENCH_DECODE_BENCH_UTIL_H_
