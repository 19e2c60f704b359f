"""Whether anyone changed a folder: a counter that inotify moves, instead of a walk.

Two places must learn, around every sandbox cell, whether a workspace tree changed, and a walk
that stats every file costs 4-8 ms per thousand files, each time:

- the host, before each cell, for a ``file://`` workspace, which any host process may change
  (``tierkernel.fsx.local``: copy it into the container only when it changed);
- the guest agent, before and after each cell, for the container's /workspace (copy it back
  to fsx only when it changed). The agent is sent this module as source, like the helpers: it
  uses the standard library only.

:class:`TreeWatch` puts an inotify watch on every directory of the tree and counts the
events; the walk then runs only when the count moved.

Why this is safe to trust:

- The kernel queues an inotify event inside the system call that changes the file, so once a
  writer's call has returned, :meth:`TreeWatch.version` (which drains the queue without
  blocking) sees it. Nothing is missed for lack of a thread that has not woken up yet.
- A new or moved-in directory is only watched from the moment the watch is added. Its event
  moves the count, and the caller's walk happens after the count was read, so whatever was
  written inside it before the watch existed is found by that walk.
- When the kernel's queue overflows, or the tree cannot be watched whole (too many folders for
  ``fs.inotify.max_user_watches``, no ``/proc``, not Linux), or the folder sits on a
  filesystem where other machines may write (NFS, SMB, FUSE, 9p...; inotify reports only this
  machine's writes), the answer is None: "cannot tell", and the caller walks every time.

Only writes are watched (modify, attributes, create, delete, move): reading files, as the walk
itself does, moves nothing.

inotify does not hear writes through a shared memory map (``numpy.memmap`` in ``r+`` mode, for
one), and neither stat nor mtime shows them reliably (a page already dirty takes more writes
without a fault). So while a file under the tree is mapped writable and shared, every call
that asks (``version(maps=True)``) counts as a change. Which processes' maps are read is the
caller's (``maps``: by default this process's, the host kernel, whose native cells may map
files of a host folder); ``mapped`` adds a check of its own (the agent knows the maps its
cells make through Python's mmap without reading /proc, which costs 0.3-0.6 ms a read under
gVisor). A map held by some other host program is not looked for.

Nor does inotify hear a write to a file of the tree through another name of it, a hard link
from outside the tree (in the container a whole-tree copy follows any event, so only a host
folder is concerned): such a write reaches the sandbox with the next change in the folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import threading
from collections.abc import Callable

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
_IN_ISDIR = 0x40000000
_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
         | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
#: A directory appeared or moved: the set of watched directories must be looked at again.
_TREE_CHANGED = _IN_CREATE | _IN_MOVED_FROM | _IN_MOVED_TO
_EVENT = struct.Struct("iIII")

#: Filesystems where every write comes through this machine's kernel, so inotify hears it.
#: Anything else (nfs, cifs/smb3, fuse.*, 9p, virtiofs, ceph, ...) may be changed from
#: elsewhere unheard, and is walked every time instead.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs", "zfs", "jfs",
    "reiserfs", "bcachefs", "vfat", "exfat", "ntfs3", "hfsplus", "ramfs",
})

#: The most folders watched; a bigger tree is walked each time (so one workspace does not use
#: up the user's inotify watches, which other programs need too).
MAX_WATCHED_DIRS = 20_000


class TreeWatch:
    """Counts write events under the directory open as ``root_fd`` (which stays the caller's;
    ``root_path`` is its path, to learn its filesystem and to find its files in memory maps).

    :meth:`version` is the count, or None when the tree cannot be watched reliably (see the
    module's docstring); ``why`` then says why. Thread-safe. :meth:`close` releases the
    inotify instance.
    """

    def __init__(self, root_fd: int, root_path: str, max_dirs: int = MAX_WATCHED_DIRS,
                 maps: Callable[[], list[str]] | None = None,
                 mapped: Callable[[], bool] | None = None) -> None:
        self._root = f"/proc/self/fd/{root_fd}"  # the folder the caller holds, not its name
        self._max_dirs = max_dirs
        self._maps = maps or (lambda: ["/proc/self/maps"])
        self._mapped = mapped
        self._prefix = os.fsencode(os.path.realpath(root_path).rstrip("/") + "/")
        self._lock = threading.Lock()
        self._count = 0
        self._wds: set[int] = set()
        self._fd = -1
        self.why = _cannot_watch(root_path)
        if self.why is None:
            self._fd = _inotify_init()
            if self._fd < 0:
                self.why = "inotify is not available"
        if self.why is None and not self._rescan():
            self.why = "the folder could not be watched whole"
        if self.why is not None:
            self._give_up()

    def version(self, maps: bool = True) -> int | None:
        """The number of write events seen so far (plus one per call with ``maps`` while a
        file of the tree is mapped for writing), or None: cannot tell, look yourself."""
        with self._lock:
            if self._fd < 0:
                return None
            rescan = False
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.why = f"reading its events failed: {exc}"
                    self._give_up()
                    return None
                if not data:  # never so for inotify: someone closed it, the number is reused
                    self.why = "its descriptor was closed"
                    self._fd = -1  # not ours any more: not closed here
                    self._give_up()
                    return None
                for mask in _masks(data):
                    self._count += 1
                    if mask & _IN_Q_OVERFLOW:
                        rescan = True  # events were lost: every directory may be unwatched
                    elif mask & _IN_ISDIR and mask & _TREE_CHANGED:
                        rescan = True
            if rescan and not self._rescan():
                self.why = "the folder could not be watched whole"
                self._give_up()
                return None
            if maps and self._mapped_for_writing():
                self._count += 1
            return self._count

    def _mapped_for_writing(self) -> bool:
        """Whether a file under the tree is mapped writable and shared (see the module)."""
        if self._mapped is not None and self._mapped():
            return True
        return mapped_for_writing(self._prefix, self._maps())

    def close(self) -> None:
        """Stop watching."""
        with self._lock:
            self.why = self.why or "closed"
            self._give_up()

    def _rescan(self) -> bool:
        """Watch every directory of the tree (again); forget those gone from it. False when
        the tree cannot be watched whole."""
        wds: set[int] = set()
        stack = [self._root]
        while stack:
            path = stack.pop()
            # The root is reached through its /proc link, which must be followed; below it,
            # a directory swapped for a symlink meanwhile is not followed out of the tree.
            wd = _add_watch(self._fd, path, follow=path == self._root)
            if wd < 0:
                if wd == -errno.ENOENT or wd == -errno.ENOTDIR:
                    continue  # removed (or replaced by a file) while we looked: an event says so
                return False
            wds.add(wd)
            if len(wds) > self._max_dirs:
                return False
            try:
                with os.scandir(path) as entries:
                    stack.extend(entry.path for entry in entries
                                 if entry.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return False  # a folder we cannot list: its changes could not be heard
        for wd in self._wds - wds:  # moved out of the tree: its events are not ours any more
            _rm_watch(self._fd, wd)
        self._wds = wds
        self._count += 1
        return True

    def _give_up(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._wds = set()


def _masks(data: bytes) -> list[int]:
    """The event masks in one read of an inotify descriptor."""
    masks = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size + length
        if not mask & _IN_IGNORED:  # a watch went away with its directory: no change itself
            masks.append(mask)
    return masks


def mapped_for_writing(folder: str | bytes, maps: list[str]) -> bool:
    """Whether one of the processes whose ``maps`` (``/proc/PID/maps``) are named holds a
    file under ``folder`` mapped writable and shared (unreadable maps are skipped)."""
    prefix = os.fsencode(folder)
    prefix = prefix if prefix.endswith(b"/") else prefix + b"/"
    for path in maps:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue  # gone, or not ours to read
        if prefix not in data:  # the usual case: one search, no parsing
            continue
        for line in data.splitlines():
            fields = line.split(maxsplit=5)
            if (len(fields) == 6 and fields[1][1:2] == b"w" and fields[1][3:4] == b"s"
                    and fields[5].startswith(prefix)):
                return True
    return False


def _cannot_watch(root_path: str) -> str | None:
    """Why inotify cannot be trusted for this folder, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "inotify is Linux only"
    try:
        mounts = _mounts()
    except OSError:
        return "/proc/self/mountinfo is not readable"
    real = os.path.realpath(root_path)
    # The deepest mount point above the folder; of two on the same point, the later (on top).
    deepest = sorted(reversed(mounts), key=lambda m: len(m[0]), reverse=True)
    fstype = next((kind for point, kind in deepest
                   if real == point or real.startswith(point.rstrip("/") + "/")), None)
    if fstype not in LOCAL_FILESYSTEMS:
        return f"it is on a {fstype or 'unknown'} filesystem, which others may change unheard"
    for point, kind in mounts:  # something else mounted inside the folder
        if point.startswith(real.rstrip("/") + "/") and kind not in LOCAL_FILESYSTEMS:
            return f"{point} inside it is a {kind} filesystem"
    return None


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each of this process's mounts."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            if " - " not in line or len(fields) < 5:
                continue
            point = _unescape(fields[4])
            fstype = line.split(" - ", 1)[1].split()[0]
            mounts.append((point, fstype))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def _inotify_init() -> int:
    try:
        fd = int(_c().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return -1
    return fd


def _add_watch(fd: int, path: str, follow: bool) -> int:
    """The watch descriptor, or minus the errno."""
    mask = _MASK if follow else _MASK | _IN_DONT_FOLLOW
    wd = int(_c().inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask)))
    return wd if wd >= 0 else -ctypes.get_errno()


def _rm_watch(fd: int, wd: int) -> None:
    _c().inotify_rm_watch(fd, wd)
