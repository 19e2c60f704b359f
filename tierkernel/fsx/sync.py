"""Cell-boundary sync between fsx and a container's ``/workspace`` (the sandbox tier).

Before a cell: :func:`pack` makes a tar of the workspace (or of what changed since the last
manifest) for docker's ``put_archive``, plus the paths the container must delete. After the
cell: :func:`apply` takes the tar of docker's ``get_archive("/workspace")`` and brings fsx up to
date, deleting what the container deleted, so the container's changes are in fsx before the
cell's reply.

Consistency rule (never lose data): a path the container changed is written to fsx only if fsx
still holds what was packed (the *base* manifest); if both changed meanwhile (another kernel
wrote the same sqlite workspace), fsx keeps its version and the container's is saved beside it
as ``NAME.sandbox-conflict``. A deletion in the container removes the fsx entry only if fsx
still holds the packed version.

Safety: an archive is checked whole before anything is applied. Members with absolute names,
``..``, NUL, names outside the top directory, hard links, devices or FIFOs, or a path through a
symlink member are refused (:class:`UnsafeArchiveError`), and writes never go through a symlink
already in fsx: a symlink in the way is replaced, not followed.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.nodes import Kind
from tierkernel.fsx.paths import PATH_MAX

_SPOOL = 16 << 20
CONFLICT_SUFFIX = ".sandbox-conflict"


class UnsafeArchiveError(ValueError):
    """A tar from a container that fsx refuses to apply; nothing was applied."""


@dataclass(frozen=True)
class Entry:
    """What a manifest records of one path: enough to tell whether it changed."""

    kind: Kind
    size: int
    mtime_ns: int
    mode: int
    digest: str  # sha256 of a file's content; a symlink's target; "" for a directory


Manifest = dict[str, Entry]  # relative POSIX path ("dir/file.csv") -> Entry


@dataclass
class Packed:
    """The result of :func:`pack`: a tar (rewound), the manifest it reflects, and the paths
    the container must remove first (deleted in fsx, or changed kind)."""

    archive: IO[bytes]
    manifest: Manifest
    deleted: list[str] = field(default_factory=list)


@dataclass
class Applied:
    """The result of :func:`apply`."""

    manifest: Manifest  # the new base: what the container holds, as fsx records it
    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # saved as NAME.sandbox-conflict


def _digest(workspace: FsxFacade, path: str) -> str:
    reader = workspace.engine.open_reader(path)
    try:
        h = hashlib.sha256()
        offset = 0
        while chunk := reader.pread(offset, 1 << 20):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()
    finally:
        reader.close()


def manifest(workspace: FsxFacade, previous: Manifest | None = None) -> Manifest:
    """Every entry of the workspace, never following symlinks. A file whose size and mtime
    match ``previous`` keeps its recorded digest instead of being hashed again."""
    out: Manifest = {}
    for path, node in workspace.engine.walk_tree("/"):
        rel = path[1:]
        if node.kind == "file":
            old = (previous or {}).get(rel)
            if old is not None and old.kind == "file" and (old.size, old.mtime_ns) == (
                    node.size, node.mtime_ns):
                digest = old.digest
            else:
                digest = _digest(workspace, path)
        else:
            digest = node.target
        out[rel] = Entry(node.kind, node.size if node.kind == "file" else 0, node.mtime_ns,
                         node.perm, digest)
    return out


def container_target(target: str, rel: str) -> str:
    """A symlink target as the container must see it: fsx reads absolute targets from the
    workspace root, the container from its own root, so they become relative."""
    if not target.startswith("/"):
        return target
    depth = rel.count("/")
    return "/".join([".."] * depth + [target.lstrip("/")]) if depth else target.lstrip("/") or "."


def pack(workspace: FsxFacade, since: Manifest | None = None,
         owner: tuple[int, int] = (0, 0)) -> Packed:
    """A tar of the workspace (members relative, for ``put_archive("/workspace", ...)``),
    only what differs from ``since`` if given. Members belong to ``owner`` (uid, gid): docker
    extracts them with those ids, and the container's user must own what it may change."""
    current = manifest(workspace, since)
    base = since or {}
    archive = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - returned
    deleted = sorted(rel for rel, entry in base.items()
                     if rel not in current or current[rel].kind != entry.kind)
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(current):
            entry = current[rel]
            if base.get(rel) == entry:
                continue
            info = tarfile.TarInfo(rel)
            info.mode = entry.mode
            info.uid, info.gid = owner
            info.mtime = entry.mtime_ns / 1e9
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = container_target(entry.digest, rel)
                tar.addfile(info)
            else:
                reader = workspace.engine.open_reader("/" + rel)
                try:
                    info.size = reader.size
                    tar.addfile(info, _ReaderStream(reader))
                finally:
                    reader.close()
    archive.seek(0)
    return Packed(archive, current, deleted)


class _ReaderStream:
    def __init__(self, reader: Any) -> None:
        self._reader, self._offset = reader, 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._reader.size - self._offset
        data: bytes = self._reader.pread(self._offset, size)
        self._offset += len(data)
        return data


def _member_path(name: str, top: str | None) -> str | None:
    """The workspace-relative path of a member ("" for the top itself), or raise."""
    if "\0" in name or len(name.encode()) > PATH_MAX:
        raise UnsafeArchiveError(f"refused archive member {name!r}: bad name")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"refused archive member {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refused archive member {name!r}: '..' in its path")
    if top is not None:
        if not parts or parts[0] != top:
            raise UnsafeArchiveError(f"refused archive member {name!r}: not under {top}/")
        parts = parts[1:]
    return "/".join(parts)


def _check(tar: tarfile.TarFile, top: str | None) -> list[tuple[str, tarfile.TarInfo]]:
    members: list[tuple[str, tarfile.TarInfo]] = []
    links: set[str] = set()
    for info in tar.getmembers():
        rel = _member_path(info.name, top)
        assert rel is not None
        if not (info.isreg() or info.isdir() or info.issym()):
            raise UnsafeArchiveError(f"refused archive member {info.name!r}: only files, "
                                     "directories and symlinks are synced")
        ancestors = ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
        if any(a in links for a in ancestors):
            raise UnsafeArchiveError(f"refused archive member {info.name!r}: its path goes "
                                     "through a symlink")
        if info.issym():
            links.add(rel)
        members.append((rel, info))
    return members


def _spool(archive: Any) -> IO[bytes]:
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - returned
    if isinstance(archive, bytes | bytearray):
        spool.write(archive)
    elif hasattr(archive, "read"):
        shutil.copyfileobj(archive, spool)
    else:
        for chunk in archive:  # docker's get_archive yields chunks
            spool.write(chunk)
    spool.seek(0)
    return spool


def _remove(workspace: FsxFacade, path: str) -> None:
    """Remove whatever is at ``path`` without following it."""
    try:
        st = workspace.lstat(path)
    except FileNotFoundError:
        return
    if st.is_dir():
        workspace.rmdir(path, recursive=True)
    else:
        workspace.unlink(path)


def apply(workspace: FsxFacade, archive: BinaryIO | Iterable[bytes], base: Manifest,
          top: str | None = "workspace") -> Applied:
    """Bring fsx up to date with a container's tar (``get_archive("/workspace")`` names its
    members ``workspace/...``: ``top`` is that first component; None for relative members).

    ``base`` is the manifest of what the container was given (from :func:`pack`).
    """
    spool = _spool(archive)
    result = Applied(manifest={})
    with tarfile.open(fileobj=spool, mode="r:*") as tar:
        members = _check(tar, top)  # everything checked before anything changes
        now = manifest(workspace, base)
        seen: set[str] = set()
        replaced: set[str] = set()  # folders of fsx a file or link of the tar took the place of
        took: set[str] = set()  # paths where fsx now holds what the container holds
        # Conflicts where the container holds another kind of entry than the one fsx keeps:
        # what the container holds there (for the new base), and its folders saved beside.
        theirs: dict[str, Entry] = {}
        saved: dict[str, str] = {}  # a container folder in conflict -> where fsx keeps it
        for rel, info in members:
            if not rel:
                continue
            seen.add(rel)
            path = "/" + rel
            inside = next((top for top in saved if _under(rel, top)), None)
            if inside is not None:  # in a container folder saved beside fsx's entry
                _put(workspace, tar, info, "/" + saved[inside] + rel[len(inside):])
                continue
            old, mine = base.get(rel), now.get(rel)
            ours_changed = mine != old
            if info.isdir():
                if mine is not None and mine.kind == "dir":
                    if old is not None and old.mode != (info.mode & 0o7777):
                        workspace.chmod(path, info.mode & 0o7777)
                        took.add(rel)
                    continue
                if mine is not None and ours_changed:
                    # fsx changed its file or link meanwhile: fsx keeps it, and the
                    # container's folder (with all it holds) is saved beside it.
                    saved[rel] = rel + CONFLICT_SUFFIX
                    _remove(workspace, "/" + saved[rel])
                    _put(workspace, tar, info, "/" + saved[rel])
                    theirs[rel] = _entry_of_member(info, "")
                    result.conflicts.append(rel)
                    continue
                _remove(workspace, path)
                workspace.mkdir(path, recursive=True)
                result.written.append(rel)
                took.add(rel)
                continue
            if info.issym():
                unchanged = old is not None and old.kind == "symlink" and container_target(
                    old.digest, rel) == info.linkname
                if unchanged:
                    continue
                if mine is not None and (ours_changed or _folder_changed(now, base, rel)):
                    # fsx's stays; the container's link is saved beside it.
                    _remove(workspace, path + CONFLICT_SUFFIX)
                    _put(workspace, tar, info, path + CONFLICT_SUFFIX)
                    if mine.kind != "symlink":
                        theirs[rel] = _entry_of_member(info, info.linkname)
                    result.conflicts.append(rel)
                    continue
                _remove(workspace, path)
                if mine is not None and mine.kind == "dir":
                    replaced.add(rel)
                workspace.symlink(info.linkname, path)
                result.written.append(rel)
                took.add(rel)
                continue
            stream = tar.extractfile(info)
            assert stream is not None
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as data:
                h = hashlib.sha256()
                while chunk := stream.read(1 << 20):
                    h.update(chunk)
                    data.write(chunk)
                digest = h.hexdigest()
                mode = info.mode & 0o7777
                if old is not None and old.kind == "file" and old.digest == digest:
                    if old.mode != mode and not ours_changed:
                        workspace.chmod(path, mode)
                        took.add(rel)
                    continue  # the container did not change it: never overwrite fsx with it
                if mine is not None and mine.kind == "file" and mine.digest == digest:
                    took.add(rel)
                    continue  # both sides already agree
                target = path
                if mine is not None and (ours_changed or _folder_changed(now, base, rel)):
                    # Changed in fsx meanwhile (a folder: anything in it): fsx's stays.
                    target = path + CONFLICT_SUFFIX
                    result.conflicts.append(rel)
                    if mine.kind != "file":
                        theirs[rel] = _entry_of_member(info, digest)
                elif mine is not None and mine.kind == "dir":
                    replaced.add(rel)  # removed below, with what it holds
                parent = target.rsplit("/", 1)[0] or "/"
                if workspace.realpath(parent) != parent:
                    raise UnsafeArchiveError(f"refused to write {rel!r}: its directory in fsx "
                                             "is reached through a symlink")
                # A directory or a symlink in the way is replaced, never written through.
                if _is_link(workspace, target) or (
                        workspace.exists(target) and workspace.lstat(target).is_dir()):
                    _remove(workspace, target)
                data.seek(0)
                _write_file(workspace, target, data, info)
                result.written.append(rel)
                if target == path:
                    took.add(rel)
        # Deletions: deepest first, only what fsx still holds as packed.
        for rel in sorted(set(base) - seen, key=lambda r: r.count("/"), reverse=True):
            mine = now.get(rel)
            if mine is None or any(_under(rel, top) for top in replaced):
                took.add(rel)  # gone from fsx too (by itself, or with a replaced folder)
                continue
            if mine != base[rel]:
                result.conflicts.append(rel)  # changed in fsx meanwhile: kept
                continue
            try:
                if mine.kind == "dir":
                    workspace.rmdir("/" + rel)
                else:
                    workspace.unlink("/" + rel)
                result.deleted.append(rel)
                took.add(rel)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                result.conflicts.append(rel)  # new entries from elsewhere: kept
    result.manifest = _as_the_container_has_it(manifest(workspace, now), base, took, theirs)
    return result


def _entry_of_member(info: tarfile.TarInfo, digest: str) -> Entry:
    kind: Kind = "dir" if info.isdir() else "symlink" if info.issym() else "file"
    return Entry(kind, info.size if kind == "file" else 0, int(info.mtime * 1e9),
                 info.mode & 0o7777, digest)


def _put(workspace: FsxFacade, tar: tarfile.TarFile, info: tarfile.TarInfo, target: str) -> None:
    """Write one member at ``target`` (new: nothing is there), as the container has it."""
    if info.isdir():
        workspace.mkdir(target, recursive=True)
        workspace.chmod(target, info.mode & 0o7777)
    elif info.issym():
        workspace.symlink(info.linkname, target)
    else:
        stream = tar.extractfile(info)
        assert stream is not None
        _write_file(workspace, target, stream, info)


def _write_file(workspace: FsxFacade, target: str, data: Any, info: tarfile.TarInfo) -> None:
    """A file member's content at ``target``, with its mode and mtime."""
    workspace.write_file(target, data)
    workspace.chmod(target, info.mode & 0o7777)
    workspace.utimes(target, info.mtime, info.mtime)


def _as_the_container_has_it(after: Manifest, base: Manifest, took: set[str],
                             theirs: dict[str, Entry]) -> Manifest:
    """The new base: fsx as it is now where the container holds the same, and what the
    container still holds (``base``'s entry, or none) where fsx moved on without it (changed
    by another kernel or program during the cell, kept in a conflict, a conflict copy), so
    the next :func:`pack` carries those into the container. Where the container holds
    another kind of entry than fsx kept (``theirs``), that is recorded, with nothing below
    it: the next pack then has the container remove it first."""
    result = dict(after)
    for rel in set(after) | set(base):
        now, before = after.get(rel), base.get(rel)
        if rel in took or now == before or (
                now is not None and before is not None and now.kind == before.kind == "dir"
                and now.mode == before.mode):  # a folder's mtime moves with what it holds
            continue
        if before is None:
            result.pop(rel, None)
        else:
            result[rel] = before
    for rel, entry in theirs.items():
        for key in [key for key in result if _under(key, rel)]:
            del result[key]
        result[rel] = entry
    return result


def _folder_changed(now: Manifest, base: Manifest, rel: str) -> bool:
    """Whether ``rel`` is a folder in fsx and anything in it differs from what the container
    got (the folder's own entry does not show a file's new content)."""
    if now[rel].kind != "dir":
        return False
    prefix = rel + "/"
    return any(key.startswith(prefix) and entry != base.get(key) for key, entry in now.items())


def _under(rel: str, top: str) -> bool:
    return rel.startswith(top + "/")


def _is_link(workspace: FsxFacade, path: str) -> bool:
    try:
        return workspace.lstat(path).is_symlink()
    except OSError:
        return False
