"""The layer-unpack worker process: ``python -m vmruntime.rootfs.unpack_worker``.

Who runs it: :class:`vmruntime.rootfs.unpack.LayerPipeline`, for large layers.
Arguments: the layer's digest (for error messages) and the path to build the
EROFS image at, or ``-`` to only hash. Standard input is the layer blob as it
downloads; standard output is one JSON object: ``{"diff_id": ...}`` plus
``"build_error"`` when the tar could not become an image, or ``"layer_error"``
/ ``"oserror"`` when the stream or the disk failed. When its feeder dies the
worker reads end-of-file, reports a truncated stream and exits.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from vmruntime.errors import LayerError
from vmruntime.rootfs.unpack import digest_and_build, encode_layer_error


def main(argv: list[str]) -> int:
    """Unpack standard input; print the JSON answer. Always exits 0: the answer says how it went."""
    # Short-lived and creating no cycles worth collecting: the collector's passes over the
    # tar parser's many small objects cost about 8% of the worker's CPU.
    gc.disable()
    layer_digest, temp_arg = argv
    temp = None if temp_arg == "-" else Path(temp_arg)
    answer: dict[str, object]
    try:
        outcome = digest_and_build(sys.stdin.buffer, layer_digest, temp)  # type: ignore[arg-type]
        answer = {"diff_id": outcome.diff_id}
        if outcome.build_error is not None:
            answer["build_error"] = encode_layer_error(outcome.build_error)
    except LayerError as exc:
        answer = {"layer_error": encode_layer_error(exc)}
    except OSError as exc:
        answer = {
            "oserror": {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
        }
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
