"""Suite-wide test hygiene."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_LEAKY = ("HOROVOD_DYNAMIC_PROCESS_SETS",)
"""Variables that ``hvd.init`` sets in this process (``process_sets="dynamic"`` in the launcher's Horovod
runtime): later tests' ``horovodrun`` children would inherit them and start with other semantics."""


@pytest.fixture(autouse=True)
def _restore_horovod_environment() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _LEAKY}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
