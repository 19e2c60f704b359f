"""A real package index for the ``%pip`` tests: wheels the tests build themselves, served over
HTTP on 127.0.0.1 in the PEP 503 "simple" layout, with PEP 658 metadata files (so pip resolves
from metadata alone, as it does against PyPI).

``/liar/...`` serves the same files without a Content-Length (the body is as long as it is):
a download cap must count what arrives, not what the server says.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def normalize(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes | str],
               requires: list[str] | None = None, tag: str = "py3-none-any") -> Path:
    """Write ``{name}-{version}-{tag}.whl`` into ``folder`` (with a valid RECORD)."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {req}" for req in requires or []]
    pure = "true" if tag.endswith("none-any") else "false"
    content: dict[str, bytes] = {
        **{path: data.encode() if isinstance(data, str) else data for path, data in files.items()},
        f"{dist}.dist-info/METADATA": ("\n".join(meta) + "\n").encode(),
        f"{dist}.dist-info/WHEEL": (f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: "
                                    f"{pure}\nTag: {tag}\n").encode(),
    }
    record = []
    for path, data in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    content[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for member, data in content.items():
            whl.writestr(member, data)
    return path


def publish(root: Path, wheel: Path, metadata: bool = True) -> None:
    """Put ``wheel`` into the index at ``root``: its file, its metadata file (unless not
    ``metadata``: pip then downloads the whole wheel to read it), and a link on its project's
    page (pages are rewritten from the files each time)."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    target = files / wheel.name
    if wheel != target:
        target.write_bytes(wheel.read_bytes())
    if metadata:
        with zipfile.ZipFile(target) as whl:
            name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            (files / f"{wheel.name}.metadata").write_bytes(whl.read(name))
    _pages(root)


def _pages(root: Path) -> None:
    projects: dict[str, list[Path]] = {}
    for whl in sorted((root / "files").glob("*.whl")):
        projects.setdefault(normalize(whl.name.split("-")[0]), []).append(whl)
    simple = root / "simple"
    for project, wheels in projects.items():
        links = []
        for whl in wheels:
            digest = hashlib.sha256(whl.read_bytes()).hexdigest()
            attributes = ""
            if Path(f"{whl}.metadata").is_file():
                meta = hashlib.sha256(Path(f"{whl}.metadata").read_bytes()).hexdigest()
                attributes = (f' data-dist-info-metadata="sha256={meta}" '
                              f'data-core-metadata="sha256={meta}"')
            links.append(f'<a href="../../files/{whl.name}#sha256={digest}"{attributes}>'
                         f'{whl.name}</a><br>')
        page = simple / project
        page.mkdir(parents=True, exist_ok=True)
        (page / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links)
                                         + "\n</body></html>\n")
    simple.mkdir(parents=True, exist_ok=True)
    (simple / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(
        f'<a href="{p}/">{p}</a><br>' for p in sorted(projects)) + "\n</body></html>\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path
    hits: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0].split("#")[0]
        self.hits.append(path)
        liar = path.startswith("/liar/")
        if liar:
            path = path[len("/liar"):]
        target = (self.root / path.lstrip("/")).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_relative_to(self.root) or not target.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if target.suffix == ".html"
                         else "application/octet-stream")
        if liar:
            # No length said: the body ends when the connection does.
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        view = memoryview(body)
        for start in range(0, len(body), 1 << 16):
            self.wfile.write(view[start:start + (1 << 16)])


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` on 127.0.0.1; yields (base URL, the paths requested so far)."""
    root = root.resolve()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"root": root, "hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
