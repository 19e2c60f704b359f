"""JavaScript and TypeScript cells in the wasm tier (``%%tier wasm --lang js`` / ``--lang ts``).

The cells run in QuickJS compiled to WebAssembly (``quickjs-rs``, pinned exactly) on the same
wasmtime as the Python guest: no network, no host files, nothing of the host but what the
functions below hand in. One context per kernel, so ``let``, ``const``, functions and classes
of one cell are there in the next; a cell may ``await`` at its top level; its last expression's
value comes back as the cell's result (pretty JSON, with a table for an array of records).

What a cell reaches, each through one host function taking and returning JSON text (a call
costs some 0.3 ms; a structured value, ten times that):

- ``console.log/info/warn/error``: printed as the cell runs (warn and error on stderr), and
  recorded in the cell's log through the ``console`` helper, as in Python;
- ``await ai(model, input)``, ``await api(url, {method, headers, json, data, timeout})``,
  ``await db(query, params)``: the runtime helpers, under the cell's policy and audited;
- ``fs.readFile``, ``writeFile``, ``readdir``, ``stat``, ``mkdir``, ``rm``: the fsx workspace,
  the files a Python cell of any tier sees;
- ``display(value)``: a value shown as a cell's output.

Limits, each with its own error: the tier's ``timeout`` (the context is kept); the stop
button (kept too); memory, capped by wasmtime on the context's store at the tier's memory
limit (QuickJS's own cap does not hold on WASI), after which the context is made anew; and a
trap (stack overflow) makes it anew as well, said plainly. quickjs-rs offers no hook for the
two caps, so they are set on its objects directly (``_harden``), which is why the version is
pinned: a change there fails the first JS cell with a clear error, never unbounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from tierkernel.backends.base import ExecError, ExecResult, OutputSink
from tierkernel.backends.wasm import js_cache
from tierkernel.guest.js_node import bundle, error_lines

#: Installed once in each new context.
_SHIM = r"""
(() => {
  const fmt = (args) => args.map((v) => {
    if (typeof v === "string") return v;
    try { const s = JSON.stringify(v); return s === undefined ? String(v) : s; }
    catch (e) { return String(v); }
  }).join(" ");
  const call = (helper, args) => {
    const answer = JSON.parse(__tk_helper(JSON.stringify({ helper, args })));
    if (answer.ok) return answer.value;
    const error = new Error(answer.error.message);
    error.name = answer.error.type;
    throw error;
  };
  const level = (name, stream) => (...args) => {
    const text = fmt(args);
    __tk_emit(stream, text + "\n");
    call("console", { level: name, message: text });
  };
  globalThis.console = { log: level("log", "stdout"), info: level("info", "stdout"),
                         warn: level("warn", "stderr"), error: level("error", "stderr") };
  globalThis.display = (value) => { __tk_display(JSON.stringify(value ?? null)); };
  // A cell's value as one string, made here: quickjs-rs turns a structured value into
  // Python objects one host call at a time (1.5 ms an object), JSON in one.
  globalThis.__tk_shown = (value) => {
    if (value === undefined || value === null) return null;
    try {
      const plain = ["string", "number", "boolean"].includes(typeof value)
        || Array.isArray(value) || Object.getPrototypeOf(value) === Object.prototype;
      if (plain) {
        const json = JSON.stringify(value);
        if (json !== undefined) return "j" + json;
      }
      return "t" + String(value);
    } catch (error) {
      return "t[a value that cannot be shown]";
    }
  };
  globalThis.ai = async (model, input) => call("ai", { model, input });
  globalThis.api = async (url, options = {}) => call("api", { url, ...options });
  globalThis.db = async (query, params = null) => call("db", { query, params });
  const files = (op, args) => {
    const answer = JSON.parse(__tk_fs(JSON.stringify({ op, ...args })));
    if (answer.ok) return answer.value;
    const error = new Error(answer.error.message);
    error.code = answer.error.code;
    throw error;
  };
  globalThis.fs = {
    readFile: (path, encoding = "utf8") => files("read", { path, encoding }),
    writeFile: (path, data) => files("write", { path, data: String(data) }),
    readdir: (path = ".") => files("list", { path }),
    stat: (path) => files("stat", { path }),
    mkdir: (path, options = {}) => files("mkdir", { path, recursive: !!options.recursive }),
    rm: (path, options = {}) => files("rm", { path, recursive: !!options.recursive }),
  };
})();
undefined
"""


class JsSession:
    """The kernel's JavaScript context in the wasm tier, on a thread of its own (quickjs-rs
    wants every call of a context on one thread)."""

    def __init__(self, memory: int, output_limit: int, helper_limit: int = 10_000) -> None:
        self.memory = memory
        #: ai/api/db/console calls one cell may make (``c.WasmBackend.helper_limit``), as
        #: for the tier's Python cells; past it each call is refused.
        self.helper_limit = helper_limit
        self._helper_calls = 0
        self._file_calls = 0
        #: Bytes of output (prints, displays, results) one cell may send; past it the cell
        #: is stopped, as in the tier's Python cells.
        self.output_limit = output_limit
        self._output = 0
        self._over = False
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wasm-js")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Any = None
        self._context: Any = None
        self._stop = threading.Event()
        #: The running cell's outputs, helpers and files (set on the JS thread per cell).
        self._sink: OutputSink | None = None
        self._helpers: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._files: Any = None

    async def run(self, code: str, lang: str, sink: OutputSink, timeout: float | None,
                  helpers: Callable[[dict[str, Any]], dict[str, Any]] | None,
                  files: Any, memory: int | None = None) -> ExecResult:
        """Run one cell; its output goes to ``sink`` as it comes. ``memory`` other than the
        context's makes the context anew with it (said on stderr)."""
        self._stop.clear()
        self._output, self._over, self._helper_calls, self._file_calls = 0, False, 0, 0
        future = self._pool.submit(self._run, code, lang, sink, timeout, helpers, files,
                                   memory)
        return await asyncio.wrap_future(future)

    def interrupt(self) -> None:
        """The stop button: the running cell ends with KeyboardInterrupt at its next poll."""
        self._stop.set()

    def close(self) -> None:
        """Drop the context and the thread. Never raises."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._pool.submit(self._drop).result(timeout=5)
        self._pool.shutdown(wait=False)

    # -- on the JS thread ---------------------------------------------------------------
    def _open(self) -> None:
        import quickjs_rs

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        js_cache.prime((js_cache.ENGINE,))
        runtime = quickjs_rs.Runtime(memory_limit=self.memory, stack_limit=1 << 20)
        context = runtime.new_context()
        _harden(runtime, context, self.memory, self._stop)
        context.register("__tk_emit", self._emit)
        context.register("__tk_display", self._display)
        context.register("__tk_helper", self._helper)
        context.register("__tk_fs", self._fs)
        context.eval(_SHIM)
        self._runtime, self._context = runtime, context

    def _drop(self) -> None:
        context, runtime, self._context, self._runtime = self._context, self._runtime, None, None
        for thing in (context, runtime):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()

    def _run(self, code: str, lang: str, sink: OutputSink, timeout: float | None,
             helpers: Callable[[dict[str, Any]], dict[str, Any]] | None,
             files: Any, memory: int | None) -> ExecResult:
        import quickjs_rs

        started = time.perf_counter()
        self._sink, self._helpers, self._files = sink, helpers, files
        try:
            if memory is not None and memory != self.memory:
                if self._context is not None:
                    sink.stream("stderr", f"tierkernel: the JavaScript context starts anew "
                                          f"with --memory {memory >> 20}m (it had "
                                          f"{self.memory >> 20}m); its variables are gone.\n")
                    self._drop()
                self.memory = memory
            if self._context is None:
                try:
                    self._open()
                except Exception as exc:
                    return _failed(sink, started, "TierError",
                                   f"the JavaScript engine could not start: {exc}")
            if lang == "ts":
                js_cache.prime((js_cache.TRANSFORM,))
            flags = (quickjs_rs.SourceTransform.SOURCE_TS
                     | quickjs_rs.SourceTransform.STRIP_TYPESCRIPT) if lang == "ts" else None
            assert self._loop is not None
            try:
                try:
                    value = self._loop.run_until_complete(self._context.eval_handle_async(
                        code, timeout=timeout, transform_flags=flags))
                except quickjs_rs.JSError as exc:
                    if not self._unparsed_return(exc):
                        raise
                    # Code written as a function's body (``return 1 + 1``, as the HTTP API's
                    # origin takes it) runs as one: the cell did not parse, so none of it ran.
                    # Its declarations are then its own, not the context's.
                    left = None if timeout is None else max(
                        0.001, timeout - (time.perf_counter() - started))
                    value = self._loop.run_until_complete(self._context.eval_handle_async(
                        f"await (async () => {{{code}\n}})()", timeout=left,
                        transform_flags=flags))
            except quickjs_rs.JSError as exc:
                name = getattr(exc, "name", None) or "Error"
                message = str(exc).removeprefix(f"{name}: ")
                stack = (getattr(exc, "stack", None) or "").replace("eval_script", "<cell>")
                return _failed(sink, started, name, message, stack)
            except (quickjs_rs.TimeoutError, quickjs_rs.InterruptError,
                    quickjs_rs.DeadlockError) as exc:
                if self._over:
                    return _failed(sink, started, "OutputLimitError",
                                   f"the cell's output passed the {self.output_limit >> 20} MiB "
                                   "output limit and the cell was stopped; the JavaScript "
                                   "context is kept (c.WasmBackend.output_limit)")
                if self._stop.is_set():
                    return _failed(sink, started, "KeyboardInterrupt",
                                   "interrupted; the JavaScript context is kept")
                if isinstance(exc, quickjs_rs.DeadlockError) and not _late(started, timeout):
                    return _failed(sink, started, "DeadlockError",
                                   "the cell awaits a promise that nothing will settle")
                return _failed(sink, started, "TimeoutError",
                               f"the cell ran longer than its {timeout:g} s limit; the "
                               "JavaScript context is kept (raise it with --timeout)")
            except quickjs_rs.MemoryLimitError:
                self._drop()
                return _failed(sink, started, "MemoryError",
                               f"the cell went over the wasm tier's memory limit of "
                               f"{self.memory >> 20} MiB (--memory); the JavaScript context "
                               "was made anew: its variables are gone")
            except Exception as exc:  # a trap (stack overflow) leaves the context unusable
                self._drop()
                first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
                return _failed(sink, started, "RangeError",
                               f"the JavaScript engine stopped ({type(exc).__name__}: {first}),"
                               " as recursion too deep makes it; the context was made anew: "
                               "its variables are gone")
            text = self._text_of(value)
            if text is not None:
                shown = self._shown(text)
                if shown is not None:
                    sink.result(shown, {})
            if self._over:
                return _failed(sink, started, "OutputLimitError",
                               f"the cell's output passed the {self.output_limit >> 20} MiB "
                               "output limit; the rest was dropped (c.WasmBackend.output_limit)")
            return ExecResult(True, "wasm", time.perf_counter() - started,
                              helper_calls=self._helper_calls)
        finally:
            self._sink = self._helpers = self._files = None

    def _unparsed_return(self, exc: Exception) -> bool:
        """Whether ``exc`` is the parser refusing a top-level ``return`` of a cell that ran
        nothing: QuickJS's SyntaxError at the script's own line (a SyntaxError thrown while
        the cell runs, by eval or by hand, has a frame of the code that threw it), or OXC's
        refusal of a TS cell, and not a call, a print or a file touched."""
        if getattr(exc, "name", None) != "SyntaxError" and "source parse error" not in str(exc):
            return False
        if not any(words in str(exc) for words in _RETURN_OUTSIDE):
            return False
        stack = [line.strip() for line in str(getattr(exc, "stack", None) or "").splitlines()
                 if line.strip()]
        parsed = all(re.fullmatch(r"at eval_script:\d+:\d+", line) for line in stack)
        return parsed and len(stack) <= 1 and not (self._output or self._helper_calls
                                                   or self._file_calls)

    def _counted(self, size: int) -> bool:
        """Count ``size`` bytes of the cell's output; False (and the cell stopped) past the
        limit."""
        self._output += size
        if self._output > self.output_limit:
            self._over = True
            self._stop.set()  # the interrupt poll ends the cell
            return False
        return not self._over

    def _emit(self, stream: str, text: str) -> None:
        text = str(text)
        if self._sink is not None and self._counted(len(text)):
            self._sink.stream("stderr" if stream == "stderr" else "stdout", text)

    def _display(self, text: str) -> None:
        if self._sink is not None:
            shown = self._bundle(text)
            if shown is not None:
                self._sink.display(shown, {})

    def _text_of(self, handle: Any) -> str | None:
        """The cell's value (a handle) as ``__tk_shown`` gives it; the handle is let go. A
        number, boolean or string (most results) is read as it is, one host call less."""
        try:
            with handle:
                kind = handle.type_of
                if kind in ("undefined", "null"):
                    return None
                if kind in ("number", "boolean", "string"):
                    value = handle.to_python()
                    return "j" + json.dumps(value, ensure_ascii=False)
                shown = self._context.eval_handle("globalThis.__tk_shown")
                with shown, shown.call(handle) as text:
                    value = text.to_python()
        except Exception:
            return "t[a value that cannot be shown]"
        return value if isinstance(value, str) else None

    def _shown(self, text: str) -> dict[str, Any] | None:
        """The bundle of a value ``__tk_shown`` gave (``j`` JSON or ``t`` text), counted;
        None past the output limit."""
        if text.startswith("j"):
            return self._bundle(text[1:])
        plain = text[1:]
        return {"text/plain": plain} if self._counted(len(plain)) else None

    def _bundle(self, text: str) -> dict[str, Any] | None:
        """The value whose JSON is ``text`` as the notebook shows it, counted whole against
        the output limit; None (and the cell stopped) past it. The JSON is measured first:
        the value, its pretty text and its table are made only within the limit."""
        if self._output + len(text) > self.output_limit:
            self._counted(len(text))
            return None
        shown = bundle(json.loads(text))
        total = sum(len(part) if isinstance(part, str) else len(text)
                    for part in shown.values())
        return shown if self._counted(total) else None

    def _helper(self, text: str) -> str:
        request = json.loads(text)
        self._helper_calls += 1
        if self._helper_calls > self.helper_limit:
            answer: dict[str, Any] = {"ok": False, "error": {
                "type": "PermissionError",
                "message": f"this cell made more than {self.helper_limit:,} ai/api/db/console "
                           "calls, the limit of the wasm tier; raise it with "
                           "c.WasmBackend.helper_limit"}}
        elif self._helpers is None:
            answer = {"ok": False, "error": {
                "type": "RuntimeError", "message": "the runtime helpers are not available"}}
        else:
            answer = self._helpers(request)
        return json.dumps(answer, default=str)

    def _fs(self, text: str) -> str:
        request = json.loads(text)
        self._file_calls += 1
        try:
            value = _file_op(self._files, request)
        except FileNotFoundError as exc:
            return json.dumps({"ok": False, "error": {"code": "ENOENT", "message": str(exc)}})
        except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError,
                OSError, ValueError) as exc:
            codes: dict[type, str] = {IsADirectoryError: "EISDIR", NotADirectoryError: "ENOTDIR",
                                      FileExistsError: "EEXIST", PermissionError: "EACCES"}
            code = codes.get(type(exc), "EIO")
            return json.dumps({"ok": False, "error": {"code": code,
                                                      "message": f"{type(exc).__name__}: {exc}"}})
        return json.dumps({"ok": True, "value": value})


def _file_op(files: Any, request: dict[str, Any]) -> Any:
    """One ``fs`` call on the fsx workspace (``files``: the kernel's facade)."""
    if files is None:
        raise PermissionError("this tier has no workspace")
    op, path = request.get("op"), str(request.get("path", "."))
    if op == "read":
        encoding = request.get("encoding")
        if not encoding and files.info(path).get("size", 0) > BINARY_READ_LIMIT:
            raise ValueError(f"{path} is over {BINARY_READ_LIMIT >> 20} MiB: read it as text "
                             "(fs.readFile(path)), or from a Python cell")
        data = files.cat_file(path)
        return data.decode("utf-8", "replace") if encoding else list(data)
    if op == "write":
        files.pipe_file(path, str(request.get("data", "")).encode())
        return None
    if op == "list":
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1]
                      for entry in files.ls(path, detail=False))
    if op == "stat":
        info = files.info(path)
        return {"size": info.get("size"), "isDirectory": info.get("type") == "directory",
                "mtime": info.get("mtime")}
    if op == "mkdir":
        files.makedirs(path, exist_ok=bool(request.get("recursive"))) \
            if request.get("recursive") else files.mkdir(path)
        return None
    if op == "rm":
        files.rm(path, recursive=bool(request.get("recursive")))
        return None
    raise ValueError(f"unknown fs operation {op!r}")


def _harden(runtime: Any, context: Any, memory: int, stop: threading.Event) -> None:
    """The caps quickjs-rs has no hook for: wasmtime's limit on the context's memory, and an
    interrupt poll that also answers the stop button. Raises when quickjs-rs changed."""
    try:
        store = context._engine_ctx._inst.store
        engine_runtime = runtime._engine_rt
    except AttributeError as exc:
        raise RuntimeError(f"quickjs-rs is not the version tierkernel knows ({exc})") from None
    store.set_limits(memory_size=memory)

    def interrupt() -> bool:
        deadline = runtime._deadline
        return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

    engine_runtime.set_interrupt_handler(interrupt)


#: The largest file ``fs.readFile(path, null)`` gives as bytes (each byte is a number there:
#: some 40 bytes of the host's memory on the way).
BINARY_READ_LIMIT = 8 << 20
#: How QuickJS and OXC (a TS cell) refuse a ``return`` outside a function.
_RETURN_OUTSIDE = ("return not in a function", "'return' statement can only be used")


def _late(started: float, timeout: float | None) -> bool:
    return timeout is not None and time.perf_counter() - started >= timeout


def _failed(sink: OutputSink, started: float, name: str, message: str,
            stack: str = "") -> ExecResult:
    traceback = error_lines(name, message, stack.rstrip().splitlines() if stack.strip() else [])
    sink.error(name, message, traceback)
    return ExecResult(False, "wasm", time.perf_counter() - started,
                      error=ExecError(name, message, traceback))
