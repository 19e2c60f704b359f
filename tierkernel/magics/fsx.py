"""The ``%fsx`` line magic: look at the workspace and copy files between it and the host.

It only parses its line and calls the fsx facade; errors (a missing file, a wrong argument) are
one clear line, never a traceback.
"""

from __future__ import annotations

import shlex
import stat
import time
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from tierkernel.fsx.facade import FsxFacade

USAGE = """usage:
  %fsx ls [PATH]                 list a directory of the workspace (default /)
  %fsx cat PATH                  print a workspace file as text
  %fsx put HOST_PATH [FSX_PATH]  copy a host file or directory into the workspace
  %fsx get FSX_PATH [HOST_PATH] [--force]
                                 copy a workspace file to the host (--force replaces an
                                 existing host file)
  %fsx rm [-r] PATH              remove a file (-r: a directory and everything in it)
  %fsx info                      the workspace: backend, URL, number of files and bytes
  %fsx info PATH                 one file, directory or link: type, size, mode, modified
  %fsx help                      this text"""

# %fsx cat prints at most this much: a notebook output is no place for a 100 MB file.
CAT_LIMIT = 1 << 20


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@magics_class
class FsxMagics(Magics):
    """``%fsx ls|cat|put|get|rm|info``."""

    def __init__(self, shell: Any, facade: FsxFacade) -> None:
        super().__init__(shell)
        self.fs = facade

    @line_magic
    def fsx(self, line: str) -> None:
        """Look at the fsx workspace and copy files between it and the host.

        %fsx ls [PATH]
        %fsx cat PATH
        %fsx put HOST_PATH [FSX_PATH]
        %fsx get FSX_PATH [HOST_PATH] [--force]
        %fsx rm [-r] PATH
        %fsx info [PATH]
        %fsx help
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot read the %fsx line: {exc}\n{USAGE}") from None
        if not words:
            raise UsageError(USAGE)
        command, args = words[0], words[1:]
        if command in ("help", "-h", "--help") or "-h" in args or "--help" in args:
            print(USAGE)
            return
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise UsageError(f"unknown %fsx command {command!r}\n{USAGE}")
        try:
            handler(args)
        except OSError as exc:
            where = exc.filename if exc.filename is not None else ""
            raise UsageError(f"%fsx {command}: {exc.strerror or exc}: {where}") from None

    def _arity(self, command: str, args: list[str], low: int, high: int) -> None:
        if not low <= len(args) <= high:
            if high == 0:
                takes = "no arguments"
            elif low == high:
                takes = f"{low} argument{'s' if low > 1 else ''}"
            else:
                takes = f"{low} to {high} arguments"
            raise UsageError(f"%fsx {command} takes {takes}, got {len(args)}: "
                             f"{' '.join(args) or '(none)'}\n{USAGE}")

    def _cmd_ls(self, args: list[str]) -> None:
        self._arity("ls", args, 0, 1)
        path = args[0] if args else "/"
        if not self.fs.stat(path).is_dir():
            print(path)
            return
        for entry in self.fs.readdir(path, with_types=True):
            full = f"{path.rstrip('/')}/{entry.name}"
            if entry.is_dir():
                print(f"{entry.name}/")
            elif entry.is_symlink():
                print(f"{entry.name} -> {self.fs.readlink(full)}")
            else:
                print(f"{entry.name}\t{_size(self.fs.lstat(full).st_size)}")

    def _cmd_cat(self, args: list[str]) -> None:
        self._arity("cat", args, 1, 1)
        reader = self.fs.engine.open_reader(args[0])
        try:
            data = reader.pread(0, CAT_LIMIT)
            size = reader.size
        finally:
            reader.close()
        print(data.decode("utf-8", errors="replace"), end="" if data.endswith(b"\n") else "\n")
        if size > CAT_LIMIT:
            print(f"... ({_size(size)} in all; showing the first {_size(CAT_LIMIT)}; "
                  f"use fs.read_file({args[0]!r}) for the rest)")

    def _cmd_put(self, args: list[str]) -> None:
        self._arity("put", args, 1, 2)
        source = Path(args[0]).expanduser()
        if not source.exists():
            raise UsageError(f"%fsx put: no such host file or directory: {source}")
        target = args[1] if len(args) == 2 else "/" + source.name
        if self.fs.exists(target) and self.fs.stat(target).is_dir():
            target = f"{target.rstrip('/')}/{source.name}"
        count = 0
        if source.is_dir():
            for host in sorted([source, *source.rglob("*")]):
                dest = target + ("/" + host.relative_to(source).as_posix()
                                 if host != source else "")
                if host.is_symlink():
                    continue  # a host link could point anywhere on the host: not copied
                if host.is_dir():
                    self.fs.mkdir(dest, recursive=True)
                else:
                    with host.open("rb") as stream:
                        self.fs.write_file(dest, stream)
                    count += 1
        else:
            with source.open("rb") as stream:
                self.fs.write_file(target, stream)
            count = 1
        print(f"copied {count} file(s) from {source} to fsx:{target}")

    def _cmd_get(self, args: list[str]) -> None:
        force = "--force" in args
        args = [a for a in args if a != "--force"]
        self._arity("get", args, 1, 2)
        source = args[0]
        if self.fs.stat(source).is_dir():
            raise UsageError(f"%fsx get copies one file; {source} is a directory")
        name = source.rstrip("/").rsplit("/", 1)[-1]
        target = Path(args[1]).expanduser() if len(args) == 2 else Path(name)
        if target.is_dir():
            target = target / name
        if target.exists() and not force:
            raise UsageError(f"%fsx get: {target} exists on the host; add --force to replace it")
        reader = self.fs.engine.open_reader(source)
        try:
            with target.open("wb") as out:
                offset = 0
                while chunk := reader.pread(offset, 1 << 20):
                    out.write(chunk)
                    offset += len(chunk)
        finally:
            reader.close()
        print(f"copied fsx:{source} to {target} ({_size(offset)})")

    def _cmd_rm(self, args: list[str]) -> None:
        recursive = "-r" in args
        args = [a for a in args if a != "-r"]
        self._arity("rm", args, 1, 1)
        if self.fs.lstat(args[0]).is_dir():
            if not recursive:
                raise UsageError(f"%fsx rm: {args[0]} is a directory; use %fsx rm -r")
            self.fs.rmdir(args[0], recursive=True)
        else:
            self.fs.unlink(args[0])

    def _cmd_info(self, args: list[str]) -> None:
        self._arity("info", args, 0, 1)
        if args:
            self._path_info(args[0])
            return
        info = self.fs.info()
        print(f"backend: {info['backend']}\nurl:     {info['url']}\n"
              f"files:   {info['files']}\nsize:    {_size(info['bytes'])} "
              f"({info['bytes']} bytes)")

    def _path_info(self, path: str) -> None:
        """``%fsx info PATH``: what ``PATH`` is; for a link, where it points and what is there."""
        st = self.fs.lstat(path)
        lines = [f"path:     {path if st.is_symlink() else self.fs.realpath(path)}"]
        if st.is_symlink():
            target = self.fs.readlink(path)
            try:
                st = self.fs.stat(path)
            except OSError as exc:
                lines.append(f"link to:  {target} (dangling: {exc.strerror or exc})")
                print("\n".join(lines))
                return
            lines.append(f"link to:  {target} ({self.fs.realpath(path)})")
        if st.is_dir():
            entries = self.fs.readdir(path, with_types=True)
            counts = [_plural(sum(1 for e in entries if e.kind == kind), noun)
                      for kind, noun in (("file", "file"), ("dir", "directory"),
                                         ("symlink", "link"))]
            lines += ["type:     directory",
                      f"entries:  {len(entries)} ({', '.join(counts)})"]
        else:
            lines += ["type:     file",
                      f"size:     {_size(st.st_size)} ({st.st_size} bytes)"]
        lines += [f"mode:     {stat.filemode(st.st_mode)} ({stat.S_IMODE(st.st_mode):o})",
                  "modified: " + time.strftime("%Y-%m-%d %H:%M:%S",
                                               time.localtime(st.st_mtime))]
        print("\n".join(lines))


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"
