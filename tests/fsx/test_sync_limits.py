"""The copy back's limits (issue 14): linear work in a deep tree, plain tar only, byte, file
and time budgets, stopping, and what reaches host disk through a ``file://`` workspace."""

from __future__ import annotations

import bz2
import errno
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tierkernel.errors import CopyBudgetError, CopyStopped, UnsafeArchiveError
from tierkernel.fsx import Fsx
from tierkernel.fsx import local as local_store
from tierkernel.fsx.sync import Budget, apply, pack, receive


@pytest.fixture()
def fs(each_backend):
    return each_backend


def _archive(*members, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _dir(name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _file(name, data=b"x", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def _deep(depth):
    names = ["/".join(["a"] * i) for i in range(1, depth + 1)]
    return _archive(*[_dir(n) for n in names], _file(names[-1] + "/end.txt", b"deep"))


@pytest.fixture(params=["memory", "sqlite", "local"])
def deep_fs(request, tmp_path):
    """A workspace whose depth and path-length quotas let a 2000-deep tree in."""
    if request.param == "local":
        (tmp_path / "root").mkdir()
    url = {"memory": "memory://", "sqlite": f"sqlite://{tmp_path}/ws.db",
           "local": (tmp_path / "root").as_uri()}[request.param]
    facade = Fsx(url=url, max_depth=4096, max_path_length=4096).facade()
    yield facade
    facade.close()
    if request.param == "local":
        remove_deep(tmp_path / "root")


def remove_deep(top: Path) -> None:
    """Remove a folder however deep, without recursion: pytest's own clean-up of old temporary
    folders (shutil.rmtree, recursive in Python 3.11) overflows the stack on a 2000-deep tree
    and fails a later run. Each folder is moved beside ``top`` before it is emptied, so no
    path is ever long."""
    queue, moved = [top], 0
    while queue:
        folder = queue.pop()
        with os.scandir(folder) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    moved += 1
                    flat = top.with_name(f"{top.name}.flat{moved}")
                    os.rename(entry.path, flat)
                    queue.append(flat)
                else:
                    os.unlink(entry.path)
        os.rmdir(folder)


@pytest.mark.parametrize("depth", [300, 2000])
def test_a_deep_tree_costs_lookups_in_proportion_to_its_size(deep_fs, monkeypatch, depth):
    """os.makedirs("/workspace/" + "a/" * depth) in a sandbox cell: the copy back looks each
    path up a bounded number of times, instead of once per folder above it (depth**2 and
    worse: 37 s for depth 300 on sqlite)."""
    fs = deep_fs
    base = pack(fs).manifest
    store = fs.engine.store
    calls = {"lookup": 0, "open": 0}
    lookup = store.lookup

    def counted_lookup(path):
        calls["lookup"] += 1
        return lookup(path)

    monkeypatch.setattr(store, "lookup", counted_lookup)
    real_open = os.open

    def counted_open(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(local_store.os, "open", counted_open)
    done = apply(fs, _deep(depth), base, top=None)
    assert calls["lookup"] <= 10 * depth, calls
    assert calls["open"] <= 20 * depth, calls  # the local store: per member, not per folder
    assert len(done.written) == depth + 1
    assert fs.read_file("/" + "a/" * depth + "end.txt") == "deep"


def test_a_compressed_archive_is_refused_before_it_expands(fs):
    """144 bytes of bz2 said 64 MiB: the guest's archive is read as plain tar only."""
    fs.write_file("/kept.txt", "kept")
    base = pack(fs).manifest
    bomb = bz2.compress(_archive(_file("zeros.bin", bytes(8 << 20))))
    assert len(bomb) < 2000
    with pytest.raises(UnsafeArchiveError, match="not a plain tar archive"):
        apply(fs, bomb, base, top=None)
    assert fs.readdir("/") == ["kept.txt"]


def test_a_sparse_member_is_refused(fs):
    base = pack(fs).manifest
    info, _ = _file("holes.bin", b"")
    info.type = tarfile.GNUTYPE_SPARSE
    data = _archive(_file("first.txt"), (info, None))
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        apply(fs, data, base, top=None)
    assert fs.readdir("/") == []
    # PAX's sparse files (GNU.sparse.* attributes) too
    pax = tarfile.TarInfo("holes2.bin")
    pax.size = 4
    pax.pax_headers = {"GNU.sparse.map": "0,4", "GNU.sparse.size": str(1 << 40)}
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        apply(fs, _archive((pax, b"\0" * 4), fmt=tarfile.PAX_FORMAT), base, top=None)
    assert fs.readdir("/") == []


def _terabyte_stream(size=1 << 40):
    """A tar header saying 1 TiB follows, then zeros forever: what tar makes of a sparse
    ``os.truncate(path, 1 << 40)`` file it does not know is sparse."""
    info = tarfile.TarInfo("huge.bin")
    info.size = size
    yield info.tobuf(tarfile.GNU_FORMAT)
    while True:
        yield bytes(1 << 16)


def test_a_terabyte_member_is_refused_on_its_header(fs):
    base = pack(fs).manifest
    chunks = _terabyte_stream()
    with pytest.raises(CopyBudgetError, match="copy_back_bytes") as caught:
        apply(fs, chunks, base, top=None, budget=Budget(bytes=64 << 20))
    assert caught.value.errno == errno.EFBIG
    assert "1 TiB" in str(caught.value) or "1024 GiB" in str(caught.value)
    assert fs.readdir("/") == []


def test_the_byte_budget_counts_what_arrives_and_applies_nothing_over_it(fs):
    fs.write_file("/kept.txt", "kept")
    base = pack(fs).manifest
    data = _archive(*[_file(f"f{i}.bin", bytes(100_000)) for i in range(20)])
    with pytest.raises(CopyBudgetError, match=r"budget of 1 MiB.*copy_back_bytes"):
        apply(fs, data, base, top=None, budget=Budget(bytes=1 << 20))
    assert fs.readdir("/") == ["kept.txt"]  # nothing partial: the container keeps its files
    assert apply(fs, data, base, top=None, budget=Budget(bytes=4 << 20)).written


def test_the_file_budget_counts_members(fs):
    base = pack(fs).manifest
    data = _archive(*[_file(f"f{i}.txt") for i in range(50)])
    with pytest.raises(CopyBudgetError, match=r"budget of 49 files.*copy_back_files"):
        apply(fs, data, base, top=None, budget=Budget(files=49))
    assert fs.readdir("/") == []
    assert len(apply(fs, data, base, top=None, budget=Budget(files=50)).written) == 50


def test_a_stop_ends_the_copy_back_and_applies_nothing(fs):
    base = pack(fs).manifest
    reasons = iter([None] * 20)
    with pytest.raises(CopyStopped, match="stopped: interrupted"):
        apply(fs, _terabyte_stream(size=1 << 30), base, top=None,
              stop=lambda: next(reasons, "interrupted"))
    assert fs.readdir("/") == []


def test_the_time_budget_ends_an_endless_archive(fs):
    def slow():
        info = tarfile.TarInfo("slow.bin")
        info.size = 1 << 30
        yield info.tobuf(tarfile.GNU_FORMAT)
        while True:
            yield b"\0" * 512

    with pytest.raises(CopyBudgetError, match="copy_back_seconds"):
        receive(slow(), Budget(seconds=0.2))


def test_receive_keeps_a_plain_archive_whole(fs):
    data = _archive(_dir("d"), _file("d/x.txt", b"hello"), _link("d/l", "x.txt"))
    received = receive([data[i:i + 700] for i in range(0, len(data), 700)])
    with received:
        copy = received.file.read()
    with tarfile.open(fileobj=io.BytesIO(copy), mode="r:") as tar:
        assert tar.getnames() == ["d", "d/x.txt", "d/l"]
        member = tar.extractfile("d/x.txt")
        assert member is not None and member.read() == b"hello"


@pytest.fixture()
def host(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("outside")
    facade = Fsx(url=root.as_uri()).facade()
    yield facade, root
    facade.close()


def test_hostile_modes_and_links_never_reach_host_disk(host):
    """A sandbox cell's chmod 4777 / 2777 / 1777, ln -s /etc/passwd, ln -s ../../x: into a
    file:// workspace, no special or world-write bit and no link out of it."""
    fs, root = host
    base = pack(fs).manifest
    done = apply(fs, _archive(
        _file("suid.sh", b"#!/bin/sh\n", mode=0o4777),
        _file("sgid.sh", b"#!/bin/sh\n", mode=0o2777),
        _dir("shared", mode=0o1777),
        _link("passwd", "/etc/passwd"),
        _link("shared/up", "../../secret"),
        _link("shared/twisty", "../shared/../../secret"),
        _link("shared/fine", "../suid.sh"),
    ), base, top=None)
    for name in ("suid.sh", "sgid.sh", "shared"):
        mode = stat.S_IMODE(os.lstat(root / name).st_mode)
        assert mode & 0o7002 == 0, (name, oct(mode))
    assert stat.S_IMODE(os.lstat(root / "suid.sh").st_mode) == 0o775
    assert not os.path.lexists(root / "passwd")
    assert not os.path.lexists(root / "shared" / "up")
    assert not os.path.lexists(root / "shared" / "twisty")
    assert os.readlink(root / "shared" / "fine") == "../suid.sh"
    skipped = dict(done.skipped)
    assert set(skipped) == {"passwd", "shared/up", "shared/twisty"}
    assert "absolute" in skipped["passwd"] and "out of the workspace" in skipped["shared/up"]
    # a later fsx chmod cannot set them either
    fs.chmod("/sgid.sh", 0o6777)
    assert stat.S_IMODE(os.lstat(root / "sgid.sh").st_mode) == 0o775


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_links_out_are_kept_in_a_virtual_workspace(tmp_path, kind):
    """sqlite and memory hold no host path: a link there is read from the workspace root."""
    fs = Fsx(url="memory://" if kind == "memory" else f"sqlite://{tmp_path}/ws.db").facade()
    base = pack(fs).manifest
    done = apply(fs, _archive(_link("passwd", "/etc/passwd")), base, top=None)
    assert done.skipped == [] and fs.readlink("/passwd") == "/etc/passwd"
    fs.close()


def test_pack_leaves_out_what_does_not_fit_and_the_copy_back_keeps_it(fs, tmp_path):
    """A workspace larger than the container's /workspace: the largest files to copy stay
    out, the manifest says the container lacks them, and the copy back never deletes them."""
    fs.write_file("/small.txt", "s")
    fs.write_file("/big.bin", b"b" * 50_000)
    fs.write_file("/bigger.bin", b"B" * 90_000)
    packed = pack(fs, room=60_000)
    assert [rel for rel, why in packed.missing] == ["bigger.bin"]
    assert packed.missing[0][1] == "room"
    assert "bigger.bin" not in packed.manifest and "big.bin" in packed.manifest
    assert set(packed.left) == {"bigger.bin"}
    with tarfile.open(fileobj=packed.archive) as tar:
        assert sorted(tar.getnames()) == ["big.bin", "small.txt"]
    # the container has what it was given, and changes small.txt
    done = apply(fs, _archive(_file("small.txt", b"changed"), _file("big.bin", b"b" * 50_000)),
                 packed.manifest, top=None)
    assert fs.read_file("/small.txt") == "changed"
    assert fs.read_file("/bigger.bin", encoding=None) == b"B" * 90_000  # not taken as deleted
    assert done.deleted == [] and done.conflicts == []
