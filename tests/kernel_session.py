"""A small client for tests: run a cell, collect what a notebook would show, with timings."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
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
    #: The contents of the input_requests the kernel sent on the stdin channel, in order.
    inputs: list[dict[str, Any]] = field(default_factory=list)

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
        #: The last input_request message the kernel sent (see ``run(on_input=...)``).
        self.last_input_request: dict[str, Any] | None = None

    def run(self, code: str, timeout: float = 60, interrupt_after: float | None = None,
            cell_id: str | None = None,
            on_input: Callable[[dict[str, Any]], str | None] | None = None,
            **kwargs: Any) -> Outcome:
        """Execute ``code``; collect iopub output until idle; return it with the reply.

        ``cell_id`` is sent as JupyterLab sends it (``metadata.cellId``). ``on_input`` is the
        user at the stdin channel: called with each input_request's content, it returns the
        answer (None: no answer).
        """
        start = time.monotonic()
        if cell_id is None:
            msg_id = self.kc.execute(code, **kwargs)
        else:
            content = {"code": code, "silent": False, "store_history": True,
                       "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
            msg = self.kc.session.msg("execute_request", content,
                                      metadata={"cellId": cell_id})
            self.kc.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
        outputs: list[Output] = []
        interrupted = interrupt_after is None
        deadline = start + timeout
        inputs: list[dict[str, Any]] = []
        while True:
            if not interrupted and time.monotonic() - start >= interrupt_after:  # type: ignore[operator]
                self.km.interrupt_kernel()
                interrupted = True
            if on_input is not None:
                try:
                    asked = self.kc.get_stdin_msg(timeout=0)
                except queue.Empty:
                    pass
                else:
                    if asked["msg_type"] == "input_request":
                        self.last_input_request = asked
                        inputs.append(asked["content"])
                        answer = on_input(asked["content"])
                        if answer is not None:
                            self.kc.input(answer)
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
        reply = self.kc.get_shell_msg(timeout=timeout)
        # jupyter_client's wait_for_ready re-sends kernel_info_request every second until one is
        # answered, so a kernel slower than 1 s to start (a loaded machine) leaves extra
        # kernel_info_replies queued ahead of the first execute_reply: skip those.
        while reply["msg_type"] == "kernel_info_reply" and (
                reply["parent_header"].get("msg_id") != msg_id):
            reply = self.kc.get_shell_msg(timeout=timeout)
        assert reply["parent_header"]["msg_id"] == msg_id
        return Outcome(reply["content"], reply["metadata"], outputs, inputs)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
