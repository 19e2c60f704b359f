"""The interpreter agent that runs cells inside an isolated tier.

Standard library only: it runs in any Python 3.9+ (a child process, a container image).

Protocol: one JSON object per line. The host writes requests on the agent's stdin; the agent
writes messages on the stdout it was started with (kept on a private descriptor, because the
cell's own fd 1 and 2 are redirected into pipes so that C extensions and ``!cmd`` subprocesses
are captured too). In the sandbox tier both directions use one unix socket of the host's
instead (see SOCKET_ENV).

The messages (their ``type`` names and fields) are listed in ``guest/protocol.py``, whose
names both sides use; see there how each guest gets that module.

Interrupts arrive as SIGINT and become KeyboardInterrupt in the cell, and only in the cell: a
SIGINT between cells is ignored, so the agent's own bookkeeping is never torn.
"""

from __future__ import annotations

import ast
import base64
import builtins
import codecs
import contextlib
import importlib.machinery
import io
import json
import linecache
import os
import re
import signal
import sys
import threading
import time
import traceback
import types

# Imports cost at every agent start, and under gVisor each module is 1-5 ms of file lookups:
# typing and importlib.abc (which pulls in importlib.resources, tempfile, pathlib...: 35 ms
# there) are not imported; the finders below need only the protocol's methods.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The guest modules the agent itself imports at start (``guest/NAME.py``), before any request
#: could bring them. The host's other guest modules come later, as sources in requests.
STARTUP_MODULES = ("protocol",)
#: The sources of STARTUP_MODULES, by name, when the host put them into the agent's program
#: (see :func:`agent_program`); empty when the agent runs from its file.
PRELOADED: dict[str, str] = globals().get("PRELOADED") or {}


def guest_module(name: str) -> types.ModuleType:
    """This guest's copy of ``guest/NAME.py`` (one of STARTUP_MODULES), loaded once as
    ``tierkernel_NAME``: a private name, so a cell's own module called NAME is never it, as
    for the modules the host sends later (:meth:`Agent.install_module`). Its source is the
    one the host put into the program (the sandbox's ``python3 -c``: no file beside it), else
    the file beside this one (the process tier; the wasm tier's read-only guest folder)."""
    loaded = sys.modules.get(f"tierkernel_{name}")
    if loaded is not None:
        return loaded
    source = PRELOADED.get(name)
    if source is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        with open(path, encoding="utf-8") as f:
            source = f.read()
    module = types.ModuleType(f"tierkernel_{name}")
    exec(compile(source, f"<tierkernel {name}>", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


def agent_program() -> str:
    """This agent as one program for ``python3 -c``, with the sources of STARTUP_MODULES in
    it: the sandbox tier starts the agent that way, so that the agent in a container is
    always the kernel's own and no file of tierkernel has to be in the image. Called on the
    host, at each agent start (an edited agent is used by the next one)."""
    folder = os.path.dirname(os.path.abspath(__file__))
    sources = {}
    for name in ("agent", *STARTUP_MODULES):
        with open(os.path.join(folder, f"{name}.py"), encoding="utf-8") as f:
            sources[name] = f.read()
    agent = sources.pop("agent")
    # Right after the __future__ import, which must stay the program's first statement.
    future = "from __future__ import annotations\n"
    head, found, rest = agent.partition(future)
    if not found:
        raise RuntimeError(f"guest/agent.py must start with {future!r}")
    return f"{head}{found}PRELOADED = {sources!r}\n{rest}"


# The protocol's names, shared with the host (see guest/protocol.py). The host imports this
# module from the package (tierkernel.guest.agent) and gets the package's protocol module.
if TYPE_CHECKING or __package__:
    from tierkernel.guest import protocol
else:
    protocol = guest_module("protocol")

MPL_BACKEND_MODULE = "_tierkernel_inline"
MARKER_PREFIX = "\x00tierkernel-drain-"
#: The flag of a code object that must be awaited (inspect.CO_COROUTINE, not imported here).
CO_COROUTINE = 0x80

# The inline matplotlib backend: Agg rendering, and show() hands each figure to the cell's
# output as PNG right away (like IPython's inline backend).
_MPL_BACKEND_SOURCE = '''
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401
from matplotlib.backend_bases import FigureManagerBase as FigureManager  # noqa: F401
import builtins as _b

def show(*args, **kwargs):
    _b.__tierkernel_agent__.flush_figures()
'''


class _InlineBackendFinder:
    """Makes ``module://_tierkernel_inline`` importable without a file on disk."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == MPL_BACKEND_MODULE:
            return importlib.machinery.ModuleSpec(fullname, self)  # type: ignore[arg-type]
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        exec(compile(_MPL_BACKEND_SOURCE, "<tierkernel inline backend>", "exec"), module.__dict__)


#: Set by a tier whose MPLCONFIGDIR starts empty (the sandbox's, in its writable /tmp): a
#: folder with a prebuilt matplotlib font cache, copied there when a cell first imports
#: matplotlib instead of at every agent start (two process starts under gVisor: 20-40 ms).
MPL_SEED_ENV = "TIERKERNEL_MPL_SEED"


_seed_lock = threading.Lock()


def seed_matplotlib_config() -> None:
    """Fill MPLCONFIGDIR from MPL_SEED_ENV, once, unless it exists already."""
    with _seed_lock:
        seed, config = os.environ.get(MPL_SEED_ENV), os.environ.get("MPLCONFIGDIR")
        if seed and config and not os.path.exists(config):
            import shutil

            with contextlib.suppress(OSError):
                shutil.copytree(seed, config)


class _MatplotlibConfigSeeder:
    """First on ``sys.meta_path``: makes sure MPLCONFIGDIR is seeded before ``matplotlib``
    is first imported in the agent (the agent also seeds it in a thread once it is ready, for
    the subprocesses of ``!python script.py``), and finds nothing itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "matplotlib":
            seed_matplotlib_config()  # once done, only an exists() each later import
        return None  # the usual finders import it


class Channel:
    """The protocol stream to the host: whole JSON lines, one writer at a time.

    A SIGINT that arrives while the main thread is writing is held back until the line is out
    (:attr:`deferring`/:attr:`pending`), so an interrupt never leaves half a message behind.
    """

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self.deferring = False
        self.pending = False
        #: The agent's own pid: a process forked by a cell (os.fork, a fork bomb) inherits the
        #: channel but must never write to it, or its messages would corrupt the protocol.
        self.owner = os.getpid()

    @property
    def forked(self) -> bool:
        """Whether this process is a fork of the agent made by a cell, not the agent."""
        return os.getpid() != self.owner

    def send(self, msg: dict[str, Any]) -> None:
        if self.forked:
            return
        data = (json.dumps(msg, default=repr) + "\n").encode("utf-8", "replace")
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.deferring = True
        try:
            with self._lock:
                view = memoryview(data)
                while view:
                    written = self._out.write(view)
                    view = view[written or 0 :]
        finally:
            if main:
                self.deferring = False
                if self.pending:
                    self.pending = False
                    raise KeyboardInterrupt


class CellStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a cell: each write goes to the host at once.

    Writes are sent whole lines at a time when they end a line, so a print shows up in the
    notebook while the cell is still running; partial lines are sent by the flusher thread.
    """

    def __init__(self, agent: Agent, name: str) -> None:
        self._agent = agent
        self.name = name
        self._buf: list[str] = []
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1 if self.name == "stdout" else 2

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            self._buf.append(text)
            pending = "\n" in text or sum(map(len, self._buf)) > 8192
        if pending:
            self.flush()
        return len(text)

    def flush(self) -> None:
        # Taking and sending under one lock keeps the flusher thread from reordering text or
        # sending it after the main thread has reported the cell done.
        with self._lock:
            text = "".join(self._buf)
            self._buf.clear()
            if text:
                self._agent.emit_stream(self.name, text)


class StdinNotImplementedError(NotImplementedError):
    """``input()``/``getpass()`` in a cell whose client does not allow input (IPython's
    exception of this name, which the native tier raises; the guest has no IPython to
    import it from)."""


# Shown by its bare name in tracebacks, as IPython's is, not as ``agent.`` or ``__main__.``.
StdinNotImplementedError.__module__ = "builtins"


#: The errors an ``input_reply`` may name; anything else is raised as RuntimeError.
_INPUT_ERRORS: dict[str, type[BaseException]] = {
    name: StdinNotImplementedError if name == protocol.STDIN_NOT_IMPLEMENTED
    else getattr(builtins, name)
    for name in protocol.INPUT_ERROR_TYPES
}


def input_value(reply: Any) -> str:
    """The text of an ``input_reply`` (see the module's protocol), or the error it names."""
    __tracebackhide__ = True
    if not isinstance(reply, dict):
        raise RuntimeError(f"input(): the kernel sent an unreadable answer: {reply!r:.200}")
    error = reply.get("error")
    if error is not None:
        error = error if isinstance(error, dict) else {"message": str(error)}
        kind = _INPUT_ERRORS.get(str(error.get("type")), RuntimeError)
        raise kind(str(error.get("message", ""))) from None
    value = reply.get("value")
    if not isinstance(value, str):
        raise RuntimeError(f"input(): the kernel sent an unreadable answer: {reply!r:.200}")
    return value


class CellStdin(io.TextIOBase):
    """``sys.stdin`` of a cell: each line read is asked of the user, as ``input()`` is.

    ``readline()`` (and iteration) asks for one line and returns it with its newline. A
    notebook has no way to type an end of input, so an empty answer reads as EOF (``""``),
    which ends ``for line in sys.stdin``; ``read()`` asks for lines up to that. When the
    client takes no input (nbclient, papermill), stdin reads as empty, as a native cell's
    does. Nothing is read from the process's fd 0, which is /dev/null: the protocol is
    elsewhere.
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        #: Binary reads (``sys.stdin.buffer``) find an empty stream: the user's answers are
        #: text.
        self.buffer = io.BytesIO()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        __tracebackhide__ = True
        try:
            answer = self._agent.ask_input("", False)
        except (EOFError, StdinNotImplementedError):
            return ""
        line = answer + "\n" if answer else ""
        return line if size is None or size < 0 else line[:size]

    def read(self, size: int | None = -1) -> str:
        """Lines up to the end of input (an empty answer)."""
        __tracebackhide__ = True
        lines = []
        while True:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            if size is not None and 0 <= size <= sum(map(len, lines)):
                break
        text = "".join(lines)
        return text if size is None or size < 0 else text[:size]


class _GetpassPatcher:
    """On ``sys.meta_path``: when a cell first imports ``getpass`` (not imported at agent
    start, where every module costs), its ``getpass()`` becomes the agent's, which asks
    through the kernel with ``password=True``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "getpass":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader, agent = spec.loader, self.agent

        class Patching:
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                module.getpass = agent.getpass

        spec.loader = Patching()  # type: ignore[assignment]
        return spec


#: The globals of the modules whose frames a traceback never shows (see user_traceback):
#: this agent's, and those that register themselves (helpers, the wasm agent).
OWN_GLOBALS: list[dict[str, Any]] = [globals()]


def _own_frame(frame: Any) -> bool:
    """Whether ``frame`` is tierkernel's plumbing: code of an own module, or a frame that
    hides itself as IPython's tracebacks let it (``__tracebackhide__``, the helpers')."""
    if any(frame.f_globals is own for own in OWN_GLOBALS):
        return True
    try:
        return bool(frame.f_code.co_name != "<module>"
                    and frame.f_locals.get("__tracebackhide__"))
    except Exception:  # an odd frame: shown
        return False


def user_traceback(tb: Any, filename: str | None,
                   glue: Callable[[Any], bool] | None = None) -> Any:
    """``tb`` with tierkernel's own frames left out, as IPython leaves out its internals: the
    frames before the cell's (``filename``; None: keep them) and every frame of the agent and
    the helpers after it (a helper's error, an interrupt or timeout raised in the agent's
    handler), so the user sees their lines and the error. At least one frame stays."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if filename is not None:
        first = next((i for i, t in enumerate(frames)
                      if t.tb_frame.f_code.co_filename == filename), len(frames))
        frames = frames[first:]
    # ``glue``: frames the caller also leaves out (IPython's between a cell and a magic).
    kept = [t for i, t in enumerate(frames)
            if i == 0 or not (_own_frame(t.tb_frame) or (glue is not None and glue(t.tb_frame)))]
    if kept and _own_frame(kept[0].tb_frame) and len(frames) > 1:
        kept = kept[1:] or [frames[-1]]
    trimmed = None
    for t in reversed(kept):
        trimmed = types.TracebackType(trimmed, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return trimmed


class Agent:
    """Runs cells in one namespace and reports their output over the channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.cell_id: str | None = None
        self.in_cell = False
        self.stdout = CellStream(self, "stdout")
        self.stderr = CellStream(self, "stderr")
        self._fd_readers: dict[str, _FdPump] = {}
        #: The write end of each capture pipe, by the fd it serves (see restore_streams).
        self._fd_saved: dict[int, int] = {}
        #: Which pipe each of them is (see _capture_intact).
        self._fd_pipes: dict[int, tuple[int, int] | None] = {}
        self._sent_result = False
        #: A line added to a cell's error (guest/files.py's hint on FileNotFoundError).
        self.error_note: Any = lambda exc: ""
        #: The host's request stream (set by main()); helper answers are read from it.
        self.requests: Any = None
        self._host_lock = threading.Lock()
        self._host_seq = 0
        #: The watched folder's state when the last cell ended (see tree_mark).
        self._last_tree: tuple[str, int] | None = None
        #: An inotify TreeWatch of the watched folder, once the host sent one (install_watch).
        self._watch: Any = None
        #: The processes that were there before any cell (docker-init, the container's
        #: keeper, this agent): their memory maps are never the cells'.
        self._infra_pids: set[str] = set()
        #: The cells' writable shared maps of watched files made through Python's mmap
        #: (see _track_mmaps), and whether this process's maps must be read instead.
        self._live_maps: Any = ()
        self._read_own_maps = False
        #: Line magics the agent provides itself (``%pip``: see pip_magic.py); registered into
        #: the IPython shell when it is made (they win over IPython's of the same name).
        self.line_magics: dict[str, Callable[[str], object]] = {}
        #: IPython's In and Out, kept for every cell whether or not IPython is loaded, indexed
        #: by the kernel's execution count (see _store_input/_store_output).
        self.history_in: list[str] = [""]
        self.history_out: dict[int, Any] = {}
        self.execution_count = 0
        self._last_input = ""
        #: Names the agent defines in the namespace (hidden from %who).
        self.hidden_names: set[str] = {"In", "Out"}
        #: Where the frames of the glue between a cell and IPython's magics live (set when
        #: the shell is made); tracebacks leave them out.
        self.hidden_frames: tuple[str, ...] = ()
        #: The globals of the agent's own modules (this one, the helpers, ishell): their
        #: frames are left out of tracebacks too (by identity: the sandbox's agent source
        #: has no file name of its own).
        self.glue_globals: set[int] = {id(globals())}
        self.mpl_backend = MPL_BACKEND_MODULE
        #: The guest module ishell (sent by the host) and its ShellLoader, once installed.
        self.ishell: Any = None
        self.shell_loader: Any = None
        #: The event loop of cells with a top-level await, kept across cells.
        self._loop: Any = None
        self.seed_namespace()
        if hasattr(os, "register_at_fork"):  # absent where processes cannot fork (WASI)
            os.register_at_fork(after_in_child=self._after_fork_in_child)
        _tag_threads(self)

    #: The tier's name, for messages (the sandbox agent watches a folder; see WATCH_ENV).
    @property
    def tier(self) -> str:
        return "sandbox" if os.environ.get(WATCH_ENV) else "process"

    #: Whether cells can start processes here (``!cmd``, ``%%bash``).
    has_processes = True

    def seed_namespace(self) -> None:
        """Put IPython's In and Out in the cell namespace (the agent keeps them up to date)."""
        self.namespace["In"] = self.history_in
        self.namespace["Out"] = self.history_out

    # -- IPython --------------------------------------------------------------------------
    def use_ishell(self, module: Any, background: bool) -> None:
        """Use the guest module ishell for IPython syntax; ``background``: start importing
        IPython in a thread now, so the first magic cell rarely waits for it."""
        loader = module.ShellLoader(self, self.tier, self.has_processes)
        if background:
            loader.start_import()
        self.ishell = module
        self.glue_globals.add(id(module.__dict__))
        self.shell_loader = loader

    def ipython(self, wait: bool = True) -> Any:
        """The agent's IPython ``InteractiveShell`` (made once; its user namespace is the
        agent's), or None when IPython cannot be imported in this guest. ``wait`` false:
        None rather than waiting while IPython is still being imported."""
        loader = self.shell_loader
        if loader is None and self._ishell_ready is not None:
            if not wait:
                return None
            self._ishell_ready.wait()
            loader = self.shell_loader
        return None if loader is None else loader.get(wait)

    def get_ipython(self) -> Any:
        """The ``get_ipython()`` builtin of the cells."""
        return self.ipython()

    #: Set while ishell is being loaded in the background (see install_module).
    _ishell_ready: threading.Event | None = None

    def install_module(self, name: str, source: str) -> None:
        """Load a stdlib-only guest module the host sent as source (``tierkernel_NAME``).

        ishell is compiled in the thread that then imports IPython: neither is on the way
        to the first cell (compiling it alone takes milliseconds)."""
        if name == "ishell":
            self._ishell_ready = threading.Event()
            threading.Thread(target=self._load_ishell, args=(source,), daemon=True,
                             name="ipython-import").start()
            return
        self._load_module(name, source)

    def _load_module(self, name: str, source: str) -> Any:
        module = types.ModuleType(f"tierkernel_{name}")
        # In sys.modules while it runs, as an import would have it: dataclasses look their
        # module up there.
        sys.modules[module.__name__] = module
        try:
            exec(compile(source, f"<tierkernel {name}>", "exec"), module.__dict__)
        except BaseException:
            del sys.modules[module.__name__]
            raise
        return module

    def _load_ishell(self, source: str) -> None:
        assert self._ishell_ready is not None
        try:
            module = self._load_module("ishell", source)
            loader = module.ShellLoader(self, self.tier, self.has_processes)
            loader.claim_import()  # before anyone sees the loader: none imports beside it
            self.ishell = module
            self.glue_globals.add(id(module.__dict__))
            self.shell_loader = loader
        except Exception as exc:  # cells still run; IPython syntax is a SyntaxError
            self.channel.send({"type": protocol.PROTOCOL_ERROR,
                               "detail": f"could not install IPython support: {exc!r}"})
            return
        finally:
            self._ishell_ready.set()
        loader.run_import()

    def cell_of_caller(self) -> str | None:
        """The id of the cell whose code started the calling thread (the running cell's for
        the main thread; None for a thread the agent started itself, or one started without
        ``threading``). Helper calls are tagged with it (see :meth:`call_host`)."""
        if threading.current_thread() is threading.main_thread():
            return self.cell_id
        return getattr(threading.current_thread(), "_tierkernel_cell", None)

    def _after_fork_in_child(self) -> None:
        # Only the forking thread survives a fork; a lock another thread (the flusher) held at
        # that moment would stay held forever in the child, and the child would hang on its
        # first print instead of ending (a fork bomb would then never let go of the pids).
        for stream in (self.stdout, self.stderr):
            stream._lock = threading.Lock()
        for pump in self._fd_readers.values():
            pump._lock = threading.Lock()
        global _seed_lock
        _seed_lock = threading.Lock()

    # -- output ---------------------------------------------------------------------------
    def emit_stream(self, name: str, text: str) -> None:
        if self.channel.forked:
            # A forked child's prints go through fd 1/2, which the agent's pumps forward.
            os.write(1 if name == "stdout" else 2, text.encode("utf-8", "replace"))
            return
        # In pieces of a million characters: a message line stays far below the host's line
        # limit even when JSON escapes every character (12 bytes for one outside the BMP).
        for start in range(0, len(text), 1 << 20):
            self.channel.send({"type": protocol.STREAM, "id": self.cell_id, "name": name,
                               "text": text[start:start + (1 << 20)]})

    def display(self, *objs: Any, **kwargs: Any) -> None:
        """The ``display()`` builtin of a cell: each object as a rich output (through the
        IPython shell's display publisher once there is a shell, so ``%%capture`` sees it)."""
        self._flush_text()
        shell = self.shell_loader.shell if self.shell_loader is not None else None
        for obj in objs:
            data, metadata = mime_bundle(obj, raw=bool(kwargs.get("raw")))
            if shell is not None:
                shell.display_pub.publish(data=data, metadata=metadata)
            else:
                self.send_display(data, metadata)

    def send_display(self, data: Any, metadata: Any, **kwargs: Any) -> None:
        """Send one rich output to the notebook."""
        self._flush_text()
        self.channel.send({"type": protocol.DISPLAY, "id": self.cell_id, "data": data,
                           "metadata": metadata})

    def clear_output(self, wait: bool = False) -> None:
        """The ``clear_output()`` builtin of a cell."""
        shell = self.shell_loader.shell if self.shell_loader is not None else None
        if shell is not None:
            shell.display_pub.clear_output(wait)
        else:
            self.send_clear_output(wait)

    def send_clear_output(self, wait: bool = False) -> None:
        """Clear the cell's output in the notebook."""
        self._flush_text()
        self.channel.send({"type": protocol.CLEAR_OUTPUT, "id": self.cell_id, "wait": bool(wait)})

    def flush_figures(self) -> None:
        """Send every open matplotlib figure as PNG and close it (inline backend's show)."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        # %config InlineBackend.figure_format (png, retina, svg, jpeg), when it was set.
        fmt, options = self.ishell.figure_format() if self.ishell is not None else ("png", {})
        for num in list(pyplot.get_fignums()):
            fig = pyplot.figure(num)
            buf = io.BytesIO()
            kwargs = {"bbox_inches": "tight", **options}
            if fmt == "retina":
                kwargs["dpi"] = 2 * fig.dpi
            try:
                fig.savefig(buf, format={"retina": "png"}.get(fmt, fmt), **kwargs)
            except Exception as exc:  # a broken figure must not lose the cell's other output
                self.stderr.write(f"could not render figure {num}: {exc}\n")
                continue
            finally:
                pyplot.close(fig)
            width, height = fig.get_size_inches() * fig.dpi
            data = buf.getvalue()
            mime = {"svg": "image/svg+xml", "jpeg": "image/jpeg"}.get(fmt, "image/png")
            metadata: dict[str, Any] = {}
            if fmt == "retina" and data[12:16] == b"IHDR":
                # Shown at half its pixel size, as IPython's retina figures are.
                metadata = {mime: {"width": int.from_bytes(data[16:20], "big") // 2,
                                   "height": int.from_bytes(data[20:24], "big") // 2}}
            self.display(
                _RawBundle(
                    {
                        mime: data.decode("utf-8") if fmt == "svg"
                        else base64.b64encode(data).decode("ascii"),
                        "text/plain": f"<Figure size {width:g}x{height:g} with "
                        f"{len(fig.axes)} Axes>",
                    },
                    metadata,
                )
            )

    def _flush_text(self) -> None:
        self.stdout.flush()
        self.stderr.flush()

    # -- runtime helpers (ai, api, db, console) ---------------------------------------------
    def install_helpers(self, source: str, packages_source: str | None = None,
                        packages_site: str | None = None) -> None:
        """Define ``ai``, ``api``, ``db`` and ``console`` in the cell namespace.

        The host sends the stdlib-only module ``tierkernel/guest/helpers.py`` as source (no
        file needs to exist in the guest); every call goes back to the host (:meth:`call_host`),
        which checks the policy and runs the helper there, so no secret enters the guest.
        With ``packages_source`` (``pip_magic.py``) it also sets up ``%pip``, whose packages
        the host copies into ``packages_site``.
        """
        module = types.ModuleType("tierkernel_helpers")
        exec(compile(source, "<tierkernel helpers>", "exec"), module.__dict__)
        sys.modules["tierkernel_helpers"] = module
        before = set(self.namespace)
        OWN_GLOBALS.append(module.__dict__)
        module.install(self.namespace, self.call_host)
        self.hidden_names |= set(self.namespace) - before
        self.glue_globals.add(id(module.__dict__))
        if packages_source and packages_site:
            pip = types.ModuleType("tierkernel_pip")
            exec(compile(packages_source, "<tierkernel pip>", "exec"), pip.__dict__)
            sys.modules["tierkernel_pip"] = pip
            pip.install(self, self.call_host, packages_site, copy_in=True, tier="sandbox")

    def install_files(self, source: str, config: dict[str, Any]) -> None:
        """Set up ``fsx://`` URLs, the notebook folder's read-only fall-back and the hint
        on a missing file (``tierkernel/guest/files.py``, sent as source like the helpers)."""
        module = types.ModuleType("tierkernel_files")
        exec(compile(source, "<tierkernel files>", "exec"), module.__dict__)
        sys.modules["tierkernel_files"] = module
        module.install(self, config)

    def call_host(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one helper request to the host and wait for its answer (a cell's thread).

        The protocol's request stream is only read between cells by the main loop, so a
        cell's thread may read the answer from it directly; one call at a time, and none
        across a cell's end (see execute).

        The request is tagged with the cell whose code started the calling thread: the host
        answers only the running cell's calls, so a thread left behind by an earlier cell is
        refused (and the refusal is recorded under that cell), never run with the running
        cell's permissions. Between cells nothing is sent at all.
        """
        if self.channel.forked:
            raise RuntimeError("ai/api/db/console are not available in a forked child process")
        origin = self.cell_of_caller()
        with self._host_lock:
            if self.cell_id is None:
                raise PermissionError(f"{protocol.BACKGROUND_REFUSED}: ai/api/db/console can "
                                      "only be called while a cell runs")
            if origin != self.cell_id:
                # Told to the host, which records the refusal under the cell that started the
                # thread, but never waited for: no answer is read outside the caller's cell.
                self.channel.send({"type": protocol.HELPER, "id": origin, "seq": None,
                                   "request": request})
                raise PermissionError(f"{protocol.BACKGROUND_REFUSED}: this thread was started "
                                      "by an earlier cell; call ai/api/db/console from the cell "
                                      "that needs them (threads and thread pools it starts may "
                                      "call them while it runs)")
            self._host_seq += 1
            seq = self._host_seq
            self._flush_text()  # output printed before the call shows before its effects
            self.channel.send({"type": protocol.HELPER, "id": origin, "seq": seq,
                               "request": request})
            while True:
                line = self.requests.readline() if self.requests is not None else b""
                if not line:
                    raise ConnectionError("the kernel went away during a helper call")
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("type") == protocol.HELPER_RESULT and msg.get("seq") == seq:
                    response = msg.get("response")
                    return response if isinstance(response, dict) else {}

    # -- stdin (input, getpass, sys.stdin) --------------------------------------------------
    def install_stdin(self) -> None:
        """Make ``input()``, ``getpass.getpass()`` and ``sys.stdin`` ask the user through the
        kernel (Jupyter's stdin channel), as in a native cell."""
        builtins.input = self.input
        sys.stdin = CellStdin(self)
        getpass = sys.modules.get("getpass")
        if getpass is not None:
            getpass.getpass = self.getpass  # type: ignore[attr-defined]
        sys.meta_path.insert(0, _GetpassPatcher(self))

    def input(self, prompt: Any = "") -> str:
        """The ``input()`` builtin of a cell: the prompt shows in the notebook and the user's
        answer is returned (StdinNotImplementedError when the client takes no input)."""
        __tracebackhide__ = True
        return self.ask_input(str(prompt), False)

    def getpass(self, prompt: str = "", stream: Any = None, **kwargs: Any) -> str:
        """``getpass.getpass()`` of a cell: as :meth:`input`, the answer typed hidden."""
        __tracebackhide__ = True
        return self.ask_input(str(prompt), True)

    def ask_input(self, prompt: str, password: bool) -> str:
        """Ask the user for one line through the host and wait for it (a cell's thread).

        Read from the request stream by the waiting thread itself, as helper answers are
        (see :meth:`call_host`, whose lock it shares: one request to the host at a time).
        An interrupt ends the wait with KeyboardInterrupt: the host's SIGINT, or its answer.
        """
        __tracebackhide__ = True
        if self.channel.forked:
            raise EOFError("input() is not available in a forked child process")
        origin = self.cell_of_caller()
        with self._host_lock:
            if self.cell_id is None or origin != self.cell_id:
                raise RuntimeError("input() can only be called while its cell runs (not from "
                                   "a thread an earlier cell started)")
            self._host_seq += 1
            seq = self._host_seq
            self._flush_text()  # what was printed before the prompt shows before it
            self.channel.send({"type": protocol.INPUT_REQUEST, "id": origin, "seq": seq,
                               "prompt": prompt, "password": bool(password)})
            while True:
                try:
                    line = self.requests.readline() if self.requests is not None else b""
                except KeyboardInterrupt:
                    # ipykernel's words for the stop button during input(), without the wait
                    raise KeyboardInterrupt("Interrupted by user") from None
                if not line:
                    raise ConnectionError("the kernel went away while input() waited")
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("type") == protocol.INPUT_REPLY and msg.get("seq") == seq:
                    error = msg.get("error")
                    if (isinstance(error, dict) and error.get("type") == "KeyboardInterrupt"
                            and threading.current_thread() is threading.main_thread()):
                        # The cell was stopped, and the host's SIGINT is on its way (from a
                        # container it may take a moment): it ends this wait. Ended by this
                        # answer instead, the cell would end first and a later cell would
                        # get the signal. (The answer is for input() in another thread.)
                        continue
                    return input_value(msg)

    def reset_watch(self) -> None:
        """Take the watched folder as it is now as unchanged: the host has just copied files
        into it itself (or the agent just started), so they need not be copied back."""
        self._last_tree = self.tree_mark(maps=False)

    def changed_since_last_cell(self) -> bool:
        """Whether the watched folder changed since the last cell ended (or the host's last
        copy into it): a process a cell left running wrote there."""
        return self.tree_mark() != self._last_tree

    def tree_mark(self, maps: bool = True) -> tuple[str, int] | None:
        """The watched folder's state, to compare with an earlier one: an inotify event count
        when a watch is installed and trusted, else a signature from a walk of the tree (two
        marks of different kinds never compare equal: reported as a change, never missed).
        ``maps``: a file mapped for writing counts as a change (see tree_watch); needed only
        where a cell ends, since a map made and written within a cell is heard when its file
        is closed."""
        watched = os.environ.get(WATCH_ENV)
        if not watched:
            return None
        if self._watch is not None:
            version = self._watch.version(maps)
            if version is not None:
                return ("events", version)
            self._watch = None  # it gave up (an overflow it could not recover from): walk
        return ("walk", tree_signature(watched))

    def install_watch(self, source: str) -> None:
        """Watch the watched folder with inotify from now on, instead of walking it around
        every cell: ``source`` is the stdlib-only ``tierkernel/guest/tree_watch.py``. Where it
        cannot watch (see its ``why``), the walk stays."""
        watched = os.environ.get(WATCH_ENV)
        if not watched or self._watch is not None:
            return
        module = types.ModuleType("tierkernel_tree_watch")
        exec(compile(source, "<tierkernel tree watch>", "exec"), module.__dict__)
        fd = os.open(watched, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        # Keeps using fd (open for the agent's life). The memory maps looked at: those the
        # cells make through Python's mmap, known without reading /proc; and those of every
        # process a cell started (read from /proc).
        self._track_mmaps(watched, module)
        watch = module.TreeWatch(fd, watched, maps=self._maps_to_read, mapped=self._mapped)
        version = watch.version()
        if version is None:
            os.close(fd)
            return
        # Events count only from now. If the folder is as it was when the last cell ended,
        # the count is the new baseline; otherwise the old one stays, so the next cell still
        # reports what changed meanwhile.
        if self._last_tree == ("walk", tree_signature(watched)):
            self._last_tree = ("events", version)
        self._watch = watch

    def _track_mmaps(self, watched: str, tree_watch: Any) -> None:
        """Note each writable shared map of a watched file that a cell makes through Python's
        mmap (numpy.memmap does), by putting a subclass in place of ``mmap.mmap``. Maps made
        before (by the first cell, or by C code) are found by reading this process's maps,
        from then on, if there are any now."""
        import mmap
        import weakref

        live: weakref.WeakSet[Any] = weakref.WeakSet()
        prefix = watched.rstrip("/") + "/"
        base = mmap.mmap

        def shared_writable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
            names = ("flags", "prot", "access")
            given = {names[i]: args[i] for i in range(min(len(args), len(names)))}
            given.update((k, v) for k, v in kwargs.items() if k in names)
            access = given.get("access", mmap.ACCESS_DEFAULT)
            if access == mmap.ACCESS_WRITE:
                return True
            if access != mmap.ACCESS_DEFAULT:
                return False
            return bool(given.get("flags", mmap.MAP_SHARED) & mmap.MAP_SHARED
                        and given.get("prot", mmap.PROT_WRITE) & mmap.PROT_WRITE)

        class AnyMmap(type):
            # isinstance(x, mmap.mmap) stays true of maps made before (or by C code).
            def __instancecheck__(cls, obj: Any) -> bool:
                return isinstance(obj, base)

            def __subclasscheck__(cls, sub: Any) -> bool:
                return issubclass(sub, base)

        class TrackedMmap(base, metaclass=AnyMmap):  # type: ignore[valid-type,misc]
            def __new__(cls, fileno: int, length: int, *args: Any, **kwargs: Any) -> Any:
                made = super().__new__(cls, fileno, length, *args, **kwargs)
                if fileno >= 0 and shared_writable(args, kwargs):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/self/fd/{fileno}").startswith(prefix):
                            live.add(made)
                return made

        TrackedMmap.__name__ = TrackedMmap.__qualname__ = "mmap"
        TrackedMmap.__module__ = "mmap"
        mmap.mmap = TrackedMmap  # type: ignore[misc]
        self._live_maps = live
        self._read_own_maps = tree_watch.mapped_for_writing(prefix, ["/proc/self/maps"])

    def _mapped(self) -> bool:
        return any(not m.closed for m in self._live_maps)

    def _maps_to_read(self) -> list[str]:
        """The maps of the processes the cells started (and this one's, if it must)."""
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit()
                and pid not in self._infra_pids]
        return [f"/proc/{pid}/maps" for pid in pids] + (
            ["/proc/self/maps"] if self._read_own_maps else [])

    # -- running cells --------------------------------------------------------------------
    def execute(self, msg: dict[str, Any]) -> None:
        self.cell_id = msg.get("id")
        code = str(msg.get("code", ""))
        filename = str(msg.get("filename", "<cell>"))
        first_line = int(msg.get("first_line", 1))
        # The kernel's count of the cell (In[N], Out[N], _N); an older host sends none.
        count = msg.get("execution_count")
        self.execution_count = count if isinstance(count, int) else self.execution_count + 1
        success = True
        watched = os.environ.get(WATCH_ENV)
        before = self.tree_mark(maps=False)
        self.restore_streams()
        try:
            inputs, outputs = msg.get("inputs"), msg.get("outputs")
            lang = msg.get("lang")
            if lang in ("js", "ts"):
                success = self._run_js(code, str(lang), filename)
            elif inputs and not self._take_values(str(inputs), filename):
                success = False
            else:
                success = self._run(code, filename, first_line)
                if success and isinstance(outputs, list) and outputs:
                    self._send_values([str(name) for name in outputs],
                                      int(msg.get("values_limit") or 0))
        finally:
            if self.channel.forked:
                # A fork that ran to the end of the cell must not become a second agent
                # competing for requests: it ends with the cell.
                self._flush_text()
                os._exit(0 if success else 1)
            try:
                self.flush_figures()
            except BaseException as exc:  # report it; the agent must never die between cells
                self.stderr.write(f"could not render figures: {exc!r}\n")
            self._flush_text()
            # Before the drain, whose marker goes through fd 1 and 2: a cell that closed them
            # (and maybe opened a file that took their number) gets its pipes back first.
            self.restore_streams()
            self._drain_fds()
            # No helper call straddles the cell's end: one in flight (a thread of the cell's)
            # is answered first, and none starts after (call_host checks under the same lock).
            with self._host_lock:
                cell_id, self.cell_id = self.cell_id, None
            done: dict[str, Any] = {"type": protocol.DONE, "id": cell_id, "success": success}
            if os.environ.get(COUNT_PROCS_ENV):
                done["procs"], done["last_pid"] = count_processes()
            if watched:
                # Whether the host must copy the workspace back: it changed during the cell, or
                # since the last cell ended (a background process the cell left running).
                after = self.tree_mark()
                done["workspace_changed"] = after != before or before != self._last_tree
                self._last_tree = after
            self.channel.send(done)

    def _run_js(self, code: str, lang: str, filename: str) -> bool:
        """A ``--lang js|ts`` cell, run by the JavaScript runner the host sent
        (``guest/js_node.py``: Node.js in the sandbox)."""
        runner = sys.modules.get("tierkernel_js_node")
        if runner is None:
            error = RuntimeError("this tier was not given its JavaScript runner")
            self._report(RuntimeError, error, None, filename)
            return False
        return bool(runner.run_cell(self, code, lang))

    def _take_values(self, data: str, filename: str) -> bool:
        """Set the variables a cell's ``--in`` gave (a values blob from the host, trusted as
        the host is); False, with the error shown as the cell's, when they cannot be."""
        codec = sys.modules.get("tierkernel_values")
        try:
            if codec is None:
                raise RuntimeError("this tier has no values module (tierkernel_values)")
            values = codec.decode(base64.b64decode(data), codec.Limits(
                max_bytes=1 << 40, max_depth=10_000, max_nodes=1 << 40))
        except Exception as exc:
            error = ValueError(f"the variables given with --in could not be set here: {exc}")
            self._report(ValueError, error, None, filename)
            return False
        self.namespace.update(values)
        return True

    def _send_values(self, names: list[str], limit: int) -> None:
        """Send the host the variables a cell's ``--out`` named, as a values blob of at most
        ``limit`` bytes, in VALUES messages of under 1 MiB each (the wasm tier's calls to the
        host carry no more); or why they cannot go."""
        codec = sys.modules.get("tierkernel_values")
        try:
            if codec is None:
                raise RuntimeError("this tier has no values module (tierkernel_values)")
            missing = [name for name in names if name not in self.namespace]
            if missing:
                raise NameError(f"--out names {', '.join(missing)}, not defined in this tier")
            blob = codec.encode({name: self.namespace[name] for name in names},
                                codec.Limits(max_bytes=limit))
        except Exception as exc:
            self.channel.send({"type": protocol.VALUES, "id": self.cell_id,
                               "error": f"{type(exc).__name__}: {exc}"})
            return
        encoded = base64.b64encode(blob).decode("ascii")
        step = 768 << 10  # a multiple of 4: each part decodes on its own
        for at in range(0, len(encoded), step):
            self.channel.send({"type": protocol.VALUES, "id": self.cell_id,
                               "data": encoded[at:at + step],
                               "more": at + step < len(encoded)})

    def _run(self, code: str, filename: str, first_line: int) -> bool:
        ready = self._ishell_ready
        if ready is not None and not ready.is_set():
            # ishell is still being compiled (milliseconds): wait, so that its guard of
            # IPython's background import is in place before this cell imports anything.
            ready.wait()
        prefix = "\n" * (first_line - 1)
        source = prefix + code
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            tree = ast.parse(source, filename, "exec")
        except SyntaxError as exc:
            # Not Python: IPython syntax (a magic, !cmd, obj?) becomes Python through the
            # shell's input transformer; without IPython, !cmd lines and the agent's own line
            # magics (%pip) still run.
            python = self._ipython_source(code)
            try:
                if python is None:
                    python = shell_escapes(self._agent_magics(code))
                    if python == code:
                        raise exc
                tree = ast.parse(prefix + python, filename, "exec")
            except SyntaxError as bad:
                shown = bad
                loader = self.shell_loader
                if loader is not None and loader.problem and self.ishell.looks_like_ipython(code):
                    shown = SyntaxError(loader.missing())
                self._store_input(code, code)
                self._report(type(shown), shown, None, filename)
                return False
            source = prefix + python
        else:
            python = code
        self._store_input(code, python)
        shell = self.shell_loader.shell if self.shell_loader is not None else None
        if shell is None and "IPython" in code and self.shell_loader is not None:
            # IPython.display.display() and friends publish through the shell only once one
            # exists: a cell that names IPython gets it first.
            shell = self.ipython()
        last_expr = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            node = tree.body.pop()
            assert isinstance(node, ast.Expr)
            if not ends_with_semicolon(source):
                last_expr = ast.Expression(node.value)
            else:  # as in IPython, a trailing ';' runs the expression but shows no value
                tree.body.append(node)
        info = None
        if shell is not None:
            shell.execution_count = self.execution_count
            if shell.events.callbacks.get("pre_run_cell"):
                info = self.ishell.execution_info(code)
                self.ishell.run_events(shell, "pre_run_cell", info)
        error: BaseException | None = None
        try:
            self.in_cell = True
            # Top-level await: such a cell compiles to a coroutine, run on the agent's loop.
            compiled = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if compiled.co_flags & CO_COROUTINE:
                self._await(eval(compiled, self.namespace))
            else:
                exec(compiled, self.namespace)
            if last_expr is not None:
                compiled = compile(last_expr, filename, "eval",
                                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                value = eval(compiled, self.namespace)
                if compiled.co_flags & CO_COROUTINE:
                    value = self._await(value)
                self.in_cell = False
                if value is not None:
                    self._store_output(value)
                    self._flush_text()
                    data, metadata = mime_bundle(value)
                    self.channel.send({"type": protocol.RESULT, "id": self.cell_id, "data": data,
                                       "metadata": metadata})
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the cell's errors too
            self.in_cell = False
            error = exc
            self._report(type(exc), exc, exc.__traceback__, filename)
            return False
        finally:
            self.in_cell = False
            if info is not None or (shell is not None
                                    and shell.events.callbacks.get("post_run_cell")):
                with contextlib.suppress(Exception):
                    info = info or self.ishell.execution_info(code)
                    self.ishell.run_events(shell, "post_run_cell",
                                           self.ishell.execution_result(info, error))
        return True

    def _agent_magics(self, code: str) -> str:
        """Without IPython, the agent's own line magics (``line_magics``) still run: a line
        ``%name args`` becomes a call of ``line_magics[name]``."""
        if "%" not in code or not self.line_magics:
            return code
        out = []
        for line in code.split("\n"):
            match = _MAGIC_LINE.match(line)
            if match and match.group(2) in self.line_magics:
                indent, name, rest = match.groups()
                out.append(f"{indent}__tierkernel_agent__.line_magics[{name!r}]"
                           f"({rest.strip()!r})")
            else:
                out.append(line)
        return "\n".join(out)

    def _ipython_source(self, code: str) -> str | None:
        """The cell transformed by IPython into Python, or None where there is no IPython."""
        shell = self.ipython()
        if shell is None:
            return None
        self.ishell.register_line_magics(shell, self.line_magics)  # ones added since
        return str(self.ishell.transform(shell, code))

    def _await(self, coroutine: Any) -> Any:
        """Run a cell's top-level ``await`` on the agent's event loop (kept across cells)."""
        loop = self._loop
        if loop is None:
            try:
                import asyncio

                loop = asyncio.new_event_loop()
                asyncio.set_event_loop(loop)
            except Exception as exc:
                coroutine.close()
                raise RuntimeError(
                    f"top-level await needs an asyncio event loop, which the {self.tier} tier "
                    f"cannot make ({type(exc).__name__}: {exc}); run the cell in %%tier "
                    "process, sandbox or native") from None
            self._loop = loop
        return loop.run_until_complete(coroutine)

    def _store_input(self, raw: str, python: str) -> None:
        """IPython's input history for the running cell: In[N], _iN, _i, _ii, _iii."""
        count, history, ns = self.execution_count, self.history_in, self.namespace
        while len(history) <= count:
            history.append("")
        history[count] = python
        ns["_iii"], ns["_ii"], ns["_i"] = ns.get("_ii", ""), ns.get("_i", ""), self._last_input
        ns[f"_i{count}"] = raw
        self._last_input = raw

    def _store_output(self, value: Any) -> None:
        """IPython's output history for the cell's value: Out[N], _N, _, __, ___."""
        count, ns = self.execution_count, self.namespace
        self.history_out[count] = value
        ns["___"], ns["__"], ns["_"] = ns.get("__", ""), ns.get("_", ""), value
        ns[f"_{count}"] = value

    def _glue_frame(self, frame: Any) -> bool:
        """Whether ``frame`` is glue between a cell and what it called (see user_traceback)."""
        return (id(frame.f_globals) in self.glue_globals
                or frame.f_code.co_filename.startswith(self.hidden_frames))

    def _report(self, etype: type[BaseException], exc: BaseException, tb: Any, fn: str) -> None:
        # Drop the agent's own frames: the user sees their cell's lines, as in IPython.
        tb = user_traceback(tb, fn, self._glue_frame)
        seen = {id(exc)}
        chained = exc.__cause__ or exc.__context__
        while chained is not None and id(chained) not in seen:  # the chain's, as far as it goes
            seen.add(id(chained))
            with contextlib.suppress(Exception):
                chained.__traceback__ = user_traceback(chained.__traceback__, None,
                                                       self._glue_frame)
            chained = chained.__cause__ or chained.__context__
        if self.ishell is not None and self.ishell.is_usage_error(exc):
            lines = [f"UsageError: {exc}"]  # as IPython shows it: the message alone
        else:
            # Nor guest/files.py's open(), which a missing file passes through.
            lines = [line for line in traceback.format_exception(etype, exc, tb)
                     if not line.startswith('  File "<tierkernel files>"')]
        evalue = str(exc)
        try:
            note = str(self.error_note(exc) or "")
        except Exception:  # a hint must never cost the cell its error
            note = ""
        if note:
            evalue, lines = f"{evalue}\n{note}", [*lines, note]
        self._flush_text()
        self.channel.send(
            {
                "type": protocol.ERROR,
                "id": self.cell_id,
                "ename": etype.__name__,
                "evalue": evalue,
                "traceback": [line.rstrip("\n") for line in lines],
            }
        )

    def start_flusher(self, interval: float = 0.05) -> None:
        """Send partial lines (progress dots, ``\\r`` bars) within ``interval`` of their write."""

        def loop() -> None:
            while True:
                time.sleep(interval)
                if self.cell_id is not None:
                    self._flush_text()

        threading.Thread(target=loop, daemon=True, name="flusher").start()

    # -- fd-level capture -----------------------------------------------------------------
    def capture_fds(self) -> None:
        """Point fds 1 and 2 at pipes pumped to the host (subprocesses, C extensions).

        Each pipe's write end is kept open on a descriptor of its own (not inherited by
        subprocesses), so a cell closing fd 1 or 2 never ends a pump, and
        :meth:`restore_streams` can put the pipe back."""
        for fd, name in ((1, "stdout"), (2, "stderr")):
            self._capture_fd(fd, name)

    def _capture_fd(self, fd: int, name: str) -> None:
        read_end, write_end = _pipe_above_stdio()
        old = self._fd_readers.get(name)
        if old is not None:
            # Its number may be given to another descriptor from now on: it must not read it.
            old.retired = True
        os.dup2(write_end, fd)
        self._fd_saved[fd] = write_end
        self._fd_pipes[fd] = _fd_identity(write_end)
        pump = _FdPump(self, read_end, name)
        pump.start()
        self._fd_readers[name] = pump

    def _capture_intact(self, fd: int, name: str) -> bool:
        """Whether the agent's own descriptors of ``fd``'s capture pipe are still that pipe
        and its pump still reads it: a cell may have closed them (``os.closerange``) or put
        another file on their numbers (``dup2``), which a plain ``dup2`` back would copy."""
        pipe = self._fd_pipes.get(fd)
        pump = self._fd_readers.get(name)
        return (pipe is not None and pump is not None and pump.is_alive()
                and _fd_identity(self._fd_saved[fd]) == pipe
                and _fd_identity(pump.fd) == pipe)

    def restore_streams(self) -> None:
        """Give the cells their output back, as IPython does: ``sys.stdout``/``sys.stderr``
        are the agent's streams again (a cell may have replaced or closed them) and fds 1 and
        2 are the capture pipes again (a cell may have closed them, ``os.close(1)``, or put
        something else there). Two ``dup2`` calls: cheap enough for every cell."""
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream.closed:
                stream = type(stream)(self, name)
                setattr(self, name, stream)
            setattr(sys, name, stream)
        self._restore_fds()

    def _restore_fds(self) -> None:
        broken = []
        for fd, name in ((1, "stdout"), (2, "stderr")):
            if fd not in self._fd_saved:
                continue
            with contextlib.suppress(OSError):
                if self._capture_intact(fd, name):
                    os.dup2(self._fd_saved[fd], fd)
                    continue
            broken.append((fd, name))
            # Retired before any new pipe is made: a new pipe may take the number an old
            # pump still waits on, and that pump must not read it.
            old = self._fd_readers.get(name)
            if old is not None:
                old.retired = True
        for fd, name in broken:
            with contextlib.suppress(OSError):
                # A new pipe and pump; the old pump, if it still runs, ends at its EOF.
                # The broken numbers are the cell's now: never closed here.
                self._capture_fd(fd, name)

    def _drain_fds(self) -> None:
        for pump in self._fd_readers.values():
            pump.drain()

    def answer_query(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The answer to a ``complete`` or ``inspect`` request (between cells)."""
        return answer_query(self, msg)

    def sigint(self, signum: int, frame: Any) -> None:
        if not self.in_cell:
            return  # between cells: nothing to interrupt, and our bookkeeping must not tear
        if self.channel.deferring:
            self.channel.pending = True
            return
        raise KeyboardInterrupt


class _FdPump(threading.Thread):
    """Forwards what is written to fd 1 or 2 as stream messages."""

    def __init__(self, agent: Agent, fd: int, name: str) -> None:
        super().__init__(daemon=True, name=f"pump-{name}")
        self.agent = agent
        self.fd = fd
        self.stream_name = name
        self._drained = threading.Event()
        self._token = ""
        self._seq = 0
        #: Set when a new pipe and pump replace this one (see Agent._capture_fd).
        self.retired = False
        #: Held while a chunk is read and forwarded: with it, the pipe's fill level tells
        #: whether anything written so far is still on its way (see drain()).
        self._lock = threading.Lock()

    def run(self) -> None:
        import select

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        held = ""  # a tail that may be the start of a drain marker split across reads
        while True:
            try:
                select.select([self.fd], [], [])
            except InterruptedError:
                continue
            except (OSError, ValueError):  # a cell closed the read end: restore_streams
                return                     # makes a new pipe and pump
            if self.retired:
                return
            with self._lock:
                if self.retired:
                    return
                try:
                    chunk = os.read(self.fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                text = held + decoder.decode(chunk)
                held = ""
                token = self._token
                if token and token in text:
                    before, _, text = text.partition(token)
                    if before:
                        self.agent.emit_stream(self.stream_name, before)
                    self._drained.set()
                cut = text.rfind("\x00")
                if cut != -1 and len(text) - cut < len(MARKER_PREFIX) + 12:
                    text, held = text[:cut], text[cut:]
                if text:
                    self.agent.emit_stream(self.stream_name, text)

    def drain(self, timeout: float = 1.0) -> None:
        """Wait until everything written to the fd before now has been forwarded.

        Usually nothing was (a cell that only prints goes through sys.stdout, not fd 1): an
        empty pipe while the pump is between chunks says so at once. Otherwise a marker is
        written and waited for, so that what is ahead of it has been forwarded.
        """
        with self._lock:
            if _unread(self.fd) == 0:
                return
        self._seq += 1
        self._token = f"{MARKER_PREFIX}{self._seq}\x00"
        self._drained.clear()
        try:
            os.write(1 if self.stream_name == "stdout" else 2, self._token.encode())
        except OSError:
            return
        self._drained.wait(timeout)


def _pipe_above_stdio() -> tuple[int, int]:
    """``os.pipe()``, with both ends numbered 3 or more: a cell that closed fd 1 or 2 frees
    those numbers, and a capture pipe's end given one of them would be overwritten by the
    ``dup2`` onto 1 or 2 (a pipe with no reader: the next write fails, EPIPE)."""
    import fcntl

    ends = []
    for end in os.pipe():
        if end < 3:
            moved = fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(end)
            end = moved
        ends.append(end)
    return ends[0], ends[1]


def _fd_identity(fd: int) -> tuple[int, int] | None:
    """The (device, inode) of what ``fd`` is open on; None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` (-1 when it cannot be told: then drain by marker)."""
    try:
        import fcntl
        import termios

        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)
    except (ImportError, OSError):
        return -1


class _RawBundle:
    """An already-built mime bundle passed to ``display``."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return (self.data, self.metadata) if self.metadata else self.data


_REPR_METHODS = {
    "text/html": "_repr_html_",
    "text/markdown": "_repr_markdown_",
    "text/latex": "_repr_latex_",
    "image/svg+xml": "_repr_svg_",
    "image/png": "_repr_png_",
    "image/jpeg": "_repr_jpeg_",
    "application/json": "_repr_json_",
    "application/javascript": "_repr_javascript_",
}


def mime_bundle(obj: Any, raw: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build a Jupyter mime bundle for ``obj`` the way IPython's formatters do."""
    if raw and isinstance(obj, dict):
        return obj, {}
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method) and not isinstance(obj, type):
        try:
            got = method(include=None, exclude=None)
        except Exception:
            got = None
        if isinstance(got, tuple) and len(got) == 2:
            got, meta = got
            metadata.update(meta or {})
        if isinstance(got, dict):
            data.update(got)
    for mime, name in _REPR_METHODS.items():
        if mime in data:
            continue
        method = getattr(obj, name, None)
        if not callable(method) or isinstance(obj, type):
            continue
        try:
            value = method()
        except Exception:
            continue
        if isinstance(value, tuple) and len(value) == 2:
            value, meta = value
            metadata[mime] = meta
        if value is None:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        data[mime] = value
    if "text/plain" not in data:
        try:
            data["text/plain"] = _pretty(obj)
        except Exception as exc:
            data["text/plain"] = f"<repr failed: {exc!r}>"
    return data, metadata


def _pretty(obj: Any) -> str:
    if isinstance(obj, (dict, list, tuple, set)) and len(repr(obj)) > 79:
        import pprint

        return pprint.pformat(obj, width=79)
    return repr(obj)


#: Set by a tier that mirrors a folder to the host (the sandbox's /workspace): the agent then
#: says at the end of each cell whether anything under it changed.
WATCH_ENV = "TIERKERNEL_WATCH_DIR"


#: Set by a tier whose agent runs in a container of its own (the sandbox): the agent then says
#: how many processes the container holds at the end of each cell and when asked ("procs"),
#: so the host can tell a fork bomb left running in the background under gVisor, where the
#: host's cgroup counts the sandbox's own threads instead.
COUNT_PROCS_ENV = "TIERKERNEL_COUNT_PROCS"


#: The highest pid any count has seen: pids are handed out in increasing order, so how fast
#: this grows is how fast processes are made, even when they all end between two counts.
_highest_pid = -1


def count_processes() -> tuple[int, int]:
    """How many processes this agent can see (in a container: the container's), and the
    highest pid seen so far (how fast it grows tells a fork bomb from a pool of workers)."""
    global _highest_pid
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return -1, -1
    _highest_pid = max(_highest_pid, *pids) if pids else _highest_pid
    return len(pids), _highest_pid


def unpack_workspace(root: str, data: Any, delete: list[str]) -> None:
    """Delete ``delete`` (paths relative to ``root``) and extract the tar ``data`` (bytes, or
    a binary file at its start: the process tier's host copy) into
    ``root``: the host's copy of what changed in its workspace. As ``tar -x -m`` does, files
    get the time of their extraction, not the archive's (a copy from the host reads as new
    here), and an existing file or link in a member's place is unlinked first, never written
    through. Raises OSError."""
    import shutil
    import tarfile  # here, not at the top: most agents never copy, and imports cost at start

    real_root = os.path.realpath(root)
    for rel in delete:
        path = os.path.join(root, rel)
        parent = os.path.dirname(os.path.join(real_root, rel))
        if os.path.realpath(parent) != parent:
            continue  # its folder is a link (or gone) here now: never delete through it
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)
    if isinstance(data, (bytes, bytearray)):
        if not data:
            return
        data = io.BytesIO(data)
    # Like tar -x: a folder's mode is set once everything inside it is extracted, so a
    # read-only folder of the host's still gets its files (the cells' user owns them all).
    folders: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=data, mode="r:") as tar:
            tar.utime = lambda tarinfo, targetpath: None  # type: ignore[method-assign]
            trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") \
                else {}  # the host made it; newer Pythons would otherwise rewrite modes
            for member in tar:
                target = os.path.join(root, member.name)
                offset = member.pax_headers.get("TIERKERNEL.offset")
                if offset is not None and member.isfile():
                    # A later piece of a large %pip file: written into the file the earlier
                    # pieces began (never through a link), at its offset.
                    source = tar.extractfile(member)
                    if source is None or os.path.islink(target):
                        continue
                    with open(target, "r+b") as out:
                        out.seek(int(offset))
                        shutil.copyfileobj(source, out)
                    continue
                real_dir = os.path.isdir(target) and not os.path.islink(target)
                if member.isdir() and real_dir:
                    pass  # kept, as tar keeps an existing folder
                elif real_dir:
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.unlink(target)
                if member.isdir():
                    folders.append(member)
                    os.makedirs(target, exist_ok=True)
                    continue
                tar.extract(member, root, **trusted)  # type: ignore[arg-type]
            for member in sorted(folders, key=lambda m: m.name, reverse=True):
                os.chmod(os.path.join(root, member.name), member.mode & 0o7777)
    except tarfile.TarError as exc:
        raise OSError(f"bad archive: {exc}") from exc


#: Where the agent looks for GNU tar (never the cells' PATH, which a cell may change).
TAR_DIRS = "/usr/bin:/bin"


def pack_workspace(root: str, limit: int) -> bytes | None:
    """A tar of ``root`` as ``tar -c -C root .`` makes it (members ``.``, ``./name``, links
    not followed, each name of a hard-linked file a file of its own), or None when it would
    be larger than ``limit`` bytes (the host then reads it another way). Made by GNU tar when
    the image has it (14 ms for 2,000 files where tarfile takes 80), else by tarfile."""
    ran, packed = _gnu_tar(root, limit)
    if ran:
        return packed
    import tarfile

    class TooBig(Exception):
        pass

    class Limited(io.BytesIO):
        def write(self, data: Any) -> int:
            if self.tell() + len(data) > limit:
                raise TooBig
            return super().write(data)

    class Plain(tarfile.TarFile):
        def gettarinfo(self, *args: Any, **kwargs: Any) -> Any:
            # Every name of a hard-linked file as a file of its own (GNU tar's
            # --hard-dereference): fsx has no hard links, and refuses a link member.
            self.inodes.clear()  # type: ignore[attr-defined]
            return super().gettarinfo(*args, **kwargs)

    buffer = Limited()
    try:
        with Plain.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.add(root, arcname=".")
    except TooBig:
        return None
    return buffer.getvalue()


def _gnu_tar(root: str, limit: int) -> tuple[bool, bytes | None]:
    """:func:`pack_workspace` by GNU tar, as (True, its result); (False, None) when there is
    no tar to run."""
    import shutil
    import subprocess
    import tempfile

    tar = shutil.which("tar", path=TAR_DIRS)
    if tar is None:
        return False, None
    with tempfile.TemporaryFile() as errors:  # a file: a full stderr pipe would block tar
        try:
            proc = subprocess.Popen([tar, "-c", "--hard-dereference", "-C", root, "."],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errors, env={"PATH": TAR_DIRS, "LC_ALL": "C"})
        except OSError:
            return False, None
        assert proc.stdout is not None
        chunks, size = [], 0
        with proc.stdout:
            while chunk := proc.stdout.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    proc.kill()
                    proc.wait()
                    return True, None
                chunks.append(chunk)
        code = proc.wait()
        # 1: a file changed while it was read (a background writer): the tar is whole, and
        # the next change copies the file again.
        if code not in (0, 1):
            errors.seek(0)
            detail = errors.read()[-400:].decode("utf-8", "replace").strip()
            raise OSError(f"tar exited with status {code}: {detail}")
    return True, b"".join(chunks)


def tree_signature(root: str) -> int:
    """A hash of every path under ``root`` with its type, size, mode and mtime (no content
    read, symlinks not followed): cheap enough to take around every cell."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            entries.append((path, st.st_mode, st.st_size, st.st_mtime_ns))
    return hash(tuple(sorted(entries)))



def _tag_threads(agent: Agent) -> None:
    """Make every thread remember the cell whose code started it (``_tierkernel_cell``), and
    its own threads in turn: threads inherit their starter's cell. Once per process."""
    start = threading.Thread.start
    if getattr(start, "_tierkernel", False):
        return

    def tagged_start(thread: threading.Thread) -> None:
        thread._tierkernel_cell = agent.cell_of_caller()  # type: ignore[attr-defined]
        start(thread)

    tagged_start._tierkernel = True  # type: ignore[attr-defined]
    threading.Thread.start = tagged_start  # type: ignore[method-assign,assignment]


def ends_with_semicolon(source: str) -> bool:
    """Whether the cell's last code token is ``;`` (comments and blank lines ignored)."""
    import tokenize

    last = ""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT):
                last = tok.string
    except (tokenize.TokenError, SyntaxError):
        return False
    return last == ";"


_SHELL_LINE = re.compile(r"^(\s*)!(.*)$")
_MAGIC_LINE = re.compile(r"^(\s*)%(\w+)(.*)$")


def shell_escapes(code: str) -> str:
    """Turn IPython-style ``!cmd`` lines into calls that run ``cmd`` in this environment
    (where IPython cannot be imported; ``%pip`` and the agent's other line magics are
    ``Agent._agent_magics``'s)."""
    if "!" not in code:
        return code
    out = []
    for line in code.split("\n"):
        match = _SHELL_LINE.match(line)
        if match and not match.group(2).startswith("="):
            indent, command = match.groups()
            out.append(f"{indent}__tierkernel_agent__.system({command!r})")
        else:
            out.append(line)
    return "\n".join(out)


def system(command: str) -> None:
    """Run a shell line from a cell; its output streams like the cell's own.

    As in IPython, the line has no value; its exit status is kept in ``_exit_code``.
    """
    import subprocess  # here: most agents never run a shell line, and imports cost at start

    sys.stdout.flush()
    sys.stderr.flush()
    code = subprocess.call(command, shell=True)
    builtins.__tierkernel_agent__.namespace["_exit_code"] = code  # type: ignore[attr-defined]


#: Set by the sandbox tier: the host's unix socket (a read-only mount), the agent's channel
#: instead of stdin/stdout, which reach the host only through the Docker engine.
SOCKET_ENV = "TIERKERNEL_AGENT_SOCKET"
#: Seconds to wait for that socket to appear (a spare container's agent waits for a kernel to
#: claim it); past them the agent exits.
WAIT_ENV = "TIERKERNEL_AGENT_WAIT"
#: A FIFO of the host's that the host writes to once the socket is there: a waiting agent
#: sleeps on it instead of polling (no CPU while a spare waits, ≈1 ms to wake).
WAKE_ENV = "TIERKERNEL_AGENT_WAKE"
#: Seconds between looks for the socket when there is no FIFO to sleep on.
POLL_ENV = "TIERKERNEL_AGENT_POLL"


def connect_host() -> int | None:
    """The fd of a connection to the host's socket (see SOCKET_ENV), or None for stdio.

    The socket is created by the host. Until it exists the agent sleeps on the wake FIFO, or
    looks for it every few milliseconds; when WAIT_ENV runs out it exits (a spare that no
    kernel claimed: under runc its container's keeper then ends the container, which removes
    itself; a gVisor spare stays until a kernel's reaper removes it).
    """
    import socket

    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    deadline = time.monotonic() + float(os.environ.get(WAIT_ENV) or 60)
    poll = float(os.environ.get(POLL_ENV) or 0.005)
    woken = threading.Event()
    wake = os.environ.get(WAKE_ENV)
    if wake:
        # A thread: the open blocks until the host opens the FIFO for writing, and the wait
        # must still end at the deadline.
        threading.Thread(target=_sleep_on_fifo, args=(wake, woken), daemon=True,
                         name="wake").start()
    while True:
        if os.path.exists(path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:  # a stale socket of an earlier agent: the host is re-creating it
                sock.close()
            else:
                return sock.detach()
        left = deadline - time.monotonic()
        if left <= 0:
            # Not claimed in time: exit, and (under runc) the spare's keeper ends the container
            # a little later. Stopping the container from here would wedge gVisor.
            os._exit(0)
        if wake and not woken.is_set():
            woken.wait(left)
        else:
            time.sleep(poll)


def _sleep_on_fifo(path: str, woken: threading.Event) -> None:
    """Block until the host writes to the FIFO at ``path`` (or it cannot be read), then say so."""
    try:
        with open(path, "rb", buffering=0) as fifo:
            fifo.read(1)
    except OSError:
        pass  # no FIFO to sleep on: the caller polls
    woken.set()


def workspace_request(msg: dict[str, Any]) -> dict[str, Any]:
    """Answer an ``unpack`` or ``pack`` request (between cells; see the module's protocol)."""
    root = str(msg.get("root") or os.environ.get(WATCH_ENV) or os.getcwd())
    reply: dict[str, Any] = {"type": protocol.ANSWERS[msg["type"]], "seq": msg.get("seq")}
    try:
        if msg["type"] == protocol.UNPACK:
            # The host then sends watch_reset, as after a copy by tar in a docker exec.
            unpack_workspace(root, base64.b64decode(str(msg.get("data", ""))),
                             [str(rel) for rel in msg.get("delete") or []])
        else:
            packed = pack_workspace(root, int(msg.get("limit", 8 << 20)))
            if packed is None:
                reply["too_big"] = True
            else:
                reply["data"] = base64.b64encode(packed).decode("ascii")
    except Exception as exc:  # reported to the host, which says what failed
        reply["error"] = f"{type(exc).__name__}: {exc}"
    return reply


# -- completion and inspection (between cells) -------------------------------------------------
#: What one answer carries at most; the host caps it again (it trusts no count of ours), but a
#: namespace with a huge dir() or docstring must not make the host drop the whole answer.
QUERY_MATCHES = 1000
QUERY_MATCH_BYTES = 256 << 10
QUERY_TEXT_CHARS = 200_000


class _QueryTimeout(Exception):
    """The answer took longer than its budget (raised by the SIGALRM of _query_deadline)."""


@contextlib.contextmanager
def _query_deadline(budget: float) -> Any:
    """Stop the query after ``budget`` seconds (SIGALRM, where the guest has it: not in wasm,
    nor off the main thread), putting back any alarm a cell had set."""
    if (not hasattr(signal, "setitimer") or budget <= 0
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _QueryTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    pending = signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending[0] > 0:  # a cell's alarm: it goes on, a little later than it would have
            signal.setitimer(signal.ITIMER_REAL, pending[0], pending[1])


def answer_query(agent: Agent, msg: dict[str, Any]) -> dict[str, Any]:
    """Answer ``complete`` with IPython's completer (when ``agent.ipython()`` gives a shell)
    or the standard library's, ``inspect`` with IPython's inspector or a type, signature and
    docstring; nothing at all when that fails or takes longer than the request's budget."""
    kind = msg.get("type")
    code = str(msg.get("code", ""))
    cursor = msg.get("cursor_pos")
    cursor = min(max(cursor, 0), len(code)) if isinstance(cursor, int) else len(code)
    try:
        budget = float(msg.get("budget") or 1.0)
    except (TypeError, ValueError):
        budget = 1.0
    try:
        shell = agent.ipython()  # made (imported) outside the deadline: never torn half-way
    except Exception:
        shell = None
    if kind == protocol.COMPLETE:
        answer: dict[str, Any] = {"matches": [], "cursor_start": cursor, "cursor_end": cursor}
    else:
        answer = {"found": False, "data": {}}
    try:
        with _query_deadline(budget):
            if kind == protocol.COMPLETE:
                answer = _complete(agent, shell, code, cursor)
            else:
                level = msg.get("detail_level")
                answer = _inspect(agent, shell, code, cursor, level if level in (0, 1) else 0)
    except BaseException:  # a completer's failure, its timeout, a Ctrl-C: no answer
        pass
    return {"type": protocol.ANSWERS.get(str(kind), protocol.COMPLETED), "seq": msg.get("seq"),
            "metadata": {}, **answer}


def _complete(agent: Agent, shell: Any, code: str, cursor: int) -> dict[str, Any]:
    if shell is not None:
        from IPython.core.completer import provisionalcompleter, rectify_completions

        with provisionalcompleter():
            found = list(rectify_completions(code, _first(
                shell.Completer.completions(code, cursor), QUERY_MATCHES)))
        start = found[0].start if found else cursor
        end = found[0].end if found else cursor
        matches = [c.text for c in found]
    else:
        start, end, matches = _complete_names(agent.namespace, code, cursor)
    kept, size = [], 0
    for match in matches[:QUERY_MATCHES]:
        size += len(match) + 4
        if size > QUERY_MATCH_BYTES:
            break
        kept.append(match)
    return {"matches": kept, "cursor_start": start, "cursor_end": end}


def _first(items: Any, n: int) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if len(out) >= n:
            break
        out.append(item)
    return out


def _token_start(code: str, cursor: int) -> int:
    i = cursor
    while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_."):
        i -= 1
    return i


def _lookup(namespace: dict[str, Any], dotted: str) -> Any:
    """The object a dotted name means, by name and attribute lookups only (nothing called
    but what attribute access itself runs); raises when it means nothing."""
    first, *rest = dotted.split(".")
    if not first.isidentifier():
        raise LookupError(dotted)
    if first in namespace:
        obj = namespace[first]
    elif hasattr(builtins, first):
        obj = getattr(builtins, first)
    else:
        raise LookupError(dotted)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _complete_names(namespace: dict[str, Any], code: str,
                    cursor: int) -> tuple[int, int, list[str]]:
    """rlcompleter's answers without calling anything: names of the namespace, builtins and
    keywords, or the attributes of a dotted name's object."""
    import keyword

    start = _token_start(code, cursor)
    token = code[start:cursor]
    if token[:1].isdigit():
        return cursor, cursor, []
    if "." in token:
        base, _, prefix = token.rpartition(".")
        try:
            names = dir(_lookup(namespace, base))
        except Exception:
            return cursor, cursor, []
        start = cursor - len(prefix)
    else:
        prefix = token
        names = [*namespace, *dir(builtins), *keyword.kwlist]
    private = prefix.startswith("_")
    matches = sorted({n for n in names if isinstance(n, str) and n.startswith(prefix)
                      and (private or not n.startswith("_"))})
    return start, cursor, matches


def _inspect(agent: Agent, shell: Any, code: str, cursor: int, level: int) -> dict[str, Any]:
    if shell is not None:
        from IPython.utils.tokenutil import token_at_cursor

        name = token_at_cursor(code, cursor)
        try:
            bundle = shell.object_inspect_mime(name, detail_level=level)
        except KeyError:
            return {"found": False, "data": {}}
        if not getattr(shell, "enable_html_pager", False):
            bundle.pop("text/html", None)  # as ipykernel does
        data = {k: v[:QUERY_TEXT_CHARS] for k, v in bundle.items() if isinstance(v, str)}
        return {"found": bool(data), "data": data}
    name = _name_at(code, cursor)
    try:
        obj = _lookup(agent.namespace, name)
    except Exception:
        return {"found": False, "data": {}}
    return {"found": True, "data": {"text/plain": _describe(name, obj)[:QUERY_TEXT_CHARS]}}


def _name_at(code: str, cursor: int) -> str:
    """The dotted name under the cursor, or the callee's when the cursor is in its call."""
    end = cursor
    while end < len(code) and (code[end].isalnum() or code[end] == "_"):
        end += 1
    name = code[_token_start(code, end):end].strip(".")
    if name:
        return name
    depth, i = 0, cursor
    while i > 0:  # back to the "(" of the call the cursor is in
        i -= 1
        if code[i] == ")":
            depth += 1
        elif code[i] == "(":
            if depth == 0:
                return code[_token_start(code, i):i].strip(".")
            depth -= 1
    return ""


def _describe(name: str, obj: Any) -> str:
    import inspect

    lines = [f"Type:      {type(obj).__name__}"]
    if callable(obj):  # no repr of the value: that would run the object's own code
        with contextlib.suppress(Exception):
            lines.append(f"Signature: {name}{inspect.signature(obj)}")
    doc = inspect.getdoc(obj)
    lines.append(f"Docstring: {doc}" if doc else "Docstring: <no docstring>")
    return "\n".join(lines)


def _import_quietly(name: str) -> None:
    with contextlib.suppress(Exception):
        __import__(name)


def main() -> None:
    """Serve cells on the host's socket, or stdin/stdout, until the host closes it."""
    # Imports resolve from the working directory, as in IPython, not from the agent's folder.
    # No __file__ when the source is handed to ``python3 -c`` (the sandbox tier does that).
    here = os.path.dirname(os.path.abspath(globals().get("__file__") or "."))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here and sys.path[0]:
        sys.path[0] = ""
    if os.environ.get(WATCH_ENV):
        # A sandbox agent. A process group of its own: the cells' `kill 0` (or killpg) must not
        # reach the container's keeper, which may be this agent's parent (a gVisor spare's).
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        # The kernel's first request after "ready" is usually a workspace copy, whose tarfile
        # (with shutil) takes 20 ms to import under gVisor: imported meanwhile, while the
        # agent connects and is given its helpers. (The tree watch, with ctypes, comes only
        # after the first cell.)
        threading.Thread(target=_import_quietly, args=("tarfile",), daemon=True,
                         name="preimport").start()
    conn = connect_host()
    channel = Channel(os.dup(conn if conn is not None else 1))
    agent = Agent(channel)
    stdin = os.fdopen(os.dup(conn if conn is not None else 0), "rb")
    if conn is not None:
        os.close(conn)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a cell reading stdin gets EOF, never the protocol
    os.close(devnull)
    agent.capture_fds()
    agent.start_flusher()
    sys.stdout = agent.stdout
    sys.stderr = agent.stderr
    agent.install_stdin()
    sys.meta_path.append(_InlineBackendFinder())
    if os.environ.get(MPL_SEED_ENV):
        sys.meta_path.insert(0, _MatplotlibConfigSeeder())
    # Always ours: an inherited one (ipykernel sets matplotlib_inline) cannot reach the notebook.
    os.environ["MPLBACKEND"] = f"module://{MPL_BACKEND_MODULE}"
    builtins.display = agent.display  # type: ignore[attr-defined]
    builtins.clear_output = agent.clear_output  # type: ignore[attr-defined]
    builtins.__tierkernel_agent__ = agent  # type: ignore[attr-defined]
    builtins.get_ipython = agent.get_ipython  # type: ignore[attr-defined]
    agent.system = system  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, agent.sigint)
    agent.requests = stdin
    if os.environ.get(WATCH_ENV):
        agent._infra_pids = {pid for pid in os.listdir("/proc") if pid.isdigit()}
    agent.reset_watch()
    channel.send({"type": protocol.READY, "pid": os.getpid(), "python": sys.version.split()[0]})
    if os.environ.get(MPL_SEED_ENV):  # after "ready": not on the way to the first cell
        threading.Thread(target=seed_matplotlib_config, daemon=True, name="mpl-seed").start()
    while True:
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            channel.send({"type": protocol.PROTOCOL_ERROR,
                          "detail": f"bad request line {line[:80]!r}"})
            continue
        kind = msg.get("type")
        if kind == protocol.EXECUTE:
            agent.execute(msg)
        elif kind == protocol.INSTALL_HELPERS:
            try:
                agent.install_helpers(str(msg.get("source", "")), msg.get("packages_source"),
                                      msg.get("packages_site"))
            except Exception as exc:  # cells still run; only the helpers are missing
                channel.send({"type": protocol.PROTOCOL_ERROR,
                              "detail": f"could not install ai/api/db/console: {exc!r}"})
        elif kind == protocol.INSTALL_MODULE:
            try:
                agent.install_module(str(msg.get("name", "")), str(msg.get("source", "")))
            except Exception as exc:  # cells still run; IPython syntax says it is missing
                channel.send({"type": protocol.PROTOCOL_ERROR,
                              "detail": f"could not install {msg.get('name')!r}: {exc!r}"})
        elif kind == protocol.INSTALL_FILES:
            try:
                agent.install_files(str(msg.get("source", "")), dict(msg.get("config") or {}))
            except Exception as exc:  # cells still run; only fsx:// and the fall-back miss
                channel.send({"type": protocol.PROTOCOL_ERROR,
                              "detail": f"could not set up the tier's files: {exc!r}"})
        elif kind == protocol.INSTALL_WATCH:
            try:
                agent.install_watch(str(msg.get("source", "")))
            except Exception as exc:  # unwatched, the folder is walked around each cell
                channel.send({"type": protocol.PROTOCOL_ERROR,
                              "detail": f"could not watch the workspace: {exc!r}"})
        elif kind == protocol.WATCH_RESET:
            agent.reset_watch()
        elif kind == protocol.PROCS:
            count, last = count_processes()
            channel.send({"type": protocol.PROCS, "count": count, "last_pid": last})
        elif kind in (protocol.UNPACK, protocol.PACK):
            channel.send(workspace_request(msg))
        elif kind == protocol.TREE_STATE:
            channel.send({"type": protocol.TREE_STATED, "seq": msg.get("seq"),
                          "changed": agent.changed_since_last_cell()})
        elif kind in (protocol.COMPLETE, protocol.INSPECT):
            try:
                answer = agent.answer_query(msg)
            except Exception:  # the agent must outlive any answer (a cell may replace it)
                answer = {"type": protocol.ANSWERS[kind], "seq": msg.get("seq"),
                          "matches": [], "found": False, "data": {}}
            channel.send(answer)
        elif kind == protocol.SHUTDOWN:
            return
        elif kind in (protocol.INPUT_REPLY, protocol.HELPER_RESULT):
            pass  # an answer its cell no longer waited for (interrupted): nobody to give it to
        else:
            channel.send({"type": protocol.PROTOCOL_ERROR, "detail": f"unknown request {kind!r}"})


if __name__ == "__main__":
    main()
