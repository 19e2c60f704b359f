"""The execution API's settings (``c.Serve.*``) and the tokens it takes, each with a ceiling.

A token is a secret a client sends as ``Authorization: Bearer TOKEN``. Each carries a policy
ceiling no request can exceed: the tiers its cells may run in (``native`` and ``process``, which
are no boundary, only when listed), the runtime helpers they may call and the domains ``api()``
may reach. The ceiling is also handed to the session's kernel (``c.TierKernel.allowed_tiers``,
``c.Runtime.helper_ceiling``, ``c.Runtime.domain_ceiling``), so a cell's own ``%%tier`` line
cannot reach past it either.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from traitlets import Dict, Float, Int, Unicode, default, validate
from traitlets.config import Configurable

from tierkernel.runtime.grants import HELPERS, is_domain_pattern
from tierkernel.runtime.policy import within_ceiling
from tierkernel.sizes import ByteSize

#: Tiers a token reaches when its ceiling names none: the ones that are a boundary.
SANDBOXED_TIERS = ("wasm", "sandbox")
#: The environment variable that gives one token (with the default ceiling).
TOKEN_ENV = "TIERKERNEL_TOKEN"


#: Options every request may give (within the ceiling's helpers and domains); any other
#: (--memory, --cpus, --runtime, ...) only when the token's ceiling lists it.
FREE_OPTIONS = frozenset({"timeout", "allow", "domains", "db-readonly", "lang", "strict"})
#: Helpers a token reaches when its ceiling names none: those a sandboxed cell has without
#: --allow (ai and api spend the operator's credentials and reach the network).
DEFAULT_HELPERS = ("console", "db")


@dataclass(frozen=True)
class Ceiling:
    """What a token's requests may reach at most."""

    #: None (a kernel's ceiling only): any tier.
    tiers: tuple[str, ...] | None
    #: None: whatever the kernel's configuration allows.
    helpers: tuple[str, ...] | None = None
    domains: tuple[str, ...] | None = None
    #: Options beyond FREE_OPTIONS that requests may give (e.g. memory, cpus, runtime).
    options: tuple[str, ...] = ()
    #: Options no cell may give at all (the kernel configuration's fixed_options).
    fixed: tuple[str, ...] = ()

    @property
    def tier_names(self) -> tuple[str, ...]:
        """The tiers requests may reach (none when unset: a token's ceiling always sets
        them)."""
        return self.tiers or ()


def within(token: Ceiling, kernel: Ceiling | None) -> Ceiling:
    """``token``'s ceiling, narrowed to what the kernels' own configuration allows
    (``kernel``: their allowed_tiers, helper and domain ceilings, None where unset), so
    that the token cannot widen an administrator's limits."""
    if kernel is None:
        return token
    tiers = token.tiers or ()
    if kernel.tiers is not None:
        tiers = tuple(t for t in tiers if t in kernel.tiers)
    helpers = token.helpers
    if kernel.helpers is not None:
        helpers = tuple(h for h in (helpers if helpers is not None else kernel.helpers)
                        if h in kernel.helpers)
    domains = token.domains
    if kernel.domains is not None:
        mine = list(domains) if domains is not None else ["*"]
        domains = tuple(dict.fromkeys(
            [d for d in mine if within_ceiling(d, list(kernel.domains))]
            + [d for d in kernel.domains if within_ceiling(d, mine)]))
    return Ceiling(tiers=tiers, helpers=helpers, domains=domains,
                   options=tuple(o for o in token.options if o not in kernel.fixed),
                   fixed=kernel.fixed)


@dataclass(frozen=True)
class Token:
    """One accepted token: a name for logs and audit (never the secret), and its ceiling."""

    name: str
    ceiling: Ceiling
    #: sha256 of the secret: what requests are compared against.
    digest: bytes

    @property
    def owner(self) -> str:
        """The key of this token's sessions and executions (its digest: names may repeat)."""
        return self.digest.hex()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def parse_ceiling(where: str, spec: Any) -> Ceiling:
    """A token's ceiling from its configuration (a dict with ``tiers``, ``helpers``,
    ``domains``, each a list; missing: the default). Raises ValueError saying what is wrong."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a token's value must be a dict with 'tiers', 'helpers', "
                         f"'domains' (lists) and 'name', got {type(spec).__name__}")
    unknown = set(spec) - {"tiers", "helpers", "domains", "options", "name"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a token takes 'tiers', "
                         "'helpers', 'domains', 'options' and 'name'")

    def names(key: str) -> tuple[str, ...] | None:
        value = spec.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {key!r} must be a list of strings")
        return tuple(value)

    tiers = names("tiers")
    helpers = names("helpers")
    if helpers is not None and (bad := [h for h in helpers if h not in HELPERS]):
        raise ValueError(f"{where}: unknown helpers {bad}; helpers are {', '.join(HELPERS)}")
    domains = names("domains")
    if domains is not None and (bad := [d for d in domains if not is_domain_pattern(d)]):
        raise ValueError(f"{where}: not host patterns: {bad} (use api.github.com, "
                         "*.example.org or *)")
    return Ceiling(tiers=tiers if tiers is not None else SANDBOXED_TIERS,
                   helpers=helpers if helpers is not None else DEFAULT_HELPERS,
                   domains=domains if domains is not None else (),
                   options=names("options") or ())


class Serve(Configurable):
    """``tierkernel serve``: the HTTP execution API (see tierkernel/serve/)."""

    host = Unicode("127.0.0.1", help="Address to listen on. Anything but a loopback "
                   "address needs tokens (c.Serve.tokens or $TIERKERNEL_TOKEN).").tag(config=True)
    port = Int(8765, min=0, max=65535, help="Port to listen on (0: any free one).").tag(
        config=True)
    tokens = Dict(
        help="Accepted bearer tokens: {'SECRET': {'name': 'ci', 'tiers': ['wasm', 'sandbox'], "
        "'helpers': ['console', 'db', 'api'], 'domains': ['api.github.com'], 'options': "
        "['memory']}}. Each key is a secret; its value the ceiling no request with it can "
        "exceed: tiers (default wasm and sandbox; native and process only when listed), "
        "helpers (default console and db), domains api() may reach (default none), and the "
        "%%tier options beyond timeout, allow, domains and db-readonly that requests may give "
        "(default none: --memory, --cpus, --runtime keep their configured values). "
        "$TIERKERNEL_TOKEN adds one token with the default ceiling.",
    ).tag(config=True)
    default_tier = Unicode("wasm", help="Tier of executions and sessions that name none.").tag(
        config=True)
    max_sessions = Int(
        16, min=1, help="Sessions (kernels) alive at once, one-shot executions included; "
        "more get 429.").tag(config=True)
    spare_sessions = Int(
        1, min=0, help="Kernels kept started ahead for the next session, for the tiers and "
        "tokens most recently asked for, so that creating a session does not wait for a "
        "kernel to start. They are extra to max_sessions; 0: none.").tag(config=True)
    max_sessions_per_token = Int(
        8, min=1, help="Sessions one token may have alive at once (so that one client cannot "
        "take them all); more get 429.").tag(config=True)
    max_timeout = Float(
        3600.0, min=1.0, help="Longest timeout, in seconds, an execution may ask for; also "
        "how long the server waits for one that asks for none before interrupting it.").tag(
        config=True)
    idle_timeout = Float(
        600.0, min=1.0, help="Seconds a session may stay unused before it is ended.").tag(
        config=True)
    max_connections = Int(
        256, min=8, help="Connections (and requests in progress) the server serves at once; "
        "more get 503 at once.").tag(config=True)
    max_body_bytes = ByteSize(
        4 * 1024 * 1024, minimum=1024,
        help="Largest request body, in bytes (or a size: 4m); larger ones get 413.").tag(
        config=True)
    max_code_bytes = ByteSize(
        100 * 1024, minimum=16,
        help="Largest code of one execution, in bytes of UTF-8 (the origin API's 100 KB).").tag(
        config=True)
    max_output_bytes = ByteSize(
        16 * 1024 * 1024, minimum=1024,
        help="Most output one execution's answer holds; past it the rest is dropped and the "
        "answer says truncated.").tag(config=True)
    request_log = Unicode(
        help="File every request is recorded in, one JSON line each (rotated at 16 MiB); "
        "'' for none. Default: serve-requests.jsonl in tierkernel's folder of Jupyter's "
        "data dir.").tag(config=True)
    start_timeout = Float(60.0, min=1.0, help="Seconds a session's kernel may take to "
                          "start (once its turn to start came: see concurrent_starts)."
                          ).tag(config=True)
    concurrent_starts = Int(
        0, min=0, help="Kernels started at once (0: one per CPU core, at least 2); further "
        "session requests wait their turn, so that a burst of them does not slow every start "
        "past start_timeout.").tag(config=True)
    grace = Float(
        30.0, min=1.0, help="Seconds past an execution's own timeout before the server "
        "interrupts it, and as long again before it ends the session.").tag(config=True)

    @default("request_log")
    def _default_request_log(self) -> str:
        return str(Path(jupyter_data_dir()) / "tierkernel" / "serve-requests.jsonl")

    @validate("tokens")
    def _check_tokens(self, proposal: Any) -> dict[str, Any]:
        value = dict(proposal["value"])
        for number, (secret, spec) in enumerate(value.items()):
            if not isinstance(secret, str) or len(secret) < 16:
                raise ValueError(f"c.Serve.tokens: token #{number + 1} is shorter than 16 "
                                 "characters; use a long random one (python -c 'import "
                                 "secrets; print(secrets.token_urlsafe(32))')")
            parse_ceiling(f"c.Serve.tokens (token #{number + 1})", spec)
        return value

    def accepted_tokens(self) -> list[Token]:
        """Every configured token, ``$TIERKERNEL_TOKEN`` included."""
        found = []
        for number, (secret, spec) in enumerate(self.tokens.items()):
            ceiling = parse_ceiling(f"c.Serve.tokens (token #{number + 1})", spec)
            name = str((spec or {}).get("name") or f"token-{number + 1}")
            found.append(Token(name, ceiling, _digest(secret)))
        from_env = os.environ.get(TOKEN_ENV, "").strip()
        if from_env:
            if len(from_env) < 16:
                raise ValueError(f"${TOKEN_ENV} is shorter than 16 characters; use a long "
                                 "random one")
            found.append(Token("env", parse_ceiling(f"${TOKEN_ENV}", None), _digest(from_env)))
        return found


def generated_token() -> tuple[str, Token]:
    """A random token for a server started with none configured (loopback only), with the
    default ceiling: the secret to show the user, and the token."""
    secret = secrets.token_urlsafe(32)
    return secret, Token("generated", parse_ceiling("generated token", None), _digest(secret))


def find_token(tokens: list[Token], secret: str) -> Token | None:
    """The token whose secret is ``secret``, compared in constant time."""
    digest = _digest(secret)
    match = None
    for token in tokens:
        if hmac.compare_digest(token.digest, digest):
            match = token
    return match


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
