// `kvwave-bench retrieval --through-daemon`: the retrieval methods as served, not as library
// calls. A private kvwaved (index.graph = on) gets one context per trace with the selected layers'
// keys and values appended together with their prefill queries (the graphs are built by its
// background seals, per sealed segment), and each decode query of the trace goes through the
// protocol's Retrieve (C++ client, shared memory) with method wave (a sweep of cluster budgets),
// graph (a sweep of beams) and flat. Reported per (method, knob): recall@k against the exact
// top-k over the appended keys, the attention mass recovered, the keys scored as a fraction of
// the keys held (Retrieve's own keys_scored / keys_total: tail, sinks and centroids included as
// each method scores them), and the round-trip time per call.
//
// Thread-safety: one call at a time (it owns the daemon it starts).
#ifndef KVWAVE_BENCH_RETRIEVAL_DAEMON_H_
#define KVWAVE_BENCH_RETRIEVAL_DAEMON_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvwave::bench {

struct DaemonRetrievalOptions {
  std::string trace;
  std::vector<int> layers;  // empty = all
  int64_t queries = 256;    // decode queries: the trace's last positions (not appended)
  int topk = 100;
  std::string kvwaved;                 // binary; empty = found next to this one
  std::vector<std::string> overrides;  // extra kvwaved settings, section.key=value
  int64_t segment_tokens = 8192;       // store.prefill_segment_tokens
  int64_t graph_queries = 4096, graph_pivots = 16, graph_degree = 32;  // the daemon's defaults
  std::vector<double> cluster_budgets = {0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3};
  std::vector<int> beams = {100, 128, 192, 256, 384, 512, 1024};
  std::string json, table;
};

[[nodiscard]] absl::Status RunRetrievalThroughDaemon(const DaemonRetrievalOptions& options);

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_RETRIEVAL_DAEMON_H_
