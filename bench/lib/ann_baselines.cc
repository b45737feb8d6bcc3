#include "bench/lib/ann_baselines.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "faiss/IndexFlat.h"
#include "faiss/IndexIVFFlat.h"
#include "hnswlib/hnswlib.h"
#include "index/distance.h"
#include "index/wave_index.h"

namespace kvwave::bench {
namespace {

absl::Status FromException(const char* what, const std::exception& e) {
  return absl::InternalError(absl::StrCat(what, ": ", e.what()));
}

// Fractions of the work (per mille) swept by the methods whose knob is "how much to score".
const std::vector<int> kPermilleSweep = {5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500};

std::string Permille(int knob) { return absl::StrCat(knob / 10.0, "%"); }

void TopKOfScores(const std::vector<float>& scores, const std::vector<int32_t>& ids, int k,
                  std::vector<int32_t>* out) {
  std::vector<int32_t> top =
      index::TopKIndices(scores.data(), static_cast<int64_t>(scores.size()), k);
  out->clear();
  for (int32_t i : top) out->push_back(ids[i]);
}

class FlatScan final : public AnnIndex {
 public:
  std::string name() const override { return "flat"; }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    keys_.assign(keys, keys + n * d);
    n_ = n;
    d_ = d;
    scores_.resize(static_cast<size_t>(n));
    return absl::OkStatus();
  }
  std::vector<int> Knobs() const override { return {0}; }
  std::string KnobLabel(int) const override { return "all"; }
  void SetKnob(int) override {}
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    index::DotRows(q, keys_.data(), n_, d_, scores_.data());
    *ids = index::TopKIndices(scores_.data(), n_, k);
    *scanned = n_;
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override { return static_cast<int64_t>(keys_.size() * 4); }

 private:
  std::vector<float> keys_, scores_;
  int64_t n_ = 0;
  int d_ = 0;
};

class FaissFlat final : public AnnIndex {
 public:
  std::string name() const override { return "faiss-flat"; }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    try {
      index_ = std::make_unique<faiss::IndexFlatIP>(d);
      index_->add(n, keys);
    } catch (const std::exception& e) {
      return FromException("faiss IndexFlatIP", e);
    }
    return absl::OkStatus();
  }
  std::vector<int> Knobs() const override { return {0}; }
  std::string KnobLabel(int) const override { return "all"; }
  void SetKnob(int) override {}
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    labels_.resize(static_cast<size_t>(k));
    dist_.resize(static_cast<size_t>(k));
    try {
      index_->search(1, q, k, dist_.data(), labels_.data());
    } catch (const std::exception& e) {
      return FromException("faiss IndexFlatIP search", e);
    }
    ids->clear();
    for (faiss::Index::idx_t l : labels_) {
      if (l >= 0) ids->push_back(static_cast<int32_t>(l));
    }
    *scanned = index_->ntotal;
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override { return index_->ntotal * index_->d * 4; }

 private:
  std::unique_ptr<faiss::IndexFlatIP> index_;
  std::vector<faiss::Index::idx_t> labels_;
  std::vector<float> dist_;
};

class FaissIvf final : public AnnIndex {
 public:
  explicit FaissIvf(int keys_per_list) : keys_per_list_(keys_per_list) {}
  std::string name() const override { return "ivf"; }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    const int64_t nlist = std::max<int64_t>(1, (n + keys_per_list_ - 1) / keys_per_list_);
    try {
      quantizer_ = std::make_unique<faiss::IndexFlatIP>(d);
      index_ = std::make_unique<faiss::IndexIVFFlat>(quantizer_.get(), d, nlist,
                                                     faiss::METRIC_INNER_PRODUCT);
      index_->cp.seed = 1234;
      index_->verbose = false;
      index_->train(n, keys);
      index_->add(n, keys);
    } catch (const std::exception& e) {
      return FromException("faiss IndexIVFFlat", e);
    }
    return absl::OkStatus();
  }
  std::vector<int> Knobs() const override {
    std::vector<int> knobs;
    for (int p : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512}) {
      if (p <= static_cast<int>(index_->nlist)) knobs.push_back(p);
    }
    return knobs;
  }
  std::string KnobLabel(int knob) const override {
    return absl::StrCat("nprobe=", knob, "/", index_->nlist);
  }
  void SetKnob(int knob) override { index_->nprobe = static_cast<size_t>(knob); }
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    labels_.resize(static_cast<size_t>(k));
    dist_.resize(static_cast<size_t>(k));
    faiss::indexIVF_stats.reset();
    try {
      index_->search(1, q, k, dist_.data(), labels_.data());
    } catch (const std::exception& e) {
      return FromException("faiss IndexIVFFlat search", e);
    }
    ids->clear();
    for (faiss::Index::idx_t l : labels_) {
      if (l >= 0) ids->push_back(static_cast<int32_t>(l));
    }
    *scanned = static_cast<int64_t>(faiss::indexIVF_stats.ndis);
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override {
    // Codes (a float copy of every key), their ids, and the centroids.
    return index_->ntotal * (index_->d * 4 + 8) + index_->nlist * index_->d * 4;
  }

 private:
  int keys_per_list_;
  std::unique_ptr<faiss::IndexFlatIP> quantizer_;
  std::unique_ptr<faiss::IndexIVFFlat> index_;
  std::vector<faiss::Index::idx_t> labels_;
  std::vector<float> dist_;
};

// hnswlib's own counter also counts neighbours it skips as visited, so the bench counts the
// distance calls itself through this wrapper around InnerProductSpace.
thread_local int64_t hnsw_distance_calls = 0;
thread_local hnswlib::DISTFUNC<float> hnsw_inner_distance = nullptr;

float CountedDistance(const void* a, const void* b, const void* param) {
  ++hnsw_distance_calls;
  return hnsw_inner_distance(a, b, param);
}

class CountingIpSpace final : public hnswlib::SpaceInterface<float> {
 public:
  explicit CountingIpSpace(size_t dim) : inner_(dim) {}
  size_t get_data_size() override { return inner_.get_data_size(); }
  hnswlib::DISTFUNC<float> get_dist_func() override {
    hnsw_inner_distance = inner_.get_dist_func();
    return &CountedDistance;
  }
  void* get_dist_func_param() override { return inner_.get_dist_func_param(); }

 private:
  hnswlib::InnerProductSpace inner_;
};

class Hnsw final : public AnnIndex {
 public:
  Hnsw(int m, int ef_construction) : m_(m), ef_construction_(ef_construction) {}
  std::string name() const override { return "hnsw"; }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    try {
      space_ = std::make_unique<CountingIpSpace>(static_cast<size_t>(d));
      hnsw_ = std::make_unique<hnswlib::HierarchicalNSW<float>>(space_.get(), n, m_,
                                                                ef_construction_, 100);
      for (int64_t i = 0; i < n; ++i) hnsw_->addPoint(keys + i * d, static_cast<size_t>(i));
    } catch (const std::exception& e) {
      return FromException("hnswlib build", e);
    }
    n_ = n;
    return absl::OkStatus();
  }
  std::vector<int> Knobs() const override {
    return {100, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096};
  }
  std::string KnobLabel(int knob) const override { return absl::StrCat("ef=", knob); }
  void SetKnob(int knob) override { hnsw_->setEf(static_cast<size_t>(knob)); }
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    hnsw_distance_calls = 0;
    try {
      auto heap = hnsw_->searchKnn(q, static_cast<size_t>(k));
      ids->resize(heap.size());
      for (size_t i = heap.size(); i-- > 0; heap.pop()) {
        (*ids)[i] = static_cast<int32_t>(heap.top().second);
      }
    } catch (const std::exception& e) {
      return FromException("hnswlib search", e);
    }
    *scanned = std::min<int64_t>(hnsw_distance_calls, n_);
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override {
    int64_t bytes = static_cast<int64_t>(hnsw_->max_elements_ * hnsw_->size_data_per_element_);
    for (int64_t i = 0; i < n_; ++i) {
      bytes += static_cast<int64_t>(hnsw_->element_levels_[i] * hnsw_->size_links_per_element_);
    }
    return bytes;
  }

 private:
  int m_, ef_construction_;
  int64_t n_ = 0;
  std::unique_ptr<CountingIpSpace> space_;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> hnsw_;
};

// Shared by Quest and Wave: groups of keys ("blocks": pages or clusters), each with a score
// bound; a search ranks the blocks and scores the members of the top ones.
class BlockScan : public AnnIndex {
 public:
  std::vector<int> Knobs() const override { return kPermilleSweep; }
  std::string KnobLabel(int knob) const override { return Permille(knob); }
  void SetKnob(int knob) override {
    blocks_to_scan_ = std::max<int64_t>(1, (num_blocks() * knob + 999) / 1000);
  }
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    RankBlocks(q, &block_scores_);
    const std::vector<int32_t> top =
        index::TopKIndices(block_scores_.data(), num_blocks(), static_cast<int>(blocks_to_scan_));
    cand_ids_.clear();
    cand_scores_.clear();
    for (int32_t b : top) {
      for (int64_t j = member_offsets_[b]; j < member_offsets_[b + 1]; ++j) {
        cand_ids_.push_back(members_[j]);
        cand_scores_.push_back(index::Dot(q, keys_.data() + int64_t{members_[j]} * d_, d_));
      }
    }
    TopKOfScores(cand_scores_, cand_ids_, k, ids);
    *scanned = static_cast<int64_t>(cand_ids_.size());
    return absl::OkStatus();
  }

 protected:
  int64_t num_blocks() const { return static_cast<int64_t>(member_offsets_.size()) - 1; }
  virtual void RankBlocks(const float* q, std::vector<float>* scores) = 0;

  std::vector<float> keys_;
  int d_ = 0;
  std::vector<int64_t> member_offsets_;  // block b = members_[offsets[b], offsets[b+1])
  std::vector<int32_t> members_;

 private:
  int64_t blocks_to_scan_ = 1;
  std::vector<float> block_scores_, cand_scores_;
  std::vector<int32_t> cand_ids_;
};

class Quest final : public BlockScan {
 public:
  explicit Quest(int page_tokens) : page_(page_tokens) {}
  std::string name() const override { return absl::StrCat("quest", page_); }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    keys_.assign(keys, keys + n * d);
    d_ = d;
    const int64_t pages = (n + page_ - 1) / page_;
    lo_.assign(static_cast<size_t>(pages * d), INFINITY);
    hi_.assign(static_cast<size_t>(pages * d), -INFINITY);
    member_offsets_.assign(1, 0);
    members_.resize(static_cast<size_t>(n));
    std::iota(members_.begin(), members_.end(), 0);
    for (int64_t p = 0; p < pages; ++p) {
      const int64_t end = std::min<int64_t>(n, (p + 1) * page_);
      for (int64_t t = p * page_; t < end; ++t) {
        for (int i = 0; i < d; ++i) {
          lo_[p * d + i] = std::min(lo_[p * d + i], keys[t * d + i]);
          hi_[p * d + i] = std::max(hi_[p * d + i], keys[t * d + i]);
        }
      }
      member_offsets_.push_back(end);
    }
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override {
    return static_cast<int64_t>((keys_.size() + lo_.size() + hi_.size()) * 4);
  }

 private:
  void RankBlocks(const float* q, std::vector<float>* scores) override {
    const int64_t pages = num_blocks();
    scores->resize(static_cast<size_t>(pages));
    for (int64_t p = 0; p < pages; ++p) {
      const float* lo = lo_.data() + p * d_;
      const float* hi = hi_.data() + p * d_;
      float bound = 0.0f;
      for (int i = 0; i < d_; ++i) bound += std::max(q[i] * lo[i], q[i] * hi[i]);
      (*scores)[p] = bound;
    }
  }
  int page_;
  std::vector<float> lo_, hi_;  // [pages x d]
};

class Wave final : public BlockScan {
 public:
  explicit Wave(int tokens_per_cluster) : tokens_per_cluster_(tokens_per_cluster) {}
  std::string name() const override { return "wave"; }
  absl::Status Build(const float* keys, int64_t n, int d, const float*, int64_t) override {
    index::WaveIndexOptions options;
    options.tokens_per_cluster = tokens_per_cluster_;
    KVWAVE_ASSIGN_OR_RETURN(index::WaveClusters clusters, index::ClusterKeys(keys, n, d, options));
    keys_.assign(keys, keys + n * d);
    d_ = d;
    centroids_ = std::move(clusters.centroids);
    // Members grouped by cluster (counting sort keeps token order inside a cluster).
    const int32_t c = clusters.num_clusters;
    member_offsets_.assign(static_cast<size_t>(c) + 1, 0);
    for (int32_t a : clusters.assignment) ++member_offsets_[a + 1];
    for (int32_t i = 0; i < c; ++i) member_offsets_[i + 1] += member_offsets_[i];
    members_.resize(static_cast<size_t>(n));
    std::vector<int64_t> fill(member_offsets_.begin(), member_offsets_.end() - 1);
    for (int64_t t = 0; t < n; ++t)
      members_[fill[clusters.assignment[t]]++] = static_cast<int32_t>(t);
    empty_.assign(static_cast<size_t>(c), 0);
    for (int32_t i = 0; i < c; ++i) empty_[i] = clusters.sizes[i] == 0;
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override {
    // Keys, centroids, the token -> cluster permutation and the offsets.
    return static_cast<int64_t>((keys_.size() + centroids_.size()) * 4 + members_.size() * 4 +
                                member_offsets_.size() * 8);
  }

 private:
  void RankBlocks(const float* q, std::vector<float>* scores) override {
    const int64_t c = num_blocks();
    scores->resize(static_cast<size_t>(c));
    index::DotRows(q, centroids_.data(), c, d_, scores->data());
    for (int64_t i = 0; i < c; ++i) {
      if (empty_[i]) (*scores)[i] = -INFINITY;
    }
  }
  int tokens_per_cluster_;
  std::vector<float> centroids_;
  std::vector<char> empty_;
};

class Graph final : public AnnIndex {
 public:
  Graph(const index::GraphIndexOptions& options, std::string name)
      : options_(options), name_(std::move(name)) {}
  std::string name() const override { return name_; }
  absl::Status Build(const float* keys, int64_t n, int d, const float* prefill_queries,
                     int64_t m) override {
    KVWAVE_ASSIGN_OR_RETURN(index::GraphIndex g,
                            index::GraphIndex::Build(keys, n, prefill_queries, m, d, options_));
    graph_ = std::make_unique<index::GraphIndex>(std::move(g));
    const index::GraphBuildProfile& p = graph_->build_profile();
    std::fprintf(stderr,
                 "  %s build %.3f s (us/token %.1f): exact top-N %.3f, project %.3f, "
                 "refine %.3f, connect %.3f (%ld connect edges); process CPU %.3f s "
                 "(us/token on 2 idle cores %.1f; CPU top-N %.3f project %.3f refine %.3f)%s\n",
                 name_.c_str(), p.total, 1e6 * p.total / static_cast<double>(n), p.exact_neighbors,
                 p.project, p.refine, p.connect, static_cast<long>(graph_->connect_edges()),
                 p.process_cpu, 1e6 * p.process_cpu / 2 / static_cast<double>(n),
                 p.cpu_exact_neighbors, p.cpu_project, p.cpu_refine,
                 p.topn_elsewhere ? "; top-N on the GPU" : "");
    return absl::OkStatus();
  }
  std::vector<int> Knobs() const override {
    return {100, 112, 128, 144, 160, 192, 224, 256, 320, 384, 512, 768, 1024};
  }
  std::string KnobLabel(int knob) const override { return absl::StrCat("L=", knob); }
  void SetKnob(int knob) override { queue_ = knob; }
  absl::Status Search(const float* q, int k, std::vector<int32_t>* ids, int64_t* scanned) override {
    index::GraphSearchResult r = graph_->Search(q, k, queue_, &scratch_);
    *ids = std::move(r.ids);
    *scanned = r.scanned;
    return absl::OkStatus();
  }
  int64_t MemoryBytes() const override { return graph_->MemoryBytes(); }

 private:
  index::GraphIndexOptions options_;
  std::string name_;
  std::unique_ptr<index::GraphIndex> graph_;
  index::GraphSearchScratch scratch_;
  int queue_ = 128;
};

}  // namespace

std::unique_ptr<AnnIndex> MakeFlatScan() { return std::make_unique<FlatScan>(); }
std::unique_ptr<AnnIndex> MakeFaissFlat() { return std::make_unique<FaissFlat>(); }
absl::Status FaissIvfLists(const float* keys, int64_t n, int d, int keys_per_list,
                           std::vector<int32_t>* list_of_key, int64_t* nlist) {
  *nlist = std::max<int64_t>(1, (n + keys_per_list - 1) / keys_per_list);
  try {
    faiss::IndexFlatIP quantizer(d);
    faiss::IndexIVFFlat index(&quantizer, d, *nlist, faiss::METRIC_INNER_PRODUCT);
    index.cp.seed = 1234;  // as FaissIvf::Build
    index.verbose = false;
    index.train(n, keys);
    std::vector<faiss::Index::idx_t> labels(static_cast<size_t>(n));
    quantizer.assign(n, keys, labels.data());
    list_of_key->assign(labels.begin(), labels.end());
  } catch (const std::exception& e) {
    return FromException("faiss IVF lists", e);
  }
  return absl::OkStatus();
}

std::unique_ptr<AnnIndex> MakeFaissIvf(int keys_per_list) {
  return std::make_unique<FaissIvf>(keys_per_list);
}
std::unique_ptr<AnnIndex> MakeHnsw(int m, int ef_construction) {
  return std::make_unique<Hnsw>(m, ef_construction);
}
std::unique_ptr<AnnIndex> MakeQuest(int page_tokens) {
  return std::make_unique<Quest>(page_tokens);
}
std::unique_ptr<AnnIndex> MakeWave(int tokens_per_cluster) {
  return std::make_unique<Wave>(tokens_per_cluster);
}
std::unique_ptr<AnnIndex> MakeGraph(const index::GraphIndexOptions& options,
                                    const std::string& name) {
  return std::make_unique<Graph>(options, name);
}

}  // namespace kvwave::bench
