// Launchers of kvwave's CUDA kernels: plain pointers, sizes and a stream in, a cudaError_t out.
// They allocate nothing: scratch buffers are passed in by the caller (CudaBackend's workspace),
// with their sizes given by the *WorkspaceBytes helpers. Pointers must be device-accessible
// (device memory or mapped pinned host memory). Stateless and thread-safe; the kernels behind
// them are file-static in the .cu files.
#ifndef KVWAVE_GPU_CUDA_LAUNCHERS_H_
#define KVWAVE_GPU_CUDA_LAUNCHERS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gpu/cuda_backend.h"

namespace kvwave::gpu::cuda {

// ---- attention.cu ----
// Split count used by LaunchExactAttention for a given shape, and its scratch size in bytes.
int ExactSplits(int heads, int64_t max_pages_per_head, int pages_per_split, int sm_count);
size_t ExactWorkspaceBytes(int heads, int g, int d, int splits);
// True when (d, g, kv_type) has an instantiated kernel.
bool ExactSupported(int d, int g, DType kv_type);
// arrivals: a.heads device words, zero, left zero (the splits' arrival counters; one set per
// stream, as the workspace).
cudaError_t LaunchExactAttention(const ExactArgs& a, int splits, float* workspace,
                                 uint32_t* arrivals, cudaStream_t stream);

int EstimateSplits(int heads, int64_t max_clusters, int sm_count);
size_t EstimateWorkspaceBytes(int heads, int g, int d, int splits);
cudaError_t LaunchEstimateAttention(const EstimateArgs& a, int64_t max_clusters, int splits,
                                    float* workspace, uint32_t* arrivals, cudaStream_t stream);

cudaError_t LaunchMergeLse(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                           int rows, int d, cudaStream_t stream);

// bulk: read with the SMs' bulk-copy engine (cp.async.bulk, pieces <= 16 KB) instead of loads.
cudaError_t LaunchGatherPages(const void* const* src, void* const* dst, const int32_t* bytes,
                              int64_t count, int64_t max_bytes, bool bulk, cudaStream_t stream);

// ---- scoring.cu ----
size_t ScoreWorkspaceBytes(int heads, int g, int64_t n);
cudaError_t LaunchScoreClusters(const ScoreArgs& a, float* workspace, cudaStream_t stream);
cudaError_t LaunchSelectTopK(const TopKArgs& a, cudaStream_t stream);
// The logits kernel of ScoreClusters, then one block per head: scores (to a.scores), the top-k
// lists of t (as SelectTopK), and the page plan p (p.retrieved == t.out, p.counts == t.counts).
// dependent_launch: the second kernel is launched as a programmatic dependent of the first;
// sm_count: the device's multiprocessors (picks one block or a cluster of blocks per head);
// wait (optional): the stream waits for it after the logits, before the selection and plan.
cudaError_t LaunchScoreSelectPlan(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                                  float* workspace, bool dependent_launch, int sm_count,
                                  cudaEvent_t wait, cudaStream_t stream);

// ---- wave_plan.cu ----
cudaError_t LaunchPlanPages(const PlanArgs& a, cudaStream_t stream);
cudaError_t LaunchDelay(int64_t ns, cudaStream_t stream);
cudaError_t LaunchScatterInt32(int32_t* base, const int64_t* index, const int32_t* value,
                               int64_t count, cudaStream_t stream);

// ---- kmeans.cu ----
cudaError_t LaunchKMeansAssign(const AssignArgs& a, cudaStream_t stream);
size_t KMeansWorkspaceBytes(int64_t n, int d, int64_t k);
cudaError_t LaunchSphericalKMeans(const KMeansArgs& a, void* workspace, cudaStream_t stream);

// ---- exact_topn.cu ----
// Queries per chunk that `workspace_bytes` holds (0: not even one).
int64_t ExactTopNChunkRows(int64_t n, int nn, size_t workspace_bytes);
cudaError_t LaunchExactTopN(const ExactTopNArgs& a, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_LAUNCHERS_H_
