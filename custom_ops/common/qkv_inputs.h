// The Q, K, V inputs every attnexport op takes, read and checked once for all ops and providers:
// Q [B, Hq, Sq, Dk], K [B, Hkv, Skv, Dk], V [B, Hkv, Skv, Dv], one element type, Hq % Hkv == 0.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/op_base.h"

namespace attnexport {

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline void Require(bool condition, const std::string& message) {
  if (!condition) throw InvalidArgument(message);
}

// Fills the problem's batch, q_heads, q_len, head_dim, kv_heads, kv_len and value_dim from the shapes
// of q, k, v (throwing InvalidArgument with a one-line reason when they do not fit together) and
// returns their element type.
template <class Problem>
ONNXTensorElementDataType ReadQkv(const Ort::ConstValue& q, const Ort::ConstValue& k, const Ort::ConstValue& v,
                                  Problem& p) {
  const auto q_shape = q.GetTensorTypeAndShapeInfo().GetShape();
  const auto k_shape = k.GetTensorTypeAndShapeInfo().GetShape();
  const auto v_shape = v.GetTensorTypeAndShapeInfo().GetShape();
  const auto dtype = q.GetTensorTypeAndShapeInfo().GetElementType();
  Require(q_shape.size() == 4 && k_shape.size() == 4 && v_shape.size() == 4,
          "Q, K, V must be 4-D [B, H, S, D]; got Q " + ShapeString(q_shape) + ", K " + ShapeString(k_shape) +
              ", V " + ShapeString(v_shape));
  Require(k.GetTensorTypeAndShapeInfo().GetElementType() == dtype &&
              v.GetTensorTypeAndShapeInfo().GetElementType() == dtype,
          "Q, K and V must have the same element type");
  p.batch = q_shape[0];
  p.q_heads = q_shape[1];
  p.q_len = q_shape[2];
  p.head_dim = q_shape[3];
  p.kv_heads = k_shape[1];
  p.kv_len = k_shape[2];
  p.value_dim = v_shape[3];
  Require(k_shape[0] == q_shape[0] && v_shape[0] == q_shape[0], "Q, K, V batch sizes differ: Q " +
                                                                     ShapeString(q_shape) + ", K " +
                                                                     ShapeString(k_shape) + ", V " + ShapeString(v_shape));
  Require(k_shape[3] == q_shape[3], "K head dim " + std::to_string(k_shape[3]) + " != Q head dim " +
                                        std::to_string(q_shape[3]));
  Require(v_shape[1] == k_shape[1] && v_shape[2] == k_shape[2],
          "V " + ShapeString(v_shape) + " does not match K " + ShapeString(k_shape) + " in heads or length");
  Require(k_shape[1] > 0 && q_shape[1] % k_shape[1] == 0,
          "query heads (" + std::to_string(q_shape[1]) + ") must be a multiple of kv heads (" +
              std::to_string(k_shape[1]) + ")");
  return dtype;
}

// The key_padding_mask input [B, Skv] bool every op takes, checked against the problem read by ReadQkv;
// returns its data (host or device memory, as the provider keeps it).
template <class Problem>
const bool* ReadKeyPaddingMask(const Ort::ConstValue& mask, const Problem& p) {
  const auto m_shape = mask.GetTensorTypeAndShapeInfo().GetShape();
  Require(mask.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
          "key_padding_mask must be bool");
  Require(m_shape.size() == 2 && m_shape[0] == p.batch && m_shape[1] == p.kv_len,
          "key_padding_mask must be [B, Skv] = [" + std::to_string(p.batch) + ", " + std::to_string(p.kv_len) +
              "]; got " + ShapeString(m_shape));
  return mask.GetTensorData<bool>();
}

}  // namespace attnexport
