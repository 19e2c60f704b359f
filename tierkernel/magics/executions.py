"""``%executions``: the audit log of this kernel's cells, as a table or one record in full."""

from __future__ import annotations

import html
import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from tierkernel.runtime.audit import Execution
from tierkernel.runtime.host import RuntimeHost

_USAGE = ("usage: %executions [--tier T] [--failed] [--limit N] [--all]   (a table, newest "
          "first; --all: every kernel's, not only this one's)\n"
          "       %executions N    (the cell In [N] of this kernel, in full: code, logs and "
          "helper calls)\n"
          "       %executions ID   (one execution by its id, or a unique start of it)")


def _when(started: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _cpu(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _memory(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size / 2**20:.1f} MiB" if size < 1 << 30 else f"{size / 2**30:.2f} GiB"


def _first_line(code: str, width: int = 48) -> str:
    """The cell's first line of code, for the table: after its ``%%tier`` line, which says
    no more than the tier column (a cell that is only that line shows it)."""
    lines = [line for line in code.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].lstrip().startswith("%%tier"):
        lines = lines[1:]
    text = lines[0].strip() if lines else ""
    if len(lines) > 1:
        text += " ..."
    return text if len(text) <= width else text[: width - 3] + "..."


class ExecutionTable:
    """The ``%executions`` table (text in a console, HTML in a notebook)."""

    HEADER = ("id", "#", "started", "tier", "status", "duration", "cpu", "peak memory",
              "code")

    def __init__(self, rows: list[Execution], scope: str) -> None:
        self.rows = rows
        self.scope = scope

    def _cells(self) -> list[tuple[str, ...]]:
        return [(r.id, "-" if r.execution_count is None else str(r.execution_count),
                 _when(r.started), r.tier, r.status, _duration(r.duration_ms),
                 _cpu(r.cpu_seconds), _memory(r.peak_memory), _first_line(r.code))
                for r in self.rows]

    def __repr__(self) -> str:
        if not self.rows:
            return f"no executions recorded ({self.scope})"
        table = [self.HEADER, *self._cells()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.HEADER) - 1)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                            row[-1]]).rstrip() for row in table]
        lines.append(f"({len(self.rows)} shown, newest first, {self.scope}; "
                     "%executions ID, or N for In [N], shows one in full)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self.rows:
            return f"<p>no executions recorded ({html.escape(self.scope)})</p>"
        head = "".join(f"<th>{h}</th>" for h in self.HEADER)
        body = []
        for row, record in zip(self._cells(), self.rows, strict=True):
            color = "" if record.status in ("ok", "running") else " style='color:#b00'"
            cells = [f"<td><code>{html.escape(row[0])}</code></td>",
                     *(f"<td>{html.escape(c)}</td>" for c in row[1:4]),
                     f"<td{color}>{html.escape(row[4])}</td>",
                     *(f"<td>{html.escape(c)}</td>" for c in row[5:8]),
                     f"<td><code>{html.escape(row[8])}</code></td>"]
            body.append("<tr>" + "".join(cells) + "</tr>")
        return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
                f"<p>{len(self.rows)} shown, newest first, {html.escape(self.scope)}</p>")


class ExecutionView:
    """One execution in full: what ran, where, how it ended, its logs and helper calls."""

    def __init__(self, record: Execution) -> None:
        self.record = record

    def _facts(self) -> list[tuple[str, str]]:
        r = self.record
        return [("id", r.id), ("kernel session", r.kernel_session),
                ("cell id", r.cell_id or "-"),
                ("execution count", "-" if r.execution_count is None
                 else str(r.execution_count)),
                ("tier", r.tier), ("started", _when(r.started)),
                ("duration", _duration(r.duration_ms)), ("status", r.status),
                ("cpu", _cpu(r.cpu_seconds)), ("peak memory", _memory(r.peak_memory)),
                ("processes", "-" if r.processes is None else str(r.processes)),
                ("error", r.error or "-")]

    def _calls(self) -> list[str]:
        return [f"{c.helper}  {c.target}  "
                f"{'allowed' if c.allowed else 'DENIED'}  {'ok' if c.ok else 'failed'}  "
                f"{c.duration_ms:.0f} ms  {c.size} B" + (f"  ({c.error})" if c.error else "")
                for c in self.record.calls]

    def __repr__(self) -> str:
        r = self.record
        out = [f"{k + ':':17}{v}" for k, v in self._facts()]
        out += ["", "code:", *("    " + line for line in r.code.splitlines())]
        out += ["", "logs:" if r.logs else "logs: (none)",
                *(f"    [{e['level'].upper()}] {e['message']}" for e in r.logs)]
        calls = self._calls()
        out += ["", "helper calls:" if calls else "helper calls: (none)",
                *("    " + c for c in calls)]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        r = self.record
        facts = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td>{html.escape(v)}</td></tr>" for k, v in self._facts())
        logs = "".join(f"<li><b>{html.escape(e['level'])}</b> {html.escape(e['message'])}</li>"
                       for e in r.logs) or "<li>(none)</li>"
        calls = "".join(f"<li><code>{html.escape(c)}</code></li>" for c in self._calls()) or (
            "<li>(none)</li>")
        return (f"<table>{facts}</table><p><b>code</b></p><pre>{html.escape(r.code)}</pre>"
                f"<p><b>logs</b></p><ul>{logs}</ul><p><b>helper calls</b></p><ul>{calls}</ul>")


@magics_class
class ExecutionMagics(Magics):
    """``%executions``: browse the execution audit log."""

    def __init__(self, shell: Any, host: RuntimeHost) -> None:
        super().__init__(shell)
        self.host = host

    @line_magic
    def executions(self, line: str) -> None:
        """Show the execution audit log.

        %executions [--tier T] [--failed] [--limit N] [--all]
            a table of this kernel's executions, newest first (N defaults to 20);
            --all shows every kernel's executions in the log
        %executions N
            the cell In [N] of this kernel (its execution count), with its code, logs and
            helper calls
        %executions ID
            one execution (an id or a unique prefix of one) in full; an ID of digits only
            is read as N first
        """
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"cannot read the %executions line: {exc}\n{_USAGE}") from None
        tier: str | None = None
        failed = every = False
        limit = 20
        ident: str | None = None
        i = 0
        while i < len(words):
            word = words[i]
            name, eq, inline = word.partition("=")
            if name in ("--tier", "--limit"):
                value = inline if eq else (words[i + 1] if i + 1 < len(words) else "")
                i += 1 if eq else 2
                if not value or value.startswith("--"):
                    raise UsageError(f"{name} needs a value\n{_USAGE}")
                if name == "--tier":
                    tier = value
                elif not value.isdigit() or int(value) < 1:
                    raise UsageError(f"--limit expects a positive integer, got {value!r}")
                else:
                    limit = int(value)
                continue
            if word == "--failed":
                failed = True
            elif word == "--all":
                every = True
            elif word.startswith("-") or ident is not None:
                raise UsageError(f"unexpected {word!r}\n{_USAGE}")
            else:
                ident = word
            i += 1
        if ident is not None:
            if tier is not None or failed or every or limit != 20:
                raise UsageError(f"%executions ID takes no options\n{_USAGE}")
            display(ExecutionView(self._find(ident)))
            return
        rows = self.host.audit.executions(
            session=None if every else self.host.session_id, tier=tier, failed=failed,
            limit=limit)
        scope = "all kernels" if every else "this kernel"
        if tier:
            scope += f", tier {tier}"
        if failed:
            scope += ", failed or refused only"
        display(ExecutionTable(rows, scope))

    def _find(self, ident: str) -> Execution:
        """The execution ``%executions ident`` names: In [N] of this kernel for digits, else
        (or when this kernel has no such N) the one whose id starts with ``ident``."""
        audit = self.host.audit
        if ident.isdigit():
            try:
                return audit.execution_by_count(self.host.session_id, int(ident))
            except KeyError:
                pass
        try:
            return audit.execution(ident)
        except KeyError:
            counted = (f"no cell In [{ident}] in this kernel, and " if ident.isdigit() else "")
            raise UsageError(f"{counted}no single execution has the id {ident!r} (an id or a "
                             "unique start of one; %executions lists them)") from None
