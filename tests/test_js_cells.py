"""JavaScript and TypeScript cells in the wasm tier (QuickJS on wasmtime) and in the sandbox
tier (Node.js in the container), each run through the same tests: one context per kernel,
top-level await, results, streaming, errors with the cell's lines, the runtime helpers and the
workspace as Python cells have them, and every limit with its own error. Where the engines
differ (memory, recursion), each has its own test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.kernel_session import KernelSession
from tests.tier_support import need_tier


@dataclass
class Js:
    """A kernel and the tier whose JS cells the tests run."""

    kernel: KernelSession
    tier: str

    def line(self, lang: str = "js", options: str = "") -> str:
        return f"%%tier {self.tier} --lang {lang}{' ' + options if options else ''}\n"

    def run(self, code: str, lang: str = "js", options: str = "", **kwargs):
        return self.kernel.run(self.line(lang, options) + code, **kwargs)


@pytest.fixture(scope="module", params=["wasm", "sandbox"])
def js(request) -> Iterator[Js]:
    need_tier(request.param)
    session = KernelSession(extra_arguments=["--WasmBackend.output_limit=1m",
                                             "--SandboxBackend.output_limit=1m"])
    yield Js(session, request.param)
    session.close()


def result(outcome) -> dict:
    [shown] = outcome.of_type("execute_result")
    return shown.content["data"]


def test_state_await_and_results_across_cells(js: Js):
    first = js.run("let count = 1;\nconst names = ['a', 'b'];\n"
                   "function twice(n) { return n * 2; }\ncount")
    assert first.status == "ok" and result(first)["text/plain"] == "1"
    later = js.run("const got = await Promise.resolve(twice(count + 1));\n({got, names})")
    assert result(later)["application/json"] == {"got": 4, "names": ["a", "b"]}
    assert result(js.run("interface Box { size: number }\nconst box: Box = { size: 3 };\n"
                         "box.size * got", "ts"))["text/plain"] == "12"
    table = result(js.run("[{name: 'x', n: 1}, {name: 'y', n: 2}]"))
    assert "<table>" in table["text/html"] and "<td>&quot;y&quot;</td>" not in table["text/html"]
    assert "<td>y</td>" in table["text/html"]
    shown = js.run("display({shown: true});\nundefined")
    assert shown.of_type("display_data")[0].content["data"]["application/json"] == {
        "shown": True}


def test_a_cell_runs_again_as_it_did(js: Js):
    """Running a cell again (what notebooks do) declares its names again: in Node they are the
    context's variables, as in a REPL; QuickJS keeps its global lexical rules."""
    cell = "class Point { constructor(x) { this.x = x; } }\nconst p = new Point(2);\np.x"
    assert result(js.run(cell))["text/plain"] == "2"
    again = js.run(cell)
    if js.tier == "sandbox":
        assert result(again)["text/plain"] == "2"
        # Declarations without a value, several at once, typed, destructured; a function the
        # cell replaces is what the next cell sees.
        assert result(js.run("let a, b = 2;\nlet {c, d: [e]} = {c: 3, d: [4]};\n[a, b, c, e]"))[
            "application/json"] == [None, 2, 3, 4]
        assert result(js.run("let t: number;\nt = 5;\nt", "ts"))["text/plain"] == "5"
        js.run("function greet() { return 'hi'; }\nconst plain = greet;\n"
               "greet = () => plain() + '!';")
        assert result(js.run("greet()"))["text/plain"] == '"hi!"'
        assert result(js.run("return 6 * 7"))["text/plain"] == "42"  # a function's body
    else:
        assert again.error["ename"] == "SyntaxError"
        out = js.run("console.log('once');\neval('return 1')")  # ran: never run again
        assert out.stdout == "once\n" and out.error["ename"] == "SyntaxError"
        assert result(js.run("const v = 6;\nreturn v * 7"))["text/plain"] == "42"


def test_console_streams_while_the_cell_runs(js: Js):
    out = js.run("console.log('first', {n: 1});\nconsole.warn('careful');\n"
                 "const t0 = Date.now();\nwhile (Date.now() - t0 < 500) {}\n"
                 "console.log('second');")
    assert out.stdout == 'first {"n":1}\nsecond\n' and out.stderr == "careful\n"
    streams = out.of_type("stream")
    assert streams[-1].at - streams[0].at > 0.3  # the first came before the wait ended


def test_errors_name_the_cells_lines(js: Js):
    out = js.run("const ok = 1;\nfunction boom() {\n  throw new TypeError('no way');\n}"
                 "\nboom();")
    assert out.error["ename"] == "TypeError" and out.error["evalue"] == "no way"
    assert any("<cell>:3:" in line for line in out.error["traceback"])
    syntax = js.run("let = = 3;")
    assert syntax.error["ename"] == "SyntaxError"
    if js.tier == "sandbox":  # TypeScript strips the types, and the lines are the cell's still
        out = js.run("type A = { x: number };\n\ninterface B {\n  y: string;\n}\n"
                     "function boom(a: A): number {\n  throw new RangeError('ts way');\n}\n"
                     "boom({ x: 1 });", "ts")
        assert out.error["ename"] == "RangeError"
        assert any("<cell>:7:" in line for line in out.error["traceback"])
        assert any("<cell>:9:" in line for line in out.error["traceback"])
        syntax = js.run("const x: number = ;", "ts")
        assert syntax.error["ename"] == "SyntaxError" and "line 1" in syntax.error["evalue"]


def test_helpers_go_through_the_policy_and_the_audit(js: Js):
    rows = js.run("const r = await db('SELECT 41 + 1 AS answer');\nr.rows[0].answer")
    assert result(rows)["text/plain"] == "42"
    denied = js.run("await api('http://127.0.0.1:9/')")
    assert denied.error["ename"] == "PermissionError" and "--allow api" in denied.error["evalue"]
    many = js.run("(await Promise.all(Array.from({length: 2000}, (_, i) => "
                  "db('SELECT ? AS n', [i])))).length", timeout=120)
    assert result(many)["text/plain"] == "2000"  # all at once: nothing waits on another
    logged = js.run("console.info('recorded');")
    record = js.kernel.run(f"%executions {logged.reply['execution_count']}")
    shown = "".join(o.content["data"]["text/plain"] for o in record.of_type("display_data"))
    assert "recorded" in shown and "console" in shown


def test_python_and_javascript_share_the_workspace(js: Js):
    python = f"%%tier {js.tier}\n"
    assert js.kernel.run(python + "open('from-python.txt', 'w').write('py')").status == "ok"
    out = js.run("fs.writeFile('from-js.txt', fs.readFile('from-python.txt') + '+js');\n"
                 "fs.mkdir('sub');\nfs.readdir('.').filter(n => n.startsWith('from'))")
    assert result(out)["application/json"] == ["from-js.txt", "from-python.txt"]
    back = js.kernel.run(python + "print(open('from-js.txt').read())")
    assert back.stdout == "py+js\n"
    native = js.kernel.run("print(fs.read_file('from-js.txt'))")  # in fsx
    assert native.stdout == "py+js\n", native.outputs
    missing = js.run("fs.readFile('nowhere.txt')")
    assert missing.error["ename"] == "Error" and "No such file" in missing.error["evalue"]


def test_timeout_and_interrupt_keep_the_context(js: Js):
    js.run("let kept = 'still here';")
    out = js.run("while (true) {}", options="--timeout 1", timeout=30)
    assert out.error["ename"] == "TimeoutError" and "context is kept" in out.error["evalue"]
    out = js.run("while (true) {}", timeout=30, interrupt_after=0.5)
    assert out.error["ename"] == "KeyboardInterrupt"
    out = js.run("await new Promise(() => {}, 1);\n", timeout=30, interrupt_after=0.5)
    assert out.error["ename"] in ("KeyboardInterrupt", "DeadlockError")
    assert result(js.run("kept"))["text/plain"] == '"still here"'


def test_an_output_flood_is_stopped(js: Js):
    python = f"%%tier {js.tier}\n"
    assert js.kernel.run(python + "before_the_flood = 1").status == "ok"
    out = js.run("while (true) console.log('x'.repeat(1000));", timeout=120)
    assert out.error["ename"] == "OutputLimitError" and "1 MiB" in out.error["evalue"]
    assert len(out.stdout) <= (1 << 20) + 1000
    assert result(js.run("1 + 1"))["text/plain"] == "2"
    # The tier's interpreter stopped the cell itself: its Python variables are there.
    assert js.kernel.run(python + "print(before_the_flood)").stdout == "1\n"
    # A table costs rows times columns: past 1000 rows (or 50 columns) there is none, and
    # what is shown is counted whole.
    wide = js.run("Array.from({length: 3000}, (_, i) => ({['k' + i]: i}))", timeout=120)
    assert wide.status == "ok" and "text/html" not in result(wide)
    big = js.run("Array.from({length: 200000}, (_, i) => ({n: i, s: 'x'.repeat(10)}))",
                 timeout=120)
    assert big.error["ename"] == "OutputLimitError"


def test_refused_constructs_and_options_say_what_is_wrong(js: Js):
    out = js.run("const a = 1;\nconst b = eval('2');", options="--strict")
    assert out.error["ename"] == "TierUsageError" and "eval on line 2" in out.error["evalue"]
    out = js.run("const m = await import('x');", options="--strict")
    assert "import() on line 1" in out.error["evalue"]
    out = js.run("import { execSync } from 'child_process';\nexecSync('id')", "ts",
                 options="--strict")
    assert "static import" in out.error["evalue"] and "line 1" in out.error["evalue"]
    out = js.run("1", options="--out y")
    assert out.error["ename"] == "TierUsageError" and "fs.readFile" in out.error["evalue"]
    out = js.kernel.run(f"%%tier {js.tier} --lang ruby\n1")
    assert out.error["ename"] == "TierUsageError" and "python, js or ts" in out.error["evalue"]
    table = js.kernel.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
    row = next(line for line in table.splitlines() if line.strip(" *").startswith(js.tier))
    assert "languages=python,js,ts" in row


@pytest.mark.parametrize("js", ["wasm"], indirect=True)
def test_wasm_memory_and_recursion_make_the_context_anew(js: Js):
    js.run("let lost = 1;")
    out = js.run("const hog = [];\nwhile (true) hog.push(new Array(100000).fill(1));",
                 options="--memory 64m", timeout=60)
    assert out.error["ename"] == "MemoryError" and "64 MiB" in out.error["evalue"]
    assert "made anew" in out.error["evalue"]
    out = js.run("function down() { return down() + 1; }\ndown()", timeout=60)
    assert out.error["ename"] == "RangeError" and "made anew" in out.error["evalue"]
    assert result(js.run("typeof lost"))["text/plain"] == '"undefined"'


@pytest.mark.parametrize("js", ["sandbox"], indirect=True)
def test_sandbox_node_ends_alone_and_says_so(js: Js):
    """Node's own failures end the JS context, never the tier: the Python variables of the
    sandbox live on, and the next JS cell has a new context, said on stderr."""
    python = "%%tier sandbox --memory 512m\n"
    assert js.kernel.run(python + "survivor = 'python'").status == "ok"
    js.run("let lost = 1;", options="--memory 512m")
    out = js.run("function down() { return down() + 1; }\ndown()", options="--memory 512m")
    assert out.error["ename"] == "RangeError" and "call stack" in out.error["evalue"]
    assert result(js.run("lost", options="--memory 512m"))["text/plain"] == "1"  # kept
    out = js.run("const hog = [];\nwhile (true) hog.push(Buffer.alloc(50e6, 1));",
                 options="--memory 512m", timeout=120)
    assert out.error["ename"] == "MemoryError" and "--memory" in out.error["evalue"]
    assert "variables are gone" in out.error["evalue"]
    anew = js.run("typeof lost", options="--memory 512m")
    assert result(anew)["text/plain"] == '"undefined"' and "starts anew" in anew.stderr
    out = js.run("await null;\nwhile (true) {}", options="--memory 512m", timeout=30,
                 interrupt_after=0.5)
    assert out.error["ename"] == "KeyboardInterrupt" and "context was ended" in out.error[
        "evalue"]
    out = js.run("process.exit(3)", options="--memory 512m")
    assert out.error["ename"] == "TierError" and "status 3" in out.error["evalue"]
    out = js.run("throw new Proxy({}, {get() { throw 1; }})", options="--memory 512m")
    assert out.error["ename"] == "Error" and "unreadable" in out.error["evalue"]
    assert result(js.run("'next'", options="--memory 512m"))["text/plain"] == '"next"'
    # Work an earlier cell left behind gets no helper access under a later cell's --allow.
    js.run("setTimeout(() => api('http://127.0.0.1:9/').catch((e) => console.log('late:', "
           "e.name)), 300);", options="--memory 512m")
    later = js.run("await new Promise((done) => setTimeout(done, 1000));",
                   options="--memory 512m --allow api")
    assert "late: PermissionError" in later.stdout
    assert js.kernel.run(python + "print(survivor)").stdout == "python\n"


def test_helper_calls_of_a_js_cell_are_counted(js: Js):
    """A JS cell's helper calls count against the tier's helper_limit, as a Python cell's."""
    need_tier(js.tier)
    session = KernelSession(extra_arguments=["--WasmBackend.helper_limit=3",
                                             "--SandboxBackend.helper_limit=3"])
    try:
        out = session.run(js.line() + "for (let i = 0; i < 5; i++) await db('SELECT 1');")
        assert out.error["ename"] == "PermissionError"
        assert "more than 3" in out.error["evalue"] and "helper_limit" in out.error["evalue"]
        assert session.run(js.line() + "await db('SELECT 2 AS n')").status == "ok"
    finally:
        session.close()


def test_gvisor_runs_javascript_cells():
    need_tier("sandbox --runtime runsc")
    session = KernelSession()
    try:
        line = "%%tier sandbox --runtime runsc --lang ts\n"
        out = session.run(line + "const n: number = 6;\nfs.writeFile('g.txt', String(n * 7));"
                                 "\nawait Promise.resolve(fs.readFile('g.txt'))", timeout=120)
        assert result(out)["text/plain"] == '"42"'
    finally:
        session.close()
