"""Files the way a notebook user expects, inside a tier's interpreter (process, wasm, sandbox).

Standard library only: the host sends it to the agent as source (``install_files``; the wasm
guest imports it from the agent's folder), and :func:`install` sets three things up:

- ``fsx://`` URLs: when a cell first imports ``fsspec`` (a ``sys.meta_path`` hook, so an agent
  that never uses it pays nothing at start), the ``fsx`` protocol is registered as the tier's
  copy of the workspace (``fsx://data.csv`` is ``<workspace>/data.csv``), replacing the host's
  ``fsspec.specs`` entry point, which names the kernel's own workspace object and cannot work
  in another process. Without fsspec in the tier, pandas says so itself (``pip install
  fsspec``), as in any Python.
- The notebook's folder, read-only: a read (``open`` in a mode without w, a, x or +) of a
  path in the workspace that does not exist there is tried in the notebook's folder at the
  same relative path (``pd.read_csv('data/births.csv')`` works in every tier as in native);
  writes always go to the workspace. The folder is the kernel's starting folder (the
  process tier reads it in place) or the tier's read-only view of it (``/notebook``).
  While a cell runs, looking at such a path (``os.stat``, ``os.path.exists``, ``os.listdir``,
  ``os.scandir``, so ``glob`` and ``pathlib`` too) also finds what the notebook's folder has:
  a listing of a workspace folder is the union of both, the workspace's names first. The
  agent's own walks of the workspace (between cells) see the workspace alone.
- ``/workspace`` in the process tier (config ``alias``): the host has no such folder (making
  one needs root), so while a cell runs, Python's own file functions (``open``, ``os.stat``,
  ``os.listdir``, ``os.scandir``, ``os.mkdir``, ``os.remove``, ``os.rename``, ``os.chdir``)
  read ``/workspace/...`` as the tier's workspace folder. Programs started by the cell
  (``!cat /workspace/x``) do not: they get ``$TIERKERNEL_WORKSPACE``.
- A hint on a ``FileNotFoundError`` for a workspace path that is not in the notebook's view
  either: where this tier reads files, and how to make one visible.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PROTOCOL = "fsx"
#: Most notebook-folder paths named in the hint's list of what a tier was not given.
_NAMED = 5


class _AfterExec:
    """A loader that runs ``then(module)`` once the real loader has executed ``module``."""

    def __init__(self, loader: Any, then: Callable[[Any], None]) -> None:
        self._loader = loader
        self._then = then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        # The package's own loader from now on (importlib.resources and reloads ask it).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._then(module)


class FsspecHook:
    """On ``sys.meta_path``: finds nothing itself, but wraps ``fsspec``'s loader so that the
    ``fsx`` protocol is registered right after fsspec's own set-up (which registers the
    installed entry points, the host's ``fsx`` among them), then leaves the path."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        """fsspec's spec as the other finders make it, its loader wrapped; None otherwise."""
        if fullname != "fsspec" or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _AfterExec(spec.loader, self.register)
        return spec

    def register(self, fsspec: Any) -> None:
        """Register ``fsx`` in ``fsspec`` (the module); never raises (a failure is a clear
        error when an ``fsx://`` URL is used instead)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            fsspec.register_implementation(PROTOCOL, workspace_filesystem(self.root),
                                           clobber=True)
        except Exception as exc:  # an fsspec too old or too new for DirFileSystem
            reason = f"{type(exc).__name__}: {exc}"

            def unavailable(*args: Any, **kwargs: Any) -> Any:
                raise ImportError(f"fsx:// URLs are not available in this tier: {reason}")

            fsspec.register_implementation(PROTOCOL, unavailable, clobber=True)


def workspace_filesystem(root: str) -> type:
    """An fsspec filesystem class for ``fsx://``: the local folder ``root``. A
    ``LocalFileSystem`` whose paths are taken inside ``root`` (fsspec's ``DirFileSystem`` is
    asynchronous underneath and starts an event loop thread, which a wasm guest cannot)."""
    import posixpath

    from fsspec.implementations.local import LocalFileSystem

    top = root.rstrip("/") or "/"

    class WorkspaceFileSystem(LocalFileSystem):  # type: ignore[misc]
        """``fsx://path`` is ``path`` in this tier's copy of the workspace."""

        protocol = PROTOCOL
        root_marker = "/"

        def __init__(self, *args: Any, **storage_options: Any) -> None:
            if args or storage_options:
                raise TypeError("fsx:// takes no storage options: it is the workspace "
                                f"(got {sorted(storage_options) or list(args)})")
            super().__init__()

        @classmethod
        def _strip_protocol(cls, path: Any) -> Any:
            # fsx:///a, fsx://a, a and /a all name the workspace's a, as in the kernel; a
            # path this filesystem gave out (ls, glob) is already inside the folder.
            if not isinstance(path, str):
                path = os.fspath(path)
            if path.startswith(PROTOCOL + "://"):
                path = path[len(PROTOCOL) + 3:]
            elif path == top or path.startswith(top + "/"):
                return posixpath.normpath(path)
            return posixpath.normpath(posixpath.join(top, path.lstrip("/")))

        @staticmethod
        def _outside(name: str) -> str:
            """A path this filesystem gives out: workspace-rooted ("/sub/x.csv"), as in the
            kernel (given back, it names the same file)."""
            if name == top:
                return "/"
            return name[len(top):] if name.startswith(top + "/") else name

        def unstrip_protocol(self, name: str) -> str:
            return f"{PROTOCOL}://{self._outside(name).lstrip('/')}"

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            # os.makedirs looks at every parent, and a WASI guest has no "/" to look at.
            path = self._strip_protocol(path)
            if exist_ok and os.path.isdir(path):
                return
            super().makedirs(path, exist_ok=exist_ok)

        def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
            out = dict(super().info(path, **kwargs))
            out["name"] = self._outside(str(out["name"]))
            return out

        def glob(self, path: Any, maxdepth: int | None = None, **kwargs: Any) -> Any:
            # By the standard library on the folder: fsspec's would match names given out
            # workspace-rooted against the folder's pattern.
            import glob as globbing

            inside = self._strip_protocol(path)
            found = sorted(globbing.glob(inside, recursive="**" in inside))
            if maxdepth is not None:
                depth = inside.count("/")
                found = [p for p in found if p.count("/") - depth < maxdepth]
            names = [self._outside(p) for p in found]
            if kwargs.get("detail"):
                return {name: self.info(name) for name in names}
            return names

        def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> Any:
            entries = super().ls(path, detail=detail, **kwargs)
            if not detail:
                return [self._outside(str(name)) for name in entries]
            return [dict(entry, name=self._outside(str(entry["name"]))) for entry in entries]

    return WorkspaceFileSystem


class NotebookFiles:
    """The read-only fall-back to the notebook's folder, and the hint (see the module).

    ``config`` (from the host): ``workspace`` (the tier's workspace folder), ``notebook`` (its
    view of the notebook's folder, "" for none), ``refused`` (why the notebook's folder is not
    shown, "" if it is), ``left_out`` ({relative path: why} of what the view lacks),
    ``where`` (how the user makes a file visible, for the hint)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.workspace = os.path.realpath(str(config.get("workspace") or os.getcwd()))
        self.notebook = str(config.get("notebook") or "")
        self.refused = str(config.get("refused") or "")
        left = config.get("left_out") or {}
        self.left_out: dict[str, str] = {str(k): str(v) for k, v in dict(left).items()}
        self.view_note = str(config.get("view_note") or "")
        #: Whether the tier sees no host files (wasm, sandbox): absolute paths get a hint.
        self.isolated = bool(config.get("isolated"))
        # The interpreter's own open, also when this is installed again (a new config).
        self._open = getattr(builtins, "__tierkernel_open__", builtins.open)
        builtins.__tierkernel_open__ = self._open  # type: ignore[attr-defined]
        #: The interpreter's own os functions, kept the same way.
        self._os: dict[str, Any] = getattr(os, "__tierkernel_os__", None) or {
            name: getattr(os, name) for name in _OS_NAMES if hasattr(os, name)}
        os.__tierkernel_os__ = self._os  # type: ignore[attr-defined]
        #: ``/workspace`` where the tier's workspace folder has another name (process), and
        #: the host has no ``/workspace`` of its own to hide.
        alias = str(config.get("alias") or "")
        self.alias = alias if alias and not os.path.lexists(alias) else ""
        #: Whether a cell's code is running: only then do paths go to the notebook's folder
        #: or the alias (set by install()).
        self.in_cell: Callable[[], bool] = lambda: True

    # -- paths -----------------------------------------------------------------------------
    def aliased(self, file: Any) -> Any:
        """``file`` with a leading ``/workspace`` made the workspace folder (process tier,
        while a cell runs); anything else as it is."""
        if (not self.alias or not isinstance(file, (str, bytes, os.PathLike))
                or not self.in_cell()):
            return file
        try:
            path = os.fspath(file)
            text = os.fsdecode(path)
        except (TypeError, ValueError):
            return file
        if text != self.alias and not text.startswith(self.alias + "/"):
            return file
        mapped = self.workspace + text[len(self.alias):]
        return os.fsencode(mapped) if isinstance(path, bytes) else mapped

    def in_notebook(self, file: Any) -> str | None:
        """Where ``file`` (a workspace path) is in the notebook's view, while a cell runs;
        None when there is no such view or ``file`` is not a workspace path."""
        if not self.notebook or not self.in_cell():
            return None
        if isinstance(file, (str, bytes, os.PathLike)) and not isinstance(file, int):
            try:
                full = os.path.normpath(os.path.join(os.getcwd(), os.fsdecode(os.fspath(file))))
            except (TypeError, ValueError):
                return None
            if full == self.workspace.rstrip("/"):
                return self.notebook
        rel = self.relative(file)
        return None if rel is None else os.path.join(self.notebook, rel)

    def _retry(self, name: str, path: Any, *args: Any, **kwargs: Any) -> Any:
        """``os.<name>(path, ...)``, tried in the notebook's view when it misses."""
        __tracebackhide__ = True
        call = self._os[name]
        path = self.aliased(path)
        try:
            return call(path, *args, **kwargs)
        except FileNotFoundError:
            # A name relative to another folder (dir_fd) is not the workspace's.
            alt = None if kwargs.get("dir_fd") is not None else self.in_notebook(path)
            if alt is None:
                raise
            try:
                return call(os.fsencode(alt) if isinstance(path, bytes) else alt,
                            *args, **kwargs)
            except (FileNotFoundError, NotADirectoryError):
                pass
            raise

    def stat(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        """``os.stat`` over the workspace and, where it misses, the notebook's view."""
        __tracebackhide__ = True
        return self._retry("stat", path, *args, **kwargs)

    def lstat(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        """``os.lstat``, as :meth:`stat`."""
        __tracebackhide__ = True
        return self._retry("lstat", path, *args, **kwargs)

    def listdir(self, path: Any = ".") -> Any:
        """``os.listdir``: the workspace folder's names, then those only the notebook's view
        of the same folder has."""
        __tracebackhide__ = True
        listdir = self._os["listdir"]
        path = self.aliased(path)
        alt = self.in_notebook(path)
        try:
            names = listdir(path)
        except FileNotFoundError:
            if alt is None:
                raise
            try:
                return listdir(os.fsencode(alt) if isinstance(path, bytes) else alt)
            except (FileNotFoundError, NotADirectoryError):
                pass
            raise
        if alt is None:
            return names
        try:
            more = listdir(os.fsencode(alt) if isinstance(path, bytes) else alt)
        except OSError:
            return names
        seen = set(names)
        return names + [name for name in more if name not in seen]

    def scandir(self, path: Any = ".") -> Any:
        """``os.scandir``, as :meth:`listdir` (entries of names the workspace has first)."""
        __tracebackhide__ = True
        scandir = self._os["scandir"]
        path = self.aliased(path)
        alt = self.in_notebook(path)
        try:
            first = scandir(path)
        except FileNotFoundError:
            if alt is None:
                raise
            try:
                return scandir(os.fsencode(alt) if isinstance(path, bytes) else alt)
            except (FileNotFoundError, NotADirectoryError):
                pass
            raise
        if alt is None:
            return first
        try:
            second = scandir(os.fsencode(alt) if isinstance(path, bytes) else alt)
        except OSError:
            return first
        return _Entries([first, second])

    def _aliased_call(self, name: str) -> Callable[..., Any]:
        """``os.<name>`` with its path arguments aliased (see :meth:`aliased`)."""
        call = self._os[name]

        def aliased(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            return call(*(self.aliased(a) for a in args), **kwargs)

        aliased.__name__ = aliased.__qualname__ = name
        aliased.__doc__ = call.__doc__
        return aliased

    def relative(self, file: Any) -> str | None:
        """``file``'s path relative to the workspace folder, or None when it is not a path
        in it (a file descriptor, a path elsewhere, the folder itself)."""
        if isinstance(file, int) or not isinstance(file, (str, bytes, os.PathLike)):
            return None
        try:
            path = os.fsdecode(os.fspath(file))
        except (TypeError, ValueError):
            return None
        full = os.path.normpath(os.path.join(os.getcwd(), path))
        if not full.startswith(self.workspace.rstrip("/") + "/"):
            return None
        return full[len(self.workspace.rstrip("/")) + 1:]

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """``open``, trying the notebook's folder for a read that misses in the workspace."""
        __tracebackhide__ = True
        file = self.aliased(file)
        try:
            return self._open(file, mode, *args, **kwargs)
        except FileNotFoundError:
            if not self.notebook or not self.in_cell():
                raise
            if any(c in str(mode) for c in "wax+"):
                return self._write_beside(file, mode, *args, **kwargs)
            rel = self.relative(file)
            if rel is None:
                raise
            try:
                return self._open(os.path.join(self.notebook, rel), mode, *args, **kwargs)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
            raise

    def _write_beside(self, file: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
        """A write into a folder that only the notebook's view has (listings show it, so a
        cell does not make it first): the folder is made in the workspace, and the file is
        written there."""
        __tracebackhide__ = True
        rel = self.relative(file)
        parent = os.path.dirname(rel) if rel else ""
        if not parent or not os.path.isdir(os.path.join(self.notebook, parent)):
            return self._open(file, mode, *args, **kwargs)
        # Folder by folder with the interpreter's own mkdir: os.makedirs would take the
        # notebook's folders for the workspace's (listings show both) and make none.
        mkdir, made = self._os["mkdir"], self.workspace
        for part in parent.split("/"):
            made = os.path.join(made, part)
            with contextlib.suppress(FileExistsError):
                mkdir(made)
        return self._open(file, mode, *args, **kwargs)

    def note(self, exc: BaseException) -> str:
        """The hint for ``exc`` ("" when there is none to give)."""
        if not isinstance(exc, FileNotFoundError):
            return ""
        rel = self.relative(exc.filename) if exc.filename is not None else None
        if rel is None:
            return self._elsewhere(exc.filename)
        left = [(path, why) for path, why in self.left_out.items()
                if path == rel or path.startswith(rel.rstrip("/") + "/")]
        if left:
            named = ", ".join(path for path, _ in left[:_NAMED])
            more = f" and {len(left) - _NAMED} more" if len(left) > _NAMED else ""
            return (f"tierkernel: {named}{more} is in the notebook's folder but this tier was "
                    f"not given it ({left[0][1]}). Copy it into the workspace from a native "
                    f"cell, e.g. fs.write_file({rel!r}, open({rel!r}, 'rb').read()), or raise "
                    "the limit.")
        if self.refused:
            return (f"tierkernel: this tier reads files from the workspace ({self.workspace}); "
                    f"the notebook's folder is not shown to it because {self.refused}. If "
                    f"{rel!r} is next to the notebook, copy it into the workspace from a "
                    f"native cell: fs.write_file({rel!r}, open({rel!r}, 'rb').read()), or "
                    "keep the notebook and its data in a folder of their own.")
        if self.notebook and os.path.exists(os.path.join(self.notebook, rel)):
            return (f"tierkernel: {rel!r} is in the notebook's folder, which this tier reads "
                    f"at {self.notebook}{self.view_note}, read-only: writes go to the "
                    "workspace (make its folder there first, e.g. os.makedirs(...)).")
        if self.notebook:
            return (f"tierkernel: not in the workspace ({self.workspace}) nor in the "
                    f"notebook's folder, which this tier reads at {self.notebook}"
                    f"{self.view_note}.")
        return ""


    def _elsewhere(self, filename: Any) -> str:
        """The hint for an absolute path outside the workspace, in a tier that sees no host
        files ("" elsewhere)."""
        if not self.isolated or not isinstance(filename, (str, bytes, os.PathLike)):
            return ""
        try:
            path = os.fsdecode(os.fspath(filename))
        except (TypeError, ValueError):
            return ""
        if not path.startswith("/") or (self.notebook and path.startswith(self.notebook)):
            return ""
        seen = f"{self.workspace}" + (f" and, read-only, {self.notebook}" if self.notebook
                                      else "")
        return (f"tierkernel: this tier does not see the host's files, only {seen}: use a "
                "path relative to the notebook, e.g. 'data/file.csv'.")


#: The os functions :func:`install` replaces (see NotebookFiles).
_OS_NAMES = ("stat", "lstat", "listdir", "scandir", "mkdir", "remove", "unlink", "rename",
             "replace", "rmdir", "chdir")


class _Entries:
    """``os.scandir``'s iterator over two folders: each name once, the first folder's first."""

    def __init__(self, iterators: list[Any]) -> None:
        self._iterators = iterators
        self._seen: set[Any] = set()

    def __iter__(self) -> _Entries:
        return self

    def __next__(self) -> Any:
        while self._iterators:
            try:
                entry = next(self._iterators[0])
            except StopIteration:
                self._iterators.pop(0).close()
                continue
            if entry.name not in self._seen:
                self._seen.add(entry.name)
                return entry
        raise StopIteration

    def close(self) -> None:
        """Close both folders' iterators."""
        for iterator in self._iterators:
            iterator.close()
        self._iterators = []

    def __enter__(self) -> _Entries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install(agent: Any, config: dict[str, Any]) -> NotebookFiles:
    """Set the tier's interpreter up (see the module): the ``fsx://`` hook, the notebook
    folder's read-only fall-back (``open``), its place on ``sys.path`` after the workspace's,
    and the hint (``agent.error_note``)."""
    files = NotebookFiles(config)
    hook = FsspecHook(files.workspace)
    # Installed again (a new config): the earlier hook goes (a class of an earlier exec).
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "FsspecHook"]
    if "fsspec" in sys.modules:
        hook.register(sys.modules["fsspec"])
    else:
        sys.meta_path.insert(0, hook)
    # Only while a cell's code runs: the agent's own walks of the workspace, around cells,
    # must see the workspace alone (or they would copy the notebook's files into it).
    files.in_cell = lambda: bool(getattr(agent, "in_cell", False))
    # Installed again (a new config): the interpreter's own functions first.
    builtins.open = io.open = files._open
    for name, call in files._os.items():
        setattr(os, name, call)
    if files.notebook or files.alias:
        builtins.open = files.open
        io.open = files.open  # pathlib opens through io.open
        os.stat, os.lstat = files.stat, files.lstat
        os.listdir, os.scandir = files.listdir, files.scandir
    if files.alias:
        for name in ("mkdir", "remove", "unlink", "rename", "replace", "rmdir", "chdir"):
            if name in files._os:
                setattr(os, name, files._aliased_call(name))
    # What the originals support, the replacements pass on (shutil.rmtree and friends ask).
    for name, original in files._os.items():
        replacement = getattr(os, name)
        if replacement is not original:
            supported: set[Any]
            for supported in (getattr(os, kind, set()) for kind in (
                    "supports_dir_fd", "supports_fd", "supports_follow_symlinks",
                    "supports_effective_ids")):
                if original in supported:
                    supported.add(replacement)
    if files.notebook and files.notebook not in sys.path:
        # After "" (the workspace): the notebook's own modules import as in native; last
        # where "" is not on the path, so they never hide the standard library.
        at = sys.path.index("") + 1 if "" in sys.path else len(sys.path)
        sys.path.insert(at, files.notebook)
    agent.error_note = files.note
    return files
