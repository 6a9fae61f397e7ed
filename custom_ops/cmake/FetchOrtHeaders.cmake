# ONNX Runtime's C API headers are not in its Python wheel. Debian ships them in libonnxruntime-dev
# (suite trixie, ORT 1.21, ~85 KB). Fetch that package by name with apt-get against a private
# sources list and lists directory (nothing on the machine is changed), unpack it with dpkg -x into
# the build directory, and compile against it. ATTNEXPORT_ORT_INCLUDE_DIR points elsewhere instead.
function(attnexport_fetch_ort_headers out_var)
  set(root "${CMAKE_BINARY_DIR}/ort-headers")
  set(include_dir "${root}/x/usr/include/onnxruntime")
  if(EXISTS "${include_dir}/onnxruntime_c_api.h")
    set(${out_var} "${include_dir}" PARENT_SCOPE)
    return()
  endif()
  find_program(APT_GET apt-get)
  find_program(DPKG dpkg)
  if(NOT APT_GET OR NOT DPKG)
    message(FATAL_ERROR
      "attnexport: ONNX Runtime C API headers not found and apt-get/dpkg are missing to fetch them. "
      "Set ATTNEXPORT_ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h (ORT >= 1.17).")
  endif()
  file(MAKE_DIRECTORY "${root}/lists/partial" "${root}/cache/archives/partial" "${root}/deb")
  set(keyring /usr/share/keyrings/debian-archive-keyring.gpg)
  file(WRITE "${root}/sources.list"
       "deb [signed-by=${keyring}] http://deb.debian.org/debian trixie main\n")
  set(apt_options
      -o "Dir::Etc::SourceList=${root}/sources.list"
      -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=${root}/lists"
      -o "Dir::Cache=${root}/cache"
      -o "APT::Sandbox::User=root"
      -o "Debug::NoLocking=1"
      -q)
  message(STATUS "attnexport: fetching libonnxruntime-dev (trixie) for the ORT C API headers")
  execute_process(COMMAND "${APT_GET}" ${apt_options} update
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "attnexport: 'apt-get update' for trixie failed (${rc}): ${err}\n"
                        "Set ATTNEXPORT_ORT_INCLUDE_DIR to existing ORT headers instead.")
  endif()
  execute_process(COMMAND "${APT_GET}" ${apt_options} download libonnxruntime-dev
                  WORKING_DIRECTORY "${root}/deb"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  file(GLOB debs "${root}/deb/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    message(FATAL_ERROR "attnexport: 'apt-get download libonnxruntime-dev' failed (${rc}): ${err}")
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND "${DPKG}" -x "${deb}" "${root}/x" RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0 OR NOT EXISTS "${include_dir}/onnxruntime_c_api.h")
    message(FATAL_ERROR "attnexport: unpacking ${deb} failed: ${err}")
  endif()
  set(${out_var} "${include_dir}" PARENT_SCOPE)
endfunction()
