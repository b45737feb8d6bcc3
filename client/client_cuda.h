// The client's CUDA calls for device tensors (client_cuda.cc in CUDA builds, client_cuda_none.cc
// otherwise: UNIMPLEMENTED), behind a CUDA-free interface. Events are cudaEvent_t, streams
// cudaStream_t, both type-erased.
//
// Thread-safety: every function is thread-safe (the CUDA runtime's).
#ifndef KVWAVE_CLIENT_CLIENT_CUDA_H_
#define KVWAVE_CLIENT_CLIENT_CUDA_H_

#include <cstddef>

#include "absl/status/statusor.h"
#include "kvwave/client.h"

namespace kvwave::client::cuda {

// Handles of three device buffers of this process (on one GPU) and of a new interprocess event
// pair, returned in *q_ready / *out_ready (destroy with DestroyEvent).
absl::StatusOr<DeviceHandles> MakeHandles(const void* q, size_t q_bytes, const void* out,
                                          size_t out_bytes, const void* lse, size_t lse_bytes,
                                          void** q_ready, void** out_ready);
absl::Status Record(void* event, CUstream_st* stream);
absl::Status Wait(CUstream_st* stream, void* event);
void DestroyEvent(void* event);

}  // namespace kvwave::client::cuda

#endif  // KVWAVE_CLIENT_CLIENT_CUDA_H_
