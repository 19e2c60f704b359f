"""Variables between the kernel's namespace and its tiers: ``--in``, ``--out``, ``%get``,
``%put`` and ``%tiervars``.

The kernel's own namespace (the native tier's) is the hub: ``--out c`` on a cell of tier T sends
``c`` from T back to it after the cell ran, and ``--in a`` on a cell of tier U sends ``a`` from
it to U before the cell runs, taking it from the tier that last sent it first when the kernel
does not have it. ``%get T a b`` and ``%put T a b`` do the same between cells.

What a tier sends is decoded here as data only (``tierkernel.guest.values``: no pickle, nothing
that runs code), bounded by ``c.TierKernel.value_limit`` bytes, 64 levels of nesting and a
million elements. Every move is written to the audit log as a ``value`` helper call of the
cell: the name, the type, the size, from and to which tier, and, when the value came from a
less trusted tier into a more trusted one, ``down in trust``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tierkernel.backends.agent.session import one_line
from tierkernel.backends.base import Backend, CellRequest, ExecError, ExecResult, OutputSink
from tierkernel.errors import ValueTransferError
from tierkernel.guest import values as codec
from tierkernel.runtime.audit import HelperCall

#: How far each built-in tier is trusted (higher: less): a value moving to a lower rank moves
#: down in trust. A tier not named here counts as sandboxed.
_RANK = {"native": 0, "process": 1, "remote": 2, "wasm": 2, "sandbox": 3}

#: A cell made only of these lines is run by the kernel itself (they wait for tiers).
_COMMAND = re.compile(r"^\s*%(get|put|tiervars)\b(.*)$")


@dataclass
class Holding:
    """What the kernel knows of one moved variable: the tiers that have its last value."""

    tiers: set[str] = field(default_factory=set)
    type: str = ""
    size: int = 0
    #: The kernel's object of that name when a tier's cell last assigned it: if the kernel's
    #: name holds another object now, a native cell assigned it since, and the kernel's is the
    #: latest after all.
    kernel_id: int | None = None


class _Collect:
    """The sink of a move between cells: nothing is published, errors are kept."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def stream(self, name: str, text: str) -> None:
        """Output of a move is not shown (there is no cell code to print)."""

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Not shown."""

    def result(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Not shown."""

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """Kept, for the error the move raises."""
        self.errors.append(f"{ename}: {evalue}")

    def clear_output(self, wait: bool = False) -> None:
        """Not shown."""

    def input(self, prompt: str, password: bool, cancel: Any) -> str:
        """A move takes no input."""
        raise EOFError("no input while variables move between tiers")

    def close(self) -> None:
        """Nothing to release."""


class ValueExchange:
    """The kernel's end of every move of variables between tiers."""

    def __init__(self, namespace: dict[str, Any], backend: Callable[[str], Backend],
                 options: Callable[[Backend], dict[str, Any]], audit: Any,
                 limit: int) -> None:
        self.namespace = namespace
        self._backend = backend
        self._options = options
        self._audit = audit
        self.limits = codec.Limits(max_bytes=limit)
        #: Variables moved so far, by name.
        self.holdings: dict[str, Holding] = {}

    # -- around a cell --------------------------------------------------------------------
    async def gather(self, names: tuple[str, ...], tier: str,
                     execution_id: str | None) -> bytes:
        """The values blob of ``names`` for a cell of ``tier``: from the kernel's namespace,
        or first from the tier that has the latest value of a name the kernel lacks."""
        await self.fetch_missing(names, tier, execution_id)
        names = tuple(name for name in names if not self._lives_only_in(name, tier))
        if not names:
            return b""
        try:
            blob = codec.encode({name: self.namespace[name] for name in names}, self.limits)
        except codec.ValueCodecError as exc:
            raise ValueTransferError(f"--in cannot send {exc} (c.TierKernel.value_limit)") \
                from None
        for name in names:
            self._moved(name, "native", tier, execution_id, len(blob) // len(names))
        return blob

    async def fetch_missing(self, names: tuple[str, ...], tier: str,
                            execution_id: str | None) -> None:
        """Bring into the kernel's namespace each of ``names`` it lacks from the tier holding
        it; :class:`ValueTransferError` naming what to do when none is known to."""
        by_tier: dict[str, list[str]] = {}
        for name in names:
            held = self.holdings.get(name)
            elsewhere = self._elsewhere(name)
            if (name in self.namespace and not elsewhere) or self._lives_only_in(name, tier):
                continue
            source = next((t for t in sorted(held.tiers) if t not in ("native", tier)), None) \
                if held else None
            if source is None:
                raise ValueTransferError(
                    f"--in {name}: the kernel has no variable {name!r}, and no tier is known to "
                    f"hold it. Define it in a native cell, send it with --out NAME from the "
                    f"cell of the tier that made it, or fetch it with %get TIER {name}.")
            by_tier.setdefault(source, []).append(name)
        for source, wanted in by_tier.items():
            await self.get(source, tuple(wanted), execution_id)

    def assigned_in(self, tier: str, names: frozenset[str]) -> None:
        """A cell of ``tier`` assigned ``names`` (``%tier auto`` reads them statically): their
        latest values now live there. A native cell's assignments make the kernel's copy the
        latest of a name that had moved."""
        for name in names:
            if tier == "native":
                held = self.holdings.get(name)
                if held is not None:
                    held.tiers = {"native"}
            else:
                held = self.holdings.setdefault(name, Holding())
                held.tiers = {tier}
                held.type, held.size = "(not moved yet)", 0
                held.kernel_id = id(self.namespace[name]) if name in self.namespace else None

    def living(self, names: frozenset[str]) -> dict[str, set[str]]:
        """Of ``names``, those whose latest value is not the kernel's, with the tiers that
        hold it."""
        return {name: set(self.holdings[name].tiers) for name in names if self._elsewhere(name)}

    def _elsewhere(self, name: str) -> bool:
        """Whether the latest value of ``name`` is a tier's, not the kernel's."""
        held = self.holdings.get(name)
        if held is None or "native" in held.tiers:
            return False
        if name in self.namespace and id(self.namespace[name]) != held.kernel_id:
            held.tiers = {"native"}  # assigned in the kernel since (a way no cell told)
            return False
        return True

    def _lives_only_in(self, name: str, tier: str) -> bool:
        return self._elsewhere(name) and tier in self.holdings[name].tiers

    def take(self, tier: str, names: tuple[str, ...], result: ExecResult, sink: OutputSink,
             execution_id: str | None) -> ExecResult:
        """After a cell with ``--out``: put the values the tier sent into the kernel's
        namespace. A failed cell sends none; a value that cannot move fails the cell with
        one clear error."""
        if not result.success:
            return result
        try:
            self._store(tier, names, result, execution_id)
        except ValueTransferError as exc:
            error = ExecError(ValueTransferError.__name__, str(exc),
                              [f"\x1b[0;31m{ValueTransferError.__name__}\x1b[0m: {exc}"])
            sink.error(error.ename, error.evalue, error.traceback)
            result.success, result.error = False, error
        return result

    # -- between cells --------------------------------------------------------------------
    async def get(self, tier: str, names: tuple[str, ...], execution_id: str | None) -> None:
        """``%get TIER names``: the tier's values of ``names`` into the kernel's namespace."""
        result = await self._run(tier, CellRequest(
            code="", body="", tier=tier, options={}, execution_count=0, silent=True,
            store_history=False, outputs=names, values_limit=self.limits.max_bytes))
        # Decoded off the event loop: the kernel keeps answering while it takes its time.
        await asyncio.to_thread(self._store, tier, names, result, execution_id)

    async def put(self, tier: str, names: tuple[str, ...], execution_id: str | None) -> None:
        """``%put TIER names``: the kernel's values of ``names`` into the tier."""
        blob = await self.gather(names, tier, execution_id)
        result = await self._run(tier, CellRequest(
            code="", body="", tier=tier, options={}, execution_count=0, silent=True,
            store_history=False, inputs=blob))
        if not result.success:
            raise ValueTransferError(f"the {tier} tier could not take the variables: "
                                     f"{_why(result)}")

    def table(self) -> str:
        """``%tiervars``: each moved variable, the tiers holding its last value, its type and
        size."""
        if not self.holdings:
            return ("No variable has moved between tiers yet (--in NAMES, --out NAMES on a "
                    "%%tier line; %get TIER NAMES, %put TIER NAMES).")
        rows = [("name", "held by", "type", "size")]
        for name in sorted(self.holdings):
            held = self.holdings[name]
            rows.append((name, ", ".join(sorted(held.tiers)), held.type, _size(held.size)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip() for row in rows)

    # -- the parts --------------------------------------------------------------------------
    async def _run(self, tier: str, request: CellRequest) -> ExecResult:
        backend = self._backend(tier)
        if backend.in_kernel:
            raise ValueTransferError(f"the {tier} tier's variables are the kernel's own: "
                                     "nothing to move")
        if not backend.moves_values:
            raise ValueTransferError(f"the {tier} tier does not take or send variables")
        request = dataclasses.replace(request, options=self._options(backend))
        sink = _Collect()
        try:
            await backend.start()
            result = await backend.execute(request, sink)
        except Exception as exc:  # the tier could not start or run: said as the move's error
            raise ValueTransferError(f"the {tier} tier could not run the move: "
                                     f"{type(exc).__name__}: {exc}") from None
        if not result.success and sink.errors and result.error is None:
            result.error = ExecError("Error", "; ".join(sink.errors))
        return result

    def _store(self, tier: str, names: tuple[str, ...], result: ExecResult,
               execution_id: str | None) -> None:
        if result.values is None:
            raise ValueTransferError(f"--out {','.join(names)}: the {tier} tier sent no "
                                     f"values: {_why(result)}")
        started = time.perf_counter()
        try:
            values = codec.decode(result.values, self.limits)
        except codec.ValueCodecError as exc:
            raise ValueTransferError(f"the {tier} tier sent values the kernel refuses: {exc}") \
                from None
        if set(values) != set(names):
            raise ValueTransferError(f"the {tier} tier sent other variables than asked "
                                     f"({', '.join(sorted(values))[:200]})")
        self.namespace.update(values)
        each = len(result.values) // max(1, len(names))
        for name in names:
            self._moved(name, tier, "native", execution_id, each,
                        (time.perf_counter() - started) * 1000)

    def _moved(self, name: str, source: str, target: str, execution_id: str | None,
               size: int, duration_ms: float = 0.0) -> None:
        value = self.namespace.get(name)
        kind = type(value)
        type_name = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
        held = self.holdings.setdefault(name, Holding())
        if target == "native":
            held.tiers = {source, "native"}  # the kernel's copy is now the latest
        else:
            held.tiers |= {source, target}
        held.type, held.size = type_name, size
        down = _RANK.get(source, 3) > _RANK.get(target, 3)
        target_text = (f"{name}: {type_name}, {source} -> {target}"
                       + (" (down in trust)" if down else ""))
        if self._audit is not None:
            self._audit.helper_call(execution_id, HelperCall(
                helper="value", target=target_text, allowed=True, ok=True, error=None,
                started=time.time(), duration_ms=duration_ms, size=size))


def commands(code: str) -> list[tuple[str, list[str]]] | None:
    """The ``%get`` / ``%put`` / ``%tiervars`` lines of a cell made only of them (blank lines
    aside), as (command, words); None for any other cell."""
    if "%" not in code:
        return None
    found = []
    for line in code.splitlines():
        if not line.strip():
            continue
        match = _COMMAND.match(line)
        if match is None:
            return None
        found.append((match.group(1), match.group(2).split()))
    return found or None


async def run_command(exchange: ValueExchange, command: str, words: list[str],
                      tiers: list[str], execution_id: str | None) -> str:
    """Carry one command out; what to show the user. Raises ValueTransferError (or the
    router's errors for an unknown tier) with what to write instead."""
    if command == "tiervars":
        if words:
            raise ValueTransferError("%tiervars takes no arguments")
        return exchange.table()
    usage = (f"%{command} TIER NAME [NAME ...] (tiers: {', '.join(tiers)}); e.g. "
             f"%{command} sandbox df")
    if len(words) < 2:
        raise ValueTransferError(f"usage: {usage}")
    tier, raw = words[0], [n.strip() for w in words[1:] for n in w.split(",") if n.strip()]
    names = tuple(dict.fromkeys(raw))
    bad = [name for name in names if not name.isidentifier()]
    if bad or not names:
        raise ValueTransferError(f"{', '.join(bad) or 'no name'}: not variable names; usage: "
                                 f"{usage}")
    if command == "get":
        await exchange.get(tier, names, execution_id)
        return f"{', '.join(names)}: from the {tier} tier into the kernel."
    await exchange.put(tier, names, execution_id)
    return f"{', '.join(names)}: from the kernel into the {tier} tier."


def _why(result: ExecResult) -> str:
    if result.values_error:
        return result.values_error
    if result.error is not None:  # the guest's words: one line, no control characters
        return f"the tier said: {one_line(f'{result.error.ename}: {result.error.evalue}')}"
    return "the tier did not say why"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


__all__ = ["Holding", "ValueExchange", "commands", "run_command"]
