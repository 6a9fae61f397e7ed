// Runs the attnexport CUDA kernels in the host emulator (emulator.h) on inputs from files, for the
// tests (tests/test_cuda_emulated.py). Not part of the op library.
//
//   attnexport_cuda_emu <op> <dir> key=value...
//
// reads <dir>/<input>.bin (raw arrays as numpy writes them with tobytes()), writes <dir>/y.bin and
// prints one line of key=value facts about the run (path, segments, launches, blocks). Outputs and
// workspace start as 0xFF bytes (NaN), so an element the kernels never write shows up as NaN.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "cuda/emu/emulator.h"
#include "cuda/kernels/linear_attention_run.h"
#include "cuda/kernels/lse_attention_run.h"
#include "cuda/kernels/sparse_attention_run.h"

namespace {

using attnexport::cuda::DeviceInfo;
using attnexport::cuda::DType;
using attnexport::cuda::Grid;

struct EmuRuntime {
  std::vector<std::string> launched;
  template <typename... P, typename... A>
  void Launch(void (*kernel)(P...), Grid g, int threads, size_t smem, A&&... args) {
    emu::Launch(emu::Dim3{g.x, g.y, g.z}, threads, smem, kernel, std::forward<A>(args)...);
    launched.push_back(std::to_string(g.x) + "x" + std::to_string(g.y) + "x" + std::to_string(g.z) + "@" +
                       std::to_string(smem));
  }
  void Zero2D(void* ptr, size_t pitch, size_t width, size_t height) {
    for (size_t h = 0; h < height; ++h) std::memset(static_cast<char*>(ptr) + h * pitch, 0, width);
  }
  std::string Error() const { return {}; }
};

std::vector<char> ReadFile(const std::string& path, size_t expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() != expected) {
    std::fprintf(stderr, "%s: %zu bytes, expected %zu\n", path.c_str(), data.size(), expected);
    std::exit(2);
  }
  return data;
}

// An exactly sized heap copy (AddressSanitizer then sees any read past the end).
void* HeapCopy(const std::vector<char>& data) {
  void* p = std::malloc(data.size() ? data.size() : 1);
  if (!data.empty()) std::memcpy(p, data.data(), data.size());
  return p;
}

DType ParseDType(const std::string& s) {
  if (s == "float32") return DType::kFloat32;
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  std::fprintf(stderr, "unknown dtype %s\n", s.c_str());
  std::exit(2);
}

int RunLinear(const std::string& dir, std::map<std::string, std::string>& kv) {
  namespace la = attnexport::cuda::la;
  auto I = [&](const char* k) { return std::stoll(kv.at(k)); };
  la::Problem p;
  p.dtype = ParseDType(kv.at("dtype"));
  p.batch = I("B");
  p.q_heads = I("Hq");
  p.kv_heads = I("Hkv");
  p.q_len = I("Sq");
  p.kv_len = I("Skv");
  p.head_dim = I("Dk");
  p.value_dim = I("Dv");
  p.scale = std::stof(kv.at("scale"));
  p.eps = std::stof(kv.at("eps"));
  p.causal = I("causal") != 0;
  p.feature_map = kv.at("feature_map") == "relu" ? la::FeatureMap::kRelu : la::FeatureMap::kElu1;
  p.force_simt = kv.count("simt") && I("simt") != 0;
  DeviceInfo dev;
  dev.sm_count = kv.count("sm") ? static_cast<int>(I("sm")) : 4;
  dev.max_smem_per_block = 227 * 1024;
  const size_t es = la::ElementSize(p.dtype);
  const size_t nq = p.batch * p.q_heads * p.q_len * p.head_dim, nk = p.batch * p.kv_heads * p.kv_len * p.head_dim;
  const size_t nv = p.batch * p.kv_heads * p.kv_len * p.value_dim, ny = p.batch * p.q_heads * p.q_len * p.value_dim;
  la::Buffers buf;
  buf.q = HeapCopy(ReadFile(dir + "/q.bin", nq * es));
  buf.k = HeapCopy(ReadFile(dir + "/k.bin", nk * es));
  buf.v = HeapCopy(ReadFile(dir + "/v.bin", nv * es));
  if (I("mask")) buf.mask = static_cast<const bool*>(HeapCopy(ReadFile(dir + "/mask.bin", p.batch * p.kv_len)));
  buf.y = std::malloc(ny * es ? ny * es : 1);
  std::memset(buf.y, 0xFF, ny * es);
  la::Plan plan;
  std::string why = la::MakePlan(p, dev, &plan);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  void* ws = std::malloc(plan.workspace_bytes ? plan.workspace_bytes : 1);
  std::memset(ws, 0xFF, plan.workspace_bytes);
  EmuRuntime rt;
  why = la::Run(rt, p, buf, ws, plan.workspace_bytes, dev);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  std::ofstream out(dir + "/y.bin", std::ios::binary);
  out.write(static_cast<const char*>(buf.y), static_cast<std::streamsize>(ny * es));
  std::printf("path=%s dk_tile=%d key_segments=%d chunks_per_seg=%d q_segments=%d workspace=%zu launches=",
              plan.path == la::Path::kMma ? "mma" : "simt", plan.dk_tile, plan.key_segments, plan.chunks_per_seg,
              plan.q_segments, plan.workspace_bytes);
  for (size_t i = 0; i < rt.launched.size(); ++i) std::printf("%s%s", i ? "," : "", rt.launched[i].c_str());
  std::printf("\n");
  std::free(const_cast<void*>(buf.q));
  std::free(const_cast<void*>(buf.k));
  std::free(const_cast<void*>(buf.v));
  std::free(const_cast<bool*>(buf.mask));
  std::free(buf.y);
  std::free(ws);
  return 0;
}

int RunSparse(const std::string& dir, std::map<std::string, std::string>& kv) {
  namespace sp = attnexport::cuda::sp;
  auto I = [&](const char* k) { return std::stoll(kv.at(k)); };
  sp::Problem p;
  p.dtype = ParseDType(kv.at("dtype"));
  p.batch = I("B");
  p.q_heads = I("Hq");
  p.kv_heads = I("Hkv");
  p.q_len = I("Sq");
  p.kv_len = I("Skv");
  p.head_dim = I("Dk");
  p.value_dim = I("Dv");
  p.scale = std::stof(kv.at("scale"));
  p.causal = I("causal") != 0;
  p.window_left = I("window_left");
  p.window_right = I("window_right");
  p.dilation = I("dilation");
  p.num_global = I("num_global");
  p.block_size = I("block_size");
  p.num_random_blocks = I("num_random_blocks");
  p.seed = I("seed");
  p.force_simt = kv.count("simt") && I("simt") != 0;
  DeviceInfo dev;
  dev.sm_count = 4;
  dev.max_smem_per_block = 227 * 1024;
  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const size_t nq = p.batch * p.q_heads * p.q_len * p.head_dim, nk = p.batch * p.kv_heads * p.kv_len * p.head_dim;
  const size_t nv = p.batch * p.kv_heads * p.kv_len * p.value_dim, ny = p.batch * p.q_heads * p.q_len * p.value_dim;
  sp::Buffers buf;
  buf.q = HeapCopy(ReadFile(dir + "/q.bin", nq * es));
  buf.k = HeapCopy(ReadFile(dir + "/k.bin", nk * es));
  buf.v = HeapCopy(ReadFile(dir + "/v.bin", nv * es));
  if (I("mask")) buf.mask = static_cast<const bool*>(HeapCopy(ReadFile(dir + "/mask.bin", p.batch * p.kv_len)));
  if (kv.count("bias_shape")) {  // e.g. 4x1x7: right-aligned, broadcast to [B, Hq, Sq, Skv]
    std::vector<int64_t> shape;
    std::string rest = kv.at("bias_shape");
    for (size_t x; (x = rest.find('x')) != std::string::npos; rest = rest.substr(x + 1)) shape.push_back(std::stoll(rest.substr(0, x)));
    shape.push_back(std::stoll(rest));
    int64_t stride = 1;
    for (int axis = 3; axis >= 0; --axis) {
      const int k = axis - (4 - static_cast<int>(shape.size()));
      const int64_t dim = k >= 0 ? shape[k] : 1;
      p.bias_stride[axis] = dim == 1 ? 0 : stride;
      stride *= dim;
    }
    buf.bias = HeapCopy(ReadFile(dir + "/bias.bin", static_cast<size_t>(stride) * es));
  }
  buf.y = std::malloc(ny * es ? ny * es : 1);
  std::memset(buf.y, 0xFF, ny * es);
  sp::Plan plan;
  std::string why = sp::MakePlan(p, dev, &plan);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  EmuRuntime rt;
  why = sp::Run(rt, p, buf, dev);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  std::ofstream out(dir + "/y.bin", std::ios::binary);
  out.write(static_cast<const char*>(buf.y), static_cast<std::streamsize>(ny * es));
  std::printf("path=%s dim=%d q_tiles=%d key_tiles=%d launches=", plan.path == sp::Path::kMma ? "mma" : "simt",
              plan.dim, plan.q_tiles, plan.key_tiles);
  for (size_t i = 0; i < rt.launched.size(); ++i) std::printf("%s%s", i ? "," : "", rt.launched[i].c_str());
  std::printf(" blocks=%ld\n", emu::Stats().blocks);
  std::free(const_cast<void*>(buf.q));
  std::free(const_cast<void*>(buf.k));
  std::free(const_cast<void*>(buf.v));
  std::free(const_cast<bool*>(buf.mask));
  std::free(const_cast<void*>(buf.bias));
  std::free(buf.y);
  return 0;
}

std::vector<int64_t> ParseShape(std::string rest) {  // "2x1x4x6" -> {2, 1, 4, 6}
  std::vector<int64_t> shape;
  for (size_t x; (x = rest.find('x')) != std::string::npos; rest = rest.substr(x + 1)) shape.push_back(std::stoll(rest.substr(0, x)));
  shape.push_back(std::stoll(rest));
  return shape;
}

int RunLse(const std::string& dir, std::map<std::string, std::string>& kv) {
  namespace lse = attnexport::cuda::lse;
  auto I = [&](const char* k) { return std::stoll(kv.at(k)); };
  lse::Problem p;
  p.dtype = ParseDType(kv.at("dtype"));
  p.batch = I("B");
  p.q_heads = I("Hq");
  p.kv_heads = I("Hkv");
  p.q_len = I("Sq");
  p.kv_len = I("Skv");
  p.head_dim = I("Dk");
  p.value_dim = I("Dv");
  p.scale = std::stof(kv.at("scale"));
  p.causal = I("causal") != 0;
  DeviceInfo dev;
  dev.sm_count = kv.count("sm") ? static_cast<int>(I("sm")) : 4;
  dev.max_smem_per_block = 227 * 1024;
  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const size_t nq = p.batch * p.q_heads * p.q_len * p.head_dim, nk = p.batch * p.kv_heads * p.kv_len * p.head_dim;
  const size_t nv = p.batch * p.kv_heads * p.kv_len * p.value_dim, ny = p.batch * p.q_heads * p.q_len * p.value_dim;
  const size_t ns = p.batch * p.kv_heads * p.head_dim * (p.value_dim + 2);
  lse::Buffers buf;
  buf.q = HeapCopy(ReadFile(dir + "/q.bin", nq * es));
  buf.k = HeapCopy(ReadFile(dir + "/k.bin", nk * es));
  buf.v = HeapCopy(ReadFile(dir + "/v.bin", nv * es));
  if (I("mask")) buf.mask = static_cast<const bool*>(HeapCopy(ReadFile(dir + "/mask.bin", p.batch * p.kv_len)));
  if (kv.count("past_shape")) {  // right-aligned, broadcast to [B, Hkv, Dk, Dv + 2]
    const std::vector<int64_t> shape = ParseShape(kv.at("past_shape"));
    int64_t stride = 1;
    for (int axis = 3; axis >= 0; --axis) {
      const int k = axis - (4 - static_cast<int>(shape.size()));
      const int64_t dim = k >= 0 ? shape[k] : 1;
      p.past_stride[axis] = dim == 1 ? 0 : stride;
      stride *= dim;
    }
    buf.past = static_cast<const float*>(HeapCopy(ReadFile(dir + "/past.bin", static_cast<size_t>(stride) * 4)));
  }
  buf.y = std::malloc(ny * es ? ny * es : 1);
  std::memset(buf.y, 0xFF, ny * es);
  buf.present = static_cast<float*>(std::malloc(ns * 4 ? ns * 4 : 1));
  std::memset(buf.present, 0xFF, ns * 4);
  lse::Plan plan;
  std::string why = lse::MakePlan(p, dev, &plan);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  void* ws = std::malloc(plan.workspace_bytes ? plan.workspace_bytes : 1);
  std::memset(ws, 0xFF, plan.workspace_bytes);
  EmuRuntime rt;
  why = lse::Run(rt, p, buf, ws, plan.workspace_bytes, dev);
  if (!why.empty()) {
    std::printf("error=%s\n", why.c_str());
    return 3;
  }
  std::ofstream(dir + "/y.bin", std::ios::binary).write(static_cast<const char*>(buf.y), static_cast<std::streamsize>(ny * es));
  std::ofstream(dir + "/present.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(buf.present), static_cast<std::streamsize>(ns * 4));
  std::printf("segments=%d chunks_per_seg=%d launches=", plan.segments, plan.chunks_per_seg);
  for (size_t i = 0; i < rt.launched.size(); ++i) std::printf("%s%s", i ? "," : "", rt.launched[i].c_str());
  std::printf("\n");
  std::free(const_cast<void*>(buf.q));
  std::free(const_cast<void*>(buf.k));
  std::free(const_cast<void*>(buf.v));
  std::free(const_cast<bool*>(buf.mask));
  std::free(const_cast<float*>(buf.past));
  std::free(buf.y);
  std::free(buf.present);
  std::free(ws);
  return 0;
}

// Self-tests of the emulator: a kernel with a missing barrier (its result depends on the schedule),
// and one that reads past the end of its input (AddressSanitizer must stop it).
void RacyKernel(int* out) {
  int* smem = reinterpret_cast<int*>(attnexport::cuda::dev::dynamic_smem());
  const int t = attnexport::cuda::dev::thread_x();
  smem[t] = t + 1;
  // missing sync_block() here: thread t reads what thread t + 1 wrote in the same phase
  out[t] = smem[(t + 1) % 64];
}
void OutOfBoundsKernel(const float* in, float* out) {
  const int t = attnexport::cuda::dev::thread_x();
  out[t] = in[t + 1];  // in has 64 elements: thread 63 reads in[64]
}

int RunSelfTest(const std::string& which) {
  if (which == "race") {
    std::vector<int> out(64, 0);
    emu::Launch(emu::Dim3{1, 1, 1}, 64, 64 * sizeof(int), RacyKernel, out.data());
    int wrong = 0;
    for (int t = 0; t < 64; ++t) wrong += out[t] != (t + 1) % 64 + 1;
    std::printf("wrong=%d\n", wrong);
    return 0;
  }
  if (which == "oob") {
    float* in = static_cast<float*>(std::malloc(64 * sizeof(float)));
    std::vector<float> out(64);
    for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
    emu::Launch(emu::Dim3{1, 1, 1}, 64, 0, OutOfBoundsKernel, static_cast<const float*>(in), out.data());
    std::free(in);
    std::printf("no error\n");
    return 0;
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <op> <dir> key=value...\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1], dir = argv[2];
  std::map<std::string, std::string> kv;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "bad argument %s\n", a.c_str());
      return 2;
    }
    kv[a.substr(0, eq)] = a.substr(eq + 1);
  }
  if (kv.count("schedule_seed")) emu::SetScheduleSeed(std::stoull(kv.at("schedule_seed")));
  try {
    if (op == "selftest") return RunSelfTest(dir);
    if (op == "linear") return RunLinear(dir, kv);
    if (op == "sparse") return RunSparse(dir, kv);
    if (op == "lse") return RunLse(dir, kv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 2;
  }
  std::fprintf(stderr, "unknown op %s\n", op.c_str());
  return 2;
}
