"""The tooling suite's fixture: the bundled dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from neurocbir.data.cases import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = default_data_dir()
    if d is None or not (d / "metadata.csv").is_file():
        pytest.fail("the bundled dataset is missing: set NEUROCBIR_DATA or place ../shared/data/brain-tumor-figshare")
    return d
