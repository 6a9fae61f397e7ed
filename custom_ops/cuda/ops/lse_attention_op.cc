// ONNX Runtime glue of LseAttention on the CUDA execution provider: the same attributes, checks and
// one-line errors as the CPU op (cpu/ops/lse_attention_op.cc); inputs, past_state (read in place through
// broadcast strides) and both outputs in device memory, kernels on ORT's compute stream, scratch from
// ORT's allocator. present_state is float32 [B, Hkv, Dk, Dv + 2], always produced.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/qkv_inputs.h"
#include "common/shape_inference.h"
#include "cuda/kernels/entry.h"
#include "cuda/ops/cuda_glue.h"
#include "ops.h"

namespace attnexport {
namespace {

using cuda_ops::Require;
using cuda_ops::ShapeString;

constexpr const char* kName = "LseAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kPastState, kNumInputs };
enum Output { kY = 0, kPresentState, kNumOutputs };

struct LseAttentionCudaKernel {
  LseAttentionCudaKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    causal_ = IntAttribute(info, "causal", 0) != 0;
    Require(std::isnan(scale_) || scale_ > 0.f, "scale must be > 0 (q~ = sqrt(scale) q)");
    device_ = std::make_unique<cuda_ops::DeviceContext>(info);
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cuda::lse::Problem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.dtype = cuda_ops::DTypeOf(dtype, "Q, K and V");
    Require(p.head_dim > 0, "the head dim must be > 0");
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.causal = causal_;

    cuda::lse::Buffers b;
    b.q = q.GetTensorRawData();
    b.k = k.GetTensorRawData();
    b.v = v.GetTensorRawData();
    if (cuda_ops::IsPresent(ctx, kKeyPaddingMask)) {
      b.mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    const std::vector<int64_t> state_shape = {p.batch, p.kv_heads, p.head_dim, p.value_dim + 2};
    if (cuda_ops::IsPresent(ctx, kPastState)) {
      auto past = ctx.GetInput(kPastState);
      const auto shape = past.GetTensorTypeAndShapeInfo().GetShape();
      Require(past.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
              "past_state must be float32");
      Require(shape.size() <= 4, "past_state " + ShapeString(shape) + " does not broadcast to " + ShapeString(state_shape));
      int64_t stride = 1;  // numpy-style broadcast, read in place through strides
      for (int axis = 3; axis >= 0; --axis) {
        const int64_t rank_axis = axis - (4 - static_cast<int>(shape.size()));
        const int64_t dim = rank_axis >= 0 ? shape[rank_axis] : 1;
        Require(dim == 1 || dim == state_shape[axis],
                "past_state " + ShapeString(shape) + " does not broadcast to " + ShapeString(state_shape));
        p.past_stride[axis] = dim == 1 ? 0 : stride;
        stride *= dim;
      }
      b.past = past.GetTensorData<float>();
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    auto y = ctx.GetOutput(kY, y_shape);
    b.y = y.GetTensorMutableRawData();
    b.present = ctx.GetOutput(kPresentState, state_shape).GetTensorMutableData<float>();
    if (p.batch * p.kv_heads * p.head_dim == 0) return;
    cuda::lse::Plan plan;
    const std::string why = cuda::lse::MakePlan(p, device_->info(), &plan);
    Require(why.empty(), why);
    cuda_ops::DeviceGuard guard(device_->device());
    void* stream = ctx.GetGPUComputeStream();
    cuda_ops::Scratch scratch(raw_context, *device_, plan.workspace_bytes, stream != nullptr);
    const std::string error =
        cuda::LseAttentionCuda(p, b, scratch.get(), plan.workspace_bytes, stream, device_->info());
    if (!error.empty()) throw std::runtime_error(error);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  bool causal_;
  std::unique_ptr<cuda_ops::DeviceContext> device_;
};

struct LseAttentionOpCuda : OpBase<LseAttentionOpCuda, LseAttentionCudaKernel> {
  const char* GetName() const { return kName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kKeyPaddingMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kKeyPaddingMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == kPresentState ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  // As the CPU op: Y of Q's type; present_state float32 with a fresh last dim.
  static OrtStatusPtr InferShapes(OrtShapeInferContext* ctx) {
    if (OrtStatusPtr s = InferOutputFromInputs(ctx, kY, kQ, {{kQ, 0}, {kQ, 1}, {kQ, 2}, {kV, 3}}, kName)) return s;
    return InferOutputFromInputs(ctx, kPresentState, kNumInputs, {{kQ, 0}, {kK, 1}, {kQ, 3}, {kNumInputs, 0}}, kName);
  }
};

}  // namespace

const OrtCustomOp* LseAttentionCudaOp() {
  static const LseAttentionOpCuda op;
  return &op;
}

}  // namespace attnexport
