"""TierKernel: IPython's kernel, with every cell routed to the tier it asks for."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Enum, Float, List, Type, Unicode, default

from tierkernel import __version__
from tierkernel.backends import cell_look
from tierkernel.backends.base import (
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    KernelHandle,
    LogEntry,
    ResourceUsage,
)
from tierkernel.errors import (
    CellTooLargeError,
    InputNotAllowed,
    TierError,
    TierUnavailableError,
    TierUsageError,
)
from tierkernel.fsx import Fsx, set_current
from tierkernel.kernel import completion
from tierkernel.kernel.auto import AutoTier, Choice, assigned, reads_to_send, split_floor
from tierkernel.kernel.iopub import HeldErrors, IopubSink
from tierkernel.kernel.no_debugger import without_debugpy
from tierkernel.kernel.quick_reply import (
    cell_ran_outside,
    flush_skipped,
    install_flush_skip,
    mark_cell,
    pause_before_reply,
)
from tierkernel.kernel.router import Route, TierRouter
from tierkernel.kernel.stdin import NO_STDIN, StdinRequester
from tierkernel.kernel.values import ValueExchange, commands, run_command
from tierkernel.magics.executions import ExecutionMagics
from tierkernel.magics.fsx import FsxMagics
from tierkernel.magics.parsing import CellDirective, split_cell
from tierkernel.magics.tier import TierMagics, strip_native_line
from tierkernel.magics.values import ValueMagics
from tierkernel.runtime.host import RuntimeHost
from tierkernel.sizes import ByteSize

log = logging.getLogger(__name__)

_RED = "\x1b[0;31m"
_RESET = "\x1b[0m"

#: Seconds a new kernel waits for a request before it warms its tiers: a request sent as the
#: client's channels opened is waiting in the socket by the time the event loop runs, and is
#: dispatched within a few milliseconds (the warm start then begins once it is answered).
WARM_GRACE = 0.02


class _NoSink:
    """The sink given to in-kernel tiers, whose output IPython publishes itself."""

    def stream(self, name: str, text: str) -> None:
        """Unused: IPython publishes native output."""

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Unused: IPython publishes native output."""

    def result(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Unused: IPython publishes native output."""

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """Unused: IPython publishes native output."""

    def clear_output(self, wait: bool = False) -> None:
        """Unused: IPython publishes native output."""

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Unused: a native cell's input() is ipykernel's."""
        raise InputNotAllowed(NO_STDIN)


def _failed(tier: str, sink: Any, ename: str, evalue: str, took: float) -> ExecResult:
    """A cell's error said by the kernel itself (one line, no traceback of the kernel's own
    code), published through ``sink``, as the cell's result."""
    error = ExecError(ename, evalue, [f"{_RED}{ename}{_RESET}: {evalue}"])
    sink.error(error.ename, error.evalue, error.traceback)
    return ExecResult(False, tier, took, error=error)


class TierKernel(IPythonKernel):
    """An IPython kernel in which each cell chooses its tier with ``%%tier NAME``.

    Cells without the magic run in :attr:`default_tier`. Native cells go through IPython
    unchanged; other tiers get the cell through the backend contract and publish through an
    :class:`IopubSink`. Every execute_reply carries ``metadata.tierkernel = {tier,
    duration_ms, success, execution_id}`` and what the cell used (``cpu_seconds``,
    ``peak_memory_bytes``, ``processes``, measured on the host); the id is the cell's record
    in the audit log (``%executions ID``).
    """

    implementation = "tierkernel"
    implementation_version = __version__
    #: Never used: the kernel has no debugger (see ``no_debugger.py``). ipykernel's default
    #: names its ``Debugger`` as a string, which traitlets would import (and debugpy with it)
    #: as the kernel is made.
    debugger_class = Type(object)
    #: ipykernel's ``_execute_sleep`` for native cells (its default); see ``_execute_sleep``.
    _native_execute_sleep = 0.0005

    default_tier = Unicode(
        help="Tier for cells without %%tier. Defaults to $TIERKERNEL_DEFAULT_TIER, else 'native'."
    ).tag(config=True)

    completion_timeout = Float(
        1.0, min=0.0,
        help="Seconds Tab completion and inspection (Shift-Tab, obj?) of a cell that runs in "
        "another tier than native wait for that tier's interpreter; past it the answer is "
        "empty. A tier that is not running, or is running a cell, answers empty at once.",
    ).tag(config=True)

    warm_after_idle = Float(
        0.0, min=0.0,
        help="0 (the default): the tiers configured to start early (warm_start) start in the "
        "background as the kernel starts, so a first sandbox or wasm cell sent the moment the "
        "kernel answers finds its tier ready. More: seconds the kernel stays idle after "
        "answering a request before it starts them, so that cells sent sooner (a script's "
        "native cells) do not share the CPU with a starting sandbox or wasm session; a first "
        "cell of those tiers sent sooner then starts its tier itself.",
    ).tag(config=True)

    value_limit = ByteSize(
        256 << 20, minimum=1 << 10,
        help="Most bytes of variables one --in, --out, %get or %put moves between the kernel "
        "and a tier (e.g. 1g); a bigger move fails with what it would take. What a tier sends "
        "is also held to 64 levels of nesting and a million elements (put more in a numpy "
        "array or a DataFrame).",
    ).tag(config=True)

    auto_notice = Enum(
        ["changes", "always", "never"], "changes",
        help="When a %tier auto cell shows a line naming the tier it chose and why: when the "
        "tier differs from the previous auto cell's (and always when a cell runs again one "
        "tier up), always, or never (the reply's metadata and %executions have it anyway).",
    ).tag(config=True)

    allowed_tiers = List(
        Unicode(), None, allow_none=True,
        help="When set, the only tiers this kernel runs cells in; a cell for another tier, "
        "and a %tier line (which runs in the kernel's own IPython) unless 'native' is listed, "
        "is refused. For kernels that run code on behalf of others (tierkernel serve): a "
        "cell's own %%tier line cannot reach a tier left out here.",
    ).tag(config=True)

    fixed_options = List(
        Unicode(), [],
        help="%%tier options (without --) no cell or %tier line may set in this kernel, so the "
        "configured value holds: e.g. ['runtime', 'memory', 'cpus'] keeps every sandbox cell "
        "in the configured runtime and limits. tierkernel serve sets it for its sessions.",
    ).tag(config=True)

    @default("default_tier")
    def _default_tier_from_env(self) -> str:
        return os.environ.get("TIERKERNEL_DEFAULT_TIER", "").strip() or "native"

    @property
    def banner(self) -> str:  # type: ignore[override]
        """IPython's banner, with a line on tiers (what ``jupyter console`` shows first)."""
        shell = self.shell
        base = str(shell.banner) if shell is not None else ""
        return (f"{base}tierkernel {__version__}: cells run in the {self.router.default!r} tier; "
                "'%%tier NAME' on a cell's first line picks another, '%tier' lists them.\n")

    def __init__(self, **kwargs: Any) -> None:
        with without_debugpy():
            super().__init__(**kwargs)
        self.router = TierRouter(self, self.default_tier, self.allowed_tiers,
                                 self.fixed_options)
        shell = self.shell
        assert shell is not None
        self.router.attach(KernelHandle(shell, self.run_ipython_cell))
        shell.register_magics(TierMagics(shell, self.router))
        shell.input_transformers_cleanup.append(strip_native_line)
        self._tier_meta: dict[str, dict[str, Any]] = {}
        #: Tiers running a cell now: completion and inspection do not ask them.
        self._running_tiers: set[str] = set()
        # The runtime helpers (ai, api, db, console) and the audit log of every cell.
        self.runtime = RuntimeHost(self, str(getattr(self.session, "session", "") or self.ident))
        shell.register_magics(ExecutionMagics(shell, self.runtime))
        # --in, --out, %get, %put: variables between this namespace and the tiers.
        self.values = ValueExchange(shell.user_ns, self.router.backend,
                                    lambda backend: self.router.options_for(backend, []),
                                    self.runtime.audit, self.value_limit)
        shell.register_magics(ValueMagics(shell, self.values.table))
        self.auto = AutoTier(self.router.backends)
        helpers = self.runtime.native_helpers()
        shell.user_ns.update(helpers)
        shell.user_ns_hidden.update(helpers)  # kept out of %who and %reset, like In/Out
        atexit.register(self.router.shutdown)
        # The shared workspace: `fs` and %fsx in native cells, fsx:// URLs in this process.
        # Opened on first use, so a kernel that never touches it creates no file.
        self.fsx = Fsx(parent=self).facade()
        set_current(self.fsx)
        shell.push({"fs": self.fsx}, interactive=False)
        shell.register_magics(FsxMagics(shell, self.fsx))
        atexit.register(self.fsx.close)

    def start(self) -> None:
        """Start ipykernel's dispatchers and, unless :attr:`warm_after_idle` asks to wait for
        the kernel to be idle (see :meth:`post_handler_hook`), warm the tiers configured to
        start early as soon as the requests already waiting are answered."""
        super().start()
        install_flush_skip()
        if not self.warm_after_idle:
            self.io_loop.add_callback(self.router.warm_soon, WARM_GRACE)

    def pre_handler_hook(self) -> None:
        """Called by ipykernel before each shell request's handler: the kernel is busy (see
        :meth:`TierRouter.request_started`)."""
        super().pre_handler_hook()
        self.router.request_started()

    def post_handler_hook(self) -> None:
        """Called by ipykernel after each shell request's handler (its reply is sent): the
        tiers configured to start early are warmed once the kernel has stayed idle for
        :attr:`warm_after_idle` (see :meth:`TierRouter.request_ended`)."""
        super().post_handler_hook()
        self.router.request_ended(self.warm_after_idle)

    # -- execution ------------------------------------------------------------------------
    @property
    def _execute_sleep(self) -> float:
        """ipykernel's pause before each reply; none for cells that ran outside IPython. A
        native cell's audit record is committed in it (it lasts what is left)."""
        if cell_ran_outside():
            return 0.0
        return pause_before_reply(self._native_execute_sleep, self.runtime.commit_records)

    @_execute_sleep.setter
    def _execute_sleep(self, value: float) -> None:
        self._native_execute_sleep = value

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        """Route the cell to its tier and return the execute_reply content."""
        started = time.perf_counter()
        parent = self.get_parent("shell")
        msg_id = parent.get("header", {}).get("msg_id", "")
        tier = self.router.default
        value_commands = commands(code)
        if value_commands is not None:
            return await self._run_value_commands(code, value_commands, silent, store_history,
                                                  parent, cell_id, started, msg_id)
        choice: Choice | None = None
        try:
            directive = split_cell(code)
            tier = directive.tier or tier
            self.runtime.check_size(code)
            if directive.control:
                route = Route(self.router.backend("native"), {}, code, 1)
            elif directive.tier == "auto" or (directive.tier is None
                                              and self.router.default == "auto"):
                route, choice = self._route_auto(directive)
                tier = choice.tier
            else:
                route = self.router.resolve(directive)
        except (TierUsageError, TierUnavailableError, CellTooLargeError) as exc:
            mark_cell(True)  # the refusal is published through a sink, not sys.stdout
            reply = self._refuse(code, silent, store_history, parent, exc)
            execution_id = self.runtime.refuse(code, tier, cell_id, reply["execution_count"],
                                               exc, time.perf_counter() - started)
            self._record(msg_id, tier, started, False, execution_id)
            return reply

        mark_cell(not route.backend.in_kernel)
        shell = self.shell
        assert shell is not None
        request = CellRequest(
            code=code,
            body=route.body,
            tier=route.backend.name,
            options=route.options,
            execution_count=shell.execution_count,
            first_line=route.first_line,
            silent=silent,
            store_history=store_history,
            user_expressions=user_expressions or {},
            allow_stdin=allow_stdin,
            cell_id=cell_id,
            cell_meta=cell_meta,
        )
        context = self.runtime.begin(code, route.backend.name, route.backend.in_kernel,
                                     route.options, cell_id, request.execution_count)
        if route.backend.in_kernel and route.options.get("in"):
            try:  # what the cell reads from other tiers, before IPython runs it
                await self.values.fetch_missing(tuple(route.options["in"]), "native",
                                                context.execution_id)
            except Exception as exc:  # every cell gets a reply, whatever a tier sent
                mark_cell(True)
                reply = self._refuse(code, silent, store_history, parent, exc)
                self.runtime.finish(context, ExecResult(
                    False, "native", 0.0, error=ExecError(type(exc).__name__, str(exc))),
                    time.perf_counter() - started)
                self._record(msg_id, "native", started, False, context.execution_id)
                return reply
        self._running_tiers.add(route.backend.name)
        try:
            if route.backend.in_kernel:
                result = await route.backend.execute(request, _NoSink())
            elif choice is not None:
                result, choice = await self._run_auto(route, request, parent,
                                                      context.execution_id, choice)
            else:
                result = await self._run_isolated(route.backend, request, parent,
                                                  context.execution_id)
        except BaseException as exc:  # recorded, then raised on for ipykernel to handle
            self._running_tiers.discard(route.backend.name)
            self.runtime.finish(context, ExecResult(
                False, route.backend.name, 0.0,
                error=ExecError(type(exc).__name__, str(exc))), time.perf_counter() - started)
            mark_cell(False)
            raise
        self._running_tiers.discard(route.backend.name)
        if choice is not None:
            result.logs.append(LogEntry("info", f"%tier auto ran it in {choice.tier}: "
                                                f"{choice.reason}"))
        if result.success and (choice is not None or self.values.holdings):
            sent_back = set(route.options.get("out") or ())  # the kernel has their values too
            self.values.assigned_in(result.tier, assigned(route.body) - sent_back)
        self.runtime.finish(context, result, time.perf_counter() - started)
        reply = self._reply(result)
        self._record(msg_id, result.tier, started, result.success,
                     context.execution_id, result.usage)
        if choice is not None:
            self._tier_meta[msg_id]["auto"] = choice.metadata()
        return reply

    def _route_auto(self, directive: CellDirective) -> tuple[Route, Choice]:
        """The route of an auto cell (``kernel/auto.py``): the chosen tier, the line's other
        options for it, and the variables the cell reads as ``--in``."""
        floor, rest = split_floor(self._auto_args(directive))
        choice = self.auto.choose(directive.body, floor,
                                  self.values.living(cell_look.names(directive.body)[0]))
        return self._auto_route(directive, rest, choice), choice

    def _auto_args(self, directive: CellDirective) -> list[str]:
        """The words of the auto line that applies: the cell's own, or ``%tier auto``'s."""
        return directive.args if directive.tier == "auto" else self.router.auto_args

    def _auto_route(self, directive: CellDirective, rest: list[str], choice: Choice) -> Route:
        shell = self.shell
        assert shell is not None
        route = self.router.resolve(dataclasses.replace(directive, tier=choice.tier, args=rest,
                                                        has_magic=True))
        sent = reads_to_send(route.body, shell.user_ns, set(shell.user_ns_hidden),
                             self.values.holdings, choice.tier)
        if sent:
            given = tuple(route.options.get("in") or ())
            route = dataclasses.replace(route, options={
                **route.options, "in": tuple(dict.fromkeys(given + sent))})
        return route

    async def _run_auto(self, route: Route, request: CellRequest, parent: dict[str, Any],
                        execution_id: str | None, choice: Choice,
                        ) -> tuple[ExecResult, Choice]:
        """Run an auto cell in its chosen tier; when it fails there for a capability before
        any output, run it once more one tier up (``AutoTier.escalation``)."""
        note = self.auto.note(choice, self.auto_notice)
        backend, counted = route.backend, True
        directive = split_cell(request.code)
        rest = split_floor(self._auto_args(directive))[1]
        while True:
            following: list[tuple[Choice, Route]] = []

            def escalate(result: ExecResult, current: Choice = choice,
                         found: list[tuple[Choice, Route]] = following) -> bool:
                error = result.error
                up = self.auto.escalation(current, error.ename) if error else None
                if up is None:
                    return False
                try:  # the tier up must be there and take the cell, or the error stands
                    target = self.router.backends[up.tier]
                    if target.can_run(directive.body) is not None:
                        return False
                    found.append((up, self._auto_route(directive, rest, up)))
                except Exception:
                    log.info("no run again in tier %r", up.tier, exc_info=True)
                    return False
                return True

            result = await self._run_isolated(backend, request, parent, execution_id,
                                              escalate=escalate, note=note, count=counted)
            if not following:
                return result, choice
            (choice, route), counted = following[0], False
            note = self.auto.note(choice, self.auto_notice)
            backend = route.backend
            request = dataclasses.replace(request, tier=backend.name, options=route.options)

    async def run_ipython_cell(self, request: CellRequest) -> dict[str, Any]:
        """Run a cell through IPython exactly as ipykernel would (the native tier's engine)."""
        return await super().do_execute(  # type: ignore[no-any-return]
            request.code,
            request.silent,
            request.store_history,
            request.user_expressions,
            request.allow_stdin,
            cell_meta=request.cell_meta,
            cell_id=request.cell_id,
        )

    async def _run_isolated(
        self, backend: Backend, request: CellRequest, parent: dict[str, Any],
        execution_id: str | None = None,
        escalate: Callable[[ExecResult], bool] | None = None,
        note: str | None = None, count: bool = True,
    ) -> ExecResult:
        """Run a cell in a tier outside IPython, owing what IPython's run_cell would do.

        With ``escalate`` (an auto cell that may run again one tier up), the cell's errors are
        held until it ends: when it printed nothing and ``escalate(result)`` says it runs
        again, they are dropped. ``note`` is a line shown first; ``count`` False for the run
        again, whose cell was counted already."""
        shell = self.shell
        assert shell is not None
        if count:
            self._count_cell(request.code, request.store_history)
        # The stdin channel's reply goes to the client of this execute_request (its routing
        # identity, kept by ipykernel in a context variable of the request's task).
        ident = self._get_shell_context_var(self._shell_parent_ident)
        stdin = StdinRequester(self, parent, ident, request.allow_stdin)
        sink: Any = IopubSink(self.session, self.iopub_socket, self._topic, parent,
                              request.execution_count, request.silent, stdin)
        if self.router.notice:
            sink.stream("stderr", self.router.notice + "\n")
            self.router.notice = ""
        if note:
            sink.stream("stderr", note + "\n")
        held = HeldErrors(sink) if escalate is not None else None
        if held is not None:
            sink = held
            workspace_before = self._workspace_token()
        started = time.perf_counter()
        stopped = threading.Event()
        previous = self._route_sigint(backend, stopped)
        try:
            names_in = tuple(request.options.get("in") or ())
            names_out = tuple(request.options.get("out") or ())
            moved = None
            if names_in or names_out:
                try:
                    inputs = (await self.values.gather(names_in, backend.name, execution_id)
                              if names_in else None)
                except Exception as exc:  # the cell is not run; the kernel says why
                    moved = _failed(backend.name, sink, type(exc).__name__, str(exc),
                                    time.perf_counter() - started)
                else:
                    request = dataclasses.replace(request, inputs=inputs, outputs=names_out,
                                                  values_limit=self.value_limit)
            if moved is not None:
                result = moved
            else:
                await backend.start()
                if stopped.is_set():
                    # Stopped while the tier was starting: the tier had no cell to stop, so
                    # the cell must not run now.
                    result = _failed(backend.name, sink, "KeyboardInterrupt",
                                     f"interrupted while the {backend.name!r} tier was "
                                     "starting; the cell did not run",
                                     time.perf_counter() - started)
                else:
                    result = await backend.execute(request, sink)
                    if names_out:
                        result = await asyncio.to_thread(
                            self.values.take, backend.name, names_out, result, sink,
                            execution_id)
                    if held is not None and escalate is not None:
                        wrote = result.workspace_changed or (
                            workspace_before is None
                            or self._workspace_token() != workspace_before)
                        if (not result.success and not held.produced and not wrote
                                and not result.helper_calls and escalate(result)):
                            held.drop()
                        held.release()
        except Exception as exc:  # a tier failure, not a failure of the user's code
            self.log.exception("tier %r failed", backend.name)
            result = _failed(backend.name, sink, TierError.__name__,
                             f"the {backend.name!r} tier failed: {exc}. The kernel is fine; "
                             "other tiers keep working. Run %tier to check the tier's status.",
                             time.perf_counter() - started)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            sink.close()
        return result

    async def _run_value_commands(
        self, code: str, lines: list[tuple[str, list[str]]], silent: bool,
        store_history: bool, parent: dict[str, Any], cell_id: str | None, started: float,
        msg_id: str,
    ) -> dict[str, Any]:
        """A cell of ``%get`` / ``%put`` / ``%tiervars`` lines (``kernel/values.py``): run by
        the kernel, since each may wait for a tier; audited as a native cell."""
        shell = self.shell
        assert shell is not None
        mark_cell(True)  # its output goes through a sink, not sys.stdout
        count = shell.execution_count
        self._count_cell(code, store_history)
        context = self.runtime.begin(code, "native", True, {}, cell_id, count)
        sink = IopubSink(self.session, self.iopub_socket, self._topic, parent, count, silent)
        result = ExecResult(True, "native", 0.0)
        try:
            for command, words in lines:
                text = await run_command(self.values, command, words, self.router.names,
                                         context.execution_id)
                sink.stream("stdout", text + "\n")
        except Exception as exc:  # every cell gets a reply, whatever a tier sent
            result = _failed("native", sink, type(exc).__name__, str(exc), 0.0)
        finally:
            sink.close()
        result.duration = time.perf_counter() - started
        self.runtime.finish(context, result, time.perf_counter() - started)
        self._record(msg_id, "native", started, result.success, context.execution_id)
        return self._reply(result)

    def _workspace_token(self) -> object | None:
        """The fsx workspace's change token (every tier's writes reach fsx by the end of
        its cell), or None when the workspace cannot tell or be opened."""
        try:
            return self.fsx.engine.change_token()
        except Exception:
            return None

    def _route_sigint(self, backend: Backend, stopped: threading.Event) -> Any:
        """While an outside tier runs, the stop button (SIGINT) interrupts that tier (and
        sets ``stopped``)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            stopped.set()
            backend.interrupt()

        return signal.signal(signal.SIGINT, on_sigint)

    def _count_cell(self, code: str, store_history: bool) -> None:
        """What IPython does for every cell it runs: history entry, then the next count."""
        shell = self.shell
        assert shell is not None
        if store_history:
            shell.history_manager.store_inputs(shell.execution_count, code)
            shell.execution_count += 1

    def _reply(self, result: ExecResult) -> dict[str, Any]:
        shell = self.shell
        assert shell is not None
        reply: dict[str, Any] = {
            "status": "ok" if result.success else "error",
            "execution_count": shell.execution_count - 1,
            "user_expressions": result.user_expressions if result.success else {},
            "payload": result.payload,
        }
        if not result.success:
            error = result.error or ExecError("Error", "the cell failed", [])
            reply.update(ename=error.ename, evalue=error.evalue, traceback=error.traceback)
        return reply

    def _refuse(
        self,
        code: str,
        silent: bool,
        store_history: bool,
        parent: dict[str, Any],
        exc: Exception,
    ) -> dict[str, Any]:
        """A cell whose %%tier line is wrong: one clear error, nothing run."""
        shell = self.shell
        assert shell is not None
        count = shell.execution_count
        self._count_cell(code, store_history)
        ename, evalue = type(exc).__name__, str(exc)
        traceback = [f"{_RED}{ename}{_RESET}: {evalue}"]
        sink = IopubSink(self.session, self.iopub_socket, self._topic, parent, count, silent)
        sink.error(ename, evalue, traceback)
        sink.close()
        return {
            "status": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": traceback,
            "execution_count": shell.execution_count - 1,
            "user_expressions": {},
            "payload": [],
        }

    # -- reply metadata -------------------------------------------------------------------
    def _record(self, msg_id: str, tier: str, started: float, success: bool,
                execution_id: str | None = None, usage: ResourceUsage | None = None) -> None:
        info: dict[str, Any] = {
            "tier": tier,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "success": success,
        }
        if execution_id is not None:
            info["execution_id"] = execution_id
        if usage is not None:
            info.update(usage.as_metadata())
        self._tier_meta[msg_id] = info

    def finish_metadata(
        self, parent: dict[str, Any], metadata: dict[str, Any], reply_content: dict[str, Any]
    ) -> dict[str, Any]:
        """Add ``tierkernel: {tier, duration_ms, success, execution_id}`` to every
        execute_reply (no execution_id for a cell aborted after an earlier error: it never
        ran), with what the cell used where its tier measures it on the host:
        ``cpu_seconds``, ``peak_memory_bytes`` and (sandbox, runc) ``processes``."""
        # The pre-reply flush and sleep are behind us: what a skipped flush found empty and
        # has text now goes first; then the mark do_execute set ends.
        flush_skipped()
        mark_cell(False)
        self.runtime.commit_records()  # the cell's audit record is in the file before its reply
        metadata = super().finish_metadata(parent, metadata, reply_content)
        info = self._tier_meta.pop(parent.get("header", {}).get("msg_id", ""), None)
        if info is None and parent.get("header", {}).get("msg_type") == "execute_request":
            # Aborted after an earlier error: it never ran, but say where it would have.
            code = parent.get("content", {}).get("code", "")
            try:
                tier = split_cell(code).tier or self.router.default
            except TierUsageError:
                tier = self.router.default
            info = {"tier": tier, "duration_ms": 0.0, "success": False}
        if info is not None:
            metadata["tierkernel"] = info
        return metadata

    # -- completion and inspection ------------------------------------------------------
    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        """Tab: IPython's matches for native cells; the cell's tier's own otherwise (see
        :mod:`tierkernel.kernel.completion`)."""
        request = completion.guest_request(self.router, code, cursor_pos)
        if request is None:
            return super().do_complete(code, cursor_pos)  # type: ignore[no-any-return]
        return await completion.complete(request, self._running_tiers,
                                         self.completion_timeout,
                                         len(code) if cursor_pos is None else cursor_pos)

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0,
        omit_sections: Any = (),
    ) -> dict[str, Any]:
        """Shift-Tab and ``obj?``: IPython's help for native cells; the tier's own otherwise."""
        request = completion.guest_request(self.router, code, cursor_pos)
        if request is None:
            return super().do_inspect(  # type: ignore[no-any-return]
                code, cursor_pos, detail_level, omit_sections)
        return await completion.inspect(request, self._running_tiers,
                                        self.completion_timeout, detail_level)

    # -- history --------------------------------------------------------------------------
    def do_history(  # type: ignore[override]
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int = 0,
        start: int = 0,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> dict[str, Any]:
        """IPython's history, with the current session reported by its real number.

        IPython answers range requests for the running session with session ``0``, so a client
        that asks for a range by the number a ``tail`` request gave it gets back a different
        one; stock ipykernel fails jupyter_kernel_test's range check for this reason.
        """
        reply: dict[str, Any] = super().do_history(
            hist_access_type, output, raw, session, start, stop, n, pattern, unique
        )
        shell = self.shell
        if hist_access_type == "range" and shell is not None:
            current = shell.history_manager.session_number
            reply["history"] = [
                (current if entry[0] == 0 else entry[0], *entry[1:]) for entry in reply["history"]
            ]
        return reply

    # -- shutdown -------------------------------------------------------------------------
    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Release every tier (processes, containers, sandboxes), then shut IPython down."""
        self.router.shutdown()
        self.runtime.close()
        result = super().do_shutdown(restart)
        if hasattr(result, "__await__"):
            result = await result
        return result  # type: ignore[no-any-return]
