"""The tier contract suite (tierkernel.testing.tier) once per built-in tier, and once per
kernelspec whose default tier is not native: Jupyter protocol conformance (jupyter_kernel_test)
and what every tier promises.

jupyter_kernel_test's own base classes are reached through its module, never imported by name:
pytest collects every ``TestCase`` subclass a test module holds, the bases too.
"""

from __future__ import annotations

import jupyter_kernel_test as jkt

from tests.sandbox_support import need_sandbox
from tierkernel.testing.tier import TierContract

#: The agent tiers' guest namespaces hold this name, the kernel's does not: a completion or an
#: inspection that finds it was answered by the tier.
AGENT_MARKER = "__tierkernel_agent__"


class NativeTierConformance(TierContract):
    """The kernel in its default tier (native) behaves as a complete IPython kernel."""

    tier = "native"
    routed = False

    code_execute_result = [
        {"code": "6*7", "result": "42"},
        {"code": "'tier' * 2", "result": "'tiertier'"},
        {"code": "%%tier native\n1+1", "result": "2"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>x</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math(r'\\alpha'))",
         "mime": "text/latex"},
    ]
    code_page_something = "len?"
    code_clear_output = "from IPython.display import clear_output; clear_output()"
    completion_samples = [
        {"text": "zi", "matches": {"zip"}},
        {"text": "import operat", "matches": {"operator"}},
    ]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_inspect_sample = "zip"
    supported_history_operations = ("tail", "range", "search")

    # Native cells reach the workspace through `fs`: their working directory is the host's.
    def code_read_file(self, path: str) -> str:
        return f"fs.read_file({'/' + path!r})"

    def code_write_file(self, path: str, text: str) -> str:
        return f"fs.write_file({'/' + path!r}, {text!r})"


class ProcessTierConformance(TierContract):
    """Cells routed with ``%%tier process`` (the guest agent) give the same messages."""

    tier = "process"
    marker = AGENT_MARKER


class SandboxTierConformance(TierContract):
    """Cells routed with ``%%tier sandbox`` (the agent in a Docker container) give the same
    messages. Needs the engine: it fails in CI without one and is skipped elsewhere."""

    tier = "sandbox"
    marker = AGENT_MARKER

    @classmethod
    def require_available(cls) -> None:
        need_sandbox()


class WasmTierConformance(TierContract):
    """Cells routed with ``%%tier wasm`` (CPython on WebAssembly) give the same messages."""

    tier = "wasm"
    marker = AGENT_MARKER


class ProcessDefaultConformance(TierContract):
    """A kernel whose default tier is ``process`` (set in its kernelspec) needs no magic."""

    tier = "process"
    kernel_name = "tierkernel-process"
    routed = False
    marker = AGENT_MARKER


class WasmDefaultConformance(TierContract):
    """A kernel whose default tier is ``wasm`` (set in its kernelspec) needs no magic."""

    tier = "wasm"
    kernel_name = "tierkernel-wasm"
    routed = False
    marker = AGENT_MARKER


class Welcome(jkt.IopubWelcomeTests):
    """JEP 65: a new iopub subscriber gets an iopub_welcome message."""

    kernel_name = "tierkernel"
    support_iopub_welcome = True


class _ScriptCells(jkt.KernelTests):
    """JavaScript or TypeScript cells of the wasm or sandbox tier (``--lang``) give the
    messages a Jupyter client expects. The kernel's language stays Python: a cell picks its
    own. A subclass names its tier and language; the samples are the same for each."""

    __test__ = False
    kernel_name = "tierkernel"
    language_name = "python"
    tier = "wasm"
    lang = "js"
    #: (cell body, the result's text/plain)
    results: list[tuple[str, str]] = []

    @classmethod
    def require_available(cls) -> None:
        from unittest import SkipTest

        from tierkernel.backends.wasm import runtime

        if runtime.runtime_problem() is not None or not runtime.is_compiled():
            raise SkipTest("the wasm runtime is not installed or not compiled")

    @classmethod
    def setUpClass(cls) -> None:
        cls.require_available()
        line = f"%%tier {cls.tier} --lang {cls.lang}\n"
        cls.code_hello_world = line + "console.log('hello, world')"
        cls.code_stderr = line + "console.error('to stderr')"
        cls.code_display_data = [{"code": line + "display({shown: 1})",
                                  "mime": "application/json"}]
        cls.code_execute_result = [{"code": line + body, "result": shown}
                                   for body, shown in cls.results]
        super().setUpClass()


_JS_RESULTS = [("6 * 7", "42"), ("'tier'.repeat(2)", '"tiertier"')]
_TS_RESULTS = [("const n: number = 6;\nn * 7", "42")]


class JavaScriptCellConformance(_ScriptCells):
    """``%%tier wasm --lang js`` cells."""

    __test__ = True
    results = _JS_RESULTS


class TypeScriptCellConformance(_ScriptCells):
    """``%%tier wasm --lang ts`` cells: their types stripped, never checked."""

    __test__ = True
    lang = "ts"
    results = _TS_RESULTS


class _SandboxScriptCells(_ScriptCells):
    __test__ = False
    tier = "sandbox"

    @classmethod
    def require_available(cls) -> None:
        need_sandbox()


class SandboxJavaScriptCellConformance(_SandboxScriptCells):
    """``%%tier sandbox --lang js`` cells (Node.js in the container)."""

    __test__ = True
    results = _JS_RESULTS


class SandboxTypeScriptCellConformance(_SandboxScriptCells):
    """``%%tier sandbox --lang ts`` cells: their types stripped by TypeScript, never checked."""

    __test__ = True
    lang = "ts"
    results = _TS_RESULTS
