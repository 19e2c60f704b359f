"""The fsx contract suite (tierkernel.testing.fsx), run against each built-in store."""

from __future__ import annotations

from tierkernel.fsx import Fsx, FsxFacade, FsxFileSystem
from tierkernel.fsx.memory import MemoryStore
from tierkernel.testing.fsx import FsxContract


class TestMemoryBackend(FsxContract):
    backend_name = "memory"

    def make(self, tmp_path, **settings) -> FsxFacade:
        return Fsx(url="memory://", **settings).facade()


class TestSqliteBackend(FsxContract):
    backend_name = "sqlite"

    def make(self, tmp_path, **settings) -> FsxFacade:
        return Fsx(url=f"sqlite://{tmp_path}/ws.db", **settings).facade()


class TestLocalBackend(FsxContract):
    backend_name = "local"

    def make(self, tmp_path, **settings) -> FsxFacade:
        root = tmp_path / "root"
        root.mkdir()
        return Fsx(url=root.as_uri(), **settings).facade()


class TestStoreOnTheDocumentedRoute(FsxContract):
    """A store wrapped as tierkernel.testing.fsx's docstring tells a third party to: proves
    the recipe it shows, quotas included."""

    backend_name = "memory"

    def make(self, tmp_path, **settings) -> FsxFacade:
        quota = Fsx(**settings).quota()
        return FsxFacade(FsxFileSystem(MemoryStore(), quota))
