# Imported targets for LibTorch, made from its directory layout (include/, lib/):
#   aaren::torch       the CPU libraries and headers
#   aaren::torch_cuda  the CUDA libraries (when AAREN_TORCH_HAS_CUDA)
# Torch's own TorchConfig.cmake is not used here because, for a CUDA build of torch,
# it fails on machines without a CUDA toolkit, where a CPU-only aaren must still build.
# AAREN_TORCH_DIR is a LibTorch directory or the torch Python package; by default the
# Python interpreter is asked where torch is.
if(NOT AAREN_TORCH_DIR)
  find_package(Python REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE AAREN_TORCH_DIR OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
endif()
if(NOT EXISTS "${AAREN_TORCH_DIR}/include/torch/headeronly/version.h")
  message(FATAL_ERROR "No LibTorch headers under AAREN_TORCH_DIR=${AAREN_TORCH_DIR}")
endif()

file(STRINGS "${AAREN_TORCH_DIR}/include/torch/headeronly/version.h" version_lines
     REGEX "#define TORCH_VERSION_(MAJOR|MINOR|PATCH) ")
foreach(line IN LISTS version_lines)
  string(REGEX MATCH "TORCH_VERSION_([A-Z]+) ([0-9]+)" _ "${line}")
  set(torch_${CMAKE_MATCH_1} ${CMAKE_MATCH_2})
endforeach()
set(AAREN_TORCH_VERSION "${torch_MAJOR}.${torch_MINOR}.${torch_PATCH}")

function(aaren_torch_library target)
  set(paths "")
  foreach(name IN LISTS ARGN)
    set(path "${AAREN_TORCH_DIR}/lib/${CMAKE_SHARED_LIBRARY_PREFIX}${name}${CMAKE_SHARED_LIBRARY_SUFFIX}")
    if(NOT EXISTS "${path}")
      message(FATAL_ERROR "LibTorch library not found: ${path}")
    endif()
    list(APPEND paths "${path}")
  endforeach()
  add_library(${target} INTERFACE IMPORTED)
  set_target_properties(${target} PROPERTIES INTERFACE_LINK_LIBRARIES "${paths}")
endfunction()

aaren_torch_library(aaren::torch c10 torch_cpu torch)
set_target_properties(aaren::torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES
    "${AAREN_TORCH_DIR}/include;${AAREN_TORCH_DIR}/include/torch/csrc/api/include")

set(AAREN_TORCH_HAS_CUDA OFF)
if(EXISTS "${AAREN_TORCH_DIR}/lib/${CMAKE_SHARED_LIBRARY_PREFIX}torch_cuda${CMAKE_SHARED_LIBRARY_SUFFIX}")
  set(AAREN_TORCH_HAS_CUDA ON)
  aaren_torch_library(aaren::torch_cuda c10_cuda torch_cuda)
endif()
message(STATUS "aaren: LibTorch ${AAREN_TORCH_VERSION} in ${AAREN_TORCH_DIR} (CUDA: ${AAREN_TORCH_HAS_CUDA})")
