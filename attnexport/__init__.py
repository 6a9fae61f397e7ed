"""attnexport: find the softmax attention in ONNX models and replace it with efficient attention
operators (linear, sparse, log-sum-exp) that run in ONNX Runtime on CPU and CUDA."""

from attnexport.errors import AttnExportError
from attnexport.library import library_path

__version__ = "0.1.0"
DOMAIN = "attnexport"

__all__ = ["AttnExportError", "DOMAIN", "library_path", "__version__"]
