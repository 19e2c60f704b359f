"""JupyterLab in headless Chromium: what a person sees when running tierkernel notebooks.

One private JupyterLab server per module (127.0.0.1, random token, temporary root and state),
one Chromium driven by Playwright, one fresh browser context per test. Each test checks the
page AND the app's model (and, after saving, the notebook on disk through the REST API), so a
missing output fails the test, not just a page that does not load.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest

from tests.e2e.conftest import CHROMIUM_ARGS
from tests.serve_support import MAIN, Server

if TYPE_CHECKING:  # playwright is imported lazily: without it the tests skip or fail cleanly
    from playwright.sync_api import Browser, Page

    from tests.e2e.lab import Cell, LabServer, NotebookPage

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
TOUR = REPO / "notebooks" / "tour.ipynb"

# Opening a notebook on a loaded 2-core machine: server, kernel start and (for wasm) session.
OPEN_TIMEOUT = 120
# Run All over the whole tour, wasm and process sessions included, with other work running.
RUN_ALL_TIMEOUT = 240

#: A wasm cell that runs until stopped; it prints first so the test knows it is running. Its
#: timeout is far above the test's, so only the stop button can end it.
LONG_WASM_CELL = """%%tier wasm --timeout 600
import time
print('wasm cell running; press stop', flush=True)
while True:
    time.sleep(0.05)"""

#: The same for the sandbox tier; its session keeps its variables through the stop.
LONG_SANDBOX_CELL = ("%%tier sandbox --timeout 600\nkept_in_sandbox = 'yes'\n"
                     + LONG_WASM_CELL.split("\n", 1)[1].replace("wasm cell", "sandbox cell"))


def _notebook(path: Path, sources: list[str]) -> None:
    """Write a notebook of code cells that opens with the tierkernel kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "tierkernel", "display_name": "Python (tierkernel)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, chromium: Path) -> Iterator[LabServer]:
    """A JupyterLab server whose root holds a copy of the tour and two small notebooks."""
    from tests.e2e.lab import LabServer

    root = tmp_path_factory.mktemp("lab-root")
    state = tmp_path_factory.mktemp("lab-state")
    shutil.copy(TOUR, root / "tour.ipynb")
    _notebook(root / "interrupt.ipynb", [
        LONG_WASM_CELL,
        "%%tier wasm\nprint('the next wasm cell ran')",
        LONG_SANDBOX_CELL,
        "%%tier sandbox\nprint('the next sandbox cell ran; state kept:', kept_in_sandbox)",
    ])
    _notebook(root / "restart.ipynb", [
        "import os\nbefore_restart = True\nprint('kernel pid', os.getpid())",
        "%%tier process\nimport os\nprint('process agent pid', os.getpid())",
        "%%tier sandbox\nimport socket\nprint('sandbox container', socket.gethostname())",
        "print('defined before the restart:', 'before_restart' in globals())",
    ])
    _notebook(root / "remote.ipynb", [
        "%%tier remote\nimport sys\nprint('ran on the server in', sys.platform)\n"
        "answer = 41",
        "%%tier remote\nanswer + 1",
    ])
    _notebook(root / "javascript.ipynb", [
        "%%tier wasm\nopen('from-python.txt', 'w').write('written by Python')",
        "%%tier wasm --lang ts\nconst note: string = fs.readFile('from-python.txt');\n"
        "console.log('js read:', note);\n[{lang: 'ts', length: note.length}]",
    ])
    # The remote tier's server: a real tierkernel serve, named in the kernels' config.
    remote = Server(tmp_path_factory.mktemp("lab-remote-server"))
    server = LabServer(root, state, dict(os.environ))
    (state / "config" / "tierkernel_config.py").write_text(
        f"c.RemoteBackend.servers = {{'box': {{'url': {remote.url!r}, 'token': {MAIN!r}}}}}\n"
        "c.RemoteBackend.tier = 'wasm'\n")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        remote.stop()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (never Playwright's own browsers)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture()
def page(browser: Browser, request: pytest.FixtureRequest, artifacts: Path) -> Iterator[Page]:
    """A fresh browser context and page; a screenshot of the page if the test failed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    yield tab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        tab.screenshot(path=str(artifacts / f"{request.node.name}-failed.png"), full_page=True)
    context.close()


def _open(page: Page, lab: LabServer, path: str, artifacts: Path, name: str) -> NotebookPage:
    """Open ``path`` in its own workspace (retried once: a navigation can be dropped)."""
    from tests.e2e.lab import NotebookPage, once_more

    notebook = NotebookPage(page, lab, path, artifacts, name)
    once_more(f"opening {path}", lambda: notebook.open(name, OPEN_TIMEOUT))
    return notebook


def _tier_of(source: str, default: str) -> str:
    match = re.match(r"\s*%%tier\s+(\S+)", source)
    return match.group(1) if match else default


def _plotting_tiers(cells: list[Cell]) -> dict[str, list[int]]:
    """Tier -> indexes of the cells that import matplotlib, read from their ``%%tier`` lines.

    Derived from the notebook rather than listed here, so a sandbox section that plots is
    checked the same way as soon as it lands in the tour.
    """
    tiers: dict[str, list[int]] = {}
    default = "native"
    for cell in cells:
        if cell.type != "code":
            continue
        line = re.match(r"\s*%tier\s+(\w+)\s*$", cell.source)
        if line:  # '%tier NAME' changes the default tier for the cells after it
            default = line.group(1)
        if re.search(r"^\s*(import matplotlib|from matplotlib)", cell.source, re.M):
            tiers.setdefault(_tier_of(cell.source, default), []).append(cell.index)
    return tiers


def _check_cells(cells: list[Cell], where: str) -> None:
    """What every run of the tour must show, checked on a list of cells (model or disk)."""
    code = [c for c in cells if c.type == "code"]
    assert code, f"{where}: no code cells"
    for cell in code:
        label = f"{where}: cell {cell.index} ({cell.source.splitlines()[0]!r})"
        assert cell.count is not None, f"{label} has no execution count: it did not run"
        assert cell.outputs, f"{label} has no output"
        errors = cell.of_type("error")
        if "raises-exception" in cell.tags:
            assert len(errors) == 1, f"{label} is expected to fail but shows {cell.outputs}"
        else:
            assert not errors, f"{label} failed: {errors}"
    counts = [c.count or 0 for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f"{where}: execution counts are not in run order: {counts}"
    plotting = _plotting_tiers(cells)
    assert {"native", "process", "wasm"} <= set(plotting), \
        f"{where}: the tour should plot in native, process and wasm; found {plotting}"
    for tier, indexes in plotting.items():
        assert any(cells[i].has_image() for i in indexes), \
            f"{where}: no matplotlib image from the {tier} tier (cells {indexes})"


def test_run_all_tour(page: Page, lab: LabServer, artifacts: Path) -> None:
    """Run > Run All Cells on the tour, save, and check the page, the model and the file."""
    from tests.e2e.lab import cells_from_saved, once_more

    nb = _open(page, lab, "tour.ipynb", artifacts, "jupyterlab-tour")
    opened = nb.state()
    assert opened is not None
    code_count = len(opened.code_cells)

    once_more("Run > Run All Cells", lambda: nb.menu("Run", "Run All Cells"))
    state = nb.wait_for(
        "every code cell running to the end",
        lambda s: s.kernel_status == "idle"
        and all(c.count is not None for c in s.code_cells)
        and all("*" not in nb.prompt(c.index) for c in s.code_cells),
        RUN_ALL_TIMEOUT)
    assert len(state.code_cells) == code_count
    nb.save()
    shot = nb.screenshot("run-all")
    assert shot.stat().st_size > 10_000

    # The app's model: execution counts, error outputs exactly where tagged, plots per tier.
    saved_state = nb.state()
    assert saved_state is not None
    state = saved_state
    _check_cells(state.cells, "page model")

    # The page itself, cell by cell: prompts, outputs, images that decoded, errors shown.
    for cell in state.code_cells:
        element = nb.cell_locator(cell.index)
        label = f"page: cell {cell.index} ({cell.source.splitlines()[0]!r})"
        assert nb.prompt(cell.index) == f"[{cell.count}]:", label
        shown = element.locator(".jp-OutputArea-output")
        assert shown.count() >= 1, f"{label} shows no output"
        text = element.locator(".jp-OutputArea").inner_text()
        for out in cell.of_type("stream"):
            first = "".join(out["text"]).strip().splitlines()[0]
            assert first in text, f"{label}: printed {first!r} is not on the page"
        if cell.has_image():
            images = element.locator(".jp-RenderedImage img")
            assert images.count() >= 1, f"{label}: the plot is not shown as an image"
            width = images.first.evaluate("img => img.complete ? img.naturalWidth : 0")
            assert width > 100, f"{label}: the plot image did not decode (width {width})"
        for error in cell.of_type("error"):
            # An error renders as a traceback (stderr-coloured text) naming the exception.
            rendered = element.locator(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert rendered.count() >= 1, f"{label}: the error is not rendered as an error"
            assert error["ename"] in rendered.first.inner_text(), label

    # What the user sees in particular tiers.
    by_first_line = {c.index: c.text() for c in state.code_cells}
    joined = "\n".join(by_first_line.values())
    for expected in ("in the kernel process", "this cell runs in process",
                     "wasm step 2: output streams", "no network in wasm",
                     "cubes still here: 343"):
        assert expected in joined, f"page model: {expected!r} not among the outputs"
    assert any("wasi" in t for t in by_first_line.values()), "no wasm cell reported wasi"

    # The notebook as saved, read back over the REST API: the same facts hold on disk.
    saved = cells_from_saved(lab.saved_notebook("tour.ipynb"))
    _check_cells(saved, "saved notebook")
    for disk, model in zip((c for c in saved if c.type == "code"), state.code_cells,
                           strict=True):
        assert disk.count == model.count
        assert [o["output_type"] for o in disk.outputs] == \
            [o["output_type"] for o in model.outputs], f"saved cell {disk.index} differs"


def _stop_then_next(nb: Any, long_index: int, tier: str) -> None:
    """Run the long cell at ``long_index``, press stop, check it ends with KeyboardInterrupt
    on the page and in the model, then run the cell after it and check it ran."""
    nb.select(long_index)
    nb.toolbar("run")  # run this cell and select the next one
    nb.wait_for(f"the long {tier} cell printing that it runs",
                lambda s: "press stop" in s.cells[long_index].text(), OPEN_TIMEOUT)
    assert nb.prompt(long_index) == "[*]:", "the long cell should still be running"

    nb.toolbar("interrupt")
    state = nb.wait_for(
        f"the stopped {tier} cell ending",
        lambda s: s.cells[long_index].count is not None
        and bool(s.cells[long_index].of_type("error")), 60)
    error = state.cells[long_index].of_type("error")[0]
    assert error["ename"] == "KeyboardInterrupt", error
    assert "KeyboardInterrupt" in nb.cell_locator(long_index).locator(
        ".jp-OutputArea").inner_text()

    after = long_index + 1
    nb.select(after)
    nb.toolbar("run")
    state = nb.wait_for(f"the next {tier} cell running",
                        lambda s: s.cells[after].count is not None and s.kernel_status == "idle",
                        OPEN_TIMEOUT)
    assert not state.cells[after].of_type("error"), state.cells[after].outputs
    assert f"the next {tier} cell ran" in state.cells[after].text()
    assert f"the next {tier} cell ran" in nb.cell_locator(after).inner_text()


def test_stop_button_interrupts_wasm_and_sandbox_cells(page: Page, lab: LabServer,
                                                       artifacts: Path) -> None:
    """The toolbar's stop button ends a running wasm cell with KeyboardInterrupt and the next
    wasm cell runs (in a fresh wasm session); the same for a sandbox cell, whose container
    session keeps its variables."""
    from tests import sandbox_support

    nb = _open(page, lab, "interrupt.ipynb", artifacts, "jupyterlab-interrupt")
    _stop_then_next(nb, 0, "wasm")
    nb.screenshot("after-stop-wasm")
    sandbox_support.need_sandbox()
    _stop_then_next(nb, 2, "sandbox")
    assert "state kept: yes" in nb.cell_locator(3).inner_text()
    nb.screenshot("after-stop-sandbox")


def _pid_in(label: str, cell: Cell) -> int:
    """The pid a cell printed as ``<label> <pid>``."""
    match = re.search(rf"{label} (\d+)", cell.text())
    assert match, f"cell {cell.index} did not print {label!r}: {cell.outputs}"
    return int(match.group(1))


def check_old_kernel_released(kernel_pid: int, tier_pids: dict[str, int]) -> None:
    """After a restart, nothing of the old kernel may be left running.

    Checked: the old kernel process and the old ``process`` tier agent are gone, and no
    sandbox container of the old kernel (its own or the spare it claimed) is left, running or
    stopped. Spares it made for later kernels are not its own and may stay.
    """
    import docker

    from tests.e2e.lab import wait_gone
    from tierkernel.backends.sandbox.reaper import kernel_containers

    left = wait_gone([kernel_pid, *tier_pids.values()], timeout=30)
    assert not left, (f"processes of the old kernel still run after the restart: {left} "
                      f"(kernel {kernel_pid}, tiers {tier_pids})")
    client = docker.from_env()
    try:
        deadline = time.monotonic() + 15
        while True:
            containers = kernel_containers(client, kernel_pid)
            if not containers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        client.close()
    assert not containers, (f"containers of the old kernel {kernel_pid} left after the "
                            f"restart: {[c[:12] for c in containers]}")


def test_restart_from_kernel_menu(page: Page, lab: LabServer, artifacts: Path) -> None:
    """Kernel > Restart Kernel…: the old kernel and its tiers go away, a new kernel answers."""
    from tests.e2e.lab import once_more

    nb = _open(page, lab, "restart.ipynb", artifacts, "jupyterlab-restart")
    nb.select(0)
    nb.toolbar("run")
    nb.toolbar("run")
    nb.toolbar("run")
    state = nb.wait_for("the kernel, the process tier and the sandbox reporting themselves",
                        lambda s: s.cells[2].count is not None and s.kernel_status == "idle",
                        OPEN_TIMEOUT)
    old_kernel = _pid_in("kernel pid", state.cells[0])
    old_agent = _pid_in("process agent pid", state.cells[1])
    assert "sandbox container" in state.cells[2].text(), state.cells[2].outputs

    once_more("Kernel > Restart Kernel…", lambda: nb.menu("Kernel", "Restart Kernel…"))
    dialog = nb.page.locator(".jp-Dialog")
    dialog.wait_for(timeout=15_000)
    assert "Restart" in dialog.inner_text()
    dialog.locator("button.jp-mod-accept").click()
    dialog.wait_for(state="detached", timeout=15_000)
    nb.wait_for("the kernel coming back",
                lambda s: s.ready and s.kernel_name == "tierkernel" and s.kernel_status == "idle",
                OPEN_TIMEOUT)
    check_old_kernel_released(old_kernel, {"process": old_agent})

    nb.select(3)
    nb.toolbar("run")
    state = nb.wait_for("a cell running after the restart",
                        lambda s: s.cells[3].count is not None and s.kernel_status == "idle",
                        OPEN_TIMEOUT)
    assert "defined before the restart: False" in state.cells[3].text(), state.cells[3].outputs
    assert state.cells[3].count == 1, "a restarted kernel counts from 1 again"
    nb.select(0)
    nb.toolbar("run")
    state = nb.wait_for("the new kernel reporting its pid",
                        lambda s: s.cells[0].count == 2 and s.kernel_status == "idle",
                        OPEN_TIMEOUT)
    new_kernel = _pid_in("kernel pid", state.cells[0])
    assert new_kernel != old_kernel
    nb.screenshot("after-restart")


def _run_all(page: Page, lab: LabServer, name: str, artifacts: Path, label: str) -> Any:
    """Open notebook ``name``, run all its cells, wait until every one ran to the end, and
    check that none shows an error; the open notebook."""
    from tests.e2e.lab import once_more

    nb = _open(page, lab, name, artifacts, label)
    once_more("Run > Run All Cells", lambda: nb.menu("Run", "Run All Cells"))
    state = nb.wait_for(
        "every cell running to the end",
        lambda s: s.kernel_status == "idle" and all(c.count is not None for c in s.code_cells)
        and all("*" not in nb.prompt(c.index) for c in s.code_cells), OPEN_TIMEOUT)
    assert not any(c.of_type("error") for c in state.code_cells), \
        [c.outputs for c in state.code_cells]
    return nb


def test_a_remote_cell_runs_on_a_tierkernel_server(page: Page, lab: LabServer,
                                                   artifacts: Path) -> None:
    """%%tier remote cells run on a tierkernel serve and show their output on the page; the
    second sees the first's variable (one remote session for the kernel)."""
    nb = _run_all(page, lab, "remote.ipynb", artifacts, "jupyterlab-remote")
    assert "ran on the server in wasi" in nb.cell_locator(0).inner_text()
    assert "42" in nb.cell_locator(1).locator(".jp-OutputArea").inner_text()
    nb.screenshot("remote")


def test_a_javascript_cell_runs_in_the_browser(page: Page, lab: LabServer,
                                               artifacts: Path) -> None:
    """A TypeScript cell reads what a Python cell wrote, prints as it runs, and shows its
    value (an array of records) as a table."""
    nb = _run_all(page, lab, "javascript.ipynb", artifacts, "jupyterlab-javascript")
    shown = nb.cell_locator(1).locator(".jp-OutputArea")
    assert "js read: written by Python" in shown.inner_text()
    assert shown.locator("table td").first.inner_text() == "ts"
    nb.screenshot("javascript")
