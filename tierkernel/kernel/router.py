"""Which tier runs a cell, with which options: the kernel's registry of live backends."""

from __future__ import annotations

import asyncio
import html
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from tierkernel.backends.base import Backend, KernelHandle, format_limit
from tierkernel.backends.options import OptionSpec
from tierkernel.backends.registry import BrokenTier, discover
from tierkernel.backends.tier_use import TierUse
from tierkernel.errors import TierUnavailableError, TierUsageError
from tierkernel.kernel.auto import split_floor
from tierkernel.magics.parsing import CellDirective, parse_options, usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """A cell's destination: the backend, its merged options, and the code it runs."""

    backend: Backend
    options: dict[str, Any]
    body: str
    first_line: int


@dataclass(frozen=True)
class TierRow:
    """One line of the ``%tier`` table."""

    name: str
    default: bool
    available: bool
    isolation: str
    detail: str


class TierTable:
    """The ``%tier`` table; IPython displays it as HTML in notebooks and text in consoles."""

    def __init__(self, rows: list[TierRow], note: str = "") -> None:
        self.rows = rows
        #: A line under the table (how ``%tier auto`` chooses, when it is the default).
        self.note = note

    def __repr__(self) -> str:
        header = ("tier", "available", "isolation", "limits / reason")
        body = [
            (
                ("* " if r.default else "  ") + r.name,
                "yes" if r.available else "no",
                r.isolation,
                r.detail,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [("  " + header[0], *header[1:]), *body])
                  for i in range(3)]
        lines = ["  ".join(cell.ljust(widths[i]) if i < 3 else cell
                           for i, cell in enumerate(row))
                 for row in [("  " + header[0], *header[1:]), *body]]
        lines.append(self.note or
                     "(* = default tier for cells without %%tier; change it with %tier NAME)")
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        cells = []
        for r in self.rows:
            name = f"<b>{html.escape(r.name)}</b>" + (" (default)" if r.default else "")
            avail = "yes" if r.available else "<span style='color:#b00'>no</span>"
            cells.append(
                f"<tr><td>{name}</td><td>{avail}</td><td>{html.escape(r.isolation)}</td>"
                f"<td>{html.escape(r.detail)}</td></tr>"
            )
        return (
            "<table><thead><tr><th>tier</th><th>available</th><th>isolation</th>"
            "<th>limits / reason</th></tr></thead><tbody>" + "".join(cells) + "</tbody></table>"
            + (f"<p>{html.escape(self.note)}</p>" if self.note else "")
        )


class TierRouter:
    """Owns one backend per registered tier and decides where each cell runs.

    Backends are created at kernel start (cheap: nothing is started until a tier's first cell).
    """

    def __init__(self, parent: Any, default_tier: str,
                 allowed: list[str] | None = None, fixed: list[str] | None = None) -> None:
        classes, self.broken = discover()
        self.backends: dict[str, Backend] = {}
        #: Options no cell or %tier line may set here (their configured values hold).
        self.fixed = frozenset(fixed or ())
        #: Tiers this kernel was told not to run (``allowed``), with the reason a cell gets:
        #: no backend is made for them, so nothing of theirs starts.
        self.refused: dict[str, str] = {}
        for name, cls in classes.items():
            if allowed is not None and name not in allowed:
                self.refused[name] = (
                    f"tier {name!r} is not allowed in this kernel (it runs "
                    f"{', '.join(allowed) or 'no tier'}: c.TierKernel.allowed_tiers)")
                continue
            try:
                backend = cls(parent=parent)
            except Exception as exc:
                self.broken.append(BrokenTier(name, f"cannot create: {exc}"))
                continue
            backend.name = name
            self.backends[name] = backend
        #: What each tier's line takes, by option name (read for every %%tier line).
        self._options: dict[str, dict[str, OptionSpec]] = {
            name: {spec.name: spec for spec in backend.magic_options}
            for name, backend in self.backends.items()}
        #: Every option some tier takes: one a tier lacks is told apart from a misspelt one.
        self._known: dict[str, OptionSpec] = {
            spec.name: spec for specs in self._options.values() for spec in specs.values()}
        #: What the warm start waits on (see request_ended): its timer, whether a request is
        #: being handled, since when none has been, and for how long it waits.
        self._warm_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._idle_since = 0.0
        self._warm_after = 0.0
        self._warm_begun = False
        self._warm_task: asyncio.Future[None] | None = None
        #: Options set for the rest of the session with ``%tier NAME --opt value``.
        self.session_options: dict[str, dict[str, Any]] = {}
        #: The words of ``%tier auto [--floor TIER] [--opt value]`` while auto is the default.
        self.auto_args: list[str] = []
        self.notice = ""
        if default_tier not in self.backends:
            fallback = "native" if "native" in self.backends else min(self.backends, default="")
            why = ("is not allowed" if default_tier in self.refused else "is not registered")
            self.notice = (f"tierkernel: the configured default tier {default_tier!r} {why} "
                           f"(tiers: {', '.join(sorted(self.backends))}); using "
                           f"{fallback!r}.")
            log.warning(self.notice)
            default_tier = fallback
        self.default = default_tier
        #: Which tiers the kernels of this set-up used (tier_use.py): read only when some tier
        #: would skip its warm start after unused kernels.
        self.tier_use: TierUse | None = None
        if any(b.warm_start and b.warm_start_unused > 0 for b in self.backends.values()
               if not b.in_kernel):
            self.tier_use = TierUse(sys.argv[1:], os.getcwd())
            self.tier_use.kernel_started()

    def attach(self, kernel: KernelHandle) -> None:
        """Attach every backend to ``kernel`` (``Backend.attach``); a backend whose hook fails
        is taken out and shown as broken, the others keep working."""
        for name, backend in list(self.backends.items()):
            try:
                backend.attach(kernel)
            except Exception as exc:
                log.exception("attaching tier %r failed", name)
                del self.backends[name]
                self.broken.append(BrokenTier(name, f"cannot attach to the kernel: {exc}"))

    @property
    def names(self) -> list[str]:
        """Every registered tier, sorted."""
        return sorted(self.backends)

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; :class:`TierUsageError` naming the valid tiers if none."""
        backend = self.backends.get(name)
        if backend is None:
            if name in self.refused:
                raise TierUnavailableError(self.refused[name])
            broken = next((b for b in self.broken if b.name == name), None)
            if broken is not None:
                raise TierUnavailableError(f"tier {name!r} is installed but broken: "
                                           f"{broken.reason}")
            raise TierUsageError(f"unknown tier {name!r}; valid tiers: {', '.join(self.names)} "
                                 "(run %tier to see them)")
        return backend

    def options_for(self, backend: Backend, args: list[str]) -> dict[str, Any]:
        """Configured defaults < session options (``%tier NAME --opt``) < the cell's own."""
        base = {**backend.defaults(), **self.session_options.get(backend.name, {})}
        if self.fixed and (fixed := sorted(self.fixed & _given_names(args))):
            raise TierUsageError(
                f"{', '.join('--' + name for name in fixed)} cannot be set in this kernel: "
                "its configured value holds (c.TierKernel.fixed_options)")
        return parse_options(backend.name, args, self._options[backend.name], base, self._known)

    def resolve(self, directive: CellDirective) -> Route:
        """Turn a parsed cell into a route; raise a usage or availability error otherwise."""
        if directive.has_magic and directive.tier is None:
            raise TierUsageError(usage(self.names, self._known.values()))
        name = directive.tier or self.default
        backend = self.backend(name)
        options = self.options_for(backend, directive.args)
        self.check_available(backend)
        if self.tier_use is not None and not backend.in_kernel:
            self.tier_use.used(name)
        return Route(backend, options, directive.body, directive.first_line)

    def check_available(self, backend: Backend) -> None:
        """Raise :class:`TierUnavailableError` with the tier's reason when it cannot run."""
        status = backend.availability()
        if not status.available:
            raise TierUnavailableError(f"tier {backend.name!r} is not available here: "
                                       f"{status.reason}")

    def set_default(self, name: str, args: list[str]) -> str:
        """``%tier NAME [--opt value]``: make ``name`` the default; return the confirmation."""
        if name == "auto":
            floor, _ = split_floor(args)
            if {"in", "out"} & _given_names(args):
                raise TierUsageError("--in and --out move variables for one cell: put them on "
                                     "that cell's %%tier line, not on %tier")
            self.default, self.auto_args = "auto", list(args)
            return (f"Default tier is now 'auto': each cell without %%tier runs in the fastest "
                    f"tier at or above {floor!r} that can run it.")
        backend = self.backend(name)
        options = self.options_for(backend, args)
        self.check_available(backend)
        given = {k: v for k, v in options.items() if k in _given_names(args)}
        if {"in", "out"} & set(given):
            raise TierUsageError("--in and --out move variables for one cell: put them on "
                                 "that cell's %%tier line, not on %tier")
        if given:
            self.session_options.setdefault(name, {}).update(given)
        self.default = name
        limits = ", ".join(f"{k}={format_limit(k, v)}" for k, v in options.items())
        return (f"Default tier is now {name!r}: cells without %%tier run there"
                + (f" ({limits})." if limits else "."))

    def table(self) -> TierTable:
        """The rows of ``%tier``: every tier, working or not."""
        rows = []
        for name in self.names:
            backend = self.backends[name]
            try:
                status = backend.availability()
            except Exception as exc:  # a tier's probe must not break the table
                status_ok, detail = False, f"availability check failed: {exc}"
            else:
                status_ok = status.available
                detail = self._limits(backend) if status.available else status.reason
                if status.available and status.reason:
                    detail = f"{status.reason}; {detail}"
            rows.append(TierRow(name, name == self.default, status_ok, backend.isolation, detail))
        for broken in self.broken:
            rows.append(TierRow(broken.name, False, False, "?", broken.reason))
        note = ""
        if self.default == "auto":
            floor, _ = split_floor(self.auto_args)
            note = (f"(default: auto: each cell without %%tier runs in the fastest tier at or "
                    f"above {floor!r} that can run it; change it with %tier NAME)")
        return TierTable(rows, note)

    def _limits(self, backend: Backend) -> str:
        text = backend.describe_limits()
        extra = self.session_options.get(backend.name)
        if extra:
            text += " (this session: " + ", ".join(
                f"{k}={format_limit(k, v)}" for k, v in extra.items()) + ")"
        return text

    def request_started(self) -> None:
        """Called by the kernel when it begins handling a shell request: a warm start still
        waiting for the kernel to be idle waits on (see :meth:`request_ended`)."""
        self._busy = True

    def request_ended(self, warm_after: float) -> None:
        """Called by the kernel on its event loop when it has answered a shell request: once
        no other request has come for ``warm_after`` seconds, :meth:`warm` begins.

        Warming the tiers takes a second or more of CPU in this process and in the Docker
        engine (imports, the wasm session, the container's agent); begun while cells arrive,
        it slows each of them several times over on a machine with few cores. A client that
        connects and then waits (a person typing) gives it that time at once; one that sends
        cell after cell has them run at full speed, and a cell of a tier not warmed yet starts
        that tier itself, as it would without a warm start."""
        self._busy = False
        self.warm_soon(warm_after)

    def warm_soon(self, grace: float) -> None:
        """Begin :meth:`warm` once the kernel has been idle for ``grace`` seconds from now;
        called by :meth:`request_ended`, and by the kernel as it starts (unless the warm start
        waits longer for the kernel to be idle). A request already waiting when the kernel
        starts (a first cell sent with the channels' opening) is thus answered first, and the
        warm start begins once its reply is sent: begun before it, the tiers' start-up would
        share the CPU with it. A timer already set is kept (it looks again when it fires);
        nothing is done once the warm start began."""
        self._idle_since = time.monotonic()
        self._warm_after = grace
        if not self._warm_begun and self._warm_timer is None:
            self._warm_timer = asyncio.get_running_loop().call_later(grace, self._look_for_idle)

    def _look_for_idle(self) -> None:
        """The warm start's timer: begin it if the kernel has been idle long enough, else
        look again when it may have been (one timer, not one per request)."""
        self._warm_timer = None
        if self._warm_begun:
            return
        left = self._idle_since + self._warm_after - time.monotonic()
        if self._busy or left > 0:  # a request being handled ends with request_ended
            if not self._busy:
                self._warm_timer = asyncio.get_running_loop().call_later(
                    left, self._look_for_idle)
            return
        self._warm_begun = True
        self._warm_task = asyncio.ensure_future(self.warm())

    async def warm(self) -> None:
        """Start, in the background, every available tier whose ``warm_start`` is set.

        Called once on the kernel's event loop: as the kernel starts (:meth:`warm_now`), or
        once it is idle (see :meth:`request_ended`).
        The tiers start side by side (a wasm session opening must not hold back the sandbox's
        container); whether each wants a warm start (the wasm tier looks for its compiled
        runtime) and is available (which may ask the Docker engine) is found out off the event
        loop. A failure here is only logged: the first cell routed to that tier starts it
        again and reports the error to the user.
        """
        def wanted(backend: Backend) -> bool:
            if not backend.warm_start:
                return False
            use = self.tier_use
            if use is not None and not use.wants_warm(backend.name, backend.warm_start_unused):
                log.info("tier %r: no warm start, the last %d kernels started this way ran "
                         "no cell in it (c.%s.warm_start_unused)", backend.name,
                         use.unused_for(backend.name), type(backend).__name__)
                return False
            return backend.availability().available

        async def warm_one(backend: Backend) -> None:
            try:
                if await asyncio.to_thread(wanted, backend):
                    await backend.start()
            except Exception:
                log.warning("warm start of tier %r failed", backend.name, exc_info=True)

        await asyncio.gather(*(warm_one(backend) for backend in self.backends.values()
                               if not backend.in_kernel))

    def shutdown(self) -> None:
        """Shut every backend down; never raises (runs at kernel shutdown and atexit)."""
        self._warm_begun = True  # a warm start not begun yet never begins
        timer, self._warm_timer = self._warm_timer, None
        if timer is not None:
            timer.cancel()
        for backend in self.backends.values():
            try:
                backend.shutdown()
            except Exception:
                log.exception("shutting down tier %r failed", backend.name)


def _given_names(args: list[str]) -> set[str]:
    return {word[2:].partition("=")[0] for word in args if word.startswith("--")}
