"""Choosing a workspace: the ``Fsx`` Configurable and ``open_url``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from jupyter_core.paths import jupyter_data_dir
from traitlets import Unicode, default
from traitlets.config import Configurable

from tierkernel.fsx.errors import FsxConfigError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.filesystem import (
    FsxFileSystem,
    FsxLocalFileSystem,
    FsxMemoryFileSystem,
    FsxSqliteFileSystem,
)

URL_ENV = "TIERKERNEL_FSX_URL"


def default_url() -> str:
    """``sqlite://`` + ``<jupyter data dir>/tierkernel/fsx/workspace.db``.

    Why sqlite and why there: a notebook's files should outlive the kernel (restart, crash),
    as files on disk do, which rules out memory; one SQLite file is crash-safe and can be
    shared by several kernels at once; and Jupyter's per-user data directory
    (``~/.local/share/jupyter`` on Linux, honouring ``$JUPYTER_DATA_DIR``) is where Jupyter
    already keeps per-user state, so it follows the platform's conventions and the user's
    overrides. Every kernel of the user shares this workspace unless configured otherwise.
    """
    return "sqlite://" + str(Path(jupyter_data_dir()) / "tierkernel" / "fsx" / "workspace.db")


def open_url(url: str) -> FsxFileSystem:
    """Open the workspace that ``url`` names.

    ``memory://``; ``sqlite:///abs/path/ws.db`` (optionally ``?synchronous=normal``; the
    directory must exist, except for the default workspace's, which is created);
    ``file:///abs/dir`` (an existing directory).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.path.strip("/") or parts.netloc:
            raise FsxConfigError(f"fsx url {url!r}: memory:// takes no path")
        return FsxMemoryFileSystem()
    if scheme in ("sqlite", "file"):
        if parts.netloc not in ("", "localhost"):
            raise FsxConfigError(f"fsx url {url!r}: expected {scheme}:///absolute/path "
                                 f"(three slashes), got host {parts.netloc!r}")
        path = Path(unquote(parts.path)).expanduser()
        if not parts.path or not path.is_absolute():
            raise FsxConfigError(f"fsx url {url!r}: needs an absolute path, as "
                                 f"{scheme}:///home/me/{'ws.db' if scheme == 'sqlite' else 'dir'}")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if scheme == "file":
            if options:
                raise FsxConfigError(f"fsx url {url!r}: file:// takes no options")
            return FsxLocalFileSystem(path, url=url)
        unknown = set(options) - {"synchronous"}
        if unknown:
            raise FsxConfigError(f"fsx url {url!r}: unknown option(s) {sorted(unknown)}; "
                                 "sqlite accepts synchronous=full|normal|extra")
        if url == default_url():
            path.parent.mkdir(parents=True, exist_ok=True)
        return FsxSqliteFileSystem(path, synchronous=options.get("synchronous", "full"),
                                   url=url)
    raise FsxConfigError(f"fsx url {url!r}: unknown scheme {parts.scheme!r}; use memory://, "
                         "sqlite:///path/ws.db or file:///dir")


class Fsx(Configurable):
    """The kernel's workspace, settable from a Jupyter config file.

    ``c.Fsx.url = "sqlite:///home/me/ws.db"`` (or ``memory://``, ``file:///dir``). Default:
    ``$TIERKERNEL_FSX_URL`` if set, else a persistent SQLite workspace in Jupyter's per-user
    data directory (see :func:`default_url` for why).
    """

    url = Unicode(help="Where the fsx workspace lives: memory://, sqlite:///path/ws.db, "
                  "file:///dir. Default: $TIERKERNEL_FSX_URL, else "
                  "sqlite://<jupyter data dir>/tierkernel/fsx/workspace.db").tag(config=True)

    @default("url")
    def _default_url(self) -> str:
        return os.environ.get(URL_ENV, "").strip() or default_url()

    def facade(self) -> FsxFacade:
        """A facade that opens the workspace on first use."""
        url = self.url
        return FsxFacade(lambda: open_url(url), url=url)
