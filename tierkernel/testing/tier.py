"""The tier contract suite: the kernel tests every tier passes, run in a real kernel.

:class:`TierContract` starts a tierkernel kernel (a kernelspec, ``tierkernel`` by default) and
runs cells in one tier, named as the registry (the entry-point group ``tierkernel.backends``)
names it, through ``%%tier NAME``. It holds the Jupyter protocol conformance tests of
jupyter_kernel_test (stdout, stderr, errors, results, display data, clear_output, history,
completion, inspection), fed with cells for that tier, and what the tier contract in
:mod:`tierkernel.backends.base` promises on top: the execute_reply's metadata names the tier,
state lasts between cells and past errors, an interrupt stops a cell and a ``--timeout`` ends
one with an error saying how to raise it (the tier keeps working after both), the workspace
is shared with native cells, and ``%tier`` lists the tier as available.

A third-party tier's test module subclasses it, as fsspec's abstract tests are used::

    # test_mytier.py, in the package that registers the tier "mytier"
    from tierkernel.testing.tier import TierContract


    class MyTierContract(TierContract):
        tier = "mytier"
        # Optional: a name only the tier's namespace has, so completion and inspection
        # are seen to come from the tier, not from the kernel.
        marker = "__mytier_session__"
        # A tier that does not complete names (Tab): completes = False


and ``pytest test_mytier.py`` runs every test against a kernel routing cells to ``mytier``.
The class is skipped, with the tier's reason, where the tier is not available; override
:meth:`TierContract.require_available` to fail instead (CI). Each sample (``code_*``,
``completion_samples``) can be overridden by a class attribute of the same name.

tierkernel's own tiers run the same suite (``tests/test_conformance.py``). This module needs
jupyter_kernel_test, a test dependency: the kernel never imports it. The tests are
``unittest`` methods (jupyter_kernel_test's base is a ``TestCase``); pytest runs them.
"""

from __future__ import annotations

import queue
import re
import time
from typing import Any, ClassVar
from unittest import SkipTest

import jupyter_kernel_test as jkt

from tierkernel.backends.registry import discover

__all__ = ["TierContract"]


class TierContract(jkt.KernelTests):  # type: ignore[misc]  # jupyter_kernel_test is untyped
    """The kernel tests every tier passes; a subclass sets :attr:`tier`.

    pytest collects its subclasses whatever their names (they are ``unittest.TestCase``
    subclasses), but not this class, even imported by name into a test module: ``__test__`` is
    false here and set true for each subclass that does not set it itself.
    """

    __test__ = False

    #: The tier under test, as named in the registry (``%%tier NAME``).
    tier: ClassVar[str] = ""
    #: The kernelspec to start. A kernelspec whose default tier is :attr:`tier` can be tested
    #: with :attr:`routed` false.
    kernel_name = "tierkernel"
    #: Whether cells carry a ``%%tier NAME`` first line (false: the kernel's default tier
    #: runs them, which must be :attr:`tier`).
    routed: ClassVar[bool] = True
    #: A name only the tier's namespace has (None: none), used to check that completion and
    #: inspection are answered by the tier.
    marker: ClassVar[str | None] = None
    #: Whether the tier completes names (Tab) and inspects them (``obj?``); false: neither
    #: is tested.
    completes: ClassVar[bool] = True
    #: Seconds the tier may take to start, at the first cell and after a cell that cost it
    #: its session (an interrupt or a timeout may).
    start_timeout: ClassVar[int] = 120

    language_name = "python"
    file_extension = ".py"
    supported_history_operations: tuple[str, ...] = ("tail", "range")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    # -- cells for jupyter_kernel_test's tests ------------------------------------------------
    @classmethod
    def cell(cls, code: str) -> str:
        """``code`` as a cell that runs in the tier under test."""
        return f"%%tier {cls.tier}\n{code}" if cls.routed else code

    @property
    def code_hello_world(self) -> str:
        """A cell that prints ``hello, world`` to stdout."""
        return self.cell("print('hello, world')")

    @property
    def code_stderr(self) -> str:
        """A cell that prints to stderr."""
        return self.cell("import sys; print('test', file=sys.stderr)")

    @property
    def code_generate_error(self) -> str:
        """A cell that raises."""
        return self.cell("raise ValueError('oops')")

    @property
    def code_execute_result(self) -> list[dict[str, str]]:
        """Cells whose last expression is a result, with its ``text/plain``."""
        return [{"code": self.cell("6*7"), "result": "42"},
                {"code": self.cell("x = [1, 2]\nx + [3]"), "result": "[1, 2, 3]"}]

    @property
    def code_display_data(self) -> list[dict[str, str]]:
        """Cells that call ``display`` (as IPython has it), with the mime type they show."""
        return [{"code": self.cell("class H:\n    def _repr_html_(self): return '<b>x</b>'\n"
                                   "display(H())"), "mime": "text/html"}]

    @property
    def code_clear_output(self) -> str:
        """A cell that clears its output (``clear_output`` as the agent tiers define it)."""
        return self.cell("clear_output()")

    @property
    def code_history_pattern(self) -> str:
        """A cell run before the history tests look for it."""
        return self.cell("6*7")

    @property
    def completion_samples(self) -> list[dict[str, Any]]:
        """Cells to complete at their end, with the matches expected."""
        if not self.completes:
            return []
        samples: list[dict[str, Any]] = [{"text": self.cell("zi"), "matches": {"zip"}}]
        if self.marker:
            samples.append({"text": self.cell(self.marker[:-4]), "matches": {self.marker}})
        return samples

    @property
    def code_inspect_sample(self) -> str:
        """A cell whose last name the tier explains (``obj?``)."""
        return self.cell(self.marker or "zip") if self.completes else ""

    # -- how a cell of the tier reaches the shared workspace -----------------------------
    def code_read_file(self, path: str) -> str:
        """A cell body whose result is the text of the workspace file ``path`` (relative):
        by default, the tier's working directory is the workspace."""
        return f"open({path!r}, encoding='utf-8').read()"

    def code_write_file(self, path: str, text: str) -> str:
        """A cell body that writes ``text`` to the workspace file ``path`` (relative)."""
        return f"with open({path!r}, 'w', encoding='utf-8') as f:\n    f.write({text!r})"

    # -- set-up --------------------------------------------------------------------------
    @classmethod
    def setUpClass(cls) -> None:
        """Check the tier is registered and available, start the kernel, start the tier."""
        if not cls.tier:
            raise TypeError(f"{cls.__name__} must set `tier` to a registered tier's name")
        cls.require_available()
        super().setUpClass()
        cls.warm_up()

    @classmethod
    def require_available(cls) -> None:
        """Fail when :attr:`tier` is not registered (or cannot be loaded); skip the class,
        with the tier's own reason, when it is not available here. Called before the kernel
        starts; override to fail rather than skip where the tier must run (CI)."""
        classes, broken = discover()
        for tier in broken:
            if tier.name == cls.tier:
                raise AssertionError(f"the tier {cls.tier!r} is registered but broken: "
                                     f"{tier.reason}")
        if cls.tier not in classes:
            raise AssertionError(
                f"no tier {cls.tier!r} in the registry (entry-point group "
                f"'tierkernel.backends'; registered: {', '.join(sorted(classes))}). Is the "
                "package that declares it installed in this environment?")
        backend = classes[cls.tier]()
        backend.name = cls.tier
        try:
            status = backend.availability()
        finally:
            backend.shutdown()
        if not status.available:
            raise SkipTest(f"the {cls.tier} tier is not available here: {status.reason}")

    @classmethod
    def warm_up(cls) -> None:
        """Run a first cell in the tier (it starts, within :attr:`start_timeout`) and, when
        it :attr:`completes`, wait until it answers completions: a tier
        answers none before its first cell, nor while its interpreter makes its completer
        (a user would press Tab again)."""
        msg_id = cls.kc.execute(f"%%tier {cls.tier}\n1")
        deadline = time.monotonic() + cls.start_timeout
        while cls.kc.get_shell_msg(timeout=cls.start_timeout)["parent_header"].get(
                "msg_id") != msg_id:
            if time.monotonic() > deadline:
                raise AssertionError(f"the {cls.tier} tier did not start within "
                                     f"{cls.start_timeout} s")
        if not cls.completes:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reply = cls.kc.complete(f"%%tier {cls.tier}\nzi", reply=True, timeout=30)
            if reply["content"]["matches"]:
                return
            time.sleep(0.2)
        raise AssertionError(f"the {cls.tier} tier answered no completion within 60 s")

    # -- helpers -------------------------------------------------------------------------
    def run_cell(self, code: str, timeout: int = 60) -> tuple[dict[str, Any],
                                                               list[dict[str, Any]]]:
        """Execute ``code``; the execute_reply and the iopub messages before idle."""
        self.flush_channels()
        reply, outputs = self.execute_helper(code=code, timeout=timeout)
        return reply, outputs

    def result_of(self, code: str, timeout: int = 60) -> str:
        """The ``text/plain`` result of a cell that must succeed."""
        reply, outputs = self.run_cell(code, timeout)
        self.assertEqual(reply["content"]["status"], "ok", outputs)
        results = [m["content"]["data"]["text/plain"] for m in outputs
                   if m["msg_type"] == "execute_result"]
        self.assertEqual(len(results), 1, outputs)
        return str(results[0])

    def error_of(self, code: str, timeout: int = 60) -> dict[str, Any]:
        """The error output of a cell that must fail, as its one ``error`` message."""
        reply, outputs = self.run_cell(code, timeout)
        self.assertEqual(reply["content"]["status"], "error", outputs)
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, outputs)
        return dict(errors[0])

    # -- the tier contract ----------------------------------------------------------------
    def test_reply_metadata_names_the_tier(self) -> None:
        reply, _ = self.run_cell(self.cell("1 + 1"))
        info = reply["metadata"]["tierkernel"]
        self.assertEqual((info["tier"], info["success"]), (self.tier, True))
        self.assertGreaterEqual(info["duration_ms"], 0)
        reply, _ = self.run_cell(self.cell("raise ValueError('contract')"))
        info = reply["metadata"]["tierkernel"]
        self.assertEqual((info["tier"], info["success"]), (self.tier, False))

    def test_state_lasts_between_cells_and_past_errors(self) -> None:
        self.run_cell(self.cell("contract_kept = 20"))
        error = self.error_of(self.cell("raise ValueError('in between')"))
        self.assertEqual((error["ename"], error["evalue"]), ("ValueError", "in between"))
        self.assertEqual(self.result_of(self.cell("contract_kept + 1")), "21")

    def test_interrupt_stops_the_cell_and_the_tier_keeps_working(self) -> None:
        self.flush_channels()
        msg_id = self.kc.execute(self.cell(
            "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.05)"))
        self._wait_for_stdout(msg_id, "started", self.start_timeout)
        interrupted = time.monotonic()
        self.km.interrupt_kernel()
        reply = self.get_non_kernel_info_reply(timeout=60)
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertLess(time.monotonic() - interrupted, 15, "the interrupt took too long")
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "KeyboardInterrupt")
        self._wait_for_idle(msg_id)
        self.assertEqual(self.result_of(self.cell("'alive'"), self.start_timeout), "'alive'")

    def test_timeout_ends_the_cell_and_says_how_to_raise_it(self) -> None:
        started = time.monotonic()
        error = self.error_of(f"%%tier {self.tier} --timeout 1\nimport time\ntime.sleep(60)",
                              timeout=self.start_timeout)
        self.assertLess(time.monotonic() - started, 30, "the timeout took too long")
        self.assertIn("--timeout", error["evalue"])
        self.assertEqual(self.result_of(self.cell("'alive'"), self.start_timeout), "'alive'")

    def test_workspace_is_shared_with_native_cells(self) -> None:
        there, back = f"contract-{self.tier}-in.txt", f"contract-{self.tier}-out.txt"
        self.run_cell(f"%%tier native\nfs.write_file('/{there}', 'from native')")
        self.assertEqual(self.result_of(self.cell(self.code_read_file(there))), "'from native'")
        reply, outputs = self.run_cell(self.cell(self.code_write_file(back, "from the tier")))
        self.assertEqual(reply["content"]["status"], "ok", outputs)
        self.assertEqual(self.result_of(f"%%tier native\nfs.read_file('/{back}')"),
                         "'from the tier'")
        self.run_cell(f"%%tier native\nfs.unlink('/{there}'); fs.unlink('/{back}')")

    def test_tier_table_lists_the_tier_as_available(self) -> None:
        _, outputs = self.run_cell("%tier")
        tables = [m["content"]["data"]["text/plain"] for m in outputs
                  if m["msg_type"] == "display_data"]
        self.assertEqual(len(tables), 1, outputs)
        self.assertRegex(tables[0], rf"(?m)^[ *] {re.escape(self.tier)}\s+yes\b")

    def _wait_for_stdout(self, msg_id: str, text: str, timeout: float) -> None:
        seen = ""
        deadline = time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on stdout within {timeout} s (saw {seen!r})")
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                    and msg["content"]["name"] == "stdout"):
                seen += msg["content"]["text"]

    def _wait_for_idle(self, msg_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                return
        raise AssertionError(f"no idle status within {timeout} s")
