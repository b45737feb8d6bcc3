// Retrieval methods compared by `kvwave-bench retrieval`, behind one interface: exact flat scans
// (our SIMD scan and FAISS IndexFlatIP), FAISS IVF-Flat, hnswlib HNSW, Quest-style page bounds,
// the wave index's cluster ranking, and the RetrievalAttention graph (index/graph_index.h).
// All maximise the inner product q.k. For the bench only: the engine never uses FAISS or hnswlib.
// FAISS and hnswlib exceptions are caught here and returned as absl::Status.
//
// Thread-safety: an AnnIndex is not thread-safe (SetKnob and Search mutate search state); use one
// per thread. Search results: up to k key ids, best first, plus the number of keys scored.
#ifndef KVWAVE_BENCH_LIB_ANN_BASELINES_H_
#define KVWAVE_BENCH_LIB_ANN_BASELINES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "index/graph_index.h"

namespace kvwave::bench {

class AnnIndex {
 public:
  virtual ~AnnIndex() = default;

  virtual std::string name() const = 0;
  // Builds over n keys (row-major, n x d). prefill_queries (m x d) are what the graph is built
  // from; the other methods ignore them. May be called once.
  [[nodiscard]] virtual absl::Status Build(const float* keys, int64_t n, int d,
                                           const float* prefill_queries, int64_t m) = 0;
  // The settings of the work knob swept by the bench (valid after Build), and how to print one.
  virtual std::vector<int> Knobs() const = 0;
  virtual std::string KnobLabel(int knob) const = 0;
  virtual void SetKnob(int knob) = 0;
  // Top-k keys of q (best first) and the number of keys whose q.k was computed.
  [[nodiscard]] virtual absl::Status Search(const float* q, int k, std::vector<int32_t>* ids,
                                            int64_t* scanned) = 0;
  // Bytes the built index holds, including any copy of the keys it keeps.
  virtual int64_t MemoryBytes() const = 0;
};

std::unique_ptr<AnnIndex> MakeFlatScan();   // own SIMD scan (index/distance.h) + top-k
std::unique_ptr<AnnIndex> MakeFaissFlat();  // faiss::IndexFlatIP
// faiss::IndexIVFFlat, METRIC_INNER_PRODUCT, nlist = ceil(n / keys_per_list); knob = nprobe.
std::unique_ptr<AnnIndex> MakeFaissIvf(int keys_per_list);
// The list (0..nlist-1) of every key in the IVF MakeFaissIvf(keys_per_list) builds over the same
// keys (same k-means, same seed), for measuring how a query's top keys spread over the lists.
[[nodiscard]] absl::Status FaissIvfLists(const float* keys, int64_t n, int d, int keys_per_list,
                                         std::vector<int32_t>* list_of_key, int64_t* nlist);
// hnswlib over InnerProductSpace; knob = ef.
std::unique_ptr<AnnIndex> MakeHnsw(int m, int ef_construction);
// Quest: per page of page_tokens keys the element-wise min and max; a query ranks pages by the
// upper bound sum_i max(q_i min_i, q_i max_i) and scores the keys of the top pages.
// Knob = pages scored, in per-mille of all pages.
std::unique_ptr<AnnIndex> MakeQuest(int page_tokens);
// Wave index (index::ClusterKeys): rank clusters by q.centroid, score the members of the top
// clusters. Knob = clusters scored, in per-mille of all clusters.
std::unique_ptr<AnnIndex> MakeWave(int tokens_per_cluster);
// RetrievalAttention graph; knob = the beam-search queue size. `name` labels its rows.
std::unique_ptr<AnnIndex> MakeGraph(const index::GraphIndexOptions& options,
                                    const std::string& name = "graph");

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_LIB_ANN_BASELINES_H_
