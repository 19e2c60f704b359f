"""``tierkernel run NOTEBOOK``: execute a notebook with nbclient and summarise each cell."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

#: What ``tierkernel run`` exits with (its ``--help`` says so too).
EXIT_OK, EXIT_CELL_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


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
    execute_reply. Returns a process exit status: 0 (:data:`EXIT_OK`) when every cell
    succeeded, failed as expected (tagged ``raises-exception``) or was skipped (its tier cannot
    run here); 1 (:data:`EXIT_CELL_FAILED`) when a cell failed otherwise or ran out of time
    (without ``allow_errors`` the run stops there; with it every cell runs first); 2
    (:data:`EXIT_CANNOT_RUN`) when the notebook cannot be read or the kernel cannot start.
    """
    src = Path(notebook)
    if not src.is_file():
        print(f"tierkernel run: no notebook at {src}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    dest = Path(output) if output else default_output(src)
    try:
        nb = nbformat.read(src, as_version=4)
    except Exception as exc:  # nbformat raises anything from ValueError to TypeError
        print(f"tierkernel run: {src} is not a notebook nbformat can read: {exc}",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        print(f"tierkernel run: no kernelspec named {kernel_name!r}; `jupyter kernelspec list` "
              "shows those installed, `tierkernel install` installs tierkernel's",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    replies: dict[int, dict[str, Any]] = {}
    skipped = skip_unavailable_tiers(nb)
    started: list[int] = []

    def on_start(cell: Any, cell_index: int) -> None:
        started.append(cell_index)

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
        on_cell_start=on_start,
        on_cell_executed=on_executed,
    )
    failure: str | None = None
    stopped: dict[int, str] = {}
    # The kernel's own log (ipykernel's warnings, its errors while nbclient stops it after a
    # timeout) is kept from the summary, and shown only if the kernel died.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as kernel_log:
        try:
            client.execute(stderr=kernel_log)
        except CellTimeoutError:
            stopped[started[-1]] = "timeout"
            failure = (f"cell {started[-1]} ran longer than {timeout:g} s; allow more with "
                       "--timeout SECONDS")
        except CellExecutionError as exc:
            failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        except DeadKernelError as exc:
            if started:
                stopped[started[-1]] = "died"
            kernel_log.seek(0)
            failure = f"the kernel died ({exc}); its last words:\n" + "".join(
                kernel_log.readlines()[-20:])
        finally:
            nbformat.write(nb, dest)
    print(summary(nb, replies, skipped, stopped))
    print(f"executed notebook written to {dest}")
    if failure:
        print(f"stopped at an unexpected error: {failure}", file=sys.stderr)
        return EXIT_CELL_FAILED
    unexpected = [
        i for i, r in replies.items()
        if r.get("content", {}).get("status") != "ok"
        and "raises-exception" not in nb.cells[i].metadata.get("tags", [])
    ]
    return EXIT_CELL_FAILED if unexpected else EXIT_OK


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
            skipped: dict[int, str] | None = None,
            stopped: dict[int, str] | None = None) -> str:
    """A table with one row per code cell: index, tier, duration, ok/error, first line.
    ``stopped`` names the cell that had no reply because the run stopped in it (a timeout,
    the kernel's death)."""
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
            outcome = (stopped or {}).get(index, "not run")
            rows.append(f"{index:>4}  {'-':<10} {'-':>10}  {outcome:<8} {first}")
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
