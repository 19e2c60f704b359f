"""A custom sandbox image: the recipe plus a team's own Debian packages and wheels.

``tierkernel image build --apt NAME ... --pip NAME ...`` builds the recipe's root filesystem
with the extra Debian packages installed by apt as the recipe's own are, then installs the
wheels into ``/usr/local/lib/python3.X/dist-packages`` (where Debian's Python finds them, ahead
of its own packages). The wheels are resolved and fetched on the host exactly as ``%pip``
does it (``tierkernel/runtime/packages.py``: wheels only, hashes checked, nothing run), for
the image's Python and glibc, skipping what the Debian packages already provide.

The image's tag is the recipe's tag and a hash of the extras, ``<recipe>-<extras>``, so the
same request names the same image, and a recipe change makes a new one. A kernel uses it with
``c.SandboxBackend.image = "tierkernel-sandbox:<tag>"`` (``tierkernel image tag --apt ...
--pip ...`` prints it).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from tierkernel.errors import ExtrasError
from tierkernel.runtime import packages

_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")


@dataclass(frozen=True)
class Extras:
    """The extra packages of a custom image: Debian packages (``apt``) and Python
    requirements (``pip``, names with optional versions), and the index for the latter."""

    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    index_url: str = "https://pypi.org/simple"

    def __post_init__(self) -> None:
        for name in self.apt:
            if not _APT_NAME.match(name):
                raise ExtrasError(f"{name!r} is not a Debian package name (lowercase letters, "
                                  "digits, + - .)")
        for requirement in self.pip:
            if not packages.is_requirement(requirement):
                raise ExtrasError(f"{requirement!r} is not a package name with optional "
                                  "version specifiers (NAME, NAME==1.2, 'NAME>=1,<2')")

    def __bool__(self) -> bool:
        return bool(self.apt or self.pip)

    def digest(self) -> str:
        """12 hex digits naming these extras (order and duplicates do not matter)."""
        text = "\n".join(["apt", *sorted(set(self.apt)), "pip",
                          *sorted({normalize_requirement(r) for r in self.pip})])
        if self.pip:
            text += "\nindex " + self.index_url
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def tag(self, recipe_tag: str) -> str:
        """The image tag for these extras on the recipe ``recipe_tag``."""
        return f"{recipe_tag}-{self.digest()}" if self else recipe_tag

    def packages_file(self, recipe_packages: Path, into: Path) -> Path:
        """The recipe's package list with the extra Debian packages added, written to
        ``into`` (the recipe script takes the list as a file)."""
        text = recipe_packages.read_text()
        if self.apt:
            text += "\n# Extra packages of this image (tierkernel image build --apt)\n"
            text += "".join(f"{name}\n" for name in sorted(set(self.apt)))
        into.write_text(text)
        return into

    def install_wheels(self, rootfs: Path, progress: Callable[[str], None]) -> list[str]:
        """Resolve, fetch and unpack the ``pip`` extras into ``rootfs``'s
        ``/usr/local/lib/python3.X/dist-packages``; returns ``name-version`` of each wheel
        installed. Raises :class:`ExtrasError`."""
        if not self.pip:
            return []
        python = image_python(rootfs)
        have = installed_in(rootfs, python)
        progress(f"--> resolving {' '.join(self.pip)} for Python {python} on the host "
                 f"({self.index_url}; {len(have)} distributions in the image already)")
        # The administrator builds the image: the per-kernel caps of %pip do not apply.
        config = packages.Packages(index_url=self.index_url, allowed=["*"],
                                   max_install_bytes=8 << 30, max_total_bytes=32 << 30,
                                   max_files=2_000_000, timeout=3600.0, cache_dir="")
        store = packages.PackageStore(config, packages.Target("image", pure_only=False))
        try:
            answer = store.handle({"op": "install", "argv": list(self.pip), "python": python,
                                   "installed": have}, None, None)
            if not answer["ok"]:
                raise ExtrasError(f"the wheels could not be installed: "
                                  f"{answer['error']['message']}")
            value = answer["value"]
            target = rootfs / "usr" / "local" / "lib" / f"python{python}" / "dist-packages"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copytree(store.folder, target, dirs_exist_ok=True)
        finally:
            store.close()
        done = [f"{p['name']}-{p['version']}" for p in value["installed"]]
        progress(f"--> installed {' '.join(done) or 'nothing new'} into "
                 f"/{target.relative_to(rootfs)} ({value['downloaded'] / 2**20:.1f} MiB "
                 "downloaded)")
        return done


def normalize_requirement(requirement: str) -> str:
    """A requirement with its name normalized and spaces removed (for the tag)."""
    text = requirement.replace(" ", "")
    name = re.match(r"[A-Za-z0-9._-]+", text)
    return packages.normalize(name.group(0)) + text[name.end():] if name else text


def image_python(rootfs: Path) -> str:
    """The ``3.X`` of the root filesystem's ``python3`` (from its library folder)."""
    versions = sorted(
        (p.name[len("python"):] for p in (rootfs / "usr" / "lib").glob("python3.*")
         if re.fullmatch(r"python3\.\d+", p.name) and p.is_dir()),
        key=lambda v: int(v.split(".")[1]))
    if not versions:
        raise ExtrasError(f"no python3 in {rootfs}/usr/lib (the recipe installs python3)")
    return versions[-1]


def installed_in(rootfs: Path, python: str) -> dict[str, str]:
    """{name: version} of the Python distributions in the root filesystem (Debian's
    ``.egg-info`` and ``.dist-info`` folders), so the wheels step does not fetch them."""
    found: dict[str, str] = {}
    folders = [rootfs / "usr" / "lib" / "python3" / "dist-packages",
               rootfs / "usr" / "lib" / f"python{python}",
               rootfs / "usr" / "local" / "lib" / f"python{python}" / "dist-packages"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for info in sorted(folder.glob("*.*-info")):
            meta = info / ("PKG-INFO" if info.suffix == ".egg-info" else "METADATA")
            if info.suffix == ".egg-info" and info.is_file():
                meta = info  # an egg-info may be a single file
            try:
                headers = Parser().parsestr(meta.read_text(errors="replace"), headersonly=True)
            except OSError:
                continue
            name, version = headers.get("Name"), headers.get("Version")
            if name and version:
                found.setdefault(str(name), str(version))
    return found
