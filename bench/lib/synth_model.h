// Generative model of attention traces for `kvwave-bench synth`: per (layer, KV head) a Gaussian
// model of pre-RoPE keys (mean + low-rank covariance + diagonal residual, a fixed sink key at
// position 0, AR(1) latents so that neighbouring tokens are alike), per query head a Gaussian
// model of pre-RoPE queries whose latents are coupled to the key latents of the same position
// (which, with RoPE, makes recent keys score high), and per-dimension Gaussian values. RoPE
// (rotate-half) is applied at the true positions. Fitted to a real trace by un-rotating its
// post-RoPE vectors; `ood` scales the query mean (1 = as fitted, larger = further from keys), and
// `ood_lowvar` pushes queries into the keys' directions of least variance (WriteSynthTrace).
//
// Thread-safety: a SynthModel is immutable once built; Generate may run concurrently.
#ifndef KVWAVE_BENCH_LIB_SYNTH_MODEL_H_
#define KVWAVE_BENCH_LIB_SYNTH_MODEL_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/trace_file.h"

namespace kvwave::bench {

// Applies rotate-half RoPE at `position` in place (sign = +1), or its inverse (sign = -1).
void ApplyRope(float* x, int d, int64_t position, double base, int sign);

// x = mean + basis (sigma * z) + residual * eta, with z of `rank` latents.
struct GaussianPart {
  std::vector<float> mean;      // [d]
  std::vector<float> basis;     // [d x rank], orthonormal columns
  std::vector<float> sigma;     // [rank]
  std::vector<float> residual;  // [d], std of what the low rank leaves
};

struct KvHeadModel {
  GaussianPart key;
  std::vector<float> sink;                   // [d], pre-RoPE key of position 0
  float rho = 0.9f;                          // AR(1) coefficient of the key latents
  std::vector<float> value_mean, value_std;  // [d]
  // Per query head of the group: its Gaussian part, and its latents = coupling [rank x rank]
  // applied to the key latents + noise of std noise[rank].
  std::vector<GaussianPart> query;
  std::vector<std::vector<float>> coupling;
  std::vector<std::vector<float>> noise;
};

struct SynthShape {
  int64_t layers = 1, q_heads = 4, kv_heads = 1, head_dim = 128;
  int rank = 16;
  double rope_base = 500000.0;
};

struct SynthModel {
  SynthShape shape;
  std::vector<KvHeadModel> heads;  // [layers x kv_heads]
};

// A model fitted to `trace` (shape from the trace except rank / rope_base / layers; synthetic
// layer l is fitted to trace layer l % trace.layers), using at most max_tokens positions.
[[nodiscard]] absl::StatusOr<SynthModel> FitModel(const trace::Trace& trace,
                                                  const SynthShape& shape, int64_t max_tokens);
// A model with random parameters of plausible scale (no trace to calibrate to).
SynthModel DefaultModel(const SynthShape& shape, uint64_t seed);

// Writes PREFIX_{q,k,v}.npy (float16) and PREFIX.json with `tokens` positions. `ood` scales the
// pre-RoPE query mean. `ood_lowvar` (0 = off) adds to every query a part of norm about
// ood_lowvar * ood * |pre-RoPE query mean| in the span of the generated keys' least-variance
// principal directions (post-RoPE, over all positions): the OOD effect RetrievalAttention
// describes, queries reaching into directions where the keys barely vary, so their top keys by
// q.k spread over all of the keys' k-means lists. `ood_lowvar_spread` is how much that part's
// direction varies from token to token (0 = a fixed direction per query head). Details in
// synth_model.cc.
[[nodiscard]] absl::Status WriteSynthTrace(const SynthModel& model, int64_t tokens, double ood,
                                           uint64_t seed, const std::string& prefix,
                                           double ood_lowvar = 0.0, double ood_lowvar_spread = 1.0);

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_LIB_SYNTH_MODEL_H_
