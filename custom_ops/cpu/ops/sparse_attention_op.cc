// ONNX Runtime glue of SparseAttention (CPU): reads attributes and inputs, checks shapes, stages
// float16 as float32, and runs the ISA variant of the kernel on ORT's thread pool.
#include <cmath>
#include <string>

#include "common/qkv_inputs.h"
#include "common/attention_op.h"
#include "cpu/kernels/sparse_attention.h"
#include "cpu/ops/tensor_io.h"
#include "ops.h"

namespace attnexport {
namespace {

using cpu::Require;
using cpu::ShapeString;

constexpr const char* kName = "SparseAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kAttnBias, kNumInputs };

struct SparseAttentionKernel {
  SparseAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    causal_ = IntAttribute(info, "causal", 0) != 0;
    window_left_ = IntAttribute(info, "window_left", -1);
    window_right_ = IntAttribute(info, "window_right", -1);
    dilation_ = IntAttribute(info, "dilation", 1);
    num_global_ = IntAttribute(info, "num_global", 0);
    block_size_ = IntAttribute(info, "block_size", 0);
    num_random_blocks_ = IntAttribute(info, "num_random_blocks", 0);
    seed_ = IntAttribute(info, "seed", 0);
    Require(window_left_ >= -1 && window_right_ >= -1,
            "window_left and window_right must be >= -1 (-1 = unbounded); got " + std::to_string(window_left_) + " and " +
                std::to_string(window_right_));
    Require(dilation_ >= 1, "dilation must be >= 1; got " + std::to_string(dilation_));
    Require(num_global_ >= 0 && block_size_ >= 0 && num_random_blocks_ >= 0 && seed_ >= 0,
            "num_global, block_size, num_random_blocks and seed must be >= 0");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cpu::SparseAttentionProblem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.causal = causal_;
    p.window_left = window_left_;
    p.window_right = window_right_;
    p.dilation = dilation_;
    p.num_global = num_global_;
    p.block_size = block_size_;
    p.num_random_blocks = num_random_blocks_;
    p.seed = seed_;
    p.parallelism = cpu::ParallelismHint();

    const cpu::ThreadPool pool = cpu::PoolOf(raw_context);
    cpu::ScratchArena arena;
    cpu::SparseAttentionTensors t;
    t.q = cpu::AsFloat32(q, arena, pool);
    t.k = cpu::AsFloat32(k, arena, pool);
    t.v = cpu::AsFloat32(v, arena, pool);
    if (cpu::IsPresent(ctx, kKeyPaddingMask)) {
      t.key_padding_mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    if (cpu::IsPresent(ctx, kAttnBias)) {
      auto bias = ctx.GetInput(kAttnBias);
      const auto b_shape = bias.GetTensorTypeAndShapeInfo().GetShape();
      Require(bias.GetTensorTypeAndShapeInfo().GetElementType() == dtype, "attn_bias must have Q's element type");
      const int64_t full[4] = {p.batch, p.q_heads, p.q_len, p.kv_len};
      const std::string expected = "[" + std::to_string(p.batch) + ", " + std::to_string(p.q_heads) + ", " +
                                   std::to_string(p.q_len) + ", " + std::to_string(p.kv_len) + "]";
      Require(b_shape.size() <= 4, "attn_bias must broadcast to " + expected + "; got " + ShapeString(b_shape));
      // Right-aligned broadcasting: strides of a contiguous tensor, 0 along axes of size 1.
      int64_t stride = 1;
      for (int axis = 3; axis >= 0; --axis) {
        const int64_t rank_axis = axis - (4 - static_cast<int>(b_shape.size()));
        const int64_t dim = rank_axis >= 0 ? b_shape[rank_axis] : 1;
        Require(dim == full[axis] || dim == 1, "attn_bias must broadcast to " + expected + "; got " + ShapeString(b_shape));
        p.bias_stride[axis] = dim == 1 ? 0 : stride;
        stride *= dim;
      }
      t.attn_bias = cpu::AsFloat32(bias, arena, pool);
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, 0, y_shape, dtype, arena);
    t.y = y.data();
    if (y.count() > 0) {
      ATTNEXPORT_ISA_DISPATCH(SparseAttentionForward)(p, t, pool, arena.Handle());
    }
    y.Finish(pool);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  bool causal_;
  int64_t window_left_, window_right_, dilation_, num_global_, block_size_, num_random_blocks_, seed_;
};

struct SparseAttentionOp : QkvAttentionOp<SparseAttentionOp, SparseAttentionKernel, kNumInputs> {
  static_assert(kQ == 0 && kV == 2 && kKeyPaddingMask == 3, "the input order QkvAttentionOp declares");
  static constexpr const char* kOpName = kName;
  static constexpr const char* kProvider = "CPUExecutionProvider";
};

}  // namespace

const OrtCustomOp* SparseAttentionCpuOp() {
  static const SparseAttentionOp op;
  return &op;
}

}  // namespace attnexport
