// CPU reference backend of kvwave's attention kernels: exact attention over spans of K/V rows,
// estimation-zone attention from cluster centroids and value sums, log-sum-exp merge, centroid
// scoring with the per-group softmax sum, and top-k selection.
//
// Everything here takes plain pointers and sizes (no store or index types), accumulates in fp32,
// and is the reference every CUDA kernel is tested against. Functions are stateless and
// thread-safe; callers parallelise across (context, layer, KV head).
//
// Conventions for one KV head and its GQA group of g query heads, head dim d:
//   q        [g x d] float32, post-RoPE.
//   score    s = scale * (q . k), scale usually 1/sqrt(d).
//   output   out [g x d] float32 = sum_i softmax(s)_i v_i;   lse [g] = log(sum_i exp(s_i)).
//   An empty set of keys gives out = 0 and lse = -inf; merging with it is the identity.
#ifndef KVWAVE_GPU_ATTENTION_CPU_H_
#define KVWAVE_GPU_ATTENTION_CPU_H_

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "config/dtype.h"

namespace kvwave::gpu::cpu {

// A run of `rows` tokens whose keys and values are contiguous rows of d elements of the same dtype.
struct KvSpan {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t rows = 0;
};

// Exact attention of q over the union of `spans` (any order; a span of 0 rows is allowed).
// REQUIRES: g >= 1, d >= 1, out has g*d floats, lse has g floats.
// Returns InvalidArgument (and writes nothing) for g < 1, d not a positive multiple of 8, a null
// q/out/lse, an unknown kv_type, or a span with rows < 0 or null k/v while rows > 0.
// Allocates nothing per call beyond reused thread-local scratch (2 x 32 x d + 2g floats).
[[nodiscard]] absl::Status ExactAttention(const float* q, int g, int d, float scale, DType kv_type,
                                          std::span<const KvSpan> spans, float* out, float* lse);

// Estimation zone: each listed cluster j stands for sizes[j] keys equal to its centroid c_j, with
// the sum of their values value_sums[j]. Weight of cluster j for head h: sizes[j]*exp(s_hj), with
// s_hj = scale * q_h . c_j, so out_h = sum_j exp(s_hj) vsum_j / sum_j sizes[j] exp(s_hj) and
// lse_h = log(sum_j sizes[j] exp(s_hj)). Exact when every listed cluster has one token.
// centroids, value_sums: [num_clusters x d] float32; sizes: [num_clusters]; `clusters` indexes
// them. Listed clusters of size 0 are skipped; a cluster listed twice counts twice.
// With `spreads` ([num_clusters]: Segment::key_spreads, the members' mean per-dimension key
// variance), cluster j's weight for head h is also multiplied by exp(scale^2 |q_h|^2 spreads[j]
// / 2): a centroid's e^{s} under-counts its members' sum of e^{s_i} (Jensen), by about that
// factor when their scores are normal.
// Returns InvalidArgument (and writes nothing) for the shape errors of ExactAttention, a null
// table while `clusters` is non-empty, an index outside [0, num_clusters), or a negative size.
[[nodiscard]] absl::Status EstimateAttention(const float* q, int g, int d, float scale,
                                             const float* centroids, const float* value_sums,
                                             const int32_t* sizes, int64_t num_clusters,
                                             std::span<const int32_t> clusters, float* out,
                                             float* lse, const float* spreads = nullptr);

// Merges partial attention (out_b, lse_b) into (out_a, lse_a), in place, for g heads of dim d:
// lse = log(exp(lse_a) + exp(lse_b)), out = (exp(lse_a) out_a + exp(lse_b) out_b) / exp(lse).
// A side with lse = -inf is empty: merging it leaves the other side unchanged (bit for bit).
void MergeLse(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int g, int d);

// Logits of g query heads against n centroids: logits[h*n + j] = scale * q_h . centroids_j.
// Any d >= 1.
void CentroidLogits(const float* q, int g, int d, float scale, const float* centroids, int64_t n,
                    float* logits);

// One ranking per KV head: scores[j] = sum_h softmax_h(logits[h*n + .])_j, where the softmax of
// each head runs over the clusters with sizes[j] > 0; empty clusters get score -inf. Non-empty
// scores sum to g (a head whose non-empty logits are all -inf contributes nothing).
void GroupSoftmaxSum(const float* logits, int g, int64_t n, const int32_t* sizes, float* scores);

// Indices of the k largest finite scores, highest first (ties: lower index first). Writes
// min(k, number of finite scores) indices to `out` and returns how many it wrote (0 for k <= 0).
// O(n + k log k): nth_element then a sort of the first k; scratch is thread-local.
int64_t TopK(const float* scores, int64_t n, int64_t k, int32_t* out);

}  // namespace kvwave::gpu::cpu

#endif  // KVWAVE_GPU_ATTENTION_CPU_H_
