# The CUDA part of the op library: cuda/kernels/*.cu (nvcc) and their ORT glue cuda/ops/*.cc (the
# host compiler; no CUDA headers), registered for CUDAExecutionProvider under ATTNEXPORT_WITH_CUDA.
#
#   ATTNEXPORT_CUDA = AUTO (default) | ON | OFF
#     AUTO: built when a CUDA compiler is found (CUDACXX, nvcc on PATH, or /usr/local/cuda/bin/nvcc),
#           otherwise the CPU library builds alone and the configure log says why;
#     ON:   a CUDA compiler is required (configure fails without one); OFF: never built.
#   ATTNEXPORT_CUDA_ARCHITECTURES (default "80-real;90"): machine code for sm_80 (A100, A10, L4 ...)
#     and sm_90 (H100, H200) plus PTX of sm_90 that newer GPUs compile at load time. Only these are
#     built so the compile stays short (CI compiles the package on 2 cores). The tensor-core kernels
#     need sm_80; an older architecture added here gets the float32 CUDA-core kernels only.
#
# The CUDA runtime is linked statically (one library that loads on machines without a GPU or driver;
# libcuda is opened only when a CUDA kernel is created). It must be the CUDA major version of
# onnxruntime-gpu on PyPI (13 for onnxruntime-gpu >= 1.27), so a session holds one driver API level.
#
# A macro, not a function: enable_language() must run at file scope. No return() in here (it would
# return from the including CMakeLists).
macro(attnexport_add_cuda target)
  set(_ax_cuda_build FALSE)
  set(_ax_cuda_why "")
  file(GLOB _ax_cuda_kernels CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/cuda/kernels/*.cu")
  file(GLOB _ax_cuda_glue CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/cuda/ops/*.cc")
  if(ATTNEXPORT_CUDA STREQUAL "OFF")
    set(_ax_cuda_why "ATTNEXPORT_CUDA=OFF")
  elseif(NOT _ax_cuda_kernels OR NOT _ax_cuda_glue)
    set(_ax_cuda_why "no CUDA sources under ${CMAKE_CURRENT_SOURCE_DIR}/cuda")
  else()
    if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
      find_program(_ax_nvcc_on_path nvcc)
      if(NOT _ax_nvcc_on_path)
        set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "CUDA compiler")
      endif()
    endif()
    include(CheckLanguage)
    check_language(CUDA)
    if(NOT CMAKE_CUDA_COMPILER)
      set(_ax_cuda_why "no CUDA compiler found (set CUDACXX or put nvcc on PATH)")
    else()
      set(_ax_cuda_build TRUE)
    endif()
  endif()

  if(NOT _ax_cuda_build)
    if(ATTNEXPORT_CUDA STREQUAL "ON")
      message(FATAL_ERROR "attnexport: ATTNEXPORT_CUDA=ON but ${_ax_cuda_why}")
    endif()
    message(STATUS "attnexport: CUDA kernels not built: ${_ax_cuda_why}; building the CPU library alone")
  else()
    set(ATTNEXPORT_CUDA_ARCHITECTURES "80-real;90" CACHE STRING
        "CUDA architectures of the attnexport kernels (CMake CUDA_ARCHITECTURES syntax)")
    if(NOT ATTNEXPORT_CUDA_ARCHITECTURES)  # given but empty (an unset environment variable, say)
      set(ATTNEXPORT_CUDA_ARCHITECTURES "80-real;90")
    endif()
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      # Keeps enable_language from probing for a default; the target's property below is what counts.
      set(CMAKE_CUDA_ARCHITECTURES "${ATTNEXPORT_CUDA_ARCHITECTURES}")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.0)
      message(FATAL_ERROR "attnexport: the CUDA kernels need CUDA >= 12 (found ${CMAKE_CUDA_COMPILER_VERSION}); "
                          "onnxruntime-gpu on PyPI uses CUDA 13. Set ATTNEXPORT_CUDA=OFF to build the CPU library alone.")
    endif()
    if(NOT CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 13.0)
      message(WARNING "attnexport: nvcc ${CMAKE_CUDA_COMPILER_VERSION}: onnxruntime-gpu >= 1.27 on PyPI is built with "
                      "CUDA 13; the static CUDA ${CMAKE_CUDA_COMPILER_VERSION} runtime works beside it with a recent driver")
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    target_sources(${target} PRIVATE ${_ax_cuda_kernels} ${_ax_cuda_glue})
    set_target_properties(${target} PROPERTIES
      CUDA_ARCHITECTURES "${ATTNEXPORT_CUDA_ARCHITECTURES}"
      CUDA_RUNTIME_LIBRARY Static
      CUDA_VISIBILITY_PRESET hidden)
    target_compile_definitions(${target} PRIVATE ATTNEXPORT_WITH_CUDA=1)
    string(REPLACE ";" " " _ax_arch_string "${ATTNEXPORT_CUDA_ARCHITECTURES}")
    set_source_files_properties(${_ax_cuda_kernels} PROPERTIES
      COMPILE_DEFINITIONS "ATTNEXPORT_CUDA_ARCHITECTURES_STRING=\"${_ax_arch_string}\"")
    # --threads: the architectures of one file compile in parallel (2 cores in CI).
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3 -lineinfo --threads=2 -Xptxas=-warn-spills>)
    target_link_libraries(${target} PRIVATE CUDA::cudart_static)
    message(STATUS "attnexport: CUDA kernels for architectures ${ATTNEXPORT_CUDA_ARCHITECTURES} "
                   "(nvcc ${CMAKE_CUDA_COMPILER_VERSION}, static CUDA runtime)")
  endif()
endmacro()
