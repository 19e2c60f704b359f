"""Driving JupyterLab for the end-to-end tests: a private server, and a notebook page in it.

``LabServer`` runs ``jupyter lab`` on 127.0.0.1 with a random token, every piece of state
(config, settings, workspaces, runtime files) in a temporary folder, and
``expose_app_in_browser`` so the page's ``window.jupyterapp`` tells a test what the app's own
model holds: on the page a traceback and plain stderr look alike, in the model they do not.

``NotebookPage`` is what a person does in that page: open a notebook, wait for its kernel,
use the menus and the toolbar, save, take a screenshot, and read what the page shows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page

T = TypeVar("T")

KERNEL_NAME = "tierkernel"

#: User settings written into the server's private JUPYTERLAB_SETTINGS_DIR.
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    # Render every cell: with windowing, cells out of view are not in the page to be checked.
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # No news/update toast over the notebook (and no attempt to reach the internet for it).
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabServer:
    """``jupyter lab`` on 127.0.0.1 with a token, serving ``root`` and keeping its state in
    ``state``; :meth:`stop` shuts it (and the kernels it started) down."""

    def __init__(self, root: Path, state: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.log_path = state / "jupyterlab.log"
        self.env = dict(env)
        for name, folder in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                             ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                             ("JUPYTERLAB_SETTINGS_DIR", "settings")):
            (state / folder).mkdir(parents=True, exist_ok=True)
            self.env[name] = str(state / folder)
        for plugin, values in LAB_SETTINGS.items():
            package, name = plugin.rsplit("/", 1)
            target = state / "settings" / package / f"{name}.jupyterlab-settings"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        """Start the server and wait until its REST API answers."""
        argv = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.allow_root=True",
            "--LabApp.expose_app_in_browser=True",
        ]
        with self.log_path.open("wb") as log:
            # A session of its own, so stop() can reach the server's helpers by process group.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def url(self, path: str) -> str:
        """An address on this server that carries the token."""
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}{path}{sep}token={self.token}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the REST API; return the decoded JSON answer (None for an empty one)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            raw = answer.read()
        return json.loads(raw) if raw else None

    def saved_notebook(self, path: str) -> dict[str, Any]:
        """The notebook as saved on the server, read back through the contents API."""
        model = self.api("GET", f"/api/contents/{path}?content=1&type=notebook")
        return dict(model["content"])

    def stop(self) -> None:
        """Shut the server down through its API (it shuts its kernels down first), then make
        sure the process and its process group are gone."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                for kernel in self.api("GET", "/api/kernels"):
                    self.api("DELETE", f"/api/kernels/{kernel['id']}")
                self.api("POST", "/api/shutdown")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.proc = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.25)
        alive = [p for p in alive if pid_alive(p)]
    return alive


# What the page's app model holds for one notebook: kernel, dirty flag, and every cell with its
# execution count, tags and outputs (as nbformat JSON), in notebook order.
_STATE_JS = """
(path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  let panel = null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.content && w.content.widgets) panel = w;
  }
  if (!panel) return null;
  const sc = panel.sessionContext;
  const kernel = sc.session ? sc.session.kernel : null;
  const cells = panel.content.widgets.map((cell, index) => {
    const m = cell.model;
    const outputs = [];
    if (m.type === 'code') {
      for (let i = 0; i < m.outputs.length; i++) outputs.push(m.outputs.get(i).toJSON());
    }
    return {index, type: m.type, source: m.sharedModel.getSource(),
            count: m.type === 'code' ? m.executionCount : null,
            tags: m.getMetadata('tags') || [], outputs};
  });
  return {ready: sc.isReady, kernelName: kernel ? kernel.name : null,
          kernelStatus: kernel ? kernel.status : null, dirty: panel.context.model.dirty,
          active: panel.content.activeCellIndex, cells};
}
"""


@dataclass
class Cell:
    """One cell as the app's model holds it."""

    index: int
    type: str
    source: str
    count: int | None
    tags: list[str]
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tier_line(self) -> str | None:
        """The tier named by a ``%%tier NAME`` first line, or None."""
        match = re.match(r"\s*%%tier\s+(\S+)", self.source)
        return match.group(1) if match else None

    def text(self) -> str:
        """Every stream and text/plain output, joined (what a reader of the cell sees as text)."""
        parts: list[str] = []
        for out in self.outputs:
            if out["output_type"] == "stream":
                parts.append(_joined(out["text"]))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(_joined(out["data"]["text/plain"]))
        return "".join(parts)

    def of_type(self, output_type: str) -> list[dict[str, Any]]:
        """This cell's outputs of one nbformat output type."""
        return [o for o in self.outputs if o["output_type"] == output_type]

    def has_image(self) -> bool:
        """Whether a display/result output carries a PNG (how a matplotlib figure arrives)."""
        return any("image/png" in o.get("data", {}) for o in self.outputs)


def _joined(text: str | list[str]) -> str:
    return "".join(text) if isinstance(text, list) else text


@dataclass
class NotebookState:
    """A snapshot of one notebook in the app."""

    ready: bool
    kernel_name: str | None
    kernel_status: str | None
    dirty: bool
    active: int
    cells: list[Cell]

    @property
    def code_cells(self) -> list[Cell]:
        """The code cells, in notebook order."""
        return [c for c in self.cells if c.type == "code"]


def cells_from_saved(notebook: dict[str, Any]) -> list[Cell]:
    """The cells of a notebook read from disk, in the same shape as the page's model."""
    cells = []
    for index, raw in enumerate(notebook["cells"]):
        cells.append(Cell(index, raw["cell_type"], _joined(raw["source"]),
                          raw.get("execution_count"), raw.get("metadata", {}).get("tags", []),
                          raw.get("outputs", [])))
    return cells


class UnexpectedDialog(AssertionError):
    """JupyterLab put up a dialog nobody asked for (e.g. 'Kernel Restarting' after a crash)."""


class NotebookPage:
    """A JupyterLab tab with one notebook open, driven as a person would drive it."""

    def __init__(self, page: Page, server: LabServer, path: str, artifacts: Path,
                 name: str) -> None:
        self.page = page
        self.server = server
        self.path = path
        self.artifacts = artifacts
        self.name = name

    # -- reading the page ----------------------------------------------------------------
    def state(self) -> NotebookState | None:
        """What the app's model holds for this notebook, or None before it is open."""
        raw = self.page.evaluate(_STATE_JS, self.path)
        if raw is None:
            return None
        cells = [Cell(c["index"], c["type"], c["source"], c["count"], list(c["tags"]),
                      c["outputs"]) for c in raw["cells"]]
        return NotebookState(raw["ready"], raw["kernelName"], raw["kernelStatus"], raw["dirty"],
                             raw["active"], cells)

    def cell_locator(self, index: int) -> Any:
        """The page element of cell ``index`` in this notebook."""
        return self.page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)

    def prompt(self, index: int) -> str:
        """The input prompt as shown, e.g. ``[3]:``, ``[*]:`` or ``[ ]:``."""
        text: str = self.cell_locator(index).locator(".jp-InputPrompt").first.inner_text()
        return text.strip()

    def check_dialogs(self) -> None:
        """Fail, with a screenshot, when JupyterLab shows a dialog that nobody expected."""
        dialog = self.page.locator(".jp-Dialog")
        if dialog.count():
            text = dialog.first.inner_text()
            self.screenshot("unexpected-dialog")
            # Dismiss it so the teardown (and the screenshot of the failure) are not blocked.
            self.page.keyboard.press("Escape")
            raise UnexpectedDialog(f"JupyterLab showed a dialog: {text!r}")

    def wait_for(self, what: str, predicate: Callable[[NotebookState], bool],
                 timeout: float) -> NotebookState:
        """Poll the app model until ``predicate`` holds; on timeout fail with the last state."""
        deadline = time.monotonic() + timeout
        last: NotebookState | None = None
        while True:
            last = self.state()
            if last is not None and predicate(last):
                return last
            self.check_dialogs()
            if time.monotonic() > deadline:
                self.screenshot("timeout-" + re.sub(r"\W+", "-", what)[:40])
                summary = "none" if last is None else [
                    (c.index, c.count, [o["output_type"] if o["output_type"] != "error"
                                        else f"error {o.get('ename')}: {o.get('evalue')}"
                                        for o in c.outputs])
                    for c in last.code_cells]
                raise AssertionError(
                    f"{self.name}: {what} did not happen within {timeout}s; kernel "
                    f"{last and last.kernel_name}/{last and last.kernel_status}; "
                    f"code cells (index, count, outputs): {summary}")
            time.sleep(0.25)

    # -- doing things ----------------------------------------------------------------------
    def open(self, workspace: str, timeout: float = 120) -> NotebookState:
        """Open the notebook in its own workspace and wait until its kernel is ready.

        "Idle" can show while the kernel is still starting, so ready means: the app says the
        session is ready, the kernel is ours and idle, and the toolbar shows its name.
        """
        self.page.goto(self.server.url(f"/lab/workspaces/{workspace}/tree/{self.path}"))
        state = self.wait_for(
            "the notebook opening with an idle tierkernel kernel",
            lambda s: s.ready and s.kernel_name == KERNEL_NAME and s.kernel_status == "idle",
            timeout)
        self.page.locator(".jp-NotebookPanel:visible [data-jp-item-name='kernelName']").filter(
            has_text="tierkernel").wait_for(timeout=30_000)
        return state

    def menu(self, top: str, item: str) -> None:
        """Click ``top`` in the menu bar, then ``item`` in the menu that opens."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        entry = self.page.locator(".lm-Menu:visible .lm-Menu-itemLabel",
                                  has_text=re.compile(f"^{re.escape(item)}$"))
        try:
            entry.click(timeout=10_000)
        except PlaywrightError:
            self.page.keyboard.press("Escape")  # close the half-open menu before any retry
            raise

    def toolbar(self, item: str) -> None:
        """Click a button of the notebook's toolbar by its item name (run, interrupt, ...)."""
        self.page.locator(f".jp-NotebookPanel:visible .jp-NotebookPanel-toolbar "
                          f"[data-jp-item-name='{item}'] button, "
                          f".jp-NotebookPanel:visible .jp-NotebookPanel-toolbar "
                          f"jp-button[data-jp-item-name='{item}']").first.click()

    def select(self, index: int) -> None:
        """Make cell ``index`` the active cell by clicking its prompt area."""
        self.cell_locator(index).locator(".jp-InputPrompt").first.click()
        self.wait_for(f"cell {index} becoming active", lambda s: s.active == index, 10)

    def save(self, timeout: float = 30) -> None:
        """Ctrl+S, then wait until the app says the notebook has no unsaved changes."""
        self.cell_locator(0).click()
        self.page.keyboard.press("Escape")  # command mode: Ctrl+S saves the notebook
        self.page.keyboard.press("Control+s")
        self.wait_for("the notebook being saved", lambda s: not s.dirty, timeout)

    def screenshot(self, label: str) -> Path:
        """A full-notebook screenshot: JupyterLab scrolls inside a fixed-height window, so the
        viewport is first grown to the notebook's whole height."""
        target = self.artifacts / f"{self.name}-{label}.png"
        height = self.page.evaluate(
            "() => Math.max(0, ...Array.from(document.querySelectorAll("
            "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer'))"
            ".map(e => e.scrollHeight))")
        size = self.page.viewport_size or {"width": 1280, "height": 900}
        try:
            self.page.set_viewport_size({"width": size["width"],
                                         "height": min(max(900, int(height) + 250), 16000)})
            self.page.wait_for_timeout(500)
            self.page.screenshot(path=str(target), full_page=True)
        finally:
            self.page.set_viewport_size(size)
        return target


def once_more(what: str, step: Callable[[], T], on_failure: Callable[[], None] | None = None
              ) -> T:
    """Run a browser step; when it fails, run it once more, and let a second failure stand.

    Only for steps that are safe to repeat (opening a page, opening a menu before the click
    that acts): the browser occasionally drops a click or a navigation on a loaded machine.
    """
    try:
        return step()
    except (PlaywrightError, AssertionError) as exc:
        print(f"[e2e] {what} failed once ({type(exc).__name__}: {exc}); retrying once")
        if on_failure is not None:
            on_failure()
        return step()
