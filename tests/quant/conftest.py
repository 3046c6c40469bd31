"""The quantization tests run quietly and single-threaded (fixtures: tests/conftest.py)."""

from __future__ import annotations

import pytest
import transformers


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()  # MusicGen's pad id == vocab size is by design


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """Every quantization test module runs single-threaded (see tests/conftest.py: single_thread)."""
    yield
