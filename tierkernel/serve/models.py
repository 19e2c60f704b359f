"""The shapes of the execution API's requests and answers (its OpenAPI schema comes from these).

Names follow the origin document's HTTP API (``code``, ``language``, ``context``, ``config``
with ``timeout``, ``allowedAPIs``, ``allowedDomains``; an ExecResult with ``success``,
``tier``, ``duration``, ``output``, ``error``, ``logs``); the rest are ours.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The runtime helpers a request may ask for (``tierkernel.runtime.grants.HELPERS``).
Helper = Literal["ai", "api", "db", "console"]
#: The languages the API runs: JavaScript and TypeScript in the tiers that run them (the
#: wasm and sandbox tiers: ``GET /tiers`` lists each tier's).
Language = Literal["python", "javascript", "typescript"]


class _Strict(BaseModel):
    """Unknown fields are an error, so a misspelt option is never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ExecuteConfig(_Strict):
    """Limits and grants for one execution, within what the token allows."""

    timeout: float | None = Field(
        None, gt=0, le=86400,
        description="Seconds the cell may run (the tier's default when left out).")
    allowedAPIs: list[Helper] | None = Field(
        None, max_length=4,
        description="Helpers the cell may call (ai, api, db, console); left out: the tier's "
        "defaults. Never more than the token allows.")
    allowedDomains: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="Host patterns api() may reach (api.github.com, *.example.org). Never "
        "more than the token allows.")


class ExecuteRequest(_Strict):
    """``POST /execute`` (and ``/execute/stream``): one cell."""

    code: str = Field(description="The cell's source. A first line '%%tier NAME --opt v' "
                      "is read as in a notebook (its tier must agree with 'tier').")
    language: Language = "python"
    tier: str | None = Field(
        None, max_length=64,
        description="The tier to run in; left out: the session's tier, else the server's "
        "default.")
    session: str | None = Field(
        None, max_length=64,
        description="A session id from POST /sessions: state persists between its "
        "executions. Left out: a one-shot session, ended after this execution.")
    context: dict[str, Any] | None = Field(
        None, description="A JSON object the cell sees as the variable 'context' (in "
        "JavaScript and TypeScript: globalThis.context).")
    config: ExecuteConfig | None = None


class ValidateRequest(_Strict):
    """``POST /validate``: what ``/execute`` would check before running, with nothing run."""

    code: str
    language: Language = "python"
    tier: str | None = Field(None, max_length=64)
    config: ExecuteConfig | None = None


class ValidateResult(BaseModel):
    """Whether ``/execute`` would accept the request, and why not."""

    valid: bool
    tier: str | None = Field(description="The tier it would run in.")
    errors: list[str] = Field(description="What to fix, one message each.")
    size: int = Field(description="The code's size in bytes of UTF-8.")
    limit: int = Field(description="The largest code the server runs, in bytes.")


class ExecError(BaseModel):
    """An error the cell raised (or the kernel reported for it)."""

    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


class LogEntry(BaseModel):
    """One chunk of the cell's stdout or stderr, in the order it came."""

    name: Literal["stdout", "stderr"]
    text: str


class ExecResult(BaseModel):
    """What one execution did."""

    success: bool
    tier: str
    session: str = Field(description="The session it ran in (a one-shot session's is gone).")
    duration: float = Field(description="Milliseconds, as the kernel measured the cell.")
    output: list[dict[str, Any]] = Field(
        description="The cell's outputs as Jupyter notebook outputs (stream, display_data "
        "with mime bundles such as image/png, execute_result, error).")
    stdout: str
    stderr: str
    error: ExecError | None
    logs: list[LogEntry]
    execution_id: str | None = Field(description="Its record in GET /executions/{id}.")
    execution_count: int | None
    truncated: bool = Field(
        False, description="The output went over the server's limit; the rest was dropped.")


class SessionCreate(_Strict):
    """``POST /sessions``: a kernel that keeps state between executions."""

    tier: str | None = Field(None, max_length=64,
                             description="Its default tier (the server's when left out).")
    config: ExecuteConfig | None = Field(
        None, description="Limits and grants of every execution in it; an execution's own "
        "config overrides them field by field. Within the token's ceiling.")


class SessionInfo(BaseModel):
    """One session."""

    id: str
    tier: str
    created: float = Field(description="Unix time.")
    last_used: float = Field(description="Unix time of its last execution's end.")
    executions: int
    busy: bool
    config: ExecuteConfig | None = None


class FileEntry(BaseModel):
    """One entry of a workspace folder."""

    name: str
    kind: str = Field(description="file, dir or symlink")
    size: int | None = Field(description="Bytes, for a file.")


class TierInfo(BaseModel):
    """One tier as ``GET /tiers`` shows it."""

    name: str
    available: bool
    allowed: bool = Field(description="Whether this token may run cells there.")
    isolation: str
    detail: str = Field(description="Limits when available, else why not.")
    languages: list[str]


class ExecutionRecord(BaseModel):
    """One execution from the audit log."""

    id: str
    session: str | None = Field(description="The API session, when it still is known.")
    tier: str
    code: str
    started: float
    duration: float | None
    status: str
    success: bool | None
    error: str | None
    execution_count: int | None


class ExecutionPage(BaseModel):
    """A page of ``GET /executions``, newest first."""

    executions: list[ExecutionRecord]
    limit: int
    offset: int


class ErrorBody(BaseModel):
    """Every error answer: what went wrong and what to do."""

    error: str = Field(description="A short kind: unauthorized, invalid_request, ...")
    message: str
