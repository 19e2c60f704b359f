"""JavaScript and TypeScript cells in the wasm tier (%%tier wasm --lang js|ts): one context per
kernel, top-level await, results, streaming, errors with the cell's lines, the runtime helpers
and the workspace as Python cells have them, and every limit with its own error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel_session import KernelSession
from tests.tier_support import need_tier

JS = "%%tier wasm --lang js\n"
TS = "%%tier wasm --lang ts\n"


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    need_tier("wasm")
    session = KernelSession(extra_arguments=["--WasmBackend.output_limit=1m"])
    yield session
    session.close()


def result(outcome) -> dict:
    [shown] = outcome.of_type("execute_result")
    return shown.content["data"]


def test_state_await_and_results_across_cells(kernel: KernelSession):
    first = kernel.run(JS + "let count = 1;\nconst names = ['a', 'b'];\n"
                            "function twice(n) { return n * 2; }\ncount")
    assert first.status == "ok" and result(first)["text/plain"] == "1"
    later = kernel.run(JS + "const got = await Promise.resolve(twice(count + 1));\n"
                            "({got, names})")
    assert result(later)["application/json"] == {"got": 4, "names": ["a", "b"]}
    assert result(kernel.run(TS + "interface Box { size: number }\n"
                                  "const box: Box = { size: 3 };\nbox.size * got"))[
        "text/plain"] == "12"
    table = result(kernel.run(JS + "[{name: 'x', n: 1}, {name: 'y', n: 2}]"))
    assert "<table>" in table["text/html"] and "<td>&quot;y&quot;</td>" not in table["text/html"]
    assert "<td>y</td>" in table["text/html"]
    shown = kernel.run(JS + "display({shown: true});\nundefined")
    assert shown.of_type("display_data")[0].content["data"]["application/json"] == {
        "shown": True}


def test_console_streams_while_the_cell_runs(kernel: KernelSession):
    out = kernel.run(JS + "console.log('first', {n: 1});\nconsole.warn('careful');\n"
                          "const t0 = Date.now();\nwhile (Date.now() - t0 < 500) {}\n"
                          "console.log('second');")
    assert out.stdout == 'first {"n":1}\nsecond\n' and out.stderr == "careful\n"
    streams = out.of_type("stream")
    assert streams[-1].at - streams[0].at > 0.3  # the first came before the wait ended


def test_errors_name_the_cells_lines(kernel: KernelSession):
    out = kernel.run(JS + "const ok = 1;\nfunction boom() {\n  throw new TypeError('no way');\n}"
                          "\nboom();")
    assert out.error["ename"] == "TypeError" and out.error["evalue"] == "no way"
    assert any("<cell>:3:" in line for line in out.error["traceback"])
    syntax = kernel.run(JS + "let = = 3;")
    assert syntax.error["ename"] == "SyntaxError"


def test_helpers_go_through_the_policy_and_the_audit(kernel: KernelSession):
    rows = kernel.run(JS + "const r = await db('SELECT 41 + 1 AS answer');\nr.rows[0].answer")
    assert result(rows)["text/plain"] == "42"
    denied = kernel.run(JS + "await api('http://127.0.0.1:9/')")
    assert denied.error["ename"] == "PermissionError" and "--allow api" in denied.error["evalue"]
    logged = kernel.run(JS + "console.info('recorded');")
    record = kernel.run(f"%executions {logged.reply['execution_count']}")
    shown = "".join(o.content["data"]["text/plain"] for o in record.of_type("display_data"))
    assert "recorded" in shown and "console" in shown


def test_python_and_javascript_share_the_workspace(kernel: KernelSession):
    assert kernel.run("%%tier wasm\nopen('from-python.txt', 'w').write('py')").status == "ok"
    out = kernel.run(JS + "fs.writeFile('from-js.txt', fs.readFile('from-python.txt') + '+js');\n"
                          "fs.mkdir('sub');\nfs.readdir('.').filter(n => n.startsWith('from'))")
    assert result(out)["application/json"] == ["from-js.txt", "from-python.txt"]
    back = kernel.run("%%tier wasm\nprint(open('from-js.txt').read())")
    assert back.stdout == "py+js\n"
    missing = kernel.run(JS + "fs.readFile('nowhere.txt')")
    assert missing.error["ename"] == "Error" and "No such file" in missing.error["evalue"]


def test_timeout_and_interrupt_keep_the_context(kernel: KernelSession):
    kernel.run(JS + "let kept = 'still here';")
    out = kernel.run(JS.replace("js\n", "js --timeout 1\n") + "while (true) {}", timeout=30)
    assert out.error["ename"] == "TimeoutError" and "context is kept" in out.error["evalue"]
    out = kernel.run(JS + "while (true) {}", timeout=30, interrupt_after=0.5)
    assert out.error["ename"] == "KeyboardInterrupt"
    assert result(kernel.run(JS + "kept"))["text/plain"] == '"still here"'


def test_memory_and_recursion_make_the_context_anew(kernel: KernelSession):
    kernel.run(JS + "let lost = 1;")
    out = kernel.run("%%tier wasm --lang js --memory 64m\nconst hog = [];\n"
                     "while (true) hog.push(new Array(100000).fill(1));", timeout=60)
    assert out.error["ename"] == "MemoryError" and "64 MiB" in out.error["evalue"]
    assert "made anew" in out.error["evalue"]
    out = kernel.run(JS + "function down() { return down() + 1; }\ndown()", timeout=60)
    assert out.error["ename"] == "RangeError" and "made anew" in out.error["evalue"]
    assert result(kernel.run(JS + "typeof lost"))["text/plain"] == '"undefined"'


def test_an_output_flood_is_stopped(kernel: KernelSession):
    out = kernel.run(JS + "while (true) console.log('x'.repeat(1000));", timeout=120)
    assert out.error["ename"] == "OutputLimitError" and "1 MiB" in out.error["evalue"]
    assert len(out.stdout) <= (1 << 20) + 1000
    assert result(kernel.run(JS + "1 + 1"))["text/plain"] == "2"


def test_refused_constructs_and_options_say_what_is_wrong(kernel: KernelSession):
    out = kernel.run("%%tier wasm --lang js --strict\nconst a = 1;\nconst b = eval('2');")
    assert out.error["ename"] == "TierUsageError" and "eval on line 2" in out.error["evalue"]
    out = kernel.run("%%tier wasm --lang js --strict\nconst m = await import('x');")
    assert "import() on line 1" in out.error["evalue"]
    out = kernel.run("%%tier wasm --lang js --out y\n1")
    assert out.error["ename"] == "TierUsageError" and "fs.readFile" in out.error["evalue"]
    out = kernel.run("%%tier wasm --lang ruby\n1")
    assert out.error["ename"] == "TierUsageError" and "python, js or ts" in out.error["evalue"]
    table = kernel.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
    assert "languages=python,js,ts" in table
