// ONNX Runtime glue of SparseAttention on the CUDA execution provider: the same attributes, checks
// and one-line errors as the CPU op (cpu/ops/sparse_attention_op.cc); inputs and output in device
// memory, kernels on ORT's compute stream (no scratch memory needed).
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/qkv_inputs.h"
#include "common/attention_op.h"
#include "cuda/kernels/entry.h"
#include "cuda/ops/cuda_glue.h"
#include "ops.h"

namespace attnexport {
namespace {

using cuda_ops::Require;
using cuda_ops::ShapeString;

constexpr const char* kName = "SparseAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kAttnBias, kNumInputs };

struct SparseAttentionCudaKernel {
  SparseAttentionCudaKernel(const OrtApi&, const OrtKernelInfo* info) {
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
    const char* force = std::getenv("ATTNEXPORT_CUDA_FORCE_SIMT");
    force_simt_ = force != nullptr && force[0] == '1';
    device_ = std::make_unique<cuda_ops::DeviceContext>(info);
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cuda::sp::Problem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.dtype = cuda_ops::DTypeOf(dtype, "Q, K and V");
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.causal = causal_;
    p.window_left = window_left_;
    p.window_right = window_right_;
    p.dilation = dilation_;
    p.num_global = num_global_;
    p.block_size = block_size_;
    p.num_random_blocks = num_random_blocks_;
    p.seed = seed_;
    p.force_simt = force_simt_;

    cuda::sp::Buffers b;
    b.q = q.GetTensorRawData();
    b.k = k.GetTensorRawData();
    b.v = v.GetTensorRawData();
    if (cuda_ops::IsPresent(ctx, kKeyPaddingMask)) {
      b.mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    if (cuda_ops::IsPresent(ctx, kAttnBias)) {
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
      b.bias = bias.GetTensorRawData();
    }

    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    auto y = ctx.GetOutput(0, y_shape);
    b.y = y.GetTensorMutableRawData();
    if (p.batch * p.q_heads * p.q_len * p.value_dim == 0) return;
    if (p.kv_len > 0) {
      cuda::sp::Plan plan;
      const std::string why = cuda::sp::MakePlan(p, device_->info(), &plan);
      Require(why.empty(), why);
    }
    cuda_ops::DeviceGuard guard(device_->device());
    const std::string error = cuda::SparseAttentionCuda(p, b, ctx.GetGPUComputeStream(), device_->info());
    if (!error.empty()) throw std::runtime_error(error);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  bool causal_;
  bool force_simt_ = false;
  int64_t window_left_, window_right_, dilation_, num_global_, block_size_, num_random_blocks_, seed_;
  std::unique_ptr<cuda_ops::DeviceContext> device_;
};

struct SparseAttentionOpCuda : QkvAttentionOp<SparseAttentionOpCuda, SparseAttentionCudaKernel, kNumInputs> {
  static_assert(kQ == 0 && kV == 2 && kKeyPaddingMask == 3, "the input order QkvAttentionOp declares");
  static constexpr const char* kOpName = kName;
  static constexpr const char* kProvider = "CUDAExecutionProvider";
};

}  // namespace

const OrtCustomOp* SparseAttentionCudaOp() {
  static const SparseAttentionOpCuda op;
  return &op;
}

}  // namespace attnexport
