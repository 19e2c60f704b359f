"""IPython inside a guest tier: the shell behind magics, ``!cmd``, ``get_ipython()``.

Standard library only at import time: IPython itself is imported when a cell first needs it
(a magic, ``!cmd``, ``get_ipython()``, ``IPython.display``), so a cell of plain Python never
pays for it. The process and sandbox agents receive this module as source from the host
(``install_module``); the wasm agent imports it from its read-only guest folder.

The shell is an ``InteractiveShell`` whose user namespace IS the agent's namespace. The agent
keeps running cells itself (its runner, its output channel, its tracebacks); the shell is used
to transform IPython syntax into Python and to run the magics that code then calls. What
cannot work in a tier says so, naming the tier.
"""

from __future__ import annotations

import builtins
import os
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Magics that need something no guest tier has (a kernel connection file, a GUI event loop,
#: a Qt console): refused everywhere, naming the tier and what to do instead.
REFUSED_EVERYWHERE = {
    "connect_info": "there is no kernel connection file inside the tier",
    "qtconsole": "there is no Qt console inside the tier",
    "gui": "there is no GUI event loop inside the tier; figures are shown inline",
}
#: Magics that need processes or a terminal debugger: refused where the tier has no processes
#: (wasm). The ``!cmd`` lines and aliases such as ``%ls`` are refused by the agent's
#: ``system``, which says the same.
REFUSED_WITHOUT_PROCESSES = {
    "debug": "the wasm tier's interpreter has no interactive debugger",
    "pdb": "the wasm tier's interpreter has no interactive debugger",
    "bash": "the wasm tier has no processes",
    "sh": "the wasm tier has no processes",
    "script": "the wasm tier has no processes",
    "sx": "the wasm tier has no processes",
    "system": "the wasm tier has no processes",
    "perl": "the wasm tier has no processes",
    "ruby": "the wasm tier has no processes",
    "python2": "the wasm tier has no processes",
    "python3": "the wasm tier has no processes",
    "pypy": "the wasm tier has no processes",
    "killbgscripts": "the wasm tier has no processes",
}
#: The InlineBackend figure formats the agent's inline backend renders.
FIGURE_FORMATS = ("png", "retina", "svg", "jpeg")

_magic_line = None


def looks_like_ipython(code: str) -> bool:
    """Whether a cell that is not valid Python uses IPython syntax (a magic, ``!cmd``,
    ``obj?``): then a missing IPython, not a typo, is the reason it does not run."""
    global _magic_line
    if _magic_line is None:
        import re

        _magic_line = re.compile(r"^\s*([%!]|\w[\w.]*\s*=\s*[%!])|\?\s*$", re.M)
    return bool(_magic_line.search(code))


class ShellLoader:
    """Imports IPython (in a thread where the tier has threads) and makes the agent's shell."""

    def __init__(self, agent: Any, tier: str, processes: bool) -> None:
        self.agent = agent
        self.tier = tier
        self.processes = processes
        self.shell: Any = None
        #: Why IPython could not be loaded (None while it may still be).
        self.problem: str | None = None
        self._imported = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._creating = False
        # Whoever imports IPython first (a cell, a library, the background import), its
        # get_ipython() then finds this shell (see route_singleton).
        sys.meta_path.insert(0, _RouteOnImport(self))

    def start_import(self) -> None:
        """Import IPython in the background, so the first magic cell rarely waits for it."""
        if self._thread is None and not self._imported.is_set():
            self._thread = threading.Thread(target=self._import, daemon=True,
                                            name="ipython-import")
            self._guard_imports()
            self._thread.start()

    def claim_import(self) -> None:
        """Say that the calling thread imports IPython (then call :meth:`run_import`)."""
        self._thread = threading.current_thread()
        self._guard_imports()

    def _guard_imports(self) -> None:
        """While the background thread imports IPython, another thread's import of IPython's
        own modules (a cell's, a library's) first waits for it to end.

        Two threads importing IPython at once can each hold a part the other needs; Python
        then hands one of them a half-made module rather than deadlock ("cannot import name
        'InteractiveShell'"). Waiting in ``__import__``, before the import takes any lock of
        its own, avoids that without making cells that never touch IPython wait: the first
        cell of a new kernel runs at once. Installed for the import's time only."""
        original = builtins.__import__
        imported, importer = self._imported, self._thread

        def guarded(name: str, globals: Any = None, locals: Any = None,
                    fromlist: Any = (), level: int = 0) -> Any:
            if (level == 0 and name.startswith("IPython") and name[7:8] in ("", ".")
                    and not imported.is_set()
                    and threading.current_thread() is not importer):
                imported.wait()
            return original(name, globals, locals, fromlist, level)

        def unguard() -> None:
            if builtins.__import__ is guarded:
                builtins.__import__ = original

        builtins.__import__ = guarded
        self._unguard = unguard

    _unguard: Any = None

    def run_import(self) -> None:
        """Import IPython in the calling thread (the one that claimed the import)."""
        self._import()

    def _import(self) -> None:
        background = threading.current_thread() is not threading.main_thread()
        try:
            import IPython.core.interactiveshell
            import IPython.core.magics  # noqa: F401
        except BaseException as exc:  # any failure means: no IPython here
            if background:
                # Maybe only a clash with an import of the main thread's (Python's import
                # deadlock detection fails one of them): tried again when a cell needs it.
                self._retry = True
            else:
                self.problem = f"{type(exc).__name__}: {exc}"
        finally:
            self._imported.set()
            if self._unguard is not None:
                self._unguard()

    _retry = False

    def importing(self) -> bool:
        """Whether the background import is still running."""
        return self._thread is not None and not self._imported.is_set()

    def get(self, wait: bool = True) -> Any:
        """The shell, made on first use; None when IPython cannot be imported here, or (with
        ``wait`` false) while it is still being imported."""
        if self.shell is not None or self.problem is not None:
            return self.shell
        if not self._imported.is_set():
            if not wait:
                return None
            if self._thread is None:
                self._import()
            else:
                self._imported.wait()
        if self._retry:
            if not wait or threading.current_thread() is not threading.main_thread():
                return None
            self._retry = False
            self._import()
        if self.problem is not None:
            return None
        with self._lock:
            if self.shell is None:
                self._creating = True
                try:
                    self.shell = make_shell(self.agent, self.tier, self.processes)
                except Exception as exc:
                    self.problem = f"{type(exc).__name__}: {exc}"
                    return None
                finally:
                    self._creating = False
        return self.shell

    def route_singleton(self, module: Any) -> None:
        """Make ``InteractiveShell.initialized()`` (what ``IPython.get_ipython()`` and
        ``IPython.display.display`` ask) make the agent's shell when a cell's code asks, so a
        library that looks for IPython finds it as in a notebook. Only on the main thread
        while a cell runs: the shell writes to the cell namespace as it is made."""
        loader = self

        def initialized(cls: Any) -> bool:
            if (loader.shell is None and not loader._creating and loader.problem is None
                    and loader.agent.in_cell
                    and threading.current_thread() is threading.main_thread()
                    and not _ipython_importing()):
                loader.get()
            return getattr(cls, "_instance", None) is not None

        module.InteractiveShell.initialized = classmethod(initialized)

    def missing(self) -> str:
        """The error text for an IPython cell where IPython cannot be imported."""
        return (f"this cell uses IPython syntax (a %magic, !command or obj?), but IPython "
                f"cannot be imported in the {self.tier} tier ({self.problem}); write it as "
                f"plain Python, or run it in a %%tier native cell")


def _ipython_importing() -> bool:
    """Whether a module of IPython is being imported right now (IPython asks for its shell
    while it imports itself; making the shell then would import it circularly)."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items())
               if name == "IPython" or name.startswith("IPython."))


class _RouteOnImport:
    """First on ``sys.meta_path``: when ``IPython.core.interactiveshell`` is imported (by
    anyone), its module is handed to :meth:`ShellLoader.route_singleton` once it has run.
    Finds nothing else itself."""

    _NAME = "IPython.core.interactiveshell"

    def __init__(self, loader: ShellLoader) -> None:
        self.loader = loader

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self._NAME:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _RoutingLoader(spec.loader, self.loader)
        return spec


class _RoutingLoader:
    """The module's own loader (its other methods too: sources for tracebacks), which routes
    the singleton once the module has run."""

    def __init__(self, original: Any, loader: ShellLoader) -> None:
        self._original = original
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def create_module(self, spec: Any) -> Any:
        return self._original.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._original.exec_module(module)
        self._loader.route_singleton(module)


def make_shell(agent: Any, tier: str, processes: bool) -> Any:
    """Create the agent's ``InteractiveShell`` (see the module docstring)."""
    import tempfile

    from IPython.core import displaypub, error, interactiveshell
    from traitlets.config import Config

    # Any: IPython is partly typed, and this module is checked without its stubs.
    DisplayPublisher: Any = displaypub.DisplayPublisher
    InteractiveShell: Any = interactiveshell.InteractiveShell
    UsageError: Any = error.UsageError

    class AgentDisplayPublisher(DisplayPublisher):  # type: ignore[misc]
        """``display()`` output goes through the agent's channel to the notebook."""

        def publish(self, data: Any, metadata: Any = None, source: Any = None, *,
                    transient: Any = None, update: bool = False, **kwargs: Any) -> None:
            agent.send_display(data, metadata or {}, transient=transient, update=update)

        def clear_output(self, wait: bool = False) -> None:
            agent.send_clear_output(wait)

    def refuse(name: str, why: str) -> Any:
        def refused(line: str = "", cell: str | None = None) -> None:
            raise UsageError(f"%{name} is not available in the {tier} tier: {why}; run it in "
                             "a %%tier native cell")
        return refused

    class TierShell(InteractiveShell):  # type: ignore[misc]
        """The guest tier's shell: output, processes and matplotlib go the agent's way."""

        def init_sys_modules(self) -> None:
            # IPython puts its user module in sys.modules["__main__"]; the agent keeps its own
            # (in wasm, __main__'s globals ARE the namespace and must not be replaced).
            pass

        def init_virtualenv(self) -> None:
            # The guest's interpreter is what it is; no venv warning in a cell's output.
            pass

        def init_history(self) -> None:
            super().init_history()
            # In/Out are the agent's own lists, kept for every cell (see Agent._history).
            manager = self.history_manager
            manager.input_hist_parsed = agent.history_in
            manager.input_hist_raw = agent.history_in
            manager.output_hist = agent.history_out

        def system(self, cmd: str) -> None:
            """``!cmd`` and aliases (``%ls``): the agent's streaming shell line."""
            agent.system(self.var_expand(cmd, depth=1))

        system_piped = system_raw = system

        def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
            """``x = !cmd``: where the tier has no processes, the agent's clear error."""
            if not processes:
                agent.system(cmd)  # raises, saying the tier has no processes
            return super().getoutput(cmd, split=split, depth=depth + 1)

        def enable_gui(self, gui: Any = None) -> None:
            """No GUI event loop runs in a tier (``%gui`` itself is refused, naming the tier);
            matplotlib calls this as pyplot loads, and its figures are shown inline."""

        def enable_matplotlib(self, gui: Any = None) -> tuple[Any, str]:
            """``%matplotlib [inline]``: the agent's inline backend (figures as images at the
            end of the cell, or at ``plt.show()``); any other backend is refused."""
            if gui not in (None, "inline", "auto"):
                raise UsageError(f"matplotlib backend {gui!r} is not available in the {tier} "
                                 "tier, which shows figures inline only: use "
                                 "'%matplotlib inline' (or run the cell in %%tier native)")
            backend = f"module://{agent.mpl_backend}"
            os.environ["MPLBACKEND"] = backend
            if "matplotlib" in sys.modules:  # else the environment variable is enough
                import matplotlib

                if "matplotlib.pyplot" in sys.modules:
                    sys.modules["matplotlib.pyplot"].switch_backend(backend)
                else:
                    matplotlib.use(backend)
            return "inline", backend

        def enable_pylab(self, gui: Any = None, import_all: bool = True,
                         welcome_message: bool = False) -> tuple[Any, str]:
            gui, backend = self.enable_matplotlib(gui)
            from IPython.core.pylabtools import import_pylab

            ns: dict[str, Any] = {}
            import_pylab(ns, import_all)
            self.user_ns.update(ns)
            return gui, backend

    config = Config()
    config.HistoryManager.enabled = False
    config.HistoryManager.hist_file = ":memory:"
    config.IPCompleter.use_jedi = False
    config.InteractiveShell.autocall = 0
    config.InteractiveShell.colors = "nocolor" if _ipython_major() >= 9 else "NoColor"
    ipython_dir = tempfile.mkdtemp(prefix="tierkernel-ipython-")
    shell = TierShell(config=config, user_ns=agent.namespace, ipython_dir=ipython_dir,
                      display_pub_class=AgentDisplayPublisher)
    # The singleton IPython.display, get_ipython() and libraries look for.
    for cls in TierShell.mro():
        if isinstance(cls, type) and issubclass(cls, InteractiveShell):
            cls._instance = shell  # type: ignore[attr-defined]
    shell.execution_count = agent.execution_count
    namespace = agent.namespace
    # IPython's exit/quit/open differ from Python's; a cell sees the same builtins whether
    # or not the shell was made.
    for name in ("exit", "quit", "open"):
        namespace.pop(name, None)
        shell.user_ns_hidden.pop(name, None)
    namespace["In"], namespace["_ih"] = agent.history_in, agent.history_in
    namespace["Out"], namespace["_oh"] = agent.history_out, agent.history_out
    shell.user_ns_hidden.update({name: namespace.get(name) for name in agent.hidden_names})
    builtins.display = agent.display  # type: ignore[attr-defined]
    builtins.get_ipython = agent.get_ipython  # type: ignore[attr-defined]
    refused = dict(REFUSED_EVERYWHERE)
    if not processes:
        refused.update(REFUSED_WITHOUT_PROCESSES)
    for name, why in refused.items():
        shell.register_magic_function(refuse(name, why), "line", name)
        shell.register_magic_function(refuse(name, why), "cell", name)
    register_line_magics(shell, agent.line_magics)
    _register_inline_config(shell)
    agent.hidden_frames = _hidden_frame_prefixes()
    return shell


def register_line_magics(shell: Any, magics: dict[str, Any]) -> None:
    """Register the agent's own line magics (they win over IPython's of the same name)."""
    registered = shell.magics_manager.magics["line"]
    for name, func in magics.items():
        if registered.get(name) is not func:
            shell.register_magic_function(func, "line", name)


def _ipython_major() -> int:
    import IPython

    try:
        return int(str(IPython.__version__).split(".")[0])
    except ValueError:
        return 0


def _register_inline_config(shell: Any) -> None:
    """Let ``%config InlineBackend.figure_format = 'retina'`` be set (and read by the agent's
    inline backend) where matplotlib_inline is importable; it imports no matplotlib."""
    name = "matplotlib_inline.config"
    try:
        module = sys.modules.get(name)
        if module is None:
            # The module alone: the package's __init__ imports matplotlib (seconds in wasm).
            # Importing the package later finds this module and keeps its singleton.
            import importlib.util

            package = importlib.util.find_spec("matplotlib_inline")
            locations = list(package.submodule_search_locations or ()) if package else []
            if not locations:
                return
            spec = importlib.util.spec_from_file_location(
                name, os.path.join(locations[0], "config.py"))
            if spec is None or spec.loader is None:
                return
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        inline = module.InlineBackend
    except Exception:  # %config then says InlineBackend is unknown
        return
    shell.configurables.append(inline.instance(parent=shell))


def figure_format() -> tuple[str, dict[str, Any]]:
    """The InlineBackend's figure format and savefig keywords, if it was configured."""
    config = sys.modules.get("matplotlib_inline.config")
    backend = getattr(config, "InlineBackend", None)
    if backend is None or not backend.initialized():
        return "png", {}
    inline = backend.instance()
    formats = [f for f in FIGURE_FORMATS if f in set(inline.figure_formats)]
    return (formats[0] if formats else "png"), dict(inline.print_figure_kwargs or {})


def _hidden_frame_prefixes() -> tuple[str, ...]:
    """Folders of the glue between a cell and a magic, whose frames a traceback leaves out
    (as IPython shows a UsageError without them)."""
    prefixes = []
    for name in ("IPython", "traitlets", "decorator"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(path) if name != "decorator" else path)
    return (*prefixes, "<tierkernel ishell>")


def transform(shell: Any, code: str) -> str:
    """IPython's input transformation of a cell (magics, ``!cmd``, ``obj?``) into Python."""
    return str(shell.transform_cell(code))


def is_usage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is IPython's UsageError (shown as its message alone, as IPython does)."""
    error = sys.modules.get("IPython.core.error")
    return error is not None and isinstance(exc, error.UsageError)


def run_events(shell: Any, event: str, *args: Any) -> None:
    """Fire a shell event (``pre_run_cell``, ``post_run_cell``...) that someone listens to
    (``%load_ext autoreload`` does); nothing is made when nobody does."""
    if shell.events.callbacks.get(event):
        shell.events.trigger(event, *args)


def execution_info(code: str) -> Any:
    """The ExecutionInfo a ``pre_run_cell`` listener receives."""
    from IPython.core import interactiveshell

    ExecutionInfo: Any = interactiveshell.ExecutionInfo
    try:
        return ExecutionInfo(code, True, False, True, None)
    except TypeError:  # an IPython before cell ids
        return ExecutionInfo(code, True, False, True)


def execution_result(info: Any, error: BaseException | None) -> Any:
    """The ExecutionResult a ``post_run_cell`` listener receives."""
    from IPython.core import interactiveshell

    ExecutionResult: Any = interactiveshell.ExecutionResult
    result = ExecutionResult(info)
    result.error_in_exec = error
    return result
