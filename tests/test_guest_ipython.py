"""IPython semantics in the non-native Python tiers (process, wasm, sandbox), through a kernel.

Magics, ``!cmd``, ``_``/``Out``/``In``, ``IPython.display``, ``get_ipython()`` and top-level
``await`` run in the tier's own IPython shell (the guest agent makes one when a cell needs
it); what a tier cannot do is a clear error naming the tier. Each case runs in every tier;
sandbox under runc here, with one gVisor (runsc) smoke test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.kernel_session import KernelSession, Outcome
from tests.tier_support import need_tier

TIERS = ["process", "wasm", "sandbox"]


class Tier:
    """A kernel whose cells of this test run in one tier."""

    def __init__(self, name: str, kernel: KernelSession) -> None:
        self.name = name
        self.kernel = kernel

    def run(self, code: str, timeout: float = 120) -> Outcome:
        return self.kernel.run(f"%%tier {self.name}\n{code}", timeout=timeout)

    def ok(self, code: str) -> Outcome:
        out = self.run(code)
        assert out.status == "ok", out.outputs
        return out

    @property
    def processes(self) -> bool:
        return self.name != "wasm"


@pytest.fixture(scope="module", params=TIERS)
def tier(request: pytest.FixtureRequest) -> Iterator[Tier]:
    name = request.param
    need_tier(name)
    kernel = KernelSession()
    try:
        yield Tier(name, kernel)
    finally:
        kernel.close()


def test_timeit_runs_and_the_cell_s_other_lines_are_kept(tier: Tier):
    # The cascade of the issue: one magic line made the whole cell a SyntaxError, and every
    # later cell using `big` a NameError.
    out = tier.ok("big = list(range(10))\n%timeit -n 3 -r 1 sum(big)")
    assert "per loop" in out.stdout, out.outputs
    assert tier.ok("sum(big)").result["text/plain"] == "45"


def test_time_and_cell_time(tier: Tier):
    out = tier.ok("%time t1 = 2 + 3")
    assert "Wall time" in out.stdout, out.outputs
    out = tier.ok("%%time\nt2 = t1 * 2\nt2")
    assert "Wall time" in out.stdout
    assert out.result["text/plain"] == "10"


def test_matplotlib_inline_and_retina_figures(tier: Tier):
    assert not tier.ok("%matplotlib inline").of_type("error")
    tier.ok("%config InlineBackend.figure_format = 'retina'")
    try:
        out = tier.ok("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        (figure,) = out.of_type("display_data")
        assert "image/png" in figure.content["data"]
        # Retina: twice the pixels, shown at half size.
        size = figure.content["metadata"]["image/png"]
        assert 200 < size["width"] < 1000 and 200 < size["height"] < 1000, size
    finally:
        tier.ok("%config InlineBackend.figure_format = 'png'")
    out = tier.ok("plt.plot([3, 2, 1]);")
    (figure,) = out.of_type("display_data")
    assert "image/png" in figure.content["data"] and not figure.content["metadata"]
    out = tier.run("%matplotlib qt")
    assert out.status == "error"
    assert f"not available in the {tier.name} tier" in out.error["evalue"]


def test_writefile_writes_to_the_tier_s_working_folder(tier: Tier):
    out = tier.ok("%%writefile ipy_notes.txt\nfirst line\nsecond line\n")
    try:
        assert "ipy_notes.txt" in out.stdout
        assert tier.ok("open('ipy_notes.txt').read()").result["text/plain"] == \
            "'first line\\nsecond line\\n'"
        if tier.name != "process":  # its working folder is not the fsx workspace (yet)
            native = tier.kernel.run("fs.read_file('/ipy_notes.txt')")
            assert native.result["text/plain"] == "'first line\\nsecond line\\n'", \
                native.outputs
    finally:
        tier.ok("import os\nos.remove('ipy_notes.txt')")


def test_capture_captures_print_and_display(tier: Tier):
    out = tier.ok("%%capture cap\nprint('hidden text')\ndisplay({'a': 1})")
    assert out.outputs == [] or not [o for o in out.outputs
                                     if o.msg_type in ("stream", "display_data")], out.outputs
    out = tier.ok("cap.stdout, len(cap.outputs), cap.outputs[0].data['text/plain']")
    assert out.result["text/plain"] == "('hidden text\\n', 1, \"{'a': 1}\")"
    out = tier.ok("cap.show()")
    assert "hidden text\n" in out.stdout
    assert out.of_type("display_data")


def test_load_ext_autoreload(tier: Tier):
    out = tier.ok("%load_ext autoreload\n%autoreload 2")
    assert not out.of_type("error")
    assert tier.ok("x_after_autoreload = 5\nx_after_autoreload").result["text/plain"] == "5"


def test_pwd_env_who_whos(tier: Tier):
    pwd = tier.ok("%pwd").result["text/plain"]
    assert pwd == tier.ok("import os\nos.getcwd()").result["text/plain"]
    tier.ok("%env TK_IPY_SETTING=on")
    assert tier.ok("os.environ['TK_IPY_SETTING']").result["text/plain"] == "'on'"
    tier.ok("who_visible = [1, 2]")
    who = tier.ok("%who").stdout
    assert "who_visible" in who
    # The agent's own names are not the user's variables.
    assert "console" not in who.split() and "In" not in who.split(), who
    whos = tier.ok("%whos").stdout
    assert "who_visible" in whos and "list" in whos


def test_shell_lines_and_ls(tier: Tier):
    cells = ["%ls", "%%bash\necho from bash", "!echo bang", "listing = !echo out\nlisting"]
    if tier.processes:
        tier.ok("open('ls_marker.txt', 'w').close()")
        try:
            assert "ls_marker.txt" in tier.ok("%ls").stdout
        finally:
            tier.ok("import os\nos.remove('ls_marker.txt')")
        assert tier.ok("%%bash\necho from bash").stdout == "from bash\n"
        assert tier.ok("!echo bang").stdout == "bang\n"
        assert tier.ok("listing = !echo out\nlisting").result["text/plain"] == "['out']"
        return
    for cell in cells:
        out = tier.run(cell)
        assert out.status == "error", (cell, out.outputs)
        assert "wasm tier has no processes" in out.error["evalue"], out.error
        # Only the user's frames: none of the agent's or IPython's.
        text = "\n".join(out.error["traceback"])
        for glue in ("ishell", "wasm_agent", "interactiveshell"):
            assert glue not in text, text


def test_underscores_out_and_in_follow_the_notebook_s_counts(tier: Tier):
    first = tier.ok("6 * 7")
    n = first.reply["execution_count"]
    tier.kernel.run("'a native cell between'")  # counted by the kernel, not by the tier
    second = tier.ok("_ + 1")
    m = second.reply["execution_count"]
    assert second.result["text/plain"] == "43"
    out = tier.ok(f"_, __, Out[{n}], _{n}, Out[{m}], In[{n}], _i{m}, _i, _ii")
    assert out.result["text/plain"] == "(43, 42, 42, 42, 43, '6 * 7', '_ + 1', '_ + 1', '6 * 7')"
    # A magic cell's In entry is its Python, as in IPython.
    magic = tier.ok("%pwd")
    k = magic.reply["execution_count"]
    assert "run_line_magic" in tier.ok(f"In[{k}]").result["text/plain"]


def test_trailing_semicolon_hides_the_value(tier: Tier):
    tier.ok("'shown'")
    out = tier.ok("'hidden';")
    assert not out.of_type("execute_result"), out.outputs
    assert tier.ok("_").result["text/plain"] == "'shown'"


def test_ipython_display_shows_rich_output(tier: Tier):
    out = tier.ok("from IPython.display import display, HTML, Markdown\n"
                  "display(HTML('<b>bold</b>'))\ndisplay(Markdown('*it*'))")
    html, markdown = out.of_type("display_data")
    assert html.content["data"]["text/html"] == "<b>bold</b>"
    assert markdown.content["data"]["text/markdown"] == "*it*"
    out = tier.ok("HTML('<i>as a result</i>')")
    assert out.result["text/html"] == "<i>as a result</i>"


@pytest.mark.parametrize("name", TIERS)
def test_a_library_that_looks_for_ipython_finds_the_tier_s_shell(name: str):
    # A fresh kernel: no cell has made the shell yet. The library imports IPython itself and
    # asks IPython.get_ipython() / IPython.display.display, as notebook-aware libraries do.
    need_tier(name)
    kernel = KernelSession()
    try:
        tier = Tier(name, kernel)
        # The cells never spell the name themselves, so only the library brings IPython in.
        tier.ok("import os, sys, tempfile\nlib = tempfile.mkdtemp()\nipy = 'IPy' + 'thon'\n"
                "with open(os.path.join(lib, 'richlib.py'), 'w') as f:\n"
                "    f.write(f'import {ipy}.display\\nfrom {ipy} import get_ipython\\n'\n"
                "            'def show(html):\\n'\n"
                "            f'    {ipy}.display.display({ipy}.display.HTML(html))\\n'\n"
                "            '    return get_ipython() is not None\\n')\n"
                "sys.path.insert(0, lib)")
        if name == "wasm":  # no background import there: plain cells never load IPython
            loaded = tier.ok("sorted(m for m in sys.modules if m.startswith(ipy))")
            assert loaded.result["text/plain"] == "[]"
        out = tier.ok("import richlib\nrichlib.show('<p>from a library</p>')")
        (shown,) = out.of_type("display_data")
        assert shown.content["data"]["text/html"] == "<p>from a library</p>"
        assert out.result["text/plain"] == "True"
    finally:
        kernel.close()


def test_object_help_with_a_question_mark(tier: Tier):
    tier.ok("def documented():\n    \"\"\"Says what it does.\"\"\"")
    out = tier.ok("documented?")
    assert "Says what it does." in out.stdout, out.outputs


def test_the_agent_s_own_line_magics_win(tier: Tier):
    tier.ok("%pwd")  # the shell exists before the magic is added
    # One of IPython's own names (no other test here uses it).
    tier.ok("__tierkernel_agent__.line_magics['lsmagic'] = "
            "lambda line: print('agent lsmagic', line)")
    assert tier.ok("%lsmagic here").stdout == "agent lsmagic here\n"


def test_get_ipython(tier: Tier):
    out = tier.ok("ip = get_ipython()\nip.user_ns is globals(), "
                  "ip.run_line_magic('pwd', '') == __import__('os').getcwd()")
    assert out.result["text/plain"] == "(True, True)"


def test_top_level_await(tier: Tier):
    code = ("import asyncio\nawait asyncio.sleep(0.01)\n"
            "value = await asyncio.sleep(0, 'awaited')\nvalue")
    out = tier.run(code)
    if tier.name == "wasm":
        assert out.status == "error"
        assert "wasm tier" in out.error["evalue"] and "event loop" in out.error["evalue"]
        return
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "'awaited'"
    # The loop is kept across cells: a task started by one cell is awaited by the next.
    tier.ok("task = asyncio.ensure_future(asyncio.sleep(0, 'later'))")
    assert tier.ok("await task").result["text/plain"] == "'later'"


def test_magics_that_cannot_work_name_the_tier(tier: Tier):
    for magic in ("%connect_info", "%qtconsole"):
        out = tier.run(magic)
        assert out.status == "error", out.outputs
        assert out.error["ename"] == "UsageError"
        assert f"not available in the {tier.name} tier" in out.error["evalue"]
        assert out.error["traceback"] == [f"UsageError: {out.error['evalue']}"]
    if tier.name == "wasm":
        out = tier.run("%debug")
        assert "not available in the wasm tier" in out.error["evalue"]
    out = tier.run("%no_such_magic_here")
    assert out.status == "error" and "no_such_magic_here" in out.error["evalue"]


def test_magic_error_tracebacks_show_the_user_s_frames(tier: Tier):
    out = tier.run("def broken():\n    return 1 / 0\n%timeit -n 1 -r 1 broken()")
    assert out.status == "error"
    text = "\n".join(out.error["traceback"])
    assert "broken" in text and "ZeroDivisionError" in text
    for glue in ("interactiveshell.py", "execution.py", "agent.py", "ishell"):
        assert glue not in text, text


def test_sandbox_under_gvisor_smoke():
    need_tier("sandbox --runtime runsc")
    kernel = KernelSession()
    try:
        first = kernel.run("%%tier sandbox --runtime runsc\n"
                           "data = [3, 1, 2]\n%timeit -n 2 -r 1 sorted(data)", timeout=120)
        assert first.status == "ok", first.outputs
        assert "per loop" in first.stdout
        out = kernel.run("%%tier sandbox --runtime runsc\n%%capture c\nprint('x')\n"
                         "display(1)", timeout=60)
        assert out.status == "ok", out.outputs
        out = kernel.run("%%tier sandbox --runtime runsc\nc.stdout, sorted(data), _i",
                         timeout=60)
        assert out.result["text/plain"] == \
            "('x\\n', [1, 2, 3], \"%%capture c\\nprint('x')\\ndisplay(1)\")", out.outputs
    finally:
        kernel.close()


def test_without_ipython_a_magic_says_so_and_plain_cells_and_shell_lines_still_run(tmp_path):
    # An interpreter where IPython cannot be imported (as in a custom sandbox image without
    # it): a wrapper that puts a failing IPython package first on its path.
    blocker = tmp_path / "blocker" / "IPython"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('IPython blocked for this test')\n")
    wrapper = tmp_path / "python-without-ipython"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={blocker.parent} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    kernel = KernelSession(extra_arguments=[f"--ProcessBackend.python={wrapper}"])
    try:
        out = kernel.run("%%tier process\nkept = 1\n%timeit kept")
        assert out.status == "error"
        assert out.error["ename"] == "SyntaxError"
        assert "IPython cannot be imported in the process tier" in out.error["evalue"]
        assert "blocked for this test" in out.error["evalue"]
        assert kernel.run("%%tier process\nkept = 2\nkept").result["text/plain"] == "2"
        assert kernel.run("%%tier process\n!echo still here").stdout == "still here\n"
        assert kernel.run("%%tier process\nget_ipython() is None").result["text/plain"] == \
            "True"
        # The agent's own line magics (%pip is one) still run.
        kernel.run("%%tier process\n__tierkernel_agent__.line_magics['hello'] = "
                   "lambda line: print('hello', line)")
        assert kernel.run("%%tier process\n%hello  there ").stdout == "hello there\n"
        # An error of one ends at the user's line: the magic's frames hide themselves as
        # %pip's do (__tracebackhide__), and the agent's call of it is plumbing too.
        kernel.run("%%tier process\ndef refuse(line):\n    __tracebackhide__ = True\n"
                   "    raise PermissionError('refused ' + line)\n"
                   "__tierkernel_agent__.line_magics['pip'] = refuse")
        out = kernel.run("%%tier process\nx = 1\n%pip install nope")
        assert out.error["ename"] == "PermissionError"
        assert out.error["evalue"] == "refused install nope"
        text = "\n".join(out.error["traceback"])
        assert "%pip install nope" in text and "line 3" in text
        for glue in ("raise PermissionError", "agent.py", "line_magics"):
            assert glue not in text, text
    finally:
        kernel.close()


def test_helper_errors_and_timeouts_show_only_the_user_s_frames(tier: Tier):
    out = tier.run("def fetch():\n    return api('https://example.com/')\nfetch()")
    assert out.error["ename"] == "PermissionError", out.outputs
    text = "\n".join(out.error["traceback"])
    assert "fetch()" in text and "return api(" in text
    for glue in ("helpers", "tierkernel", "agent.py"):
        assert glue not in text, text
    if tier.name == "wasm":
        return  # a stop resets the wasm session; its error is the host's, with no frames
    out = tier.kernel.run(f"%%tier {tier.name} --timeout 1\nimport time\ntime.sleep(10)",
                          timeout=60)
    assert out.error["ename"] == "TimeoutError", out.outputs
    text = "\n".join(out.error["traceback"])
    assert "time.sleep(10)" in text
    assert "agent.py" not in text and "sigint" not in text, text


def test_a_first_cell_importing_ipython_beside_the_background_import():
    """The agent imports IPython in the background as it starts; a first cell that imports
    IPython's modules itself meanwhile waits for that import instead of racing it (a race
    gave "cannot import name 'InteractiveShell'" about once in three new kernels)."""
    for _ in range(3):
        kernel = KernelSession()
        try:
            out = kernel.run("%%tier process\nfrom IPython.display import HTML\n"
                             "HTML('<b>first</b>')")
            assert out.status == "ok", out.outputs
            assert out.result["text/html"] == "<b>first</b>"
        finally:
            kernel.close()
