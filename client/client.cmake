# Client-side targets (included from client/CMakeLists.txt). kvwave_client depends on the wire
# protocol only (kvwave_proto): never on engine, store or index.
# Device tensors (client_device.cc) use the CUDA runtime in CUDA builds (client_cuda.cc); without
# CUDA they answer UNIMPLEMENTED (client_cuda_none.cc).
if(KVWAVE_HAVE_CUDA)
  set(client_cuda_source client_cuda.cc)
else()
  set(client_cuda_source client_cuda_none.cc)
endif()
kvwave_library(kvwave_client
  SOURCES client.cc client_ops.cc client_device.cc ${client_cuda_source} local_daemon.cc
  PUBLIC_DEPS kvwave_proto)
target_include_directories(kvwave_client PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include)
if(KVWAVE_HAVE_CUDA)
  target_link_libraries(kvwave_client PRIVATE CUDA::cudart)
endif()

# The kvwave CLI: ping, stats, contexts, drop, demo.
add_executable(kvwave kvwave_main.cc demo.cc)
target_link_libraries(kvwave PRIVATE kvwave_client kvwave_trace CLI11::CLI11 Threads::Threads)
kvwave_compile_options(kvwave)

# Python binding (module "kvwave"), built when pybind11 and Python are found.
if(NOT DEFINED Python3_EXECUTABLE AND EXISTS /usr/bin/python3)
  set(Python3_EXECUTABLE /usr/bin/python3)  # Debian's python3 (with numpy), not a PATH shim
endif()
find_package(Python3 COMPONENTS Interpreter Development.Module)
find_package(pybind11 CONFIG QUIET)
if(pybind11_FOUND AND Python3_FOUND)
  pybind11_add_module(kvwave_python python/kvwave_py.cc)
  set_target_properties(kvwave_python PROPERTIES OUTPUT_NAME kvwave
    LIBRARY_OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/python)
  target_link_libraries(kvwave_python PRIVATE kvwave_client)
  if(KVWAVE_BUILD_TESTS)
    add_test(NAME python_client COMMAND /usr/bin/python3 -m pytest -q
      ${PROJECT_SOURCE_DIR}/tests/python)
    set_tests_properties(python_client PROPERTIES LABELS "python;integration"
      ENVIRONMENT "KVWAVE_SOURCE_DIR=${PROJECT_SOURCE_DIR};KVWAVE_BINARY_DIR=${PROJECT_BINARY_DIR}")
  endif()
endif()
target_compile_definitions(kvwave PRIVATE KVWAVE_SOURCE_DIR="${PROJECT_SOURCE_DIR}")

# The C ABI (client/capi/kvwave_c.h): libkvwave_c.so, loaded by client/python/kvwave_ctypes.py.
add_library(kvwave_c SHARED capi/kvwave_c.cc)
target_link_libraries(kvwave_c PRIVATE kvwave_client)
kvwave_compile_options(kvwave_c)
