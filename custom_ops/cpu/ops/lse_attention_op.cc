// ONNX Runtime glue of LseAttention (CPU): reads attributes and inputs, checks shapes, stages float16
// as float32, broadcasts past_state to its full shape (the [1, 1] zeros attach_functions gives a
// node without a state is the empty state), and runs the ISA variant of the kernel on ORT's
// thread pool. present_state is float32 [B, Hkv, Dk, Dv + 2], always produced.
#include <cmath>
#include <string>
#include <vector>

#include "common/qkv_inputs.h"
#include "common/shape_inference.h"
#include "cpu/kernels/lse_attention.h"
#include "cpu/ops/tensor_io.h"
#include "ops.h"

namespace attnexport {
namespace {

using cpu::Require;
using cpu::ShapeString;

constexpr const char* kName = "LseAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kPastState, kNumInputs };
enum Output { kY = 0, kPresentState, kNumOutputs };

struct LseAttentionKernel {
  LseAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    causal_ = IntAttribute(info, "causal", 0) != 0;
    Require(std::isnan(scale_) || scale_ > 0.f, "scale must be > 0 (q~ = sqrt(scale) q)");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cpu::LseAttentionProblem p;
    const auto dtype = ReadQkv(q, k, v, p);
    Require(p.head_dim > 0, "the head dim must be > 0");
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.causal = causal_;
    p.parallelism = cpu::ParallelismHint();

    const cpu::ThreadPool pool = cpu::PoolOf(raw_context);
    cpu::ScratchArena arena(raw_context);
    cpu::LseAttentionTensors t;
    t.q = cpu::AsFloat32(q, arena, pool);
    t.k = cpu::AsFloat32(k, arena, pool);
    t.v = cpu::AsFloat32(v, arena, pool);
    if (cpu::IsPresent(ctx, kKeyPaddingMask)) {
      t.key_padding_mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    const std::vector<int64_t> state_shape = {p.batch, p.kv_heads, p.head_dim, p.value_dim + 2};
    if (cpu::IsPresent(ctx, kPastState)) {
      t.past_state = cpu::BroadcastToFloat32(ctx.GetInput(kPastState), state_shape, "past_state", arena, pool);
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, kY, y_shape, dtype, arena);
    t.y = y.data();
    t.present_state = ctx.GetOutput(kPresentState, state_shape).GetTensorMutableData<float>();
    ATTNEXPORT_ISA_DISPATCH(LseAttentionForward)(p, t, pool, arena.Handle());
    y.Finish(pool);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  bool causal_;
};

struct LseAttentionOp : OpBase<LseAttentionOp, LseAttentionKernel> {
  const char* GetName() const { return kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kKeyPaddingMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kKeyPaddingMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  // present_state is always float32 and always produced: an optional output of fixed type breaks ORT's
  // type inference for nodes that leave it out (ORT 1.32), and a free type would follow Q (float16).
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == kPresentState ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  // Y = [B, Hq, Sq, Dv] of Q's type; present_state float32 [B, Hkv, Dk, ?] (the helper cannot express
  // Dv + 2: the last dim is a fresh symbol; type_input kNumInputs does not exist, which means float32).
  static OrtStatusPtr InferShapes(OrtShapeInferContext* ctx) {
    if (OrtStatusPtr s = InferOutputFromInputs(ctx, kY, kQ, {{kQ, 0}, {kQ, 1}, {kQ, 2}, {kV, 3}}, kName)) return s;
    return InferOutputFromInputs(ctx, kPresentState, kNumInputs, {{kQ, 0}, {kK, 1}, {kQ, 3}, {kNumInputs, 0}}, kName);
  }
};

}  // namespace

const OrtCustomOp* LseAttentionCpuOp() {
  static const LseAttentionOp op;
  return &op;
}

}  // namespace attnexport
