"""Tool calling for agentic RL: the call format, tools described in the prompt, a sandbox that runs
tools in a separate process, and a base environment whose turns may call tools.

Format. A call is a JSON object between tags in the policy's turn,
    <tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>
the Hermes / Qwen2.5 convention (their chat templates ask for exactly this), so a model whose
template knows tools already writes it; each result comes back as `<tool_result>…</tool_result>`.
Parsing never raises: a malformed call is a `ToolCall` with `error` set, which the sandbox answers
with kind "bad_json", so the policy sees its mistake and the run goes on.

Prompt. `render_tools_prompt` uses the tokenizer's chat template with `tools=` (transformers' tool
use, https://huggingface.co/docs/transformers/chat_extras) when the template renders them, else a
plain-text preamble in the system turn that lists the tools and the format above.

Sandbox process model. `ToolSandbox` keeps one persistent worker process
(`python -m rlhf_ray.envs.sandbox_worker`, see there) and sends it one call at a time over pipes:
starting a Python process per call would cost 0.1-0.5 s, a thread could not be killed on a hang,
and a subprocess (not multiprocessing's spawn/forkserver) never re-imports the caller's `__main__`
(a Ray worker's, a pytest run's). The worker runs in its own session, so a kill on a missed
deadline reaches whatever the tool started; after a timeout or a crash the worker is killed and the
next call starts a fresh one. A call's deadline excludes worker start-up (bounded separately).
Calls are serialised by a lock: one worker per sandbox; a `SandboxPool` of several sandboxes runs
the calls of concurrent episodes side by side. This isolates the trainer from crashes,
hangs and floods; it is not a security boundary (the tool runs with the trainer's permissions).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rlhf_ray.envs.base import StepResult, ensure_running, import_path

if TYPE_CHECKING:
    from typing_extensions import Self

FAILURE_KINDS = ("timeout", "crash", "exception", "bad_json", "unknown_tool", "output_too_large")


# ---- the call format ----------------------------------------------------------------------------

_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str | None  # the tool asked for; None when the call could not be parsed
    arguments: dict  # keyword arguments for the tool; {} when the call could not be parsed
    raw: str  # the text between the tags
    error: str | None = None  # why the call is malformed; None for a well-formed call


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>…</tool_call>` in `text`, in order; a call that is not
    `{"name": str, "arguments": object}` (or runs to the end of the text unclosed) has `error` set."""
    return [_parse_call(match.group(1), closed=bool(match.group(2))) for match in _CALL.finditer(text)]


def strip_tool_calls(text: str) -> str:
    """`text` without its tool calls: what the policy said besides calling tools (e.g. its answer)."""
    return _CALL.sub("", text)


def _parse_call(body: str, closed: bool) -> ToolCall:
    if not closed:
        return ToolCall(None, {}, body, "unclosed <tool_call>; end each call with </tool_call>")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall(None, {}, body, f"not valid JSON ({error.msg} at character {error.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return ToolCall(None, {}, body, 'expected a JSON object {"name": "<tool>", "arguments": {...}}')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's function calls carry arguments as a JSON-encoded string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], {}, body, "arguments must be a JSON object of the tool's parameters")
    return ToolCall(value["name"], arguments, body)


# ---- tools in the prompt ------------------------------------------------------------------------

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_schema(tool: Callable | str) -> dict:
    """The JSON schema chat templates take for a tool (a function, or its path "module:function"):
    transformers' `get_json_schema` (needs type hints and a Google-style docstring with Args), else
    one built from the signature alone, so an undocumented tool still gets a usable description."""
    fn = import_path(tool, "tool") if isinstance(tool, str) else tool
    try:
        from transformers.utils import get_json_schema

        return get_json_schema(fn)
    except Exception:  # noqa: BLE001 - missing docstring/hints (or no transformers): the signature will do
        return _signature_schema(fn)


def _signature_schema(fn: Callable) -> dict:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: parameters without types
        hints = {}
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = [p for p in inspect.signature(fn).parameters.values() if p.kind in keyword_kinds]
    properties = {p.name: {"type": _JSON_TYPES[hints[p.name]]} if hints.get(p.name) in _JSON_TYPES else {}
                  for p in parameters}
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    description = (inspect.getdoc(fn) or "").split("\n\n")[0]
    return {"type": "function", "function": {
        "name": fn.__name__, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def tools_preamble(schemas: list[dict]) -> str:
    """Plain-text instructions for a tokenizer whose chat template does not render tools."""
    usage = ("You can call tools. To call one, write "
             '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>; '
             "each result comes back as <tool_result>...</tool_result>. "
             "Reply without a tool call to give your final answer.")
    lines = [usage, "Tools:"]
    for schema in schemas:
        function = schema["function"]
        lines.append(f"- {function['name']}: {function.get('description', '')} "
                     f"Arguments: {json.dumps(function['parameters'])}")
    return "\n".join(lines)


def render_tools_prompt(tokenizer: Any, messages: list[dict[str, str]], tools: Sequence[Callable | str]) -> str:
    """The prompt text for `messages` with `tools` (functions or "module:function" paths) described,
    ending with the generation prompt: the chat template's own tool rendering where it has one, else
    the conversation with `tools_preamble` added to its system turn."""
    schemas = [tool_schema(tool) for tool in tools]
    rendered = _template_with_tools(tokenizer, messages, schemas)
    if rendered is not None:
        return rendered
    # lazy: the data package loads datasets
    from rlhf_ray.data.conversations import render_conversation

    preamble = tools_preamble(schemas)
    try:
        return render_conversation(tokenizer, _in_system_turn(messages, preamble), add_generation_prompt=True)
    except ValueError:  # templates that refuse a system turn (Gemma, Mistral): the preamble opens the first turn
        return render_conversation(tokenizer, _before_first_turn(messages, preamble), add_generation_prompt=True)


def _template_with_tools(tokenizer: Any, messages: list[dict[str, str]], schemas: list[dict]) -> str | None:
    """The template's rendering with tools, or None when it has no template, raises on `tools`, or
    ignores them (renders the same text without them: the tools would be silently dropped)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        with_tools = tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError, or a template's own raise: use the preamble
        return None
    return with_tools if with_tools != without else None


def _in_system_turn(messages: list[dict[str, str]], preamble: str) -> list[dict[str, str]]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{preamble}"}, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def _before_first_turn(messages: list[dict[str, str]], preamble: str) -> list[dict[str, str]]:
    first, *rest = messages
    return [{**first, "content": f"{preamble}\n\n{first['content']}"}, *rest]


# ---- the sandbox --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str  # the tool's output; on output_too_large its first max_output_chars characters; else ""
    error: str | None = None  # what went wrong, for the policy's observation and the logs; None when ok
    kind: str | None = None  # one of FAILURE_KINDS when not ok


class ToolSandboxError(RuntimeError):
    """The sandbox cannot run its tools at all (a tool that does not import, a worker that does not
    start): a configuration error that stops the run, unlike a failed call, which the policy sees."""


class _Timeout(Exception):
    reason = "no reply before the deadline"


class _Died(Exception):
    reason = "died"


class _TooLarge(Exception):
    reason = "replied more than the protocol allows"


class ToolSandbox:
    """Runs Python function tools, named by "module:function" paths and called by their function names,
    in a separate worker process with a deadline per call and a cap on the output (module docstring:
    the process model). `call` never raises for a tool's failure: it returns a ToolResult with its
    kind, counted in `counters` (as are "calls" and "worker_starts"), for the trainer to log."""

    def __init__(self, tools: Sequence[str], timeout_s: float = 5.0, max_output_chars: int = 4096,
                 startup_timeout_s: float = 60.0):
        self.paths = _names_to_paths(tools)
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.startup_timeout_s = startup_timeout_s
        self.counters: dict[str, int] = dict.fromkeys(("calls", "worker_starts", *FAILURE_KINDS), 0)
        self._worker: _Worker | None = None
        self._lock = threading.RLock()

    @property
    def worker_pid(self) -> int | None:
        """The live worker's process id (None before the first call and after a failure killed it)."""
        return self._worker.proc.pid if self._worker is not None else None

    def run(self, call: ToolCall) -> ToolResult:
        """Run a parsed call; a malformed one fails as "bad_json" without reaching the worker."""
        if call.error is not None:
            return self._counted(_failure("bad_json", f"malformed tool call: {call.error}"))
        return self.call(call.name, call.arguments)

    def call(self, name: str, arguments: dict | str) -> ToolResult:
        """`name(**arguments)` in the worker; `arguments` a dict or a JSON object's text."""
        with self._lock:
            return self._counted(self._call(name, arguments))

    def start(self) -> None:
        """Start the worker now rather than on the first call (raises ToolSandboxError if it cannot)."""
        with self._lock:
            self._live_worker()

    def close(self) -> None:
        with self._lock:
            self._discard_worker()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, name: str, arguments: dict | str) -> ToolResult:
        if name not in self.paths:
            return _failure("unknown_tool", f"no tool named {name!r}; the tools are {', '.join(sorted(self.paths)) or '(none)'}")
        arguments, problem = _arguments_object(arguments)
        if problem:
            return _failure("bad_json", problem)
        worker = self._live_worker()
        request = {"name": name, "arguments": arguments, "max_chars": self.max_output_chars}
        try:
            reply = worker.request(request, self.timeout_s, _reply_limit(self.max_output_chars))
        except _Timeout:
            self._discard_worker()
            return _failure("timeout", f"tool {name!r} ran past its {self.timeout_s:g} s deadline and was stopped")
        except _Died:
            reason = _exit_reason(self._discard_worker())
            return _failure("crash", f"tool {name!r} crashed the sandbox worker ({reason})")
        except _TooLarge:
            self._discard_worker()
            return _failure("output_too_large", f"tool {name!r} wrote more than the sandbox protocol allows")
        return ToolResult(reply["ok"], reply.get("output", ""), reply.get("error"), reply.get("kind"))

    def _counted(self, result: ToolResult) -> ToolResult:
        with self._lock:
            self.counters["calls"] += 1
            if result.kind is not None:
                self.counters[result.kind] += 1
        return result

    def _live_worker(self) -> _Worker:
        if self._worker is not None and self._worker.proc.poll() is not None:
            self._discard_worker()  # died between calls (killed from outside)
        if self._worker is None:
            self._worker = _Worker.start(list(self.paths.values()), self.startup_timeout_s)
            self.counters["worker_starts"] += 1
        return self._worker

    def _discard_worker(self) -> int | None:
        """Kill the worker and its process group; its exit status."""
        worker, self._worker = self._worker, None
        return worker.kill() if worker is not None else None


class _Worker:
    """One worker process, in its own session so that killing its process group also stops what the
    tool started. Replies are read with `select`, so a silent worker costs no more than the deadline."""

    def __init__(self, paths: list[str]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the caller's imports work there
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_ray.envs.sandbox_worker", json.dumps(paths)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        self._kill = weakref.finalize(self, _kill_group, self.proc)  # also at interpreter exit
        self._pending = b""

    @classmethod
    def start(cls, paths: list[str], timeout_s: float) -> _Worker:
        """A worker that has imported every tool, or ToolSandboxError saying which failed and why."""
        worker = cls(paths)
        try:
            hello = worker.read_reply(timeout_s, limit=1 << 20)
        except (_Timeout, _Died, _TooLarge) as problem:
            worker.kill()
            detail = worker.proc.stderr.read().decode(errors="replace")[-2000:].strip()
            raise ToolSandboxError(
                f"the tool sandbox worker for {paths} did not start ({problem.reason}); "
                f"its stderr: {detail or '(empty)'}") from None
        worker.proc.stderr.close()  # the worker now sends its stderr to /dev/null
        if hello["errors"]:
            worker.kill()
            listed = "; ".join(f"{path}: {message}" for path, message in hello["errors"].items())
            raise ToolSandboxError(f"cannot load tool(s) {listed}. Each tool must be a module-level function "
                                   "importable where the rollout runs (installed or on PYTHONPATH)")
        return worker

    def request(self, message: dict, timeout_s: float, limit: int) -> dict:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise _Died from None
        return self.read_reply(timeout_s, limit)

    def read_reply(self, timeout_s: float, limit: int) -> dict:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _Timeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Died
            self._pending += chunk
            if len(self._pending) > limit:
                raise _TooLarge
        line, _, self._pending = self._pending.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise _Died from None  # the protocol is broken (something wrote to it): replace the worker

    def kill(self) -> int | None:
        self._kill()
        return self.proc.returncode


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group, then reap the worker (the zombie keeps the group id reserved
    until then, so the kill cannot reach an unrelated group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def _names_to_paths(tools: Sequence[str]) -> dict[str, str]:
    if isinstance(tools, str):
        raise TypeError(f"tools must be a list of 'module:function' paths, got the string {tools!r}; wrap it in a list")
    paths: dict[str, str] = {}
    for path in tools:
        name = path.rpartition(":")[2]
        if ":" not in path or not name:
            raise ValueError(f"tool '{path}' is not of the form package.module:function")
        if name in paths:
            raise ValueError(f"tools '{paths[name]}' and '{path}' share the name {name!r}; a call names its "
                             "tool by function name, so give the functions different names")
        paths[name] = path
    return paths


def _arguments_object(arguments: dict | str) -> tuple[dict, str | None]:
    """(arguments as a dict, None), or ({}, why they are not a JSON object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return {}, f"arguments are not valid JSON ({error.msg} at character {error.pos})"
    if not isinstance(arguments, dict):
        return {}, f"arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        json.dumps(arguments)
    except (TypeError, ValueError) as error:
        return {}, f"arguments are not JSON-serialisable ({error})"
    return arguments, None


def _reply_limit(max_output_chars: int) -> int:
    """Bytes a well-behaved reply can take: the worker caps the output, JSON escapes take <= 12 bytes a char."""
    return 12 * max_output_chars + 65536


def _exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _failure(kind: str, error: str) -> ToolResult:
    return ToolResult(ok=False, output="", error=error, kind=kind)


class SandboxPool:
    """`size` sandboxes that take calls concurrently, each with its own worker process (started on its
    first call, so a pool costs only the processes its concurrency needs). A call takes the most recently
    freed sandbox and waits for one when all are busy; `counters` add up over the pool."""

    def __init__(self, tools: Sequence[str], size: int, **limits: Any):
        if size < 1:
            raise ValueError(f"a sandbox pool needs size >= 1, got {size}")
        self.sandboxes = [ToolSandbox(tools, **limits) for _ in range(size)]
        self._free: queue.LifoQueue[ToolSandbox] = queue.LifoQueue()  # the last used first: its worker is warm
        for sandbox in self.sandboxes:
            self._free.put(sandbox)

    def run(self, call: ToolCall) -> ToolResult:
        return self._with_free(lambda sandbox: sandbox.run(call))

    def call(self, name: str, arguments: dict | str) -> ToolResult:
        return self._with_free(lambda sandbox: sandbox.call(name, arguments))

    @property
    def counters(self) -> dict[str, int]:
        return {key: sum(s.counters[key] for s in self.sandboxes) for key in self.sandboxes[0].counters}

    def close(self) -> None:
        for sandbox in self.sandboxes:
            sandbox.close()

    def _with_free(self, use: Callable[[ToolSandbox], ToolResult]) -> ToolResult:
        sandbox = self._free.get()
        try:
            return use(sandbox)
        finally:
            self._free.put(sandbox)


# ---- environments whose turns call tools --------------------------------------------------------

@functools.cache
def shared_sandbox(tools: tuple[str, ...], timeout_s: float, max_output_chars: int, workers: int = 4) -> SandboxPool:
    """One pool of sandboxes per tool set and limits in this process, shared by the environments of all
    its trajectories (environments are per trajectory; a worker process each would be wasteful), with
    `workers` worker processes at most, so that tool calls of concurrent episodes run side by side."""
    return SandboxPool(tools, workers, timeout_s=timeout_s, max_output_chars=max_output_chars)


def format_tool_results(results: list[ToolResult]) -> str:
    """The observation after a turn of tool calls: one `<tool_result>` per call, in order."""
    return "".join(f"<tool_result>{r.output if r.ok else f'error ({r.kind}): {r.error}'}</tool_result>\n"
                   for r in results)


class ToolEnvironment:
    """Base of environments whose turns may call tools. A turn with tool calls is answered with their
    results; a turn without any is the final answer: the episode ends with `final_reward(text)`, which
    the subclass defines (`text` is the turn without tool-call markup). At `max_turns` the episode
    ends whatever the turn holds. Subclasses list their tools in `tools`.

    `info` of every step: turns so far, tool_calls (attempted, malformed included), tool_errors,
    tool_failures (failed calls by kind), tool_used (at least one call succeeded: the "tool-use share"
    metric), turn_limit (ended by max_turns). Tool results are observations in the "tool" role (a
    chat template's tool turn, `rollout.env_turns`)."""

    observation_role = "tool"

    tools: tuple[str, ...] = ()  # "module:function" paths, importable in the worker process
    timeout_s: float = 5.0  # per call
    max_output_chars: int = 1024  # per call; longer outputs fail as output_too_large
    sandbox_workers: int = 4  # tool calls of concurrent episodes that run at once (worker processes)

    def __init__(self, max_turns: int = 4, sandbox: ToolSandbox | SandboxPool | None = None):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.sandbox = sandbox or shared_sandbox(tuple(self.tools), self.timeout_s, self.max_output_chars,
                                                 self.sandbox_workers)
        self.prompt, self.metadata, self.done = "", {}, True
        self.turns = self.tool_calls = self.tool_errors = 0
        self.tool_failures: dict[str, int] = {}

    def reset(self, prompt: str, metadata: dict) -> str:
        self.prompt, self.metadata, self.done = prompt, dict(metadata), False
        self.turns = self.tool_calls = self.tool_errors = 0
        self.tool_failures = {}
        return ""

    def step(self, action: str) -> StepResult:
        ensure_running(self, self.done)
        self.turns += 1
        calls = parse_tool_calls(action)
        if calls and self.turns < self.max_turns:
            results = [self.sandbox.run(call) for call in calls]
            self.tool_calls += len(results)
            self.tool_errors += sum(not r.ok for r in results)
            for result in results:
                if result.kind is not None:
                    self.tool_failures[result.kind] = self.tool_failures.get(result.kind, 0) + 1
            return StepResult(format_tool_results(results), 0.0, False, self._info(turn_limit=False))
        self.done = True
        return StepResult("", self.final_reward(strip_tool_calls(action)), True, self._info(turn_limit=bool(calls)))

    def final_reward(self, answer: str) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define final_reward(answer: str) -> float")

    def _info(self, turn_limit: bool) -> dict:
        return {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                "tool_failures": dict(self.tool_failures), "tool_used": self.tool_calls > self.tool_errors,
                "turn_limit": turn_limit}
