// ONNX Runtime glue of ClusteredAttention (CPU): reads attributes and inputs, checks them (the same
// one-line reasons as clustered_reference.check_clustered), stages float16 as float32, and runs the
// ISA variant of the kernel on ORT's thread pool.
#include <cmath>
#include <string>

#include "common/qkv_inputs.h"
#include "common/attention_op.h"
#include "cpu/kernels/clustered_attention.h"
#include "cpu/ops/tensor_io.h"
#include "ops.h"

namespace attnexport {
namespace {

using cpu::Require;
using cpu::ShapeString;

constexpr const char* kName = "ClusteredAttention";
enum Input { kQ = 0, kK, kV, kKeyPaddingMask, kCentroids, kPastState, kNumInputs };
enum Output { kY = 0, kPresentState, kNumOutputs };

struct ClusteredAttentionKernel {
  ClusteredAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    scale_ = FloatAttribute(info, "scale", std::nanf(""));
    causal_ = IntAttribute(info, "causal", 0) != 0;
    window_left_ = IntAttribute(info, "window_left", -1);
    window_right_ = IntAttribute(info, "window_right", -1);
    dilation_ = IntAttribute(info, "dilation", 1);
    num_global_ = IntAttribute(info, "num_global", 0);
    num_clusters_ = IntAttribute(info, "num_clusters", 32);
    iterations_ = IntAttribute(info, "iterations", 10);
    const std::string cluster = StringAttribute(info, "cluster", "keys");
    Require(cluster == "keys" || cluster == "queries", "cluster='" + cluster + "' is not one of keys, queries");
    queries_ = cluster == "queries";
    Require(num_clusters_ >= 1, "num_clusters=" + std::to_string(num_clusters_) + ": must be >= 1");
    Require(iterations_ >= 0, "iterations=" + std::to_string(iterations_) + ": must be >= 0");
    Require(window_left_ >= -1 && window_right_ >= -1,
            "window_left/window_right=" + std::to_string(window_left_) + "/" + std::to_string(window_right_) +
                ": must be >= -1 (-1 = unbounded)");
    Require(dilation_ >= 1, "dilation=" + std::to_string(dilation_) + ": must be >= 1");
    Require(num_global_ >= 0, "num_global=" + std::to_string(num_global_) + ": must be >= 0");
    Require(!queries_ || (!causal_ && window_left_ == -1 && window_right_ == -1 && dilation_ == 1 && num_global_ == 0),
            "cluster='queries' is non-causal with no near pattern: causal, window_left, window_right, dilation and "
            "num_global must stay at their defaults (0, -1, -1, 1, 0)");
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext ctx(raw_context);
    auto q = ctx.GetInput(kQ), k = ctx.GetInput(kK), v = ctx.GetInput(kV);

    cpu::ClusteredAttentionProblem p;
    const auto dtype = ReadQkv(q, k, v, p);
    p.scale = std::isnan(scale_) ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.causal = causal_;
    p.window_left = window_left_;
    p.window_right = window_right_;
    p.dilation = dilation_;
    p.num_global = num_global_;
    p.num_clusters = num_clusters_;
    p.iterations = iterations_;
    p.cluster_queries = queries_;
    p.parallelism = cpu::ParallelismHint();

    const bool has_centroids = cpu::IsPresent(ctx, kCentroids);
    Require(!(queries_ && has_centroids),
            "cluster='queries' takes no centroids input (the queries are clustered per call)");
    Require(queries_ || !causal_ || has_centroids,
            "causal ClusteredAttention needs the centroids input [Hkv, M, Dk]: k-means over all keys would make a "
            "query's output depend on later keys");

    const cpu::ThreadPool pool = cpu::PoolOf(raw_context);
    cpu::ScratchArena arena;
    cpu::ClusteredAttentionTensors t;
    t.q = cpu::AsFloat32(q, arena, pool);
    t.k = cpu::AsFloat32(k, arena, pool);
    t.v = cpu::AsFloat32(v, arena, pool);
    if (cpu::IsPresent(ctx, kKeyPaddingMask)) {
      t.key_padding_mask = ReadKeyPaddingMask(ctx.GetInput(kKeyPaddingMask), p);
    }
    if (has_centroids) {
      auto centroids = ctx.GetInput(kCentroids);
      const auto c_shape = centroids.GetTensorTypeAndShapeInfo().GetShape();
      Require(centroids.GetTensorTypeAndShapeInfo().GetElementType() == dtype, "centroids must have Q's element type");
      const std::vector<int64_t> expected = {p.kv_heads, p.num_clusters, p.head_dim};
      Require(c_shape == expected, "centroids have shape " + ShapeString(c_shape) +
                                       ", expected [Hkv, num_clusters, Dk] = " + ShapeString(expected));
      t.centroids = cpu::AsFloat32(centroids, arena, pool);
    }

    const bool has_past = cpu::IsPresent(ctx, kPastState);
    const bool want_present = ctx.GetOutputCount() > kPresentState;
    if (has_past || want_present) {  // state mode: clustered_reference.check_state_mode's reasons
      ComputeWithState(ctx, p, t, dtype, has_past, pool, arena);
      return;
    }
    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, kY, y_shape, dtype, arena);
    t.y = y.data();
    if (y.count() > 0) {
      ATTNEXPORT_ISA_DISPATCH(ClusteredAttentionForward)(p, t, pool, arena.Handle());
    }
    y.Finish(pool);
  }

  // State [B, Hkv, G + R + M + 1, Dk + Dv + 1] float32 (R = window_left + 1); past_state broadcasts to it.
  void ComputeWithState(Ort::KernelContext& ctx, cpu::ClusteredAttentionProblem& p, cpu::ClusteredAttentionTensors& t,
                        ONNXTensorElementDataType dtype, bool has_past, const cpu::ThreadPool& pool,
                        cpu::ScratchArena& arena) {
    Require(!queries_, "a state needs cluster='keys' (query clustering attends to every key)");
    Require(causal_, "a state needs causal=1 (later calls add later keys)");
    Require(t.centroids != nullptr,
            "a state needs the centroids input (the far keys' clusters are summed as they leave the window)");
    Require(window_left_ >= 0, "a state needs a finite window_left >= 0 (the window rows are the bounded KV cache)");
    Require(dilation_ == 1, "a state needs dilation=1, got " + std::to_string(dilation_) +
                                " (a dilated window moves keys in and out of the clusters)");
    Require(p.q_len == p.kv_len, "a state needs as many queries as new keys (the call's tokens), got Sq=" +
                                     std::to_string(p.q_len) + ", Skv=" + std::to_string(p.kv_len));
    const std::vector<int64_t> state_shape = {p.batch, p.kv_heads, num_global_ + window_left_ + 1 + num_clusters_ + 1,
                                              p.head_dim + p.value_dim + 1};
    const int64_t state_size = state_shape[2] * state_shape[3];
    if (has_past) {
      auto past = ctx.GetInput(kPastState);
      Require(past.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
              "past_state must be float32");
      t.past_state = cpu::BroadcastToFloat32(past, state_shape, "past_state", arena, pool);
      for (int64_t unit = 0; unit < p.batch * p.kv_heads; ++unit) {
        const float seen = t.past_state[unit * state_size + (state_shape[2] - 1) * state_shape[3]];
        Require(seen >= 0.f && seen < 16777216.f && seen == std::floor(seen),
                "past_state's last row must start with the token count P (a whole number below 2^24), got " +
                    std::to_string(seen));
      }
    }
    t.present_state = cpu::OptionalFloat32Output(ctx, kPresentState, state_shape);
    const std::vector<int64_t> y_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    cpu::Float32Output y(ctx, kY, y_shape, dtype, arena);
    t.y = y.data();
    if (p.batch * p.kv_heads > 0) {
      ATTNEXPORT_ISA_DISPATCH(ClusteredAttentionStateForward)(p, t, pool, arena.Handle());
    }
    y.Finish(pool);
  }
  ATTNEXPORT_COMPUTE_V2(kName)

 private:
  float scale_;
  bool causal_, queries_;
  int64_t window_left_, window_right_, dilation_, num_global_, num_clusters_, iterations_;
};

struct ClusteredAttentionOp
    : QkvAttentionOp<ClusteredAttentionOp, ClusteredAttentionKernel, kNumInputs, kNumOutputs> {
  static_assert(kQ == 0 && kV == 2 && kKeyPaddingMask == 3, "the input order QkvAttentionOp declares");
  static constexpr const char* kOpName = kName;
  static constexpr const char* kProvider = "CPUExecutionProvider";
};

}  // namespace

const OrtCustomOp* ClusteredAttentionCpuOp() {
  static const ClusteredAttentionOp op;
  return &op;
}

}  // namespace attnexport
