// Output shapes for ONNX Runtime, through the C API. (Ort::ShapeInferContext::SetOutputShape in the 1.21
// C++ wrapper writes an unknown dim as the concrete value -1 — which lets ORT constant-fold a later
// Shape() into [-1, ...] — and types every output float32.) Here an output takes its element type from
// an input and each dim from (input, axis): a known value, the input's symbol, or a fresh symbol when
// the input's dim is unknown.
#pragma once
#include <atomic>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/ort_api.h"

namespace attnexport {

struct DimFrom {
  size_t input;
  size_t axis;
};

inline OrtStatusPtr InferOutputFromInputs(OrtShapeInferContext* ctx, size_t output, size_t type_input,
                                          std::initializer_list<DimFrom> dims, const char* op_name) {
  const OrtApi& api = Ort::GetApi();
  size_t input_count = 0;
  if (OrtStatusPtr s = api.ShapeInferContext_GetInputCount(ctx, &input_count)) return s;

  struct InputShape {
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> values;
    std::vector<std::string> symbols;
    bool known = false;
  };
  auto read = [&](size_t index, InputShape& out) -> OrtStatusPtr {
    if (index >= input_count) return nullptr;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatusPtr s = api.ShapeInferContext_GetInputTypeShape(ctx, index, &info)) return s;
    if (info == nullptr) return nullptr;
    size_t rank = 0;
    OrtStatusPtr s = api.GetTensorElementType(info, &out.type);
    if (!s) s = api.GetDimensionsCount(info, &rank);
    if (!s) {
      out.values.resize(rank);
      std::vector<const char*> symbolic(rank, nullptr);
      if (rank) s = api.GetDimensions(info, out.values.data(), rank);
      if (!s && rank) s = api.GetSymbolicDimensions(info, symbolic.data(), rank);
      for (size_t i = 0; i < rank; ++i) out.symbols.emplace_back(symbolic[i] ? symbolic[i] : "");
      out.known = !s;
    }
    // `info` belongs to the context (ORT's own wrapper releases ownership without freeing it).
    return s;
  };

  std::vector<InputShape> shapes(input_count);
  for (size_t i = 0; i < input_count; ++i) {
    if (OrtStatusPtr s = read(i, shapes[i])) return s;
  }
  static std::atomic<uint64_t> fresh{0};
  std::vector<int64_t> values;
  std::vector<std::string> symbols;
  for (const DimFrom& d : dims) {
    const InputShape* in = d.input < shapes.size() ? &shapes[d.input] : nullptr;
    if (in && in->known && d.axis >= in->values.size()) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op_name) + ": input " + std::to_string(d.input) +
                                                     " has rank " + std::to_string(in->values.size()) +
                                                     ", expected at least " + std::to_string(d.axis + 1)).c_str());
    }
    if (in && in->known && in->values[d.axis] >= 0 && in->symbols[d.axis].empty()) {
      values.push_back(in->values[d.axis]);
      symbols.emplace_back("");
    } else {
      values.push_back(-1);
      symbols.push_back(in && in->known && !in->symbols[d.axis].empty()
                            ? in->symbols[d.axis]
                            : std::string(op_name) + "_dim_" + std::to_string(fresh.fetch_add(1)));
    }
  }
  ONNXTensorElementDataType type = type_input < shapes.size() ? shapes[type_input].type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatusPtr s = api.CreateTensorTypeAndShapeInfo(&info)) return s;
  std::vector<const char*> symbol_ptrs;
  for (const std::string& s : symbols) symbol_ptrs.push_back(s.c_str());
  OrtStatusPtr s = api.SetTensorElementType(info, type);
  if (!s) s = api.SetDimensions(info, values.data(), values.size());
  if (!s) s = api.SetSymbolicDimensions(info, symbol_ptrs.data(), symbol_ptrs.size());
  if (!s) s = api.ShapeInferContext_SetOutputTypeShape(ctx, output, info);
  api.ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

}  // namespace attnexport
