"""Finding the compiled op library that ships inside the package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from attnexport.errors import LibraryNotFoundError

LIBRARY_ENV = "ATTNEXPORT_LIBRARY"
_LIBRARY_NAMES = {"linux": "libattnexport_ops.so", "darwin": "libattnexport_ops.dylib", "win32": "attnexport_ops.dll"}


def library_name() -> str:
    return _LIBRARY_NAMES.get(sys.platform, "libattnexport_ops.so")


def library_path() -> str:
    """Absolute path of the attnexport op library (for SessionOptions.register_custom_ops_library).

    The install builds it into the package (attnexport/lib/); ATTNEXPORT_LIBRARY overrides that,
    for a development build.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_file():
            raise LibraryNotFoundError(f"{LIBRARY_ENV}={override} does not name a file")
        return str(path)
    path = Path(__file__).resolve().parent / "lib" / library_name()
    if not path.is_file():
        raise LibraryNotFoundError(
            f"attnexport op library not found at {path}; it is built by `pip install .` "
            f"(or point {LIBRARY_ENV} at a build of custom_ops/)"
        )
    return str(path)
