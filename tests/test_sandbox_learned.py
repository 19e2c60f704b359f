"""The sandbox settings a kernel learned, as the next kernel's head start trusts them: only
while nothing its configuration comes from has changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierkernel.backends.hooks import ConfigSources as Sources
from tierkernel.backends.sandbox import learned as sandbox_learned
from tierkernel.backends.sandbox.learned import learn, recall

ARGV = ["-f", "/run/kernel-1.json", "--SandboxBackend.runtime=runsc"]


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config folder with one config file; the cache in a folder of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "tierkernel_config.py").write_text("c.SandboxBackend.cpus = 0.5\n")
    return folder


def sources(folder: Path, argv: list[str] = ARGV) -> Sources:
    names = ("ipython_config", "tierkernel_config")
    files = [str(folder / f"{name}{ext}") for name in names for ext in (".py", ".json")]
    return Sources(argv=argv, files=files, cwd_matters=False)


def test_settings_are_recalled_for_the_next_kernel_whatever_its_connection_file(
        config_dir: Path):
    learn(sources(config_dir), {"memory": 1 << 29, "runtime": "runsc"})
    assert recall(["-f", "/run/kernel-2.json", "--SandboxBackend.runtime=runsc"]) == {
        "memory": 1 << 29, "runtime": "runsc"}
    assert json.loads(sandbox_learned.path().read_text())[0]["values"]["memory"] == 1 << 29


def test_a_changed_config_file_voids_them(config_dir: Path):
    learn(sources(config_dir), {"memory": 1 << 29})
    (config_dir / "tierkernel_config.py").write_text("c.SandboxBackend.cpus = 2\n")
    assert recall(ARGV) is None


def test_a_new_config_file_voids_them(config_dir: Path):
    learn(sources(config_dir), {"memory": 1 << 29})
    (config_dir / "ipython_config.json").write_text("{}")
    assert recall(ARGV) is None


def test_other_options_or_config_folders_void_them(config_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    learn(sources(config_dir), {"memory": 1 << 29})
    assert recall(["-f", "/run/k.json", "--SandboxBackend.runtime=runc"]) is None
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))
    assert recall(ARGV) is None


def test_each_situation_keeps_its_own_and_a_broken_cache_is_ignored(config_dir: Path):
    other = ["-f", "/run/k.json", "--SandboxBackend.runtime=runc"]
    learn(sources(config_dir), {"runtime": "runsc"})
    learn(sources(config_dir, other), {"runtime": "runc"})
    assert recall(ARGV) == {"runtime": "runsc"}
    assert recall(other) == {"runtime": "runc"}
    sandbox_learned.path().write_text("{not json")
    assert recall(ARGV) is None
    learn(sources(config_dir), {"runtime": "runsc"})  # and is replaced
    assert recall(ARGV) == {"runtime": "runsc"}


def test_values_that_are_not_json_are_not_remembered(config_dir: Path):
    learn(sources(config_dir), {"memory": object()})
    assert recall(ARGV) is None


def test_another_version_of_the_sandbox_code_voids_them(config_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    code = tmp_path / "sandbox.py"
    code.write_text("# one version\n")
    monkeypatch.setattr(sandbox_learned, "_CODE", (str(code),))
    learn(sources(config_dir), {"memory": 1 << 29})
    assert recall(ARGV) == {"memory": 1 << 29}
    code.write_text("# another version, with other defaults\n")
    assert recall(ARGV) is None


def test_a_cache_file_that_is_a_link_is_neither_read_nor_written_through(config_dir: Path,
                                                                         tmp_path: Path):
    learn(sources(config_dir), {"memory": 1 << 29})
    planted = tmp_path / "planted.json"
    planted.write_text(sandbox_learned.path().read_text())
    sandbox_learned.path().unlink()
    sandbox_learned.path().symlink_to(planted)  # another user's file, say
    assert recall(ARGV) is None
    learn(sources(config_dir), {"memory": 1 << 30})
    assert json.loads(planted.read_text())[0]["values"]["memory"] == 1 << 29  # untouched
    assert not sandbox_learned.path().is_symlink()
    assert recall(ARGV) == {"memory": 1 << 30}
    assert sandbox_learned.path().stat().st_mode & 0o077 == 0
    assert sandbox_learned.path().parent.stat().st_mode & 0o077 == 0


def test_settings_learned_already_are_not_written_again(config_dir: Path):
    learn(sources(config_dir), {"memory": 1 << 29})
    written = sandbox_learned.path().stat().st_mtime_ns, sandbox_learned.path().stat().st_ino
    learn(sources(config_dir), {"memory": 1 << 29})  # the next kernel, started the same way
    assert (sandbox_learned.path().stat().st_mtime_ns,
            sandbox_learned.path().stat().st_ino) == written
    learn(sources(config_dir), {"memory": 1 << 30})
    assert recall(ARGV) == {"memory": 1 << 30}
