"""Cell-boundary sync between fsx and a tier's own copy of it: the sandbox container's
``/workspace``, the process tier's folder.

Before a cell: :func:`pack` makes a tar of the workspace (or of what changed since the last
manifest), plus the paths the copy must delete; the tier extracts it there (in the sandbox,
``tar -x`` in a docker exec, or the agent itself for a small copy). After the cell: the tier
sends a tar of its copy (``tar -c`` there, or the agent's), and :func:`apply` brings fsx up to
date, deleting what the cell deleted, so the cell's changes are in fsx before its reply. Docker's
archive API (``put_archive``, ``get_archive``, what ``docker cp`` uses) is no way in or out: it
cannot reach the tmpfs mounted at the container's ``/workspace``. Below, "the container" is the
tier's copy, whichever tier holds it.

Consistency rule (never lose data): a path the container changed is written to fsx only if fsx
still holds what was packed (the *base* manifest); if both changed meanwhile (another kernel
wrote the same sqlite workspace), fsx keeps its version and the container's is saved beside it
as ``NAME.sandbox-conflict``. A deletion in the container removes the fsx entry only if fsx
still holds the packed version.

Safety: an archive is checked whole before anything is applied. Members with absolute names,
``..``, NUL, names outside the top directory, hard links, devices or FIFOs, sparse members, or
a path through a symlink member are refused (:class:`UnsafeArchiveError`), and writes never go
through a symlink already in fsx: a symlink in the way is replaced, not followed.

Budget: the container decides what the archive holds, so :func:`receive` reads it as plain tar
only (no compression: 144 bytes of bz2 can say 64 MiB) and counts its bytes, members and
seconds against a :class:`Budget` as they arrive, before spooling them; over it, or stopped,
nothing is applied (:class:`CopyBudgetError`, :class:`CopyStopped`). Applying is linear in the
number of members (``PosixEngine.bulk``).

Host disk: into a ``file://`` workspace, a symlink whose target is absolute or climbs out of the
workspace is not written (listed in :attr:`Applied.skipped`): programs on the host would follow
it out; the local store keeps setuid, setgid, sticky and world-write bits off host files.
"""

from __future__ import annotations

import errno
import hashlib
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from tierkernel.errors import CopyBudgetError, CopyStopped, UnsafeArchiveError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.nodes import Kind
from tierkernel.fsx.paths import PATH_MAX

_SPOOL = 16 << 20
CONFLICT_SUFFIX = ".sandbox-conflict"
#: A manifest digest that is no digest: the file could not be read (what follows says why).
UNREADABLE = "unreadable: "
#: What a file takes in a tmpfs: whole pages.
_PAGE = 4096


@dataclass(frozen=True)
class Budget:
    """What one copy back may bring: archive bytes (headers included), members, seconds.
    ``settings`` name where each is raised, for the messages."""

    bytes: int = 1536 << 20
    files: int = 150_000
    seconds: float = 300.0
    settings: tuple[str, str, str] = ("c.SandboxBackend.copy_back_bytes",
                                      "c.SandboxBackend.copy_back_files",
                                      "c.SandboxBackend.copy_back_seconds")


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
    #: files left out, with why ("room": over the ``room`` given; else the read's error)
    missing: list[tuple[str, str]] = field(default_factory=list)
    #: the manifest entries of the files left out, as fsx has them
    left: Manifest = field(default_factory=dict)


@dataclass
class Applied:
    """The result of :func:`apply`."""

    manifest: Manifest  # the new base: what the container holds, as fsx records it
    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # saved as NAME.sandbox-conflict
    #: members not written, with why (links out of a workspace on host disk)
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
                try:
                    digest = _digest(workspace, path)
                except OSError as exc:  # pack leaves it out and says why
                    digest = f"{UNREADABLE}{exc.strerror or exc}"
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
         owner: tuple[int, int] = (0, 0), room: int | None = None,
         known: Manifest | None = None) -> Packed:
    """A tar of the workspace (members relative, for ``tar -x -C /workspace``), only what
    differs from ``since`` if given. Members belong to ``owner`` (uid, gid): the user the
    tier's cells run as, who must own what they may change.

    ``room``: the bytes the container's folder can hold (a tmpfs counts whole pages). Files
    that would not fit, and files that cannot be read, are left out and listed in
    :attr:`Packed.missing`; the manifest then records what the container still holds there
    (``since``'s entry, or nothing), so the copy back never takes them for deleted; their
    entries are in :attr:`Packed.left`, to give back as ``known`` next time (a large file
    left out is then not hashed again while it is unchanged)."""
    current = manifest(workspace, {**known, **(since or {})} if known else since)
    base = since or {}
    archive = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - returned
    deleted = sorted(rel for rel, entry in base.items()
                     if rel not in current or current[rel].kind != entry.kind)
    gone = set(deleted)
    no_room = _no_room(current, base, room) if room is not None else set()
    missing: list[tuple[str, str]] = []
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
                why = ""
                if entry.digest.startswith(UNREADABLE):
                    why = entry.digest
                elif rel in no_room:
                    why = "room"
                if not why:
                    try:
                        reader = workspace.engine.open_reader("/" + rel)
                    except OSError as exc:
                        why = f"{UNREADABLE}{exc.strerror or exc}"
                if why:
                    missing.append((rel, why))
                    continue
                try:
                    info.size = reader.size
                    tar.addfile(info, _ReaderStream(reader))
                finally:
                    reader.close()
    left = {rel: current[rel] for rel, _ in missing}
    for rel, _ in missing:
        if rel in base and rel not in gone:
            current[rel] = base[rel]  # the container keeps what it had
        else:
            current.pop(rel, None)
    archive.seek(0)
    return Packed(archive, current, deleted, missing, left)


def _pages(size: int) -> int:
    return -(-size // _PAGE) * _PAGE


def _no_room(current: Manifest, base: Manifest, room: int) -> set[str]:
    """The files to leave out so that the container's copy fits in ``room``: the largest of
    those to be copied first (a file it holds already stays)."""
    used = sum(_pages(entry.size) for entry in current.values() if entry.kind == "file")
    left: set[str] = set()
    if used <= room:
        return left
    copied = sorted(((entry.size, rel) for rel, entry in current.items()
                     if entry.kind == "file" and entry.size and base.get(rel) != entry),
                    reverse=True)
    for size, rel in copied:
        if used <= room:
            break
        left.add(rel)
        old = base.get(rel)
        used -= _pages(size) - (_pages(old.size) if old is not None and old.kind == "file"
                                else 0)
    return left


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
        if not (info.isreg() or info.isdir() or info.issym()) or info.issparse():
            raise UnsafeArchiveError(f"refused archive member {info.name!r}: only files, "
                                     "directories and symlinks are synced (no sparse files)")
        if info.issym():
            links.add(rel)
        members.append((rel, info))
    if links:
        # Whether each folder is reached through a link member, worked out once per folder
        # (not once per member and ancestor: a deep tree would cost its depth squared).
        through: dict[str, bool] = {"": False}

        def via_link(folder: str) -> bool:
            pending = []
            while folder not in through:
                pending.append(folder)
                folder = folder.rpartition("/")[0]
            answer = through[folder]
            for name in reversed(pending):
                answer = answer or name in links
                through[name] = answer
            return answer

        for rel, info in members:
            if via_link(rel.rpartition("/")[0]):
                raise UnsafeArchiveError(f"refused archive member {info.name!r}: its path "
                                         "goes through a symlink")
    return members


class Received:
    """An archive that :func:`receive` read and counted: plain tar, within its budget."""

    def __init__(self, spool: IO[bytes]) -> None:
        self.file = spool

    def close(self) -> None:
        """Drop the spooled archive."""
        self.file.close()

    def __enter__(self) -> Received:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BLOCK = 512
#: Most bytes one header member (pax attributes, a GNU long name) may have: tarfile holds it
#: in memory, and a real one is a few kilobytes (PATH_MAX is 4096).
_HEADER_DATA_MAX = 1 << 20


def _chunks(archive: Any) -> Iterator[bytes]:
    if isinstance(archive, bytes | bytearray):
        yield bytes(archive)
    elif hasattr(archive, "read"):
        while chunk := archive.read(1 << 20):
            yield chunk
    else:
        yield from archive  # a docker exec's output stream: chunks


class _Meter:
    """Reads an archive's chunks exactly, counting bytes and seconds against a budget."""

    def __init__(self, archive: Any, budget: Budget, stop: Callable[[], str | None] | None
                 ) -> None:
        self._chunks = _chunks(archive)
        self._buffer = bytearray()
        self.count = 0
        self._budget, self._stop = budget, stop
        self._deadline = time.monotonic() + budget.seconds

    def check(self, more: int = 0) -> None:
        """Raise when ``more`` bytes would go over the byte budget, or when time is up."""
        budget = self._budget
        if self.count + more > budget.bytes:
            raise CopyBudgetError(
                errno.EFBIG, f"the copy back of /workspace is over its budget of "
                f"{_size(budget.bytes)} (an archive of at least {_size(self.count + more)}; "
                f"raise it with {budget.settings[0]})")
        reason = self._stop() if self._stop is not None else None
        if reason:
            raise CopyStopped(errno.EINTR, f"the copy back of /workspace was stopped: {reason}")
        if time.monotonic() > self._deadline:
            raise CopyBudgetError(
                errno.ETIME, f"the copy back of /workspace took more than its budget of "
                f"{budget.seconds:g} s (raise it with {budget.settings[2]})")

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer at the end of the archive."""
        while len(self._buffer) < size:
            self.check()
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.count += len(data)
        self.check()
        return data

    def drain(self) -> None:
        """Read what follows the end of the archive (padding), still within the budget."""
        while self.read(1 << 20):
            pass


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


def _number(field: bytes) -> int:
    """A tar header's numeric field (octal text, or GNU base-256), or -1 if it is neither."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            return -1  # negative, or too large for anything sane
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return -1


def _checksum_ok(block: bytes, chksum: int) -> bool:
    """Whether a header's checksum is right, as POSIX (unsigned bytes) or old tars (signed)
    compute it; the checksum field itself counts as spaces."""
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 32
    if chksum == unsigned:
        return True
    return chksum == unsigned - 256 * sum(1 for byte in rest if byte > 127)


def receive(archive: BinaryIO | Iterable[bytes] | bytes, budget: Budget | None = None,
            stop: Callable[[], str | None] | None = None) -> Received:
    """Read a container's archive into a spool, header by header: plain (uncompressed) tar
    only, no sparse members, and within ``budget`` (bytes, members, seconds) or stopped when
    ``stop()`` names a reason; a member's data is refused on its header, before it is read.
    Raises :class:`UnsafeArchiveError`, :class:`CopyBudgetError` or :class:`CopyStopped`."""
    budget = budget or Budget()
    meter = _Meter(archive, budget, stop)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - returned
    try:
        members = 0
        while True:
            block = meter.read(_BLOCK)
            if len(block) < _BLOCK:
                raise UnsafeArchiveError("refused the copy back: not a plain tar archive (it "
                                         "ends in the middle of a header)")
            if block == bytes(_BLOCK):  # the end of the archive
                spool.write(block * 2)
                meter.drain()
                break
            chksum, size, kind = _number(block[148:156]), _number(block[124:136]), block[156:157]
            if chksum < 0 or size < 0 or not _checksum_ok(block, chksum):
                raise UnsafeArchiveError("refused the copy back: not a plain tar archive "
                                         "(compressed archives are not accepted)")
            if kind == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchiveError("refused the copy back: a sparse member (only "
                                         "plain files are synced)")
            padded = -(-size // _BLOCK) * _BLOCK
            if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                        tarfile.GNUTYPE_LONGLINK, tarfile.SOLARIS_XHDTYPE):
                if size > _HEADER_DATA_MAX:
                    raise UnsafeArchiveError("refused the copy back: a header member of "
                                             f"{_size(size)}")
            else:
                members += 1
                if members > budget.files:
                    raise CopyBudgetError(
                        errno.EDQUOT, f"the copy back of /workspace is over its budget of "
                        f"{budget.files} files and folders (raise it with "
                        f"{budget.settings[1]})")
            meter.check(padded)  # the member's data is refused before it is read
            spool.write(block)
            while padded:
                data = meter.read(min(padded, 1 << 20))
                if not data:
                    raise UnsafeArchiveError("refused the copy back: the archive ends in the "
                                             "middle of a member")
                spool.write(data)
                padded -= len(data)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return Received(spool)


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


def apply(workspace: FsxFacade, archive: Received | BinaryIO | Iterable[bytes] | bytes,
          base: Manifest, top: str | None = "workspace", budget: Budget | None = None,
          stop: Callable[[], str | None] | None = None) -> Applied:
    """Bring fsx up to date with a tar of the tier's copy. ``top``: the first component of
    every member's name (``workspace/...``), taken off; None for relative members, as the
    tiers send them (``tar -c -C /workspace .``).

    ``base`` is the manifest of what the container was given (from :func:`pack`). An archive
    not yet :func:`receive`-d is received first, with ``budget`` and ``stop``.
    """
    received = archive if isinstance(archive, Received) else receive(archive, budget, stop)
    with received, workspace.engine.bulk():
        return _apply(workspace, received.file, base, top)


def _apply(workspace: FsxFacade, spool: IO[bytes], base: Manifest, top: str | None) -> Applied:
    result = Applied(manifest={})
    on_host_disk = getattr(workspace.engine.store, "backend", "") == "local"
    with tarfile.open(fileobj=spool, mode="r:") as tar:
        try:
            members = _check(tar, top)  # everything checked before anything changes
        except (tarfile.TarError, ValueError, UnicodeError) as exc:
            if isinstance(exc, UnsafeArchiveError):
                raise
            raise UnsafeArchiveError(f"refused the copy back: a damaged archive ({exc})"
                                     ) from None
        now = manifest(workspace, base)
        seen: set[str] = set()
        took: set[str] = set()  # paths where fsx now holds what the container holds
        # Files and links the container deleted go first, so that a rename or a replacement
        # in the container never holds both copies at once against the workspace's quotas.
        # Only what fsx still holds as packed is deleted, as below; nothing the container
        # does not also lack is lost if a later write fails (the cell is told, and the
        # container keeps the new files for the next copy back).
        listed = {rel for rel, _ in members}
        early: set[str] = set()
        for rel in sorted(set(base) - listed):
            mine = now.get(rel)
            if mine is None or mine.kind == "dir" or mine != base[rel]:
                continue
            workspace.unlink("/" + rel)
            result.deleted.append(rel)
            took.add(rel)
            early.add(rel)
        made = {""}  # folders fsx now has where the container has them
        replaced: set[str] = set()  # folders of fsx a file or link of the tar took the place of
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
            refusal = _link_refusal(rel, info.linkname) if on_host_disk and info.issym() \
                else None
            if refusal is not None:
                result.skipped.append((rel, refusal))
                continue
            if inside is not None:  # in a container folder saved beside fsx's entry
                _put(workspace, tar, info, "/" + saved[inside] + rel[len(inside):])
                continue
            old, mine = base.get(rel), now.get(rel)
            ours_changed = mine != old
            if info.isdir():
                if mine is not None and mine.kind == "dir":
                    made.add(rel)
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
                if mine is None and rel.rpartition("/")[0] in made:
                    # Its folder is there (the tar lists folders first): one mkdir, not a
                    # removal and a walk of every folder above it.
                    workspace.mkdir(path)
                else:
                    _remove(workspace, path)
                    workspace.mkdir(path, recursive=True)
                made.add(rel)
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
        for rel in sorted(set(base) - seen - early, key=lambda r: r.count("/"), reverse=True):
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


def _link_refusal(rel: str, target: str) -> str | None:
    """Why a link at ``rel`` to ``target`` must not be written to host disk, or None. Only
    a relative target whose ``..`` come first and stay inside the workspace is written: the
    host's programs follow it from its real folder (a later ``..`` may follow a link)."""
    if target.startswith("/"):
        return (f"a link to the absolute path {target!r}, which programs on the host would "
                "follow out of the workspace (make it relative)")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:] or ups > rel.count("/"):
        return f"a link to {target!r}, which leads out of the workspace"
    return None


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
