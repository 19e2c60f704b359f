"""The HTTP execution API (FastAPI on uvicorn): its routes, authentication and limits.

Every route but the documentation needs ``Authorization: Bearer TOKEN``; a token sees and uses
only its own sessions and executions. Errors are JSON ``{"error": KIND, "message": TEXT}``
saying what to fix. Streaming (``POST /execute/stream``) is Server-Sent Events: ``stream``,
``display``, ``result``, ``error`` and ``clear`` events as the cell runs, then ``done`` with the
ExecResult (or ``failed`` with an error body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierkernel import __version__
from tierkernel.errors import ApiError
from tierkernel.serve import cells, files, mcp_server
from tierkernel.serve.models import (
    ErrorBody,
    ExecResult,
    ExecuteRequest,
    ExecutionPage,
    ExecutionRecord,
    FileEntry,
    SessionCreate,
    SessionInfo,
    TierInfo,
    ValidateRequest,
    ValidateResult,
)
from tierkernel.serve.server import Server, session_info
from tierkernel.serve.sessions import keep
from tierkernel.serve.settings import Token, find_token

log = logging.getLogger("tierkernel.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 429, 503)}


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read whole,
    by its Content-Length, or as it arrives when it has none (chunked): then this answers 413
    itself, the app is told the client left, and whatever it sends after is dropped."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, 413, "body_too_large", self._message())
            return
        seen = 0
        answered = False

        async def limited() -> Message:
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    answered = True
                    await _send_error(send, 413, "body_too_large", self._message())
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not answered:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not answered:  # the app's own failure; after a 413 only the client's leaving
                raise

    def _message(self) -> str:
        return (f"the request body is larger than {self.limit} bytes (c.Serve.max_body_bytes);"
                " send large files in parts (PUT .../files/PATH?append=true)")


async def _send_error(send: Send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": kind, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def authorized(request: Request) -> Token:
    """The token of the request's ``Authorization: Bearer`` header; ApiError 401 otherwise."""
    server: Server = request.app.state.server
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer TOKEN' (tokens come "
                       "from c.Serve.tokens or $TIERKERNEL_TOKEN)")
    token = find_token(server.tokens, secret.strip())
    if token is None:
        raise ApiError(401, "unauthorized", "that token is not accepted by this server")
    request.state.token = token
    return token


#: A route parameter that is the request's token (401 without an accepted one).
Auth = Annotated[Token, Depends(authorized)]


def create_app(server: Server) -> FastAPI:
    """The API's ASGI application for ``server``."""
    app = FastAPI(
        title="tierkernel execution API", version=__version__,
        description="Run Python cells in tierkernel's tiers over HTTP: each session is a "
        "tierkernel kernel (same tiers, fsx, helpers, policy and audit as a notebook). "
        "Authenticate with 'Authorization: Bearer TOKEN'.",
        responses=_ERRORS, lifespan=lambda _: lifespan(server))
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.kind, "message": str(exc)}, status_code=exc.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:20]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid_request", "message": "; ".join(problems)},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": kind, "message": str(exc.detail)},
                            status_code=exc.status_code)

    @app.middleware("http")
    async def audit(request: Request,
                    call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        started = time.monotonic()
        response = await call_next(request)
        token = getattr(request.state, "token", None)
        server.requests.record(
            method=request.method, path=request.url.path[:300], status=response.status_code,
            token=token.name if token else None,
            client=request.client.host if request.client else None,
            ms=round((time.monotonic() - started) * 1000, 1))
        return response

    app.add_middleware(BodyLimit, limit=server.settings.max_body_bytes)

    # MCP over streamable HTTP at /mcp: the same tokens, checked here before the SDK sees the
    # request; its tools read the token from the request's state.
    mcp = mcp_server.build(server)
    for route in mcp.streamable_http_app().routes:
        app.router.routes.append(route)
    server.mcp = mcp

    @app.middleware("http")
    async def mcp_auth(request: Request,
                       call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if request.url.path.rstrip("/") == "/mcp":
            try:
                await authorized(request)
            except ApiError as exc:
                return JSONResponse({"error": exc.kind, "message": str(exc)},
                                    status_code=exc.status,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/tiers", response_model=list[TierInfo])
    async def tiers(token: Auth) -> list[TierInfo]:
        """Every tier: available or not (and why), and whether this token may use it."""
        return await server.tiers(token)

    @app.get("/languages", response_model=list[str])
    async def languages(token: Auth) -> list[str]:
        """The languages cells may be written in (JavaScript and TypeScript in the tiers
        whose GET /tiers entry lists them)."""
        return ["python", *cells.LANG_OPTION]

    @app.post("/validate", response_model=ValidateResult)
    async def validate(body: ValidateRequest, token: Auth) -> ValidateResult:
        """What POST /execute would check (the tier line, options, size and the token's
        ceiling), with nothing run."""
        size = len(body.code.encode("utf-8", "surrogatepass"))
        limit = server.settings.max_code_bytes
        try:
            cell = cells.plan(body.code, body.tier, body.config, server.ceiling(token),
                              server.settings.default_tier, limit,
                              server.settings.max_timeout, body.language)
        except ApiError as exc:
            return ValidateResult(valid=False, tier=body.tier, errors=[str(exc)], size=size,
                                  limit=limit)
        return ValidateResult(valid=True, tier=cell.tier, errors=[], size=size, limit=limit)

    @app.post("/execute", response_model=ExecResult)
    async def execute(body: ExecuteRequest, token: Auth) -> ExecResult:
        """Run one cell and answer when it ends. With 'session', in that session (state
        persists); without, in a one-shot session ended afterwards."""
        return await server.execute(body, token)

    @app.post("/execute/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "Server-Sent Events: stream, display, result, "
                               "error, clear as they happen; then done (an ExecResult) or "
                               "failed (an error body)."}})
    async def execute_stream(body: ExecuteRequest, token: Auth) -> StreamingResponse:
        """Run one cell as POST /execute does, sending its output as it happens."""
        session, cell = await server.prepare(body, token)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=256)
        listening = True

        # The execution never waits for the client: events that find the queue full (a
        # client that reads slowly or not at all) are dropped; the final event has them all.
        async def event(kind: str, data: dict[str, Any]) -> None:
            if listening:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait((kind, data))

        async def work() -> None:
            try:
                result = await server.run(session, cell, body, event)
                final: tuple[str, Any] = ("done", result.model_dump())
            except ApiError as exc:
                final = ("failed", {"error": exc.kind, "message": str(exc)})
            except Exception as exc:  # reported to the client, logged here
                log.exception("execution failed")
                final = ("failed", {"error": "internal", "message": str(exc)})
            if listening:
                if queue.full():
                    queue.get_nowait()  # room for the final event, whatever else is lost
                queue.put_nowait(final)

        task = asyncio.ensure_future(work())

        async def events() -> AsyncIterator[bytes]:
            nonlocal listening
            try:
                while True:
                    kind, data = await queue.get()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
                    if kind in ("done", "failed"):
                        return
            finally:
                listening = False  # the client left: the execution ends on its own
                while not queue.empty():
                    queue.get_nowait()
                keep(task)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/sessions", response_model=SessionInfo, status_code=201)
    async def create_session(body: SessionCreate, token: Auth) -> SessionInfo:
        """Start a session: a kernel whose state lasts until it is deleted or idle too long."""
        tier = body.tier or server.settings.default_tier
        ceiling = server.ceiling(token)
        # The tier and config checked as any execution's are, before a kernel starts.
        cells.plan("pass", tier, body.config, ceiling, tier,
                   server.settings.max_code_bytes, server.settings.max_timeout)
        session = await server.pool.create(token.owner, tier, ceiling)
        session.defaults = body.config
        return session_info(session)

    @app.get("/sessions", response_model=list[SessionInfo])
    async def list_sessions(token: Auth) -> list[SessionInfo]:
        """This token's live sessions."""
        return [session_info(s) for s in server.pool.sessions_of(token.owner) if not s.one_shot]

    @app.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str, token: Auth) -> SessionInfo:
        """One of this token's sessions."""
        return session_info(server.pool.get(session_id, token.owner))

    @app.delete("/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str, token: Auth) -> None:
        """End a session (its kernel, containers and sandboxes)."""
        await server.pool.end(server.pool.get(session_id, token.owner))

    @app.post("/sessions/{session_id}/interrupt", status_code=204)
    async def interrupt_session(session_id: str, token: Auth) -> None:
        """Interrupt the session's running execution (which then ends with
        KeyboardInterrupt)."""
        await server.pool.get(session_id, token.owner).interrupt()

    @app.get("/sessions/{session_id}/files", response_model=list[FileEntry])
    async def list_files(session_id: str, token: Auth,
                         path: Annotated[str, Query(max_length=1024)] = "/") -> list[FileEntry]:
        """The entries of a folder of the session's workspace (what its cells see as
        /workspace, fsx)."""
        ws = server.workspace(session_id, token)
        return [FileEntry(**e) for e in await asyncio.to_thread(files.listing, ws, path)]

    @app.get("/sessions/{session_id}/files/{path:path}", response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def download(session_id: str, path: str, token: Auth) -> StreamingResponse:
        """A file of the session's workspace, as it is now."""
        ws = server.workspace(session_id, token)
        size = await asyncio.to_thread(files.size_of, ws, "/" + path)
        parts = files.chunks(ws, "/" + path)

        async def body() -> AsyncIterator[bytes]:
            while chunk := await asyncio.to_thread(next, parts, b""):
                yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @app.put("/sessions/{session_id}/files/{path:path}", status_code=204,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}, "required": True}})
    async def upload(session_id: str, path: str, request: Request, token: Auth,
                     append: bool = False) -> None:
        """Write a file of the session's workspace from the request body (its folders are
        made); with append=true, add the body to its end (for files larger than one request
        may be)."""
        ws = server.workspace(session_id, token)
        data = await request.body()
        await asyncio.to_thread(files.write, ws, "/" + path, data, append)

    @app.get("/executions", response_model=ExecutionPage)
    async def list_executions(
            token: Auth, limit: Annotated[int, Query(ge=1, le=500)] = 20,
            offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
            tier: Annotated[str | None, Query(max_length=64)] = None,
            failed: bool = False) -> ExecutionPage:
        """This token's executions from the audit log, newest first."""
        return await server.executions(token, limit, offset, tier, failed)

    @app.get("/executions/{execution_id}", response_model=ExecutionRecord)
    async def get_execution(execution_id: str, token: Auth) -> ExecutionRecord:
        """One of this token's executions, by id."""
        return await server.execution(execution_id, token)

    return app


@contextlib.asynccontextmanager
async def lifespan(server: Server) -> AsyncIterator[None]:
    """Sessions are culled while the server runs and all ended when it stops."""
    server.pool.start_culling()
    try:
        async with mcp_session_manager(server):
            yield
    finally:
        await server.pool.close_all()
        server.audit.close()
        server.requests.close()


def mcp_session_manager(server: Server) -> contextlib.AbstractAsyncContextManager[Any]:
    """The MCP SDK's session manager of the mounted /mcp (it must run while the app does)."""
    mcp = getattr(server, "mcp", None)
    return mcp.session_manager.run() if mcp is not None else contextlib.nullcontext()
