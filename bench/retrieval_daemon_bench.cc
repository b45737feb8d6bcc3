// `kvwave-bench retrieval --through-daemon` (bench/retrieval_daemon.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/lib/retrieval_eval.h"
#include "bench/retrieval_daemon.h"
#include "client/trace_file.h"
#include "config/status_macros.h"
#include "kvwave/client.h"
#include "kvwave/local_daemon.h"

namespace kvwave::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Appends keys [0, n) of every selected layer with their prefill queries, chunk by chunk.
absl::Status AppendTrace(client::Client& c, client::ContextId ctx, const trace::Trace& trace,
                         const std::vector<int>& layers, int64_t n) {
  const int64_t kv = trace.kv_heads * trace.head_dim, qd = trace.q_heads * trace.head_dim;
  constexpr int64_t kChunk = 512;
  std::vector<float> k(kChunk * kv), v(kChunk * kv), q(kChunk * qd);
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int64_t t = 0; t < n; t += kChunk) {
      const int64_t m = std::min(kChunk, n - t);
      trace.k.CopyFloats(trace.KvIndex(layers[l], t, 0), m * kv, k.data());
      trace.v.CopyFloats(trace.KvIndex(layers[l], t, 0), m * kv, v.data());
      trace.q.CopyFloats(trace.QIndex(layers[l], t, 0), m * qd, q.data());
      KVWAVE_RETURN_IF_ERROR(c.AppendWithQueries(
          ctx, static_cast<int32_t>(l), m, std::as_bytes(std::span(k).first(m * kv)),
          std::as_bytes(std::span(v).first(m * kv)), std::span(q).first(m * qd)));
    }
  }
  return absl::OkStatus();
}

struct Method {
  std::string name, param;
  client::RetrieveOptions options;
};

std::vector<Method> Methods(const DaemonRetrievalOptions& o) {
  std::vector<Method> out;
  for (double b : o.cluster_budgets) {
    out.push_back({"daemon-wave",
                   absl::StrFormat("budget=%.3f", b),
                   {o.topk, client::RetrieveMethod::kWave, b, 0}});
  }
  for (int beam : o.beams) {
    out.push_back({"daemon-graph",
                   absl::StrCat("L=", beam),
                   {o.topk, client::RetrieveMethod::kGraph, -1, beam}});
  }
  out.push_back({"daemon-flat", "all", {o.topk, client::RetrieveMethod::kFlat, -1, 0}});
  return out;
}

}  // namespace

absl::Status RunRetrievalThroughDaemon(const DaemonRetrievalOptions& o) {
  KVWAVE_ASSIGN_OR_RETURN(trace::Trace trace, trace::Trace::Open(o.trace));
  std::vector<int> layers = o.layers;
  if (layers.empty()) {
    for (int l = 0; l < trace.layers; ++l) layers.push_back(l);
  }
  const int64_t n = trace.tokens - o.queries;
  const int d = static_cast<int>(trace.head_dim);
  const int q_heads = static_cast<int>(trace.q_heads), kv_heads = static_cast<int>(trace.kv_heads);
  const int group = q_heads / kv_heads;
  client::LocalDaemonOptions dopt;
  dopt.binary = o.kvwaved;
  dopt.overrides = {"log.level=warn",
                    "gpu.mode=off",
                    "index.graph=on",
                    absl::StrCat("store.prefill_segment_tokens=", o.segment_tokens),
                    absl::StrCat("index.graph_queries=", o.graph_queries),
                    absl::StrCat("index.graph_pivots=", o.graph_pivots),
                    absl::StrCat("index.graph_degree=", o.graph_degree)};
  dopt.overrides.insert(dopt.overrides.end(), o.overrides.begin(), o.overrides.end());
  KVWAVE_ASSIGN_OR_RETURN(std::unique_ptr<client::LocalDaemon> daemon,
                          client::LocalDaemon::Start(dopt));
  client::ClientOptions copt;
  copt.socket_path = daemon->socket_path();
  copt.shared_memory_bytes = size_t{64} << 20;
  copt.deadline_ms = 600000;
  KVWAVE_ASSIGN_OR_RETURN(std::unique_ptr<client::Client> c, client::Client::Connect(copt));
  const client::ModelShape shape{static_cast<int32_t>(layers.size()), q_heads, kv_heads, d,
                                 DType::kF32};
  KVWAVE_ASSIGN_OR_RETURN(client::OpenResult ctx, c->Open({shape, {}, ""}));

  const auto t0 = Clock::now();
  KVWAVE_RETURN_IF_ERROR(AppendTrace(*c, ctx.id, trace, layers, n));
  const double append_s = std::chrono::duration<double>(Clock::now() - t0).count();
  KVWAVE_RETURN_IF_ERROR(c->Seal(ctx.id));  // waits for every background seal and graph
  const double sealed_s = std::chrono::duration<double>(Clock::now() - t0).count();
  KVWAVE_ASSIGN_OR_RETURN(client::ContextInfo info, c->Info(ctx.id));
  const std::string header = absl::StrFormat(
      "# trace %s, decode queries: the last %ld positions; top-%d\n"
      "# through kvwaved (%s): %zu layers x %d KV heads, %ld keys appended with their prefill "
      "queries in %.2f s; sealed (wave index + graph per segment of %ld) after %.2f s: %ld "
      "segments, %ld with a graph, %.1f MiB held\n",
      o.trace, static_cast<long>(o.queries), o.topk, daemon->socket_path(), layers.size(), kv_heads,
      static_cast<long>(n), append_s, static_cast<long>(o.segment_tokens), sealed_s,
      static_cast<long>(info.sealed_segments), static_cast<long>(info.graph_segments),
      static_cast<double>(info.bytes) / (1 << 20));
  std::fputs(header.c_str(), stderr);  // progress; stdout gets it with the table
  if (info.graph_segments != info.sealed_segments) {
    return absl::InternalError(absl::StrCat(info.sealed_segments - info.graph_segments,
                                            " sealed segments have no graph (see kvwaved's log)"));
  }

  const std::vector<Method> methods = Methods(o);
  std::vector<SweepPoint> points;
  for (const Method& m : methods) points.push_back({.index = m.name, .param = m.param});
  std::vector<int64_t> positions(static_cast<size_t>(q_heads) * o.topk);
  std::vector<float> scores(positions.size()), q(static_cast<size_t>(q_heads) * d);
  std::vector<char> exact(static_cast<size_t>(n), 0);
  for (size_t l = 0; l < layers.size(); ++l) {
    // Ground truth per query head (the bench's own exact top-k and softmax weights).
    std::vector<GroundTruth> truth(q_heads);
    for (int kvh = 0; kvh < kv_heads; ++kvh) {
      KVWAVE_ASSIGN_OR_RETURN(GroupData g, LoadGroup(trace, layers[l], kvh, o.queries));
      for (int j = 0; j < group; ++j) {
        truth[kvh * group + j] =
            ExactGroundTruth(g.keys.data(), g.n, d, g.decode[j].data(), o.queries, o.topk);
      }
    }
    for (int64_t i = 0; i < o.queries; ++i) {
      trace.q.CopyFloats(trace.QIndex(layers[l], n + i, 0), static_cast<int64_t>(q.size()),
                         q.data());
      for (size_t mi = 0; mi < methods.size(); ++mi) {
        client::RetrieveStats stats;
        const auto start = Clock::now();
        KVWAVE_RETURN_IF_ERROR(c->Retrieve(ctx.id, static_cast<int32_t>(l), q, methods[mi].options,
                                           positions, scores, &stats));
        const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
        SweepPoint& p = points[mi];
        for (int h = 0; h < q_heads; ++h) {
          const GroundTruth& t = truth[h];
          for (int32_t id : t.top[i]) exact[id] = 1;
          int hits = 0;
          double mass = 0;
          for (int r = 0; r < o.topk; ++r) {
            const int64_t pos = positions[static_cast<size_t>(h) * o.topk + r];
            if (pos < 0 || pos >= n) continue;
            hits += exact[pos];
            mass += t.weight[i][pos];
          }
          for (int32_t id : t.top[i]) exact[id] = 0;
          p.recall += static_cast<double>(hits) / o.topk;
          p.mass += mass;
          ++p.queries;
        }
        // keys_scored / keys_total over the call's query heads; one call serves all of them.
        p.scan_fraction += q_heads * static_cast<double>(stats.keys_scored) /
                           static_cast<double>(std::max<int64_t>(1, stats.keys_total));
        p.search_us += us;
      }
    }
    std::fprintf(stderr, "  layer %d done\n", layers[l]);
  }
  std::string text =
      header +
      absl::StrFormat(
          "# %-12s %-14s %9s %9s %9s %12s   (us: one Retrieve round trip serving all %d query "
          "heads)\n",
          "method", "knob", "recall", "scan", "mass", "us/call", q_heads);
  for (const SweepPoint& p : points) {
    absl::StrAppendFormat(&text, "  %-12s %-14s %9.4f %9.4f %9.4f %12.1f\n", p.index, p.param,
                          p.Recall(), p.ScanFraction(), p.Mass(), p.UsPerQuery() * q_heads);
  }
  text += "# at recall 0.95: method, keys scored (interpolated), us per call (first point)\n";
  for (const char* name : {"daemon-wave", "daemon-graph", "daemon-flat"}) {
    absl::StrAppendFormat(&text, "#   %-12s scan %8.4f   us %9.1f\n", name,
                          ScanFractionAtRecall(points, name, 0.95),
                          UsAtRecall(points, name, 0.95) * q_heads);
  }
  std::fputs(text.c_str(), stdout);
  if (!o.table.empty()) std::ofstream(o.table) << text;
  if (!o.json.empty()) KVWAVE_RETURN_IF_ERROR(WriteJson(o.json, points));
  return c->Close(ctx.id);
}

}  // namespace kvwave::bench
