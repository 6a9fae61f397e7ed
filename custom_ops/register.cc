// The library's one exported symbol. ONNX Runtime calls it from
// SessionOptions.register_custom_ops_library(path); it adds the attnexport domain with the CPU (and,
// when built, CUDA) kernels of every operator.
#include <mutex>
#include <string>
#include <vector>

#include "common/op_base.h"
#include "ops.h"

namespace {

// The domain is created once and never released: ORT keeps a pointer to it in every session that
// registered it, so it must live as long as the process.
OrtCustomOpDomain* g_domain = nullptr;
std::once_flag g_domain_once;
std::string g_domain_error;

void CreateDomain() {
  const OrtApi& api = Ort::GetApi();
  std::vector<const OrtCustomOp*> ops = {
      attnexport::LinearAttentionCpuOp(),
      attnexport::SparseAttentionCpuOp(),
      attnexport::LseAttentionCpuOp(),
      attnexport::NystromAttentionCpuOp(),
#if defined(ATTNEXPORT_WITH_CUDA)
      attnexport::LinearAttentionCudaOp(),
      attnexport::SparseAttentionCudaOp(),
      attnexport::LseAttentionCudaOp(),
#endif
  };
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api.CreateCustomOpDomain(attnexport::kDomain, &domain)) {
    g_domain_error = api.GetErrorMessage(status);
    api.ReleaseStatus(status);
    return;
  }
  for (const OrtCustomOp* op : ops) {
    if (OrtStatus* status = api.CustomOpDomain_Add(domain, op)) {
      g_domain_error = api.GetErrorMessage(status);
      api.ReleaseStatus(status);
      return;
    }
  }
  g_domain = domain;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The runtime is older than the headers we were built with; API 1 can still report that.
    const OrtApi* oldest = api_base->GetApi(1);
    std::string message = std::string("attnexport ops were built against the ONNX Runtime C API ") +
                          std::to_string(ORT_API_VERSION) + "; this runtime (" +
                          api_base->GetVersionString() + ") is older";
    return oldest ? oldest->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  std::call_once(g_domain_once, CreateDomain);
  if (g_domain == nullptr) {
    return api->CreateStatus(ORT_FAIL, ("attnexport: creating the op domain failed: " + g_domain_error).c_str());
  }
  return api->AddCustomOpDomain(options, g_domain);
}
