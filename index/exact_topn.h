// Exact top-N keys by inner product for many queries at once: the first step of the graph build
// (every sampled prefill query's N best keys). It is a matrix product Q K^T followed by a
// per-row selection, done blocked so the product never exists whole: keys are packed once into
// panels of 16 (dimension-major), a block of queries is scored against one L2-sized block of
// keys at a time by a 6 x 16 register-tiled AVX2 kernel, and each query keeps a running top-N
// (8 scores at a time compared with a threshold, so almost every score is rejected by one vector
// compare; those above it are buffered and cut back to the best N when 2N are held). Blocks of
// queries go in parallel over TBB.
//
// Thread-safety: stateless; ExactTopN may be called from many threads at once.
#ifndef KVWAVE_INDEX_EXACT_TOPN_H_
#define KVWAVE_INDEX_EXACT_TOPN_H_

#include <cstdint>

#include "absl/status/status.h"

namespace kvwave::index {

// out[i * nn + r] = the r-th best key of query i by q.k, best first; equal scores rank the lower
// key index first. queries: m rows of d floats, keys: n rows of d floats (row-major).
// Errors: n, m or d < 1, nn not in [1, n], n >= 2^31.
[[nodiscard]] absl::Status ExactTopN(const float* keys, int64_t n, const float* queries, int64_t m,
                                     int d, int nn, int32_t* out);

// The same answer by the previous method, kept for the benchmark's old-vs-new comparison (the
// graph's `blocked_topn = false`): 16 queries at a time against all keys (4 x 4 dot products per
// step, then horizontal sums), each row of scores then scanned once. Parallel over TBB.
[[nodiscard]] absl::Status ExactTopNRowwise(const float* keys, int64_t n, const float* queries,
                                            int64_t m, int d, int nn, int32_t* out);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_EXACT_TOPN_H_
