"""The service behind the API's routes and MCP tools: its settings, tokens, sessions and
audit log, and the operations both front ends offer (execute, tiers, workspaces,
executions), each checked against the calling token's ceiling."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

from traitlets.config import Configurable

from tierkernel.backends.registry import discover
from tierkernel.errors import ApiError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.quota import Quota
from tierkernel.kernel.router import TierRouter
from tierkernel.runtime.audit import AuditLog, Execution
from tierkernel.serve import cells, files
from tierkernel.serve.models import (
    ExecError,
    ExecResult,
    ExecuteRequest,
    ExecutionPage,
    ExecutionRecord,
    LogEntry,
    SessionInfo,
    TierInfo,
)
from tierkernel.serve.sessions import EventSink, Outcome, Session, SessionPool
from tierkernel.serve.settings import Ceiling, Serve, Token, within


class Server:
    """What the routes share: settings, tokens, sessions, the audit log."""

    def __init__(self, settings: Serve, tokens: list[Token], kernel_ceiling: Ceiling | None,
                 audit_path: str, quota: Quota, config: Any = None) -> None:
        self.settings = settings
        #: The kernels' configuration (their config files): GET /tiers shows their limits.
        self._tier_parent = Configurable(config=config) if config is not None else None
        self.quota = quota
        self.tokens = tokens
        self.kernel_ceiling = kernel_ceiling
        self.pool = SessionPool(settings)
        self.audit = AuditLog(audit_path)
        self.requests = RequestLog(settings.request_log)
        self._tiers: tuple[float, list[Any]] | None = None
        #: The MCP server mounted at /mcp (FastMCP), when the HTTP app has one.
        self.mcp: Any = None

    def ceiling(self, token: Token) -> Ceiling:
        """What ``token`` may reach, within the kernels' own configuration."""
        return within(token.ceiling, self.kernel_ceiling)

    async def prepare(self, body: ExecuteRequest, token: Token) -> tuple[Session, cells.Cell]:
        """The session and the checked cell for ``body`` (a one-shot session is started);
        ApiError when the request cannot run."""
        session = self.pool.get(body.session, token.owner) if body.session else None
        config = body.config
        if session is not None and session.defaults is not None:
            given = config.model_dump(exclude_unset=True) if config is not None else {}
            config = session.defaults.model_copy(update=given)
        # The session's tier is the default; a %%tier line in the code may name another.
        cell = cells.plan(body.code, body.tier, config, self.ceiling(token),
                          session.tier if session else self.settings.default_tier,
                          self.settings.max_code_bytes, self.settings.max_timeout,
                          body.language)
        if session is None:
            session = await self.pool.create(token.owner, cell.tier, self.ceiling(token),
                                             one_shot=True)
        elif session.busy:
            raise ApiError(409, "session_busy", f"session {session.id} is running another "
                           "execution; wait for it or interrupt it")
        return session, cell

    async def run(self, session: Session, cell: cells.Cell, body: ExecuteRequest,
                  events: EventSink | None = None) -> ExecResult:
        """Run a prepared cell (``context`` set first); a one-shot session ends after."""
        try:
            if body.context is not None:
                ready = await session.run(cells.context_cell(cell, body.context),
                                          cell.timeout, self.settings, silent=True)
                if not ready.success:
                    return _result(ready, session)
            outcome = await session.run(cell.text, cell.timeout, self.settings, events)
            return _result(outcome, session)
        finally:
            if session.one_shot:
                await self.pool.end(session)
            else:
                self.pool.remember(session)

    async def execute(self, body: ExecuteRequest, token: Token) -> ExecResult:
        """Run ``body``'s cell for ``token`` and return what it did."""
        session, cell = await self.prepare(body, token)
        return await self.run(session, cell, body)

    async def tiers(self, token: Token) -> list[TierInfo]:
        """Every tier: available or not (and why), and whether ``token`` may use it."""
        ceiling = self.ceiling(token)
        classes = discover()[0]
        return [TierInfo(name=row.name, available=row.available,
                         allowed=row.name in ceiling.tier_names, isolation=row.isolation,
                         detail=row.detail,
                         languages=cells.languages(classes[row.name]) if row.name in classes
                         else ["python"])
                for row in await self.tier_rows()]

    def workspace(self, session_id: str, token: Token) -> FsxFacade:
        """The workspace of ``token``'s session ``session_id`` (ApiError 404 for others)."""
        session = self.pool.get(session_id, token.owner)
        if session.files is None:
            session.files = files.workspace(session.kernel.workspace_url, self.quota)
        workspace: FsxFacade = session.files
        return workspace

    def _own_sessions(self, token: Token) -> dict[str, str]:
        """Kernel session ids of ``token``'s sessions (ended ones too): API session ids."""
        known = dict(self.pool.history.get(token.owner, {}))
        for session in self.pool.sessions_of(token.owner):
            if session.kernel_session:
                known[session.kernel_session] = session.id
        return known

    async def executions(self, token: Token, limit: int, offset: int, tier: str | None,
                         failed: bool) -> ExecutionPage:
        """``token``'s executions from the audit log, newest first."""
        known = self._own_sessions(token)
        rows = await asyncio.to_thread(self.audit.executions, tier=tier, failed=failed,
                                       limit=limit, offset=offset, sessions=list(known))
        return ExecutionPage(executions=[_record(r, known) for r in rows], limit=limit,
                             offset=offset)

    async def execution(self, execution_id: str, token: Token) -> ExecutionRecord:
        """One of ``token``'s executions (ApiError 404 for any other)."""
        known = self._own_sessions(token)
        missing = ApiError(404, "no_such_execution", f"no execution {execution_id!r} of this "
                           "token (GET /executions lists them)")
        if len(execution_id) < 8:
            raise missing
        try:
            record = await asyncio.to_thread(self.audit.execution, execution_id)
        except KeyError:
            raise missing from None
        if record.kernel_session not in known:
            raise missing
        return _record(record, known)

    async def tier_rows(self) -> list[Any]:
        """The ``%tier`` table's rows (availability probes the engine: cached 5 s)."""
        if self._tiers is None or time.monotonic() - self._tiers[0] > 5.0:
            rows = (await asyncio.to_thread(
                lambda: TierRouter(self._tier_parent, "native").table())).rows
            self._tiers = (time.monotonic(), rows)
        return self._tiers[1]


def _result(outcome: Outcome, session: Session) -> ExecResult:
    return ExecResult(
        success=outcome.success, tier=outcome.tier, session=session.id,
        duration=outcome.duration_ms, output=outcome.outputs,
        stdout="".join(e["text"] for e in outcome.logs if e["name"] == "stdout"),
        stderr="".join(e["text"] for e in outcome.logs if e["name"] == "stderr"),
        error=ExecError(**outcome.error) if outcome.error else None,
        logs=[LogEntry(name=e["name"], text=e["text"]) for e in outcome.logs],  # type: ignore[arg-type]
        execution_id=outcome.execution_id, execution_count=outcome.execution_count,
        truncated=outcome.truncated)


def session_info(session: Session) -> SessionInfo:
    return SessionInfo(id=session.id, tier=session.tier, created=session.created,
                       last_used=session.last_used, executions=session.executions,
                       busy=session.busy, config=session.defaults)


def _record(row: Execution, known: dict[str, str]) -> ExecutionRecord:
    return ExecutionRecord(
        id=row.id, session=known.get(row.kernel_session), tier=row.tier, code=row.code,
        started=row.started, duration=row.duration_ms, status=row.status, success=row.success,
        error=row.error, execution_count=row.execution_count)


class RequestLog:
    """Every request the server answered, one JSON line each (time, method, path, status,
    token name, client address, milliseconds), in ``path`` (rotated at 16 MiB, one older
    file kept: a client cannot fill the disk with requests); also logged at INFO."""

    def __init__(self, path: str) -> None:
        self._log = logging.getLogger("tierkernel.serve.requests")
        self._file: logging.Handler | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.handlers.RotatingFileHandler(
                path, maxBytes=16 << 20, backupCount=1, encoding="utf-8")
            self._file.setFormatter(logging.Formatter("%(message)s"))

    def record(self, **fields: Any) -> None:
        """Write one request's line."""
        line = json.dumps({"time": round(time.time(), 3), **fields})
        self._log.info("%s", line)
        if self._file is not None:
            self._file.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
