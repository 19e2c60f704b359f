"""The %%tier line parser and the size settings: every spelling and every mistake, without a
kernel."""

from __future__ import annotations

import pytest
from traitlets import TraitError
from traitlets.config import Config

from tierkernel.backends.base import format_limit
from tierkernel.backends.options import (
    parse_cpus,
    parse_seconds,
    parse_size,
)
from tierkernel.backends.sandbox.backend import SandboxBackend
from tierkernel.backends.wasm.backend import WasmBackend
from tierkernel.errors import TierUsageError
from tierkernel.magics.parsing import parse_options, split_cell
from tierkernel.sizes import format_size

ACCEPTED = frozenset({"timeout"})


def test_plain_cells_take_the_fast_path():
    directive = split_cell("x = 1\nprint('%tier')")
    assert directive.tier is None and not directive.has_magic and not directive.control
    assert directive.body == "x = 1\nprint('%tier')"


def test_cell_magic_after_blank_lines():
    directive = split_cell("\n\n%%tier process --timeout 3\nx = 1\n")
    assert directive.tier == "process"
    assert directive.args == ["--timeout", "3"]
    assert directive.body == "x = 1\n"
    assert directive.first_line == 4


def test_line_magic_is_a_control_cell():
    assert split_cell("%tier wasm\nx = 1").control
    assert not split_cell("%tiering\n").control
    assert split_cell("%%tiered\n").tier is None and not split_cell("%%tiered\n").has_magic


def test_magic_without_tier_and_bad_quoting():
    assert split_cell("%%tier\nx").has_magic and split_cell("%%tier\nx").tier is None
    assert split_cell("%%tier --timeout 3\nx").args == ["--timeout", "3"]
    with pytest.raises(TierUsageError, match="cannot read"):
        split_cell("%%tier process 'unclosed\nx")


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30.0), ("1.5", 1.5), ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0),
    (" 4 ", 4.0),
])
def test_durations(text, seconds):
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "", "ms", "5 parsecs"])
def test_bad_durations(text):
    with pytest.raises(TierUsageError, match="positive number of seconds"):
        parse_seconds(text)


@pytest.mark.parametrize(("text", "size"), [
    ("512m", 512 << 20), ("1g", 1 << 30), ("1.5GiB", 3 << 29), ("256MB", 256 << 20),
    ("1048576000", 1048576000), (" 2 g ", 2 << 30), ("65536k", 64 << 20),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "g", "1x", "-1g", "1e9", "10m", "big"])
def test_bad_sizes(text):
    with pytest.raises(TierUsageError, match="--memory"):
        parse_size(text)


def test_size_settings_take_what_the_magic_line_takes():
    config = Config()
    config.SandboxBackend.memory = "1.5g"
    config.SandboxBackend.output_limit = "1m"
    backend = SandboxBackend(config=config)
    assert backend.memory == 3 << 29 and backend.output_limit == 1 << 20
    assert SandboxBackend(memory=1 << 30).memory == 1 << 30
    assert SandboxBackend(memory=4e9).memory == 4_000_000_000
    assert WasmBackend(memory="64m").memory == 64 << 20
    for bad, says in [("lots", "expects a size such as 512m"), (True, "expects a size"),
                      (2.5, "expects a size"), ("1m", "must be at least 16m, got 1m")]:
        with pytest.raises(TraitError, match=f"c.SandboxBackend.memory {says}"):
            SandboxBackend(memory=bad)


def test_cpus_and_rendering():
    assert parse_cpus("0.5") == 0.5
    for bad in ("0", "-2", "x", "inf"):
        with pytest.raises(TierUsageError, match="--cpus expects"):
            parse_cpus(bad)
    assert format_size(1 << 30) == "1g"
    assert format_size(512 << 20) == "512m"
    assert format_limit("memory", 3 << 29) == "1536m"
    assert format_limit("cpus", 2.0) == "2"


def test_options_merge_over_defaults():
    assert parse_options("p", [], ACCEPTED, {"timeout": 30.0}) == {"timeout": 30.0}
    assert parse_options("p", ["--timeout=2"], ACCEPTED, {"timeout": 30.0}) == {"timeout": 2.0}


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "1g"], "tier 'p' does not take --memory; it takes: [--timeout SECONDS]"),
    (["--mem", "1g"], "unknown option --mem; tier 'p' takes: [--timeout SECONDS]"),
    (["--timeout"], "--timeout needs a value (SECONDS)"),
    (["--timeout", "--timeout"], "--timeout needs a value"),
    (["--timeout", "1", "--timeout", "2"], "--timeout is given twice"),
    (["extra"], "unexpected 'extra'"),
    (["--"], "unexpected '--'"),
])
def test_option_errors(args, message):
    with pytest.raises(TierUsageError) as info:
        parse_options("p", args, ACCEPTED, {})
    assert message in str(info.value)


def test_option_a_tier_does_not_take():
    with pytest.raises(TierUsageError, match="tier 'n' does not take --timeout; it takes: "
                                             r"\(no options\)"):
        parse_options("n", ["--timeout", "3"], frozenset(), {})
