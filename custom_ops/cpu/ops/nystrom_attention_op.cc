// ONNX Runtime glue of NystromAttention (CPU): reads attributes and inputs, checks shapes, stages
// float16 as float32, and runs the ISA variant of the kernel on ORT's thread pool.
#include <cmath>
#include <string>

#include "common/qkv_inputs.h"
#include "common/attention_op.h"
#include "cpu/kernels/nystrom_attention.h"
#include "cpu/ops/tensor_io.h"
#include "ops.h"

namespace attnexport {
namespace {

using cpu::Require;
using cpu::ShapeString;

constexpr const char* kName = "NystromAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kNumInputs };

cpu::NystromLandmarks ParseLandmarks(const std::string& name) {
  if (name == "segment_means") return cpu::NystromLandmarks::kSegmentMeans;
  if (name == "kmeans") return cpu::NystromLandmarks::kKmeans;
  throw InvalidArgument("landmarks must be segment_means or kmeans; got '" + name + "'");
}

cpu::NystromSolver ParseSolver(const std::string& name) {
  if (name == "sketch") return cpu::NystromSolver::kSketch;
  if (name == "newton_schulz") return cpu::NystromSolver::kNewtonSchulz;
  if (name == "direct") return cpu::NystromSolver::kDirect;
  throw InvalidArgument("solver must be sketch, newton_schulz or direct; got '" + name + "'");
}

struct NystromAttentionKernel {
  NystromAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    Require(IntAttribute(info, "causal", 0) == 0,
            "NystromAttention causal=1 is refused: a landmark averages future tokens");
    num_landmarks_ = IntAttribute(info, "num_landmarks", 64);
    landmarks_ = ParseLandmarks(StringAttribute(info, "landmarks", "segment_means"));
    iterations_ = IntAttribute(info, "iterations", 3);
    solver_ = ParseSolver(StringAttribute(info, "solver", "sketch"));
    newton_iterations_ = IntAttribute(info, "newton_iterations", 6);
    ridge_ = FloatAttribute(info, "ridge", 1e-2f);
    Require(num_landmarks_ >= 1, "num_landmarks must be >= 1; got " + std::to_string(num_landmarks_));
    Require(iterations_ >= 0 && newton_iterations_ >= 0, "iterations and newton_iterations must be >= 0");
    Require(solver_ == cpu::NystromSolver::kNewtonSchulz || ridge_ > 0.f,
            "ridge must be > 0 for the sketch and direct solvers; got " + std::to_string(ridge_));
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cpu::NystromAttentionProblem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.num_landmarks = num_landmarks_;
    p.landmarks = landmarks_;
    p.iterations = iterations_;
    p.solver = solver_;
    p.newton_iterations = newton_iterations_;
    p.ridge = ridge_;
    p.parallelism = cpu::ParallelismHint();

    const cpu::ThreadPool pool = cpu::PoolOf(raw_context);
    cpu::ScratchArena arena(raw_context);
    cpu::NystromAttentionTensors t;
    t.q = cpu::AsFloat32(q, arena, pool);
    t.k = cpu::AsFloat32(k, arena, pool);
    t.v = cpu::AsFloat32(v, arena, pool);
    if (cpu::IsPresent(ctx, kKeyPaddingMask)) {
      auto mask = ctx.GetInput(kKeyPaddingMask);
      const auto m_shape = mask.GetTensorTypeAndShapeInfo().GetShape();
      Require(mask.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
              "key_padding_mask must be bool");
      Require(m_shape.size() == 2 && m_shape[0] == p.batch && m_shape[1] == p.kv_len,
              "key_padding_mask must be [B, Skv] = [" + std::to_string(p.batch) + ", " + std::to_string(p.kv_len) +
                  "]; got " + ShapeString(m_shape));
      t.key_padding_mask = mask.GetTensorData<bool>();
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, 0, y_shape, dtype, arena);
    t.y = y.data();
    if (y.count() > 0) {
      ATTNEXPORT_ISA_DISPATCH(NystromAttentionForward)(p, t, pool, arena.Handle());
    }
    y.Finish(pool);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  int64_t num_landmarks_, iterations_, newton_iterations_;
  cpu::NystromLandmarks landmarks_;
  cpu::NystromSolver solver_;
  float ridge_;
};

struct NystromAttentionOp : QkvAttentionOp<NystromAttentionOp, NystromAttentionKernel, kNumInputs> {
  static_assert(kQ == 0 && kV == 2 && kKeyPaddingMask == 3, "the input order QkvAttentionOp declares");
  static constexpr const char* kOpName = kName;
  static constexpr const char* kProvider = "CPUExecutionProvider";
};

}  // namespace

const OrtCustomOp* NystromAttentionCpuOp() {
  static const NystromAttentionOp op;
  return &op;
}

}  // namespace attnexport
