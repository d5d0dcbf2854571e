"""wmgr.compactjson.dumps is json.dumps(obj, separators=(",", ":")), byte for byte."""

from __future__ import annotations

import json

import pytest

from wmgr.compactjson import dumps

VALUES = [
    {}, [], "", "é\u2028\U0001f600\"\\\n\x00", 0, -1, 10**30, 0.1, 5.0, 1e-7, -0.0, float("inf"), float("nan"),
    True, False, None,
    {"cmd": "sleep 5 && echo \"x\"", "memory": 1000, "time": 3600.0, "env": ["A=1", "B=é"], "cpus": 0.5,
     "on_exit": [{"cleanup": True}], "labels": {"pman": {"root": "r", "meta": {"jid": 7}}}, "none": None},
    [1, [2, [3, {"a": [None, True]}]]],
    {1: "int keys become strings", 2.5: "so do floats", False: "and bools", None: "and None"},
]


@pytest.mark.parametrize("value", VALUES)
def test_same_as_json_dumps(value):
    assert dumps(value) == json.dumps(value, separators=(",", ":"))


def test_refuses_what_json_refuses():
    with pytest.raises(TypeError):
        dumps({"a": object()})
