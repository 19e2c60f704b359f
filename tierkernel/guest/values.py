"""Values moved between tiers, as data only: never pickle, never anything that runs code.

The same module encodes and decodes on both sides: the host imports it as
``tierkernel.guest.values``; an agent tier's guest gets its source at start (``tierkernel_values``,
like ``ishell``). Standard library only at import; numpy and pandas are imported when a value
needs them, so a guest without them still moves plain values.

A blob is ``b"TKV1"``, the length of a JSON header (4 bytes, big-endian), the header, then the raw
buffers it points into. The header describes each value as a tree of nodes:

- ``none``, ``bool``, ``int`` (decimal text), ``float`` and ``complex`` (``float.hex``: exact,
  NaN and infinities included), ``str``, ``bytes`` (a buffer), ``list``, ``tuple``, ``dict``
  (pairs of nodes);
- ``ndarray``: a numpy array of numbers, booleans, datetimes, timedeltas or fixed-width
  strings: its dtype (checked against those kinds), its shape, and a buffer that must hold
  exactly shape x itemsize bytes; ``npscalar``: a numpy scalar, as a 0-d array;
- ``series`` and ``frame``: pandas objects, column by column (numpy columns, categoricals as
  codes and categories, time-zone-aware datetimes, strings, nullable integers, floats and
  booleans, objects holding the plain values above), with their index (a range, an index of a
  column, or a MultiIndex of columns) and names.

Anything else (objects, functions, records) is refused with the type's name and what is
supported. Decoding is bounded by :class:`Limits`: total bytes, nesting depth, nodes; every
claimed size is checked against the bytes actually there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"TKV1"
SUPPORTED = ("None, bool, int, float, complex, str, bytes; lists, tuples and dicts of them; "
             "numpy arrays and scalars of numbers, booleans, datetimes or fixed-width "
             "strings; pandas DataFrames and Series")

#: numpy dtypes a blob may name: byte order, kind and size (and a datetime unit).
_DTYPE = re.compile(r"^[<>|=](b1|[iuf]\d{1,2}|c\d{1,2}|[mM]8\[(Y|M|W|D|h|m|s|ms|us|ns)\]"
                    r"|[US][1-9]\d{0,8})$")
#: Keys of one dict that may share a hash: more make building it quadratic (ints equal modulo
#: 2**61 - 1 all hash alike), a way to spend the host's CPU.
_SAME_HASH = 64
_FREQ = re.compile(r"^-?\d{0,9}[A-Za-z]{1,8}(-[A-Za-z]{1,8})?$")
_INT = re.compile(r"^-?\d{1,4300}$")
_TZ = re.compile(r"^[A-Za-z0-9_+\-]{1,32}(/[A-Za-z0-9_+\-]{1,32}){0,3}$")
_NULLABLE = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float32", "Float64", "boolean"}


_HEADER = ("the values' structure takes {}, over the limit of {}: lists, dicts and object "
           "columns of that many elements move as numpy arrays or typed DataFrame columns")


class ValueCodecError(ValueError):
    """A value that cannot move between tiers, or a blob that is not a well-formed one."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one blob: its bytes, its header's bytes, how deep values nest, how many nodes
    it holds.

    The header is bounded on its own because JSON grows as it is read (each small node of a
    list becomes a dict of its own, some 20 times its bytes): the bulk of real data is in the
    buffers (arrays, typed and string columns), and a plain list of more than some 200,000
    numbers belongs in a numpy array."""

    max_bytes: int = 256 << 20
    max_header: int = 8 << 20
    max_depth: int = 64
    max_nodes: int = 1_000_000


# -- encoding -------------------------------------------------------------------------------

def encode(values: dict[str, Any], limits: Limits = Limits()) -> bytes:
    """The blob of ``values`` (name -> value); :class:`ValueCodecError` naming the name and the
    type when one cannot move, or when the blob would pass ``limits``."""
    encoder = _Encoder(limits)
    nodes = {}
    for name, value in values.items():
        try:
            nodes[name] = encoder.node(value, 0)
        except ValueCodecError as exc:
            raise ValueCodecError(f"{name!r}: {exc}") from None
    header = json.dumps({"values": nodes, "buffers": encoder.sizes},
                        separators=(",", ":")).encode()
    if len(header) > limits.max_header:
        raise ValueCodecError(_HEADER.format(_size(len(header)), _size(limits.max_header)))
    total = len(MAGIC) + 4 + len(header) + encoder.total
    if total > limits.max_bytes:
        raise ValueCodecError(f"the values take {_size(total)}, over the limit of "
                              f"{_size(limits.max_bytes)}")
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *encoder.buffers])


class _Encoder:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.buffers: list[bytes] = []
        self.sizes: list[int] = []
        self.total = 0
        self.nodes = 0

    def buffer(self, data: bytes) -> int:
        self.total += len(data)
        if self.total > self.limits.max_bytes:
            raise ValueCodecError(f"over the limit of {_size(self.limits.max_bytes)}")
        self.buffers.append(data)
        self.sizes.append(len(data))
        return len(self.buffers) - 1

    def count(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise ValueCodecError(f"nested deeper than {self.limits.max_depth} levels")
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise ValueCodecError(f"more than {self.limits.max_nodes} elements (put them in "
                                  "a numpy array or a DataFrame)")

    def node(self, value: Any, depth: int) -> dict[str, Any]:
        self.count(depth)
        kind = type(value)
        if value is None:
            return {"t": "none"}
        if kind is bool:
            return {"t": "bool", "v": value}
        if kind is int:
            try:
                return {"t": "int", "v": str(value)}
            except ValueError:  # past Python's digit limit
                raise ValueCodecError("an int with more than 4300 digits") from None
        if kind is float:
            return {"t": "float", "v": value.hex()}
        if kind is complex:
            return {"t": "complex", "v": [value.real.hex(), value.imag.hex()]}
        if kind is str:
            self.total += len(value)
            return {"t": "str", "v": value}
        if kind in (bytes, bytearray):
            return {"t": "bytes", "b": self.buffer(bytes(value))}
        if kind in (list, tuple):
            return {"t": kind.__name__, "items": [self.node(x, depth + 1) for x in value]}
        if kind is dict:
            return {"t": "dict", "items": [[self.node(k, depth + 1), self.node(v, depth + 1)]
                                           for k, v in value.items()]}
        module = getattr(kind, "__module__", "") or ""
        if module.startswith("pandas") and kind.__name__ in ("NAType", "NaTType"):
            return {"t": "na" if kind.__name__ == "NAType" else "nat"}
        if module.startswith("numpy"):
            return self.numpy(value)
        if module.startswith("pandas"):
            return self.pandas(value, depth)
        raise ValueCodecError(_unsupported(value))

    def numpy(self, value: Any) -> dict[str, Any]:
        import numpy as np

        if isinstance(value, np.ndarray):
            if type(value) is not np.ndarray:  # a subclass (matrix, masked array)
                raise ValueCodecError(_unsupported(value))
            return self.array(value)
        if isinstance(value, np.generic):
            return {"t": "npscalar", "a": self.array(np.asarray(value))}
        raise ValueCodecError(_unsupported(value))

    def array(self, array: Any) -> dict[str, Any]:
        import numpy as np

        dtype = array.dtype
        if not _DTYPE.match(dtype.str):
            raise ValueCodecError(
                f"a numpy array of dtype {dtype} (only numbers, booleans, datetimes, "
                "timedeltas and fixed-width strings move; not objects or records)")
        data = np.ascontiguousarray(array).tobytes()
        return {"t": "ndarray", "dtype": dtype.str, "shape": list(array.shape),
                "b": self.buffer(data)}

    def pandas(self, value: Any, depth: int) -> dict[str, Any]:
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            if value.columns.nlevels > 1:
                raise ValueCodecError("a DataFrame with MultiIndex columns (flatten them "
                                      "first)")
            return {"t": "frame", "index": self.index(value.index, depth + 1),
                    "columns": self.index(value.columns, depth + 1),
                    "cols": [self.column(value.iloc[:, i], depth + 1)
                             for i in range(value.shape[1])]}
        if isinstance(value, pd.Series):
            return {"t": "series", "name": self.node(value.name, depth + 1),
                    "col": self.column(value, depth + 1),
                    "index": self.index(value.index, depth + 1)}
        raise ValueCodecError(_unsupported(value))

    def index(self, index: Any, depth: int) -> dict[str, Any]:
        import pandas as pd

        self.count(depth)
        if isinstance(index, pd.RangeIndex):
            return {"k": "range", "start": index.start, "stop": index.stop, "step": index.step,
                    "name": self.node(index.name, depth + 1)}
        if isinstance(index, pd.MultiIndex):
            return {"k": "multi", "names": [self.node(n, depth + 1) for n in index.names],
                    "levels": [self.column(pd.Series(index.get_level_values(i)), depth + 1)
                               for i in range(index.nlevels)]}
        out = {"k": "index", "name": self.node(index.name, depth + 1),
               "col": self.column(pd.Series(index, copy=False), depth + 1)}
        freq = getattr(index, "freqstr", None)
        if isinstance(freq, str):  # a DatetimeIndex or TimedeltaIndex with a frequency
            out["freq"] = freq
        return out

    def column(self, series: Any, depth: int) -> dict[str, Any]:
        import numpy as np
        import pandas as pd

        self.count(depth)
        dtype = series.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cat = series.array
            return {"k": "cat", "codes": self.array(np.asarray(cat.codes)),
                    "cats": self.column(pd.Series(cat.categories), depth + 1),
                    "ordered": bool(cat.ordered)}
        if isinstance(dtype, pd.DatetimeTZDtype):
            utc = series.dt.tz_convert("UTC").dt.tz_localize(None)
            return {"k": "tz", "a": self.array(utc.to_numpy()), "tz": str(dtype.tz)}
        if str(dtype) in _NULLABLE:
            mask = series.isna().to_numpy()
            filled = series.to_numpy(dtype=dtype.numpy_dtype, na_value=0)
            return {"k": "masked", "dtype": str(dtype), "a": self.array(filled),
                    "mask": self.array(mask)}
        if isinstance(dtype, np.dtype) and dtype.kind in "biufcmM":
            return {"k": "np", "a": self.array(series.to_numpy())}
        values = series.to_numpy(dtype=object)
        if isinstance(dtype, pd.StringDtype):
            na = getattr(dtype, "na_value", pd.NA)
            return self.strings(values, {"storage": str(dtype.storage),
                                         "na": "nan" if na is not pd.NA else "NA"})
        if all(v is None or type(v) is str for v in values):
            return self.strings(values, None)
        if isinstance(dtype, np.dtype) and dtype.kind == "O":
            self.nodes += len(values)
            if self.nodes > self.limits.max_nodes:
                raise ValueCodecError(f"more than {self.limits.max_nodes} elements")
            return {"k": "obj", "items": [self.node(_plain(v), depth + 1) for v in values]}
        raise ValueCodecError(f"a pandas column of dtype {dtype} (supported: {SUPPORTED})")

    def strings(self, values: Any, dtype: dict[str, str] | None) -> dict[str, Any]:
        import numpy as np
        import pandas as pd

        encoded = [None if not isinstance(v, str) else v.encode("utf-8", "surrogatepass")
                   for v in values]
        lengths = np.array([-1 if e is None else len(e) for e in encoded], dtype="<i8")
        out = {"k": "str", "dtype": dtype, "lengths": self.array(lengths),
               "b": self.buffer(b"".join(e for e in encoded if e is not None))}
        if dtype is None:
            # Strings in an object column: chosen so where pandas has a string dtype (3 and
            # later), and kept as objects; pandas' only way before it, and then left for the
            # receiving pandas to make its default of.
            out["objects"] = int(pd.__version__.split(".")[0]) >= 3
        return out


def _pd_na() -> Any:
    import pandas as pd

    return pd.NA


def _plain(value: Any) -> Any:
    """An object column's element as a plain value where pandas or numpy made it one of theirs
    (a missing value, a numpy scalar)."""
    import numpy as np

    if value is _pd_na():
        return None
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return value.item()
    return value


def _unsupported(value: Any) -> str:
    kind = type(value)
    return (f"a value of type {kind.__module__}.{kind.__qualname__} cannot move between tiers "
            f"(supported: {SUPPORTED})")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# -- decoding -------------------------------------------------------------------------------

def decode(blob: bytes, limits: Limits = Limits()) -> dict[str, Any]:
    """The values in ``blob``, as data; :class:`ValueCodecError` saying what is wrong when it is
    not a well-formed blob within ``limits``."""
    if len(blob) > limits.max_bytes:
        raise ValueCodecError(f"the values take {_size(len(blob))}, over the limit of "
                              f"{_size(limits.max_bytes)}")
    if blob[:4] != MAGIC or len(blob) < 8:
        raise ValueCodecError("not a tierkernel values blob")
    (length,) = struct.unpack(">I", blob[4:8])
    if length > limits.max_header:
        raise ValueCodecError(_HEADER.format(_size(length), _size(limits.max_header)))
    if 8 + length > len(blob):
        raise ValueCodecError("the header claims more bytes than the blob holds")
    try:
        header = json.loads(blob[8:8 + length])
    except RecursionError:
        raise ValueCodecError(f"nested deeper than {limits.max_depth} levels") from None
    except ValueError as exc:
        raise ValueCodecError(f"a malformed header ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("values"), dict):
        raise ValueCodecError("a malformed header")
    sizes = header.get("buffers")
    if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
        raise ValueCodecError("a malformed buffer table")
    if 8 + length + sum(sizes) != len(blob):
        raise ValueCodecError("the buffers' claimed sizes do not match the blob's length")
    view = memoryview(blob)
    buffers, offset = [], 8 + length
    for size in sizes:
        buffers.append(view[offset:offset + size])
        offset += size
    decoder = _Decoder(limits, buffers)
    out = {}
    for name, node in header["values"].items():
        try:
            out[name] = decoder.node(node, 0)
        except ValueCodecError as exc:
            raise ValueCodecError(f"{name!r}: {exc}") from None
        except MemoryError:
            raise
        except Exception as exc:  # whatever numpy or pandas make of a malformed value
            raise ValueCodecError(f"{name!r}: a malformed value ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from None
    if len(decoder.used) != len(buffers):
        raise ValueCodecError("buffers that no value uses")
    return out


class _Decoder:
    def __init__(self, limits: Limits, buffers: list[memoryview]) -> None:
        self.limits = limits
        self.buffers = buffers
        self.nodes = 0
        #: Each buffer is read once: many nodes naming one buffer would each make a copy of
        #: it, and memory would grow past any limit on the blob.
        self.used: set[int] = set()

    def count(self, depth: int, n: int = 1) -> None:
        if depth > self.limits.max_depth:
            raise ValueCodecError(f"nested deeper than {self.limits.max_depth} levels")
        self.nodes += n
        if self.nodes > self.limits.max_nodes:
            raise ValueCodecError(f"more than {self.limits.max_nodes} elements")

    def buffer(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.buffers):
            raise ValueCodecError("a reference to a buffer that is not there")
        if index in self.used:
            raise ValueCodecError("a buffer used twice")
        self.used.add(index)
        return self.buffers[index]

    def node(self, node: Any, depth: int) -> Any:
        self.count(depth)
        if not isinstance(node, dict):
            raise ValueCodecError("a malformed value")
        t = node.get("t")
        if t == "none":
            return None
        if t in ("na", "nat"):
            try:
                import pandas as pd
            except ImportError:  # a guest without pandas: missing is None
                return None
            return pd.NA if t == "na" else pd.NaT
        if t == "bool":
            return _typed(node["v"], bool)
        if t == "int":
            text = _typed(node["v"], str)
            if not _INT.match(text):
                raise ValueCodecError("a malformed int")
            return int(text)
        if t == "float":
            return _float(node["v"])
        if t == "complex":
            real, imag = _typed(node["v"], list)
            return complex(_float(real), _float(imag))
        if t == "str":
            return _typed(node["v"], str)
        if t == "bytes":
            return bytes(self.buffer(node["b"]))
        if t in ("list", "tuple"):
            items = [self.node(x, depth + 1) for x in _typed(node["items"], list)]
            return items if t == "list" else tuple(items)
        if t == "dict":
            out = {}
            hashes: dict[int, int] = {}
            for pair in _typed(node["items"], list):
                key, value = _typed(pair, list)
                k = self.node(key, depth + 1)
                try:
                    h = hash(k)
                except TypeError:
                    raise ValueCodecError("a dict key that is not hashable") from None
                hashes[h] = hashes.get(h, 0) + 1
                if hashes[h] > _SAME_HASH:
                    raise ValueCodecError(f"a dict with more than {_SAME_HASH} keys of one hash")
                out[k] = self.node(value, depth + 1)
            return out
        if t == "ndarray":
            return self.array(node)
        if t == "npscalar":
            array = self.array(_typed(node["a"], dict))
            if array.shape != ():
                raise ValueCodecError("a numpy scalar that is not 0-d")
            return array[()]
        if t == "series":
            import pandas as pd

            index = self.index(node["index"], depth + 1)
            values = self.column(node["col"], depth + 1)
            if len(values) != len(index):
                raise ValueCodecError("a Series whose index and values differ in length")
            return pd.Series(values, index=index, name=self.node(node["name"], depth + 1),
                             dtype=_object_or_none(values), copy=False)
        if t == "frame":
            import pandas as pd

            index = self.index(node["index"], depth + 1)
            columns = self.index(node["columns"], depth + 1)
            data = [self.column(c, depth + 1) for c in _typed(node["cols"], list)]
            if len(columns) != len(data) or any(len(v) != len(index) for v in data):
                raise ValueCodecError("a DataFrame whose columns do not fit its index")
            frame = pd.DataFrame({i: pd.Series(v, index=index, dtype=_object_or_none(v),
                                               copy=False) for i, v in enumerate(data)},
                                 index=index, copy=False)
            frame.columns = columns
            return frame
        raise ValueCodecError(f"an unknown kind of value {str(t)[:40]!r}")

    def array(self, node: dict[str, Any]) -> Any:
        import numpy as np

        if node.get("t") != "ndarray":
            raise ValueCodecError("a malformed array")
        dtype_text = _typed(node["dtype"], str)
        if not _DTYPE.match(dtype_text):
            raise ValueCodecError(f"an array of a dtype that does not move ({dtype_text[:40]!r})")
        dtype = np.dtype(dtype_text)
        shape = _typed(node["shape"], list)
        if len(shape) > 32 or not all(type(n) is int and 0 <= n <= 1 << 40 for n in shape) \
                or math.prod(shape) > 1 << 40:
            raise ValueCodecError("a malformed array shape")
        data = self.buffer(node["b"])
        count = math.prod(shape)
        if count * dtype.itemsize != len(data):
            raise ValueCodecError(f"an array whose shape {tuple(shape)} and dtype {dtype} need "
                                  f"{count * dtype.itemsize} bytes but come with {len(data)}")
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def column(self, node: Any, depth: int) -> Any:
        import numpy as np
        import pandas as pd

        self.count(depth)
        kind = _typed(node, dict).get("k")
        if kind == "np":
            array = self.array(node["a"])
            if array.ndim != 1:
                raise ValueCodecError("a column that is not one-dimensional")
            return array
        if kind == "cat":
            codes = self.array(node["codes"])
            categories = self.column(node["cats"], depth + 1)
            if codes.dtype.kind != "i" or codes.ndim != 1 or (
                    len(codes) and (codes.min() < -1 or codes.max() >= len(categories))):
                raise ValueCodecError("categorical codes out of the categories' range")
            return pd.Categorical.from_codes(codes, categories=pd.Index(categories),
                                             ordered=bool(node["ordered"]))
        if kind == "tz":
            array = self.array(node["a"])
            tz = _typed(node["tz"], str)
            if array.dtype.kind != "M" or not _TZ.match(tz) or ".." in tz:
                raise ValueCodecError("a malformed time-zone-aware column")
            try:
                return pd.DatetimeIndex(array).tz_localize("UTC").tz_convert(tz).array
            except Exception as exc:
                raise ValueCodecError(f"an unknown time zone {tz!r} ({exc})") from None
        if kind == "masked":
            dtype = _typed(node["dtype"], str)
            if dtype not in _NULLABLE:
                raise ValueCodecError(f"an unknown nullable dtype {dtype[:40]!r}")
            values, mask = self.array(node["a"]), self.array(node["mask"])
            if mask.dtype != np.bool_ or mask.shape != values.shape or values.ndim != 1:
                raise ValueCodecError("a nullable column whose mask does not fit its values")
            result = pd.array(values, dtype=dtype)
            result[mask] = pd.NA
            return result
        if kind == "str":
            lengths = self.array(node["lengths"])
            data = bytes(self.buffer(node["b"]))
            if lengths.dtype != np.dtype("<i8") or lengths.ndim != 1:
                raise ValueCodecError("a malformed string column")
            sizes = lengths.tolist()
            if any(n < -1 for n in sizes) or sum(n for n in sizes if n > 0) != len(data):
                raise ValueCodecError("a string column whose lengths do not match its bytes")
            self.count(depth, len(lengths))
            out: list[Any] = []
            at = 0
            for n in lengths.tolist():
                if n < 0:
                    out.append(None)
                else:
                    out.append(data[at:at + n].decode("utf-8", "surrogatepass"))
                    at += n
            spec = node.get("dtype")
            dtype = _string_dtype(_typed(spec, dict)) if spec is not None else None
            if spec is None and not node.get("objects"):
                return out  # a list: this pandas makes of it what it makes of strings
            if dtype is None:  # an object column (what pandas before 3 makes of strings)
                missing = np.nan if spec is not None else None
                return _objects([missing if v is None else v for v in out])
            return pd.array(out, dtype=dtype)
        if kind == "obj":
            items = _typed(node["items"], list)
            return _objects([self.node(x, depth + 1) for x in items])
        raise ValueCodecError(f"an unknown kind of column {str(kind)[:40]!r}")

    def index(self, node: Any, depth: int) -> Any:
        import pandas as pd

        self.count(depth)
        kind = _typed(node, dict).get("k")
        if kind == "range":
            start, stop, step = (_typed(node[k], int) for k in ("start", "stop", "step"))
            if step == 0 or not all(-(1 << 63) <= n < 1 << 63 for n in (start, stop, step)) \
                    or len(range(start, stop, step)) > 1 << 40:
                raise ValueCodecError("a range index out of bounds")
            return pd.RangeIndex(start, stop, step, name=self.node(node["name"], depth + 1))
        if kind == "multi":
            names = [self.node(n, depth + 1) for n in _typed(node["names"], list)]
            levels = [self.column(c, depth + 1) for c in _typed(node["levels"], list)]
            if not levels or len(names) != len(levels) or len({len(v) for v in levels}) > 1:
                raise ValueCodecError("a malformed MultiIndex")
            return pd.MultiIndex.from_arrays(levels, names=names)
        if kind == "index":
            values = self.column(node["col"], depth + 1)
            index = pd.Index(values, name=self.node(node["name"], depth + 1),
                             dtype=_object_or_none(values))
            freq = node.get("freq")
            if freq is not None:
                if type(freq) is not str or not _FREQ.match(freq) or not hasattr(index, "freq"):
                    raise ValueCodecError("a malformed index frequency")
                # pandas renamed frequencies between versions ('M' and 'ME', 'H' and 'h'):
                # one this pandas does not know leaves the index without it, as data.
                with contextlib.suppress(ValueError, TypeError):
                    index = type(index)(index, freq=freq)
            return index
        raise ValueCodecError(f"an unknown kind of index {str(kind)[:40]!r}")


def _string_dtype(spec: dict[str, Any]) -> Any:
    """pandas' string dtype as the blob names it (its storage, and NaN or NA for missing);
    None where this pandas has no such dtype (an object column is the nearest)."""
    import numpy as np
    import pandas as pd

    storage = spec.get("storage")
    if storage not in ("python", "pyarrow"):
        raise ValueCodecError("a string column of an unknown storage")
    if storage == "pyarrow" and importlib.util.find_spec("pyarrow") is None:
        storage = "python"  # the same strings, kept by Python here
    if spec.get("na") == "nan":
        try:
            return pd.StringDtype(storage, na_value=np.nan)
        except TypeError:  # a pandas before 2.3, whose strings are objects with NaN missing
            return None
    return pd.StringDtype(storage)


def _objects(items: list[Any]) -> Any:
    """A one-dimensional object array of ``items`` (numpy would make lists of equal length
    a second dimension)."""
    import numpy as np

    out = np.empty(len(items), dtype=object)
    for position, item in enumerate(items):
        out[position] = item
    return out


def _object_or_none(values: Any) -> Any:
    """``object`` for a numpy object array (so that pandas 3 keeps it, not inferring
    strings)."""
    import numpy as np

    return object if isinstance(values, np.ndarray) and values.dtype == object else None


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise ValueCodecError(f"a malformed value (expected {kind.__name__})")
    return value


def _float(text: Any) -> float:
    if type(text) is not str or len(text) > 40:
        raise ValueCodecError("a malformed float")
    try:
        return float.fromhex(text)
    except ValueError:
        raise ValueCodecError("a malformed float") from None
