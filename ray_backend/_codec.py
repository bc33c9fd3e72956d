"""The plain-data codec: how a result crosses from the guest to the host without the host
ever running guest-chosen code (format version 1; spec in ``docs/ray-worker-protocol.md``).

Who calls it: the guest worker encodes results with :func:`encode`; the host decodes them
with :func:`decode`. It also rebuilds numpy arrays and pandas objects that the host sends
as call arguments (:func:`rebuild_array`, :func:`rebuild_frame`, :func:`rebuild_series`),
so arguments do not depend on both sides having the same numpy and pandas versions.

What it promises: :func:`decode` only parses. It builds plain Python data (None, bool, int,
float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset), numpy arrays and
scalars of non-object dtypes, and pandas DataFrames, Series and indexes made of those; it
imports nothing that the bytes name and calls no constructor that they choose. Malformed
input is a :class:`MalformedError`; :func:`encode` refuses anything else with an
:class:`UnsupportedTypeError` naming the type.

Shipped into the guest beside the worker: standard library only at import time; numpy and
pandas are imported when a value needs them.
"""

from __future__ import annotations

import pickle
import re
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

VERSION = 1
MAX_DEPTH = 100
# Bytes and arrays at least this large travel as out-of-band buffers, not in the body.
OUT_OF_BAND = 64 << 10
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_C128 = struct.Struct(">dd")
# What a dtype may look like: numbers, bools, datetimes, fixed strings and raw bytes.
# Object and structured dtypes (and anything else numpy would parse) are refused.
_DTYPE = re.compile(
    r"[<>|=]?(?:b1|[iu][1248]|f(?:2|4|8|16)|c(?:8|16|32)|[mM]8(?:\[[0-9]{0,4}[a-zA-Z]{1,2}\])?"
    r"|[US][0-9]{1,9}|V[0-9]{1,9})"
)
_MAX_DTYPE_TEXT = 32


class CodecError(ValueError):
    """A value the codec cannot carry, or bytes it cannot read."""


class UnsupportedTypeError(CodecError):
    """A value that is not plain data (its type is in ``type_name``)."""

    def __init__(self, type_name: str, detail: str = "") -> None:
        super().__init__(f"{type_name}{': ' + detail if detail else ''}")
        self.type_name = type_name


class MalformedError(CodecError):
    """Bytes that do not follow the format."""


def type_name(value: object) -> str:
    kind = type(value)
    module = getattr(kind, "__module__", "?")
    qualname = getattr(kind, "__qualname__", kind.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


# --- encoding (in the guest) ----------------------------------------------------------


class _Encoder:
    def __init__(self) -> None:
        self.out = bytearray()
        self.buffers: list[memoryview] = []

    def value(self, value: Any, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise UnsupportedTypeError(type_name(value), f"nested deeper than {MAX_DEPTH}")
        kind = type(value)
        handler = _SCALARS.get(kind)
        if handler is not None:
            handler(self, value)
            return
        container = _CONTAINERS.get(kind)
        if container is not None:
            container(self, value, depth + 1)
            return
        self.foreign(value, depth + 1)

    def foreign(self, value: Any, depth: int) -> None:
        numpy = sys.modules.get("numpy")
        pandas = sys.modules.get("pandas")
        if numpy is not None and isinstance(value, numpy.ndarray) and type(value) is numpy.ndarray:
            self.array(value)
        elif numpy is not None and isinstance(value, numpy.generic):
            self.numpy_scalar(value)
        elif pandas is not None and type(value) is pandas.DataFrame:
            self.frame(value, depth)
        elif pandas is not None and type(value) is pandas.Series:
            self.series(value, depth)
        elif pandas is not None and isinstance(value, pandas.Index):
            self.index(value, depth)
        else:
            raise UnsupportedTypeError(type_name(value))

    def tag(self, tag: bytes) -> None:
        self.out += tag

    def blob(self, tag: bytes, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        if data.nbytes >= OUT_OF_BAND:
            self.out += tag.upper() + _U32.pack(len(self.buffers))
            self.buffers.append(data)
        else:
            self.out += tag + _U64.pack(data.nbytes) + data

    def text(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.out += b"s" + _U64.pack(len(data)) + data

    def items(self, tag: bytes, values: Any, depth: int) -> None:
        values = list(values)
        self.out += tag + _U64.pack(len(values))
        for item in values:
            self.value(item, depth)

    def mapping(self, value: dict, depth: int) -> None:
        self.out += b"d" + _U64.pack(len(value))
        for key, item in value.items():
            self.value(key, depth)
            self.value(item, depth)

    def array(self, array: Any) -> None:
        descr = _array_descr(array.dtype)
        contiguous = array if array.flags.c_contiguous else array.copy(order="C")
        self.out += b"A" + _U8.pack(len(descr)) + descr.encode() + _U8.pack(array.ndim)
        for dim in array.shape:
            self.out += _U64.pack(dim)
        self.blob(b"b", contiguous.reshape(-1).view("u1") if contiguous.size else b"")

    def numpy_scalar(self, scalar: Any) -> None:
        descr = _array_descr(scalar.dtype)
        self.out += b"a" + _U8.pack(len(descr)) + descr.encode()
        self.blob(b"b", scalar.tobytes())

    def frame(self, frame: Any, depth: int) -> None:
        self.out += b"D"
        self.index(frame.columns, depth)
        self.index(frame.index, depth)
        self.out += _U64.pack(frame.shape[1])
        for position in range(frame.shape[1]):
            self.column(frame.iloc[:, position], depth)

    def series(self, series: Any, depth: int) -> None:
        self.out += b"R"
        self.value(series.name, depth)
        self.index(series.index, depth)
        self.column(series, depth)

    def column(self, column: Any, depth: int) -> None:
        numpy = sys.modules["numpy"]
        if not isinstance(column.dtype, numpy.dtype):
            raise UnsupportedTypeError(type_name(column), f"column of dtype {column.dtype}")
        values = column.to_numpy()
        if values.dtype.hasobject:
            self.items(b"l", values.tolist(), depth)
        else:
            self.array(values)

    def index(self, index: Any, depth: int) -> None:
        pandas = sys.modules["pandas"]
        kind = type(index)
        if kind is pandas.RangeIndex:
            self.out += b"Ir"
            for number in (index.start, index.stop, index.step):
                _encode_int(self, number)
        elif not isinstance(index, pandas.MultiIndex):  # its dtype is checked as a column's
            self.out += b"Iv"
            self.column(index, depth)
        else:
            raise UnsupportedTypeError(type_name(index))
        self.value(index.name, depth)


def _array_descr(dtype: Any) -> str:
    descr = dtype.str
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsupportedTypeError("numpy.ndarray", f"dtype {dtype} is not plain data")
    if not _DTYPE.fullmatch(descr):
        raise UnsupportedTypeError("numpy.ndarray", f"dtype {descr} is not supported")
    return descr


def _encode_int(encoder: _Encoder, value: int) -> None:
    data = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    encoder.out += b"i" + _U32.pack(len(data)) + data


_SCALARS: dict[type, Callable[[_Encoder, Any], None]] = {
    type(None): lambda e, v: e.tag(b"N"),
    bool: lambda e, v: e.tag(b"T" if v else b"F"),
    int: _encode_int,
    float: lambda e, v: e.tag(b"f" + _F64.pack(v)),
    complex: lambda e, v: e.tag(b"c" + _C128.pack(v.real, v.imag)),
    str: lambda e, v: e.text(v),
    bytes: lambda e, v: e.blob(b"b", v),
    bytearray: lambda e, v: e.blob(b"y", v),
}
_CONTAINERS: dict[type, Callable[[_Encoder, Any, int], None]] = {
    list: lambda e, v, d: e.items(b"l", v, d),
    tuple: lambda e, v, d: e.items(b"t", v, d),
    set: lambda e, v, d: e.items(b"S", v, d),
    frozenset: lambda e, v, d: e.items(b"Z", v, d),
    dict: _Encoder.mapping,
}


def encode(value: Any) -> tuple[bytes, list[memoryview]]:
    """``value`` as a body and its out-of-band buffers; :class:`UnsupportedTypeError` for
    anything that is not plain data."""
    encoder = _Encoder()
    encoder.value(value)
    return bytes(encoder.out), encoder.buffers


# --- decoding (on the host) -------------------------------------------------------------


class _Decoder:
    def __init__(self, body: bytes | memoryview, buffers: Sequence[bytes | bytearray | memoryview]):
        self.body = memoryview(body).cast("B")
        self.buffers = buffers
        self.used: set[int] = set()
        self.at = 0

    def take(self, size: int) -> memoryview:
        end = self.at + size
        if size < 0 or end > self.body.nbytes:
            raise MalformedError(f"truncated at byte {self.at} (wanted {size} more)")
        data = self.body[self.at:end]
        self.at = end
        return data

    def unpack(self, layout: struct.Struct) -> Any:
        return layout.unpack(self.take(layout.size))

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def count(self) -> int:
        # Every item takes at least a byte, so a count larger than what is left is a lie
        # (and would make the decoder allocate for nothing).
        count = self.u64()
        if count > self.body.nbytes - self.at:
            raise MalformedError(f"a count of {count} exceeds the bytes left")
        return count

    def buffer(self) -> memoryview:
        (index,) = self.unpack(_U32)
        if index >= len(self.buffers) or index in self.used:
            raise MalformedError(f"buffer {index} is missing or used twice")
        self.used.add(index)
        return memoryview(self.buffers[index]).cast("B")

    def blob(self, tag: bytes) -> memoryview:
        if tag.islower():
            return self.take(self.u64())
        return self.buffer()

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise MalformedError(f"nested deeper than {MAX_DEPTH}")
        tag = bytes(self.take(1))
        reader = _READERS.get(tag)
        if reader is None:
            raise MalformedError(f"unknown tag {tag!r} at byte {self.at - 1}")
        return reader(self, tag, depth + 1)

    def text(self) -> str:
        tag = bytes(self.take(1))
        if tag != b"s":
            raise MalformedError(f"expected a string, found tag {tag!r}")
        return _read_str(self, tag, 0)

    def items(self, depth: int) -> list[Any]:
        return [self.value(depth) for _ in range(self.count())]

    def hashable(self, depth: int) -> Any:
        item = self.value(depth)
        try:
            hash(item)
        except TypeError:
            raise MalformedError(f"an unhashable {type_name(item)} as a set item or key") from None
        return item


def _read_int(d: _Decoder, tag: bytes, depth: int) -> int:
    (size,) = d.unpack(_U32)
    return int.from_bytes(d.take(size), "big", signed=True)


def _read_str(d: _Decoder, tag: bytes, depth: int) -> str:
    try:
        return str(d.take(d.u64()), "utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"a string that is not UTF-8: {exc}") from None


def _read_dict(d: _Decoder, tag: bytes, depth: int) -> dict:
    result = {}
    for _ in range(d.count()):
        key = d.hashable(depth)
        result[key] = d.value(depth)
    return result


def _read_array(d: _Decoder, tag: bytes, depth: int) -> Any:
    numpy = _numpy()
    dtype = _checked_dtype(numpy, d)
    (ndim,) = d.unpack(_U8)
    shape = tuple(d.u64() for _ in range(ndim))
    size = 1
    for dim in shape:
        size *= dim
    data = d.blob(bytes(d.take(1)))
    if size * dtype.itemsize != data.nbytes:
        raise MalformedError(f"array of {shape} {dtype} has {data.nbytes} bytes of data")
    if size == 0:
        return numpy.empty(shape, dtype)
    # A copy of inline data (it is a slice of the body) keeps arrays writable; an
    # out-of-band buffer is the host's own bytearray, used as it is.
    source = data if isinstance(data.obj, bytearray) else bytearray(data)
    return numpy.frombuffer(source, dtype=dtype).reshape(shape)


def _read_numpy_scalar(d: _Decoder, tag: bytes, depth: int) -> Any:
    numpy = _numpy()
    dtype = _checked_dtype(numpy, d)
    data = d.blob(bytes(d.take(1)))
    if data.nbytes != dtype.itemsize or dtype.itemsize == 0:
        raise MalformedError(f"a {dtype} scalar of {data.nbytes} bytes")
    return numpy.frombuffer(bytes(data), dtype=dtype)[0]


def _checked_dtype(numpy: Any, d: _Decoder) -> Any:
    (size,) = d.unpack(_U8)
    try:
        descr = str(d.take(size), "ascii")
    except UnicodeDecodeError:
        raise MalformedError("a dtype that is not ASCII") from None
    if size > _MAX_DTYPE_TEXT or not _DTYPE.fullmatch(descr):
        raise MalformedError(f"dtype {descr!r} is not allowed")
    try:
        dtype = numpy.dtype(descr)
    except (TypeError, ValueError) as exc:
        raise MalformedError(f"dtype {descr!r}: {exc}") from None
    if dtype.hasobject:
        raise MalformedError(f"dtype {descr!r} holds objects")
    return dtype


def _read_column(d: _Decoder, depth: int) -> Any:
    numpy = _numpy()
    tag = bytes(d.take(1))
    if tag == b"A":
        return _read_array(d, tag, depth)
    if tag != b"l":
        raise MalformedError(f"a column must be an array or a list, found tag {tag!r}")
    items = d.items(depth)
    column = numpy.empty(len(items), dtype=object)
    for position, item in enumerate(items):
        column[position] = item
    return column


def _read_index(d: _Decoder, depth: int) -> Any:
    pandas = _pandas()
    if bytes(d.take(1)) != b"I":
        raise MalformedError("expected an index")
    kind = bytes(d.take(1))
    if kind == b"r":
        start, stop, step = (_read_int(d, b"i", depth) if bytes(d.take(1)) == b"i" else None
                             for _ in range(3))  # fmt: skip
        if None in (start, stop, step) or step == 0:
            raise MalformedError("a range index needs three integers and a non-zero step")
        index = pandas.RangeIndex(start, stop, step)
    elif kind == b"v":
        index = pandas.Index(_read_column(d, depth), copy=False)
    else:
        raise MalformedError(f"unknown index kind {kind!r}")
    index.name = d.hashable(depth)
    return index


def _read_frame(d: _Decoder, tag: bytes, depth: int) -> Any:
    pandas = _pandas()
    columns = _read_index(d, depth)
    index = _read_index(d, depth)
    count = d.count()
    if count != len(columns):
        raise MalformedError(f"{count} columns for {len(columns)} labels")
    data = {position: _read_column(d, depth) for position in range(count)}
    if any(len(column) != len(index) for column in data.values()):
        raise MalformedError("a column's length differs from the index's")
    frame = pandas.DataFrame(data, index=index, copy=False) if count else pandas.DataFrame(
        index=index)
    frame.columns = columns
    return frame


def _read_series(d: _Decoder, tag: bytes, depth: int) -> Any:
    pandas = _pandas()
    name = d.hashable(depth)
    index = _read_index(d, depth)
    values = _read_column(d, depth)
    if len(values) != len(index):
        raise MalformedError("a series' length differs from its index's")
    return pandas.Series(values, index=index, name=name, copy=False)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise MalformedError("a numpy array, but numpy is not installed here") from None
    return numpy


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise MalformedError("a pandas object, but pandas is not installed here") from None
    return pandas


_READERS: dict[bytes, Callable[[_Decoder, bytes, int], Any]] = {
    b"N": lambda d, t, n: None,
    b"T": lambda d, t, n: True,
    b"F": lambda d, t, n: False,
    b"i": _read_int,
    b"f": lambda d, t, n: d.unpack(_F64)[0],
    b"c": lambda d, t, n: complex(*d.unpack(_C128)),
    b"s": _read_str,
    b"b": lambda d, t, n: bytes(d.blob(t)),
    b"B": lambda d, t, n: bytes(d.blob(t)),
    b"y": lambda d, t, n: bytearray(d.blob(t)),
    b"Y": lambda d, t, n: bytearray(d.blob(t)),
    b"l": lambda d, t, n: d.items(n),
    b"t": lambda d, t, n: tuple(d.items(n)),
    b"S": lambda d, t, n: {d.hashable(n) for _ in range(d.count())},
    b"Z": lambda d, t, n: frozenset(d.hashable(n) for _ in range(d.count())),
    b"d": _read_dict,
    b"A": _read_array,
    b"a": _read_numpy_scalar,
    b"D": _read_frame,
    b"R": _read_series,
}


def decode(body: bytes | memoryview, buffers: Sequence[bytes | bytearray | memoryview] = ()) -> Any:
    """The value in ``body`` (with its out-of-band ``buffers``), built without running any
    code that the bytes choose; :class:`MalformedError` if they are not well formed."""
    decoder = _Decoder(body, buffers)
    value = decoder.value()
    if decoder.at != decoder.body.nbytes:
        raise MalformedError(f"{decoder.body.nbytes - decoder.at} bytes after the value")
    if len(decoder.used) != len(buffers):
        raise MalformedError(f"{len(buffers) - len(decoder.used)} buffers were not used")
    return value


# --- arguments (host -> guest, rebuilt in the guest while unpickling) ------------------


def rebuild_array(descr: str, shape: tuple[int, ...], data: Any) -> Any:
    """An array the host sent as its dtype, shape and a protocol 5 buffer."""
    import numpy

    dtype = numpy.dtype(descr)
    if not numpy.prod(shape, dtype=numpy.int64):
        return numpy.empty(shape, dtype)
    return numpy.frombuffer(data, dtype=dtype).reshape(shape)


def rebuild_objects(shape: tuple[int, ...], items: list[Any]) -> Any:
    """An object array the host sent as its shape and items."""
    import numpy

    array = numpy.empty(len(items), dtype=object)
    for position, item in enumerate(items):
        array[position] = item
    return array.reshape(shape)


def rebuild_scalar(descr: str, data: bytes) -> Any:
    import numpy

    return numpy.frombuffer(data, dtype=numpy.dtype(descr))[0]


def rebuild_index(parts: tuple[Any, ...]) -> Any:
    import pandas

    if parts[0] == "range":
        _, start, stop, step, name = parts
        return pandas.RangeIndex(start, stop, step, name=name)
    _, values, name = parts
    return pandas.Index(values, name=name, copy=False)


def rebuild_series(values: Any, index: tuple[Any, ...], name: Any) -> Any:
    import pandas

    return pandas.Series(values, index=rebuild_index(index), name=name, copy=False)


def rebuild_frame(columns: tuple[Any, ...], index: tuple[Any, ...], values: list[Any]) -> Any:
    import pandas

    frame = pandas.DataFrame(dict(enumerate(values)), index=rebuild_index(index), copy=False)
    frame.columns = rebuild_index(columns)
    return frame


def _index_parts(index: Any) -> tuple[Any, ...]:
    pandas = sys.modules["pandas"]
    if type(index) is pandas.RangeIndex:
        return ("range", index.start, index.stop, index.step, index.name)
    return ("values", index.to_numpy(), index.name)


def _flat(*indexes: Any) -> bool:
    multi = sys.modules["pandas"].MultiIndex
    return not any(isinstance(index, multi) for index in indexes)


def reduce_argument(value: Any) -> Any:
    """A pickle reduction for numpy arrays and scalars and pandas frames and series that the
    guest can rebuild whatever its numpy and pandas versions (NotImplemented for anything else, as
    ``reducer_override`` expects)."""
    numpy = sys.modules.get("numpy")
    pandas = sys.modules.get("pandas")
    if numpy is not None and type(value) is numpy.ndarray and not value.dtype.hasobject \
            and value.dtype.fields is None:  # fmt: skip
        contiguous = value if value.flags.c_contiguous else value.copy(order="C")
        return rebuild_array, (value.dtype.str, value.shape, pickle.PickleBuffer(contiguous))
    if numpy is not None and type(value) is numpy.ndarray and value.dtype == object:
        return rebuild_objects, (value.shape, value.ravel().tolist())
    if numpy is not None and isinstance(value, numpy.generic) and value.dtype.fields is None \
            and not value.dtype.hasobject:  # fmt: skip
        return rebuild_scalar, (value.dtype.str, value.tobytes())
    if pandas is not None and type(value) is pandas.DataFrame and _flat(value.index, value.columns):
        values = [value.iloc[:, position].to_numpy() for position in range(value.shape[1])]
        return rebuild_frame, (_index_parts(value.columns), _index_parts(value.index), values)
    if pandas is not None and type(value) is pandas.Series and _flat(value.index):
        return rebuild_series, (value.to_numpy(), _index_parts(value.index), value.name)
    return NotImplemented
