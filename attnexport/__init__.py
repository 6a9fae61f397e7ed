"""attnexport: find the softmax attention in ONNX models and replace it with efficient attention
operators (linear, sparse, log-sum-exp) that run in ONNX Runtime on CPU and CUDA.

    import attnexport
    attnexport.convert("model.onnx", "model.linear.onnx", method="linear")
    attnexport.verify("model.onnx", "model.linear.onnx")
    session = attnexport.InferenceSession("model.linear.onnx")   # registers the op library
"""

from attnexport.errors import AttnExportError
from attnexport.library import library_path

__version__ = "0.1.0"
DOMAIN = "attnexport"

_API = {"convert", "inspect", "verify", "InferenceSession", "ConvertResult", "VerifyReport", "load_feeds", "calibrate"}

__all__ = ["AttnExportError", "DOMAIN", "library_path", "__version__", *sorted(_API)]


def __getattr__(name):
    # The API pulls in onnxruntime, onnxscript and onnx_ir; import it when first used.
    if name in _API:
        from attnexport import api

        return getattr(api, name)
    if name == "MethodOptions":
        from attnexport.methods import MethodOptions

        return MethodOptions
    raise AttributeError(f"module 'attnexport' has no attribute {name!r}")
