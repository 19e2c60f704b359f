"""The %%tier line parser: every spelling and every mistake, without a kernel."""

from __future__ import annotations

import pytest

from tierkernel.magics.options import TierUsageError, parse_seconds
from tierkernel.magics.parsing import parse_options, split_cell

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


def test_options_merge_over_defaults():
    assert parse_options("p", [], ACCEPTED, {"timeout": 30.0}) == {"timeout": 30.0}
    assert parse_options("p", ["--timeout=2"], ACCEPTED, {"timeout": 30.0}) == {"timeout": 2.0}


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "1g"], "unknown option --memory; tier 'p' takes: [--timeout SECONDS]"),
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
