"""``tierkernel run NOTEBOOK``: execute a notebook with nbclient and summarise each cell."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def default_output(path: Path) -> Path:
    """``tour.ipynb`` -> ``tour.executed.ipynb`` in the same folder."""
    return path.with_name(f"{path.stem}.executed{path.suffix}")


def run_notebook(
    notebook: str,
    *,
    output: str | None = None,
    kernel_name: str = "tierkernel",
    timeout: float = 600,
    allow_errors: bool = False,
) -> int:
    """Run ``notebook``, write the executed copy, print one line per code cell.

    Each executed cell also gets ``metadata.tierkernel`` (tier, duration_ms, success) from its
    execute_reply. Returns a process exit status: 0 when every cell succeeded or was expected to
    fail (tagged ``raises-exception``), 1 otherwise.
    """
    src = Path(notebook)
    if not src.is_file():
        print(f"tierkernel run: no notebook at {src}", file=sys.stderr)
        return 2
    dest = Path(output) if output else default_output(src)
    nb = nbformat.read(src, as_version=4)
    replies: dict[int, dict[str, Any]] = {}
    skipped = skip_unavailable_tiers(nb)

    def on_executed(cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        info = execute_reply.get("metadata", {}).get("tierkernel")
        if info:
            cell.metadata["tierkernel"] = info
        replies[cell_index] = execute_reply

    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=int(timeout),
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(src.parent.resolve())}},
        on_cell_executed=on_executed,
    )
    failure: str | None = None
    try:
        client.execute()
    except CellExecutionError as exc:
        failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    finally:
        nbformat.write(nb, dest)
    print(summary(nb, replies, skipped))
    print(f"executed notebook written to {dest}")
    if failure:
        print(f"stopped at an unexpected error: {failure}", file=sys.stderr)
        return 1
    unexpected = [
        i for i, r in replies.items()
        if r.get("content", {}).get("status") != "ok"
        and "raises-exception" not in nb.cells[i].metadata.get("tags", [])
    ]
    return 1 if unexpected else 0


def skip_unavailable_tiers(nb: Any) -> dict[int, str]:
    """Tag the cells of tiers this machine cannot run ``skip-execution`` (nbclient then leaves
    them out), so a notebook runs "through every available tier"; return why, per cell index."""
    from tierkernel.kernel.router import TierRouter
    from tierkernel.magics.parsing import split_cell

    router = TierRouter(None, "native")
    reasons: dict[str, str] = {}
    for name in router.names:
        status = router.backends[name].availability()
        if not status.available:
            reasons[name] = status.reason
    router.shutdown()
    skipped: dict[int, str] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            tier = split_cell(cell.source).tier
        except ValueError:
            continue
        if tier in reasons:
            tags = cell.metadata.setdefault("tags", [])
            if "skip-execution" not in tags:
                tags.append("skip-execution")
            skipped[index] = f"tier {tier} unavailable: {reasons[tier]}"
    return skipped


def summary(nb: Any, replies: dict[int, dict[str, Any]],
            skipped: dict[int, str] | None = None) -> str:
    """A table with one row per code cell: index, tier, duration, ok/error, first line."""
    rows = [f"{'cell':>4}  {'tier':<10} {'duration':>10}  {'result':<8} first line"]
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        info = cell.metadata.get("tierkernel")
        first = next((ln for ln in cell.source.splitlines()
                      if ln.strip() and not ln.lstrip().startswith("%%tier")), "")[:50]
        if skipped and index in skipped:
            rows.append(f"{index:>4}  {'-':<10} {'-':>10}  {'skipped':<8} {first} "
                        f"({skipped[index][:80]})")
            continue
        if index not in replies or not info:
            rows.append(f"{index:>4}  {'-':<10} {'-':>10}  {'not run':<8} {first}")
            continue
        status = replies[index].get("content", {}).get("status", "?")
        result = "ok" if status == "ok" else status
        if status == "error" and "raises-exception" in cell.metadata.get("tags", []):
            result = "error*"
        rows.append(
            f"{index:>4}  {info['tier']:<10} {info['duration_ms']:>8.1f}ms  {result:<8} {first}"
        )
    rows.append("(error* = an error the notebook expects: the cell is tagged raises-exception)")
    return "\n".join(rows)
