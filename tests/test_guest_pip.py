"""Issue 15, packages: ``%pip install`` in the wasm and sandbox tiers, from a real package
index the tests serve on 127.0.0.1 (PEP 503 layout, wheels built here), with the wheels
fetched on the host under ``c.Packages`` and every install audited."""

from __future__ import annotations

import os
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tests.package_index import make_wheel, publish, serve
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.runtime import packages

MiB = 1024 * 1024


def _config(**settings: object) -> packages.Packages:
    """c.Packages for a test of the host side: no wheel cache unless the test gives one."""
    return packages.Packages(**{"cache_dir": "", **settings})


def _tiers() -> list[str]:
    tiers = []
    if wasm_runtime.runtime_problem() is None and wasm_runtime.is_compiled():
        tiers.append("wasm")
    if sandbox_support.status()[0] or sandbox_support.required():
        tiers.append("sandbox")
    return tiers


def _build_index(root: Path) -> None:
    build = root.parent / "build"
    build.mkdir(exist_ok=True)
    publish(root, make_wheel(build, "tk-dep", "1.0", {"tk_dep/__init__.py": "VALUE = 41\n"}))
    publish(root, make_wheel(build, "tk-pure", "2.0",
                             {"tk_pure/__init__.py": "from tk_dep import VALUE\n"
                                                     "ANSWER = VALUE + 1\n"},
                             requires=["tk-dep>=1"]))
    for name in ("tk-same-cell", "tk-gone"):
        module = name.replace("-", "_")
        publish(root, make_wheel(build, name, "0.1", {f"{module}/__init__.py": "OK = 'yes'\n"}))
    publish(root, make_wheel(build, "tk-native", "1.0",
                             {"tk_native/__init__.py": "NATIVE = True\n"},
                             tag="cp311-cp311-manylinux_2_17_x86_64"))
    # 3 MiB that do not compress: over the 2 MiB cap the kernel is given.
    publish(root, make_wheel(build, "tk-big", "1.0",
                             {"tk_big/__init__.py": "", "tk_big/blob.bin": os.urandom(3 * MiB)}))
    publish(root, make_wheel(build, "not-allowed", "1.0", {"not_allowed/__init__.py": ""}))
    publish(root, make_wheel(build, "tk-fat", "1.0",
                             {"tk_fat/__init__.py": "", "tk_fat/blob.bin": os.urandom(6 * MiB)}))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-pip")


@pytest.fixture(scope="module")
def index(home: Path) -> Iterator[tuple[str, list[str]]]:
    root = home / "index"
    _build_index(root)
    with serve(root) as served:
        yield served


def _kernel(home: Path, index_url: str, name: str, more: str = "") -> KernelSession:
    config = home / f"config-{name}"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(
        # The index answers without Content-Length (/liar/): the cap counts what arrives.
        f"c.Packages.index_url = {index_url + '/liar/simple'!r}\n"
        "c.Packages.allowed = ['tk-*']\n"
        "c.Packages.max_install_bytes = '2m'\n"
        f"c.Packages.cache_dir = {str(home / 'wheel-cache')!r}\n"
        "c.SandboxBackend.timeout = 120\nc.WasmBackend.timeout = 120\n" + more)
    return KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config),
                              "TIERKERNEL_AUDIT_LOG": str(home / f"audit-{name}.sqlite3")})


@pytest.fixture(scope="module")
def kernel(home: Path, index: tuple[str, list[str]]) -> Iterator[KernelSession]:
    session = _kernel(home, index[0], "shared")
    yield session
    session.close()


def _pip_calls(home: Path, name: str = "shared") -> list[sqlite3.Row]:
    with sqlite3.connect(home / f"audit-{name}.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT c.*, e.tier FROM helper_calls c JOIN executions e ON "
                            "e.id = c.execution_id WHERE c.helper = 'pip' "
                            "ORDER BY c.started").fetchall()


@pytest.mark.parametrize("tier", _tiers())
def test_pip_install_then_import_with_its_dependency(kernel: KernelSession, home: Path,
                                                     tier: str):
    done = kernel.run(f"%%tier {tier}\n%pip install tk-pure", timeout=120)
    assert done.status == "ok", done.outputs
    assert "Successfully installed" in done.stdout
    assert "tk-dep-1.0" in done.stdout and "tk-pure-2.0" in done.stdout
    used = kernel.run(f"%%tier {tier}\nimport tk_pure, tk_dep\nprint(tk_pure.ANSWER, "
                      "tk_dep.__file__)")
    assert used.status == "ok", used.outputs
    answer, where = used.stdout.split()
    assert answer == "42"
    assert where.startswith(packages.WASM_SITE if tier == "wasm" else packages.SANDBOX_SITE)
    if tier == "sandbox":  # processes the cells start find the packages too
        shell = kernel.run("%%tier sandbox\n!python3 -c 'import tk_pure; print(tk_pure.ANSWER)'")
        assert shell.stdout.strip() == "42", shell.outputs
    # Asked again: nothing is fetched, the guest has it.
    again = kernel.run(f"%%tier {tier}\n%pip install tk-pure")
    assert again.status == "ok", again.outputs
    assert "already satisfied" in again.stdout
    rows = [r for r in _pip_calls(home) if r["tier"] == tier and r["ok"]]
    assert any(r["target"] == "install tk-pure==2.0 tk-dep==1.0" and r["size"] > 0
               for r in rows), [dict(r) for r in rows]


@pytest.mark.parametrize("tier", _tiers())
def test_pip_install_and_import_in_the_same_cell(kernel: KernelSession, tier: str):
    done = kernel.run(f"%%tier {tier}\n%pip install tk-same-cell==0.1\n"
                      "import tk_same_cell\nprint('imported', tk_same_cell.OK)", timeout=120)
    assert done.status == "ok", done.outputs
    assert "imported yes" in done.stdout


@pytest.mark.parametrize("tier", _tiers())
def test_a_name_outside_the_allowed_list_is_refused(kernel: KernelSession, home: Path,
                                                    index: tuple[str, list[str]], tier: str):
    before = len(index[1])
    done = kernel.run(f"%%tier {tier}\n%pip install not-allowed\nprint('went on')")
    assert done.status == "error"
    assert done.error["ename"] == "PermissionError"
    assert "not-allowed" in done.error["evalue"] and "c.Packages.allowed" in done.error["evalue"]
    assert "went on" not in done.stdout
    assert not any("not-allowed" in hit or "not_allowed" in hit for hit in index[1][before:])
    refused = [r for r in _pip_calls(home) if r["tier"] == tier and not r["allowed"]]
    assert any("not-allowed" in r["target"] for r in refused), [dict(r) for r in refused]


@pytest.mark.parametrize("tier", _tiers())
def test_a_wheel_over_the_download_cap_is_refused(kernel: KernelSession, tier: str):
    done = kernel.run(f"%%tier {tier}\n%pip install tk-big")
    assert done.status == "error"
    assert "2 MiB download limit" in done.error["evalue"]
    assert "c.Packages.max_install_bytes" in done.error["evalue"]
    missing = kernel.run(f"%%tier {tier}\nimport tk_big")
    assert missing.error["ename"] == "ModuleNotFoundError"


def test_a_wheel_with_native_code_is_refused_in_wasm_and_installs_in_sandbox(
        kernel: KernelSession):
    tiers = _tiers()
    if "wasm" in tiers:
        done = kernel.run("%%tier wasm\n%pip install tk-native")
        assert done.status == "error"
        evalue = done.error["evalue"]
        assert "native code" in evalue and "%%tier sandbox" in evalue, evalue
    if "sandbox" in tiers:
        done = kernel.run("%%tier sandbox\n%pip install tk-native\nimport tk_native\n"
                          "print(tk_native.NATIVE)", timeout=120)
        assert done.status == "ok", done.outputs
        assert "True" in done.stdout


@pytest.mark.parametrize("tier", _tiers())
def test_pip_list_and_uninstall(kernel: KernelSession, tier: str):
    assert kernel.run(f"%%tier {tier}\n%pip install tk-gone", timeout=120).status == "ok"
    listed = kernel.run(f"%%tier {tier}\n%pip list")
    assert listed.status == "ok"
    assert any(line.split() == ["tk-gone", "0.1"] for line in listed.stdout.splitlines())
    gone = kernel.run(f"%%tier {tier}\n%pip uninstall -y tk-gone")
    assert gone.status == "ok", gone.outputs
    assert "Successfully uninstalled tk-gone-0.1" in gone.stdout
    missing = kernel.run(f"%%tier {tier}\nimport tk_gone")
    assert missing.error["ename"] == "ModuleNotFoundError"
    theirs = kernel.run(f"%%tier {tier}\n%pip uninstall numpy")
    assert theirs.status == "error"
    assert "not installed by %pip in this kernel" in theirs.error["evalue"]
    other = kernel.run(f"%%tier {tier}\n%pip download tk-pure")
    assert other.status == "error" and "usage" in other.error["evalue"]


def test_packages_survive_a_sandbox_container_replacement(home: Path,
                                                          index: tuple[str, list[str]]):
    sandbox_support.need_sandbox()
    session = _kernel(home, index[0], "replace")
    try:
        done = session.run("%%tier sandbox\n%pip install tk-pure\nmarker = 1", timeout=120)
        assert done.status == "ok", done.outputs
        check = "print('marker' in globals())\nimport tk_pure\nprint(tk_pure.ANSWER)"
        if "runsc" in sandbox_support.runtimes():
            # Another runtime cannot be applied in place: a new container.
            replaced = session.run(f"%%tier sandbox --runtime runsc\n{check}", timeout=120)
        else:
            pid = int(session.km.provisioner.process.pid)  # type: ignore[union-attr]
            for container in sandbox_support.containers_of(pid):
                sandbox_support.client().containers.get(container).remove(force=True)
            session.run("%%tier sandbox\n1", timeout=120)  # tells the container is gone
            replaced = session.run(f"%%tier sandbox\n{check}", timeout=120)
        assert replaced.status == "ok", replaced.outputs
        assert replaced.stdout.split() == ["False", "42"]
    finally:
        session.close()


# -- the host side, without a kernel -----------------------------------------------------------
@pytest.mark.parametrize("argv, said", [
    (["https://example.org/x.whl"], "not a package name"),
    (["-r", "requirements.txt"], "does not take '-r'"),
    (["--index-url", "http://evil/simple", "tk-pure"], "does not take '--index-url'"),
    (["./local/folder"], "not a package name"),
    (["tk-pure @ https://example.org/x.whl"], "not a package name"),
    ([], "usage"),
])
def test_install_arguments_other_than_names_are_refused(tmp_path: Path, argv: list[str],
                                                        said: str):
    store = packages.PackageStore(_config(), packages.Target("wasm", True))
    try:
        answer = store.handle({"op": "install", "argv": argv, "python": "3.15",
                               "installed": {}}, None, None)
    finally:
        store.close()
    assert not answer["ok"]
    assert said in answer["error"]["message"]


@pytest.mark.parametrize("member", ["../escape.py", "/abs.py", "pkg/../../up.py",
                                    "pkg\\..\\win.py"])
def test_a_wheel_that_writes_outside_its_folder_installs_nothing(
        tmp_path: Path, index: tuple[str, list[str]], home: Path, member: str):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    wheel = make_wheel(build, "tk-slip", "1.0", {"tk_slip/__init__.py": ""})
    with zipfile.ZipFile(wheel, "a") as whl:
        whl.writestr(member, "print('escaped')\n")
    publish(root, wheel)
    with serve(root) as (url, _):
        config = _config(index_url=f"{url}/simple")
        store = packages.PackageStore(config, packages.Target("wasm", True))
        try:
            answer = store.handle({"op": "install", "argv": ["tk-slip"], "python": "3.15",
                                   "installed": {}}, None, None)
            assert not answer["ok"]
            assert "outside its folder" in answer["error"]["message"]
            assert list(store.folder.iterdir()) == []
            assert not (store.folder.parent / "escape.py").exists()
        finally:
            store.close()


def test_file_count_and_total_size_caps(tmp_path: Path):
    root = tmp_path / "index"
    build = tmp_path / "build"
    build.mkdir()
    publish(root, make_wheel(build, "tk-many", "1.0",
                             {f"tk_many/m{i}.py": "" for i in range(30)}))
    publish(root, make_wheel(build, "tk-bomb", "1.0",
                             {"tk_bomb/__init__.py": "", "tk_bomb/zeros": b"\0" * (4 * MiB)}))
    with serve(root) as (url, _):
        store = packages.PackageStore(
            _config(index_url=f"{url}/simple", max_files=10,
                              max_total_bytes=MiB), packages.Target("wasm", True))
        try:
            many = store.handle({"op": "install", "argv": ["tk-many"], "python": "3.15",
                                 "installed": {}}, None, None)
            assert not many["ok"] and "c.Packages.max_files" in many["error"]["message"]
            # Compresses to a few KiB: the cap counts the bytes unpacked, as written.
            bomb = store.handle({"op": "install", "argv": ["tk-bomb"], "python": "3.15",
                                 "installed": {}}, None, None)
            assert not bomb["ok"] and "c.Packages.max_total_bytes" in bomb["error"]["message"]
            assert list(store.folder.iterdir()) == []
        finally:
            store.close()


# -- custom images: tierkernel image build --apt ... --pip ... ----------------------------------
def test_a_custom_image_tag_names_the_recipe_and_the_extras(capsys: pytest.CaptureFixture[str]):
    from tierkernel.backends.sandbox.extras import Extras
    from tierkernel.backends.sandbox.image import image_ref, recipe_tag
    from tierkernel.cli import main
    from tierkernel.errors import ExtrasError

    plain = image_ref()
    assert image_ref(Extras()) == plain
    custom = image_ref(Extras(apt=("python3-statsmodels",), pip=("seaborn==0.13", "tqdm")))
    assert custom.startswith(plain + "-") and custom != plain
    # The same request in another order or spelling names the same image; another one does not.
    assert image_ref(Extras(apt=("python3-statsmodels",), pip=("tqdm", "Seaborn == 0.13"))) \
        == custom
    assert image_ref(Extras(apt=("python3-statsmodels",), pip=("seaborn==0.12",))) != custom
    assert Extras(pip=("tqdm",)).tag(recipe_tag()).startswith(recipe_tag())
    for bad in ({"apt": ("x; rm -rf /",)}, {"apt": ("Upper",)},
                {"pip": ("https://example.org/x.whl",)}, {"pip": ("-r reqs.txt",)}):
        with pytest.raises(ExtrasError):
            Extras(**bad)  # type: ignore[arg-type]
    assert main(["image", "tag", "--apt", "python3-statsmodels", "--pip", "tqdm",
                 "seaborn==0.13"]) == 0
    assert capsys.readouterr().out.strip() == custom
    assert main(["image", "tag", "--apt", "x;rm"]) == 2
    assert "not a Debian package name" in capsys.readouterr().err


def test_the_extra_debian_packages_join_the_recipe_list(tmp_path: Path):
    from tierkernel.backends.sandbox.extras import Extras
    from tierkernel.backends.sandbox.image import recipe_dir

    written = Extras(apt=("python3-statsmodels", "graphviz")).packages_file(
        recipe_dir() / "packages", tmp_path / "packages")
    names = [ln for ln in written.read_text().splitlines() if ln and not ln.startswith("#")]
    assert names[:1] == ["python3"] and names[-2:] == ["graphviz", "python3-statsmodels"]


def test_wheels_are_installed_into_the_image_root(tmp_path: Path,
                                                  index: tuple[str, list[str]]):
    from tierkernel.backends.sandbox.extras import Extras

    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/lib/python3.11").mkdir(parents=True)
    debian = rootfs / "usr/lib/python3/dist-packages"
    (debian / "tk_dep-1.0.egg-info").mkdir(parents=True)  # as Debian ships its packages
    (debian / "tk_dep-1.0.egg-info/PKG-INFO").write_text(
        "Metadata-Version: 2.1\nName: tk-dep\nVersion: 1.0\n")
    lines: list[str] = []
    done = Extras(pip=("tk-pure", "tk-native"), index_url=f"{index[0]}/simple").install_wheels(
        rootfs, lines.append)
    assert sorted(done) == ["tk-native-1.0", "tk-pure-2.0"]  # tk-dep: the image has it
    site = rootfs / "usr/local/lib/python3.11/dist-packages"
    assert (site / "tk_pure/__init__.py").read_text().startswith("from tk_dep import")
    assert (site / "tk_native/__init__.py").is_file()
    assert (site / "tk_pure-2.0.dist-info/INSTALLER").read_text() == "tierkernel\n"
    assert not (site / "tk_dep").exists()
    assert any("resolving tk-pure tk-native for Python 3.11" in ln for ln in lines)
    assert any("installed" in ln and "tk-pure-2.0" in ln for ln in lines)


def test_an_image_build_keeps_the_custom_images_of_the_recipe():
    from tierkernel.backends.sandbox.engine import IMAGE_REPO
    from tierkernel.backends.sandbox.image import _remove_stale, recipe_tag

    current = f"{IMAGE_REPO}:{recipe_tag()}"
    tags = [current, f"{current}-0123456789ab", f"{IMAGE_REPO}:000000000000",
            f"{IMAGE_REPO}:000000000000-0123456789ab"]
    removed: list[str] = []

    class Image:
        def __init__(self, tag: str) -> None:
            self.tags = [tag]

    class Images:
        def list(self, name: str) -> list[Image]:
            return [Image(t) for t in tags]

        def remove(self, tag: str) -> None:
            removed.append(tag)

    class Client:
        images = Images()

    _remove_stale(Client(), f"{current}-0123456789ab", lambda line: None)
    assert removed == tags[2:]


def test_an_index_that_never_answers_ends_at_the_install_timeout(tmp_path: Path):
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are accepted by the kernel's backlog, never answered
    try:
        port = silent.getsockname()[1]
        store = packages.PackageStore(
            _config(index_url=f"http://127.0.0.1:{port}/simple", timeout=3),
            packages.Target("sandbox", False))
        try:
            started = time.monotonic()
            answer = store.handle({"op": "install", "argv": ["tk-pure"], "python": "3.11",
                                   "installed": {}}, None, None)
            assert time.monotonic() - started < 30
        finally:
            store.close()
    finally:
        silent.close()
    assert answer["error"]["type"] == "TimeoutError"
    assert "c.Packages.timeout" in answer["error"]["message"]


@pytest.mark.parametrize("args, said", [
    ({"op": "fetch", "token": "forged", "part": 0}, "no such part"),
    ({"op": "install", "argv": ["tk-pure"], "python": "3.11; rm -rf /", "installed": {}},
     "no usable Python version"),
    ({"op": "uninstall", "names": ["numpy"]}, "not installed by %pip"),
    ({"op": "shell", "argv": []}, "a pip request is"),
    ("not a dict", "a pip request is"),
])
def test_forged_pip_requests_are_refused(args: object, said: str):
    store = packages.PackageStore(_config(), packages.Target("sandbox", False))
    try:
        answer = store.handle(args, None, None)
    finally:
        store.close()
    assert not answer["ok"] and said in answer["error"]["message"]


def test_what_the_guest_lacks_is_sent_again(index: tuple[str, list[str]]):
    """A sandbox guest whose copy was cut short (an interrupted cell) reports the package
    missing: the next install of it sends its files again instead of "already satisfied"
    and nothing to import."""
    import base64
    import io
    import tarfile

    store = packages.PackageStore(_config(index_url=f"{index[0]}/simple"),
                                  packages.Target("sandbox", False))

    def install(have: dict[str, str]) -> dict[str, object]:
        answer = store.handle({"op": "install", "argv": ["tk-pure"], "python": "3.11",
                               "installed": have}, None, None)
        assert answer["ok"], answer
        return answer["value"]  # type: ignore[no-any-return]

    def sent(value: dict[str, object]) -> set[str]:
        names: set[str] = set()
        for part in range(int(value["parts"])):  # type: ignore[call-overload]
            got = store.handle({"op": "fetch", "token": value["token"], "part": part}, None,
                               None)
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(got["value"]["data"]))) as t:
                names |= set(t.getnames())
        return names

    try:
        first = install({})
        assert "tk_pure/__init__.py" in sent(first) and "tk_dep/__init__.py" in sent(
            install({}))
        again = install({"tk-dep": "1.0"})
        assert again["installed"] == [] and "already satisfied" in str(again["message"])
        names = sent(again)
        assert "tk_pure/__init__.py" in names and "tk_dep/__init__.py" not in names
        whole = install({"tk-pure": "2.0", "tk-dep": "1.0"})
        assert whole["token"] is None and whole["parts"] == 0
    finally:
        store.close()


def test_a_new_container_that_cannot_take_the_packages_still_runs_cells(
        index: tuple[str, list[str]]):
    """Packages are given to every new container; when that copy fails (its /tmp is full),
    the container is kept and the next cell says what happened and what to do."""
    from tierkernel.backends.sandbox.backend import SandboxBackend

    backend = SandboxBackend()
    store = backend._package_store()
    store.config.index_url = f"{index[0]}/simple"
    store.config.cache_dir = ""
    asked: list[dict[str, object]] = []

    class FullSession:
        def ask(self, msg: dict[str, object], timeout: float) -> dict[str, object]:
            asked.append(msg)
            return {"type": "unpacked", "error": "OSError: [Errno 28] No space left on device"}

    try:
        assert store.handle({"op": "install", "argv": ["tk-pure"], "python": "3.11",
                             "installed": {}}, None, None)["ok"]
        backend._give_packages(FullSession(), 5.0)  # type: ignore[arg-type]
        assert asked and asked[0]["root"] == packages.SANDBOX_SITE
        assert "No space left" in backend._packages_notice
        assert "run the %pip install again" in backend._packages_notice
    finally:
        backend.shutdown()
    assert not store.folder.exists()


def test_wheels_come_from_the_cache_when_another_kernel_fetched_them(
        tmp_path: Path, index: tuple[str, list[str]]):
    cache = tmp_path / "cache"

    def install() -> dict[str, object]:
        store = packages.PackageStore(_config(index_url=f"{index[0]}/simple",
                                              cache_dir=str(cache)),
                                      packages.Target("wasm", True))
        try:
            answer = store.handle({"op": "install", "argv": ["tk-pure"], "python": "3.15",
                                   "installed": {}}, None, None)
            assert answer["ok"], answer
            assert (store.folder / "tk_pure/__init__.py").is_file()
            return answer["value"]  # type: ignore[no-any-return]
        finally:
            store.close()

    first = install()
    assert first["downloaded"] == first["wheel_bytes"] > 0
    assert len(list(cache.glob("*.whl"))) == 2
    fetched = len([h for h in index[1] if h.endswith(".whl")])
    second = install()
    assert second["downloaded"] == 0 and second["wheel_bytes"] == first["wheel_bytes"]
    assert len([h for h in index[1] if h.endswith(".whl")]) == fetched
    # A damaged entry is not used: the wheel is downloaded again (and the entry replaced).
    for entry in cache.glob("*.whl"):
        entry.write_bytes(b"not the wheel")
    third = install()
    assert third["downloaded"] == first["wheel_bytes"]
    assert len([h for h in index[1] if h.endswith(".whl")]) == fetched + 2


def test_an_upgrade_replaces_the_files_of_the_older_version(tmp_path: Path):
    root, build = tmp_path / "index", tmp_path / "build"
    build.mkdir()
    publish(root, make_wheel(build, "tk-up", "1.0", {"tk_up/__init__.py": "V = 1\n",
                                                     "tk_up/old_only.py": ""}))
    with serve(root) as (url, _):
        store = packages.PackageStore(_config(index_url=f"{url}/simple"),
                                      packages.Target("sandbox", False))
        try:
            first = store.handle({"op": "install", "argv": ["tk-up"], "python": "3.11",
                                  "installed": {}}, None, None)
            assert first["ok"] and (store.folder / "tk_up/old_only.py").is_file()
            publish(root, make_wheel(build, "tk-up", "2.0", {"tk_up/__init__.py": "V = 2\n"}))
            same = store.handle({"op": "install", "argv": ["tk-up"], "python": "3.11",
                                 "installed": {"tk-up": "1.0"}}, None, None)
            assert same["ok"] and same["value"]["installed"] == []  # 1.0 satisfies "tk-up"
            up = store.handle({"op": "install", "argv": ["-U", "tk-up"], "python": "3.11",
                               "installed": {"tk-up": "1.0"}}, None, None)
            assert up["ok"], up
            assert up["value"]["installed"] == [{"name": "tk-up", "version": "2.0"}]
            assert (store.folder / "tk_up/__init__.py").read_text() == "V = 2\n"
            assert not (store.folder / "tk_up/old_only.py").exists()
            assert not (store.folder / "tk_up-1.0.dist-info").exists()
        finally:
            store.close()


def test_packages_that_do_not_fit_in_the_containers_tmp_are_a_clear_error(
        home: Path, index: tuple[str, list[str]]):
    sandbox_support.need_sandbox()
    session = _kernel(home, index[0], "small-tmp", "c.Packages.max_install_bytes = '16m'\n"
                      "c.SandboxBackend.tmpfs_size = '4m'\nc.SandboxBackend.spares = 0\n")
    try:
        done = session.run("%%tier sandbox\n%pip install tk-fat", timeout=120)
        assert done.status == "error"
        assert done.error["ename"] == "OSError"
        assert "did not fit" in done.error["evalue"]
        assert "c.SandboxBackend.tmpfs_size" in done.error["evalue"]
        after = session.run("%%tier sandbox\nprint('still here')")
        assert after.stdout.strip() == "still here"
    finally:
        session.close()


def test_what_pip_itself_fetches_while_resolving_is_capped(tmp_path: Path):
    """An index without metadata files makes pip download whole wheels to resolve: each file
    it writes is capped by the same limit."""
    root, build = tmp_path / "index", tmp_path / "build"
    build.mkdir()
    publish(root, make_wheel(build, "tk-heavy", "1.0", {"tk_heavy/__init__.py": "",
                                                        "tk_heavy/blob": os.urandom(3 * MiB)}),
            metadata=False)
    with serve(root) as (url, hits):
        store = packages.PackageStore(_config(index_url=f"{url}/simple", max_install_bytes=MiB),
                                      packages.Target("sandbox", False))
        try:
            answer = store.handle({"op": "install", "argv": ["tk-heavy"], "python": "3.11",
                                   "installed": {}}, None, None)
        finally:
            store.close()
        assert "/files/tk_heavy-1.0-py3-none-any.whl" in hits  # pip did fetch it
    assert not answer["ok"]
    message = answer["error"]["message"]
    assert "while resolving" in message and "c.Packages.max_install_bytes" in message, message
