"""The notebook's folder in a sandbox container: a read-only copy at ``/notebook``.

The container's root is read-only and the engine may be remote or gVisor, so the folder is not
bind-mounted: what :meth:`NotebookFolder.scan` takes (within its caps, see
``notebook_folder``) is copied into a tmpfs at ``/notebook`` once per container, by ``tar``
running as root in the container, so the files belong to root there and the cells' user
(uid 65534) can read them but not change them. A copy costs once per container start (a
teaching folder of a few MB: tens of milliseconds), never per cell; the folder's later
changes reach the sandbox with its next container.
"""

from __future__ import annotations

import logging
import os
import socket
import tarfile
import tempfile
from typing import Any

from tierkernel.backends.notebook_folder import GUEST_PATH, NotebookFolder, Scan, open_regular

log = logging.getLogger(__name__)

#: What a tmpfs holds besides the content: a page for each file and folder, and some slack.
_PAGE = 4096


def tmpfs_options(folder: NotebookFolder) -> str:
    """The ``/notebook`` tmpfs: owned by root, not writable by the cells' user, large
    enough for the caps (counted in the container's memory only as far as it is filled)."""
    size = folder.max_bytes + (folder.max_files + 256) * _PAGE + (1 << 20)
    return f"rw,nosuid,nodev,noexec,size={size},mode=0755"


def _archive(top: str, scan: Scan) -> Any:
    """A tar of what ``scan`` took, members owned by root and not writable by others. Files
    that cannot be read now are left out and noted in ``scan.left_out``."""
    archive = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - returned
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in scan.folders:
            info = tarfile.TarInfo(rel)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, size in scan.files:
            try:
                with open_regular(os.path.join(top, rel)) as f:
                    if f is None:
                        scan.left_out[rel] = "no longer a regular file"
                        continue
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = size, 0o444
                    info.mtime = os.fstat(f.fileno()).st_mtime
                    tar.addfile(info, _Exactly(f, size))
            except OSError as exc:
                scan.left_out[rel] = f"could not be read: {exc.strerror}"
    archive.seek(0)
    return archive


class _Exactly:
    """``size`` bytes of ``f``: a file that changed since the scan still fills its member
    (cut, or padded with zero bytes), so the archive stays well-formed and bounded."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n) if n else b""
        data += b"\0" * (n - len(data))
        self._left -= n
        return data


def copy_in(api: Any, container_id: str, folder: NotebookFolder) -> tuple[Scan, str]:
    """Copy the notebook's folder into the container's ``/notebook``; return the scan (with
    what was left out) and a notice for the user ("" when everything arrived). Blocking;
    raises OSError when the copy failed (the container then has no /notebook view)."""
    top = folder.folder()
    scan = folder.scan()
    with _archive(top, scan) as archive:
        exec_id = api.exec_create(container_id, ["tar", "-x", "--no-same-owner", "-m", "-C",
                                                 GUEST_PATH, "-f", "-"],
                                  stdin=True, stdout=True, stderr=True, user="0:0")["Id"]
        raw = api.exec_start(exec_id, socket=True)
        sock: socket.socket = getattr(raw, "_sock", raw)
        output = bytearray()
        try:
            sock.settimeout(120)
            while chunk := archive.read(1 << 20):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                if len(output) < 4096:
                    output += chunk
        finally:
            sock.close()
    code = api.exec_inspect(exec_id).get("ExitCode")
    if code:
        text = output[8:].decode("utf-8", "replace").strip()
        raise OSError(f"tar exit {code}: {text[-300:]}")
    return scan, folder.summary(scan, f"the sandbox's {GUEST_PATH}")
