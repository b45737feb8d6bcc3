// The configuration of a cudaLaunchKernelEx, shared by the launchers.
#ifndef KVWAVE_GPU_CUDA_LAUNCH_CONFIG_H_
#define KVWAVE_GPU_CUDA_LAUNCH_CONFIG_H_

#include <cuda_runtime.h>

#include <cstddef>

namespace kvwave::gpu::cuda {

// Grid, block, dynamic shared memory and stream; with cluster > 0, clusters of `cluster` blocks
// along x; with dependent, a programmatic dependent of the stream's previous kernel (it may be
// scheduled once that kernel's blocks have all triggered, and waits with griddepcontrol.wait or
// on flags). Not copyable: config.attrs points into the object.
struct LaunchConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[2];
  LaunchConfig(dim3 grid, int threads, size_t smem, cudaStream_t stream, int cluster,
               bool dependent) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    unsigned n = 0;
    if (cluster > 0) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = cluster;
      attr[n].val.clusterDim.y = 1;
      attr[n].val.clusterDim.z = 1;
      ++n;
    }
    if (dependent) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n].val.programmaticStreamSerializationAllowed = 1;
      ++n;
    }
    config.attrs = attr;
    config.numAttrs = n;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

}  // namespace kvwave::gpu::cuda

#endif  // KVWAVE_GPU_CUDA_LAUNCH_CONFIG_H_
