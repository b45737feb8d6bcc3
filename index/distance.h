// Inner products of float32 vectors, vectorised with AVX2 + FMA (the build's x86-64-v3 baseline).
// Stateless; thread-safe. Used by the k-means, the graph index, and the flat scan.
#ifndef KVWAVE_INDEX_DISTANCE_H_
#define KVWAVE_INDEX_DISTANCE_H_

#include <cstdint>

namespace kvwave::index {

// a . b over d floats.
float Dot(const float* a, const float* b, int d);

// out[i] = q . rows[ids[i]] (row-major rows of d floats at `rows`), for i < count: each equal
// bit for bit to Dot(q, rows + ids[i] * d, d), computed four rows at a time (eight independent
// FMA chains instead of two, and q loaded once for the four).
void DotGather(const float* q, const float* rows, const int32_t* ids, int count, int d, float* out);

// out[i] = q . rows[i], for n rows of d floats at `rows` (row-major, stride d).
void DotRows(const float* q, const float* rows, int64_t n, int d, float* out);

// out[h * n + i] = qs[h] . rows[i] for m queries (row-major [m x d]); blocked so each row is
// loaded once for all m queries.
void DotRowsMulti(const float* qs, int m, const float* rows, int64_t n, int d, float* out);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_DISTANCE_H_
