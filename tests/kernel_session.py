"""A small client for tests: run a cell, collect what a notebook would show, with timings."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel


@dataclass
class Output:
    """One iopub message of a cell, with its arrival time relative to the request."""

    msg_type: str
    content: dict[str, Any]
    at: float


@dataclass
class Outcome:
    """Everything a client saw for one execute_request."""

    reply: dict[str, Any]
    metadata: dict[str, Any]
    outputs: list[Output] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    @property
    def stdout(self) -> str:
        return "".join(o.content["text"] for o in self.outputs
                       if o.msg_type == "stream" and o.content["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o.content["text"] for o in self.outputs
                       if o.msg_type == "stream" and o.content["name"] == "stderr")

    def of_type(self, msg_type: str) -> list[Output]:
        return [o for o in self.outputs if o.msg_type == msg_type]

    @property
    def error(self) -> dict[str, Any]:
        errors = self.of_type("error")
        assert len(errors) == 1, f"expected one error output, got {self.outputs}"
        return errors[0].content

    @property
    def result(self) -> dict[str, Any]:
        results = self.of_type("execute_result")
        assert len(results) == 1, f"expected one execute_result, got {self.outputs}"
        return results[0].content["data"]


class KernelSession:
    """A running kernel and a blocking client to it."""

    def __init__(self, kernel_name: str = "tierkernel", **kwargs: Any) -> None:
        self.km: KernelManager
        self.kc: BlockingKernelClient
        self.km, self.kc = start_new_kernel(kernel_name=kernel_name, **kwargs)

    def run(self, code: str, timeout: float = 60, interrupt_after: float | None = None,
            **kwargs: Any) -> Outcome:
        """Execute ``code``; collect iopub output until idle; return it with the reply."""
        start = time.monotonic()
        msg_id = self.kc.execute(code, **kwargs)
        outputs: list[Output] = []
        interrupted = interrupt_after is None
        deadline = start + timeout
        while True:
            if not interrupted and time.monotonic() - start >= interrupt_after:  # type: ignore[operator]
                self.km.interrupt_kernel()
                interrupted = True
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no idle within {timeout}s; saw {outputs}") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status":
                if msg["content"]["execution_state"] == "idle":
                    break
                continue
            if kind != "execute_input":
                outputs.append(Output(kind, msg["content"], time.monotonic() - start))
        # A slow kernel start leaves extra kernel_info replies from wait_for_ready's retries
        # on the shell channel: skip replies to anything but this request.
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return Outcome(reply["content"], reply["metadata"], outputs)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
