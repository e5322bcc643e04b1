"""Test-session set-up: tiny helpers importable as ``_tiny``, and the allocator setting the CLI uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DIFFMIS_NO_MALLOC_TUNING", "1")  # in-process CLI calls must not re-exec pytest

from diffmis.utils import tune_malloc  # noqa: E402

tune_malloc()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from intra-op threads, and spinning threads suffer badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
