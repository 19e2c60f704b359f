"""The ``tierkernel`` command and ``python -m tierkernel``, as a user runs them."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import pkgutil
import pty
import queue
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from traitlets.config import Configurable

import tierkernel

REPO = Path(__file__).resolve().parent.parent
TIERKERNEL = [sys.executable, "-m", "tierkernel.cli"]


def run(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def test_install_prefix_writes_a_python_kernelspec(tmp_path):
    done = run([*TIERKERNEL, "install", "--prefix", str(tmp_path), "--name", "tk-test",
                "--display-name", "TK test"])
    assert done.returncode == 0, done.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "tk-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["display_name"] == "TK test"
    assert spec["argv"][1:4] == ["-Xfrozen_modules=off", "-m", "tierkernel"]
    assert "{connection_file}" in spec["argv"]
    assert (spec_dir / "logo-64x64.png").exists()
    listed = run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                 env={"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")})
    assert "tk-test" in json.loads(listed.stdout)["kernelspecs"]


def test_kernel_start_publishes_nothing_before_the_first_cell():
    """ipykernel imports debugpy at start; with frozen modules on, debugpy's warning reached
    iopub as a stderr stream, sometimes ahead of the iopub_welcome clients wait for. The
    channels are read from the very start (start_new_kernel would drain early messages)."""
    km = KernelManager(kernel_name="tierkernel")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        msg_id = kc.execute("import time; time.sleep(0.3)")
        seen, idle = [], False
        deadline = time.monotonic() + 60
        while not idle and time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            ours = msg["parent_header"].get("msg_id") == msg_id
            idle = ours and msg["msg_type"] == "status" and (
                msg["content"]["execution_state"] == "idle")
            if not ours:
                seen.append((msg["msg_type"], msg["content"].get("text")))
        assert idle
        assert [kind for kind, _ in seen if kind == "stream"] == [], seen
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_kernel_offers_no_debugger_and_leaves_debugpy_to_cells():
    """The kernelspec declares no debugger; kernel_info must agree (JupyterLab offers its
    debugger on what kernel_info lists), debugpy must not be loaded by the start, and a native
    cell can still import it."""
    km = KernelManager(kernel_name="tierkernel")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.kernel_info()
        info = kc.get_shell_msg(timeout=30)["content"]
        assert "debugger" not in info.get("supported_features", []), info
        assert info.get("debugger") is not True, info
        seen: list[dict] = []
        reply = kc.execute_interactive(
            "%%tier native\nimport sys\nloaded_at_start = 'debugpy' in sys.modules\n"
            "import debugpy\nprint(loaded_at_start, debugpy.__name__)", timeout=60,
            output_hook=lambda msg: seen.append(msg))
        assert reply["content"]["status"] == "ok", reply["content"]
        text = "".join(m["content"].get("text", "") for m in seen if m["msg_type"] == "stream")
        assert text == "False debugpy\n", text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_install_user_and_default_tier(tmp_path):
    done = run([*TIERKERNEL, "install", "--user", "--default-tier", "process"],
               env={"HOME": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "data" / "kernels" / "tierkernel" / "kernel.json").read_text())
    assert spec["env"] == {"TIERKERNEL_DEFAULT_TIER": "process"}


def test_install_rejects_two_locations():
    done = run([*TIERKERNEL, "install", "--user", "--sys-prefix"])
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_tiers_command_shows_the_table():
    done = run([*TIERKERNEL, "tiers"])
    assert done.returncode == 0
    assert "native" in done.stdout and "process" in done.stdout and "yes" in done.stdout


def tokens(text: str) -> set[str]:
    return set(text.split())


def test_tiers_fits_the_width_it_is_given_and_keeps_every_word():
    # A long reason to wrap: the sandbox's engine is not there.
    env = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    whole = run([*TIERKERNEL, "tiers"], env=env)  # a pipe: whole lines
    assert whole.returncode == 0, whole.stderr
    assert max(len(line) for line in whole.stdout.splitlines()) > 150
    labels = {"tier", "available", "isolation", "limits", "/", "reason", "isolation:",
              "limits:", "reason:"}
    for columns in (40, 60, 80, 100, 160):
        done = run([*TIERKERNEL, "tiers"], env={**env, "COLUMNS": str(columns)})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert max(len(line) for line in lines) <= columns, (columns, done.stdout)
        # Every word is there (a word longer than its column is split across lines).
        joined = "".join(done.stdout.split())
        assert [w for w in tokens(whole.stdout) - labels if w not in joined] == [], columns
        assert "* native" in done.stdout


def test_tiers_fits_a_narrow_terminal():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 50, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([*TIERKERNEL, "tiers"], stdout=slave, stderr=subprocess.PIPE,
                            env={**env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.stderr is not None
    with proc.stderr:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    lines = out.decode().replace("\r\n", "\n").splitlines()
    assert len(lines) > 10 and max(len(line) for line in lines) <= 50, lines


def test_tiers_into_a_pipe_closed_early_is_no_error():
    # As `tierkernel tiers | head -1` when head has gone before the table is written.
    proc = subprocess.Popen([*TIERKERNEL, "tiers"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        assert proc.wait(timeout=120) == 0
        assert proc.stderr.read() == ""


def test_python_m_tierkernel_is_the_kernel_app():
    done = run([sys.executable, "-m", "tierkernel", "--help-all"])
    assert done.returncode == 0
    assert "TierKernel.default_tier" in done.stdout
    assert "ProcessBackend.timeout" in done.stdout and "NativeBackend.timeout" in done.stdout
    assert all(f"--Fsx.{quota}=" in done.stdout for quota in (
        "max_bytes", "max_entries", "max_file_size", "max_depth", "max_path_length"))
    # Every setting the README names, the helpers', packages' and notebook folder's included.
    for setting in ("Runtime.db_url", "Runtime.allowed_domains", "Packages.index_url",
                    "Packages.allowed", "NotebookFolder.max_bytes", "NotebookFolder.expose",
                    "TierKernel.completion_timeout", "SandboxBackend.input_reply_limit",
                    "WasmBackend.query_reply_limit", "ProcessBackend.copy_back_bytes"):
        assert f"--{setting}=" in done.stdout, setting


def tierkernel_configurables() -> list[type[Configurable]]:
    """Every class of the package with settings (config traits), found by importing it all
    (but the code that runs in guests, the contract suites and ``__main__``, which forks)."""
    for module in pkgutil.walk_packages(tierkernel.__path__, "tierkernel."):
        if not module.name.startswith(("tierkernel.guest", "tierkernel.testing",
                                       "tierkernel.__main__")):
            importlib.import_module(module.name)

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # The server's settings are not the kernel's (test_serve_help_lists_every_server_setting).
    return sorted({cls for cls in subclasses(Configurable)
                   if cls.__module__.startswith("tierkernel.")
                   and not cls.__module__.startswith("tierkernel.serve.")
                   and cls.class_own_traits(config=True)}, key=lambda cls: cls.__name__)


def test_help_all_lists_every_setting_and_no_flag_without_meaning_here():
    done = run([sys.executable, "-m", "tierkernel", "--help-all"])
    assert done.returncode == 0, done.stderr
    classes = tierkernel_configurables()
    assert {"Fsx", "Runtime", "TierKernel", "ProcessBackend"} <= {c.__name__ for c in classes}
    for cls in classes:
        for name in cls.class_traits(config=True):
            assert f"--{cls.__name__}.{name}=" in done.stdout, f"{cls.__name__}.{name}"
    flags = {line.split("=")[0] for line in done.stdout.splitlines() if line.startswith("--")}
    assert not flags & {"--pylab", "--trio-loop", "--autoindent", "--no-autoindent", "--nosep"}
    assert {"--matplotlib", "--gui", "--debug", "--automagic"} <= flags


def test_run_executes_the_tour_and_summarises_every_cell(tmp_path):
    out = tmp_path / "tour.out.ipynb"
    done = run([*TIERKERNEL, "run", str(REPO / "notebooks" / "tour.ipynb"), "-o", str(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    nb = nbformat.read(out, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells if "nosuch" not in c.source)
    tiers = {c.metadata["tierkernel"]["tier"] for c in code_cells}
    assert {"native", "process"} <= tiers
    for tier in ("native", "process"):
        pngs = [o for c in code_cells if c.metadata["tierkernel"]["tier"] == tier
                for o in c.outputs if "image/png" in o.get("data", {})]
        assert pngs, f"no plot from the {tier} tier"
    # The summary: a line per code cell with its tier and outcome.
    lines = [ln for ln in done.stdout.splitlines() if ln[:4].strip().isdigit()]
    assert len(lines) == len(code_cells)
    assert any("process" in ln and "error*" in ln for ln in lines)
    assert "executed notebook written to" in done.stdout


def test_run_fails_on_an_unexpected_error(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%%tier process\n1/0"),
                                         nbformat.v4.new_code_cell("print('never')")])
    nb.metadata["kernelspec"] = {"name": "tierkernel", "display_name": "t", "language": "python"}
    src = tmp_path / "bad.ipynb"
    nbformat.write(nb, src)
    done = run([*TIERKERNEL, "run", str(src)])
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr
    written = nbformat.read(tmp_path / "bad.executed.ipynb", as_version=4)
    assert written.cells[0].outputs[0]["ename"] == "ZeroDivisionError"
    missing = run([*TIERKERNEL, "run", str(tmp_path / "none.ipynb")])
    assert missing.returncode == 2 and "no notebook at" in missing.stderr


def notebook(tmp_path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in sources])
    nb.metadata["kernelspec"] = {"name": "tierkernel", "display_name": "t", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path


def test_run_help_says_what_each_exit_status_means():
    done = run([*TIERKERNEL, "run", "--help"])
    text = " ".join(done.stdout.split())
    assert "exit status: 0 every cell succeeded" in text
    assert "with --allow-errors goes on to the end and still exits 1" in text
    assert "the exit status is still 1 if one did" in text  # at --allow-errors itself


def test_run_with_allow_errors_runs_every_cell_and_exits_1(tmp_path):
    src = notebook(tmp_path, "1/0", "print('after the error')")
    done = run([*TIERKERNEL, "run", str(src), "--allow-errors"])
    assert done.returncode == 1, done.stdout + done.stderr
    written = nbformat.read(tmp_path / "nb.executed.ipynb", as_version=4)
    assert written.cells[1].outputs[0]["text"] == "after the error\n"
    assert "Traceback" not in done.stderr


def test_run_says_what_is_wrong_without_a_traceback(tmp_path):
    (tmp_path / "junk.ipynb").write_text("not json")
    junk = run([*TIERKERNEL, "run", str(tmp_path / "junk.ipynb")])
    assert junk.returncode == 2 and "is not a notebook nbformat can read" in junk.stderr
    no_kernel = run([*TIERKERNEL, "run", str(notebook(tmp_path, "1")), "--kernel", "nosuch"])
    assert no_kernel.returncode == 2, no_kernel.stderr
    assert "no kernelspec named 'nosuch'" in no_kernel.stderr
    slow = run([*TIERKERNEL, "run", str(notebook(tmp_path, "import time; time.sleep(30)")),
                "--timeout", "2"])
    assert slow.returncode == 1 and "stopped at an unexpected error" in slow.stderr
    for done in (junk, no_kernel, slow):
        assert "Traceback" not in done.stderr, done.stderr


def test_serve_help_lists_every_server_setting():
    # The server's settings are not the kernel's: `tierkernel serve --help` lists them.
    from tierkernel.serve.settings import Serve

    done = run([*TIERKERNEL, "serve", "--help"])
    assert done.returncode == 0, done.stderr
    for name in Serve.class_traits(config=True):
        assert f"c.Serve.{name} = " in done.stdout, name
