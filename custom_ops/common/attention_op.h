// The declaration the one-output attention ops share (SparseAttention, ClusteredAttention,
// NystromAttention, on every provider): inputs Q, K, V, then optional ones from key_padding_mask on
// (index 3, bool; the others of Q's type or, like a state, their own), output Y = [B, Hq, Sq, Dv] of Q's
// type and optional float32 outputs after it (a present_state: its shape is not inferred, because the C
// API cannot tell whether the node has that output, and setting an absent one fails inside ORT 1.32).
// TOp gives its name (static kOpName) and provider (static kProvider).
#pragma once
#include <cstddef>

#include "common/op_base.h"
#include "common/shape_inference.h"

namespace attnexport {

template <typename TOp, typename TKernel, size_t kNumInputs, size_t kNumOutputs = 1>
struct QkvAttentionOp : OpBase<TOp, TKernel> {
  static constexpr size_t kQInput = 0, kVInput = 2, kMaskInput = 3;

  const char* GetName() const { return TOp::kOpName; }
  const char* GetExecutionProviderType() const { return TOp::kProvider; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kMaskInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kMaskInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

  // Y = [B, Hq, Sq, Dv] of Q's type: batch, heads and length of Q, value dim of V.
  static OrtStatusPtr InferShapes(OrtShapeInferContext* ctx) {
    return InferOutputFromInputs(ctx, 0, kQInput, {{kQInput, 0}, {kQInput, 1}, {kQInput, 2}, {kVInput, 3}},
                                 TOp::kOpName);
  }
};

}  // namespace attnexport
