"""The GPU's own tests: skipped where CUDA is not available (CI runs on the CPU).

Run them on a GPU machine with ``python -m pytest tests/gpu``. Every test here
is marked ``gpu``.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
