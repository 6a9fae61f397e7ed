"""The errors attnexport reports to users. Each carries a one-line message that names the problem;
the CLI prints it as `attnexport: error: <message>` and exits non-zero, without a traceback."""

from __future__ import annotations


class AttnExportError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""

    exit_code = 2


class ModelLoadError(AttnExportError):
    """The file is not an ONNX model, is truncated or corrupt, or uses an unsupported opset."""


class LibraryNotFoundError(AttnExportError):
    """The compiled op library is missing."""


class OutputPathError(AttnExportError):
    """The output path would overwrite the input or cannot be written."""


class NoAttentionError(AttnExportError):
    """The model has no attention that can be replaced; nothing was written."""


class UnsupportedError(AttnExportError):
    """A requested method or option cannot be applied to this model."""


class VerificationError(AttnExportError):
    """The converted model disagrees with the original beyond the tolerance."""

    exit_code = 1
