"""The fault suite's session fixtures, imported by each of its test modules (one Suite, one table)."""

from __future__ import annotations

from pathlib import Path

import faultlib
import pytest
from faultlib import Collector, Suite


@pytest.fixture(scope="session", name="suite")
def suite_fixture(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Suite:
    return faultlib.suite(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="session", name="table")
def table_fixture(request: pytest.FixtureRequest) -> Collector:
    return faultlib.collector(request)
