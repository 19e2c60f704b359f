"""``tierkernel image build``: the sandbox image, made from Debian packages with no registry.

The recipe is the folder ``vm-image/sandbox/`` (a package list and a root-filesystem script).
Its content hash is the image tag, so the image is rebuilt exactly when the recipe changes, and
a second build is a no-op: the tag already present in the engine means done.

The guest agent is deliberately NOT baked into the image: the sandbox tier hands the kernel's
own ``tierkernel/guest/agent.py`` to the interpreter it starts in the container (see
``settings.agent_command``). The agent inside a container therefore always matches the kernel
that drives it, and editing the agent never costs a multi-minute image rebuild.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tierkernel.backends.sandbox.engine import IMAGE_REPO, connect, explain
from tierkernel.backends.sandbox.extras import Extras
from tierkernel.errors import ExtrasError, ImageBuildError

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]

Progress = Callable[[str], None]


def recipe_dir() -> Path:
    """The recipe folder: inside the installed package (wheel) or in the source checkout."""
    for candidate in (_PACKAGE_ROOT / "vm-image" / "sandbox",
                      _PACKAGE_ROOT.parent / "vm-image" / "sandbox"):
        if (candidate / "packages").is_file():
            return candidate
    raise ImageBuildError(
        "the sandbox image recipe (vm-image/sandbox/) is not in this installation of tierkernel"
    )


def recipe_tag(folder: Path | None = None) -> str:
    """The content hash of the recipe (file names and bytes), as a 12-digit image tag."""
    folder = folder or recipe_dir()
    digest = hashlib.sha256(SUITE.encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(b"\0" + str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def image_ref(extras: Extras | None = None) -> str:
    """``tierkernel-sandbox:<tag>``: the image this tierkernel's recipe builds (with
    ``extras``: the custom image of the recipe plus those packages)."""
    tag = recipe_tag()
    return f"{IMAGE_REPO}:{extras.tag(tag) if extras else tag}"


def debian_mirror(sources: list[Path] | None = None) -> str:
    """The Debian mirror apt already uses (one-line or deb822 sources), for debootstrap.

    Mirrors of security updates are skipped: debootstrap needs the main archive.
    """
    if sources is None:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
                   *sorted((apt / "sources.list.d").glob("*.sources"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in _source_entries(text, deb822=path.suffix == ".sources"):
            if SUITE in suites and "security" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _source_entries(text: str, deb822: bool) -> Iterator[tuple[str, list[str]]]:
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split()
        return
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]


def image_exists(client: Any, ref: str) -> bool:
    """Whether the engine has ``ref`` already."""
    import docker.errors

    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    except Exception as exc:
        raise explain(exc, f"looking for the image {ref}") from exc
    return True


def build_image(
    progress: Progress = print,
    *,
    force: bool = False,
    mirror: str | None = None,
    client: Any = None,
    extras: Extras | None = None,
) -> str:
    """Build and import the sandbox image unless its tag exists; return its reference.

    Needs root (debootstrap), the Debian mirror, and a Docker engine. Progress lines (stages and
    debootstrap's own progress) go to ``progress``. With ``extras``, a custom image: the
    recipe plus those Debian packages and wheels (see ``extras.py``).
    """
    ref = image_ref(extras)
    client = client or connect(timeout=900)
    if not force and image_exists(client, ref):
        progress(f"image {ref} is up to date (recipe unchanged); nothing to do")
        return ref
    if os.geteuid() != 0:
        raise ImageBuildError("building the sandbox image needs root (debootstrap makes a Debian "
                              "root filesystem): run `sudo tierkernel image build`")
    _ensure_debootstrap(progress)
    mirror = mirror or debian_mirror()
    recipe = recipe_dir()
    progress(f"building {ref} from {recipe} ({SUITE}, mirror {mirror})")
    workdir = Path(tempfile.mkdtemp(prefix="tierkernel-image-", dir=_scratch_dir()))
    rootfs = workdir / "rootfs"
    try:
        package_list = recipe / "packages"
        if extras:
            package_list = extras.packages_file(package_list, workdir / "packages")
        _run_recipe(recipe, rootfs, mirror, progress, package_list)
        if extras:
            try:
                extras.install_wheels(rootfs, progress)
            except ExtrasError as exc:
                raise ImageBuildError(str(exc)) from exc
        progress(f"importing the root filesystem into the engine as {ref}")
        _import(client, rootfs, ref)
    finally:
        progress("removing the build folder")
        _unmount_below(rootfs)
        shutil.rmtree(workdir, ignore_errors=True)
    _remove_stale(client, ref, progress)
    progress(f"done: {ref}")
    if extras:
        progress(f"use it with c.SandboxBackend.image = {ref!r} (in a jupyter config file, "
                 "e.g. ~/.jupyter/tierkernel_config.py)")
    return ref


def _scratch_dir() -> str:
    # A disk-backed folder: the root filesystem is 300+ MB and /tmp may be a small tmpfs.
    for candidate in (os.environ.get("TIERKERNEL_BUILD_DIR"), "/var/tmp"):
        if candidate and os.path.isdir(candidate):
            return candidate
    return tempfile.gettempdir()


def _unmount_below(root: Path) -> None:
    """Unmount what an interrupted recipe left mounted in the root (its /proc), so removing
    the build folder never reaches into a live filesystem."""
    try:
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
    except OSError:
        return
    for point in sorted((p for p in points if p.startswith(str(root) + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _ensure_debootstrap(progress: Progress) -> None:
    if shutil.which("debootstrap") or os.path.exists("/usr/sbin/debootstrap"):
        return
    if not shutil.which("apt-get"):
        raise ImageBuildError("debootstrap is not installed; install it (Debian: "
                              "`apt-get install debootstrap`) and run this again")
    progress("installing debootstrap (apt-get install debootstrap)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ImageBuildError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


# Per-package lines of debootstrap ("I: Retrieving x") and of apt/dpkg ("Get:12 ...",
# "Unpacking x", "Setting up x"): shown as running counts, not one line each.
_COUNTED = re.compile(
    r"^(?:I: (Retrieving|Validating|Extracting|Unpacking|Configuring) \S+"
    r"|(Get):\d+ |(Unpacking|Setting up|Preparing to unpack|Selecting previously) )")


_QUIET = {"Validating", "Selecting previously", "Preparing to unpack"}


def _run_recipe(recipe: Path, rootfs: Path, mirror: str, progress: Progress,
                package_list: Path | None = None) -> None:
    """Run build-rootfs.sh, condensing debootstrap's per-package lines into counts."""
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    cmd = ["sh", str(recipe / "build-rootfs.sh"), str(rootfs), mirror, SUITE,
           str(package_list or recipe / "packages")]
    tail: list[str] = []
    counts: dict[str, int] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail = [*tail[-19:], line]
            match = _COUNTED.match(line)
            if match:
                verb = next(g for g in match.groups() if g)
                verb = {"Get": "Downloading", "Setting up": "Configuring"}.get(verb, verb)
                counts[verb] = counts.get(verb, 0) + 1
                if verb in _QUIET:
                    continue
                if counts[verb] == 1 or counts[verb] % 50 == 0:
                    progress(f"    {verb.lower()} packages ({counts[verb]} so far)")
                continue
            if line:
                progress(f"    {line}")
        code = proc.wait()
    if code != 0:
        raise ImageBuildError(
            f"building the root filesystem failed (exit {code}); last lines:\n" + "\n".join(tail)
        )


def _import(client: Any, rootfs: Path, ref: str) -> None:
    repo, _, tag = ref.partition(":")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None
    stdout = tar.stdout

    def chunks() -> Iterator[bytes]:
        while chunk := stdout.read(1 << 20):
            yield chunk

    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        "WORKDIR /workspace",
        'CMD ["sleep", "infinity"]',
    ]
    try:
        answer = client.api.import_image_from_stream(chunks(), repository=repo, tag=tag,
                                                      changes=changes)
    except Exception as exc:
        tar.kill()
        raise explain(exc, f"importing {ref}") from exc
    finally:
        tar.wait()
    if tar.returncode != 0:
        assert tar.stderr is not None
        raise ImageBuildError(f"tar of the root filesystem failed: {tar.stderr.read()[-500:]!r}")
    if "error" in str(answer).lower() or not image_exists(client, ref):
        raise ImageBuildError(f"the engine did not import {ref}: {str(answer)[:500]}")


def _remove_stale(client: Any, ref: str, progress: Progress) -> None:
    """Drop images of older recipes (those no container uses; the others stay). Images of
    this recipe stay, the default one and custom ones (``<recipe>-<extras>``) alike."""
    try:
        images = client.images.list(name=IMAGE_REPO)
    except Exception:
        return
    current = f"{IMAGE_REPO}:{recipe_tag()}"
    for image in images:
        stale = [t for t in image.tags if t.startswith(f"{IMAGE_REPO}:") and t != ref
                 and t != current and not t.startswith(current + "-")]
        if stale and ref not in image.tags:
            for tag in stale:
                try:
                    client.images.remove(tag)
                    progress(f"removed the outdated image {tag}")
                except Exception:
                    progress(f"kept the outdated image {tag} (still in use)")


def describe_missing(ref: str) -> str:
    """The reason ``%tier`` gives when the image is not built."""
    return f"image {ref} not built: run `tierkernel image build` (needs root and a Debian mirror)"


__all__ = [
    "build_image",
    "debian_mirror",
    "describe_missing",
    "image_exists",
    "image_ref",
    "recipe_dir",
    "recipe_tag",
]
