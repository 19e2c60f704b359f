"""What the runtime helpers may do: the kernel's configuration and each cell's narrowed policy.

The kernel holds one :class:`Runtime` (``c.Runtime.*`` in a jupyter config file, some traits
also from environment variables). For every cell it derives a :class:`CellPolicy` from the
tier's defaults and the cell's ``--allow`` / ``--domains`` / ``--db-readonly`` options; the
broker checks every helper call against that policy before anything reaches the network or the
database.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from traitlets import Bool, Float, Int, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from tierkernel.runtime.grants import HELPERS, is_domain_pattern
from tierkernel.sizes import ByteSize


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def host_matches(host: str, pattern: str) -> bool:
    """Whether ``host`` is allowed by one domain pattern (``*``, exact, or ``*.example.org``).

    ``*.example.org`` matches any subdomain at any depth but not ``example.org`` itself, as in
    TLS certificates; list both to allow both.
    """
    host = host.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True)
class CellPolicy:
    """What one cell may do with the helpers.

    ``helpers`` are the helper names it may call, ``domains`` the host patterns ``api()`` may
    reach, ``db_readonly`` whether ``db()`` may only read. ``tier`` names the cell's tier, so a
    refusal can say which magic line to change; ``trusted`` is true for the kernel's own
    IPython (the native tier), whose helper calls get HTTP clients and database sessions of
    their own, never shared with the isolated tiers.
    """

    tier: str
    helpers: frozenset[str]
    domains: tuple[str, ...]
    db_readonly: bool = False
    trusted: bool = False
    #: The kernel's helper ceiling (``c.Runtime.helper_ceiling``), if it has one.
    ceiling: frozenset[str] | None = None

    def check_helper(self, helper: str) -> None:
        """Raise :class:`PermissionError` unless this cell may call ``helper``."""
        if helper in self.helpers:
            return
        if self.ceiling is not None and helper not in self.ceiling:
            raise PermissionError(
                f"{helper}() is not allowed in this kernel, whatever a cell's --allow says "
                f"(its helpers: {', '.join(sorted(self.ceiling)) or 'none'}; set by "
                "c.Runtime.helper_ceiling)")
        allowed = ",".join(sorted({*self.helpers, helper}))
        raise PermissionError(
            f"{helper}() is not allowed in this {self.tier} cell (allowed here: "
            f"{', '.join(sorted(self.helpers)) or 'none'}); allow it on the cell's first line: "
            f"%%tier {self.tier} --allow {allowed}"
        )

    def check_domain(self, host: str) -> None:
        """Raise :class:`PermissionError` unless ``api()`` may reach ``host``."""
        if any(host_matches(host, pattern) for pattern in self.domains):
            return
        listed = ", ".join(self.domains) or "none"
        wanted = ",".join([*self.domains, host])
        raise PermissionError(
            f"api() may not reach {host!r} from this {self.tier} cell (allowed domains: "
            f"{listed}); allow it on the cell's first line: %%tier {self.tier} --allow api "
            f"--domains {wanted} (or for every cell: c.Runtime.allowed_domains)"
        )


class Runtime(LoggingConfigurable):
    """The runtime helpers' configuration: endpoints, secrets, limits and default policy.

    Secrets set here (``ai_api_key``, the password in ``db_url``) stay on the host: the broker
    scrubs them from everything it returns to a cell.
    """

    # -- policy -----------------------------------------------------------------------------
    native_helpers = List(
        Unicode(), list(HELPERS),
        help="Helpers a native cell may call without --allow (native code is trusted).",
    ).tag(config=True)
    isolated_helpers = List(
        Unicode(), ["console", "db"],
        help="Helpers a cell in any other tier (process, wasm, sandbox) may call without "
        "--allow; ai and api must be allowed explicitly.",
    ).tag(config=True)
    helper_ceiling = List(
        Unicode(), None, allow_none=True,
        help="When set, the only helpers any cell may call, whatever its --allow says (an "
        "administrator's limit, as domain_ceiling is for domains).",
    ).tag(config=True)
    native_domains = List(
        Unicode(), ["*"],
        help="Host patterns api() may reach from native cells without --domains ('*': any).",
    ).tag(config=True)
    allowed_domains = List(
        Unicode(), [],
        help="Host patterns (api.github.com, *.example.org) api() may reach from cells of the "
        "other tiers without --domains.",
    ).tag(config=True)
    domain_ceiling = List(
        Unicode(), None, allow_none=True,
        help="When set, no cell may reach a host outside these patterns, whatever its "
        "--domains says (an administrator's limit).",
    ).tag(config=True)
    db_readonly = Bool(
        False, help="Make db() read-only in every cell (a cell can also ask with --db-readonly)."
    ).tag(config=True)
    code_size_limit = Int(
        100 * 1024, help="Largest cell, in bytes of UTF-8, the kernel runs; larger cells are "
        "refused before running and recorded as refused."
    ).tag(config=True)

    # -- api() ------------------------------------------------------------------------------
    api_timeout = Float(
        30.0, help="Longest time in seconds an api() call may take, redirects and body "
        "included; a cell may ask for less with timeout=."
    ).tag(config=True)
    api_max_response_bytes = ByteSize(
        10 * 1024 * 1024, minimum=1024,
        help="Largest api() result: the response body as read from the network, and the whole "
        "result the cell gets (status, headers, decoded body) as JSON, in bytes (or a size: "
        "512k, 10m).",
    ).tag(config=True)
    api_max_redirects = Int(10, help="Most redirects api() follows for one call.").tag(
        config=True)
    api_allowed_networks = List(
        Unicode(), [],
        help="Networks (CIDR: 10.1.2.0/24, 127.0.0.1/32, fd00::/8) that api() may connect to "
        "from cells of the isolated tiers (process, wasm, sandbox) although they are not public "
        "internet addresses. Every other loopback, link-local (169.254.169.254, the cloud "
        "metadata address, included), private (RFC 1918, fc00::/7), shared, unspecified, "
        "multicast or reserved address is refused, in whatever form it is written "
        "(IPv4-mapped IPv6 included), after the host name is resolved on the host.",
    ).tag(config=True)
    native_api_allowed_networks = List(
        Unicode(), [],
        help="The same as api_allowed_networks, for native cells: api() checks the address it "
        "connects to in every tier, so a notebook that fetches URLs taken from data cannot be "
        "led to the metadata service or a local admin port. Native code that needs raw access "
        "can still use httpx or requests directly.",
    ).tag(config=True)

    # -- db() -------------------------------------------------------------------------------
    db_url = Unicode(
        help="PostgreSQL URL (postgresql://user:password@host:port/dbname) for db(); empty: "
        "the embedded SQLite file at db_path. Defaults to $TIERKERNEL_DB_URL."
    ).tag(config=True)
    db_path = Unicode(
        help="The SQLite file db() uses when db_url is empty. Defaults to $TIERKERNEL_DB_PATH, "
        "else tierkernel/db/<folder>-<hash>.sqlite3 in Jupyter's data dir, one file per "
        "notebook folder (the kernel's working directory), created on first use. It must not "
        "lie inside a file:// fsx workspace (cells could edit it there): db() refuses to use "
        "it."
    ).tag(config=True)
    db_max_rows = Int(10_000, help="Most rows one db() call may return.").tag(config=True)
    db_max_result_bytes = ByteSize(
        8 * 1024 * 1024, minimum=1024,
        help="Largest db() result, as the JSON the cell gets, in bytes (or a size: 512k, 8m); "
        "counted row by row while the rows are fetched, so a larger result is refused before "
        "it is held in memory. On SQLite it is also the largest single value (string, blob, "
        "sorted row) a db() statement may make or read, and less in a wide row: the values of "
        "one row may take 4 times it in all (SQLite makes a whole row at once).",
    ).tag(config=True)
    db_timeout = Float(30.0, help="Longest time in seconds one db() statement may run.").tag(
        config=True)

    # -- ai() -------------------------------------------------------------------------------
    ai_base_url = Unicode(
        help="Base URL of an OpenAI-compatible API, as the OpenAI client takes it (ending in "
        "/v1): https://api.openai.com/v1, http://localhost:11434/v1 (Ollama), "
        "http://localhost:8000/v1 (vLLM, llama.cpp). Defaults to $TIERKERNEL_AI_BASE_URL."
    ).tag(config=True)
    ai_api_key = Unicode(
        help="API key sent to ai_base_url as a bearer token. Defaults to "
        "$TIERKERNEL_AI_API_KEY. Never visible to cells."
    ).tag(config=True)
    ai_timeout = Float(120.0, help="Longest time in seconds one ai() call may take.").tag(
        config=True)
    ai_max_response_bytes = ByteSize(
        10 * 1024 * 1024, minimum=1024,
        help="Largest ai() result: the endpoint's response as read, and the result the cell "
        "gets as JSON, in bytes (or a size: 512k, 10m).",
    ).tag(config=True)

    # -- audit log --------------------------------------------------------------------------
    audit_log = Unicode(
        help="SQLite file of the execution audit log (%executions). Defaults to "
        "$TIERKERNEL_AUDIT_LOG, else tierkernel/executions.sqlite3 in Jupyter's data dir."
    ).tag(config=True)
    log_entry_max_chars = Int(
        64 * 1024, help="Longest console message kept in an execution's logs (longer ones "
        "are cut, with a note)."
    ).tag(config=True)
    log_max_entries = Int(
        1000, help="Most console entries kept in one execution's logs; later ones are dropped "
        "(the console still prints them) and one entry of the logs says how many."
    ).tag(config=True)
    log_max_bytes = ByteSize(
        1024 * 1024, minimum=1024,
        help="Most bytes (UTF-8) of console messages kept in one execution's logs (or a size: "
        "512k, 1m); later entries are dropped, as with log_max_entries.",
    ).tag(config=True)

    @default("db_url")
    def _db_url_default(self) -> str:
        return _env("TIERKERNEL_DB_URL")

    @default("db_path")
    def _db_path_default(self) -> str:
        return _env("TIERKERNEL_DB_PATH") or str(default_db_path(Path.cwd()))

    @default("ai_base_url")
    def _ai_base_url_default(self) -> str:
        return _env("TIERKERNEL_AI_BASE_URL")

    @default("ai_api_key")
    def _ai_api_key_default(self) -> str:
        return _env("TIERKERNEL_AI_API_KEY")

    @default("audit_log")
    def _audit_log_default(self) -> str:
        explicit = _env("TIERKERNEL_AUDIT_LOG")
        if explicit:
            return explicit
        return str(Path(jupyter_data_dir()) / "tierkernel" / "executions.sqlite3")

    @validate("native_helpers", "isolated_helpers", "helper_ceiling")
    def _check_helpers(self, proposal: Any) -> list[str] | None:
        if proposal["value"] is None:
            return None
        names = list(proposal["value"])
        bad = [n for n in names if n not in HELPERS]
        if bad:
            raise ValueError(f"unknown helper(s) {bad}; helpers are {', '.join(HELPERS)}")
        return names

    @validate("native_domains", "allowed_domains", "domain_ceiling")
    def _check_domains(self, proposal: Any) -> list[str] | None:
        if proposal["value"] is None:
            return None
        domains = [d.strip().lower().rstrip(".") for d in proposal["value"]]
        bad = [d for d in domains if not is_domain_pattern(d)]
        if bad:
            raise ValueError(f"not host patterns: {bad} (use api.github.com, *.example.org "
                             "or *)")
        return domains

    @validate("api_allowed_networks", "native_api_allowed_networks")
    def _check_networks(self, proposal: Any) -> list[str]:
        networks = [str(n).strip() for n in proposal["value"]]
        for text in networks:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(
                    f"c.Runtime.{proposal['trait'].name}: {text!r} is not a network; write "
                    "an address or a CIDR block: 127.0.0.1, 10.0.0.0/8, fd00::/8") from None
        return networks

    @validate("code_size_limit", "db_max_rows", "log_entry_max_chars", "log_max_entries")
    def _check_positive(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value <= 0:
            raise ValueError(f"c.Runtime.{proposal['trait'].name} must be positive, got {value}")
        return value

    # -- per cell ---------------------------------------------------------------------------
    def policy_for(self, tier: str, trusted: bool, options: Mapping[str, Any]) -> CellPolicy:
        """The policy of one cell in ``tier`` (``trusted``: the kernel's own IPython).

        Without options a cell gets its tier's defaults; ``--allow`` and ``--domains`` replace
        them for that cell (so ``--allow api`` on a native cell narrows it to api, and on a
        wasm cell grants api); :attr:`helper_ceiling` and :attr:`domain_ceiling` cap the
        helpers and domains whatever the cell says.
        """
        allow = options.get("allow")
        helpers = frozenset(allow if allow is not None else
                            self.native_helpers if trusted else self.isolated_helpers)
        if self.helper_ceiling is not None:
            helpers = helpers.intersection(self.helper_ceiling)
        given = options.get("domains")
        domains: Iterable[str] = (given if given is not None else
                                  self.native_domains if trusted else self.allowed_domains)
        if self.domain_ceiling is not None:
            ceiling = self.domain_ceiling
            domains = [d for d in domains if within_ceiling(d, ceiling)]
        return CellPolicy(
            tier=tier,
            helpers=helpers,
            domains=tuple(domains),
            db_readonly=bool(self.db_readonly or options.get("db-readonly")),
            trusted=trusted,
            ceiling=(frozenset(self.helper_ceiling) if self.helper_ceiling is not None
                     else None),
        )

    def allowed_networks(self, trusted: bool,
                         ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The non-public networks api() may connect to from native (``trusted``) or other
        cells."""
        names = self.native_api_allowed_networks if trusted else self.api_allowed_networks
        return [ipaddress.ip_network(n, strict=False) for n in names]

    def secrets(self) -> list[str]:
        """The configured secrets, longest first: scrubbed from whatever a cell gets back."""
        found = [self.ai_api_key] if self.ai_api_key else []
        if self.db_url:
            from urllib.parse import unquote, urlsplit

            try:
                password = urlsplit(self.db_url).password
            except ValueError:
                password = None
            if password:
                found += [password, unquote(password)]
            found.append(self.db_url)
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def default_db_path(folder: Path) -> Path:
    """db()'s SQLite file for notebooks in ``folder`` when none is configured.

    In Jupyter's per-user data dir, not in the folder: a folder can be (or be inside) a
    ``file://`` workspace, and there cells of every tier could edit the database directly
    instead of through db() and its policy. One file per folder keeps what a notebook builds
    with db() apart from other folders' notebooks, as when the file lived in the folder; the
    folder's name stays readable in the file's name, the hash keeps two folders of the same
    name apart.
    """
    resolved = folder.resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.name)[:40]
    return Path(jupyter_data_dir()) / "tierkernel" / "db" / f"{name or 'root'}-{digest}.sqlite3"


def within_ceiling(pattern: str, ceiling: list[str]) -> bool:
    """Whether every host ``pattern`` matches is also matched by some ceiling pattern."""
    if "*" in ceiling:
        return True
    if pattern == "*":
        return False
    probe = pattern[2:] if pattern.startswith("*.") else pattern
    for limit in ceiling:
        if limit == pattern:
            return True
        if limit.startswith("*.") and host_matches(probe, limit):
            return True
    return False
