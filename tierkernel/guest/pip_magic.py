"""``%pip`` inside a guest (wasm or sandbox): the magic asks the host, which fetches wheels.

Standard library only. The guest has no network: ``%pip install NAME`` sends one helper
request ``{"helper": "pip", "args": {"op": "install", "argv", "python", "installed"}}`` to the
host (``tierkernel/runtime/packages.py``), which resolves and downloads under the kernel's
package policy and unpacks the wheels into the kernel's package folder for this tier. Then:

- wasm: that folder is mounted read-only at the site folder; the new files are there already;
- sandbox: the answer names parts (tar archives) that the magic fetches one helper call at a
  time and unpacks into the site folder (in the container's writable /tmp).

Either way the import caches are invalidated, so ``import NAME`` works in the same cell.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import shlex
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Call = Callable[[dict[str, Any]], dict[str, Any]]

# The protocol's names: the package's module in the kernel, the guest's copy, loaded by the
# agent at its start, in a guest (see tierkernel.guest.protocol).
if TYPE_CHECKING or __package__:
    from tierkernel.guest import protocol
else:
    import tierkernel_protocol as protocol

_USAGE = ("%pip install NAME[==VERSION] ... | %pip list | %pip uninstall NAME ... "
          "(packages come from the kernel's package index, fetched by the host)")


class PipMagic:
    """The ``pip`` line magic of a guest: ``install``, ``list``, ``uninstall``."""

    def __init__(self, call: Call, site: str, copy_in: bool, tier: str) -> None:
        self._call = call
        self.site = site
        self.copy_in = copy_in
        self.tier = tier

    def __call__(self, line: str) -> None:
        __tracebackhide__ = True
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"%pip: {exc}") from None
        command = argv[0] if argv else ""
        if command == "install":
            self.install(argv[1:])
        elif command == "list":
            self.list_installed()
        elif command == "uninstall":
            self.uninstall([a for a in argv[1:] if a not in ("-y", "--yes", "-q", "--quiet")])
        else:
            raise ValueError(f"%pip {command}: not available in the {self.tier} tier; usage: "
                             f"{_USAGE}")

    def _request(self, args: dict[str, Any]) -> Any:
        __tracebackhide__ = True
        response = self._call({"helper": protocol.PIP, "args": args})
        if not isinstance(response, dict) or "ok" not in response:
            raise RuntimeError(f"%pip: the host sent an unreadable answer: {response!r:.200}")
        if response["ok"]:
            return response.get("value")
        import builtins

        error = response.get("error") or {}
        kind = getattr(builtins, str(error.get("type")), RuntimeError)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(f"%pip: {error.get('message', 'failed')}")

    def install(self, argv: list[str]) -> None:
        """Ask the host to install ``argv`` (names with versions, a few flags)."""
        __tracebackhide__ = True
        print("Fetching on the host (the " + self.tier + " tier has no network): "
              + " ".join(a for a in argv if not a.startswith("-")), flush=True)
        value = self._request({"op": protocol.PIP_INSTALL, "argv": argv, "installed": installed(),
                               "python": "{}.{}".format(*sys.version_info[:2])})
        if value.get("message"):
            print(value["message"])
        if self.copy_in and value.get("token"):
            for part in range(int(value.get("parts", 0))):
                got = self._request({"op": protocol.PIP_FETCH, "token": value["token"],
                                     "part": part})
                try:
                    unpack(self.site, base64.b64decode(str(got["data"])))
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"%pip: the packages did not fit into {self.site} (the "
                        "container's /tmp: c.SandboxBackend.tmpfs_size, within its --memory); "
                        f"{exc.strerror or exc}") from None
        importlib.invalidate_caches()
        done = [f"{p['name']}-{p['version']}" for p in value.get("installed", [])]
        if done:
            print("Successfully installed " + " ".join(done))
            loaded = [p["name"] for p in value["installed"]
                      if p["name"].replace("-", "_").lower() in sys.modules]
            if loaded:
                print(f"Note: {', '.join(loaded)} had been imported already; restart the tier "
                      "(or the kernel) to use the new version.")

    def list_installed(self) -> None:
        """Print every distribution the guest can import, as ``pip list`` does."""
        rows = sorted(installed().items(), key=lambda kv: kv[0].lower())
        width = max([len("Package")] + [len(n) for n, _ in rows])
        lines = [f"{'Package':<{width}} Version", f"{'-' * width} -------"]
        lines += [f"{name:<{width}} {version}" for name, version in rows]
        print("\n".join(lines))

    def uninstall(self, names: list[str]) -> None:
        """Remove packages that %pip installed in this kernel."""
        __tracebackhide__ = True
        if not names:
            raise ValueError("usage: %pip uninstall NAME ...")
        value = self._request({"op": protocol.PIP_UNINSTALL, "names": names})
        if self.copy_in:
            real = os.path.realpath(self.site)
            for rel in value.get("files", []):
                path = os.path.realpath(os.path.join(self.site, str(rel)))
                if path.startswith(real + os.sep) and os.path.isfile(path):
                    os.unlink(path)
            # Then the folders left empty (an empty package folder still imports, as a
            # namespace package), deepest first.
            folders = {os.path.dirname(str(rel)) for rel in value.get("files", [])}
            for rel in sorted(folders, key=lambda f: f.count("/"), reverse=True):
                while rel:
                    path = os.path.realpath(os.path.join(self.site, rel))
                    if not path.startswith(real + os.sep):
                        break
                    try:
                        os.rmdir(path)
                    except OSError:
                        break
                    rel = os.path.dirname(rel)
        importlib.invalidate_caches()
        for removed in value.get("removed", []):
            print(f"Successfully uninstalled {removed}")


def installed() -> dict[str, str]:
    """{distribution name: version} of what this interpreter can import (the host does not
    fetch what is here already at a satisfying version)."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        try:
            name, version = dist.metadata["Name"], dist.version
        except Exception:  # a broken dist-info is skipped, as pip skips it
            continue
        if name and version and name not in found:
            found[name] = version
    return found


#: The PAX header of a piece of a large file (see runtime/packages.py's OFFSET_HEADER): it is
#: written at that offset into the file the earlier pieces began.
OFFSET_HEADER = "TIERKERNEL.offset"


def unpack(root: str, data: bytes) -> None:
    """Extract one part (a tar of regular files the host made, or pieces of them) into
    ``root``."""
    import tarfile

    real = os.path.realpath(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            target = os.path.realpath(os.path.join(root, member.name))
            if not member.isfile() or not target.startswith(real + os.sep):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            offset = int(member.pax_headers.get(OFFSET_HEADER, "0"))
            if offset:
                out = open(target, "r+b")  # noqa: SIM115 - closed below
                out.seek(offset)
            else:
                if os.path.lexists(target):
                    os.unlink(target)
                out = open(target, "w+b")  # noqa: SIM115 - closed below
            with out:
                while chunk := source.read(1 << 16):
                    out.write(chunk)


def install(agent: Any, call: Call, site: str, copy_in: bool, tier: str) -> None:
    """Put ``site`` on ``sys.path`` (before the image's own packages, as pip's user site is)
    and register ``%pip`` as ``agent.line_magics["pip"]``."""
    if copy_in:
        os.makedirs(site, exist_ok=True)  # a path entry that is not a folder is never looked in
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    if site not in sys.path:
        # Before the image's own packages (an upgrade shadows them), after the standard
        # library; where packages live inside the stdlib (wasm's zip), last.
        at = next((i for i, p in enumerate(sys.path)
                   if p.rstrip("/").endswith(("site-packages", "dist-packages"))), len(sys.path))
        sys.path.insert(at, site)
    importlib.invalidate_caches()
    magics = getattr(agent, "line_magics", None)
    if magics is None:
        magics = agent.line_magics = {}
    magics["pip"] = PipMagic(call, site, copy_in, tier)
