// Query-guided proximity graph over the keys of one (layer, KV head): the RetrievalAttention index.
//
// Queries and keys of attention come from different distributions, so a graph built from key–key
// neighbourhoods leads a query's search astray. This graph is built from the *queries* instead
// (the idea RoarGraph describes for cross-modal search):
//   1. take a sample of the prefill queries of the KV group and find, exactly, the top-N keys of
//      each by inner product (q.k, the attention score): a blocked matrix product with a running
//      top-N per query (index/exact_topn.h);
//   2. project the query–key bipartite graph onto keys: each query's best key (or its best
//      `pivots_per_query` keys: more pivots from fewer sampled queries give as good a graph for
//      less work in step 1) becomes a *pivot*, linked to that query's other N-1 keys; a pivot's
//      candidates (the prune_pool * M nearest of them) are
//      pruned to degree M by a relative-neighbourhood rule (inner product, as RoarGraph does, by
//      default; or L2 between keys) and topped up to M with the pruned ones;
//   3. add reverse edges into free slots (degree stays <= M); token-order links: key i is also
//      linked to keys i +- 1..position_links (keys are passed in token order; these edges may
//      take a key past M), because RoPE makes a query's top keys come in runs of nearby positions;
//      then a key–key refinement: every key searches this graph with its own vector and fills
//      its free slots with the pruned results (plus their reverse edges), which makes keys that
//      no query chose navigable;
//   4. connectivity pass: every key not reachable from the entry point is found by a search
//      with its own vector and linked from its best reachable key (these few edges may exceed M);
//   5. entry points (chosen before step 3's refinement, which starts from them): the pivots (best
//   keys) of `entry_points` sampled queries spread evenly over
//      the sample (so over heads and positions), deduplicated; with entry_points = 1, the key with
//      the largest inner product with the mean sampled query.
// Search scores every entry point and the last recent_entries keys (they count as scanned keys),
// seeds the queue with them, and runs a beam search over the graph with a bounded queue
// (size L >= k), maximising q.k.
//
// Thread-safety: a built GraphIndex is immutable; Search is const and safe from many threads as
// long as each thread passes its own GraphSearchScratch (or uses the overload that allocates one).
#ifndef KVWAVE_INDEX_GRAPH_INDEX_H_
#define KVWAVE_INDEX_GRAPH_INDEX_H_

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvwave::index {

struct GraphIndexOptions {
  int query_neighbors = 100;  // N: exact top-N keys found per sampled prefill query
  int max_degree = 32;        // M: out-degree bound of the projected graph
  // Sampled prefill queries used to build (0 = all of them). 4,096 with 16 pivots each (and a
  // pool of 16 M) gave the recall at a fixed beam of 65,536 queries with one pivot (dd16k,
  // within 0.002) for 1/16 of the exact top-N's work (bench/results/graph_build_dd16k.txt);
  // 3,072 with 20 pivots stays within 0.0036 of that at every beam L = 100..1024 for 0.87-0.91x
  // its build CPU (bench/results/graph_build_dd16k_q3072_*.txt).
  int64_t max_queries = 3072;
  float prune_alpha = 1.0f;  // RNG rule: drop c if alpha * |s - c| < |p - c| for a kept s
  // The nearest prune_pool * M candidates of a pivot go through the occlusion test. 16 (was 8)
  // keeps the recall at a fixed beam of the 65,536-query build with 4,096 queries x 16 pivots.
  int prune_pool = 16;
  // Key-key refinement search queue (0 = no refinement pass). 16 (was 100) keeps the recall at a
  // fixed beam within 0.003 on dd16k; 8 loses 0.006 at L = 100 (graph_build_sweep.txt).
  int refine_queue = 16;
  int connect_queue = 48;  // queue size of the searches of the connectivity pass
  int entry_points = 1;    // keys every search starts from (scored first), >= 1
  // Occlusion by inner product (RoarGraph's IP metric) rather than L2. Measured (scan fraction
  // at recall@100 0.95, L2 -> IP): dd16k 17.8% -> 16.6%; synth 128K, --ood 4: 4.1% -> 2.6%.
  bool prune_by_ip = true;
  int position_links = 1;  // also link key i to i +- 1..w (keys in token order), <= 64
  // Searches also start from the last `recent_entries` keys (the most recent tokens, which decode
  // queries attend to), scored first like the entry points. Search only; the build ignores it.
  int recent_entries = 0;
  // Each sampled query's best `pivots_per_query` keys become pivots (1: RoarGraph's projection,
  // the best key only), each linked to the query's other N - 1 keys.
  int pivots_per_query = 20;
  // Step 1 by the blocked kernel (index/exact_topn.h); false: the previous row-at-a-time kernel,
  // kept for the benchmark's old-vs-new comparison. Same answer either way.
  bool blocked_topn = true;
  // Step 1 elsewhere (the engine's CUDA backend: CudaBackend::ExactTopN), with index::ExactTopN's
  // contract and answer (same lists bit for bit); unset: the CPU kernel. If it fails, the CPU
  // kernel runs instead (GraphBuildProfile::topn_elsewhere says which ran).
  std::function<absl::Status(const float* keys, int64_t n, const float* queries, int64_t m, int d,
                             int nn, int32_t* out)>
      exact_topn;
  uint64_t seed = 1;  // query sampling; the build is deterministic for a seed
};

// Wall time of each step of a build and the process's CPU time over it, in seconds (for
// benchmarks; not part of the graph).
struct GraphBuildProfile {
  double exact_neighbors = 0;  // step 1: exact top-N of the sampled queries
  double project = 0;          // step 2 + reverse edges + token-order links
  double refine = 0;           // step 3b: key-key refinement
  double connect = 0;          // step 4
  double total = 0;
  // CPU seconds of the whole process (all threads) over the build and over steps 1, 2 and 3b.
  double process_cpu = 0, cpu_exact_neighbors = 0, cpu_project = 0, cpu_refine = 0;
  bool topn_elsewhere = false;  // step 1 ran in GraphIndexOptions::exact_topn
};

// Top-k keys of one search, best first, with the number of keys whose score was computed.
struct GraphSearchResult {
  std::vector<int32_t> ids;
  std::vector<float> scores;
  int64_t scanned = 0;
};

// The stored form of a built graph, without its keys (those are the segment's, in token order):
// CSR adjacency, the entry points and the search's starting keys (index/graph_codec.h encodes
// it).
struct GraphParts {
  int64_t n = 0;
  int32_t d = 0;
  std::vector<int64_t> offsets;         // [n + 1], offsets[0] = 0, non-decreasing
  std::vector<int32_t> targets;         // [offsets[n]], each in [0, n)
  std::vector<int32_t> entries;         // >= 1 distinct keys in [0, n)
  std::vector<int32_t> search_entries;  // entries, then recent keys; distinct, in [0, n)
  int64_t connect_edges = 0;

  bool operator==(const GraphParts&) const = default;
};

// Per-thread search state (visited marks, the queue). Reusable across searches and indexes.
class GraphSearchScratch {
 public:
  GraphSearchScratch() = default;

 private:
  friend class GraphIndex;
  std::vector<uint32_t> visited_;  // visited_[i] == epoch_ <=> key i seen in this search
  uint32_t epoch_ = 0;
  struct Entry {
    float score;
    int32_t id;
    bool expanded;
  };
  std::vector<Entry> queue_;  // sorted by score, best first
};

class GraphIndex {
 public:
  // Builds the graph over n keys from m prefill queries (float32, row-major, dimension d).
  // REQUIRES: keys has n*d floats and queries m*d floats. Errors: n < 1, m < 1, d < 1, or an
  // option out of range. Uses TBB for the exact q->k neighbours; deterministic for a seed.
  [[nodiscard]] static absl::StatusOr<GraphIndex> Build(const float* keys, int64_t n,
                                                        const float* queries, int64_t m, int d,
                                                        const GraphIndexOptions& options);

  // A graph from its stored parts over keys [n x d] (float32, token order; copied). Checks every
  // invariant of GraphParts and that n and d match. Errors: InvalidArgument naming the mismatch.
  [[nodiscard]] static absl::StatusOr<GraphIndex> FromParts(const float* keys, int64_t n, int d,
                                                            GraphParts parts);
  GraphParts ToParts() const;

  // Beam search for the top-k keys of q by q.k. queue_size is clamped to [k, n]; a larger queue
  // scores more keys and finds more of the true top-k. REQUIRES: q has dim() floats, k >= 1.
  GraphSearchResult Search(const float* q, int k, int queue_size,
                           GraphSearchScratch* scratch) const;
  GraphSearchResult Search(const float* q, int k, int queue_size) const;

  int64_t size() const { return n_; }
  int dim() const { return d_; }
  int32_t entry_point() const { return entries_.front(); }
  std::span<const int32_t> entry_points() const { return entries_; }
  std::span<const int32_t> Neighbors(int32_t key) const {
    return {targets_.data() + offsets_[key], targets_.data() + offsets_[key + 1]};
  }
  int64_t num_edges() const { return static_cast<int64_t>(targets_.size()); }
  int64_t connect_edges() const { return connect_edges_; }  // edges added by the connect pass
  const GraphBuildProfile& build_profile() const { return profile_; }
  // Bytes held: the float32 key copy plus the adjacency (offsets and targets).
  int64_t MemoryBytes() const;

 private:
  GraphIndex() = default;
  // Step 4 of the recipe: links every key unreachable from the entry point (mutates adj).
  void Connect(std::vector<std::vector<int32_t>>* adj, const GraphIndexOptions& options);

  int64_t n_ = 0;
  int d_ = 0;
  std::vector<int32_t> entries_;         // entries_[0] is the one the connectivity pass starts from
  std::vector<int32_t> search_entries_;  // entries_, then the recent keys not among them
  int64_t connect_edges_ = 0;
  GraphBuildProfile profile_;
  std::vector<float> keys_;       // [n x d]
  std::vector<int64_t> offsets_;  // [n + 1], CSR
  std::vector<int32_t> targets_;  // out-neighbours of key i: targets_[offsets_[i], offsets_[i+1])
};

// Searches every query head at once, in parallel with TBB: query head h (row h of `queries`,
// q_heads x dim) searches graphs[h / (q_heads / graphs.size())], or graphs[h] when there is one
// graph per query head. out is resized to q_heads. Errors: q_heads not a multiple of the number
// of graphs, a null graph, k < 1.
[[nodiscard]] absl::Status SearchHeads(std::span<const GraphIndex* const> graphs,
                                       const float* queries, int q_heads, int k, int queue_size,
                                       std::vector<GraphSearchResult>* out);

// Indices of the k largest of scores[0, n), best first (ties by lower index). k is clamped to n.
std::vector<int32_t> TopKIndices(const float* scores, int64_t n, int k);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_GRAPH_INDEX_H_
