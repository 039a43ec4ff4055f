"""The child side of `ToolSandbox` (tools.py): `python -m rlhf_ray.envs.sandbox_worker '<json list of paths>'`.

Protocol, one JSON object per line on the worker's original stdin/stdout:
- on start: `{"ready": true, "errors": {path: message}}` (tools that failed to import);
- per request `{"name", "arguments", "max_chars"}`: `{"ok": true, "output": str}` or
  `{"ok": false, "kind": "exception" | "bad_json" | "output_too_large", "error": str, "output": str}`.

The protocol moves to private duplicates of fds 0 and 1, and fds 0/1 become /dev/null, so a tool
that prints or reads stdin cannot corrupt it; stderr reaches the parent until the handshake (to
explain a failed start), then /dev/null, so a chatty tool cannot fill a pipe nobody reads.
Every exception a tool raises, SystemExit included, becomes a reply; what the worker cannot
survive (os._exit, a segfault, a hang) the parent sees as end-of-file or a missed deadline.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from rlhf_ray.envs.base import import_path


def main() -> None:
    requests, replies = _private_protocol_streams()
    tools, errors = _import_tools(json.loads(sys.argv[1]))
    _send(replies, {"ready": True, "errors": errors})
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # start-up errors went to the parent; tools' stderr goes nowhere
    for line in requests:
        request = json.loads(line)
        _send(replies, run_tool(tools[request["name"]], request["arguments"], request["max_chars"]))


def run_tool(fn: Callable, arguments: dict, max_chars: int) -> dict[str, Any]:
    """The reply for `fn(**arguments)`: a str result as is, anything else JSON-encoded, capped at max_chars."""
    try:
        result = fn(**arguments)
    except BaseException as error:  # noqa: BLE001 - a tool's failure is the policy's observation, not ours
        return _failure("exception", f"{type(error).__name__}: {error}"[:max_chars])
    if isinstance(result, str):
        output = result
    else:
        try:
            output = json.dumps(result)
        except (TypeError, ValueError) as error:
            return _failure("bad_json", f"returned a {type(result).__name__}, which is not JSON-serialisable "
                                        f"({error}); a tool should return a str or JSON-able data")
    if len(output) > max_chars:
        return _failure("output_too_large", f"output of {len(output)} characters is over the cap of {max_chars}",
                        output[:max_chars])
    return {"ok": True, "output": output}


def _failure(kind: str, error: str, output: str = "") -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": error, "output": output}


def _private_protocol_streams() -> tuple[TextIO, TextIO]:
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null_in, null_out = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_in, 0)
    os.dup2(null_out, 1)
    return requests, replies


def _import_tools(paths: list[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    tools, errors = {}, {}
    for path in paths:
        try:
            fn = import_path(path, "tool")
            if not callable(fn):
                raise TypeError(f"'{path}' is a {type(fn).__name__}, not a function")
            tools[path.rpartition(":")[2]] = fn
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises with the path
            errors[path] = f"{type(error).__name__}: {error}"
    return tools, errors


def _send(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


if __name__ == "__main__":
    main()
