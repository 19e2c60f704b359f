"""The host side of the helpers: one JSON entry point every tier forwards helper calls to.

A guest (a wasm sandbox, a container, the process agent, or the native tier itself through
``tierkernel.guest.helpers``) sends a request and gets a response, both plain JSON::

    request  {"helper": "api", "args": {"url": "https://...", "method": "GET"}}
    response {"ok": true, "value": {...}}
             {"ok": false, "error": {"type": "PermissionError", "message": "..."}}

The broker checks the cell's policy, runs the helper on the host, records the call in the audit
log, and scrubs every configured secret from what goes back. ``error.type`` is always the name
of a Python builtin exception the guest can re-raise (see :data:`ERROR_TYPES`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from tierkernel.backends.base import LogEntry
from tierkernel.magics.options import HELPERS
from tierkernel.runtime import ai as ai_helper
from tierkernel.runtime import api as api_helper
from tierkernel.runtime import db as db_helper
from tierkernel.runtime.audit import AuditLog, HelperCall
from tierkernel.runtime.policy import CellPolicy, Runtime

log = logging.getLogger(__name__)

#: Exception types that cross to the guest by name; anything else arrives as RuntimeError.
ERROR_TYPES = ("PermissionError", "ValueError", "TypeError", "TimeoutError", "ConnectionError",
               "RuntimeError", "KeyError", "LookupError", "OSError")

CONSOLE_LEVELS = ("log", "info", "warn", "error")

#: The keyword arguments each helper takes (and which of them are required).
_ARGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "api": (frozenset({"url"}), frozenset({"method", "headers", "json", "data", "timeout"})),
    "db": (frozenset({"query"}), frozenset({"params"})),
    "ai": (frozenset({"model", "input"}), frozenset()),
    "console": (frozenset({"level", "message"}), frozenset()),
}


@dataclass
class CallContext:
    """The cell a helper call belongs to: its audit id, its policy, and its log entries."""

    execution_id: str | None
    policy: CellPolicy
    logs: list[LogEntry] = field(default_factory=list)


class Broker:
    """Runs helper calls for cells under their policy. Safe to call from any thread."""

    def __init__(self, runtime: Runtime, audit: AuditLog) -> None:
        self.runtime = runtime
        self.audit = audit
        self._client: httpx.Client | None = None
        self._database: db_helper.Database | None = None
        self._lock = threading.Lock()

    # -- the entry points -------------------------------------------------------------------
    def handle_json(self, request: str, context: CallContext) -> str:
        """:meth:`handle` on JSON text, for tiers that forward requests as text."""
        try:
            parsed = json.loads(request)
        except ValueError as exc:
            return json.dumps(_error("ValueError", f"the helper request is not JSON: {exc}"))
        return json.dumps(self.handle(parsed, context))

    def handle(self, request: Any, context: CallContext) -> dict[str, Any]:
        """Answer one ``{"helper": ..., "args": {...}}`` request (see the module docstring)."""
        if not isinstance(request, Mapping) or not isinstance(request.get("helper"), str):
            return _error("ValueError", "a helper request is {'helper': NAME, 'args': {...}}")
        return self.call(request["helper"], request.get("args") or {}, context)

    def call(self, helper: str, args: Any, context: CallContext) -> dict[str, Any]:
        """Check the policy, run ``helper`` with ``args``, audit the call, answer as JSON."""
        started, clock = time.time(), time.perf_counter()
        target = _target_hint(helper, args)
        allowed, ok, error_text, size = True, False, None, 0
        try:
            if helper not in HELPERS:
                raise ValueError(f"unknown helper {helper!r}; helpers are {', '.join(HELPERS)}")
            _check_args(helper, args)
            context.policy.check_helper(helper)
            value, target = self._run(helper, args, context)
            value = self._scrub(value)
            text = json.dumps(value)
            size, ok = len(text.encode()), True
            return {"ok": True, "value": value}
        except PermissionError as exc:
            allowed = False
            error_text = self._scrub(str(exc))
            return _error("PermissionError", error_text)
        except Exception as exc:
            name = type(exc).__name__ if type(exc).__name__ in ERROR_TYPES else "RuntimeError"
            if name == "RuntimeError" and type(exc) is not RuntimeError:
                log.exception("helper %s() failed", helper)
                error_text = self._scrub(f"{helper}() failed: {type(exc).__name__}: {exc}")
            else:
                error_text = self._scrub(str(exc))
            return _error(name, error_text)
        except BaseException:  # KeyboardInterrupt in a native cell: record, then let it stop
            error_text = "interrupted"
            raise
        finally:
            self.audit.helper_call(context.execution_id, HelperCall(
                helper, target, allowed, ok, error_text, started,
                round((time.perf_counter() - clock) * 1000, 3), size))

    # -- the helpers ------------------------------------------------------------------------
    def _run(self, helper: str, args: Mapping[str, Any],
             context: CallContext) -> tuple[Any, str]:
        rt = self.runtime
        if helper == "console":
            self._console(args, context)
            return None, str(args["level"])
        if helper == "api":
            outcome = api_helper.request(
                self.client, context.policy,
                api_helper.ApiLimits(rt.api_timeout, rt.api_max_response_bytes,
                                     rt.api_max_redirects),
                args["url"], args.get("method", "GET"), args.get("headers"), args.get("json"),
                args.get("data"), args.get("timeout"))
            return outcome.value, outcome.target
        if helper == "db":
            result = db_helper.execute(self.database, args["query"], args.get("params"),
                                       context.policy.db_readonly, rt.db_max_rows,
                                       rt.db_timeout)
            return result.value, result.target
        answer = ai_helper.infer(self.client, rt.ai_base_url, rt.ai_api_key, rt.ai_timeout,
                                 rt.api_max_response_bytes, args["model"], args["input"])
        return answer.value, answer.target

    def _console(self, args: Mapping[str, Any], context: CallContext) -> None:
        level, message = args["level"], args["message"]
        if level not in CONSOLE_LEVELS:
            raise ValueError(f"console level must be one of {', '.join(CONSOLE_LEVELS)}, "
                             f"got {level!r}")
        if not isinstance(message, str):
            raise TypeError("console message must be text")
        cap = self.runtime.log_entry_max_chars
        if len(message) > cap:
            message = message[:cap] + f"... [cut: {len(message)} characters in all]"
        context.logs.append(LogEntry(level, message))

    @property
    def client(self) -> httpx.Client:
        """The HTTP client of api() and ai(); redirects are followed by hand (see api.py)."""
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(follow_redirects=False)
            return self._client

    @property
    def database(self) -> db_helper.Database:
        """db()'s database, opened on first use."""
        with self._lock:
            if self._database is None:
                self._database = db_helper.open_database(self.runtime.db_url,
                                                         self.runtime.db_path)
            return self._database

    def _scrub(self, value: Any) -> Any:
        """``value`` with every configured secret replaced by ``[secret]``."""
        secrets = self.runtime.secrets()
        if not secrets:
            return value
        if isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, "[secret]")
            return value
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        return value

    def close(self) -> None:
        """Close the HTTP client and the database connection (kernel shutdown)."""
        with self._lock:
            client, self._client = self._client, None
            database, self._database = self._database, None
        if client is not None:
            client.close()
        if database is not None:
            database.close()


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message}}


def _check_args(helper: str, args: Any) -> None:
    if not isinstance(args, Mapping):
        raise TypeError(f"{helper}() arguments must be a dict of keyword arguments")
    required, optional = _ARGS[helper]
    missing = sorted(required - set(args))
    unknown = sorted(set(args) - required - optional)
    if missing:
        raise TypeError(f"{helper}() missing required argument(s): {', '.join(missing)}")
    if unknown:
        raise TypeError(f"{helper}() got unexpected argument(s): {', '.join(unknown)}")


def _target_hint(helper: str, args: Any) -> str:
    """What a call was aimed at, for the audit log, before (or without) running it."""
    if not isinstance(args, Mapping):
        return ""
    key = {"api": "url", "db": "query", "ai": "model", "console": "level"}.get(helper, "")
    value = args.get(key, "")
    if helper == "api" and isinstance(value, str):
        return f"{str(args.get('method', 'GET')).upper()} {value.split('?')[0]}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return " ".join(text.split())[:200]
