"""Test-session set-up: tiny helpers importable as ``_tiny``, and the allocator setting the CLI uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DIFFMIS_NO_MALLOC_TUNING", "1")  # in-process CLI calls must not re-exec pytest

from diffmis.utils import tune_malloc  # noqa: E402

tune_malloc()
