"""``ai(model, input)``: an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server).

``{"messages": [...]}`` (or a plain string, taken as one user message) goes to
``/chat/completions`` and returns ``{"response": text, "raw": <the endpoint's JSON>}``;
``{"text": "..." | [...]}`` goes to ``/embeddings`` and returns ``{"embedding": [...]}`` for
one text or ``{"embeddings": [[...], ...]}`` for a list, with ``model`` and ``usage``. Other keys
of ``input`` (``temperature``, ``max_tokens``, ...) are passed through to the endpoint. The API
key is added here, on the host; a cell never sees it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tierkernel.runtime.api import read_capped

NOT_CONFIGURED = (
    "ai() has no endpoint configured. Point it at any OpenAI-compatible API with "
    "c.Runtime.ai_base_url in a jupyter config file (e.g. ~/.jupyter/jupyter_config.py: "
    "c.Runtime.ai_base_url = 'http://localhost:11434/v1' for Ollama, "
    "'https://api.openai.com/v1' with c.Runtime.ai_api_key for OpenAI), or set "
    "$TIERKERNEL_AI_BASE_URL (and $TIERKERNEL_AI_API_KEY) before starting Jupyter"
)


@dataclass(frozen=True)
class AiOutcome:
    """A finished ai() call: the JSON-able value for the cell, and what the audit records."""

    value: dict[str, Any]
    target: str


def _endpoint_error(response: httpx.Response, raw: bytes) -> str:
    try:
        detail = json.loads(raw)
        if isinstance(detail, Mapping) and isinstance(detail.get("error"), Mapping):
            return str(detail["error"].get("message") or detail["error"])
        if isinstance(detail, Mapping) and "error" in detail:
            return str(detail["error"])
    except ValueError:
        pass
    return raw.decode("utf-8", "replace")[:500]


def infer(
    client: httpx.Client,
    base_url: str,
    api_key: str,
    timeout: float,
    max_bytes: int,
    model: Any,
    payload: Any,
) -> AiOutcome:
    """Call the endpoint for one ai() call; raise a clear error for bad input or failure."""
    if not base_url:
        raise RuntimeError(NOT_CONFIGURED)
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"ai() needs a model name as its first argument (e.g. 'gpt-4o-mini', "
                         f"'llama3.2'), got {model!r}")
    if isinstance(payload, str):
        payload = {"messages": [{"role": "user", "content": payload}]}
    if not isinstance(payload, Mapping) or ("messages" in payload) == ("text" in payload):
        raise ValueError("ai() input is {'messages': [{'role': 'user', 'content': ...}]} for "
                         "a chat completion, {'text': ...} for embeddings, or a plain string")
    extra = {k: v for k, v in payload.items() if k not in ("messages", "text", "model")}
    if "messages" in payload:
        if not isinstance(payload["messages"], list) or not payload["messages"]:
            raise ValueError("ai(): 'messages' must be a non-empty list of "
                             "{'role': ..., 'content': ...} dicts")
        path, body = "/chat/completions", {"model": model, "messages": payload["messages"],
                                           **extra}
    else:
        text = payload["text"]
        if not (isinstance(text, str) or (isinstance(text, list) and text and
                                          all(isinstance(t, str) for t in text))):
            raise ValueError("ai(): 'text' must be a string or a non-empty list of strings")
        path, body = "/embeddings", {"model": model, "input": text, **extra}
    url = base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    try:
        with client.stream("POST", url, json=body, headers=headers,
                           timeout=httpx.Timeout(timeout)) as response:
            raw = read_capped(response, max_bytes, deadline, timeout, url, "ai",
                              "ai_max_response_bytes")
    except httpx.TimeoutException:
        raise TimeoutError(f"ai() {model!r} took longer than {timeout:g} s "
                           "(c.Runtime.ai_timeout)") from None
    except httpx.TransportError as exc:
        raise ConnectionError(f"ai() cannot reach {url}: {exc or type(exc).__name__} "
                              "(check c.Runtime.ai_base_url)") from None
    if response.status_code >= 400:
        raise RuntimeError(f"ai() {model!r}: the endpoint answered {response.status_code}: "
                           f"{_endpoint_error(response, raw)}")
    try:
        result = json.loads(raw)
    except ValueError:
        raise RuntimeError(f"ai() {model!r}: the endpoint at {url} did not return JSON") from None
    target = f"{model} {path.lstrip('/')}"
    try:
        if path == "/chat/completions":
            message = result["choices"][0]["message"]
            return AiOutcome({"response": message.get("content") or "", "raw": result}, target)
        vectors = [item["embedding"] for item in result["data"]]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"ai() {model!r}: unexpected response from {url}: "
                           f"{raw[:300].decode('utf-8', 'replace')}") from None
    value: dict[str, Any] = ({"embedding": vectors[0]} if isinstance(payload["text"], str)
                             else {"embeddings": vectors})
    value.update(model=result.get("model", model), usage=result.get("usage"))
    return AiOutcome(value, target)
