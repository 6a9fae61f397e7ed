// ONNX Runtime glue of LinearAttention (CPU): reads attributes and inputs, checks shapes, stages
// float16 as float32, and runs the ISA variant of the kernel on ORT's thread pool.
#include <cmath>
#include <string>

#include "common/qkv_inputs.h"
#include "common/shape_inference.h"
#include "cpu/kernels/linear_attention.h"
#include "cpu/ops/tensor_io.h"
#include "ops.h"

namespace attnexport {
namespace {

using cpu::ExpansionPoint;
using cpu::FeatureMap;
using cpu::Require;
using cpu::ShapeString;

constexpr const char* kName = "LinearAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kProjection, kPastState, kNumInputs };
enum Output { kY = 0, kPresentState, kNumOutputs };

FeatureMap ParseFeatureMap(const std::string& name) {
  if (name == "elu1") return FeatureMap::kElu1;
  if (name == "relu") return FeatureMap::kRelu;
  if (name == "taylor2") return FeatureMap::kTaylor2;
  if (name == "favor") return FeatureMap::kFavor;
  throw InvalidArgument("unknown feature_map '" + name + "' (expected elu1, relu, taylor2 or favor)");
}

ExpansionPoint ParseExpansionPoint(const std::string& name) {
  if (name == "zero") return ExpansionPoint::kZero;
  if (name == "mean") return ExpansionPoint::kMean;
  if (name == "max") return ExpansionPoint::kMax;
  throw InvalidArgument("unknown expansion_point '" + name + "' (expected zero, mean or max)");
}

struct LinearAttentionKernel {
  LinearAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    eps_ = FloatAttribute(info, "eps", 1e-6f);
    causal_ = IntAttribute(info, "causal", 0) != 0;
    feature_map_ = ParseFeatureMap(StringAttribute(info, "feature_map", "elu1"));
    expansion_point_ = ParseExpansionPoint(StringAttribute(info, "expansion_point", "zero"));
    Require(eps_ >= 0.f, "eps must be >= 0");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cpu::LinearAttentionProblem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.eps = eps_;
    p.causal = causal_;
    p.feature_map = feature_map_;
    p.expansion_point = expansion_point_;

    p.parallelism = cpu::ParallelismHint();

    const cpu::ThreadPool pool = cpu::PoolOf(raw_context);
    cpu::ScratchArena arena(raw_context);
    cpu::LinearAttentionTensors t;
    t.q = cpu::AsFloat32(q, arena, pool);
    t.k = cpu::AsFloat32(k, arena, pool);
    t.v = cpu::AsFloat32(v, arena, pool);
    if (cpu::IsPresent(ctx, kKeyPaddingMask)) {
      t.key_padding_mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    if (p.feature_map == FeatureMap::kFavor) {
      Require(cpu::IsPresent(ctx, kProjection), "feature_map 'favor' needs the projection input W [Dk, F]");
      auto w = ctx.GetInput(kProjection);
      const auto w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
      Require(w_shape.size() == 2 && w_shape[0] == p.head_dim && w_shape[1] > 0,
              "projection must be [Dk, F] with Dk = " + std::to_string(p.head_dim) + "; got " + ShapeString(w_shape));
      p.num_features = w_shape[1];
      t.projection = cpu::AsFloat32(w, arena, pool);
    }

    // Recurrent state [B, Hkv, F, Dv + 2], float32 whatever Q's type (F: the feature count): z_f sums
    // one feature over every key, which passes float16's 65504 within some tens of thousands of tokens.
    const int64_t features = p.feature_map == FeatureMap::kTaylor2 ? 1 + p.head_dim + p.head_dim * (p.head_dim + 1) / 2
                             : p.feature_map == FeatureMap::kFavor  ? p.num_features
                                                                    : p.head_dim;
    const std::vector<int64_t> state_shape = {p.batch, p.kv_heads, features, p.value_dim + 2};
    if (cpu::IsPresent(ctx, kPastState)) {
      Require(p.feature_map != FeatureMap::kTaylor2 || p.expansion_point == ExpansionPoint::kZero,
              "taylor2 with expansion_point mean or max cannot read a past_state (use zero)");
      t.past_state = cpu::BroadcastToFloat32(ctx.GetInput(kPastState), state_shape, "past_state", arena, pool);
    }
    t.present_state = cpu::OptionalFloat32Output(ctx, kPresentState, state_shape);
    const bool want_present = t.present_state != nullptr;
    const int64_t state_count = cpu::ElementCount(state_shape);

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, kY, y_shape, dtype, arena);
    t.y = y.data();
    if (y.count() > 0 || (want_present && state_count > 0)) {
      ATTNEXPORT_ISA_DISPATCH(LinearAttentionForward)(p, t, pool, arena.Handle());
    }
    y.Finish(pool);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  float eps_;
  bool causal_;
  FeatureMap feature_map_;
  ExpansionPoint expansion_point_;
};

struct LinearAttentionOp : OpBase<LinearAttentionOp, LinearAttentionKernel> {
  const char* GetName() const { return kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kKeyPaddingMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kKeyPaddingMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // present_state (optional) is float32; its shape is not inferred: the C API cannot tell whether the
  // node has that output, and setting an absent one fails inside ORT (1.32).
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == kPresentState ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == kPresentState ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  // Y = [B, Hq, Sq, Dv] of Q's type: batch, heads and length of Q, value dim of V.
  static OrtStatusPtr InferShapes(OrtShapeInferContext* ctx) {
    return InferOutputFromInputs(ctx, kY, kQ, {{kQ, 0}, {kQ, 1}, {kQ, 2}, {kV, 3}}, kName);
  }
};

}  // namespace

const OrtCustomOp* LinearAttentionCpuOp() {
  static const LinearAttentionOp op;
  return &op;
}

}  // namespace attnexport
