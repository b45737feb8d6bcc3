// `kvwave-bench retrieval`: recall / scan fraction / attention mass / latency of every retrieval
// method (graph, wave, Quest, IVF, HNSW, exact) on a trace, swept over each method's work knob,
// plus (--ood) the out-of-distribution facts: Mahalanobis distances and IVF's scan fraction with
// real queries vs keys as queries.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/lib/ann_baselines.h"
#include "bench/lib/linalg.h"
#include "bench/lib/retrieval_eval.h"
#include "bench/retrieval_daemon.h"
#include "bench/subcommand.h"
#include "client/trace_file.h"
#include "config/status_macros.h"
#ifdef KVWAVE_BENCH_CUDA
#include "gpu/cuda_backend.h"
#endif
#include "index/exact_topn.h"
#include "oneapi/tbb/global_control.h"

namespace kvwave::bench {
namespace {

struct RetrievalFlags {
  std::string trace;
  std::vector<int> layers;
  int64_t queries = 256;
  int topk = 100;
  std::string json, plot, table;
  std::string plot_script = (std::filesystem::path(__FILE__).parent_path() / "plot_retrieval.gp");
  std::vector<std::string> methods = {"flat",  "faiss-flat", "ivf",  "hnsw",
                                      "quest", "wave",       "graph"};
  bool ood = false;
  bool graph_per_query_head = false;
  bool graph_oracle = false;     // diagnostic: build the graph from the decode queries themselves
  bool graph_gpu = false;        // the graph build's top-N on the GPU (CUDA builds)
  bool graph_gpu_check = false;  // ... and compared with the CPU kernel's lists
  index::GraphIndexOptions graph;
  int ivf_keys_per_list = 64;
  int hnsw_m = 16, hnsw_ef_construction = 200;
  int quest_page = 16;
  int wave_cluster = 16;
  // --through-daemon: Retrieve through a real kvwaved (bench/retrieval_daemon.h).
  bool through_daemon = false;
  DaemonRetrievalOptions daemon;
};

std::unique_ptr<AnnIndex> MakeMethod(const std::string& name, const RetrievalFlags& f) {
  if (name == "flat") return MakeFlatScan();
  if (name == "faiss-flat") return MakeFaissFlat();
  if (name == "ivf") return MakeFaissIvf(f.ivf_keys_per_list);
  if (name == "hnsw") return MakeHnsw(f.hnsw_m, f.hnsw_ef_construction);
  if (name == "quest") return MakeQuest(f.quest_page);
  if (name == "wave") return MakeWave(f.wave_cluster);
  if (name == "graph") return MakeGraph(f.graph);
  if (name == "graph-old") {  // the build as it was before the blocked top-N (issue 19)
    index::GraphIndexOptions old = f.graph;
    old.blocked_topn = false;
    old.max_queries = 65536;
    old.refine_queue = 100;
    old.pivots_per_query = 1;
    old.prune_pool = 8;
    return MakeGraph(old, "graph-old");
  }
  return nullptr;
}

// Mean Mahalanobis distance to the key distribution of one group, per kind of vector.
struct OodSums {
  double keys_in = 0, keys_held_out = 0, queries = 0, key_norm = 0, query_norm = 0;
  int64_t groups = 0;
  std::vector<SweepPoint> ivf_real, ivf_keys;  // IVF sweeps, real queries vs keys as queries
  // How spread a query's top-k is (real decode queries [0] vs held-out keys as queries [1]),
  // summed over queries: the fewest IVF lists holding 95% of its top-k, the keys in those lists
  // (over n: the scan of an IVF that ranked its lists perfectly), the fewest aligned windows of
  // kWindow positions holding 95% of it, and the share of the variance of q.k over the keys
  // that comes from the keys' low-variance directions (key PCA beyond kLowRank).
  double lists95[2] = {0, 0}, oracle_scan[2] = {0, 0}, windows95[2] = {0, 0};
  double lowvar_share[2] = {0, 0}, spread_queries[2] = {0, 0};
  // How fixed that low-variance part is: per query head, |mean a|^2 / mean |a|^2 with
  // a_j = sqrt(lambda_j) (q . e_j), j >= kLowRank (1 = the same for every query), summed over
  // heads.
  double lowvar_fixed[2] = {0, 0}, lowvar_heads[2] = {0, 0};
  double nlist = 0, nwindows = 0;
};

constexpr int64_t kWindow = 1024;
constexpr int kLowRank = 16;

// Fewest groups (by label) that together hold >= 95% of `top`; also their total size.
int FewestGroups95(const std::vector<int32_t>& top, const std::vector<int32_t>& label_of_key,
                   const std::vector<int64_t>& group_size, int64_t* keys_in_them) {
  std::vector<std::pair<int, int32_t>> counts;  // (count, label)
  for (int32_t id : top) {
    const int32_t l = label_of_key[id];
    auto it =
        std::find_if(counts.begin(), counts.end(), [l](const auto& c) { return c.second == l; });
    if (it == counts.end()) {
      counts.emplace_back(1, l);
    } else {
      ++it->first;
    }
  }
  std::sort(counts.begin(), counts.end(), [&](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : group_size[a.second] < group_size[b.second];
  });
  const int need = static_cast<int>(std::ceil(0.95 * static_cast<double>(top.size()) - 1e-9));
  int held = 0, groups = 0;
  *keys_in_them = 0;
  for (const auto& [count, l] : counts) {
    if (held >= need) break;
    held += count;
    ++groups;
    *keys_in_them += group_size[l];
  }
  return groups;
}

void AddSpread(const GroupData& g, const GroundTruth& truth, const float* queries,
               const std::vector<int32_t>& list_of_key, const std::vector<int64_t>& list_size,
               const Eigen& key_pca, int which, OodSums* ood) {
  {
    const int d = g.d;
    const int64_t nq = static_cast<int64_t>(truth.top.size());
    for (int64_t first = 0; first < nq; first += g.num_queries) {  // one block per query head
      std::vector<double> mean(static_cast<size_t>(d), 0.0);
      double norm2 = 0;
      const int64_t last = std::min(nq, first + g.num_queries);
      for (int64_t i = first; i < last; ++i) {
        for (int j = kLowRank; j < d; ++j) {
          double proj = 0;
          for (int c = 0; c < d; ++c) proj += queries[i * d + c] * key_pca.vectors[c * d + j];
          const double a = std::sqrt(std::max(key_pca.values[j], 0.0)) * proj;
          mean[j] += a;
          norm2 += a * a;
        }
      }
      double mean2 = 0;
      for (double m : mean) mean2 += m * m;
      const double count = static_cast<double>(last - first);
      ood->lowvar_fixed[which] += norm2 > 0 ? (mean2 / (count * count)) / (norm2 / count) : 0;
      ood->lowvar_heads[which] += 1;
    }
  }
  std::vector<int32_t> window_of_key(static_cast<size_t>(g.n));
  std::vector<int64_t> window_size((g.n + kWindow - 1) / kWindow, 0);
  for (int64_t i = 0; i < g.n; ++i) {
    window_of_key[i] = static_cast<int32_t>(i / kWindow);
    ++window_size[i / kWindow];
  }
  const int d = g.d;
  for (size_t i = 0; i < truth.top.size(); ++i) {
    int64_t keys = 0, unused = 0;
    ood->lists95[which] += FewestGroups95(truth.top[i], list_of_key, list_size, &keys);
    ood->oracle_scan[which] += static_cast<double>(keys) / static_cast<double>(g.n);
    ood->windows95[which] += FewestGroups95(truth.top[i], window_of_key, window_size, &unused);
    double low = 0, all = 0;
    for (int j = 0; j < d; ++j) {
      double proj = 0;
      for (int c = 0; c < d; ++c) proj += queries[i * d + c] * key_pca.vectors[c * d + j];
      const double part = std::max(key_pca.values[j], 0.0) * proj * proj;
      all += part;
      if (j >= kLowRank) low += part;
    }
    ood->lowvar_share[which] += all > 0 ? low / all : 0;
    ood->spread_queries[which] += 1;
  }
}

double MeanMahalanobis(const GaussianFit& fit, const std::vector<float>& rows, int d,
                       int64_t limit) {
  const int64_t n = static_cast<int64_t>(rows.size()) / d;
  const int64_t step = std::max<int64_t>(1, n / limit);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; i += step, ++count) sum += fit.Mahalanobis(rows.data() + i * d);
  return sum / static_cast<double>(count);
}

double MeanNorm(const std::vector<float>& rows, int d) {
  const int64_t n = static_cast<int64_t>(rows.size()) / d;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += double{rows[i * d + j]} * rows[i * d + j];
    sum += std::sqrt(s);
  }
  return sum / static_cast<double>(n);
}

absl::Status MeasureOod(const GroupData& g, const std::vector<float>& decode_all,
                        const GroundTruth& truth, const RetrievalFlags& f, OodSums* ood) {
  const GaussianFit fit(ComputeMoments(g.keys.data(), g.n, g.d), 1e-3);
  ood->keys_in += MeanMahalanobis(fit, g.keys, g.d, 2048);
  ood->keys_held_out += MeanMahalanobis(fit, g.held_out_keys, g.d, 2048);
  ood->queries += MeanMahalanobis(fit, decode_all, g.d, 4096);
  ood->key_norm += MeanNorm(g.keys, g.d);
  ood->query_norm += MeanNorm(decode_all, g.d);
  ++ood->groups;
  std::unique_ptr<AnnIndex> ivf = MakeFaissIvf(f.ivf_keys_per_list);
  KVWAVE_RETURN_IF_ERROR(ivf->Build(g.keys.data(), g.n, g.d, nullptr, 0));
  const int64_t nq = static_cast<int64_t>(decode_all.size()) / g.d;
  KVWAVE_RETURN_IF_ERROR(
      SweepIndex(ivf.get(), decode_all.data(), nq, g.d, g.n, truth, 0, &ood->ivf_real));
  const GroundTruth key_truth =
      ExactGroundTruth(g.keys.data(), g.n, g.d, g.held_out_keys.data(), g.num_queries, f.topk);
  KVWAVE_RETURN_IF_ERROR(SweepIndex(ivf.get(), g.held_out_keys.data(), g.num_queries, g.d, g.n,
                                    key_truth, 0, &ood->ivf_keys));
  std::vector<int32_t> list_of_key;
  int64_t nlist = 0;
  KVWAVE_RETURN_IF_ERROR(
      FaissIvfLists(g.keys.data(), g.n, g.d, f.ivf_keys_per_list, &list_of_key, &nlist));
  std::vector<int64_t> list_size(static_cast<size_t>(nlist), 0);
  for (int32_t l : list_of_key) ++list_size[l];
  const Eigen key_pca = SymmetricEigen(ComputeMoments(g.keys.data(), g.n, g.d).cov, g.d);
  AddSpread(g, truth, decode_all.data(), list_of_key, list_size, key_pca, 0, ood);
  AddSpread(g, key_truth, g.held_out_keys.data(), list_of_key, list_size, key_pca, 1, ood);
  ood->nlist += static_cast<double>(nlist);
  ood->nwindows += static_cast<double>((g.n + kWindow - 1) / kWindow);
  return absl::OkStatus();
}

std::string FormatOod(const OodSums& o, int topk) {
  const double n = static_cast<double>(o.groups);
  std::string out = absl::StrFormat(
      "# OOD: mean Mahalanobis distance to the key distribution (Gaussian fit on the indexed "
      "keys)\n"
      "#   indexed keys %.2f   held-out keys %.2f   decode queries %.2f   (ratio queries / "
      "held-out %.2fx)\n"
      "#   mean L2 norm: keys %.2f   queries %.2f\n",
      o.keys_in / n, o.keys_held_out / n, o.queries / n, o.queries / o.keys_held_out,
      o.key_norm / n, o.query_norm / n);
  const double real = ScanFractionAtRecall(o.ivf_real, "ivf", 0.95);
  const double keys = ScanFractionAtRecall(o.ivf_keys, "ivf", 0.95);
  absl::StrAppendFormat(&out,
                        "# OOD: IVF scan fraction for recall@%d >= 0.95: real queries %.4f, "
                        "held-out keys as queries %.4f (%.1fx)\n",
                        topk, real, keys, keys > 0 ? real / keys : -1.0);
  auto spread = [&](int w) {
    const double q = o.spread_queries[w];
    return absl::StrFormat(
        "IVF lists holding 95%% of the top-%d %.1f of %.0f (their keys %.4f of all), "
        "windows of %d positions %.1f of %.0f, q.k variance from key PCA dims >= %d %.3f "
        "(fixed part %.3f)",
        topk, o.lists95[w] / q, o.nlist / n, o.oracle_scan[w] / q, kWindow, o.windows95[w] / q,
        o.nwindows / n, kLowRank, o.lowvar_share[w] / q, o.lowvar_fixed[w] / o.lowvar_heads[w]);
  };
  absl::StrAppend(&out, "# spread, real queries:    ", spread(0), "\n",
                  "# spread, held-out keys:   ", spread(1), "\n");
  out += "# IVF with held-out keys as queries:\n";
  for (absl::string_view line : absl::StrSplit(FormatTable(o.ivf_keys), '\n')) {
    if (!line.empty()) absl::StrAppend(&out, "#   ", line, "\n");
  }
  return out;
}

// The bars of issue 3, computed from the sweep.
std::string FormatBars(const std::vector<SweepPoint>& points) {
  std::string out =
      "# at recall 0.95: index, scan fraction (interpolated), us/query (first point)\n";
  std::vector<std::string> names;
  for (const SweepPoint& p : points) {
    if (std::find(names.begin(), names.end(), p.index) == names.end()) names.push_back(p.index);
  }
  for (const std::string& name : names) {
    absl::StrAppendFormat(&out, "#   %-11s scan %8.4f   us %9.1f\n", name,
                          ScanFractionAtRecall(points, name, 0.95), UsAtRecall(points, name, 0.95));
  }
  const double graph = ScanFractionAtRecall(points, "graph", 0.95);
  const double ivf = ScanFractionAtRecall(points, "ivf", 0.95);
  const double hnsw = ScanFractionAtRecall(points, "hnsw", 0.95);
  const double graph_us = UsAtRecall(points, "graph", 0.95);
  const double flat_us = UsAtRecall(points, "flat", 0.95);
  // A baseline that never reaches the target recall needs more than everything the sweep tried.
  const char* vs_ann = graph <= 0 ? "FAIL" : (ivf < 0 && hnsw < 0) ? "n/a" : "FAIL";
  if (graph > 0 && (ivf < 0 || ivf / graph >= 3) && (hnsw < 0 || hnsw / graph >= 3) &&
      (ivf > 0 || hnsw > 0)) {
    vs_ann = "PASS";
  }
  // "never": the baseline does not reach the target recall anywhere in its sweep.
  auto ratio = [&](double base) {
    return base < 0 || graph <= 0 ? std::string("never") : absl::StrFormat("%.1fx", base / graph);
  };
  absl::StrAppendFormat(&out,
                        "# bars: graph scan@0.95 %.4f (<= 0.03: %s); ivf/graph %s, hnsw/graph "
                        "%s (>= 3: %s); flat/graph us %.1fx (>= 5: %s)\n",
                        graph, graph > 0 && graph <= 0.03 ? "PASS" : "FAIL", ratio(ivf),
                        ratio(hnsw), vs_ann, flat_us / graph_us,
                        graph_us > 0 && flat_us / graph_us >= 5 ? "PASS" : "FAIL");
  return out;
}

absl::Status RunGroup(const trace::Trace& trace, int64_t layer, int64_t kv_head,
                      const RetrievalFlags& f, std::vector<SweepPoint>* points, OodSums* ood) {
  KVWAVE_ASSIGN_OR_RETURN(GroupData g, LoadGroup(trace, layer, kv_head, f.queries));
  const int group = static_cast<int>(g.decode.size());
  std::vector<GroundTruth> truth;
  std::vector<float> prefill_all, decode_all;
  for (int h = 0; h < group; ++h) {
    truth.push_back(
        ExactGroundTruth(g.keys.data(), g.n, g.d, g.decode[h].data(), g.num_queries, f.topk));
    prefill_all.insert(prefill_all.end(), g.prefill[h].begin(), g.prefill[h].end());
    decode_all.insert(decode_all.end(), g.decode[h].begin(), g.decode[h].end());
  }
  for (const std::string& name : f.methods) {
    const bool per_head = name == "graph" && f.graph_per_query_head;
    // "graph-old" is the graph's build before issue 19, for old-vs-new in one run.
    std::unique_ptr<AnnIndex> shared;
    double shared_build_us = 0;
    for (int h = 0; h < group; ++h) {
      std::unique_ptr<AnnIndex> own;
      double build_us = shared_build_us;
      if (per_head || shared == nullptr) {
        own = MakeMethod(name, f);
        if (own == nullptr) return absl::InvalidArgumentError("unknown method " + name);
        const float* pre = per_head ? g.prefill[h].data() : prefill_all.data();
        int64_t m = per_head ? g.n : g.n * group;
        if (name.starts_with("graph") && f.graph_oracle) {
          pre = per_head ? g.decode[h].data() : decode_all.data();
          m = per_head ? g.num_queries : g.num_queries * group;
        }
        const auto start = std::chrono::steady_clock::now();
        KVWAVE_RETURN_IF_ERROR(own->Build(g.keys.data(), g.n, g.d, pre, m));
        build_us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
                .count();
        if (per_head) build_us *= group;  // cost of the whole KV head's set of graphs
        if (!per_head) {
          shared = std::move(own);
          shared_build_us = build_us;
        }
      }
      AnnIndex* index = per_head ? own.get() : shared.get();
      tbb::global_control one_thread(tbb::global_control::max_allowed_parallelism, 1);
      KVWAVE_RETURN_IF_ERROR(SweepIndex(index, g.decode[h].data(), g.num_queries, g.d, g.n,
                                        truth[h], build_us, points));
    }
    std::fprintf(stderr, "  layer %ld kv %ld: %s done\n", static_cast<long>(layer),
                 static_cast<long>(kv_head), name.c_str());
  }
  if (!f.ood) return absl::OkStatus();
  GroundTruth all;
  all.k = f.topk;
  for (GroundTruth& t : truth) {
    all.top.insert(all.top.end(), t.top.begin(), t.top.end());
    all.weight.insert(all.weight.end(), t.weight.begin(), t.weight.end());
  }
  return MeasureOod(g, decode_all, all, f, ood);
}

absl::Status Run(const RetrievalFlags& f) {
  KVWAVE_ASSIGN_OR_RETURN(trace::Trace trace, trace::Trace::Open(f.trace));
  std::vector<int> layers = f.layers;
  if (layers.empty()) {
    for (int l = 0; l < trace.layers; ++l) layers.push_back(l);
  }
  std::printf(
      "# trace %s: %ld tokens, %ld layers (axis 0 of the files), %ld q heads over %ld kv heads, "
      "d=%ld\n# layers (axis indices) %s; keys [0, %ld), queries the last %ld positions; top-%d\n"
      "# graph: N=%d M=%d build queries=%ld alpha=%.2f refine queue=%d connect queue=%d "
      "entries=%d recent-entries=%d prune-ip=%d position-links=%d per-query-head=%d\n",
      f.trace.c_str(), static_cast<long>(trace.tokens), static_cast<long>(trace.layers),
      static_cast<long>(trace.q_heads), static_cast<long>(trace.kv_heads),
      static_cast<long>(trace.head_dim), absl::StrJoin(layers, ",").c_str(),
      static_cast<long>(trace.tokens - f.queries), static_cast<long>(f.queries), f.topk,
      f.graph.query_neighbors, f.graph.max_degree, static_cast<long>(f.graph.max_queries),
      f.graph.prune_alpha, f.graph.refine_queue, f.graph.connect_queue, f.graph.entry_points,
      f.graph.recent_entries, f.graph.prune_by_ip, f.graph.position_links, f.graph_per_query_head);
  omp_set_num_threads(1);  // FAISS searches on one thread, like everything else timed here
  std::vector<SweepPoint> points;
  OodSums ood;
  for (int layer : layers) {
    for (int64_t kv = 0; kv < trace.kv_heads; ++kv) {
      KVWAVE_RETURN_IF_ERROR(RunGroup(trace, layer, kv, f, &points, &ood));
    }
  }
  std::string text = FormatTable(points) + FormatBars(points);
  if (f.ood) text += FormatOod(ood, f.topk);
  std::fputs(text.c_str(), stdout);
  if (!f.table.empty()) {
    std::ofstream(f.table) << text;
  }
  if (!f.json.empty()) KVWAVE_RETURN_IF_ERROR(WriteJson(f.json, points));
  if (!f.plot.empty()) {
    const std::string title = absl::StrCat(std::filesystem::path(f.trace).filename().string(),
                                           ": recall@", f.topk, " vs scan fraction");
    KVWAVE_RETURN_IF_ERROR(WritePlot(f.plot, f.plot_script, title, points));
  }
  return absl::OkStatus();
}

int RunRetrieval(int argc, char** argv) {
  RetrievalFlags f;
  CLI::App app{"recall / scan fraction / attention mass / latency of each index on a trace"};
  app.add_option("--trace", f.trace, "trace PREFIX (PREFIX_{q,k,v}.npy)")->required();
  app.add_option("--layers", f.layers, "indices into the trace's first axis (default all)")
      ->delimiter(',');
  app.add_option("--queries", f.queries, "decode queries: the last N positions");
  app.add_option("--topk", f.topk, "k of recall@k");
  app.add_option("--json", f.json, "write the sweep as JSON");
  app.add_option("--plot", f.plot, "write recall vs scan fraction as a PNG (gnuplot)");
  app.add_option("--table", f.table, "write the printed table to a text file");
  app.add_option("--plot-script", f.plot_script, "the gnuplot script");
  app.add_option("--methods", f.methods, "methods to run")->delimiter(',');
  app.add_flag("--ood", f.ood, "also measure the OOD facts (Mahalanobis, IVF keys-as-queries)");
  app.add_option("--graph-neighbors", f.graph.query_neighbors, "graph: N, exact keys per query");
  app.add_option("--graph-degree", f.graph.max_degree, "graph: M, max out-degree");
  app.add_option("--graph-queries", f.graph.max_queries, "graph: sampled prefill queries (0=all)");
  app.add_option("--graph-alpha", f.graph.prune_alpha, "graph: pruning alpha");
  app.add_option("--graph-refine-queue", f.graph.refine_queue, "graph: refinement queue (0=off)");
  app.add_option("--graph-connect-queue", f.graph.connect_queue, "graph: connect-pass queue");
  app.add_option("--graph-entries", f.graph.entry_points, "graph: entry points per search");
  app.add_option("--graph-recent-entries", f.graph.recent_entries,
                 "graph: searches also start from the last N keys");
  app.add_flag("--graph-prune-ip,!--graph-prune-l2", f.graph.prune_by_ip,
               "graph: prune by inner product (default) or by L2");
  app.add_option("--graph-position-links", f.graph.position_links,
                 "graph: also link each key to its w neighbours in token order");
  app.add_option("--graph-seed", f.graph.seed, "graph: sampling seed");
  app.add_option("--graph-prune-pool", f.graph.prune_pool, "graph: occlusion pool, x M");
  app.add_option("--graph-pivots", f.graph.pivots_per_query, "graph: pivots per sampled query");
  app.add_flag("--graph-blocked-topn,!--graph-rowwise-topn", f.graph.blocked_topn,
               "graph: exact top-N by the blocked kernel (default) or the previous one");
#ifdef KVWAVE_BENCH_CUDA
  app.add_flag("--graph-gpu", f.graph_gpu,
               "graph: exact top-N on the GPU (CudaBackend::ExactTopN)");
  app.add_flag("--graph-gpu-check", f.graph_gpu_check,
               "graph: with --graph-gpu, also run the CPU top-N and count differing entries");
#endif
  app.add_flag("--graph-per-query-head", f.graph_per_query_head, "one graph per query head");
  app.add_flag("--graph-oracle", f.graph_oracle,
               "diagnostic: build the graph from the decode queries it is tested with");
  app.add_option("--ivf-list-size", f.ivf_keys_per_list, "IVF: keys per list (nlist = n / this)");
  app.add_option("--hnsw-m", f.hnsw_m, "HNSW: M");
  app.add_option("--hnsw-ef-construction", f.hnsw_ef_construction, "HNSW: efConstruction");
  app.add_option("--quest-page", f.quest_page, "Quest: tokens per page");
  app.add_option("--wave-cluster", f.wave_cluster, "wave: tokens per cluster");
  app.add_flag("--through-daemon", f.through_daemon,
               "measure wave / graph / flat through a real kvwaved's Retrieve (queries appended, "
               "graphs built per sealed segment by the daemon)");
  app.add_option("--kvwaved", f.daemon.kvwaved, "--through-daemon: the kvwaved binary");
  app.add_option("--set", f.daemon.overrides,
                 "--through-daemon: a kvwaved setting, section.key=value (repeatable)");
  app.add_option("--segment-tokens", f.daemon.segment_tokens,
                 "--through-daemon: store.prefill_segment_tokens");
  app.add_option("--beams", f.daemon.beams, "--through-daemon: graph beams swept")->delimiter(',');
  app.add_option("--cluster-budgets", f.daemon.cluster_budgets,
                 "--through-daemon: wave cluster budgets swept")
      ->delimiter(',');
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  PrintEnvironmentHeader();
#ifdef KVWAVE_BENCH_CUDA
  static std::unique_ptr<gpu::CudaBackend> gpu_backend;
  static gpu::TopNBuffers gpu_buffers;
  if (f.graph_gpu) {
    gpu::CudaBackendOptions bo;
    bo.num_streams = 1;
    bo.num_events = 1;
    bo.workspace_bytes = int64_t{256} << 20;
    absl::StatusOr<std::unique_ptr<gpu::CudaBackend>> b = gpu::CudaBackend::Create(bo);
    if (!b.ok()) {
      std::fprintf(stderr, "retrieval --graph-gpu: %s\n", b.status().ToString().c_str());
      return 1;
    }
    gpu_backend = *std::move(b);
    const bool check = f.graph_gpu_check;
    f.graph.exact_topn = [check](const float* keys, int64_t n, const float* queries, int64_t m,
                                 int d, int nn, int32_t* out) -> absl::Status {
      KVWAVE_RETURN_IF_ERROR(
          gpu::ExactTopNHost(*gpu_backend, gpu_buffers, keys, n, queries, m, d, nn, out));
      if (check) {
        std::vector<int32_t> cpu(static_cast<size_t>(m) * nn);
        KVWAVE_RETURN_IF_ERROR(index::ExactTopN(keys, n, queries, m, d, nn, cpu.data()));
        int64_t differ = 0;
        for (size_t i = 0; i < cpu.size(); ++i) differ += cpu[i] != out[i];
        std::fprintf(stderr, "  top-N GPU vs CPU: %ld of %zu entries differ\n",
                     static_cast<long>(differ), cpu.size());
      }
      return absl::OkStatus();
    };
  }
#endif
  if (f.through_daemon) {
    DaemonRetrievalOptions& o = f.daemon;
    o.trace = f.trace;
    o.layers = f.layers;
    o.queries = f.queries;
    o.topk = f.topk;
    o.json = f.json;
    o.table = f.table;
    // The daemon's graph options are its settings (index.graph_*), not the library defaults
    // above: pass --set index.graph_queries=... to change them.
    if (absl::Status s = RunRetrievalThroughDaemon(o); !s.ok()) {
      std::fprintf(stderr, "retrieval --through-daemon: %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  }
  if (absl::Status s = Run(f); !s.ok()) {
    std::fprintf(stderr, "retrieval: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

const bool kRegistered = Register(
    {"retrieval", "recall / scan fraction / latency of each index on a trace", &RunRetrieval});

}  // namespace
}  // namespace kvwave::bench
