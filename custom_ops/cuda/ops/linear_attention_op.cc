// ONNX Runtime glue of LinearAttention on the CUDA execution provider: the same attributes, checks
// and one-line errors as the CPU op (cpu/ops/linear_attention_op.cc), inputs and output in device
// memory, kernels launched on ORT's compute stream, scratch from ORT's allocator.
//
// feature_map elu1 and relu run on CUDA. taylor2 and favor have no CUDA kernel: creating the kernel
// fails with a one-line error (ORT then fails the session: a node of a CUDA session cannot fall back
// to the CPU kernel by attribute), which names the way out. Likewise the recurrent state (past_state /
// present_state, convert --recurrent): declared as on the CPU (ORT requires the two registrations of
// one op to agree), refused at run time.
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/qkv_inputs.h"
#include "common/shape_inference.h"
#include "cuda/kernels/entry.h"
#include "cuda/ops/cuda_glue.h"
#include "ops.h"

namespace attnexport {
namespace {

using cuda_ops::Require;
using cuda_ops::ShapeString;

constexpr const char* kName = "LinearAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kProjection, kPastState, kNumInputs };
enum Output { kY = 0, kPresentState, kNumOutputs };

cuda::la::FeatureMap ParseFeatureMap(const std::string& name) {
  if (name == "elu1") return cuda::la::FeatureMap::kElu1;
  if (name == "relu") return cuda::la::FeatureMap::kRelu;
  if (name == "taylor2" || name == "favor") {
    throw InvalidArgument("feature_map '" + name +
                          "' has no CUDA kernel (CUDA runs elu1 and relu); run this model with the "
                          "CPUExecutionProvider or convert it with another feature map");
  }
  throw InvalidArgument("unknown feature_map '" + name + "' (expected elu1, relu, taylor2 or favor)");
}

struct LinearAttentionCudaKernel {
  LinearAttentionCudaKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    eps_ = FloatAttribute(info, "eps", 1e-6f);
    causal_ = IntAttribute(info, "causal", 0) != 0;
    const std::string expansion = StringAttribute(info, "expansion_point", "zero");
    if (expansion != "zero" && expansion != "mean" && expansion != "max") {
      throw InvalidArgument("unknown expansion_point '" + expansion + "' (expected zero, mean or max)");
    }
    feature_map_ = ParseFeatureMap(StringAttribute(info, "feature_map", "elu1"));
    Require(eps_ >= 0.f, "eps must be >= 0");
    // Tests: ATTNEXPORT_CUDA_FORCE_SIMT=1 runs the float32 CUDA-core kernels for every dtype.
    const char* force = std::getenv("ATTNEXPORT_CUDA_FORCE_SIMT");
    force_simt_ = force != nullptr && force[0] == '1';
    device_ = std::make_unique<cuda_ops::DeviceContext>(info);
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cuda::la::Problem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.dtype = cuda_ops::DTypeOf(dtype, "Q, K and V");
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    Require(p.scale >= 0.f, "scale must be >= 0 (LinearAttention takes its square root)");
    p.eps = eps_;
    p.causal = causal_;
    p.feature_map = feature_map_;
    p.force_simt = force_simt_;

    Require(!cuda_ops::IsPresent(ctx, kPastState) && ctx.GetOutputCount() <= kPresentState,
            "LinearAttention's recurrent state (past_state / present_state) has no CUDA kernel; run this model "
            "with the CPUExecutionProvider");

    cuda::la::Buffers b;
    b.q = q.GetTensorRawData();
    b.k = k.GetTensorRawData();
    b.v = v.GetTensorRawData();
    if (cuda_ops::IsPresent(ctx, kKeyPaddingMask)) {
      b.mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    auto y = ctx.GetOutput(kY, y_shape);
    b.y = y.GetTensorMutableRawData();
    if (p.batch * p.q_heads * p.q_len * p.value_dim == 0) return;

    cuda::la::Plan plan;
    if (p.kv_len > 0) {
      const std::string why = cuda::la::MakePlan(p, device_->info(), &plan);
      Require(why.empty(), why);
    }
    cuda_ops::DeviceGuard guard(device_->device());
    void* stream = ctx.GetGPUComputeStream();
    cuda_ops::Scratch scratch(raw_context, *device_, plan.workspace_bytes, stream != nullptr);
    const std::string error =
        cuda::LinearAttentionCuda(p, b, scratch.get(), plan.workspace_bytes, stream, device_->info());
    if (!error.empty()) throw std::runtime_error(error);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  float eps_;
  bool causal_;
  bool force_simt_ = false;
  cuda::la::FeatureMap feature_map_;
  std::unique_ptr<cuda_ops::DeviceContext> device_;
};

struct LinearAttentionOpCuda : OpBase<LinearAttentionOpCuda, LinearAttentionCudaKernel> {
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
  ONNXTensorElementDataType GetOutputType(size_t index) const {  // as on the CPU: present_state float32
    return index == kPresentState ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == kPresentState ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  // Y = [B, Hq, Sq, Dv] of Q's type (as on the CPU).
  static OrtStatusPtr InferShapes(OrtShapeInferContext* ctx) {
    return InferOutputFromInputs(ctx, 0, kQ, {{kQ, 0}, {kQ, 1}, {kQ, 2}, {kV, 3}}, kName);
  }
};

}  // namespace

const OrtCustomOp* LinearAttentionCudaOp() {
  static const LinearAttentionOpCuda op;
  return &op;
}

}  // namespace attnexport
