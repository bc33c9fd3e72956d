"""The Ray front door's worker protocol without a VM: the plain-data codec (from the
attacker's side: forged bytes), message framing, how replies become values and
exceptions, how calls are pickled, and the guest worker itself run as a host process."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.experimental.sandbox import exceptions as ray_errors

from ray_backend import _codec, _wire
from ray_backend.errors import (
    SandboxTaskError,
    SandboxTimeoutError,
    UntrustedResultError,
    WorkerDiedError,
)
from ray_backend.results import guest_exception, printable
from ray_backend.worker import function_key, pickle_call, pickle_function, worker_bundle
from vmruntime.errors import CommandFailedError, ExecStartError

U64 = struct.Struct(">Q")

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary() | st.complex_numbers(allow_nan=False),
    lambda inner: st.lists(inner) | st.tuples(inner, inner)
    | st.dictionaries(st.text() | st.integers(), inner)
    | st.frozensets(st.integers() | st.text()),
    max_leaves=30,
)  # fmt: skip


def round_trip(value: Any) -> Any:
    body, buffers = _codec.encode(value)
    return _codec.decode(body, [bytearray(b) for b in buffers])


@given(plain)
def test_plain_data_round_trips(value: Any) -> None:
    assert round_trip(value) == value


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_random_bytes_are_malformed_or_a_value_never_anything_else(data: bytes) -> None:
    with contextlib.suppress(_codec.MalformedError):
        _codec.decode(data)


def test_large_bytes_and_arrays_travel_out_of_band() -> None:
    array = np.arange(1 << 16, dtype=np.float64).reshape(256, 256)
    body, buffers = _codec.encode({"array": array, "raw": b"x" * (1 << 17)})
    assert len(body) < 200 and sorted(b.nbytes for b in buffers) == [1 << 17, 1 << 19]
    out = _codec.decode(body, [bytearray(b) for b in buffers])
    assert np.array_equal(out["array"], array) and out["array"].flags.writeable


def test_arrays_of_every_plain_dtype_and_pandas_objects_round_trip() -> None:
    for dtype in ("<i1", ">u4", "<f2", "<c16", "|b1", "<M8[ns]", "<m8[s]", "<U7", "|S3", "|V4"):
        array = np.zeros((2, 3), dtype=dtype)
        assert round_trip(array).dtype == np.dtype(dtype)
    when = pd.to_datetime(["2026-01-01"] * 2)
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None], "when": when},
                         index=pd.RangeIndex(5, 7, name="n"))  # fmt: skip
    pd.testing.assert_frame_equal(round_trip(frame), frame)
    series = pd.Series([1.5, 2.5], index=pd.Index(["p", "q"], name="k"), name=("tuple", 1))
    pd.testing.assert_series_equal(round_trip(series), series)
    assert round_trip(np.int16(-3)) == np.int16(-3) and type(round_trip(np.int16(-3))) is np.int16


class Custom:
    pass


class Text(str):
    pass


@pytest.mark.parametrize(("value", "named"), [
    (Custom(), "Custom"),
    (Text("a str subclass"), "Text"),
    ([1, {"deep": object()}], "object"),
    (np.array([object()], dtype=object), "numpy.ndarray"),
    (np.zeros(2, dtype=[("x", "<i4")]), "numpy.ndarray"),
    (pd.DataFrame({"c": pd.Categorical(["a"])}), "pandas.core.series.Series"),
    (pd.Series([1], index=pd.MultiIndex.from_tuples([(1, 2)])), "MultiIndex"),
    (lambda: None, "function"),
])  # fmt: skip
def test_anything_but_plain_data_is_refused_by_type(value: Any, named: str) -> None:
    with pytest.raises(_codec.UnsupportedTypeError) as caught:
        _codec.encode(value)
    assert named in caught.value.type_name


def u64(number: int) -> bytes:
    return U64.pack(number)


@pytest.mark.parametrize(("body", "buffers", "detail"), [
    (b"l" + u64(2**62), [], "exceeds the bytes left"),
    ((b"l" + u64(1)) * 500 + b"N", [], "nested deeper"),
    (b"B" + struct.pack(">I", 3), [], "buffer 3 is missing"),
    (b"t" + u64(2) + b"B\0\0\0\0B\0\0\0\0", [b"x"], "used twice"),
    (b"N", [b"unused"], "were not used"),
    (b"NN", [], "after the value"),
    (b"s" + u64(2) + b"\xff\xfe", [], "not UTF-8"),
    (b"d" + u64(1) + b"l" + u64(0) + b"N", [], "unhashable"),
    (b"S" + u64(1) + b"d" + u64(0), [], "unhashable"),
    (b"A\x02|O\x01" + u64(1) + b"b" + u64(8) + bytes(8), [], "not allowed"),
    (b"A\x0a[('a','O')]\x01" + u64(1) + b"b" + u64(8) + bytes(8), [], "not allowed"),
    (b"A\x03<f8\x01" + u64(3) + b"b" + u64(8) + bytes(8), [], "bytes of data"),
    (b"A\x03<f8\x02" + u64(2**40) + u64(2**40) + b"b" + u64(0), [], "bytes of data"),
    (b"a\x03<f8b" + u64(4) + bytes(4), [], "scalar of 4 bytes"),
    (b"D" + b"Iv" + b"l" + u64(1) + b"N" + b"N" + b"Ir" + b"i\0\0\0\x01\x00" * 2
     + b"i\0\0\0\x01\x01N" + u64(2) + b"N" * 8, [], "2 columns for 1 labels"),
    (b"Ir" + b"i\0\0\0\x01\x00" * 3 + b"N", [], "unknown tag"),
    (b"\x80", [], "unknown tag"),
])  # fmt: skip
def test_forged_values_are_malformed(body: bytes, buffers: list[bytes], detail: str) -> None:
    with pytest.raises(_codec.MalformedError) as caught:
        _codec.decode(body, buffers)
    assert detail in str(caught.value)


def test_message_headers_are_checked_before_anything_is_allocated() -> None:
    good = _wire.encode_header(_wire.Kind.RESULT, b"N", [])
    assert _wire.parse_header(good).body_length == 1
    for forged, detail in [
        (b"XXXX" + good[4:], "bad magic"),
        (good[:4] + b"\x09" + good[5:], "version 9"),
        (_wire.HEADER.pack(_wire.MAGIC, 1, 2, 0, 2**20, 0), "buffers exceed"),
        (_wire.HEADER.pack(_wire.MAGIC, 1, 2, 0, 0, 2**40), "exceeds the limit"),
    ]:
        with pytest.raises(_wire.WireError, match=detail):
            _wire.parse_header(forged)
    with pytest.raises(_wire.WireError, match="exceed the limit"):
        _wire.parse_lengths(u64(2**33) + u64(2**33), 2, 4 << 30)


# --- replies become values and exceptions ------------------------------------------------


def test_builtin_exceptions_are_rebuilt_with_the_guest_traceback_as_a_note() -> None:
    error = guest_exception({"type": "builtins.KeyError", "message": "'k'",
                             "traceback": "Traceback...\nKeyError: 'k'"}, ("k",))  # fmt: skip
    assert type(error) is KeyError and error.args == ("k",)
    assert "traceback in the sandbox" in error.__notes__[0]


@pytest.mark.parametrize("type_name", [
    "builtins.SystemExit", "builtins.KeyboardInterrupt", "builtins.GeneratorExit",
    "os.system", "builtins.print", "__main__.MyError", "subprocess.CalledProcessError",
])  # fmt: skip
def test_other_exceptions_become_sandbox_task_errors(type_name: str) -> None:
    error = guest_exception({"type": type_name, "message": "m", "traceback": "tb"}, ("ls",))
    assert type(error) is SandboxTaskError and error.type_name == type_name


def test_a_builtin_exception_whose_arguments_do_not_fit_is_a_sandbox_task_error() -> None:
    info = {"type": "builtins.UnicodeDecodeError", "message": "m", "traceback": "tb"}
    assert type(guest_exception(info, (1,))) is SandboxTaskError


def test_guest_text_cannot_drive_the_callers_terminal() -> None:
    error = guest_exception({"type": "builtins.ValueError", "message": "\x1b[2J",
                             "traceback": "\x1b]0;owned\x07" + "x" * 100_000}, None)  # fmt: skip
    text = str(error) + error.__notes__[0]
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text
    assert len(error.__notes__[0]) < 70_000
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"


@pytest.mark.parametrize("error", [
    SandboxTaskError("t.T", "m", "tb"), UntrustedResultError("os.system"),
    WorkerDiedError("sb", -9, True, "tail"), SandboxTimeoutError("the call", 2.5),
    CommandFailedError("sb", ["false"], 1, b"", b"why"), ExecStartError("sb", ["x"], 2, "m"),
])  # fmt: skip
def test_errors_survive_the_trip_through_ray(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert again.__dict__.keys() >= {k for k in error.__dict__ if not k.startswith("_")}


# --- calls and the worker ------------------------------------------------------------------


def make_call(fn: Any, *args: Any, pickled: bool = False,
              known: bool = False) -> tuple[bytes, list[memoryview]]:  # fmt: skip
    function = pickle_function(fn)
    return pickle_call(function_key(function), None if known else function, args, {}, pickled)


def unpickle_without_the_tests_on_the_path(payload: bytes, buffers: list[bytes],
                                           expression: str) -> str:  # fmt: skip
    """Load a call in a fresh Python that cannot import the test modules, and evaluate
    ``expression`` over ``fn, args, kwargs``."""
    script = (
        "import pickle, sys\n"
        "data = sys.stdin.buffer.read()\n"
        f"payload, buffers = pickle.loads(data)\n"
        "_, function, args, kwargs, _ = pickle.loads(payload, buffers=buffers)\n"
        "fn = pickle.loads(function)\n"
        f"print({expression})\n"
    )
    repo = str(Path(__file__).parent.parent)
    result = subprocess.run([sys.executable, "-c", script], input=pickle.dumps((payload, buffers)),
                            capture_output=True, cwd="/", check=False,
                            env={"PYTHONPATH": repo, "PATH": os.environ["PATH"]})  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def test_a_function_of_the_callers_own_module_travels_by_value() -> None:
    import ray_user_module

    payload, buffers = make_call(ray_user_module.add_offset, 5)
    assert unpickle_without_the_tests_on_the_path(
        payload, [bytes(b) for b in buffers], "fn(*args)") == "1005"


def test_arrays_go_as_protocol_5_buffers_the_guest_rebuilds_itself() -> None:
    array = np.arange(1 << 20, dtype=np.int32)
    payload, buffers = make_call(len, array)
    assert [b.nbytes for b in buffers] == [array.nbytes]
    assert b"rebuild_array" in payload and b"numpy._core" not in payload
    out = unpickle_without_the_tests_on_the_path(
        payload, [bytes(b) for b in buffers], "int(args[0].sum()), args[0].dtype")
    assert out == f"{int(array.sum())} int32"


def test_the_worker_bundle_carries_the_worker_and_the_hosts_cloudpickle() -> None:
    names = zipfile.ZipFile(io.BytesIO(worker_bundle())).namelist()
    for name in ("ray_backend/_worker.py", "ray_backend/_wire.pyc", "ray_backend/_codec.py",
                 "cloudpickle/cloudpickle.py", "cloudpickle/__init__.pyc"):  # fmt: skip
        assert name in names


@pytest.fixture
def host_worker(tmp_path: Path) -> Any:
    """The guest worker run on the host, from the bundle, as the guest runs it."""
    bundle = tmp_path / "worker.zip"
    bundle.write_bytes(worker_bundle())
    boot = (f"import sys; sys.path.insert(0, {str(bundle)!r}); "
            "from ray_backend._worker import main; main()")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-I", "-c", boot], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path)  # fmt: skip
    yield process
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        pipe.close()


def read_reply(stream: Any) -> tuple[int, Any]:
    header = _wire.parse_header(stream.read(_wire.HEADER.size))
    count = header.buffer_count
    lengths = _wire.parse_lengths(stream.read(8 * count), count, 1 << 40)
    body = stream.read(header.body_length)
    buffers = [bytearray(stream.read(n)) for n in lengths]
    if header.kind == _wire.Kind.PICKLED_RESULT:
        return header.kind, body
    return header.kind, _codec.decode(body, buffers)


def send_call(process: Any, fn: Any, *args: Any, pickled: bool = False,
              known: bool = False) -> tuple[int, Any]:  # fmt: skip
    payload, buffers = make_call(fn, *args, pickled=pickled, known=known)
    process.stdin.write(_wire.encode_header(_wire.Kind.CALL, payload, buffers) + payload)
    for buffer in buffers:
        process.stdin.write(buffer)
    process.stdin.flush()
    return read_reply(process.stdout)


def square_unknown_to_the_worker(value: int) -> int:
    return value * value


def prints_and_returns(value: int) -> int:
    print("to stderr, not into the messages")
    return value * 2


def test_the_worker_answers_calls_errors_and_refusals(host_worker: Any) -> None:
    kind, hello = read_reply(host_worker.stdout)
    assert kind == _wire.Kind.HELLO and hello["python"][:2] == list(sys.version_info[:2])
    assert send_call(host_worker, prints_and_returns, 21) == (_wire.Kind.RESULT, 42)
    # the worker keeps what it loaded: the function need not travel again
    assert send_call(host_worker, prints_and_returns, 4, known=True) == (_wire.Kind.RESULT, 8)
    kind, error = send_call(host_worker, square_unknown_to_the_worker, 3, known=True)
    assert kind == _wire.Kind.ERROR and error["type"] == "builtins.KeyError"
    kind, error = send_call(host_worker, int, "not a number")
    assert kind == _wire.Kind.ERROR and error["type"] == "builtins.ValueError"
    assert error["args"] == ("invalid literal for int() with base 10: 'not a number'",)
    kind, refusal = send_call(host_worker, Custom)
    assert kind == _wire.Kind.REFUSED and refusal["type"].endswith("Custom")
    kind, body = send_call(host_worker, Custom, pickled=True)
    assert kind == _wire.Kind.PICKLED_RESULT and b"Custom" in body
    array = np.arange(100_000, dtype=np.float32)
    kind, out = send_call(host_worker, np.negative, array)
    assert kind == _wire.Kind.RESULT and np.array_equal(out, -array)
    host_worker.stdin.close()
    assert host_worker.wait(30) == 0
    assert b"to stderr, not into the messages" in host_worker.stderr.read()


@pytest.mark.parametrize(("options", "named"), [
    ({"network": "public"}, "network"), ({"network": "bogus"}, "network"),
    ({"dns": ["1.1.1.1"]}, "dns"), ({"capabilities": []}, "capabilities"),
    ({"rootless": False}, "rootless"),
])  # fmt: skip
def test_options_a_microvm_cannot_honour_are_refused_before_an_actor_is_made(
        options: dict[str, Any], named: str) -> None:  # fmt: skip
    import ray_backend

    with pytest.raises(ray_backend.UnsupportedOptionError) as caught:
        ray_backend.create("vmruntime/default:latest", **options)
    assert caught.value.option == named
    assert isinstance(caught.value, ray_errors.SandboxCreationError)
