"""The Jupyter protocol conformance suite (jupyter_kernel_test), once per tier.

Import the module, not the classes, or pytest would collect the base classes too.
"""

from __future__ import annotations

import time
from typing import Any

import jupyter_kernel_test as jkt


def ready_to_complete(kc: Any, tier: str) -> None:
    """Run a cell in ``tier`` and wait until its interpreter answers completions: a tier
    answers none before its first cell (it is never started just to complete), nor while its
    interpreter makes its completer the first time (the user presses Tab again)."""
    msg_id = kc.execute(f"%%tier {tier}\n1")
    while kc.get_shell_msg(timeout=120)["parent_header"].get("msg_id") != msg_id:
        pass
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = kc.complete(f"%%tier {tier}\nzi", reply=True, timeout=30)
        if reply["content"]["matches"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the {tier} tier answered no completion within 60 s")


class NativeTierConformance(jkt.KernelTests):
    """The kernel in its default tier (native) behaves as a complete IPython kernel."""

    kernel_name = "tierkernel"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "raise ValueError('oops')"
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
    code_history_pattern = "6*7"
    supported_history_operations = ("tail", "range", "search")


class ProcessTierConformance(jkt.KernelTests):
    """Cells routed with ``%%tier process`` (the guest agent) give the same messages."""

    kernel_name = "tierkernel"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "%%tier process\nprint('hello, world')"
    code_stderr = "%%tier process\nimport sys; print('test', file=sys.stderr)"
    code_generate_error = "%%tier process\nraise ValueError('oops')"
    code_execute_result = [
        {"code": "%%tier process\n6*7", "result": "42"},
        {"code": "%%tier process\nx = [1, 2]\nx + [3]", "result": "[1, 2, 3]"},
    ]
    code_display_data = [
        {"code": "%%tier process\nclass H:\n    def _repr_html_(self): return '<b>x</b>'\n"
                 "display(H())", "mime": "text/html"},
    ]
    code_clear_output = "%%tier process\nclear_output()"
    code_history_pattern = "%%tier process\n6*7"
    supported_history_operations = ("tail", "range")
    completion_samples = [
        {"text": "%%tier process\nzi", "matches": {"zip"}},
        {"text": "%%tier process\n__tierkernel_ag", "matches": {"__tierkernel_agent__"}},
    ]
    code_inspect_sample = "%%tier process\n__tierkernel_agent__"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        ready_to_complete(cls.kc, "process")


class SandboxTierConformance(jkt.KernelTests):
    """Cells routed with ``%%tier sandbox`` (the agent in a Docker container) give the same
    messages. Needs the engine: it fails in CI without one and is skipped elsewhere."""

    kernel_name = "tierkernel"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "%%tier sandbox\nprint('hello, world')"
    code_stderr = "%%tier sandbox\nimport sys; print('test', file=sys.stderr)"
    code_generate_error = "%%tier sandbox\nraise ValueError('oops')"
    code_execute_result = [
        {"code": "%%tier sandbox\n6*7", "result": "42"},
        {"code": "%%tier sandbox\nx = [1, 2]\nx + [3]", "result": "[1, 2, 3]"},
    ]
    code_display_data = [
        {"code": "%%tier sandbox\nclass H:\n    def _repr_html_(self): return '<b>x</b>'\n"
                 "display(H())", "mime": "text/html"},
    ]
    code_clear_output = "%%tier sandbox\nclear_output()"
    code_history_pattern = "%%tier sandbox\n6*7"
    supported_history_operations = ("tail", "range")
    # Completion and inspection answered by the container's interpreter: its builtins
    # have a name the kernel's have not.
    completion_samples = [
        {"text": "%%tier sandbox\nzi", "matches": {"zip"}},
        {"text": "%%tier sandbox\n__tierkernel_ag", "matches": {"__tierkernel_agent__"}},
    ]
    code_inspect_sample = "%%tier sandbox\n__tierkernel_agent__"

    @classmethod
    def setUpClass(cls) -> None:
        from tests.sandbox_support import need_sandbox

        need_sandbox()
        super().setUpClass()
        ready_to_complete(cls.kc, "sandbox")


class ProcessDefaultConformance(jkt.KernelTests):
    """A kernel whose default tier is ``process`` (set in its kernelspec) needs no magic."""

    kernel_name = "tierkernel-process"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "raise ValueError('oops')"
    code_execute_result = [{"code": "6*7", "result": "42"}]
    code_display_data = [
        {"code": "class H:\n    def _repr_html_(self): return '<i>y</i>'\ndisplay(H())",
         "mime": "text/html"},
    ]
    code_clear_output = "clear_output()"
    code_history_pattern = "6*7"
    supported_history_operations = ("tail", "range")


class WasmTierConformance(jkt.KernelTests):
    """Cells routed with ``%%tier wasm`` (CPython on WebAssembly) give the same messages."""

    kernel_name = "tierkernel"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "%%tier wasm\nprint('hello, world')"
    code_stderr = "%%tier wasm\nimport sys; print('test', file=sys.stderr)"
    code_generate_error = "%%tier wasm\nraise ValueError('oops')"
    code_execute_result = [
        {"code": "%%tier wasm\n6*7", "result": "42"},
        {"code": "%%tier wasm\nx = [1, 2]\nx + [3]", "result": "[1, 2, 3]"},
    ]
    code_display_data = [
        {"code": "%%tier wasm\nclass H:\n    def _repr_html_(self): return '<b>x</b>'\n"
                 "display(H())", "mime": "text/html"},
    ]
    code_clear_output = "%%tier wasm\nclear_output()"
    code_history_pattern = "%%tier wasm\n6*7"
    supported_history_operations = ("tail", "range")
    # Completion and inspection answered by the guest interpreter: its builtins
    # have a name the kernel's have not.
    completion_samples = [
        {"text": "%%tier wasm\nzi", "matches": {"zip"}},
        {"text": "%%tier wasm\n__tierkernel_ag", "matches": {"__tierkernel_agent__"}},
    ]
    code_inspect_sample = "%%tier wasm\n__tierkernel_agent__"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        ready_to_complete(cls.kc, "wasm")


class WasmDefaultConformance(jkt.KernelTests):
    """A kernel whose default tier is ``wasm`` (set in its kernelspec) needs no magic."""

    kernel_name = "tierkernel-wasm"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "raise ValueError('oops')"
    code_execute_result = [{"code": "6*7", "result": "42"}]
    code_display_data = [
        {"code": "class H:\n    def _repr_html_(self): return '<i>y</i>'\ndisplay(H())",
         "mime": "text/html"},
    ]
    code_clear_output = "clear_output()"
    code_history_pattern = "6*7"
    supported_history_operations = ("tail", "range")
    # Cells without %%tier complete from the default tier's interpreter.
    completion_samples = [{"text": "__tierkernel_ag", "matches": {"__tierkernel_agent__"}}]
    code_inspect_sample = "__tierkernel_agent__"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        ready_to_complete(cls.kc, "wasm")


class Welcome(jkt.IopubWelcomeTests):
    """JEP 65: a new iopub subscriber gets an iopub_welcome message."""

    kernel_name = "tierkernel"
    support_iopub_welcome = True
