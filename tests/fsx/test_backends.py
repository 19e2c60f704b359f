"""The fsx contract suite, run against each backend."""

from __future__ import annotations

from tests.fsx.contract import FsxContract
from tierkernel.fsx import Fsx, FsxFacade


class TestMemoryBackend(FsxContract):
    def make(self, tmp_path, **settings) -> FsxFacade:
        return Fsx(url="memory://", **settings).facade()


class TestSqliteBackend(FsxContract):
    def make(self, tmp_path, **settings) -> FsxFacade:
        return Fsx(url=f"sqlite://{tmp_path}/ws.db", **settings).facade()


class TestLocalBackend(FsxContract):
    def make(self, tmp_path, **settings) -> FsxFacade:
        root = tmp_path / "root"
        root.mkdir()
        return Fsx(url=root.as_uri(), **settings).facade()
