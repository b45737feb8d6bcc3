# kvwave_library(NAME SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
# One static library per module, headers included from the repository root.
function(kvwave_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  kvwave_compile_options(${name})
endfunction()

# Warnings and release flags for one target (no global flag edits).
function(kvwave_compile_options name)
  target_compile_options(${name} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Werror=return-type>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CONFIG:Release,RelWithDebInfo>>:-O3>
    $<$<COMPILE_LANGUAGE:CXX>:-march=x86-64-v3>)
endfunction()

# kvwave_tests(DIR LIBS ...): one GoogleTest binary per tests/DIR/*_test.cc file.
function(kvwave_tests dir)
  cmake_parse_arguments(ARG "" "" "LIBS;LABELS" ${ARGN})
  file(GLOB sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${dir}/*_test.cc)
  foreach(src ${sources})
    get_filename_component(stem ${src} NAME_WE)
    set(target ${dir}_${stem})
    add_executable(${target} ${src})
    target_link_libraries(${target} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main)
    target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR})
    kvwave_compile_options(${target})
    gtest_discover_tests(${target} DISCOVERY_TIMEOUT 60
      PROPERTIES LABELS "${dir};${ARG_LABELS}"
      ENVIRONMENT "KVWAVE_BINARY_DIR=${PROJECT_BINARY_DIR}")
    target_compile_definitions(${target} PRIVATE KVWAVE_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
      KVWAVE_BINARY_DIR_DEFAULT="${PROJECT_BINARY_DIR}")
  endforeach()
endfunction()
