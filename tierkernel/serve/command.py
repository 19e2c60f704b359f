"""``tierkernel serve``: start the HTTP execution API on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from typing import Any

from tierkernel.serve.settings import (
    TOKEN_ENV,
    Ceiling,
    Serve,
    Token,
    generated_token,
    is_loopback,
)

HELP = "serve the HTTP execution API (sessions are tierkernel kernels)"
DESCRIPTION = (
    "Serve tierkernel's execution API over HTTP: POST /execute runs a cell in a tier, "
    "sessions keep state, GET /docs documents it all. Settings come from c.Serve.* in "
    "tierkernel_config.py (the kernel's config folders), then these options. Tokens: "
    f"c.Serve.tokens or ${TOKEN_ENV}; with none, the server makes one, prints it, and "
    "listens on a loopback address only.")


def configure(parser: argparse.ArgumentParser) -> None:
    """The command's arguments; its help ends with every ``c.Serve`` setting."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = settings_help()
    parser.add_argument("--host", help="address to listen on (default c.Serve.host, "
                        "127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default c.Serve.port, 8765; 0: any)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    """Start the server; returns when it stops (Ctrl-C)."""
    try:
        import uvicorn
        from fastapi import FastAPI  # noqa: F401 - to say what is missing before starting
    except ImportError as exc:
        print(f"tierkernel serve needs FastAPI and uvicorn ({exc}); install them with "
              "pip install 'tierkernel[serve]'", file=sys.stderr)
        return 2
    from tierkernel.serve.app import create_app

    loaded = _load("serve", args.host, args.port)
    if loaded is None:
        return 2
    config, settings, tokens = loaded
    if not tokens:
        if not is_loopback(settings.host):
            print(f"tierkernel serve: refusing to listen on {settings.host}: no token is "
                  f"configured, and anyone who can reach that address could run code. Set "
                  f"c.Serve.tokens or ${TOKEN_ENV}, or listen on 127.0.0.1.", file=sys.stderr)
            return 2
        secret, token = generated_token()
        tokens = [token]
        print(f"tierkernel serve: no token configured; this run's token is {secret}\n"
              f"  curl -H 'Authorization: Bearer {secret}' "
              f"http://{settings.host}:{settings.port}/tiers", flush=True)
    server = _server(config, settings, tokens)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s")
    # Connections are bounded too: past the limit uvicorn answers 503 at once.
    uvicorn.run(create_app(server), host=settings.host, port=settings.port,
                log_level=args.log_level, limit_concurrency=settings.max_connections)
    return 0


MCP_HELP = "serve the execution API as MCP tools over stdio (for an MCP client to launch)"
MCP_DESCRIPTION = (
    "An MCP server on stdin/stdout (the official mcp SDK): tools to run code in a tier in a "
    "named session, list tiers, list, read and write a session's files, and list "
    "executions. The ceiling is that of the token in $TIERKERNEL_TOKEN when c.Serve.tokens "
    "knows it, else the default (wasm and sandbox). Over HTTP, `tierkernel serve` serves the "
    "same tools at /mcp (streamable HTTP, bearer tokens).")


def configure_mcp(parser: argparse.ArgumentParser) -> None:
    """``tierkernel mcp`` takes no arguments but --log-level (logs go to stderr)."""
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])


def run_mcp(args: argparse.Namespace) -> int:
    """Serve the MCP tools on stdio until the client closes them."""
    try:
        from tierkernel.serve.mcp_server import build
    except ImportError as exc:
        print(f"tierkernel mcp needs the mcp SDK ({exc}); install it with "
              "pip install 'tierkernel[serve]'", file=sys.stderr)
        return 2
    from tierkernel.serve.settings import find_token, parse_ceiling

    # stdout is the protocol: everything else goes to stderr.
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    loaded = _load("mcp")
    if loaded is None:
        return 2
    config, settings, tokens = loaded
    secret = os.environ.get(TOKEN_ENV, "").strip()
    caller = find_token([t for t in tokens if t.name != "env"], secret) if secret else None
    if caller is None:
        caller = Token("stdio", parse_ceiling("stdio", None), b"stdio")
    build(_server(config, settings, tokens), stdio_token=caller).run("stdio")
    return 0


def _load(command: str, host: str | None = None,
          port: int | None = None) -> tuple[Any, Serve, list[Token]] | None:
    """The user's configuration (the kernel's config files), the server's settings with
    ``host`` and ``port`` on top, and the accepted tokens; None, said on stderr, when a
    config file or value is bad."""
    from tierkernel.kernel.app import kernel_config

    try:
        config = kernel_config([])
        settings = Serve(config=config)
        if host is not None:
            settings.host = host
        if port is not None:
            settings.port = port
        return config, settings, settings.accepted_tokens()
    except Exception as exc:  # a bad config file or value: say which, do not start
        print(f"tierkernel {command}: {exc}", file=sys.stderr)
        return None


def _server(config: Any, settings: Serve, tokens: list[Token]) -> Any:
    """The service (``server.Server``) for ``settings`` and ``tokens``."""
    from tierkernel.fsx import Fsx
    from tierkernel.runtime.policy import Runtime
    from tierkernel.serve.server import Server

    return Server(settings, tokens, _kernel_ceiling(config),
                  Runtime(config=config).audit_log, Fsx(config=config).quota(), config)


def settings_help() -> str:
    """Every ``c.Serve`` setting with its default and help, for ``tierkernel serve --help``
    (the kernel's ``--help-all`` lists the kernel's own)."""
    lines = ["settings (c.Serve.NAME = VALUE in tierkernel_config.py):"]
    for name, trait in sorted(Serve.class_traits(config=True).items()):
        lines.append(f"  c.Serve.{name} = {trait.default_value_repr()}")
        lines.extend(textwrap.wrap(str(trait.help), 86, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def _kernel_ceiling(config: Any) -> Ceiling | None:
    """What the kernels' own configuration allows (allowed_tiers, helper and domain
    ceilings), which no token widens; None when it sets none of them."""
    kernel = config.TierKernel if "TierKernel" in config else {}
    tiers, fixed = kernel.get("allowed_tiers"), kernel.get("fixed_options")
    runtime = config.Runtime if "Runtime" in config else {}
    helpers, domains = runtime.get("helper_ceiling"), runtime.get("domain_ceiling")
    if tiers is None and helpers is None and domains is None and not fixed:
        return None
    return Ceiling(tiers=tuple(tiers) if tiers is not None else None,
                   helpers=tuple(helpers) if helpers is not None else None,
                   domains=tuple(domains) if domains is not None else None,
                   fixed=tuple(fixed or ()))

