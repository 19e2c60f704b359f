"""The runtime helpers as a cell sees them: ``ai``, ``api``, ``db`` and ``console``.

Standard library only: this module runs inside every guest (the process agent, a container,
CPython on WebAssembly) as well as in the kernel for native cells. The helpers do no work here:
each call becomes one JSON request handed to ``call``, which the tier wires to the host's broker
(``tierkernel.runtime.broker``) over its own channel, and the JSON response becomes a return
value or a re-raised exception. So a helper behaves the same in every tier::

    request  {"helper": "db", "args": {"query": "select 1 as x", "params": None}}
    response {"ok": True, "value": {"rows": [{"x": 1}], "row_count": 1, "columns": ["x"]}}
             {"ok": False, "error": {"type": "PermissionError", "message": "..."}}

Wiring a tier: ``install(namespace, call)`` puts the four names in the cell namespace, where
``call(request: dict) -> dict`` sends the request to the host and returns its response.
"""

from __future__ import annotations

import builtins
import json
import sys

# typing is not imported at run time: the sandbox agent installs this module before the first
# cell of every container, and under gVisor importing typing costs 16 ms. Annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Call = Callable[[dict[str, Any]], dict[str, Any]]

# The protocol's names: the package's module in the kernel (native cells), the guest's copy,
# loaded by the agent at its start, in a guest (see tierkernel.guest.protocol).
if TYPE_CHECKING or __package__:
    from tierkernel.guest import protocol
else:
    import tierkernel_protocol as protocol

# The exception types the host may name; anything else is raised as RuntimeError.
_ERRORS = {name: getattr(builtins, name) for name in protocol.HELPER_ERROR_TYPES}


class Result(dict):  # type: ignore[type-arg]
    """A helper's result: a dict whose keys also read as attributes (``r.rows``, ``r["rows"]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"result has no field {name!r}; fields: "
                                 f"{', '.join(self)}") from None


class APIResponse(Result):
    """What ``api()`` returns: ``status``, ``headers``, ``body`` (JSON-decoded or text), ``ok``,
    and the final ``url`` after redirects."""

    def raise_for_status(self) -> APIResponse:
        """Raise ``RuntimeError`` for a 4xx/5xx status; return the response otherwise."""
        if self["status"] >= 400:
            raise RuntimeError(f"api() {self['url']} answered {self['status']}")
        return self

    def __repr__(self) -> str:
        return f"<APIResponse {self['status']} {self['url']}>"


def ipython_traceback(exc: BaseException) -> list[str]:
    """IPython's traceback of ``exc`` without the frames at its end that hide themselves
    (``__tracebackhide__``): IPython hides such frames except the last, but when the error is
    raised by tierkernel's plumbing (a helper's answer, a cell's timeout) the user's own line
    is the one to end on. Set as an exception's ``_render_traceback_``, which IPython calls
    (a shell exists then); IPython is imported only here, never in a guest without it."""
    from IPython import get_ipython  # type: ignore[import-not-found,unused-ignore]

    shell = get_ipython()
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    while len(frames) > 1 and frames[-1].tb_frame.f_locals.get("__tracebackhide__"):
        frames.pop()
    trimmed = None
    for frame in reversed(frames):
        trimmed = type(frame)(trimmed, frame.tb_frame, frame.tb_lasti, frame.tb_lineno)
    return list(shell.InteractiveTB.structured_traceback(type(exc), exc, trimmed))


def _request(call: Call, helper: str, args: dict[str, Any]) -> Any:
    """Send one request; return its value or raise the error the host named."""
    __tracebackhide__ = True  # IPython shows the user's line, not this plumbing
    try:
        json.dumps(args)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{helper}() arguments must be JSON values (str, int, float, bool, "
                        f"None, lists and dicts of them): {exc}") from None
    response = call({"helper": helper, "args": args})
    if not isinstance(response, dict) or "ok" not in response:
        raise RuntimeError(f"{helper}(): the host sent an unreadable answer: {response!r:.200}")
    if response["ok"]:
        return response.get("value")
    error = response.get("error") or {}
    kind = _ERRORS.get(str(error.get("type")), RuntimeError)
    failure = kind(str(error.get("message", f"{helper}() failed")))
    # In IPython (native cells) the traceback ends at the user's line, not in this module.
    failure._render_traceback_ = lambda: ipython_traceback(failure)
    raise failure


class Console:
    """``console.log/info/warn/error(*args)``: print with the level shown, record in the log.

    ``log`` and ``info`` go to stdout, ``warn`` and ``error`` to stderr. The host records each
    entry in the execution's logs (``%executions ID`` shows them).
    """

    def __init__(self, call: Call) -> None:
        self._call = call

    def _emit(self, level: str, args: tuple[Any, ...], sep: str) -> None:
        __tracebackhide__ = True
        message = sep.join(str(a) for a in args)
        _request(self._call, "console", {"level": level, "message": message})
        # Looked up now, not at import: the tier redirects sys.stdout per cell.
        stream = sys.stderr if level in ("warn", "error") else sys.stdout
        print(f"[{level.upper()}] {message}", file=stream)

    def log(self, *args: Any, sep: str = " ") -> None:
        """Print and record a ``log`` entry."""
        __tracebackhide__ = True
        self._emit("log", args, sep)

    def info(self, *args: Any, sep: str = " ") -> None:
        """Print and record an ``info`` entry."""
        __tracebackhide__ = True
        self._emit("info", args, sep)

    def warn(self, *args: Any, sep: str = " ") -> None:
        """Print (to stderr) and record a ``warn`` entry."""
        __tracebackhide__ = True
        self._emit("warn", args, sep)

    def error(self, *args: Any, sep: str = " ") -> None:
        """Print (to stderr) and record an ``error`` entry."""
        __tracebackhide__ = True
        self._emit("error", args, sep)

    def __repr__(self) -> str:
        return "<console: log, info, warn, error>"


def make_helpers(call: Call) -> dict[str, Any]:
    """The four helpers bound to ``call``, as ``{"ai": ..., "api": ..., "db": ...,
    "console": ...}``."""

    def ai(model: str, input: Any) -> Result:
        """Run a model on an OpenAI-compatible endpoint configured on the host.

        ``input`` is ``{"messages": [...]}`` (chat: ``result.response`` is the text,
        ``result.raw`` the endpoint's answer), a plain string (one user message), or
        ``{"text": ...}`` (embeddings: ``result.embedding``, or ``result.embeddings`` for a
        list of texts).
        """
        __tracebackhide__ = True
        return Result(_request(call, "ai", {"model": model, "input": input}))

    def api(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            json: Any = None, data: Any = None,
            timeout: float | None = None) -> APIResponse:
        """Make an HTTP request from the host to a domain this cell is allowed to reach.

        Returns an :class:`APIResponse` (``status``, ``headers``, ``body``, ``ok``, ``url``).
        ``json=`` sends a JSON body, ``data=`` text or a form (dict).
        """
        __tracebackhide__ = True
        args: dict[str, Any] = {"url": url, "method": method}
        for key, value in (("headers", headers), ("json", json), ("data", data),
                           ("timeout", timeout)):
            if value is not None:
                args[key] = value
        return APIResponse(_request(call, "api", args))

    def db(query: Any, params: Any = None) -> Result:
        """Run SQL with bound ``params``, or a structured query such as
        ``{"select": {"from": "things", "where": {"ns": "wiki"}, "limit": 10}}``.

        Returns ``rows`` (dicts), ``row_count`` and ``columns``.
        """
        __tracebackhide__ = True
        return Result(_request(call, "db", {"query": query, "params": params}))

    return {"ai": ai, "api": api, "db": db, "console": Console(call)}


def install(namespace: dict[str, Any], call: Call) -> None:
    """Put ``ai``, ``api``, ``db`` and ``console`` into ``namespace`` (a cell's globals)."""
    namespace.update(make_helpers(call))
