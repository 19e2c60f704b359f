"""local backend: no path, '..', absolute name or symlink reaches outside the root."""

from __future__ import annotations

import errno
import io
import os

import pytest

from tierkernel.fsx import Fsx


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    fs = Fsx(url=root.as_uri()).facade()
    yield fs, root, outside
    fs.close()


def _outside_untouched(outside):
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret"


def test_dotdot_is_refused(layout):
    fs, root, outside = layout
    for path in ("../outside/secret", "/../outside/secret", "a/../../outside/secret"):
        fs.mkdir("/a", recursive=True)
        with pytest.raises(PermissionError, match="escapes the workspace root"):
            fs.read_file(path)
        with pytest.raises(PermissionError):
            fs.write_file(path, "pwned")
    with pytest.raises(PermissionError):
        fs.rename("/a", "../outside/a")
    with pytest.raises(PermissionError):
        fs.copy_file("../outside/secret", "/stolen")
    _outside_untouched(outside)
    assert not (root / "stolen").exists()


def test_absolute_host_paths_are_workspace_paths(layout):
    fs, root, outside = layout
    host_path = str(outside / "secret")
    with pytest.raises(FileNotFoundError):
        fs.read_file(host_path)
    with pytest.raises(FileNotFoundError):
        fs.write_file(host_path, "pwned")  # its "parents" do not exist inside the root
    fs.mkdir(str(outside), recursive=True)
    fs.write_file(host_path, "inside")
    assert (root / host_path.lstrip("/")).read_text() == "inside"
    _outside_untouched(outside)


def test_host_made_symlinks_pointing_out_are_not_followed_out(layout):
    fs, root, outside = layout
    os.symlink(outside, root / "abs-link")  # absolute host target
    os.symlink("../outside", root / "rel-link")  # relative, climbing out
    os.symlink(outside / "secret", root / "file-link")
    with pytest.raises(FileNotFoundError):
        fs.read_file("/abs-link/secret")  # read as <root>/<outside path>: not there
    with pytest.raises(FileNotFoundError):
        fs.read_file("/file-link")
    with pytest.raises(PermissionError):
        fs.read_file("/rel-link/secret")
    with pytest.raises(FileNotFoundError):
        fs.write_file("/abs-link/secret", "pwned")
    with pytest.raises(PermissionError):
        fs.write_file("/rel-link/new", "pwned")
    with pytest.raises(FileNotFoundError):
        fs.chmod("/file-link", 0o777)
    with pytest.raises(PermissionError):
        fs.truncate("/rel-link/secret", 0)
    with pytest.raises(FileNotFoundError):
        fs.readdir("/abs-link")
    assert fs.readlink("/abs-link") == str(outside)
    # Removing a tree that holds the links removes the links only.
    os.mkdir(root / "tree")
    os.symlink(outside, root / "tree" / "link")
    fs.rmdir("/tree", recursive=True)
    fs.unlink("/abs-link")
    fs.unlink("/file-link")
    _outside_untouched(outside)


def test_links_made_through_fsx_stay_inside(layout):
    fs, root, outside = layout
    fs.symlink("../outside/secret", "/escape")
    fs.symlink(str(outside / "secret"), "/abs")
    with pytest.raises(PermissionError):
        fs.read_file("/escape")
    with pytest.raises(FileNotFoundError):
        fs.read_file("/abs")
    with pytest.raises(FileNotFoundError):
        fs.write_file("/abs", "x")  # the target's directories do not exist inside the root
    fs.mkdir(str(outside), recursive=True)
    fs.write_file("/abs", "lands inside")  # a dangling link's target is created in the root
    assert (root / str(outside / "secret").lstrip("/")).read_text() == "lands inside"
    _outside_untouched(outside)


def test_a_directory_swapped_for_a_symlink_is_refused_by_the_store(layout):
    # The race: the engine checked /d was a directory, then another process replaced it
    # with a link to the outside before the store acted. The store's O_NOFOLLOW walk refuses.
    fs, root, outside = layout
    os.symlink(outside, root / "d")
    store = fs.engine.store
    with pytest.raises(OSError) as info:
        store.put("/d/secret", io.BytesIO(b"pwned"), append=False)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    for call in (lambda: store.open_reader("/d/secret"),
                 lambda: store.create("/d/new", "file", 0o644),
                 lambda: store.remove("/d/secret"),
                 lambda: store.set_meta("/d/secret", perm=0o777),
                 lambda: store.rename("/d/secret", "/stolen"),
                 lambda: store.children("/d")):
        with pytest.raises(OSError):
            call()
    # The final component is never followed either.
    with pytest.raises(OSError):
        store.set_meta("/d", perm=0o700)
    assert oct(outside.stat().st_mode & 0o777) != oct(0o700)
    _outside_untouched(outside)


def test_missing_or_bad_root_is_a_clear_error(tmp_path):
    from tierkernel.fsx import FsxConfigError

    with pytest.raises(FsxConfigError, match="not an existing directory"):
        Fsx(url=(tmp_path / "nope").as_uri()).facade().readdir("/")
    with pytest.raises(FsxConfigError, match="three slashes"):
        Fsx(url="file://relative/dir").facade().readdir("/")
