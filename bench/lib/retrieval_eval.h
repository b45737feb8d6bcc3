// Scoring retrieval methods on a trace: the decode-like split of one (layer, KV head), exact
// ground truth (top-k and softmax attention weights), and per-(method, knob) averages of recall,
// scan fraction, recovered attention mass, latency, build cost and size.
//
// Thread-safety: plain data and free functions; no shared state.
#ifndef KVWAVE_BENCH_LIB_RETRIEVAL_EVAL_H_
#define KVWAVE_BENCH_LIB_RETRIEVAL_EVAL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/lib/ann_baselines.h"
#include "client/trace_file.h"

namespace kvwave::bench {

// One (layer, KV head) of a trace, split as in decoding after a prefill: keys are positions
// [0, N - num_queries), decode queries the last num_queries positions, prefill queries the
// positions [0, N - num_queries) of each query head of the group. float32, row-major.
struct GroupData {
  int64_t n = 0;  // keys
  int d = 0;
  int64_t num_queries = 0;
  std::vector<float> keys;                  // [n x d]
  std::vector<float> held_out_keys;         // [num_queries x d], keys at the decode positions
  std::vector<std::vector<float>> prefill;  // per query head of the group: [n x d]
  std::vector<std::vector<float>> decode;   // per query head of the group: [num_queries x d]
};

// Errors: layer or kv_head out of range, num_queries not in [1, tokens - 1].
[[nodiscard]] absl::StatusOr<GroupData> LoadGroup(const trace::Trace& trace, int64_t layer,
                                                  int64_t kv_head, int64_t num_queries);

// Exact answers for a set of queries against keys: top-k ids and softmax weights over all keys
// (scores scaled by 1/sqrt(d)).
struct GroundTruth {
  int k = 0;
  std::vector<std::vector<int32_t>> top;   // per query, best first
  std::vector<std::vector<float>> weight;  // per query, [n]
};
GroundTruth ExactGroundTruth(const float* keys, int64_t n, int d, const float* queries,
                             int64_t num_queries, int k);

// Sums over queries for one (method, knob); averages are sum / queries.
struct SweepPoint {
  std::string index, param;
  double recall = 0, scan_fraction = 0, mass = 0, search_us = 0;
  double build_us = 0, build_tokens = 0, bytes = 0;
  int64_t queries = 0;

  double Recall() const { return recall / queries; }
  double ScanFraction() const { return scan_fraction / queries; }
  double Mass() const { return mass / queries; }
  double UsPerQuery() const { return search_us / queries; }
  double BuildUsPerToken() const { return build_us / build_tokens; }
  double BytesPerToken() const { return bytes / build_tokens; }
};

// Adds every knob setting of one built index, searched with `queries` (num_queries x d), to
// `points` (matched by index name and param; appended when new). Searches run on this thread.
// build_us and bytes are the index's build time and size over n tokens.
[[nodiscard]] absl::Status SweepIndex(AnnIndex* index, const float* queries, int64_t num_queries,
                                      int d, int64_t n, const GroundTruth& truth, double build_us,
                                      std::vector<SweepPoint>* points);

// Scan fraction at which `index`'s recall curve first reaches `target`, interpolated linearly
// between the two sweep points around it; negative if it never does.
double ScanFractionAtRecall(const std::vector<SweepPoint>& points, const std::string& index,
                            double target);
// us_per_query of the first sweep point of `index` with recall >= target (negative if none).
double UsAtRecall(const std::vector<SweepPoint>& points, const std::string& index, double target);

// Outputs: one printed line per point; JSON (the keys of the issue); a TSV + gnuplot PNG.
std::string FormatTable(const std::vector<SweepPoint>& points);
[[nodiscard]] absl::Status WriteJson(const std::string& path,
                                     const std::vector<SweepPoint>& points);
[[nodiscard]] absl::Status WritePlot(const std::string& png, const std::string& script,
                                     const std::string& title,
                                     const std::vector<SweepPoint>& points);

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_LIB_RETRIEVAL_EVAL_H_
