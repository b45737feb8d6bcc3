#include "index/graph_index.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "index/distance.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvwave::index {
namespace {

using AdjacencyLists = std::vector<std::vector<int32_t>>;

// Rows of the m prefill queries used for the build: all of them, or `limit` drawn without
// replacement (partial Fisher-Yates on mt19937_64, whose sequence the standard fixes), sorted.
std::vector<int64_t> SampleRows(int64_t m, int64_t limit, uint64_t seed) {
  std::vector<int64_t> rows(static_cast<size_t>(m));
  std::iota(rows.begin(), rows.end(), 0);
  if (limit <= 0 || limit >= m) return rows;
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < limit; ++i) {
    int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(m - i));
    std::swap(rows[i], rows[j]);
  }
  rows.resize(static_cast<size_t>(limit));
  std::sort(rows.begin(), rows.end());
  return rows;
}

// knn[j * nn + r] = the r-th best key of query rows[j] by q.k (exact). Parallel over query blocks.
std::vector<int32_t> ExactNeighbors(const float* keys, int64_t n, const float* queries,
                                    const std::vector<int64_t>& rows, int d, int nn) {
  constexpr int kBlock = 16;
  const int64_t m = static_cast<int64_t>(rows.size());
  std::vector<int32_t> knn(static_cast<size_t>(m * nn));
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks, 1), [&](const auto& range) {
    std::vector<float> qs(size_t{kBlock} * d), scores(static_cast<size_t>(kBlock * n));
    for (int64_t b = range.begin(); b < range.end(); ++b) {
      const int64_t first = b * kBlock;
      const int count = static_cast<int>(std::min<int64_t>(kBlock, m - first));
      for (int i = 0; i < count; ++i) {
        std::copy_n(queries + rows[first + i] * d, d, qs.data() + int64_t{i} * d);
      }
      DotRowsMulti(qs.data(), count, keys, n, d, scores.data());
      for (int i = 0; i < count; ++i) {
        std::vector<int32_t> top = TopKIndices(scores.data() + i * n, n, nn);
        std::copy(top.begin(), top.end(), knn.begin() + (first + i) * nn);
      }
    }
  });
  return knn;
}

float SquaredL2(const float* a, const float* b, float norm_a, float norm_b, int d) {
  return norm_a + norm_b - 2.0f * Dot(a, b, d);
}

// Relative-neighbourhood pruning of pivot p's candidates to at most m, in order of distance to p;
// candidates occluded by a kept neighbour top the list up to m afterwards.
std::vector<int32_t> PruneCandidates(int32_t p, std::vector<int32_t> cand, const float* keys,
                                     const std::vector<float>& norms, int d, int m, float alpha) {
  std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  std::erase(cand, p);
  const float* kp = keys + int64_t{p} * d;
  std::vector<std::pair<float, int32_t>> by_dist;
  by_dist.reserve(cand.size());
  for (int32_t c : cand) {
    by_dist.emplace_back(SquaredL2(kp, keys + int64_t{c} * d, norms[p], norms[c], d), c);
  }
  std::sort(by_dist.begin(), by_dist.end());
  std::vector<int32_t> kept, occluded;
  const float alpha2 = alpha * alpha;
  for (const auto& [dist_pc, c] : by_dist) {
    if (static_cast<int>(kept.size()) >= m) break;
    const float* kc = keys + int64_t{c} * d;
    bool is_occluded = false;
    for (int32_t s : kept) {
      if (alpha2 * SquaredL2(keys + int64_t{s} * d, kc, norms[s], norms[c], d) < dist_pc) {
        is_occluded = true;
        break;
      }
    }
    (is_occluded ? occluded : kept).push_back(c);
  }
  for (size_t i = 0; i < occluded.size() && static_cast<int>(kept.size()) < m; ++i) {
    kept.push_back(occluded[i]);
  }
  return kept;
}

// Steps 2 and 3 of the recipe in the header: pivots, pruning, reverse edges.
AdjacencyLists ProjectOntoKeys(const std::vector<int32_t>& knn, int nn, const float* keys,
                               int64_t n, int d, const GraphIndexOptions& options) {
  AdjacencyLists cand(static_cast<size_t>(n));
  const int64_t queries = static_cast<int64_t>(knn.size()) / nn;
  for (int64_t j = 0; j < queries; ++j) {
    const int32_t* row = knn.data() + j * nn;
    cand[row[0]].insert(cand[row[0]].end(), row + 1, row + nn);
  }
  std::vector<float> norms(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) norms[i] = Dot(keys + i * d, keys + i * d, d);
  AdjacencyLists adj(static_cast<size_t>(n));
  tbb::parallel_for(int64_t{0}, n, [&](int64_t p) {
    if (!cand[p].empty()) {
      adj[p] = PruneCandidates(static_cast<int32_t>(p), std::move(cand[p]), keys, norms, d,
                               options.max_degree, options.prune_alpha);
    }
  });
  const AdjacencyLists forward = adj;
  for (int64_t p = 0; p < n; ++p) {
    for (int32_t c : forward[p]) {
      auto& back = adj[c];
      if (static_cast<int>(back.size()) < options.max_degree &&
          std::find(back.begin(), back.end(), static_cast<int32_t>(p)) == back.end()) {
        back.push_back(static_cast<int32_t>(p));
      }
    }
  }
  return adj;
}

// Marks everything reachable from `start` (iterative DFS).
void MarkReachable(const AdjacencyLists& adj, int32_t start, std::vector<char>* reached) {
  std::vector<int32_t> stack = {start};
  (*reached)[start] = 1;
  while (!stack.empty()) {
    int32_t u = stack.back();
    stack.pop_back();
    for (int32_t v : adj[u]) {
      if (!(*reached)[v]) {
        (*reached)[v] = 1;
        stack.push_back(v);
      }
    }
  }
}

}  // namespace

std::vector<int32_t> TopKIndices(const float* scores, int64_t n, int k) {
  const int64_t kk = std::min<int64_t>(std::max(k, 0), n);
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [scores](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  if (kk < n) std::nth_element(idx.begin(), idx.begin() + kk, idx.end(), better);
  idx.resize(static_cast<size_t>(kk));
  std::sort(idx.begin(), idx.end(), better);
  return idx;
}

// The beam search shared by Search and the connectivity pass: on return scratch->queue_ holds
// the best `queue_size` keys seen, best first. `neighbors(u)` yields u's out-neighbours.
template <typename NeighborsFn>
static int64_t BeamSearch(const float* keys, int64_t n, int d, int32_t entry, const float* q,
                          int queue_size, NeighborsFn neighbors,
                          std::vector<uint32_t>& visited, uint32_t& epoch, auto& queue) {
  if (visited.size() != static_cast<size_t>(n)) visited.assign(static_cast<size_t>(n), 0);
  if (++epoch == 0) {  // wrapped: clear the marks once every 2^32 searches
    std::fill(visited.begin(), visited.end(), 0);
    epoch = 1;
  }
  queue.clear();
  queue.push_back({Dot(q, keys + int64_t{entry} * d, d), entry, false});
  visited[entry] = epoch;
  int64_t scanned = 1;
  int32_t fresh[256];
  size_t cur = 0;
  while (cur < queue.size()) {
    if (queue[cur].expanded) {
      ++cur;
      continue;
    }
    queue[cur].expanded = true;
    int num_fresh = 0;
    for (int32_t v : neighbors(queue[cur].id)) {
      if (visited[v] == epoch || num_fresh == 256) continue;
      visited[v] = epoch;
      fresh[num_fresh++] = v;
      __builtin_prefetch(keys + int64_t{v} * d);
    }
    size_t next = cur + 1;
    for (int i = 0; i < num_fresh; ++i) {
      const float score = Dot(q, keys + int64_t{fresh[i]} * d, d);
      ++scanned;
      if (static_cast<int>(queue.size()) >= queue_size && score <= queue.back().score) continue;
      auto at = std::upper_bound(queue.begin(), queue.end(), score,
                                 [](float x, const auto& e) { return x > e.score; });
      const size_t pos = static_cast<size_t>(at - queue.begin());
      queue.insert(at, {score, fresh[i], false});
      if (static_cast<int>(queue.size()) > queue_size) queue.pop_back();
      next = std::min(next, pos);
    }
    cur = next;
  }
  return scanned;
}

absl::StatusOr<GraphIndex> GraphIndex::Build(const float* keys, int64_t n, const float* queries,
                                             int64_t m, int d, const GraphIndexOptions& options) {
  if (n < 1 || m < 1 || d < 1) {
    return absl::InvalidArgumentError(absl::StrCat("graph index: need keys, queries and a dim (n=",
                                                   n, " m=", m, " d=", d, ")"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("graph index: more than 2^31 keys");
  }
  if (options.query_neighbors < 2 || options.max_degree < 1 || options.max_degree > 256 ||
      options.connect_queue < 1 || options.max_queries < 0 || !(options.prune_alpha > 0.0f)) {
    return absl::InvalidArgumentError(
        "graph index: need query_neighbors >= 2, 1 <= max_degree <= 256, connect_queue >= 1, "
        "max_queries >= 0, prune_alpha > 0");
  }
  GraphIndex g;
  g.n_ = n;
  g.d_ = d;
  g.keys_.assign(keys, keys + n * d);
  const std::vector<int64_t> rows = SampleRows(m, options.max_queries, options.seed);
  const int nn = static_cast<int>(std::min<int64_t>(options.query_neighbors, n));
  AdjacencyLists adj;
  if (nn >= 2) {
    adj = ProjectOntoKeys(ExactNeighbors(keys, n, queries, rows, d, nn), nn, keys, n, d, options);
  } else {
    adj.resize(static_cast<size_t>(n));
  }
  std::vector<float> mean(static_cast<size_t>(d), 0.0f);
  for (int64_t r : rows) {
    for (int i = 0; i < d; ++i) mean[i] += queries[r * d + i];
  }
  std::vector<float> affinity(static_cast<size_t>(n));
  DotRows(mean.data(), keys, n, d, affinity.data());
  g.entry_ = TopKIndices(affinity.data(), n, 1)[0];
  g.Connect(&adj, options);
  g.offsets_.assign(1, 0);
  for (const auto& list : adj) {
    g.targets_.insert(g.targets_.end(), list.begin(), list.end());
    g.offsets_.push_back(static_cast<int64_t>(g.targets_.size()));
  }
  return g;
}

void GraphIndex::Connect(std::vector<std::vector<int32_t>>* adj, const GraphIndexOptions& options) {
  std::vector<char> reached(static_cast<size_t>(n_), 0);
  MarkReachable(*adj, entry_, &reached);
  GraphSearchScratch scratch;
  const auto neighbors = [adj](int32_t u) -> const std::vector<int32_t>& { return (*adj)[u]; };
  for (int32_t u = 0; u < n_; ++u) {
    if (reached[u]) continue;
    const float* ku = keys_.data() + int64_t{u} * d_;
    BeamSearch(keys_.data(), n_, d_, entry_, ku, options.connect_queue, neighbors,
               scratch.visited_, scratch.epoch_, scratch.queue_);
    int32_t from = scratch.queue_.front().id;
    for (const auto& e : scratch.queue_) {
      if (static_cast<int>((*adj)[e.id].size()) < options.max_degree) {
        from = e.id;
        break;
      }
    }
    (*adj)[from].push_back(u);
    ++connect_edges_;
    auto& out = (*adj)[u];
    if (static_cast<int>(out.size()) < options.max_degree &&
        std::find(out.begin(), out.end(), from) == out.end()) {
      out.push_back(from);
    }
    MarkReachable(*adj, u, &reached);
  }
}

GraphSearchResult GraphIndex::Search(const float* q, int k, int queue_size,
                                     GraphSearchScratch* scratch) const {
  GraphSearchResult result;
  k = static_cast<int>(std::min<int64_t>(std::max(k, 1), n_));
  queue_size = static_cast<int>(std::clamp<int64_t>(queue_size, k, n_));
  const auto neighbors = [this](int32_t u) { return Neighbors(u); };
  result.scanned = BeamSearch(keys_.data(), n_, d_, entry_, q, queue_size, neighbors,
                              scratch->visited_, scratch->epoch_, scratch->queue_);
  const size_t count = std::min<size_t>(static_cast<size_t>(k), scratch->queue_.size());
  result.ids.reserve(count);
  result.scores.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    result.ids.push_back(scratch->queue_[i].id);
    result.scores.push_back(scratch->queue_[i].score);
  }
  return result;
}

GraphSearchResult GraphIndex::Search(const float* q, int k, int queue_size) const {
  GraphSearchScratch scratch;
  return Search(q, k, queue_size, &scratch);
}

int64_t GraphIndex::MemoryBytes() const {
  return static_cast<int64_t>(keys_.size() * sizeof(float) + offsets_.size() * sizeof(int64_t) +
                              targets_.size() * sizeof(int32_t));
}

absl::Status SearchHeads(std::span<const GraphIndex* const> graphs, const float* queries,
                         int q_heads, int k, int queue_size, std::vector<GraphSearchResult>* out) {
  const int num_graphs = static_cast<int>(graphs.size());
  if (num_graphs < 1 || q_heads < 1 || q_heads % num_graphs != 0 || k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("SearchHeads: ", q_heads, " query heads over ",
                                                   num_graphs, " graphs, k=", k));
  }
  for (const GraphIndex* g : graphs) {
    if (g == nullptr) return absl::InvalidArgumentError("SearchHeads: null graph");
    if (g->dim() != graphs[0]->dim()) return absl::InvalidArgumentError("SearchHeads: dims differ");
  }
  const int group = q_heads / num_graphs;
  const int d = graphs[0]->dim();
  out->assign(static_cast<size_t>(q_heads), {});
  tbb::parallel_for(0, q_heads, [&](int h) {
    GraphSearchScratch scratch;
    (*out)[h] = graphs[h / group]->Search(queries + int64_t{h} * d, k, queue_size, &scratch);
  });
  return absl::OkStatus();
}

}  // namespace kvwave::index
