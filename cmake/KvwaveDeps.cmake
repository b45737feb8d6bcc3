# Every dependency is a Debian 12 package; scripts/install-deps.sh installs them.
find_package(Threads REQUIRED)
find_package(absl REQUIRED)          # absl::Status / StatusOr, flat_hash_map
find_package(TBB REQUIRED)           # parallel k-means, per-head search, compute arena
find_package(OpenMP REQUIRED)        # FAISS links it
find_package(faiss REQUIRED)         # k-means comparison and ANN baselines (bench)
find_package(RocksDB REQUIRED)       # persistence tier
find_package(Protobuf REQUIRED)      # wire protocol
find_package(spdlog REQUIRED)        # logging, one logger per subsystem
find_package(CLI11 REQUIRED)         # command lines
find_package(toml11 REQUIRED)        # config files
find_package(PkgConfig REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)  # prefix chain hash, checksums
pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis)    # remote tier (Redis Cluster)
find_path(HNSWLIB_INCLUDE_DIR hnswlib/hnswlib.h REQUIRED)     # HNSW baseline (bench)
add_library(kvwave_hnswlib INTERFACE)
target_include_directories(kvwave_hnswlib SYSTEM INTERFACE ${HNSWLIB_INCLUDE_DIR})
if(KVWAVE_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# CUDA: AUTO enables it when a CUDA compiler is found.
set(KVWAVE_HAVE_CUDA OFF)
if(NOT KVWAVE_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_ARCHITECTURES 90)
    set(CMAKE_CUDA_STANDARD 20)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(KVWAVE_HAVE_CUDA ON)
  elseif(KVWAVE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVWAVE_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
message(STATUS "kvwave: CUDA backend ${KVWAVE_HAVE_CUDA}")
