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
