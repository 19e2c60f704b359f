"""Issue 15, reviewed as a hostile guest would use it: each new way a wasm or sandbox cell can
make the host do work is held to a host-side limit, and the kernel goes on (DESIGN.md,
convention 9)."""

from __future__ import annotations

import base64
import os
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession
from tests.package_index import make_wheel, publish, serve
from tierkernel.runtime import packages


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    session = KernelSession()
    yield session
    session.close()


def _need(tier: str) -> None:
    if tier == "sandbox":
        sb.need_sandbox()


# -- input(): a request the cell leaves unanswered ends with the cell -------------------------
#: A cell that writes an input_request line itself (as any code in the guest can) and ends
#: without waiting for the answer.
ASK_AND_LEAVE = (
    "import time\n"
    "a = __tierkernel_agent__\n"
    "a.channel.send({'type': 'input_request', 'id': a.cell_id, 'seq': -7,\n"
    "                'prompt': 'left behind: ', 'password': False})\n"
    "time.sleep(1)\n"
)

#: Counts the host threads still waiting for a user's answer (a native cell sees the kernel).
WAITING = (
    "import threading, time\n"
    "time.sleep(0.5)\n"
    "sorted(t.name for t in threading.enumerate() if t.name.endswith('-input'))"
)


@pytest.mark.parametrize("guest", ["process", "sandbox"])
def test_an_input_request_left_by_an_ended_cell_stops_waiting(kernel: KernelSession,
                                                               guest: str):
    _need(guest)
    for _ in range(3):
        left = kernel.run(f"%%tier {guest}\n{ASK_AND_LEAVE}", on_input=lambda asked: None)
        assert left.status == "ok", left.outputs
    # No host thread keeps waiting on the stdin channel for cells that are over: each would
    # take the user's next answer from whoever asks next (one per cell, without end).
    waiting = kernel.run("%%tier native\n" + WAITING)
    assert waiting.status == "ok", waiting.outputs
    assert waiting.result["text/plain"] == "[]"
    # And a native cell's input() gets its own answer.
    asked = kernel.run("%%tier native\ninput('native: ')", on_input=lambda asked: "mine",
                       timeout=20)
    assert asked.status == "ok", asked.outputs
    assert asked.result["text/plain"] == "'mine'"


# -- %pip: the folders a wheel makes on the host are counted ------------------------------------
def test_a_wheel_of_deep_folders_is_held_to_the_file_cap(tmp_path: Path):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    wheel = make_wheel(build, "tk-deep", "1.0", {"tk_deep/__init__.py": ""})
    # Few files, each at the end of its own chain of 200 folders: 1000 folders on the host
    # from a wheel of a few KiB, with 5 files against a cap of 50.
    with zipfile.ZipFile(wheel, "a") as whl:
        for i in range(5):
            whl.writestr(f"tk_deep/d{i}/" + "a/" * 200 + "x.py", "")
    publish(root, wheel)
    with serve(root) as (url, _):
        store = packages.PackageStore(
            packages.Packages(index_url=f"{url}/simple", max_files=50, cache_dir=""),
            packages.Target("wasm", True))
        try:
            answer = store.handle({"op": "install", "argv": ["tk-deep"], "python": "3.15",
                                   "installed": {}}, None, None)
            assert not answer["ok"], answer
            assert "c.Packages.max_files" in answer["error"]["message"]
            assert list(store.folder.iterdir()) == []
        finally:
            store.close()


def test_folders_count_against_the_kernels_file_cap_across_installs(tmp_path: Path):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    for n in range(3):
        publish(root, make_wheel(build, f"tk-deep{n}", "1.0",
                                 {f"tk_deep{n}/" + "a/" * 10 + "x.py": ""}))
    with serve(root) as (url, _):
        store = packages.PackageStore(
            packages.Packages(index_url=f"{url}/simple", max_files=40, cache_dir=""),
            packages.Target("wasm", True))
        try:
            results = [store.handle({"op": "install", "argv": [f"tk-deep{n}"],
                                     "python": "3.15", "installed": {}}, None, None)
                       for n in range(3)]
            # Each takes 12 folders (11 of the module, its .dist-info) and 5 files (its
            # module, METADATA, WHEEL, RECORD, INSTALLER): the third passes 40.
            assert [r["ok"] for r in results] == [True, True, False], results
            entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(store.folder))
            assert entries <= 40
        finally:
            store.close()


def _installs(store: packages.PackageStore, name: str) -> dict[str, object]:
    return store.handle({"op": "install", "argv": [name], "python": "3.15", "installed": {}},
                        None, None)


def test_clashing_files_leave_nothing_the_store_cannot_count_or_remove(tmp_path: Path):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    # tk-file has a file named 'shared'; tk-folder has its own module, then shared/m.py.
    publish(root, make_wheel(build, "tk-file", "1.0",
                             {"tk_file/__init__.py": "", "shared": ""}))
    publish(root, make_wheel(build, "tk-folder", "1.0",
                             {"tk_folder/__init__.py": "", "shared/m.py": ""}))
    dup = make_wheel(build, "tk-dup", "1.0", {"tk_dup/__init__.py": ""})
    with zipfile.ZipFile(dup, "a") as whl, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's own "Duplicate name": what is tested
        for _ in range(2):
            whl.writestr(zipfile.ZipInfo("tk_dup/twice.py"), "")
    publish(root, dup)
    with serve(root) as (url, _):
        store = packages.PackageStore(
            packages.Packages(index_url=f"{url}/simple", cache_dir=""),
            packages.Target("wasm", True))
        try:
            assert _installs(store, "tk-file")["ok"]
            clash = _installs(store, "tk-folder")
            assert not clash["ok"]
            assert "clashes with another package" in str(clash["error"]), clash
            twice = _installs(store, "tk-dup")
            assert not twice["ok"]
            assert "twice" in str(twice["error"]), twice
            removed = store.handle({"op": "uninstall", "names": ["tk-file"]}, None, None)
            assert removed["ok"], removed
            # What %pip put there is gone with its uninstall: nothing of the failed ones
            # stays, uncounted and out of reach of any uninstall.
            assert sorted(str(p.relative_to(store.folder)) for p in store.folder.rglob("*")
                          if not p.is_dir()) == []
        finally:
            store.close()


# -- %pip in sandbox: no part the host sends grows with the largest file --------------------------
def test_a_large_file_is_sent_to_the_sandbox_in_pieces_of_the_part_size(tmp_path: Path):
    from tierkernel.guest import pip_magic
    from tierkernel.guest.agent import unpack_workspace

    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    # 3 parts' worth in one file (zeros: a wheel of a few KiB). Before, the part holding it was
    # built whole, then base64- and JSON-encoded on the host: a file of a GiB, several GiB of
    # the kernel's memory.
    blob = bytes(range(256)) * ((3 * packages.PART_BYTES + 12345) // 256)
    publish(root, make_wheel(build, "tk-large", "1.0",
                             {"tk_large/__init__.py": "", "tk_large/blob.bin": blob}))
    with serve(root) as (url, _):
        store = packages.PackageStore(
            packages.Packages(index_url=f"{url}/simple", cache_dir=""),
            packages.Target("sandbox", False))
        try:
            answer = store.handle({"op": "install", "argv": ["tk-large"], "python": "3.11",
                                   "installed": {}}, None, None)
            assert answer["ok"], answer
            value = answer["value"]
            fetched = [store.handle({"op": "fetch", "token": value["token"], "part": n},
                                    None, None) for n in range(value["parts"])]
            bound = (packages.PART_BYTES + (64 << 10)) * 4 // 3
            assert all(f["ok"] and len(f["value"]["data"]) <= bound for f in fetched), [
                len(f["value"]["data"]) for f in fetched]
            # The guest puts the pieces together: through %pip's fetch, and through a new
            # container's copy of everything (the agent's unpack).
            by_fetch, by_copy = tmp_path / "by-fetch", tmp_path / "by-copy"
            for f in fetched:
                pip_magic.unpack(str(by_fetch), base64.b64decode(f["value"]["data"]))
            by_copy.mkdir()
            parts = list(store.parts())
            assert all(len(p) <= packages.PART_BYTES + (64 << 10) for p in parts)
            for part in parts:
                unpack_workspace(str(by_copy), part, [])
            for where in (by_fetch, by_copy):
                assert (where / "tk_large" / "blob.bin").read_bytes() == blob
                assert (where / "tk_large" / "__init__.py").exists()
        finally:
            store.close()


# -- the workspace never is the folder the kernel imports from ------------------------------------
PLANT = ("%%tier sandbox\n"
         "open('/workspace/tk_planted.py', 'w').write(\n"
         "    \"import os\\nos.environ['TK_PLANTED'] = 'ran on the host'\\n\")")
PLANTED_RAN = ("import os\ntry:\n    import tk_planted\nexcept ImportError:\n    pass\n"
               "os.environ.get('TK_PLANTED', 'not run')")


def test_a_file_workspace_in_the_kernels_import_folder_is_refused(tmp_path: Path):
    sb.need_sandbox()
    # A project folder used as the notebook's folder and as the workspace (data files next to
    # the notebook): python -m tierkernel imports modules from it, so a sandbox cell that
    # writes a module there would have the kernel run it at the next import of its name.
    folder = tmp_path / "project"
    folder.mkdir()
    session = KernelSession(cwd=str(folder), env=dict(os.environ,
                                                      TIERKERNEL_FSX_URL=folder.as_uri()))
    try:
        planted = session.run(PLANT, timeout=120)
        ran = session.run(PLANTED_RAN)
        assert ran.status == "ok", ran.outputs
        assert ran.result["text/plain"] == "'not run'"
        assert not (folder / "tk_planted.py").exists()
        # The sandbox cell said why it has no workspace, and what to do.
        assert planted.status == "error"
        assert "imports Python modules from" in planted.error["evalue"], planted.outputs
    finally:
        session.close()


def test_installs_never_fetched_are_not_kept_without_end(tmp_path: Path):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    publish(root, make_wheel(build, "tk-loop", "1.0", {"tk_loop/__init__.py": ""}))
    with serve(root) as (url, _):
        store = packages.PackageStore(
            packages.Packages(index_url=f"{url}/simple", cache_dir=""),
            packages.Target("sandbox", False))
        try:
            # The guest says it has nothing, so each install sends everything again, and it
            # never fetches: each answer is a list of parts the host would keep for an hour.
            tokens = []
            for _ in range(packages.MAX_PENDING + 4):
                answer = store.handle({"op": "install", "argv": ["tk-loop"], "python": "3.11",
                                       "installed": {}}, None, None)
                assert answer["ok"], answer
                tokens.append(answer["value"]["token"])
            fetched = [store.handle({"op": "fetch", "token": token, "part": 0}, None, None)
                       for token in tokens]
            assert [f["ok"] for f in fetched] == (
                [False] * 4 + [True] * packages.MAX_PENDING), fetched
        finally:
            store.close()


# -- completion: a wasm query turn that never ends -------------------------------------------------
def test_a_wasm_completion_that_never_returns_is_stopped_at_its_limit(tmp_path: Path):
    from tierkernel.backends.wasm import runtime as wasm_runtime

    if wasm_runtime.runtime_problem() is not None or not wasm_runtime.is_compiled():
        pytest.skip("the wasm runtime is not installed or not compiled: run 'tierkernel warm'")
    config = tmp_path / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text("c.WasmBackend.query_time_limit = 3\n")
    session = KernelSession(env=dict(os.environ, JUPYTER_CONFIG_DIR=str(config)))
    try:
        made = session.run("%%tier wasm\nimport IPython\nclass Spin:\n"
                           "    def __dir__(self):\n        while True:\n            pass\n"
                           "spin = Spin()", timeout=120)
        assert made.status == "ok", made.outputs
        code = "%%tier wasm\nspin."
        reply = session.kc.complete(code, len(code), reply=True, timeout=30)
        assert reply["content"]["matches"] == []  # the user's wait ends at the kernel's 1 s
        # The turn ran on a host thread with no cell's limit watching it: it burned a core
        # until some later cell's timeout stopped it. Now it is stopped at its own limit
        # (which ends the session, as any stopped wasm turn does), and the next cell runs at
        # once, in a new session, saying why the variables are gone.
        time.sleep(5)
        after = session.run("%%tier wasm --timeout 60\n'spin' in dir()", timeout=120)
        assert after.status == "ok", after.outputs
        assert after.result["text/plain"] == "False"
        assert "c.WasmBackend.query_time_limit" in after.stderr, after.outputs
    finally:
        session.close()


def test_a_slow_install_does_not_hold_up_a_new_containers_copy(tmp_path: Path):
    import socket
    import threading

    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    publish(root, make_wheel(build, "tk-have", "1.0", {"tk_have/__init__.py": "X = 1\n"}))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel's backlog, never answered
    try:
        with serve(root) as (url, _):
            store = packages.PackageStore(
                packages.Packages(index_url=f"{url}/simple", cache_dir="", timeout=20),
                packages.Target("sandbox", False))
            try:
                assert _installs(store, "tk-have")["ok"]
                # A guest's install that takes its whole c.Packages.timeout (an index that
                # never answers; or a long resolution of many packages)...
                store.config.index_url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
                slow = threading.Thread(target=_installs, args=(store, "tk-other"))
                slow.start()
                time.sleep(1)
                # ... while the container is replaced: its copy of the packages is made
                # now, not once the install gives up.
                parts = list(store.parts())
                assert slow.is_alive()
                assert len(parts) == 1
                slow.join(60)
            finally:
                store.close()
    finally:
        silent.close()
