"""Container sync at cell boundaries, with tarfile round trips standing in for docker's
put_archive (extract into a directory) and get_archive (tar of that directory as workspace/)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from tierkernel.errors import UnsafeArchiveError
from tierkernel.fsx.sync import apply, pack


def put_archive(packed, container_root):
    """What docker put_archive does: extract into /workspace (removing deleted paths first,
    as the sandbox tier will before extracting)."""
    ws = container_root / "workspace"
    ws.mkdir(parents=True, exist_ok=True)
    for rel in packed.deleted:
        target = ws / rel
        if target.is_dir() and not target.is_symlink():
            import shutil
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    with tarfile.open(fileobj=packed.archive) as tar:
        tar.extractall(ws, filter="tar")
    return ws


def get_archive(ws):
    """What docker get_archive('/workspace') returns: members named workspace/..."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(ws, arcname="workspace")
    return [buf.getvalue()[i:i + 4096] for i in range(0, len(buf.getvalue()), 4096)]


@pytest.fixture()
def fs(each_backend):
    return each_backend


def test_round_trip_brings_container_changes_into_fsx(fs, tmp_path):
    fs.mkdir("/data/old", recursive=True)
    fs.write_file("/data/keep.csv", "a,b\n1,2\n")
    fs.write_file("/data/edit.txt", "before")
    fs.write_file("/data/old/gone.txt", "delete me")
    fs.write_file("/bye.txt", "delete me too")
    fs.symlink("/data/keep.csv", "/latest.csv")  # absolute: rewritten for the container
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    assert (ws / "latest.csv").read_text() == "a,b\n1,2\n"  # the link works in the container
    # the cell runs in the container:
    (ws / "data" / "edit.txt").write_text("after")
    (ws / "data" / "new").mkdir()
    (ws / "data" / "new" / "made.bin").write_bytes(b"\0\1\2")
    os.remove(ws / "bye.txt")
    import shutil
    shutil.rmtree(ws / "data" / "old")
    os.rename(ws / "data" / "keep.csv", ws / "data" / "renamed.csv")
    os.symlink("data/renamed.csv", ws / "rel-link")
    os.chmod(ws / "data" / "edit.txt", 0o600)
    before_ctime = fs.lstat("/latest.csv").st_ctime_ns

    done = apply(fs, get_archive(ws), packed.manifest)
    assert fs.read_file("/data/edit.txt") == "after"
    assert oct(fs.stat("/data/edit.txt").st_mode & 0o777) == oct(0o600)
    assert fs.read_file("/data/new/made.bin", encoding=None) == b"\0\1\2"
    assert fs.read_file("/data/renamed.csv") == "a,b\n1,2\n"
    assert fs.read_file("/rel-link") == "a,b\n1,2\n"
    assert not fs.exists("/bye.txt") and not fs.exists("/data/old")
    assert not fs.exists("/data/keep.csv")
    assert fs.readlink("/latest.csv") == "/data/keep.csv"  # unchanged link kept verbatim
    assert fs.lstat("/latest.csv").st_ctime_ns == before_ctime
    assert sorted(done.deleted) == ["bye.txt", "data/keep.csv", "data/old", "data/old/gone.txt"]
    assert done.conflicts == []
    # The next pack since the new manifest is empty: nothing changed in fsx since.
    again = pack(fs, since=done.manifest)
    with tarfile.open(fileobj=again.archive) as tar:
        assert tar.getnames() == []
    assert again.deleted == []


def test_incremental_pack_has_only_changes_and_deletions(fs):
    fs.write_file("/a.txt", "a")
    fs.write_file("/b.txt", "b")
    fs.mkdir("/d")
    first = pack(fs)
    fs.write_file("/a.txt", "A")
    fs.unlink("/b.txt")
    fs.write_file("/c.txt", "c")
    second = pack(fs, since=first.manifest)
    with tarfile.open(fileobj=second.archive) as tar:
        assert sorted(tar.getnames()) == ["a.txt", "c.txt"]
        assert tar.extractfile("a.txt").read() == b"A"
    assert second.deleted == ["b.txt"]


def test_concurrent_fsx_change_is_never_overwritten(fs, tmp_path):
    fs.write_file("/shared.txt", "v1")
    fs.write_file("/other.txt", "x")
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    (ws / "shared.txt").write_text("container v2")
    os.remove(ws / "other.txt")
    fs.write_file("/shared.txt", "another kernel's v2")  # fsx changed meanwhile
    fs.write_file("/other.txt", "also changed here")
    done = apply(fs, get_archive(ws), packed.manifest)
    assert fs.read_file("/shared.txt") == "another kernel's v2"
    assert fs.read_file("/shared.txt.sandbox-conflict") == "container v2"
    assert fs.read_file("/other.txt") == "also changed here"  # deletion not applied
    assert sorted(done.conflicts) == ["other.txt", "shared.txt"]


def tree_of(fs, path="/"):
    """Every entry under ``path`` in fsx: (kind, content or link target, mode)."""
    out = {}
    for name in fs.readdir(path):
        full = f"{path.rstrip('/')}/{name}"
        st = fs.lstat(full)
        if st.is_symlink():
            out[full] = ("link", fs.readlink(full), None)
        elif st.is_dir():
            out[full] = ("dir", None, st.st_mode & 0o777)
            out.update(tree_of(fs, full))
        else:
            out[full] = ("file", fs.read_file(full, encoding=None), st.st_mode & 0o777)
    return out


def tree_on_disk(root, here=None):
    out = {}
    for entry in sorted(os.scandir(here or root), key=lambda e: e.name):
        full = "/" + os.path.relpath(entry.path, root)
        if entry.is_symlink():
            out[full] = ("link", os.readlink(entry.path), None)
        elif entry.is_dir():
            out[full] = ("dir", None, entry.stat().st_mode & 0o777)
            out.update(tree_on_disk(root, entry.path))
        else:
            with open(entry.path, "rb") as f:
                out[full] = ("file", f.read(), entry.stat().st_mode & 0o777)
    return out


def test_what_fsx_changed_during_the_cell_still_reaches_the_container(fs, tmp_path):
    # Another kernel (or a host program) writes the workspace while a sandbox cell that also
    # writes it runs: after the copy back, the next copy in must carry fsx's changes.
    fs.write_file("/a.txt", "a")
    fs.write_file("/z.txt", "z0")
    fs.write_file("/both.txt", "b0")
    fs.write_file("/deleted_there.txt", "d0")
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    (ws / "a.txt").write_text("container's a")
    (ws / "both.txt").write_text("container's b")
    (ws / "deleted_there.txt").unlink()
    fs.write_file("/z.txt", "z1 from fsx")
    fs.write_file("/new_in_fsx.txt", "n")
    fs.write_file("/both.txt", "fsx's b")
    fs.write_file("/deleted_there.txt", "d1 from fsx")
    done = apply(fs, get_archive(ws), packed.manifest)
    assert fs.read_file("/a.txt") == "container's a"
    nxt = pack(fs, since=done.manifest)
    with tarfile.open(fileobj=nxt.archive) as tar:
        sent = {name: tar.extractfile(name).read() for name in tar.getnames()}
    assert sent == {"z.txt": b"z1 from fsx", "new_in_fsx.txt": b"n", "both.txt": b"fsx's b",
                    "both.txt.sandbox-conflict": b"container's b",
                    "deleted_there.txt": b"d1 from fsx"}
    # And once the container has them, nothing more is sent.
    assert pack(fs, since=nxt.manifest).archive.read(1024).strip(b"\0") == b""


def test_a_folder_the_container_replaced_by_a_file(fs, tmp_path):
    import shutil

    fs.mkdir("/plain")
    fs.write_file("/plain/child.txt", "c")
    fs.mkdir("/edited")
    fs.write_file("/edited/child.txt", "c")
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    for name in ("plain", "edited"):
        shutil.rmtree(ws / name)
        (ws / name).write_text(f"{name} is a file now")
    fs.write_file("/edited/child.txt", "changed in fsx meanwhile")
    done = apply(fs, get_archive(ws), packed.manifest)
    assert fs.read_file("/plain") == "plain is a file now"
    # fsx changed something in the other folder: its folder stays, the file goes beside it.
    assert fs.read_file("/edited/child.txt") == "changed in fsx meanwhile"
    assert fs.read_file("/edited.sandbox-conflict") == "edited is a file now"
    assert sorted(done.conflicts) == ["edited", "edited/child.txt"]


@pytest.mark.parametrize("container_puts", ["a link", "a file"])
def test_a_folder_replaced_in_the_container_and_changed_in_fsx(fs, tmp_path, container_puts):
    # fsx keeps its folder, the container's entry is saved beside it, and the next copy in
    # gives the container fsx's folder back (never writing through the container's link).
    import shutil

    fs.mkdir("/d")
    fs.write_file("/d/y.txt", "y0")
    fs.write_file("/d/z.txt", "z0")
    fs.mkdir("/other")
    fs.write_file("/other/y.txt", "not to be touched")
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    shutil.rmtree(ws / "d")
    if container_puts == "a link":
        (ws / "d").symlink_to("other")
    else:
        (ws / "d").write_text("the container's file")
    fs.write_file("/d/y.txt", "y1 from fsx")
    done = apply(fs, get_archive(ws), packed.manifest)
    assert "d" in done.conflicts
    assert fs.read_file("/d/y.txt") == "y1 from fsx"
    if container_puts == "a link":
        assert fs.readlink("/d.sandbox-conflict") == "other"
    else:
        assert fs.read_file("/d.sandbox-conflict") == "the container's file"
    nxt = pack(fs, since=done.manifest)
    assert "d" in nxt.deleted
    put_archive(nxt, tmp_path / "ctr")
    assert (ws / "other" / "y.txt").read_text() == "not to be touched"
    assert tree_on_disk(ws) == tree_of(fs)


def test_a_file_replaced_by_a_folder_in_the_container_and_changed_in_fsx(fs, tmp_path):
    fs.write_file("/d", "file v0")
    packed = pack(fs)
    ws = put_archive(packed, tmp_path / "ctr")
    (ws / "d").unlink()
    (ws / "d" / "inner").mkdir(parents=True)
    (ws / "d" / "inner" / "x.txt").write_text("the container's x")
    fs.write_file("/d", "file v1 from fsx")
    done = apply(fs, get_archive(ws), packed.manifest)
    assert done.conflicts == ["d"]
    assert fs.read_file("/d") == "file v1 from fsx"
    assert fs.read_file("/d.sandbox-conflict/inner/x.txt") == "the container's x"
    nxt = pack(fs, since=done.manifest)
    assert "d" in nxt.deleted
    put_archive(nxt, tmp_path / "ctr")
    assert tree_on_disk(ws) == tree_of(fs)


def _tar(*members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize("members, reason", [
    ([_file("/etc/passwd")], "absolute path"),
    ([_file("workspace/../../etc/x")], "'..'"),
    ([_file("elsewhere/x")], "not under workspace/"),
    ([_link("workspace/h", "workspace/a", tarfile.LNKTYPE)], "only files, directories"),
    ([_link("workspace/dev", "", tarfile.CHRTYPE)], "only files, directories"),
    ([_link("workspace/out", "/etc"), _file("workspace/out/passwd")], "through a symlink"),
])
def test_unsafe_archives_are_refused_whole(fs, members, reason):
    fs.write_file("/precious.txt", "kept")
    base = pack(fs).manifest
    archive = _tar(_file("workspace/first.txt", b"would be written first"), *members)
    with pytest.raises(UnsafeArchiveError, match=reason):
        apply(fs, archive, base)
    assert fs.readdir("/") == ["precious.txt"]  # nothing applied, nothing deleted
    assert fs.read_file("/precious.txt") == "kept"


def test_apply_never_writes_through_an_fsx_symlink(fs, tmp_path):
    fs.mkdir("/real")
    fs.write_file("/real/target.txt", "target")
    fs.symlink("/real/target.txt", "/link.txt")
    base = pack(fs).manifest
    # the container replaced the link by a regular file
    archive = _tar(_file("workspace/link.txt", b"plain file now"),
                   _file("workspace/real/target.txt", b"target"))
    apply(fs, archive, base)
    assert fs.lstat("/link.txt").is_file()
    assert fs.read_file("/link.txt") == "plain file now"
    assert fs.read_file("/real/target.txt") == "target"


def test_change_token_moves_with_every_write_and_not_with_reads(each_backend):
    engine = each_backend.engine
    token = engine.change_token()
    assert token is not None
    each_backend.write_file("/a.txt", "one")
    after_write = engine.change_token()
    assert after_write != token
    each_backend.read_file("/a.txt")
    each_backend.readdir("/")
    pack(each_backend).archive.close()
    assert engine.change_token() == after_write  # reading, and packing, change nothing
    each_backend.rename("/a.txt", "/b.txt")
    assert engine.change_token() != after_write
    with pytest.raises(FileNotFoundError):
        each_backend.unlink("/missing")
    moved = engine.change_token()
    each_backend.mkdir("/d")
    assert engine.change_token() != moved


def test_change_token_of_a_host_folder_moves_with_writes_behind_fsx(tmp_path):
    # A host folder may change under anyone's feet: its token is what inotify heard there.
    from tierkernel.fsx import Fsx

    (tmp_path / "sub").mkdir()
    fs = Fsx(url=tmp_path.as_uri()).facade()
    try:
        token = fs.engine.change_token()
        assert token is not None and fs.engine.change_token() == token
        (tmp_path / "sub" / "by-another-program.txt").write_text("x")
        assert fs.engine.change_token() != token
    finally:
        fs.close()


def test_change_token_sees_another_process_write_a_shared_sqlite_workspace(tmp_path):
    from tierkernel.fsx import Fsx

    url = f"sqlite://{tmp_path}/ws.db"
    mine, other = Fsx(url=url).facade(), Fsx(url=url).facade()  # two kernels, one file
    try:
        mine.write_file("/x", "1")
        token = mine.engine.change_token()
        other.write_file("/y", "2")
        assert mine.engine.change_token() != token
    finally:
        mine.close()
        other.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite", "local"])
def test_a_rename_in_the_container_fits_a_quota_the_file_fills_most_of(backend, tmp_path):
    """A file moved or replaced in the container is never counted twice: the quota holds the
    file once, and the copy back must not need room for both names at the same time."""
    from tierkernel.fsx import Fsx

    url = {"memory": "memory://", "sqlite": f"sqlite://{tmp_path}/ws.db"}.get(backend)
    if url is None:
        (tmp_path / "root").mkdir()
        url = (tmp_path / "root").as_uri()
    fs = Fsx(url=url, max_bytes="8m").facade()
    try:
        fs.write_file("/a.bin", os.urandom(5 << 20))
        fs.write_file("/old.csv", "x" * (2 << 20))
        packed = pack(fs)
        ws = put_archive(packed, tmp_path / "ctr")
        os.rename(ws / "a.bin", ws / "b.bin")  # the whole file under another name
        os.remove(ws / "old.csv")
        (ws / "new.csv").write_text("y" * (2 << 20))  # and a replacement of the same size
        done = apply(fs, get_archive(ws), packed.manifest)
        assert sorted(fs.readdir("/")) == ["b.bin", "new.csv"]
        assert sorted(done.deleted) == ["a.bin", "old.csv"]
        assert fs.read_file("/b.bin", encoding=None) == (ws / "b.bin").read_bytes()
    finally:
        fs.close()
