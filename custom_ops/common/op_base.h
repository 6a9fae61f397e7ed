// A custom-op base that reports failures as ORT statuses (never lets a C++ exception cross into
// ONNX Runtime) and reads attributes with defaults.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/ort_api.h"

namespace attnexport {

constexpr const char* kDomain = "attnexport";

// A failure a user caused (wrong shape, bad attribute); reported as ORT_INVALID_ARGUMENT.
struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline OrtStatusPtr ToStatus(const std::exception& e, const char* op_name) {
  const bool user_error = dynamic_cast<const InvalidArgument*>(&e) != nullptr;
  std::string message = std::string(op_name) + ": " + e.what();
  return Ort::GetApi().CreateStatus(user_error ? ORT_INVALID_ARGUMENT : ORT_FAIL, message.c_str());
}

template <typename Body>
OrtStatusPtr Guarded(const char* op_name, Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (std::string(op_name) + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return ToStatus(e, op_name);
  }
}

// Attribute readers: ORT reports a missing attribute as an error; an op's optional attribute is not.
inline float FloatAttribute(const OrtKernelInfo* info, const char* name, float fallback) {
  float value = 0.f;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

inline int64_t IntAttribute(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

inline std::string StringAttribute(const OrtKernelInfo* info, const char* name, const std::string& fallback) {
  size_t size = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    if (size == 0) return fallback;
  }
  std::string value(size, '\0');
  status = Ort::GetApi().KernelInfoGetAttribute_string(info, name, value.data(), &size);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  if (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

// CustomOpBase with status-returning create/compute. TKernel needs a constructor
// (const OrtApi&, const OrtKernelInfo*) and a void Compute(OrtKernelContext*) that may throw.
template <typename TOp, typename TKernel>
struct OpBase : Ort::CustomOpBase<TOp, TKernel, /*WithStatus=*/true> {
  // Ops declare `static OrtStatusPtr InferShapes(OrtShapeInferContext*)` (see shape_inference.h).
  OpBase() { UseInferShapes<TOp>(0); }

 private:
  template <typename C>
  auto UseInferShapes(int) -> decltype(&C::InferShapes, void()) {
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return C::InferShapes(ctx);
    };
  }
  template <typename C>
  void UseInferShapes(...) {}

 public:

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return Guarded(static_cast<const TOp*>(this)->GetName(), [&] { *kernel = new TKernel(api, info); });
  }
};

// Wraps a kernel's Compute into the status-returning ComputeV2 that OpBase wires up.
#define ATTNEXPORT_COMPUTE_V2(op_name)                                              \
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {                              \
    return ::attnexport::Guarded(op_name, [&] { Compute(context); });              \
  }

}  // namespace attnexport
