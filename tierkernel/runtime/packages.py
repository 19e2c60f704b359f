"""``%pip`` for the sandboxed tiers: wheels fetched on the host, under a package-index policy.

A wasm guest has no pip and no network, and a sandbox container has no network, so a cell's
``%pip install NAME`` becomes one helper request (``{"helper": "pip", "args": {"op":
"install", ...}}``, see ``tierkernel/guest/pip_magic.py``) that the tier hands to a
:class:`PackageStore` on the host:

1. The request is checked against :class:`Packages` (``c.Packages``): which names, which index.
   Only names with version specifiers are taken (no URLs, paths, ``-r`` files or index options).
2. The host venv's pip resolves it in a throwaway folder as a subprocess: ``pip install
   --dry-run --report --only-binary=:all:`` for the guest's interpreter and platform (wasm:
   pure-Python wheels only). Wheels only, so no package code runs on the host. The guest's
   installed distributions are shown to pip as stub ``.dist-info`` folders, so what the guest
   already has at a satisfying version is not fetched again. Each file pip writes is capped
   (RLIMIT_FSIZE) and the whole run is timed.
3. The wheels are downloaded by the host (http/https only), counted while they stream (a
   Content-Length is never trusted), checked against the hashes the index gave, and unpacked
   (no path may leave the folder; files and bytes counted while written) into the kernel's
   package folder for that tier.
4. The guest sees that folder: the wasm session mounts it read-only at ``/packages`` (on
   ``sys.path``); a sandbox container gets the new files in parts over the agent channel
   (``op: fetch``) into ``/tmp/tierkernel-site``, and all of them again whenever its container
   is replaced, so packages survive a ``--runtime`` change or a crash within the kernel.

Every install and uninstall is a row in the audit log's ``helper_calls`` (helper ``pip``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from traitlets import Float, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from tierkernel.errors import PackageError
from tierkernel.guest import protocol
from tierkernel.runtime.audit import AuditLog, HelperCall, folded_start
from tierkernel.sizes import ByteSize

log = logging.getLogger(__name__)

#: The sandbox guest's package folder (in its writable /tmp; see guest/packages.py).
SANDBOX_SITE = "/tmp/tierkernel-site"
#: Where the wasm session mounts the kernel's package folder (read-only).
WASM_SITE = "/packages"
#: Bytes of files per part sent to a sandbox guest (one helper answer, or one unpack request);
#: a larger file is sent in pieces of this size, so no part (nor the host's copies of it while
#: it is encoded and sent) grows with the largest file a wheel holds.
PART_BYTES = 4 << 20
#: The PAX header of a piece of a file that does not start at its beginning: the offset at
#: which the guest writes it into the file the earlier pieces began.
OFFSET_HEADER = "TIERKERNEL.offset"
#: The most distributions a guest may report as installed (a stub folder each, on the host).
MAX_REPORTED = 5000
#: Installs whose parts a sandbox guest may still fetch (the newest are kept).
MAX_PENDING = 8
#: The longest project page read to explain a refusal (native-only wheels).
MAX_PAGE_BYTES = 4 << 20

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_SPEC = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT = re.compile(
    rf"^(?P<name>{_NAME})\s*(?P<extras>\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\])?"
    rf"\s*(?P<spec>{_SPEC}(?:\s*,\s*{_SPEC})*)?$")
_VERSION = re.compile(r"^[A-Za-z0-9.+!_-]{1,64}$")


def is_requirement(text: str) -> bool:
    """Whether ``text`` is a name with optional extras and version specifiers (nothing else:
    no URL, path or marker)."""
    return len(text) <= 200 and _REQUIREMENT.match(text.strip()) is not None


def normalize(name: str) -> str:
    """A project name as PEP 503 compares them (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class Packages(LoggingConfigurable):
    """The package-index policy of ``%pip`` in the wasm and sandbox tiers (``c.Packages``).

    The default lets a cell install any project from PyPI: the wheels are fetched and unpacked
    by the host (never built or run there) and land only in that kernel's own sandbox, where
    the user could paste the same code into a cell anyway. A course or exam platform that
    wants a fixed set names it in ``allowed`` (or sets ``allowed = []`` to turn %pip off), or
    points ``index_url`` at its own mirror.
    """

    index_url = Unicode(
        "https://pypi.org/simple",
        help="The package index (PEP 503 'simple' API) %pip resolves and downloads from.",
    ).tag(config=True)
    allowed = List(
        Unicode(), ["*"],
        help="Project names %pip may install, as patterns ('*': any; 'scikit-*'); an empty "
        "list turns %pip off. The dependencies of an allowed project come with it (they are "
        "named by its own metadata, not by the cell).",
    ).tag(config=True)
    max_install_bytes = ByteSize(
        256 << 20,
        help="Bytes of wheels one %pip install may download (counted as they arrive).",
    ).tag(config=True)
    max_total_bytes = ByteSize(
        1 << 30,
        help="Bytes of unpacked files all %pip installs of one kernel may hold, per tier.",
    ).tag(config=True)
    max_files = Int(
        50_000, min=1,
        help="Unpacked files and folders all %pip installs of one kernel may hold, per tier "
        "(a folder counts once for each package that has files in it).",
    ).tag(config=True)
    timeout = Float(
        300.0, min=1.0,
        help="Seconds one %pip install may take on the host (resolving and downloading); the "
        "cell's own --timeout applies too.",
    ).tag(config=True)
    cache_dir = Unicode(
        "~/.cache/tierkernel/wheels",
        help="Folder of downloaded wheels kept for later installs by any kernel of this user, "
        "named by their sha256 and checked again when used ('' turns the cache off).",
    ).tag(config=True)
    cache_max_bytes = ByteSize(
        1 << 30,
        help="Bytes of wheels the cache keeps; the least recently used go first (0: no "
        "cache).",
    ).tag(config=True)
    pip_args = List(
        Unicode(), [],
        help="Extra options for the host's pip when it resolves (e.g. ['--cert', "
        "'/etc/ssl/certs/ca.pem'] or ['--proxy', 'http://proxy:3128']); pip runs --isolated, "
        "so pip.conf and PIP_* variables are not read.",
    ).tag(config=True)

    def check_allowed(self, name: str) -> None:
        """Raise PermissionError-kind :class:`PackageError` unless ``name`` may be installed."""
        norm = normalize(name)
        if any(fnmatchcase(norm, normalize(p) if p != "*" else "*") for p in self.allowed):
            return
        if not self.allowed:
            raise PackageError("%pip is turned off for this kernel (c.Packages.allowed is "
                               "empty); ask the administrator", "PermissionError")
        raise PackageError(
            f"{name!r} is not in the packages this kernel may install "
            f"(c.Packages.allowed: {', '.join(self.allowed)}); ask the administrator to add "
            "it, or use a custom sandbox image ('tierkernel image build --pip NAME')",
            "PermissionError")


@dataclass(frozen=True)
class Target:
    """What a tier's guest can load: pure-Python wheels only (wasm), or CPython wheels for
    the host's machine (a sandbox container runs on the host's CPU and Debian's glibc)."""

    tier: str
    pure_only: bool
    #: glibc of the sandbox image (Debian bookworm's).
    glibc: tuple[int, int] = (2, 36)

    def pip_options(self, python: str) -> list[str]:
        """pip's target options for a guest running Python ``python`` (``3.11``)."""
        if self.pure_only:
            return ["--implementation", "py", "--abi", "none", "--platform", "any",
                    "--python-version", python]
        arch = platform.machine() or "x86_64"
        platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(self.glibc[1], 16, -1)]
        platforms += [f"manylinux2014_{arch}"]
        if arch in ("x86_64", "i686"):
            platforms += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        options = ["--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
                   "--python-version", python]
        for name in platforms:
            options += ["--platform", name]
        return options

    def accepts(self, wheel: str) -> bool:
        """Whether a wheel file name's tags can run in this guest (the host's own check of
        what pip chose)."""
        parts = wheel[:-4].split("-") if wheel.endswith(".whl") else []
        if len(parts) < 5:
            return False
        abis, platforms = parts[-2].split("."), parts[-1].split(".")
        if self.pure_only:
            return "none" in abis and "any" in platforms
        return True


@dataclass
class _Installed:
    name: str
    version: str
    files: list[str]  # relative to the store's folder
    #: Folders its files are in, counted against c.Packages.max_files with them.
    folders: int = 0


#: One piece of a file in a part: (path relative to the store's folder, offset, length).
Piece = tuple[str, int, int]


@dataclass
class _Pending:
    parts: list[list[Piece]]
    created: float = field(default_factory=time.monotonic)


class PackageStore:
    """One tier's packages in one kernel: a host folder, what it holds, and the requests.

    ``folder`` is what the guest sees (mounted, or copied in). Thread-safe: one install at a
    time.
    """

    def __init__(self, config: Packages, target: Target) -> None:
        self.config = config
        self.target = target
        self.folder = Path(tempfile.mkdtemp(prefix=f"tierkernel-packages-{target.tier}-"))
        os.chmod(self.folder, 0o755)
        self._installed: dict[str, _Installed] = {}
        self._files = 0
        self._bytes = 0
        self._pending: dict[str, _Pending] = {}
        #: Guards the store's state (what is installed, the counts, the pending parts).
        self._lock = threading.Lock()
        #: Held through one whole install (see _install).
        self._install_lock = threading.Lock()

    # -- requests ---------------------------------------------------------------------------
    def handle(self, args: Any, audit: AuditLog | None, execution_id: str | None) -> dict[str, Any]:
        """Answer one guest request (``args`` of ``{"helper": "pip", "args": ...}``) in the
        broker's answer shape; installs and uninstalls are audited under ``execution_id``."""
        ops = (protocol.PIP_INSTALL, protocol.PIP_FETCH, protocol.PIP_UNINSTALL)
        if not isinstance(args, dict) or args.get("op") not in ops:
            return _error("ValueError", "a pip request is {'op': "
                          f"{' | '.join(repr(op) for op in ops)}, ...}}")
        op = args["op"]
        if op == protocol.PIP_FETCH:
            try:
                return {"ok": True, "value": self._fetch(args)}
            except PackageError as exc:
                return _error(exc.kind, str(exc))
        started, clock = time.time(), time.perf_counter()
        target, ok, allowed, error_text, size = f"{op}", False, True, None, 0
        try:
            if op == protocol.PIP_INSTALL:
                value = self._install(args)
                target = "install " + " ".join(f"{p['name']}=={p['version']}"
                                               for p in value["installed"])
                size = int(value.get("wheel_bytes", 0))
            else:
                value = self._uninstall(args)
                target = "uninstall " + " ".join(value["removed"])
            ok = True
            return {"ok": True, "value": value}
        except PackageError as exc:
            allowed = exc.kind != "PermissionError"
            error_text = str(exc)
            requested = args.get("argv")
            if isinstance(requested, list):
                target = f"{op} " + folded_start(" ".join(str(a) for a in requested[:50]))
            return _error(exc.kind, error_text)
        except Exception as exc:  # a bug guard: the cell gets an error, the kernel lives on
            log.exception("%%pip %s failed", op)
            error_text = f"%pip {op} failed: {type(exc).__name__}: {exc}"
            return _error("RuntimeError", error_text)
        finally:
            if audit is not None:
                audit.helper_call(execution_id, HelperCall(
                    protocol.PIP, target, allowed, ok, error_text, started,
                    round((time.perf_counter() - clock) * 1000, 3), size))

    def parts(self) -> Iterator[bytes]:
        """Every file the store holds, as tar archives of about :data:`PART_BYTES` each (for
        a new sandbox container), made one at a time as they are taken."""
        with self._lock:
            files = [f for inst in self._installed.values() for f in inst.files]
            groups = _groups(self.folder, files)
        for group in groups:
            yield self._tar(group)

    def close(self) -> None:
        """Remove the folder (the backend shuts down)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- install ----------------------------------------------------------------------------
    def _install(self, args: dict[str, Any]) -> dict[str, Any]:
        argv = args.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise PackageError("install takes a list of arguments", "ValueError")
        requirements, flags = _parse_install(argv)
        for req in requirements:
            self.config.check_allowed(_REQUIREMENT.match(req).group("name"))  # type: ignore[union-attr]
        python = str(args.get("python", ""))
        if not re.fullmatch(r"3\.\d{1,2}", python):
            raise PackageError(f"the guest reported no usable Python version ({python!r:.40})",
                               "ValueError")
        installed = _reported(args.get("installed"))
        deadline = time.monotonic() + self.config.timeout
        # One install at a time, under its own lock: resolving and downloading may take
        # c.Packages.timeout, and the store's state lock must stay free meanwhile (a new
        # container's copy of the packages, a fetch of another install's parts).
        with self._install_lock, tempfile.TemporaryDirectory(prefix="tierkernel-pip-") as work:
            with self._lock:
                # Ours count as installed whatever the guest says; those it does not have (a
                # copy an interrupted cell left unfinished) are sent again with this install.
                resend = [inst for key, inst in self._installed.items()
                          if installed.get(key) != (inst.name, inst.version)]
                for inst in self._installed.values():
                    installed[normalize(inst.name)] = (inst.name, inst.version)
            plan = self._resolve(Path(work), requirements, flags, python, installed, deadline)
            wheels, downloaded, wheel_bytes = (self._download(Path(work), plan, deadline)
                                               if plan else ([], 0, 0))
            written = self._unpack_all(Path(work), wheels)
        with self._lock:
            resend = [inst for inst in resend if inst not in written
                      and self._installed.get(normalize(inst.name)) is inst]
        message = "" if plan else "Requirement already satisfied: " + ", ".join(requirements)
        token, parts = None, 0
        if not self.target.pure_only and (written or resend):
            token = uuid.uuid4().hex
            groups = _groups(self.folder, [f for inst in written + resend for f in inst.files])
            with self._lock:
                # Installs whose parts the guest never fetched are forgotten after an hour,
                # and past MAX_PENDING the oldest go: a guest that installs in a loop without
                # fetching must not grow the host's list of parts without end.
                kept = [(k, v) for k, v in self._pending.items()
                        if time.monotonic() - v.created < 3600]
                self._pending = dict(kept[-(MAX_PENDING - 1):])
                self._pending[token] = _Pending(groups)
            parts = len(groups)
        return {"installed": [{"name": i.name, "version": i.version} for i in written],
                "downloaded": downloaded, "wheel_bytes": wheel_bytes,
                "files": sum(len(i.files) for i in written),
                "token": token, "parts": parts, "message": message}

    def _resolve(self, work: Path, requirements: list[str], flags: list[str], python: str,
                 installed: dict[str, tuple[str, str]], deadline: float) -> list[dict[str, Any]]:
        """pip's plan (the report's ``install`` entries) for ``requirements``."""
        stub = work / "env"
        stub.mkdir()
        try:
            import pip
        except ImportError as exc:
            raise PackageError("%pip needs pip in the kernel's Python environment (the host "
                               "resolves packages with it); install pip there") from exc
        (stub / "pip").symlink_to(Path(pip.__file__).parent)
        for name, version in installed.values():
            info = stub / f"{name.replace('-', '_')}-{version}.dist-info"
            with contextlib.suppress(OSError):
                info.mkdir()
                (info / "METADATA").write_text(
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        report = work / "report.json"
        cap = self.config.max_install_bytes
        # First, in the child (not a preexec_fn: the kernel has threads): no file pip writes
        # may pass the download cap; then pip, seeing only the stub environment.
        code = ("import resource, sys; cap = int(sys.argv.pop(1)); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap)); "
                "sys.path.insert(0, sys.argv.pop(1)); "
                "from pip._internal.cli.main import main; sys.exit(main())")
        command = [sys.executable, "-S", "-c", code, str(cap), str(stub), "install",
                   "--isolated",
                   "--dry-run", "--report", str(report), "--quiet", "--no-cache-dir",
                   "--no-input", "--disable-pip-version-check", "--no-color",
                   "--only-binary=:all:",
                   "--index-url", self.config.index_url, *self.target.pip_options(python),
                   *self.config.pip_args, *flags, "--", *requirements]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
        env.update(HOME=str(work), TMPDIR=str(work))
        left = deadline - time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, cwd=work,
                                    start_new_session=True)
        except OSError as exc:
            raise PackageError(f"could not start pip on the host: {exc}") from exc
        try:
            _, err = proc.communicate(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise PackageError(
                f"resolving {' '.join(requirements)} took longer than "
                f"{self.config.timeout:g} s (c.Packages.timeout)", "TimeoutError") from None
        # Python ignores SIGXFSZ: pip's write fails with EFBIG, which it reports.
        if proc.returncode == -signal.SIGXFSZ or b"[Errno 27]" in err:
            raise PackageError(
                f"pip fetched a file larger than the {_size(cap)} limit of one install while "
                "resolving (c.Packages.max_install_bytes)", "ValueError")
        if proc.returncode != 0:
            raise self._explain(err.decode("utf-8", "replace"), requirements)
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            raise PackageError(f"pip gave no readable plan: {exc}") from exc
        plan = []
        for item in data.get("install", []):
            meta = item.get("metadata") or {}
            name, version = str(meta.get("name", "")), str(meta.get("version", ""))
            have = installed.get(normalize(name))
            if have is not None and have[1] == version:
                continue  # the guest has it already (pip was shown it; a guard)
            plan.append(item)
        return plan

    def _explain(self, stderr: str, requirements: list[str]) -> PackageError:
        """The error for a failed resolution, in the user's terms."""
        stderr = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
        lines = [ln.strip() for ln in stderr.splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        detail = "\n".join(lines[-8:])[-2000:] or "pip failed"
        missing = re.search(r"No matching distribution found for (\S+)", stderr)
        if missing and self.target.pure_only:
            name = re.split(r"[<>=!~\[;]", missing.group(1))[0]
            native = self._native_only(name)
            if native:
                return PackageError(
                    f"{name} has no pure-Python wheel (py3-none-any) for the wasm tier, only "
                    f"wheels with native code (e.g. {native}); WebAssembly can load only "
                    f"pure-Python packages: install and use it in a %%tier sandbox cell",
                    "ValueError")
        if missing:
            return PackageError(f"no wheel of {missing.group(1)} fits the {self.target.tier} "
                                f"tier (from {self.config.index_url}; %pip installs wheels "
                                f"only, never builds from source):\n{detail}", "LookupError")
        return PackageError(f"pip could not resolve {' '.join(requirements)}:\n{detail}",
                            "RuntimeError")

    def _native_only(self, name: str) -> str | None:
        """A wheel of ``name`` on the index with native code, if it has only such wheels."""
        url = f"{self.config.index_url.rstrip('/')}/{normalize(name)}/"
        # Deferred for kernel start-up time: httpx takes ~50 ms to import, only %pip needs it.
        import httpx

        from tierkernel.runtime import network

        try:
            with httpx.Client(timeout=30, follow_redirects=True,
                              verify=network.tls_context()) as client, \
                    client.stream("GET", url) as response:
                page = b""
                for chunk in response.iter_bytes():
                    page += chunk
                    if len(page) > MAX_PAGE_BYTES:
                        break
        except httpx.HTTPError:
            return None
        wheels = re.findall(r"([A-Za-z0-9._+!-]+\.whl)", page.decode("utf-8", "replace"))
        if not wheels or any(Target("wasm", True).accepts(w) for w in wheels):
            return None
        return str(wheels[-1])

    def _download(self, work: Path, plan: list[dict[str, Any]],
                  deadline: float) -> tuple[list[tuple[dict[str, Any], Path]], int, int]:
        """Each planned wheel, fetched (or taken from the cache) and checked; the bytes
        downloaded, and the bytes of all the wheels (those from the cache count against the
        cap too)."""
        cap = self.config.max_install_bytes
        total = downloaded = 0
        wheels: list[tuple[dict[str, Any], Path]] = []
        folder = work / "wheels"
        folder.mkdir()
        import httpx  # deferred for kernel start-up time (see _native_only)

        from tierkernel.runtime import network

        with httpx.Client(follow_redirects=True, timeout=30,
                          verify=network.tls_context()) as client:
            for item in plan:
                info = item.get("download_info") or {}
                url = str(info.get("url", ""))
                parts = urlsplit(url)
                name = PurePosixPath(unquote(parts.path)).name
                if parts.scheme not in ("http", "https") or not name.endswith(".whl"):
                    raise PackageError(f"the index offered {url[:200]!r}: %pip downloads only "
                                       "wheels over http(s)", "ValueError")
                if not self.target.accepts(name) or "/" in name or name.startswith("."):
                    raise PackageError(f"{name} cannot run in the {self.target.tier} tier "
                                       "(only pure-Python wheels can)", "ValueError")
                hashes = (info.get("archive_info") or {}).get("hashes") or {}
                digest = str(hashes.get("sha256", "")).lower() or None
                path = folder / name

                def take(chunks: Iterator[bytes], name: str = name, path: Path = path) -> str:
                    """Write ``chunks`` to ``path``, counted against the caps; their sha256."""
                    nonlocal total
                    sha = hashlib.sha256()
                    with path.open("wb") as out:
                        for chunk in chunks:
                            total += len(chunk)
                            if total > cap:
                                raise PackageError(
                                    f"the wheels of this install passed the {_size(cap)} "
                                    f"download limit (at {name}); raise "
                                    "c.Packages.max_install_bytes", "ValueError")
                            if time.monotonic() > deadline:
                                raise PackageError(
                                    f"downloading took longer than {self.config.timeout:g} s "
                                    "(c.Packages.timeout)", "TimeoutError")
                            sha.update(chunk)
                            out.write(chunk)
                    return sha.hexdigest()

                before = total
                cached = self._cached(digest)
                if cached is not None:
                    with cached.open("rb") as source:
                        if take(iter(lambda: source.read(1 << 16), b"")) == digest:
                            with contextlib.suppress(OSError):
                                os.utime(cached)  # recently used: evicted last
                            wheels.append((item, path))
                            continue
                    total = before  # a damaged cache entry: dropped, downloaded instead
                    with contextlib.suppress(OSError):
                        cached.unlink()
                try:
                    with client.stream("GET", url) as response:
                        if response.status_code != 200:
                            raise PackageError(f"{url} answered {response.status_code}")
                        got = take(response.iter_bytes(1 << 16))
                except httpx.HTTPError as exc:
                    raise PackageError(f"downloading {name} failed: {exc}",
                                       "ConnectionError") from exc
                if digest is not None and got != digest:
                    raise PackageError(f"{name}: its sha256 is not the one the index gave; "
                                       "nothing was installed", "ValueError")
                downloaded += total - before
                self._cache(digest, path)
                wheels.append((item, path))
        return wheels, downloaded, total

    # -- the wheel cache shared by the kernels of a user --------------------------------------
    def _cache_dir(self) -> Path | None:
        folder = self.config.cache_dir
        return Path(folder).expanduser() if folder and self.config.cache_max_bytes else None

    def _cached(self, digest: str | None) -> Path | None:
        """The cached wheel of sha256 ``digest``, if there is one (checked when read)."""
        folder = self._cache_dir()
        if folder is None or digest is None or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return None
        path = folder / f"{digest}.whl"
        return path if path.is_file() else None

    def _cache(self, digest: str | None, wheel: Path) -> None:
        """Keep a verified wheel for later installs (any kernel of this user), then drop the
        least recently used ones past c.Packages.cache_max_bytes. Best effort."""
        folder = self._cache_dir()
        if folder is None or digest is None or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = folder / f".{digest}.{uuid.uuid4().hex}"
            shutil.copyfile(wheel, partial)
            os.replace(partial, folder / f"{digest}.whl")
            entries = sorted(((p.stat().st_mtime, p.stat().st_size, p)
                              for p in folder.glob("*.whl")), reverse=True)
            kept = 0
            for _, size, path in entries:
                kept += size
                if kept > self.config.cache_max_bytes:
                    path.unlink()
        except OSError as exc:
            log.warning("could not keep a wheel in the cache %s: %s", folder, exc)

    def _unpack_all(self, work: Path, wheels: list[tuple[dict[str, Any], Path]]
                    ) -> list[_Installed]:
        """Unpack into a staging folder (counted), then move into the store's folder."""
        staging = work / "staging"
        staging.mkdir()
        files_left = self.config.max_files - self._files
        bytes_left = self.config.max_total_bytes - self._bytes
        result: list[_Installed] = []
        for item, path in wheels:
            meta = item.get("metadata") or {}
            name, version = str(meta.get("name", "")), str(meta.get("version", ""))
            files, folders, size = _unpack(path, staging, files_left, bytes_left)
            files_left -= len(files) + folders
            bytes_left -= size
            result.append(_Installed(name, version, files, folders))
        with self._lock:
            self._move_in(staging, result)
        return result

    def _move_in(self, staging: Path, result: list[_Installed]) -> None:
        """Replace older versions of ``result`` by what is staged (under the state lock)."""
        # Replaced versions go first (their files, as this store wrote them).
        for inst in result:
            old = self._installed.pop(normalize(inst.name), None)
            if old is not None:
                self._remove(old)
        for inst in result:
            # A package whose file clashes with another's (a file where the other has a
            # folder, the same file in two wheels of one install) is taken out again, so no
            # file is left in the folder that the store does not count and cannot remove.
            moved = _Installed(inst.name, inst.version, [], inst.folders)
            try:
                for rel in inst.files:
                    source, target = staging / rel, self.folder / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
                    moved.files.append(rel)
                    self._bytes += target.stat().st_size
            except OSError as exc:
                self._files += len(moved.files) + moved.folders
                self._remove(moved)
                raise PackageError(
                    f"{inst.name} {inst.version}: a file of it clashes with another package's "
                    f"({exc.strerror or exc}); it was not installed", "ValueError") from None
            self._files += len(inst.files) + inst.folders
            self._installed[normalize(inst.name)] = inst

    def _remove(self, inst: _Installed) -> None:
        for rel in inst.files:
            path = self.folder / rel
            with contextlib.suppress(OSError):
                self._bytes -= path.stat().st_size
                path.unlink()
                self._files -= 1
        for rel in _folders(inst.files):
            with contextlib.suppress(OSError):
                (self.folder / rel).rmdir()  # only when empty
        self._files -= inst.folders

    # -- fetch and uninstall ----------------------------------------------------------------
    def _fetch(self, args: dict[str, Any]) -> dict[str, Any]:
        token, index = args.get("token"), args.get("part")
        with self._lock:
            pending = self._pending.get(token) if isinstance(token, str) else None
            if pending is None or not isinstance(index, int) or not 0 <= index < len(
                    pending.parts):
                raise PackageError("no such part of an install", "ValueError")
            group = pending.parts[index]
            if index == len(pending.parts) - 1:
                del self._pending[token]  # type: ignore[arg-type]
            data = self._tar(group)
        return {"data": base64.b64encode(data).decode("ascii")}

    def _tar(self, pieces: list[Piece]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, offset, length in pieces:
                path = self.folder / rel
                if not path.is_file():
                    continue
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read(length)
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = len(data), 0o644
                    info.mtime = os.fstat(handle.fileno()).st_mtime
                if offset:
                    info.pax_headers = {OFFSET_HEADER: str(offset)}
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def _uninstall(self, args: dict[str, Any]) -> dict[str, Any]:
        names = args.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str)
                                                                for n in names):
            raise PackageError("uninstall takes the names of packages", "ValueError")
        with self._lock:
            missing = [n for n in names if normalize(n) not in self._installed]
            if missing:
                raise PackageError(
                    f"{', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not "
                    f"installed by %pip in this kernel; packages of the {self.target.tier} "
                    "tier itself cannot be uninstalled", "LookupError")
            removed, files = [], []
            for name in names:
                inst = self._installed.pop(normalize(name))
                self._remove(inst)
                removed.append(f"{inst.name}-{inst.version}")
                files += inst.files
        return {"removed": removed, "files": files}


class PackageRoute:
    """A cell's helper route with ``pip`` requests answered by a :class:`PackageStore`; every
    other request goes on to ``inner`` (the broker's route). Keeps the inner route's
    ``refuse`` (see ``AgentSession._admit``)."""

    def __init__(self, inner: Callable[[dict[str, Any]], dict[str, Any]] | None,
                 store: PackageStore, audit: AuditLog | None,
                 execution_id: str | None) -> None:
        self.inner = inner
        self.store = store
        self.audit = audit
        self.execution_id = execution_id
        refuse = getattr(inner, "refuse", None)
        if refuse is not None:
            self.refuse = refuse

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("helper") == protocol.PIP:
            return self.store.handle(request.get("args"), self.audit, self.execution_id)
        if self.inner is None:
            return _error("RuntimeError", "ai/api/db/console are not available here (no kernel "
                          "runtime for this cell)")
        return self.inner(request)


def route(inner: Callable[[dict[str, Any]], dict[str, Any]] | None,
          store: PackageStore | None) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``inner`` with ``pip`` requests going to ``store`` (audited where ``inner`` is)."""
    if store is None:
        return inner
    broker = getattr(inner, "broker", None)
    context = getattr(inner, "context", None)
    return PackageRoute(inner, store, getattr(broker, "audit", None),
                        getattr(context, "execution_id", None))


# -- helpers ----------------------------------------------------------------------------------
_FLAGS_TAKEN = {"-U": "--upgrade", "--upgrade": "--upgrade", "--no-deps": "--no-deps",
                "--pre": "--pre", "--force-reinstall": "--force-reinstall"}
_FLAGS_IGNORED = {"-q", "--quiet", "-v", "--verbose", "--user", "--no-cache-dir",
                  "--disable-pip-version-check", "-y", "--yes", "--no-input"}


def _parse_install(argv: list[str]) -> tuple[list[str], list[str]]:
    """(requirements, pip flags) of ``%pip install ARGS``; anything else is refused."""
    requirements, flags = [], []
    for arg in argv:
        if arg in _FLAGS_TAKEN:
            flags.append(_FLAGS_TAKEN[arg])
        elif arg in _FLAGS_IGNORED or re.fullmatch(r"-q+|-v+", arg):
            continue
        elif arg.startswith("-"):
            raise PackageError(
                f"%pip install does not take {arg!r} here: the index and its options are set "
                "by the kernel (c.Packages); give package names, optionally with versions "
                "(NAME, NAME==1.2, 'NAME>=1,<2'), and -U/--upgrade, --no-deps or --pre",
                "ValueError")
        else:
            if not is_requirement(arg):
                raise PackageError(
                    f"{arg[:200]!r} is not a package name with optional version "
                    "specifiers; URLs, paths and requirement files are not installed by %pip "
                    "here", "ValueError")
            requirements.append(arg.strip())
    if not requirements:
        raise PackageError("usage: %pip install NAME[==VERSION] ...", "ValueError")
    if len(requirements) > 100:
        raise PackageError("%pip install takes at most 100 packages at once", "ValueError")
    return requirements, sorted(set(flags))


def _reported(value: Any) -> dict[str, tuple[str, str]]:
    """The guest's installed distributions, as pip may be shown them (bad entries dropped)."""
    out: dict[str, tuple[str, str]] = {}
    if not isinstance(value, dict):
        return out
    for name, version in list(value.items())[:MAX_REPORTED]:
        if (isinstance(name, str) and isinstance(version, str) and len(name) <= 100
                and re.fullmatch(_NAME, name) and _VERSION.match(version)):
            out[normalize(name)] = (name, version)
    return out


def _safe_member(name: str) -> str | None:
    """The path a wheel member lands at, relative to the package folder, or None to skip
    it (a ``.data`` folder other than purelib/platlib). Raises for a path that would leave
    the folder."""
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise PackageError(f"a wheel holds a file at {name[:200]!r}, outside its folder; "
                           "nothing was installed", "ValueError")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or not parts:
        raise PackageError(f"a wheel holds a file at {name[:200]!r}, outside its folder; "
                           "nothing was installed", "ValueError")
    if parts[0].endswith(".data"):
        if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            return "/".join(parts[2:])
        return None  # scripts, headers, data: nothing a cell imports
    return "/".join(parts)


def _unpack(wheel: Path, into: Path, files_left: int,
            bytes_left: int) -> tuple[list[str], int, int]:
    """Extract ``wheel`` into ``into``: (the files written, relative; the folders made for
    them; their bytes). Counts what it writes, never what the archive says: a folder is an
    entry on the host's disk too (a wheel of a few KiB could name files at the end of
    thousands of folders each)."""
    written: list[str] = []
    taken: set[str] = set()
    folders: set[str] = set()
    size = 0
    try:
        with zipfile.ZipFile(wheel) as whl:
            for info in whl.infolist():
                if info.is_dir():
                    continue
                rel = _safe_member(info.filename)
                if rel is None:
                    continue
                if rel in taken:
                    raise PackageError(f"{wheel.name} holds {rel[:200]!r} twice; nothing was "
                                       "installed", "ValueError")
                taken.add(rel)
                new = {str(p) for p in PurePosixPath(rel).parents if str(p) != "."} - folders
                if len(written) + len(folders) + len(new) >= files_left:
                    raise PackageError(
                        "the packages would hold more files and folders than this kernel's "
                        "limit (c.Packages.max_files)", "ValueError")
                folders |= new
                target = into / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with whl.open(info) as source, target.open("wb") as out:
                    while chunk := source.read(1 << 16):
                        size += len(chunk)
                        if size > bytes_left:
                            raise PackageError(
                                "the packages would take more than this kernel's "
                                f"{_size(bytes_left)} left of room for them "
                                "(c.Packages.max_total_bytes)", "ValueError")
                        out.write(chunk)
                written.append(rel)
            dist = next((r for r in written if r.count("/") == 1
                         and r.endswith(".dist-info/RECORD")), None)
            if dist is not None:
                installer = str(PurePosixPath(dist).parent / "INSTALLER")
                (into / installer).write_text("tierkernel\n")
                written.append(installer)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackageError(f"{wheel.name} is not a readable wheel: {exc}", "ValueError") from exc
    return written, len(folders), size


def _groups(folder: Path, files: list[str]) -> list[list[Piece]]:
    """``files`` in groups of about :data:`PART_BYTES`; a larger file is cut into pieces of
    that size, in order, each in a group of its own."""
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for rel in files:
        try:
            length = (folder / rel).stat().st_size
        except OSError:
            continue
        offset = 0
        while True:
            piece = min(length - offset, PART_BYTES)
            weight = piece + 1024
            if current and size + weight > PART_BYTES:
                groups.append(current)
                current, size = [], 0
            current.append((rel, offset, piece))
            size += weight
            offset += piece
            if offset >= length:
                break
    if current:
        groups.append(current)
    return groups


def _folders(files: list[str]) -> list[str]:
    """Every folder ``files`` are in (relative), deepest first."""
    folders = {str(parent) for f in files for parent in PurePosixPath(f).parents
               if str(parent) != "."}
    return sorted(folders, key=lambda f: f.count("/"), reverse=True)


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message}}
