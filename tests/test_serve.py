"""``tierkernel serve``: the HTTP execution API, as a client program sees it.

A real server (the ``tierkernel serve`` command, uvicorn) on 127.0.0.1, spoken to with httpx;
each session a real tierkernel kernel, cells in the wasm tier and in real Docker containers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Imported while the tests are collected, not mid-test: pytest rewrites the asserts of anyio
# (a package with a pytest plugin) as its modules load, and anyio loads its asyncio backend
# lazily; an ast.parse mid-test can trip a CPython 3.11 bug ("AST constructor recursion depth
# mismatch") when a garbage collection runs finalizers meanwhile (seen in CI).
import anyio._backends._asyncio  # noqa: F401  # isort: skip

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession
from tests.serve_support import ADMIN, CLI, MAIN, NARROW, Server, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("serve"))
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.stop()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """A client with the main token; every session of every token is ended afterwards."""
    with server.client() as client:
        yield client
    for token in (MAIN, ADMIN, NARROW):
        with server.client(token) as other:
            for session in other.get("/sessions").json():
                other.delete(f"/sessions/{session['id']}")


def execute(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/execute", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_request_without_an_accepted_token_is_refused(server: Server):
    for token in (None, "not-a-token-of-this-server"):
        with server.client(token) as client:
            response = client.post("/execute", json={"code": "1", "tier": "wasm"})
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"] == "unauthorized"
    # The schema and its documentation need none.
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_without_tokens_it_refuses_a_public_address_and_says_why(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "TIERKERNEL_TOKEN"}
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path)  # no config file: no tokens
    done = subprocess.run([CLI, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0: no token is configured" in done.stderr


def test_a_one_shot_wasm_execution_answers_with_its_outputs(api: httpx.Client):
    result = execute(api, code="print('hello')\nimport sys\nprint('oops', file=sys.stderr)\n"
                     "6 * 7", tier="wasm")
    assert result["success"] is True and result["tier"] == "wasm"
    assert result["stdout"] == "hello\n" and result["stderr"] == "oops\n"
    assert result["output"][-1] == {"output_type": "execute_result",
                                    "data": {"text/plain": "42"}, "metadata": {},
                                    "execution_count": 1}
    assert result["execution_id"] and result["error"] is None
    # One-shot: the session is gone.
    assert api.get(f"/sessions/{result['session']}").status_code == 404
    # Its record, for this token only.
    record = api.get(f"/executions/{result['execution_id']}").json()
    assert record["tier"] == "wasm" and record["status"] == "ok"
    assert "6 * 7" in record["code"]


@pytest.mark.parametrize("tier", ["wasm", "sandbox"])
def test_javascript_and_typescript_with_a_context_as_the_origin_document_sends_them(
        api: httpx.Client, tier: str):
    """The code-exec origin's request: a function body in JavaScript or TypeScript, with the
    ``context`` it reads and the helpers it awaits."""
    if tier == "sandbox":
        sb.need_sandbox()
    result = execute(api, code="const who: string = context.user;\nconsole.log('for', who);\n"
                     "const r = await db('SELECT 6 * 7 AS n');\nreturn `${who}: ${r.rows[0].n}`",
                     language="typescript", tier=tier, context={"user": "john"})
    assert result["success"] is True, result["error"]
    assert result["stdout"] == "for john\n"
    assert result["output"][-1]["data"]["text/plain"] == '"john: 42"'
    own_line = execute(api, code=f"%%tier {tier} --lang js\nreturn context.user",
                       context={"user": "ann"})  # the language said by the code's own line
    assert own_line["output"][-1]["data"]["text/plain"] == '"ann"', own_line["error"]
    session = api.post("/sessions", json={"tier": tier}).json()["id"]
    execute(api, code="let total = 40;", language="javascript", session=session)
    later = execute(api, code="total + 2", language="javascript", session=session)
    assert later["output"][-1]["data"]["text/plain"] == "42"
    python = execute(api, code="1 + 1", session=session)  # the same session runs Python too
    assert python["output"][-1]["data"]["text/plain"] == "2"
    refused = api.post("/execute", json={"code": "1", "tier": "process",
                                         "language": "javascript"})
    assert refused.status_code in (400, 403)
    tiers = {row["name"]: row["languages"] for row in api.get("/tiers").json()}
    assert "typescript" in tiers[tier] and tiers["native"] == ["python"]
    assert api.get("/languages").json() == ["python", "javascript", "typescript"]


def test_an_error_in_the_cell_is_the_result_not_an_http_error(api: httpx.Client):
    result = execute(api, code="1 / 0", tier="wasm")
    assert result["success"] is False
    assert result["error"]["ename"] == "ZeroDivisionError"
    assert result["output"][-1]["output_type"] == "error"


def test_a_session_keeps_state_and_streams_output_as_it_happens(api: httpx.Client):
    session = api.post("/sessions", json={"tier": "sandbox"})
    assert session.status_code == 201, session.text
    sid = session.json()["id"]
    assert execute(api, code="x = context['n'] * 2", session=sid,
                   context={"n": 21})["success"]
    seen: list[tuple[float, str, dict[str, Any]]] = []
    started = time.monotonic()
    body = {"code": "import time\nprint('first', flush=True)\ntime.sleep(1.5)\n"
                    "print('second')\nx", "session": sid}
    with api.stream("POST", "/execute/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((time.monotonic() - started, kind, json.loads(line[6:])))
    kinds = [kind for _, kind, _ in seen]
    assert kinds == ["stream", "stream", "result", "done"], seen
    assert seen[0][2] == {"name": "stdout", "text": "first\n"}
    # The first line came while the cell still slept.
    assert seen[1][0] - seen[0][0] > 1.0
    done = seen[-1][2]
    assert done["success"] and done["tier"] == "sandbox"
    assert done["output"][-1]["data"] == {"text/plain": "42"}
    listed = [s["id"] for s in api.get("/sessions").json()]
    assert listed == [sid]
    assert api.delete(f"/sessions/{sid}").status_code == 204
    assert api.get(f"/sessions/{sid}").status_code == 404


def test_a_plot_comes_back_as_a_png_mime_bundle(api: httpx.Client):
    result = execute(api, tier="sandbox", code="import matplotlib\nmatplotlib.use('agg')\n"
                     "import matplotlib.pyplot as plt\nfrom IPython.display import display\n"
                     "fig = plt.figure()\nplt.plot([1, 3, 2])\ndisplay(fig)")
    assert result["success"], result
    images = [o for o in result["output"] if "image/png" in o.get("data", {})]
    assert images and images[0]["output_type"] == "display_data"


def test_the_token_ceiling_holds_whatever_the_request_or_the_code_says(server: Server,
                                                                         api: httpx.Client):
    for body in ({"code": "1", "tier": "native"}, {"code": "%%tier native\n1"},
                 {"code": "%%tier process\n1"}):
        response = api.post("/execute", json=body)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "tier_not_allowed"
    # A %tier line would run in the kernel's own IPython.
    response = api.post("/execute", json={"code": "%tier native\nimport os", "tier": "wasm"})
    assert response.status_code == 400
    # The kernel itself refuses other tiers: a %%tier line inside the body is the guest's.
    result = execute(api, code="%%tier wasm\n%%tier native\nimport os", tier="wasm")
    assert result["success"] is False
    with server.client(NARROW) as narrow:
        for config, error in (({"allowedAPIs": ["api"]}, "helper_not_allowed"),
                              ({"allowedDomains": ["example.org"]}, "domain_not_allowed")):
            response = narrow.post("/execute", json={"code": "1", "tier": "wasm",
                                                     "config": config})
            assert response.status_code == 403 and response.json()["error"] == error
        response = narrow.post("/execute", json={"code": "%%tier wasm --allow ai\n1"})
        assert response.status_code == 403
        # Its kernel is given the ceiling too: console is all a cell may call.
        result = execute(narrow, code="api('https://api.github.com/')", tier="wasm")
        assert result["success"] is False
        assert "not allowed in this kernel" in result["error"]["evalue"], result["error"]
    with server.client(ADMIN) as admin:
        assert execute(admin, code="import os\nos.getpid() > 0", tier="native")["success"]


def test_bad_requests_get_a_json_error_that_says_what_to_fix(api: httpx.Client):
    cases = [
        (api.post("/execute", content=b"{not json", headers={"content-type":
                                                             "application/json"}), 422),
        (api.post("/execute", json={"code": 1}), 422),
        (api.post("/execute", json={"code": "1", "tier": "wasm", "colour": "red"}), 422),
        (api.post("/execute", json={"code": "1", "tier": "nowhere"}), 400),
        (api.post("/execute", json={"code": "x" * 3000, "tier": "wasm"}), 413),
        (api.post("/execute", content=b"{" + b" " * (70 * 1024) + b"}",
                  headers={"content-type": "application/json"}), 413),
        (api.post("/execute", json={"code": "1", "tier": "wasm", "language": "cobol"}), 422),
        (api.post("/execute", json={"code": "1", "session": "0123456789abcdef"}), 404),
        (api.post("/execute", json={"code": "%%tier wasm --colour red\n1"}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert set(body) == {"error", "message"} and body["message"], body
    assert "colour" in cases[2][0].json()["message"]
    assert "nowhere" in cases[3][0].json()["message"]
    # The server carries on.
    assert execute(api, code="1 + 1", tier="wasm")["success"]


def test_validate_checks_without_running(api: httpx.Client):
    code = "%%tier sandbox --timeout 5\nprint(1)"
    ok = api.post("/validate", json={"code": code}).json()
    assert ok == {"valid": True, "tier": "sandbox", "errors": [], "size": len(code),
                  "limit": 2000}
    bad = api.post("/validate", json={"code": "1", "tier": "native"}).json()
    assert bad["valid"] is False and "may not run cells in 'native'" in bad["errors"][0]
    assert api.get("/sessions").json() == []  # nothing started


def test_sessions_are_capped_with_a_clear_429(api: httpx.Client):
    made = []
    for _ in range(3):
        response = api.post("/sessions", json={"tier": "wasm"})
        assert response.status_code == 201, response.text
        made.append(response.json()["id"])
    over = api.post("/sessions", json={"tier": "wasm"})
    assert over.status_code == 429 and "at most 3 sessions" in over.json()["message"]
    assert api.post("/execute", json={"code": "1", "tier": "wasm"}).status_code == 429
    api.delete(f"/sessions/{made[0]}")
    assert api.post("/sessions", json={"tier": "wasm"}).status_code == 201


def test_a_busy_session_says_so_and_can_be_interrupted(api: httpx.Client):
    sid = api.post("/sessions", json={"tier": "wasm"}).json()["id"]
    running = threading.Event()
    events: list[tuple[str, str]] = []

    def stream() -> None:
        body = {"code": "import time\nprint('looping', flush=True)\nwhile True:\n"
                        "    time.sleep(0.05)", "session": sid}
        with api.stream("POST", "/execute/stream", json=body) as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, line[6:]))
                    running.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert running.wait(60), "the cell did not start"
    assert api.get(f"/sessions/{sid}").json()["busy"] is True
    second = api.post("/execute", json={"code": "1", "session": sid})
    assert second.status_code == 409 and second.json()["error"] == "session_busy"
    assert api.post(f"/sessions/{sid}/interrupt").status_code == 204
    worker.join(60)
    assert events[-1][0] == "done", events
    result = json.loads(events[-1][1])
    assert result["success"] is False and result["error"]["ename"] == "KeyboardInterrupt"
    assert execute(api, code="2 + 2", session=sid)["output"][-1]["data"]["text/plain"] == "4"


def test_output_past_the_limit_is_dropped_and_said(api: httpx.Client):
    result = execute(api, tier="wasm", code="for i in range(2000):\n    print('x' * 100)")
    assert result["truncated"] is True
    assert len(result["stdout"]) <= 64 * 1024


def test_a_token_sees_only_its_own_sessions_and_executions(server: Server,
                                                           api: httpx.Client):
    sid = api.post("/sessions", json={"tier": "wasm"}).json()["id"]
    mine = execute(api, code="'secret'", session=sid)["execution_id"]
    with server.client(ADMIN) as other:
        assert other.get("/sessions").json() == []
        assert other.get(f"/sessions/{sid}").status_code == 404
        assert other.post("/execute", json={"code": "1", "session": sid}).status_code == 404
        assert other.get(f"/executions/{mine}").status_code == 404
        assert mine not in [e["id"] for e in other.get("/executions").json()["executions"]]
    page = api.get("/executions", params={"limit": 5}).json()
    assert mine in [e["id"] for e in page["executions"]]


def test_stopping_the_server_ends_every_session_and_its_container(tmp_path: Path):
    before = sorted(Path(tempfile.gettempdir()).glob("tierkernel-serve-*"))
    server = Server(tmp_path)
    with server.client() as api:
        sids = [api.post("/sessions", json={"tier": "sandbox"}).json()["id"] for _ in range(2)]
        for sid in sids:
            assert execute(api, code="1", session=sid)["success"]
    assert server.stop() == 0

    def only_waiting_spares() -> bool:
        from tierkernel.backends.sandbox import spares

        waiting = {c.id for c in spares.list_spares(sb.client())
                   if spares.claimer(spares.folder_of(c)) is None}
        return set(sb.all_sandbox_containers()) <= waiting

    assert sb.wait_for(only_waiting_spares, 30), sb.all_sandbox_containers()
    # Nor its own folder (the kernelspec, the sessions' workspaces).
    assert sorted(Path(tempfile.gettempdir()).glob("tierkernel-serve-*")) == before


def test_workspace_files_go_up_and_down_and_each_session_has_its_own(server: Server,
                                                                      api: httpx.Client):
    first = api.post("/sessions", json={"tier": "wasm"}).json()["id"]
    second = api.post("/sessions", json={"tier": "sandbox"}).json()["id"]
    put = api.put(f"/sessions/{first}/files/data/in.csv", content=b"a,b\n1,2\n")
    assert put.status_code == 204, put.text
    assert api.put(f"/sessions/{first}/files/data/in.csv", params={"append": "true"},
                   content=b"3,4\n").status_code == 204
    result = execute(api, session=first, code="import pandas as pd\n"
                     "df = pd.read_csv('/workspace/data/in.csv')\n"
                     "df.b.sum()\n"
                     "open('/workspace/out.txt', 'w').write(str(len(df)))")
    assert result["success"], result
    assert api.get(f"/sessions/{first}/files/out.txt").content == b"2"
    listing = api.get(f"/sessions/{first}/files", params={"path": "/data"}).json()
    assert listing == [{"name": "in.csv", "kind": "file", "size": 12}]
    # Another session of the same token: a workspace of its own.
    assert api.get(f"/sessions/{second}/files/out.txt").status_code == 404
    elsewhere = execute(api, session=second,
                        code="import os\nos.path.exists('/workspace/out.txt')")
    assert elsewhere["output"][-1]["data"]["text/plain"] == "False"
    missing = api.get(f"/sessions/{first}/files/nothing/here")
    assert missing.status_code == 404 and "no file or folder" in missing.json()["message"]
    assert api.get(f"/sessions/{first}/files/data").status_code == 400  # a folder
    too_big = api.put(f"/sessions/{first}/files/big.bin", content=b"x" * (70 * 1024))
    assert too_big.status_code == 413
    with server.client(ADMIN) as other:
        assert other.get(f"/sessions/{first}/files/out.txt").status_code == 404
        assert other.put(f"/sessions/{first}/files/x", content=b"1").status_code == 404


def mcp_calls(connect: Any) -> dict[str, Any]:
    """Run the tools through the MCP SDK's own client over ``connect()`` (a transport's
    context manager); what each call gave."""
    import anyio
    from mcp import ClientSession

    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with connect() as streams, ClientSession(streams[0], streams[1]) as client:
            await client.initialize()
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            first = await client.call_tool("run_code", {"code": "x = 41\nprint('hi')",
                                                        "tier": "wasm", "session": "s"})
            seen["first"] = first.structuredContent
            seen["second"] = (await client.call_tool(
                "run_code", {"code": "x + 1", "session": "s"})).structuredContent
            await client.call_tool("write_file", {"session": "s", "path": "/in.txt",
                                                  "content": "from mcp"})
            seen["read_back"] = (await client.call_tool(
                "run_code", {"code": "open('/workspace/in.txt').read()",
                             "session": "s"})).structuredContent
            await client.call_tool("run_code", {"code": "open('/workspace/out.txt', 'w')"
                                                ".write('from a cell')", "session": "s"})
            seen["file"] = (await client.call_tool(
                "read_file", {"session": "s", "path": "/out.txt"})).structuredContent
            seen["listing"] = (await client.call_tool(
                "list_files", {"session": "s"})).structuredContent
            native = await client.call_tool("run_code", {"code": "1", "tier": "native"})
            seen["native"] = (native.isError, native.content[0].text)
            seen["tiers"] = (await client.call_tool("list_tiers", {})).structuredContent
            seen["executions"] = (await client.call_tool(
                "list_executions", {"limit": 3})).structuredContent

    anyio.run(scenario)
    return seen


def check_mcp(seen: dict[str, Any]) -> None:
    assert {"run_code", "list_tiers", "list_files", "read_file", "write_file",
            "list_executions"} <= set(seen["tools"])
    assert seen["first"]["success"] and seen["first"]["stdout"] == "hi\n"
    assert seen["second"]["output"][-1]["data"] == {"text/plain": "42"}  # the same session
    assert seen["read_back"]["output"][-1]["data"] == {"text/plain": "'from mcp'"}
    assert seen["file"]["text"] == "from a cell"
    assert {e["name"] for e in seen["listing"]["result"]} == {"in.txt", "out.txt"}
    assert seen["native"][0] is True and "may not run cells in 'native'" in seen["native"][1]
    allowed = {t["name"] for t in seen["tiers"]["result"] if t["allowed"]}
    assert allowed == {"wasm", "sandbox"}
    assert len(seen["executions"]["executions"]) == 3


def test_the_mcp_tools_over_stdio_with_the_sdk_client(tmp_path: Path):
    from mcp.client.stdio import StdioServerParameters, stdio_client

    env = {k: v for k, v in os.environ.items() if k != "TIERKERNEL_TOKEN"}
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path)
    params = StdioServerParameters(command=CLI, args=["mcp"], env=env, cwd=str(tmp_path))
    check_mcp(mcp_calls(lambda: stdio_client(params)))


def test_the_mcp_tools_over_streamable_http_with_the_sdk_client(server: Server,
                                                                 api: httpx.Client):
    from mcp.client.streamable_http import streamable_http_client

    assert httpx.post(server.url + "/mcp", json={}).status_code == 401

    def connect() -> Any:
        client = httpx.AsyncClient(headers={"Authorization": f"Bearer {MAIN}"}, timeout=120)
        return streamable_http_client(server.url + "/mcp", http_client=client)

    check_mcp(mcp_calls(connect))


def shape(outputs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """What a reader sees of a cell's outputs, with digits (pids, timings) masked."""
    def mask(text: str) -> str:
        return re.sub(r"\d+", "#", text)

    seen: list[tuple[str, ...]] = []
    for output in outputs:
        kind = output["output_type"]
        if kind == "stream":
            # Consecutive chunks of one stream are one output, as a notebook keeps them.
            if seen and seen[-1][:2] == (kind, output["name"]):
                seen[-1] = (kind, output["name"], seen[-1][2] + mask(output["text"]))
            else:
                seen.append((kind, output["name"], mask(output["text"])))
        elif kind == "error":
            seen.append((kind, output["ename"]))
        else:
            data = output["data"]
            seen.append((kind, *sorted(data), mask(str(data.get("text/plain", "")))))
    return seen


def test_the_tours_cells_give_over_http_what_they_give_in_the_notebook(server: Server,
                                                                       tmp_path: Path):
    tour = json.loads((Path(__file__).parent.parent / "notebooks" / "tour.ipynb").read_text())
    cells = ["".join(c["source"]) for c in tour["cells"] if c["cell_type"] == "code"]
    # A %tier line runs in the kernel's own IPython, which the API does not offer.
    cells = [c for c in cells if not c.startswith("%tier")]
    kernel = KernelSession(env={**os.environ, "TIERKERNEL_FSX_URL": "sqlite://"
                                + str(tmp_path / "ws.db")})
    try:
        in_notebook = []
        for code in cells:
            out = kernel.run(code, timeout=120)
            in_notebook.append(shape([{"output_type": o.msg_type, **o.content}
                                      for o in out.outputs if o.msg_type in (
                                          "stream", "display_data", "execute_result",
                                          "error")]))
    finally:
        kernel.close()
    with server.client(ADMIN) as admin:
        sid = admin.post("/sessions", json={"tier": "native"}).json()["id"]
        over_http = []
        for code in cells:
            answer = admin.post("/execute", json={"code": code, "session": sid})
            if answer.status_code == 400:  # refused before running: an unknown tier
                over_http.append([("error", "TierUsageError")])
                continue
            over_http.append(shape(answer.json()["output"]))
        admin.delete(f"/sessions/{sid}")
    differ = [(code.splitlines()[0], there, here)
              for code, there, here in zip(cells, in_notebook, over_http, strict=True)
              if here != there]
    assert differ == [], differ


def test_every_request_is_recorded_with_its_token_and_status(server: Server,
                                                            api: httpx.Client):
    assert api.get("/languages").status_code == 200
    with server.client("wrong-token-00000000000000") as stranger:
        assert stranger.get("/tiers").status_code == 401
    lines = [json.loads(line) for line in server.requests.read_text().splitlines()]
    assert {"method": "GET", "path": "/languages", "status": 200, "token": "env"}.items() \
        <= lines[-2].items()
    assert lines[-1]["path"] == "/tiers" and lines[-1]["status"] == 401
    assert lines[-1]["token"] is None and lines[-1]["client"] == "127.0.0.1"


def test_a_kernel_that_dies_ends_its_session_with_a_clear_error(server: Server):
    with server.client(ADMIN) as admin:
        sid = admin.post("/sessions", json={"tier": "native"}).json()["id"]
        answer = admin.post("/execute", json={"code": "import os\nos._exit(3)",
                                               "session": sid})
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"] == "kernel_died"
        assert admin.get(f"/sessions/{sid}").status_code == 404
        assert execute(admin, code="1 + 1", tier="native")["success"]  # the server goes on


def test_an_idle_session_is_ended(tmp_path: Path):
    server = Server(tmp_path, extra="c.Serve.idle_timeout = 2\n")
    try:
        with server.client() as api:
            sid = api.post("/sessions", json={"tier": "wasm"}).json()["id"]
            assert execute(api, code="1", session=sid)["success"]
            assert sb.wait_for(lambda: api.get(f"/sessions/{sid}").status_code == 404, 30)
    finally:
        server.stop()


def test_resource_options_keep_their_configured_values(api: httpx.Client):
    # --runtime, --memory, --cpus: only a token whose ceiling lists them may set them (a
    # default token could otherwise leave gVisor for runc, or lift the memory limit).
    for code in ("%%tier sandbox --runtime runc\n1", "%%tier sandbox --memory 64g\n1",
                 "%%tier wasm --memory 4g\n1", "%%tier sandbox --cpus 64\n1"):
        answer = api.post("/execute", json={"code": code})
        assert answer.status_code == 403, (code, answer.text)
        assert answer.json()["error"] == "option_not_allowed"
        checked = api.post("/validate", json={"code": code}).json()
        assert checked["valid"] is False and "may not set --" in checked["errors"][0]
    # A default token's cells call console and db only, and api() reaches no host.
    for config in ({"allowedAPIs": ["ai"]}, {"allowedDomains": ["example.org"]}):
        answer = api.post("/execute", json={"code": "1", "tier": "wasm", "config": config})
        assert answer.status_code == 403, answer.text
    # GET /tiers shows the limits the sessions' kernels are configured with.
    wasm = next(t for t in api.get("/tiers").json() if t["name"] == "wasm")
    assert "timeout=45s" in wasm["detail"], wasm


def test_a_chunked_body_over_the_limit_gets_413(api: httpx.Client):
    sid = api.post("/sessions", json={"tier": "wasm"}).json()["id"]

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    for method, path in (("PUT", f"/sessions/{sid}/files/big.bin"), ("POST", "/execute")):
        answer = api.request(method, path, content=chunks(),
                             headers={"content-type": "application/octet-stream"})
        assert answer.status_code == 413, (path, answer.text)
        assert answer.json()["error"] == "body_too_large"
    assert execute(api, code="1 + 1", session=sid)["success"]  # the server goes on


def test_a_clients_code_is_not_kept_in_the_servers_ipython_history(api: httpx.Client):
    import sqlite3

    marker = "history-marker-7f3a9c"
    assert execute(api, code=f"'{marker}'", tier="wasm")["success"]
    history = Path(os.environ.get("IPYTHONDIR", Path.home() / ".ipython")) / \
        "profile_default" / "history.sqlite"
    if history.exists():
        with sqlite3.connect(history) as db:
            rows = db.execute("SELECT count(*) FROM history WHERE source LIKE ?",
                              (f"%{marker}%",)).fetchone()
        assert rows == (0,)


def test_a_sessions_limits_hold_for_each_of_its_executions(api: httpx.Client):
    refused = api.post("/sessions", json={"tier": "wasm", "config": {"allowedAPIs": ["ai"]}})
    assert refused.status_code == 403 and refused.json()["error"] == "helper_not_allowed"
    made = api.post("/sessions", json={"tier": "wasm", "config": {"timeout": 2}})
    assert made.status_code == 201 and made.json()["config"]["timeout"] == 2
    sid = made.json()["id"]
    started = time.monotonic()
    looped = execute(api, code="while True:\n    pass", session=sid)
    assert looped["error"]["ename"] == "TimeoutError", looped["error"]
    assert "2 s limit" in looped["error"]["evalue"]
    # An execution's own config overrides the session's, field by field.
    slept = execute(api, code="import time\ntime.sleep(3)\n'slept'", session=sid,
                    config={"timeout": 10})
    assert slept["success"], slept["error"]
    assert time.monotonic() - started < 60
