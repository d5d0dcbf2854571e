"""Compact JSON (no spaces), fast: the hot paths (every job's run record, every launcher request,
every stored spec) encode small objects many thousand times a second, and json.dumps, even a
reused JSONEncoder, builds a new C encoder on each call. This builds it once.

The output is exactly json.dumps(obj, separators=(",", ":")) (tests/test_compactjson.py). Objects
must not contain themselves: the circular check is off, as it is what needs the per-call state.
"""

from __future__ import annotations

import json
from json import encoder as _encoder
from typing import Any, Callable


def _unserialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make() -> Callable[[Any], str]:
    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
    iterencode = make(None, _unserialisable, _encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def dumps(value: Any) -> str:
        if isinstance(value, str):
            return _encoder.encode_basestring_ascii(value)
        return "".join(iterencode(value, 0))

    return dumps


dumps = _make()
