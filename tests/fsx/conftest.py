"""Fixtures shared by the fsx tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tierkernel.fsx import Fsx, FsxFacade


@pytest.fixture(params=["memory", "sqlite", "local"])
def each_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FsxFacade]:
    """A fresh workspace on each fsx backend in turn (a test runs once per backend)."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite://{tmp_path}/ws.db"
    else:
        (tmp_path / "root").mkdir()
        url = (tmp_path / "root").as_uri()
    facade = Fsx(url=url).facade()
    yield facade
    facade.close()
