"""The agent's tar of /workspace (the copy back): GNU tar when the image has it, tarfile if not.

Both ways must give the host the same members: each name of a hard-linked file as a file, links
as links (not followed), folders; and None past the size limit (the host then reads the tree
through a docker exec instead).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tierkernel.guest import agent


def members(data: bytes) -> list[tuple[str, bytes, int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        out = []
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isreg() else None
            out.append((m.name.rstrip("/"), m.type, m.size, f.read() if f else b""))
        return sorted(out)


@pytest.mark.parametrize("way", ["gnu tar", "tarfile"])
def test_both_ways_pack_the_same_members(tmp_path: Path, monkeypatch, way):
    root = tmp_path / "workspace"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("A")
    os.link(root / "a.txt", root / "sub" / "same_file.txt")
    (root / "link").symlink_to("/etc/passwd")
    if way == "tarfile":
        monkeypatch.setattr(agent, "TAR_DIRS", str(tmp_path / "no-tar-here"))
    data = agent.pack_workspace(str(root), 1 << 20)
    assert data is not None
    got = members(data)
    assert got == [(".", tarfile.DIRTYPE, 0, b""), ("./a.txt", tarfile.REGTYPE, 1, b"A"),
                   ("./link", tarfile.SYMTYPE, 0, b""), ("./sub", tarfile.DIRTYPE, 0, b""),
                   ("./sub/same_file.txt", tarfile.REGTYPE, 1, b"A")]
    assert agent.pack_workspace(str(root), 100) is None  # past the limit


def test_a_tree_tar_cannot_read_is_an_error_not_a_short_copy():
    # As the cells' user (not root, who reads every file), as in the container.
    import shutil
    import subprocess
    import sys
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="tk-pack-"))  # readable by the cells' user
    try:
        top.chmod(0o755)
        # Stdlib only: runs by itself, with the protocol module it loads from beside it.
        shutil.copy(agent.__file__, top / "agent_copy.py")
        shutil.copy(Path(agent.__file__).with_name("protocol.py"), top / "protocol.py")
        root = top / "workspace"
        root.mkdir(mode=0o755)
        (root / "secret").write_text("x")
        (root / "secret").chmod(0)
        code = ("import sys\nsys.path.insert(0, sys.argv[1])\nimport agent_copy\n"
                "try:\n    agent_copy.pack_workspace(sys.argv[2], 1 << 20)\n"
                "except OSError as exc:\n    print(exc)")
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        user = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
        done = subprocess.run([python, "-c", code, str(top), str(root)], capture_output=True,
                              text=True, timeout=60, cwd="/", check=False,
                              **user)  # type: ignore[call-overload]
        assert "tar exited with status 2" in done.stdout, (done.stdout, done.stderr)
        assert "Permission denied" in done.stdout
    finally:
        shutil.rmtree(top, ignore_errors=True)
