import os

import pytest

import attnexport


def pytest_report_header(config):
    try:
        where = attnexport.library_path()
    except attnexport.AttnExportError as e:
        where = f"MISSING ({e})"
    return [f"attnexport {attnexport.__version__} from {os.path.dirname(attnexport.__file__)}", f"op library: {where}"]


@pytest.fixture(scope="session")
def op_library() -> str:
    return attnexport.library_path()


@pytest.fixture(scope="session")
def zoo_model(tmp_path_factory):
    """zoo_model(arch, exporter) -> path of a small random transformers model exported to ONNX (cached)."""
    from attnexport import zoo

    cache: dict[tuple[str, str], str] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(arch: str, exporter: str) -> str:
        key = (arch, exporter)
        if key not in cache:
            cache[key] = zoo.export(arch, exporter, root / f"{arch}_{exporter}.onnx")
        return cache[key]

    return get
