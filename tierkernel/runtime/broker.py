"""The host side of the helpers: one JSON entry point every tier forwards helper calls to.

A guest (a wasm sandbox, a container, the process agent, or the native tier itself through
``tierkernel.guest.helpers``) sends a request and gets a response, both plain JSON::

    request  {"helper": "api", "args": {"url": "https://...", "method": "GET"}}
    response {"ok": true, "value": {...}}
             {"ok": false, "error": {"type": "PermissionError", "message": "..."}}

The broker checks the cell's policy, runs the helper on the host, records the call in the audit
log, and scrubs every configured secret from what goes back. ``error.type`` is always the name
of a Python builtin exception the guest can re-raise (see
:data:`tierkernel.guest.protocol.HELPER_ERROR_TYPES`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierkernel.guest import protocol
from tierkernel.results import LogEntry
from tierkernel.runtime.audit import (
    MAX_CALL_TARGET_CHARS,
    AuditLog,
    HelperCall,
    folded_start,
)
from tierkernel.runtime.grants import HELPERS
from tierkernel.runtime.policy import CellPolicy, Runtime

if TYPE_CHECKING:
    import ssl

    import httpx

    from tierkernel.runtime import db as db_helper

log = logging.getLogger(__name__)

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
    """The cell a helper call belongs to: its audit id, its policy, its log entries (with what
    they weigh, and how many were dropped past the caps), and its cookie jar for api() (made
    by the cell's first api() call: every cell gets a context, few call api())."""

    execution_id: str | None
    policy: CellPolicy
    logs: list[LogEntry] = field(default_factory=list)
    log_bytes: int = 0
    logs_dropped: int = 0
    cookies: httpx.Cookies | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cookie_jar(self) -> httpx.Cookies:
        """The cell's cookie jar, made on first use."""
        with self.lock:
            if self.cookies is None:
                import httpx  # deferred for kernel start-up time (see Broker._run)

                self.cookies = httpx.Cookies()
            return self.cookies


#: The setting that caps each helper's result, named in its refusal.
_RESULT_SETTINGS = {"db": "db_max_result_bytes", "api": "api_max_response_bytes",
                    "ai": "ai_max_response_bytes"}


class Broker:
    """Runs helper calls for cells under their policy. Safe to call from any thread.

    Native cells and cells of the isolated tiers never share an HTTP client (connections,
    cookies) or a database session: each trust level gets its own. ``workspace`` tells where
    the kernel's ``file://`` workspace folder is (None for other workspaces), read when db()
    first opens its SQLite file.
    """

    def __init__(self, runtime: Runtime, audit: AuditLog,
                 workspace: Callable[[], Path | None] | None = None) -> None:
        self.runtime = runtime
        self.audit = audit
        self.workspace = workspace or (lambda: None)
        self._clients: dict[str, httpx.Client] = {}
        self._tls: ssl.SSLContext | None = None
        self._databases: dict[bool, db_helper.Database] = {}
        self._lock = threading.Lock()

    # -- the entry points -------------------------------------------------------------------
    def handle_json(self, request: str, context: CallContext) -> str:
        """:meth:`handle` on JSON text, for tiers that forward requests as text."""
        try:
            parsed = json.loads(request)
        except ValueError as exc:
            return json.dumps(_error("ValueError", f"the helper request is not JSON: {exc}"))
        except RecursionError:
            return json.dumps(_error("ValueError", "the helper request is nested too deeply "
                                     "to decode"))
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
        dropped = False
        try:
            if helper not in HELPERS:
                raise ValueError(f"unknown helper {helper!r}; helpers are {', '.join(HELPERS)}")
            _check_args(helper, args)
            context.policy.check_helper(helper)
            if helper == "console":
                # A console entry past the cell's log caps is dropped, and so is its audit
                # row: a flood writes nothing more to disk (the logs' note counts it).
                dropped = not self._console(args, context)
                ok = True
                return {"ok": True, "value": None}
            value, target = self._run(helper, args, context)
            value = self._scrub(value)
            # ASCII (json.dumps escapes the rest), so characters are bytes.
            size = len(json.dumps(value))
            self._check_result_size(helper, size, target)
            ok = True
            return {"ok": True, "value": value}
        except PermissionError as exc:
            allowed = False
            error_text = self._scrub(str(exc))
            return _error("PermissionError", error_text)
        except UnicodeError as exc:  # a lone surrogate the JSON carried, for one
            error_text = self._scrub(f"{helper}(): the arguments hold text that is not valid "
                                     f"Unicode (a lone surrogate such as '\\ud800'?): {exc}")
            return _error("ValueError", error_text)
        except Exception as exc:
            name = type(exc).__name__
            name = name if name in protocol.HELPER_ERROR_TYPES else "RuntimeError"
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
            if not dropped:
                self.audit.helper_call(context.execution_id, HelperCall(
                    helper, target, allowed, ok, error_text, started,
                    round((time.perf_counter() - clock) * 1000, 3), size))

    # -- the helpers ------------------------------------------------------------------------
    def _run(self, helper: str, args: Mapping[str, Any],
             context: CallContext) -> tuple[Any, str]:
        rt = self.runtime
        # Deferred for kernel start-up time: with httpx (and the click, rich and h11 it
        # imports) these take longer to import than the rest of the kernel's own modules,
        # and most kernels' first cells call no helper.
        from tierkernel.runtime import ai as ai_helper
        from tierkernel.runtime import api as api_helper
        from tierkernel.runtime import db as db_helper

        if helper == "api":
            outcome = api_helper.request(
                self.api_client(context.policy.trusted), context.policy,
                api_helper.ApiLimits(rt.api_timeout, rt.api_max_response_bytes,
                                     rt.api_max_redirects),
                args["url"], args.get("method", "GET"), args.get("headers"), args.get("json"),
                args.get("data"), args.get("timeout"), context.cookie_jar())
            return outcome.value, outcome.target
        if helper == "db":
            result = db_helper.execute(
                self.database_for(context.policy.trusted), args["query"], args.get("params"),
                context.policy.db_readonly,
                db_helper.ResultLimits(rt.db_max_rows, rt.db_max_result_bytes), rt.db_timeout)
            return result.value, result.target
        answer = ai_helper.infer(self.ai_client, rt.ai_base_url, rt.ai_api_key, rt.ai_timeout,
                                 rt.ai_max_response_bytes, args["model"], args["input"])
        return answer.value, answer.target

    def _check_result_size(self, helper: str, size: int, target: str) -> None:
        """Refuse a result larger, as JSON, than its helper's setting allows.

        db() counts while it fetches and api()/ai() while they read, so this catches what
        only the conversion adds (headers, JSON escapes, a scrubbed secret).
        """
        setting = _RESULT_SETTINGS.get(helper)
        if setting is None:
            return
        cap = int(getattr(self.runtime, setting))
        if size > cap:
            raise ValueError(f"{helper}() {target}: the result is {size} bytes as JSON, over "
                             f"the {cap}-byte limit (c.Runtime.{setting}); ask for less, or "
                             f"raise c.Runtime.{setting}")

    def _console(self, args: Mapping[str, Any], context: CallContext) -> bool:
        """Record one console entry in the cell's logs; False when it was dropped (past the
        caps)."""
        level, message = args["level"], args["message"]
        if level not in CONSOLE_LEVELS:
            raise ValueError(f"console level must be one of {', '.join(CONSOLE_LEVELS)}, "
                             f"got {level!r}")
        if not isinstance(message, str):
            raise TypeError("console message must be text")
        rt = self.runtime
        cap = rt.log_entry_max_chars
        if len(message) > cap:
            message = message[:cap] + f"... [cut: {len(message)} characters in all]"
        weight = len(message.encode("utf-8", "surrogatepass")) + len(level)
        with context.lock:
            if context.logs_dropped or (len(context.logs) >= rt.log_max_entries or
                                        context.log_bytes + weight > rt.log_max_bytes):
                if not context.logs_dropped:  # said once, at the place the gap begins
                    context.logs.append(LogEntry("warn", LOGS_DROPPED))
                context.logs_dropped += 1
                return False
            context.logs.append(LogEntry(level, message))
            context.log_bytes += weight
            return True

    def api_client(self, trusted: bool) -> httpx.Client:
        """The api() client of native (``trusted``) or of isolated cells: each connects only
        to addresses its networks setting allows (see :mod:`~tierkernel.runtime.network`);
        they share no connection and keep no cookies (each cell has its own jar)."""
        key = "native" if trusted else "isolated"
        from tierkernel.runtime import network  # deferred for kernel start-up time (httpx)

        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._tls is None:
                    self._tls = network.tls_context()
                client = network.checked_client(
                    self.runtime.allowed_networks(trusted),
                    "native_api_allowed_networks" if trusted else "api_allowed_networks",
                    self._tls)
                self._clients[key] = client
            return client

    @property
    def ai_client(self) -> httpx.Client:
        """The HTTP client of ai(): it reaches only c.Runtime.ai_base_url, which the
        configuration names (a cell cannot), so its address is not checked: a local model
        server (Ollama on localhost) is the usual case."""
        import httpx  # deferred for kernel start-up time (see Broker._run)

        with self._lock:
            client = self._clients.get("ai")
            if client is None:
                client = self._clients["ai"] = httpx.Client(follow_redirects=False)
            return client

    def database_for(self, trusted: bool) -> db_helper.Database:
        """db()'s database for native (``trusted``) or isolated cells, opened on first use.

        On PostgreSQL each trust level has its own session (see ``PostgresDatabase``); the
        SQLite file is opened afresh by every call anyway. A SQLite file inside the kernel's
        ``file://`` workspace is refused (and asked again at the next call).
        """
        from tierkernel.runtime import db as db_helper  # deferred for kernel start-up time

        with self._lock:
            database = self._databases.get(trusted)
            if database is None:
                _warn_of_old_default(self.runtime)
                workspace = None if self.runtime.db_url else self.workspace()
                database = db_helper.open_database(self.runtime.db_url, self.runtime.db_path,
                                                   isolated=not trusted, workspace=workspace)
                self._databases[trusted] = database
            return database

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
        """Close the HTTP clients and the database sessions (kernel shutdown)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            databases, self._databases = list(self._databases.values()), {}
        for client in clients:
            client.close()
        for database in databases:
            database.close()


#: The one log entry that marks where a cell's console entries started being dropped; the
#: kernel adds how many when the cell ends (:func:`note_dropped`).
LOGS_DROPPED = ("further console entries were dropped: this execution's logs reached their "
                "limit (c.Runtime.log_max_entries entries, c.Runtime.log_max_bytes bytes); the "
                "console still printed them")


def note_dropped(context: CallContext) -> None:
    """Complete the dropped-entries note of ``context`` with how many were dropped."""
    with context.lock:
        if not context.logs_dropped:
            return
        for i, entry in enumerate(context.logs):
            if entry.level == "warn" and entry.message == LOGS_DROPPED:
                context.logs[i] = LogEntry("warn", f"{context.logs_dropped} {LOGS_DROPPED}",
                                           entry.time)
                break


def _warn_of_old_default(runtime: Runtime) -> None:
    """Say in the kernel's log when db() starts on its default file while the previous default,
    ``.tierkernel/db.sqlite3`` in the notebook folder, still holds data."""
    old = Path.cwd() / ".tierkernel" / "db.sqlite3"
    if (not runtime.db_url and old.exists() and Path(runtime.db_path) != old
            and not Path(runtime.db_path).exists()):
        log.warning("db() now keeps its data in %s, outside the notebook folder (a file:// "
                    "workspace could contain it); the database at %s is not used: move it "
                    "there to keep using it", runtime.db_path, old)


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
        # Cut first: a guest's megabyte URL (or one of many "?") is not copied or split.
        method = str(args.get("method", "GET"))[:20].upper()
        return f"{method} {value[:MAX_CALL_TARGET_CHARS].partition('?')[0]}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return folded_start(text)

