"""The execution API as MCP tools (the official ``mcp`` SDK): run code in a tier in a named
session, list tiers, list, read and write a session's workspace files, list executions.

The same service as the HTTP routes (``server.py``), under the calling token's ceiling: over
streamable HTTP at ``/mcp`` of ``tierkernel serve`` (the bearer token of the request), or over
stdio with ``tierkernel mcp`` (the token in ``$TIERKERNEL_TOKEN`` when the server knows it,
else the default ceiling: wasm and sandbox).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import ValidationError

from tierkernel.errors import ApiError
from tierkernel.serve import cells, files
from tierkernel.serve.models import ExecuteRequest
from tierkernel.serve.server import Server
from tierkernel.serve.sessions import Session
from tierkernel.serve.settings import Token

#: Most bytes ``read_file`` returns (a larger file is cut, and the answer says so).
READ_LIMIT = 1 << 20
INSTRUCTIONS = (
    "Run Python in tierkernel's tiers: wasm (WebAssembly: numpy, pandas, scipy, scikit-learn, "
    "matplotlib; no network, no processes) and sandbox (a Docker container with a full "
    "userspace, no network); native and process only where the token allows. Name a session "
    "to keep variables and files between calls; the helpers ai(), api(), db() and console "
    "reach the outside under the server's policy.")


def build(server: Server, stdio_token: Token | None = None) -> FastMCP:
    """The MCP server over ``server``. ``stdio_token`` is the caller when no HTTP request
    carries one (stdio)."""

    @asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[None]:
        if stdio_token is None:  # mounted in the HTTP app, whose lifespan owns the pool
            yield
            return
        server.pool.start_culling()
        try:
            yield
        finally:
            await server.pool.close_all()

    mcp = FastMCP(
        "tierkernel", instructions=INSTRUCTIONS, streamable_http_path="/mcp",
        lifespan=lifespan,
        # Every request carries a bearer token (checked before it reaches here), which a
        # rebinding web page cannot send; the server may listen on any address.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    #: Named sessions, by (token owner, name).
    named: dict[tuple[str, str], str] = {}

    def caller(ctx: Context[Any, Any, Any]) -> Token:
        request = ctx.request_context.request
        token = getattr(getattr(request, "state", None), "token", None)
        if token is None:
            token = stdio_token
        if token is None:
            raise ToolError("no token: call with 'Authorization: Bearer TOKEN'")
        return token

    async def session_named(token: Token, name: str, tier: str | None) -> Session:
        key = (token.owner, name)
        sid = named.get(key)
        if sid is not None:
            try:
                return server.pool.get(sid, token.owner)
            except ApiError:
                del named[key]  # ended (deleted, idle, or its kernel died): a new one
        if len(name) > 64:
            raise ToolError("a session name has at most 64 characters")
        ceiling = server.ceiling(token)
        chosen = tier or server.settings.default_tier
        cells.check_tier(chosen, ceiling)
        session = await server.pool.create(token.owner, chosen, ceiling)
        named[key] = session.id
        # Bounded per token (one token's names never push out another's): its oldest go.
        mine = [k for k in named if k[0] == token.owner]
        for old in mine[:max(0, len(mine) - 1000)]:
            del named[old]
        return session

    def failed(exc: ApiError) -> ToolError:
        return ToolError(f"{exc.kind}: {exc}")

    @mcp.tool()
    async def run_code(code: str, ctx: Context[Any, Any, Any], tier: str | None = None,
                       session: str | None = None, timeout: float | None = None,
                       language: str = "python") -> dict[str, Any]:
        """Run code in a tier and return what it did: success, stdout, stderr, the error
        (ename, evalue, traceback) and every output as a Jupyter mime bundle.

        tier: wasm, sandbox (or native, process where allowed); default: the session's, else
        the server's. session: a name of your choosing; calls with the same name share
        variables and workspace files (made on first use). Without it, a fresh session is
        used once. timeout: seconds (the tier's default when left out). language: python,
        javascript or typescript (these two in the wasm and sandbox tiers)."""
        token = caller(ctx)
        try:
            sid = (await session_named(token, session, tier)).id if session else None
            body = ExecuteRequest.model_validate(
                {"code": code, "tier": tier, "session": sid, "language": language,
                 "config": {"timeout": timeout} if timeout else None})
            result = await server.execute(body, token)
        except ApiError as exc:
            raise failed(exc) from None
        except ValidationError as exc:
            raise ToolError(str(exc)) from None
        return result.model_dump()

    @mcp.tool()
    async def list_tiers(ctx: Context[Any, Any, Any]) -> list[dict[str, Any]]:
        """Every tier: available here or not (and why), its isolation and limits, and
        whether you may use it."""
        return [tier.model_dump() for tier in await server.tiers(caller(ctx))]

    @mcp.tool()
    async def list_files(session: str, ctx: Context[Any, Any, Any],
                         path: str = "/") -> list[dict[str, Any]]:
        """The entries (name, kind, size) of a folder of a named session's workspace: what
        its cells see as /workspace."""
        token = caller(ctx)
        try:
            ws = server.workspace((await session_named(token, session, None)).id, token)
            return await asyncio.to_thread(files.listing, ws, path)
        except ApiError as exc:
            raise failed(exc) from None

    @mcp.tool()
    async def read_file(session: str, path: str,
                        ctx: Context[Any, Any, Any]) -> dict[str, Any]:
        """A file of a named session's workspace: its text (UTF-8), or its bytes as base64
        when it is not text; at most 1 MiB of it."""
        token = caller(ctx)
        try:
            ws = server.workspace((await session_named(token, session, None)).id, token)
            size = await asyncio.to_thread(files.size_of, ws, path)
            data = await asyncio.to_thread(files.head, ws, path, READ_LIMIT)
        except ApiError as exc:
            raise failed(exc) from None
        answer: dict[str, Any] = {"path": path, "size": size, "truncated": size > len(data)}
        try:
            answer["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            answer["base64"] = base64.b64encode(data).decode("ascii")
        return answer

    @mcp.tool()
    async def write_file(session: str, path: str, content: str, ctx: Context[Any, Any, Any],
                         encoding: str = "utf-8", append: bool = False) -> str:
        """Write a file of a named session's workspace (its folders are made): content as
        text (encoding utf-8) or as base64 (encoding base64); append adds to its end."""
        token = caller(ctx)
        if encoding not in ("utf-8", "base64"):
            raise ToolError("encoding is utf-8 or base64")
        try:
            data = (base64.b64decode(content, validate=True) if encoding == "base64"
                    else content.encode("utf-8"))
        except ValueError as exc:
            raise ToolError(f"content is not base64: {exc}") from None
        if len(data) > server.settings.max_body_bytes:
            raise ToolError(f"the content is larger than {server.settings.max_body_bytes} "
                            "bytes; write it in parts with append")
        try:
            ws = server.workspace((await session_named(token, session, None)).id, token)
            await asyncio.to_thread(files.write, ws, path, data, append)
        except ApiError as exc:
            raise failed(exc) from None
        return f"wrote {len(data)} bytes to {path}"

    @mcp.tool()
    async def list_executions(ctx: Context[Any, Any, Any], limit: int = 20,
                              offset: int = 0) -> dict[str, Any]:
        """Your executions from the audit log, newest first (code, tier, status, error)."""
        if not 1 <= limit <= 500 or not 0 <= offset <= 1_000_000:
            raise ToolError("limit is 1 to 500, offset 0 to 1000000")
        page = await server.executions(caller(ctx), limit, offset, None, False)
        return page.model_dump()

    return mcp
