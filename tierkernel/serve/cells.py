"""From an API request to the cell a session's kernel runs: the tier, checked against the
token's ceiling, and the ``%%tier`` line that carries the request's limits and grants.

The line is built here from checked values only (a tier name, numbers, helper names, host
patterns), never copied from the request, so nothing a client sends can add an option or a
second line to it; a ``%%tier`` line the code starts with is read as a notebook's would be and
its options checked against the tier's.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from tierkernel.backends.js_cells import runs_js
from tierkernel.backends.options import STANDARD
from tierkernel.backends.registry import discover
from tierkernel.errors import ApiError, TierUsageError
from tierkernel.magics.parsing import parse_options, split_cell
from tierkernel.runtime.policy import within_ceiling
from tierkernel.serve.models import ExecuteConfig
from tierkernel.serve.settings import FREE_OPTIONS, Ceiling


@dataclass(frozen=True)
class Cell:
    """A checked execution: its tier, the cell to send, its timeout, its language and the
    %%tier line for the cell that sets its ``context`` (the same tier, language and
    resources, so that cell runs in the same interpreter)."""

    tier: str
    text: str
    timeout: float | None
    lang: str = "python"
    context_line: str = ""


def check_tier(tier: str, ceiling: Ceiling) -> type[Any]:
    """The backend class of ``tier``; ApiError 400 when no such tier is registered, 403 when
    ``ceiling`` does not reach it."""
    classes = discover()[0]
    if tier not in classes:
        raise ApiError(400, "unknown_tier", f"unknown tier {tier!r}; tiers: "
                       f"{', '.join(sorted(classes))} (GET /tiers)")
    if tier not in ceiling.tier_names:
        raise ApiError(403, "tier_not_allowed", f"this token may not run cells in {tier!r}; "
                       f"it may in: {', '.join(ceiling.tier_names) or 'none'}")
    return classes[tier]


#: The API's language names, as ``--lang`` says them.
LANG_OPTION = {"javascript": "js", "typescript": "ts"}


def languages(backend: type[Any]) -> list[str]:
    """The languages cells of a tier (its backend class) may be written in."""
    return ["python", *LANG_OPTION] if runs_js(backend) else ["python"]


def plan(code: str, tier: str | None, config: ExecuteConfig | None, ceiling: Ceiling,
         default_tier: str, max_code_bytes: int, max_timeout: float,
         language: str = "python") -> Cell:
    """The cell for ``code`` in ``tier`` (or the one its ``%%tier`` line names, or
    ``default_tier``) with ``config``'s limits, written in ``language``; ApiError
    400/403/413 saying what is wrong."""
    size = len(code.encode("utf-8", "surrogatepass"))
    if size > max_code_bytes:
        raise ApiError(413, "code_too_large", f"the code is {size} bytes; the server runs at "
                       f"most {max_code_bytes} (c.Serve.max_code_bytes)")
    try:
        directive = split_cell(code)
    except TierUsageError as exc:
        raise ApiError(400, "invalid_tier_line", str(exc)) from None
    if directive.control:
        raise ApiError(400, "invalid_tier_line",
                       "a %tier line (or %%tier --help) runs in the kernel's own IPython, "
                       "which the API does not offer; name the tier in the request's 'tier' "
                       "field, or start the code with '%%tier NAME'")
    body, args = code, []
    if directive.has_magic:
        if directive.tier is None:
            raise ApiError(400, "invalid_tier_line", "the %%tier line names no tier")
        if tier is not None and directive.tier != tier:
            raise ApiError(400, "invalid_tier_line",
                           f"the code's %%tier line says {directive.tier!r} but the request's "
                           f"tier is {tier!r}; give one of them")
        tier, body, args = directive.tier, directive.body, directive.args
    tier = tier or default_tier
    backend = check_tier(tier, ceiling)
    specs = {spec.name: spec for spec in backend.magic_options}
    extra = _config_words(config) if config is not None else []
    if language != "python":
        if language not in languages(backend):
            raise ApiError(400, "unsupported_language",
                           f"the {tier} tier runs Python only; {language} runs in the tiers "
                           "whose GET /tiers entry lists it (wasm, sandbox)")
        extra += ["--lang", LANG_OPTION[language]]
    twice = _option_names(args) & _option_names(extra)
    if twice:
        raise ApiError(400, "invalid_option",
                       f"{', '.join(sorted(twice))} given both on the code's %%tier line and "
                       "in the request's config; give each once")
    words = [*args, *extra]
    try:
        options = parse_options(tier, words, specs, {}, {**STANDARD, **specs})
    except TierUsageError as exc:
        raise ApiError(400, "invalid_option", str(exc)) from None
    if extra_given := sorted(_option_names(words) - FREE_OPTIONS - set(ceiling.options)):
        raise ApiError(403, "option_not_allowed",
                       f"this token may not set {', '.join('--' + o for o in extra_given)} "
                       "(the configured values hold); it may set: "
                       f"{', '.join(sorted(FREE_OPTIONS | set(ceiling.options)))}")
    allowed = options.get("allow")
    if ceiling.helpers is not None and allowed is not None and (
            over := set(allowed) - set(ceiling.helpers)):
        raise ApiError(403, "helper_not_allowed",
                       f"this token may not allow {', '.join(sorted(over))}; it may allow: "
                       f"{', '.join(ceiling.helpers) or 'none'}")
    domains = options.get("domains")
    if ceiling.domains is not None and domains is not None and (
            outside := [d for d in domains if not within_ceiling(d, list(ceiling.domains))]):
        raise ApiError(403, "domain_not_allowed",
                       f"this token may not reach {', '.join(outside)}; it may reach: "
                       f"{', '.join(ceiling.domains) or 'none'}")
    timeout = options.get("timeout")
    if timeout is not None and float(timeout) > max_timeout:
        raise ApiError(400, "invalid_option", f"a timeout of {float(timeout):g} s is over the "
                       f"server's longest, {max_timeout:g} s (c.Serve.max_timeout)")
    line = " ".join(["%%tier", shlex.quote(tier), *(shlex.quote(w) for w in words)])
    kept = " ".join(["%%tier", shlex.quote(tier),
                     *(shlex.quote(w) for w in _kept(words, _CONTEXT_OPTIONS))])
    return Cell(tier, f"{line}\n{body}", float(timeout) if timeout else None,
                str(options.get("lang") or "python"), kept)


#: The options a cell's context cell takes from it: those that choose its interpreter.
_CONTEXT_OPTIONS = frozenset({"lang", "memory", "cpus", "runtime"})


def _kept(words: list[str], names: frozenset[str]) -> list[str]:
    """The ``--name value`` / ``--name=value`` words of ``words`` whose name is in ``names``."""
    kept: list[str] = []
    at = 0
    while at < len(words):
        word = words[at]
        name, equals, _ = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        takes_value = not equals and at + 1 < len(words) and not words[at + 1].startswith("--")
        if name in names:
            kept += [word, words[at + 1]] if takes_value else [word]
        at += 2 if takes_value else 1
    return kept


def _config_words(config: ExecuteConfig) -> list[str]:
    """The %%tier line options for ``config`` (its values are checked by the model)."""
    words: list[str] = []
    if config.timeout is not None:
        words += ["--timeout", repr(float(config.timeout))]
    if config.allowedAPIs is not None:
        words += ["--allow", ",".join(config.allowedAPIs) or "none"]
    if config.allowedDomains is not None:
        words += ["--domains", ",".join(config.allowedDomains)]
    return words


def _option_names(words: list[str]) -> set[str]:
    return {word[2:].partition("=")[0] for word in words if word.startswith("--")}


def context_cell(cell: Cell, context: dict[str, Any]) -> str:
    """A cell that sets the variable ``context`` where ``cell`` runs (decoded there as JSON;
    in JavaScript, ``globalThis.context``)."""
    text = json.dumps(json.dumps(context))
    if cell.lang != "python":
        return f"{cell.context_line}\nglobalThis.context = JSON.parse({text});\nundefined"
    return (f"{cell.context_line}\nimport json as _tk_json\n"
            f"context = _tk_json.loads({text})\ndel _tk_json")
