"""The one contract every tier implements.

A tier is a :class:`Backend` subclass registered in the entry-point group
``tierkernel.backends``. The kernel (``tierkernel.kernel.router.TierRouter``) owns one instance
per tier for the life of the kernel process and drives it through the methods below; each
method's docstring says who calls it and when.

Output is published *as it happens* through an :class:`OutputSink` that the kernel hands to
:meth:`Backend.execute`. Every output must be handed to the sink before ``execute`` returns: the
kernel sends the execute_reply and then ``status: idle`` right after, and clients (nbclient,
jupyter_kernel_test) drop output that arrives after idle.

The plain data a cell produces (:class:`ExecResult`, :class:`ExecError`, :class:`LogEntry`,
:class:`ResourceUsage`) is defined in ``tierkernel.results``, below the runtime that records it,
and re-exported here as part of the contract.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

from traitlets import Bool, Float, Int
from traitlets.config import Config, LoggingConfigurable

from tierkernel.backends.hooks import Command, ConfigSources
from tierkernel.backends.options import TIMEOUT, OptionSpec
from tierkernel.results import ExecError as ExecError
from tierkernel.results import ExecResult as ExecResult
from tierkernel.results import LogEntry as LogEntry
from tierkernel.results import MimeBundle as MimeBundle
from tierkernel.results import ResourceUsage as ResourceUsage
from tierkernel.sizes import format_size


@dataclass(frozen=True)
class Availability:
    """Whether a tier can run cells on this machine, and if not, why and what to do."""

    available: bool
    reason: str = ""

    @classmethod
    def yes(cls, detail: str = "") -> Availability:
        """An available tier; ``detail`` may say what it runs on (e.g. a runtime version)."""
        return cls(True, detail)

    @classmethod
    def no(cls, reason: str) -> Availability:
        """An unavailable tier; ``reason`` says what is missing and how to get it."""
        return cls(False, reason)


@dataclass(frozen=True)
class CellRequest:
    """One cell routed to a tier.

    ``code`` is the whole cell as the user wrote it (``%%tier`` line included); ``body`` is what
    the tier runs. ``first_line`` is the line number of ``body``'s first line within the cell, so
    tracebacks can point at the line the user sees. ``options`` holds the parsed magic-line
    options merged over the tier's configured defaults (e.g. ``{"timeout": 30.0}``).
    """

    code: str
    body: str
    tier: str
    options: dict[str, Any]
    execution_count: int
    first_line: int = 1
    silent: bool = False
    store_history: bool = True
    user_expressions: dict[str, Any] = field(default_factory=dict)
    allow_stdin: bool = False
    cell_id: str | None = None
    cell_meta: dict[str, Any] | None = None
    #: Variables to set in the tier before the body runs, as a values blob
    #: (``tierkernel.guest.values``), and the names whose values the tier sends back after it
    #: ran (``ExecResult.values``), at most ``values_limit`` bytes of them. An agent tier's
    #: concern only: the native tier's variables are the kernel's own.
    inputs: bytes | None = None
    outputs: tuple[str, ...] = ()
    values_limit: int = 0

    @property
    def filename(self) -> str:
        """The name tracebacks give the cell, in IPython's style."""
        return f"<cell In[{self.execution_count}]>"


@dataclass(frozen=True)
class Completion:
    """A tier's answer to a completion request: ``matches`` replace ``code[cursor_start:
    cursor_end]`` (positions in the code the tier was asked about); ``metadata`` is passed on
    to the client as the complete_reply's metadata."""

    matches: list[str]
    cursor_start: int
    cursor_end: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Inspection:
    """A tier's answer to an inspection request (``obj?``, Shift-Tab): ``found`` says whether
    the name at the cursor means something there; ``data`` is its mime bundle of help."""

    found: bool
    data: MimeBundle = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class OutputSink(Protocol):
    """Where a backend publishes a cell's output. Safe to call from any thread.

    The kernel creates one per cell, bound to that cell's execute_request, and passes it to
    :meth:`Backend.execute`. Calls after ``execute`` has returned are dropped.
    """

    def stream(self, name: str, text: str) -> None:
        """Text on ``stdout`` or ``stderr``, as the cell writes it."""

    def display(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """A rich output (``display_data``), e.g. a figure or ``display(obj)``."""

    def result(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """The value of the cell's last expression (``execute_result``)."""

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """The cell failed; ``traceback`` is the list of lines the user should see."""

    def clear_output(self, wait: bool = False) -> None:
        """Clear the cell's output (``clear_output``)."""

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Ask the user for one line, as ``input()`` does in a native cell (an
        ``input_request`` on Jupyter's stdin channel); blocks until the answer. Raises
        ``tierkernel.errors.InputNotAllowed`` when the client takes no input,
        ``tierkernel.errors.InputCancelled`` once ``cancel`` is set (the cell was interrupted),
        EOFError when the client sent an end of input."""
        ...


class HeldErrorSink:
    """A cell's sink that holds its error back until the tier knows what caused it, so the
    tier can publish exactly one error that says so (the pids limit behind a bare
    ``BlockingIOError``, the peak the host measured behind a ``MemoryError``).

    With ``keep_first`` the first error is kept (the guest's own, when the host adds its
    word later); otherwise the last (the host's, when it gave up on the guest after it).
    """

    def __init__(self, sink: OutputSink, keep_first: bool = False) -> None:
        self.sink = sink
        self.keep_first = keep_first
        self.held: ExecError | None = None

    def stream(self, name: str, text: str) -> None:
        """Passed straight on."""
        self.sink.stream(name, text)

    def display(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """Passed straight on."""
        self.sink.display(data, metadata)

    def result(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """Passed straight on."""
        self.sink.result(data, metadata)

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """Held, not published (see the class docstring for which one is kept)."""
        if self.held is None or not self.keep_first:
            self.held = ExecError(ename, evalue, list(traceback))

    def clear_output(self, wait: bool = False) -> None:
        """Passed straight on."""
        self.sink.clear_output(wait)

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Passed straight on."""
        return self.sink.input(prompt, password, cancel)

    def release(self) -> ExecError | None:
        """The held error (None if none); errors after this go straight to the sink."""
        held, self.held = self.held, None
        self.error = self.sink.error  # type: ignore[method-assign]
        return held


@dataclass(frozen=True)
class KernelHandle:
    """What a tier is given of the kernel it is attached to (see :meth:`Backend.attach`).

    ``shell`` is the kernel's IPython ``InteractiveShell`` (to add names or magics to native
    cells); ``run_ipython_cell`` runs a cell through IPython exactly as ipykernel would and
    returns ipykernel's reply content (the engine of a tier that runs in the kernel itself).
    """

    shell: Any
    run_ipython_cell: Callable[[CellRequest], Awaitable[dict[str, Any]]]


class Backend(LoggingConfigurable):
    """Base class of every tier.

    Subclasses are traitlets ``Configurable``s: their limits are traits tagged
    ``config=True`` and settable as ``c.<ClassName>.<trait>`` from a jupyter config file. The
    kernel constructs each backend once, with the kernel as ``parent``, at kernel start; that
    must be cheap and must not start anything (tiers start lazily, see :meth:`start`).

    Besides running cells, a tier plugs into the rest of tierkernel through the hooks below
    (the kernel, the magics and the ``tierkernel`` command name no tier but the default):
    :attr:`magic_options` (what its ``%%tier`` line takes), :meth:`attach` (the kernel it runs
    in), :meth:`config_loaded` (the kernel's final configuration, before the kernel starts
    any thread) and :meth:`commands` (its ``tierkernel`` subcommands).
    """

    #: The name used in ``%%tier NAME``; the kernel sets it to the entry point's name.
    name: str = ""
    #: One line for the ``%tier`` table: what stands between a cell and the host.
    isolation: ClassVar[str] = ""
    #: The options this tier's ``%%tier`` (and ``%tier NAME``) line takes, each with its
    #: parser and help (the shared ones are in ``tierkernel.backends.options``). Read by the
    #: kernel when it parses a tier line and by ``%tier --help``; :meth:`defaults` gives each
    #: one's configured value.
    magic_options: ClassVar[Sequence[OptionSpec]] = (TIMEOUT,)
    #: True only for the kernel's own IPython: such a tier runs through IPython's machinery
    #: (which publishes output itself) rather than through the sink.
    in_kernel: ClassVar[bool] = False
    #: Whether the tier takes a request's ``inputs`` and sends back its ``outputs`` (variables
    #: between tiers): the agent tiers do.
    moves_values: ClassVar[bool] = False

    timeout = Float(
        30.0,
        allow_none=True,
        help="Default wall-clock limit of a cell in seconds (None: no limit). "
        "Overridden per cell with --timeout.",
    ).tag(config=True)

    warm_start = Bool(
        False,
        help="Start this tier in the background when the kernel starts (if it is available), "
        "so the first cell routed to it does not wait for its start.",
    ).tag(config=True)

    warm_start_unused = Int(
        3,
        min=0,
        help="Skip the warm start in a kernel whose last this-many predecessors of the same "
        "set-up (command line, working folder, config folders) ran no cell in this tier; "
        "its next cell starts it, and the kernel after that warms it again. 0: always warm "
        "start as warm_start says.",
    ).tag(config=True)

    @classmethod
    def config_loaded(cls, config: Config, sources: ConfigSources) -> None:
        """React to the kernel's configuration, final from here on; ``sources`` says where it
        came from (command line, config files looked for).

        Called by the kernel's application once per registered tier class, as soon as the
        configuration is read and before the kernel's shell, threads and event loop exist,
        and before any backend is created: the place for work that should begin as early as
        possible, or that forks (the process has one Python thread here; so a hook must not
        start one, since the tiers after it may fork). A kernel launched by ``python -m
        tierkernel`` has bound its shell and iopub sockets already (``early_sockets.py``), so
        a process forked here that may outlive the kernel closes the descriptors it inherited
        and leaves ZeroMQ alone. Must return at once and must not raise (an exception is
        logged and the kernel starts anyway). The default does nothing.
        """

    @classmethod
    def commands(cls) -> Sequence[Command]:
        """The ``tierkernel`` subcommands this tier adds (``tierkernel warm``, say).

        Called by the ``tierkernel`` command each time it builds its parser (for ``tierkernel
        --help`` too), so it must be cheap: what a command needs is imported when it runs. A
        name another tier or tierkernel itself uses already is left out, with a warning. The
        default adds none.
        """
        return ()

    def attach(self, kernel: KernelHandle) -> None:
        """Take what this tier needs of the kernel it runs in.

        Called by the kernel once per backend, right after it created every backend and before
        any cell, warm start or completion; a backend made without a kernel (``tierkernel
        tiers``) is never attached. An exception marks the tier broken for this kernel (the
        ``%tier`` table says why). The default keeps nothing.
        """

    def availability(self) -> Availability:
        """Whether this tier can run cells here, with the reason when not.

        Called by the kernel for the ``%tier`` table and before routing a cell to the tier.
        Must be quick (no side effects, no long probes); may be called from any thread.
        """
        return Availability.yes()

    def defaults(self) -> dict[str, Any]:
        """The configured default of each of :attr:`magic_options` that has one, merged under
        per-cell options.

        Called by the kernel when it parses a ``%%tier`` line, and for the ``%tier`` table.
        """
        return {"timeout": self.timeout}

    async def start(self) -> None:
        """Bring the tier up (process, sandbox, interpreter). Idempotent.

        Called by the kernel before the first cell routed to this tier, and again before any
        later cell (a no-op when already up), so a tier that lost its session restarts here.
        With :attr:`warm_start` the kernel also calls it in the background right after the
        kernel starts, so two calls may overlap: guard the work with an ``asyncio.Lock``.
        """

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run one cell and return its result, publishing output through ``sink`` meanwhile.

        Called by the kernel on its event loop, one cell at a time per backend. Blocking work
        belongs in a thread. Must enforce ``request.options["timeout"]`` and must have handed
        every output to ``sink`` before returning. Errors in the user's code are results
        (``success=False``), not exceptions; an exception from here is a tier failure, which
        the kernel reports to the user as such.
        """
        raise NotImplementedError(f"tier {self.name!r} does not implement execute()")

    async def complete(self, code: str, cursor_pos: int, timeout: float) -> Completion | None:
        """Complete the name at ``cursor_pos`` in ``code`` from this tier's namespace.

        Called by the kernel on its event loop for a complete_request (Tab) whose cell runs in
        this tier, with the ``%%tier`` line already taken off ``code``, and never while a
        cell of this tier runs. Must answer within ``timeout`` seconds and must never start
        the tier (no session yet: answer None at once); must not change what the tier's next
        cell sees. None means "nothing to offer" (the user gets no matches, never the kernel's
        own names). The default answers None.
        """
        return None

    async def inspect(self, code: str, cursor_pos: int, detail_level: int,
                      timeout: float) -> Inspection | None:
        """Help on the name at ``cursor_pos`` in ``code`` (``obj?``, Shift-Tab) from this
        tier's namespace; ``detail_level`` 1 asks for more (source, for ``obj??``).

        Called by the kernel for an inspect_request, under the same rules as
        :meth:`complete`. None means "not found". The default answers None.
        """
        return None

    def interrupt(self) -> None:
        """Stop the running cell as soon as possible. Called from any thread (the kernel's
        SIGINT handler); must not block. ``execute`` then returns with a ``KeyboardInterrupt``
        error, or with an error saying the tier's state was lost if it had to be killed.
        """

    def shutdown(self) -> None:
        """Release everything the tier holds (processes, containers, sessions).

        Called by the kernel on shutdown and restart (from the control thread) and from an
        atexit hook; must be idempotent and must not raise.
        """

    def helper_gateway(self) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """The running cell's route to the runtime helpers (``ai``, ``api``, ``db``,
        ``console``): a function taking a guest's ``{"helper", "args"}`` request and returning
        the broker's answer, checked against this cell's policy and audited under its id.

        Called by a tier at the start of :meth:`execute` (the kernel has begun the cell's
        record by then); None when the backend runs without a kernel runtime.
        """
        runtime = getattr(self.parent, "runtime", None)
        context = getattr(runtime, "current", None)
        if runtime is None or context is None:
            return None
        return HelperRoute(runtime.broker, context)

    def can_run(self, code: str) -> str | None:
        """Whether this tier can run ``code``, from a static look only (``cell_look.py``: its
        imports, its shell lines): None when it can, else why not in a few words ("no
        network", "shell commands need a container"). ``%tier auto`` asks it of each tier
        from the fastest up. Must be cheap (it is asked for every such cell) and must not
        start the tier. The default: any cell."""
        return None

    def describe_limits(self) -> str:
        """Human-readable current limits for the ``%tier`` table."""
        parts = []
        for key, value in self.defaults().items():
            parts.append(f"{key}={format_limit(key, value)}")
        return ", ".join(parts)


class HelperRoute:
    """One cell's route to the broker (what :meth:`Backend.helper_gateway` returns): called
    with a request, it answers it under the cell's policy and audit id; :meth:`refuse` records
    a call the tier refused on the cell's behalf (background work after the cell ended) in the
    cell's audit log, runs nothing, and answers the refusal."""

    def __init__(self, broker: Any, context: Any) -> None:
        self.broker = broker
        self.context = context

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(self.broker.handle(request, self.context))

    def refuse(self, request: dict[str, Any], reason: str) -> dict[str, Any]:
        """Answer ``request`` with ``PermissionError(reason)``, audited under this cell: the
        broker is handed this cell's context with a policy that refuses every helper, which it
        asks before it runs anything (and records the refusal as it records any other)."""
        context = replace(self.context, policy=_Refusing(reason), logs=[])
        return dict(self.broker.handle(request, context))


class _Refusing:
    """The policy of :meth:`HelperRoute.refuse`: every helper refused, for one reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check_helper(self, helper: str) -> None:
        """Refuse ``helper`` (and every other)."""
        raise PermissionError(self.reason)


def format_limit(key: str, value: Any) -> str:
    """Render one limit value for people (``timeout=30s``, ``timeout=none``)."""
    if value is None:
        return "none"
    if key == "timeout":
        return f"{value:g}s"
    if key == "memory" and isinstance(value, int):
        return format_size(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (frozenset, set, tuple, list)):  # --allow, --domains
        return ",".join(sorted(str(v) for v in value)) or "none"
    return str(value)
