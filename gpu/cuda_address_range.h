// The allocation a device pointer lies in (cuMemGetAddressRange), reached through the CUDA
// runtime's driver entry points, so that a program of a CUDA build does not link libcuda and still
// starts where no driver is installed. Used by the daemon (gpu/cuda/ipc.cc: the bytes an opened IPC
// handle maps) and by the client (client/client_cuda.cc: an IPC handle names a whole allocation).
// Header-only: the client library does not link gpu/.
#ifndef KVWAVE_GPU_CUDA_ADDRESS_RANGE_H_
#define KVWAVE_GPU_CUDA_ADDRESS_RANGE_H_

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace kvwave::gpu {

// CUDA_ERROR_NOT_SUPPORTED where the driver does not offer the entry point.
inline CUresult AllocationRange(CUdeviceptr* base, size_t* size, CUdeviceptr p) {
  static const PFN_cuMemGetAddressRange_v3020 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(f);
  }();
  if (fn == nullptr) return CUDA_ERROR_NOT_SUPPORTED;
  return fn(base, size, p);
}

}  // namespace kvwave::gpu

#endif  // KVWAVE_GPU_CUDA_ADDRESS_RANGE_H_
