"""A tier from another distribution plugs in fully through the hooks, with tierkernel untouched.

tests/plugins/tierkernel-echo-tier is such a distribution: registered only through the
``tierkernel.backends`` entry point, it adds the ``echo`` tier (cells run with ``exec()`` in a
namespace of its own), the tier's own magic-line options (``--shout``, ``--repeat N``), a
``tierkernel echo-status`` command, a ``config_loaded`` and an ``attach`` hook; and a second
tier, ``echo-broken``, whose module cannot be imported. It is installed with pip into a folder
of its own (never into the shared environment), which a kernel and the ``tierkernel`` command
then find on their PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_session import KernelSession

PLUGIN = Path(__file__).resolve().parent / "plugins" / "tierkernel-echo-tier"
E = "%%tier echo"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a kernel or command that has the echo tier installed: pip installs
    the distribution (offline: no build isolation, no index) into a folder that goes last on
    PYTHONPATH."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail("building the test tier needs hatchling in this environment (it is in "
                    "tierkernel[test]): pip install hatchling")
    target = tmp_path_factory.mktemp("echo-tier")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(PLUGIN)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(target)])}


@pytest.fixture(scope="module")
def echo_kernel(plugin_env: dict[str, str]) -> Iterator[KernelSession]:
    session = KernelSession(env=plugin_env)
    yield session
    session.close()


def tierkernel(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierkernel.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_cells_run_in_the_plugin_tier(echo_kernel: KernelSession):
    out = echo_kernel.run(f"{E}\nprint('hello')\nsecret_echo = 41\nsecret_echo + 1")
    assert out.status == "ok", out.outputs
    assert out.metadata["tierkernel"]["tier"] == "echo"
    assert out.stdout == "hello\n"
    assert out.result["text/plain"] == "42"
    # Its namespace is its own: the next echo cell sees it, a native cell does not.
    assert echo_kernel.run(f"{E}\nsecret_echo").result["text/plain"] == "41"
    native = echo_kernel.run("'secret_echo' in globals()")
    assert native.result["text/plain"] == "False"
    failed = echo_kernel.run(f"{E}\nprint('before')\n1 / 0")
    assert failed.status == "error" and failed.error["ename"] == "ZeroDivisionError"
    assert failed.stdout == "before\n"


def test_the_plugin_options_are_parsed_with_its_parsers(echo_kernel: KernelSession):
    assert echo_kernel.run(f"{E} --shout\nprint('quiet')").stdout == "QUIET\n"
    assert echo_kernel.run(f"{E} --repeat 2 --shout\nprint('hi')").stdout == "HI\nHI\n"
    assert echo_kernel.run(f"{E} --repeat=3\nprint('x')").stdout == "x\nx\nx\n"
    # Bad values: the plugin's own message, as the kernel shows any option error.
    for line, message in [
        ("--repeat lots", "--repeat expects a whole number from 1 to 5, got 'lots'"),
        ("--repeat 9", "--repeat expects a whole number from 1 to 5, got '9'"),
        ("--repeat", "--repeat needs a value (N): print everything N times (1 to 5)"),
        ("--shout=yes", "--shout is a flag and takes no value"),
        ("--timeout 3", "tier 'echo' does not take --timeout; it takes: [--repeat N] [--shout]"),
        ("--loud", "unknown option --loud; tier 'echo' takes: [--repeat N] [--shout]"),
    ]:
        out = echo_kernel.run(f"{E} {line}\nprint('never')")
        assert out.status == "error", line
        assert [o.msg_type for o in out.outputs] == ["error"], (line, out.outputs)
        assert out.error["ename"] == "TierUsageError", line
        assert message in out.error["evalue"], (line, out.error["evalue"])
    # Another tier knows the option exists, and says it is not its own.
    other = echo_kernel.run("%%tier process --shout\n1")
    assert "tier 'process' does not take --shout" in other.error["evalue"]


def test_session_options_and_the_tier_table(fresh_kernel_with_plugin: KernelSession):
    session = fresh_kernel_with_plugin
    out = session.run("%tier echo --repeat 2")
    assert "Default tier is now 'echo'" in out.stdout and "repeat=2" in out.stdout
    assert session.run("print('twice')").stdout == "twice\ntwice\n"
    table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
    assert "* echo" in table and "repeat=1 (this session: repeat=2)" in table
    assert "echo-broken" in table and "frobnicator" in table


@pytest.fixture()
def fresh_kernel_with_plugin(plugin_env: dict[str, str]) -> Iterator[KernelSession]:
    session = KernelSession(env=plugin_env)
    yield session
    session.close()


def test_tier_help_lists_the_plugin_and_its_options(echo_kernel: KernelSession):
    for code in ("%tier --help", "%%tier --help\nprint('never')"):
        out = echo_kernel.run(code)
        assert out.status == "ok", (code, out.outputs)
        text = out.stdout
        assert "echo: none: exec() in a namespace of the echo tier's own" in text, text
        assert "--shout" in text and "print in capitals" in text
        assert "--repeat N" in text and "print everything N times (1 to 5)" in text
        assert "--runtime NAME" in text  # the built-in tiers' too
        assert "echo-broken: broken" in text and "frobnicator" in text
        assert "never" not in text
    for code in ("%tier echo --help", f"{E} --help\nprint('never')"):
        one = echo_kernel.run(code).stdout
        assert "--shout" in one and "--runtime" not in one and "never" not in one, code


def test_the_hooks_ran(echo_kernel: KernelSession):
    # config_loaded saw the kernel's command line (before the kernel's threads existed).
    argv = echo_kernel.run(f"{E}\nCONFIG_ARGV").result["text/plain"]
    assert "'-f'" in argv, argv
    # attach gave the tier the kernel's shell: native cells see what it ran.
    echo_kernel.run(f"{E}\nmarker_for_history = 1")
    seen = echo_kernel.run("[cell for cell in echo_history if 'marker_for_history' in cell]")
    assert seen.result["text/plain"] == "['marker_for_history = 1']"


def test_a_broken_plugin_tier_is_reported_and_the_rest_works(echo_kernel: KernelSession):
    out = echo_kernel.run("%%tier echo-broken\n1")
    assert out.error["ename"] == "TierUnavailableError"
    assert "installed but broken" in out.error["evalue"] and "frobnicator" in out.error["evalue"]
    assert echo_kernel.run("1 + 1").result["text/plain"] == "2"


def test_the_command_line_has_the_plugin_command(plugin_env: dict[str, str]):
    helped = tierkernel(plugin_env, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "echo-status" in helped.stdout and "show the echo tier's settings" in helped.stdout
    assert "warm" in helped.stdout and "spares" in helped.stdout  # the built-in tiers' too
    # The broken tier is said, once, and the command carries on.
    assert helped.stderr.count("tier 'echo-broken' is broken") == 1, helped.stderr
    assert "frobnicator" in helped.stderr

    status = tierkernel(plugin_env, "echo-status", "--set", "EchoBackend.repeat=3")
    assert status.returncode == 0, status.stderr
    assert status.stdout == "echo tier ready: cells run with exec(); repeat=3\n"
    bad = tierkernel(plugin_env, "echo-status", "--set", "EchoBackend.repeat=9")
    assert bad.returncode == 2
    assert "--repeat expects a whole number from 1 to 5, got '9'" in bad.stderr

    tiers = tierkernel(plugin_env, "tiers")
    assert tiers.returncode == 0, tiers.stderr
    assert "  echo " in tiers.stdout and "exec() in a namespace" in tiers.stdout
    assert "echo-broken" in tiers.stdout

    # Its settings are the kernel's configurables like any tier's.
    every = subprocess.run([sys.executable, "-m", "tierkernel", "--help-all"],
                           capture_output=True, text=True, env=plugin_env, timeout=120,
                           check=False)
    assert every.returncode == 0 and "--EchoBackend.repeat=" in every.stdout
