"""The values codec of --in, --out, %get and %put: every supported type round-trips exactly;
other types are refused by name; a hostile blob is refused as data, never run."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal, assert_series_equal

from tierkernel.guest.values import Limits, ValueCodecError, decode, encode


def same(a: Any, b: Any) -> None:
    """Exactly equal, type included (NaN equal to NaN)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, pd.DataFrame):
        assert_frame_equal(a, b, check_exact=True, check_column_type="equiv")
    elif isinstance(a, pd.Series):
        assert_series_equal(a, b, check_exact=True)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


VALUES = {
    "none": None, "true": True, "big int": 2**200, "negative": -7, "float": 0.1,
    "nan": float("nan"), "inf": -math.inf, "complex": 1.5 - 2j, "str": "héllo \U0001f600",
    "bytes": b"\x00\xff" * 10, "list": [1, "a", [None, (2.5,)]], "tuple": (1, (2, 3)),
    "dict": {"a": 1, 2: [b"x"], (1, "k"): {"nested": None}},
    "int32 matrix": np.arange(24, dtype="int32").reshape(2, 3, 4),
    "floats": np.array([1.5, np.nan, np.inf]), "bools": np.array([True, False]),
    "datetimes": np.array(["2024-02-29T12:00", "NaT"], dtype="datetime64[ms]"),
    "timedeltas": np.array([1, 2], dtype="timedelta64[s]"), "unicode": np.array(["ab", "ç"]),
    "byte strings": np.array([b"a", b"bc"]), "big endian": np.arange(3, dtype=">f4"),
    "numpy scalar": np.float32(2.5), "numpy int": np.int64(-3), "empty": np.zeros((0, 3)),
    "series": pd.Series([1.0, None], index=["a", "b"], name="s"),
    "frame": pd.DataFrame({
        "int": np.arange(4), "float": [0.5, np.nan, 2.0, -1.0],
        "category": pd.Categorical(["lo", "hi", None, "lo"], categories=["lo", "hi"],
                                   ordered=True),
        "when": pd.date_range("2024-03-30", periods=4, freq="D", tz="Europe/Paris"),
        "naive": pd.to_datetime(["2020-01-01", None, "2021-06-01", "1999-12-31"]),
        "text": ["a", None, "c", "dé"],
        "nullable": pd.array([1, None, 3, 4], dtype="Int64"),
        "flags": pd.array([True, None, False, True], dtype="boolean"),
        "span": pd.to_timedelta([1, 2, 3, 4], unit="s"),
        "mixed": [1, "a", None, 2.5]},
        index=pd.date_range("2020-01-01", periods=4, name="day")),
    "multiindex": pd.DataFrame({"v": [1, 2]}, index=pd.MultiIndex.from_tuples(
        [("a", 1), ("b", 2)], names=["k", "n"])),
    "int columns": pd.DataFrame(np.eye(2)),
    "object strings": pd.Series(["a", None], dtype=object),
    "lists in a column": pd.DataFrame({"pair": [[1, 2], [3, 4]]}),
    "object index": pd.DataFrame({"v": [1, 2]}, index=pd.Index(["x", "y"], dtype=object)),
    "empty frame": pd.DataFrame(),
}


@pytest.mark.parametrize("name", list(VALUES))
def test_every_supported_value_round_trips_exactly(name: str):
    same(VALUES[name], decode(encode({"x": VALUES[name]}))["x"])


def test_many_values_in_one_blob_keep_their_names():
    out = decode(encode(VALUES))
    assert list(out) == list(VALUES)


class Planted:
    """What a hostile cell would like the host to unpickle."""

    def __reduce__(self) -> Any:
        return (Path.touch, (Path("/tmp/tierkernel-values-pwned"),))


@pytest.mark.parametrize("value, named", [
    (Planted(), "Planted"), (lambda: 1, "function"), ({1, 2}, "set"),
    (np.array([object()]), "dtype object"), (np.ma.masked_array([1]), "MaskedArray"),
    (pd.DataFrame({"x": [1]}).T.set_axis(pd.MultiIndex.from_tuples([("a", 1)]), axis=1),
     "MultiIndex columns"),
    ([[1, 2], {3}], "set"), (True.__class__.__mro__, "type"),
])
def test_other_types_are_refused_with_their_name_and_what_moves(value: Any, named: str):
    with pytest.raises(ValueCodecError) as raised:
        encode({"v": value})
    assert named in str(raised.value) and "'v'" in str(raised.value)


def blob(values: dict[str, Any], buffers: bytes = b"", sizes: list[int] | None = None) -> bytes:
    header = json.dumps({"values": values, "buffers": sizes or []}).encode()
    return b"TKV1" + struct.pack(">I", len(header)) + header + buffers


HOSTILE = {
    "a pickle": pickle.dumps(Planted()),
    "a pickle behind the magic": b"TKV1" + struct.pack(">I", 5) + pickle.dumps(Planted()),
    "deep brackets in the header": b"TKV1" + struct.pack(">I", 500_000) + b"[" * 500_000,
    "deep nodes": blob({"x": json.loads('{"t":"list","items":[' * 80 + "]}" * 80)}),
    "a million and one elements": blob({"x": {"t": "list", "items": [{"t": "none"}] * 1_000_001}}),
    "an array larger than its bytes": blob(
        {"x": {"t": "ndarray", "dtype": "<f8", "shape": [1 << 40], "b": 0}}, b"\0" * 8, [8]),
    "buffers larger than the blob": blob({}, b"", [1 << 40]),
    "an object dtype": blob({"x": {"t": "ndarray", "dtype": "|O8", "shape": [1], "b": 0}},
                            b"\0" * 8, [8]),
    "a record dtype": blob({"x": {"t": "ndarray", "dtype": "|V8", "shape": [1], "b": 0}},
                           b"\0" * 8, [8]),
    "a missing buffer": blob({"x": {"t": "bytes", "b": 3}}),
    "an int of a million digits": blob({"x": {"t": "int", "v": "9" * 1_000_000}}),
    "codes outside the categories": blob({"x": {"t": "series", "name": {"t": "none"},
        "index": {"k": "range", "start": 0, "stop": 1, "step": 1, "name": {"t": "none"}},
        "col": {"k": "cat", "ordered": False,
                "codes": {"t": "ndarray", "dtype": "<i1", "shape": [1], "b": 0},
                "cats": {"k": "obj", "items": [{"t": "str", "v": "a"}]}}}}, b"\x05", [1]),
    "a time zone path": blob({"x": {"t": "series", "name": {"t": "none"},
        "index": {"k": "range", "start": 0, "stop": 1, "step": 1, "name": {"t": "none"}},
        "col": {"k": "tz", "tz": "../../../etc/passwd",
                "a": {"t": "ndarray", "dtype": "<M8[ns]", "shape": [1], "b": 0}}}},
        b"\0" * 8, [8]),
    "an unknown kind": blob({"x": {"t": "__import__('os')"}}),
    "one buffer named many times": blob({"x": {"t": "list", "items": [
        {"t": "bytes", "b": 0}] * 1000}}, b"\0" * 4096, [4096]),
    "a buffer no value uses": blob({"x": {"t": "none"}}, b"\0" * 8, [8]),
    "a pair of three": blob({"x": {"t": "dict", "items": [[{"t": "none"}] * 3]}}),
    "a zero-width string dtype": blob({"x": {"t": "ndarray", "dtype": "<U0", "shape": [5],
                                             "b": 0}}),
    "an empty array of huge dimensions": blob({"x": {"t": "ndarray", "dtype": "<f8",
                                                     "shape": [0, 2**62, 2**62], "b": 0}},
                                              b"", [0]),
    "a datetime unit with a multiplier": blob({"x": {"t": "ndarray", "dtype": "<M8[3Y]",
                                                     "shape": [1], "b": 0}}, b"\0" * 8, [8]),
    "keys of one hash": blob({"x": {"t": "dict", "items": [
        [{"t": "int", "v": str(n * (2**61 - 1))}, {"t": "none"}] for n in range(1, 200)]}}),
    "a range past int64": blob({"x": {"t": "frame", "cols": [], "index": {
        "k": "range", "start": 0, "stop": 10**30, "step": 1, "name": {"t": "none"}},
        "columns": {"k": "range", "start": 0, "stop": 0, "step": 1, "name": {"t": "none"}}}}),
    "string lengths that wrap": blob({"x": {"t": "series", "name": {"t": "none"},
        "index": {"k": "range", "start": 0, "stop": 5, "step": 1, "name": {"t": "none"}},
        "col": {"k": "str", "dtype": None, "b": 1,
                "lengths": {"t": "ndarray", "dtype": "<i8", "shape": [5], "b": 0}}}},
        struct.pack("<5q", 2**62, 2**62, 2**62, 2**62, 2) + b"ab", [40, 2]),
    "bytes that are not UTF-8": blob({"x": {"t": "series", "name": {"t": "none"},
        "index": {"k": "range", "start": 0, "stop": 1, "step": 1, "name": {"t": "none"}},
        "col": {"k": "str", "dtype": None, "b": 1,
                "lengths": {"t": "ndarray", "dtype": "<i8", "shape": [1], "b": 0}}}},
        struct.pack("<q", 2) + b"\xff\xfe", [8, 2]),
    "not JSON": b"TKV1" + struct.pack(">I", 3) + b"{x}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_blob_is_refused_as_data(name: str):
    marker = Path("/tmp/tierkernel-values-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueCodecError):
        decode(HOSTILE[name])
    assert not marker.exists()


def test_strings_kept_by_pyarrow_elsewhere_arrive_here_without_it():
    text = blob({"x": {"t": "series", "name": {"t": "none"},
                       "index": {"k": "range", "start": 0, "stop": 2, "step": 1,
                                 "name": {"t": "none"}},
                       "col": {"k": "str", "dtype": {"storage": "pyarrow", "na": "NA"}, "b": 1,
                               "lengths": {"t": "ndarray", "dtype": "<i8", "shape": [2],
                                           "b": 0}}}},
                struct.pack("<2q", 2, -1) + b"ab", [16, 2])
    assert decode(text)["x"].tolist()[0] == "ab"


def test_the_limits_hold_on_both_sides():
    with pytest.raises(ValueCodecError, match="over the limit"):
        encode({"x": np.zeros(1000)}, Limits(max_bytes=4000))
    small = encode({"x": np.zeros(1000)})
    with pytest.raises(ValueCodecError, match="over the limit"):
        decode(small, Limits(max_bytes=4000))
    with pytest.raises(ValueCodecError, match="deeper than 3"):
        encode({"x": [[[[[1]]]]]}, Limits(max_depth=3))
    with pytest.raises(ValueCodecError, match=r"structure takes .* over the limit of 100 bytes"):
        encode({"x": list(range(100))}, Limits(max_header=100))
    with pytest.raises(ValueCodecError, match=r"structure takes .* over the limit of 100 bytes"):
        decode(encode({"x": list(range(100))}), Limits(max_header=100))
    with pytest.raises(ValueCodecError, match="more than 10 elements"):
        decode(encode({"x": list(range(20))}), Limits(max_nodes=10))
    nested: list[Any] = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(ValueCodecError, match="deeper than 64"):
        encode({"x": nested})
