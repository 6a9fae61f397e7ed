// Every translation unit includes ORT's C++ wrapper through here, so the manual-init setting (the
// API table comes from the runtime that loads us; we never link libonnxruntime) is the same everywhere.
#pragma once
#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include "onnxruntime_cxx_api.h"
