"""Tool calling: parsing `<tool_call>` blocks, tool schemas and prompts (template and preamble paths),
the sandbox against tools that crash, hang, raise, flood or return junk (real worker processes), and
the calculator task played by scripted policies."""

import re
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_ray.envs import (
    ToolSandbox,
    ToolSandboxError,
    parse_tool_calls,
    render_tools_prompt,
    tool_schema,
)
from rlhf_ray.envs.tools import shared_sandbox, strip_tool_calls
from rlhf_ray.envs.toy import (
    CalculatorArithmetic,
    calculator,
    calculator_prompts,
    final_answer,
)
from rlhf_ray.toy import build_char_tokenizer

BAD_TOOLS = '''
import ctypes, os, subprocess, sys, time

def echo(text: str) -> str:
    return text

def add(a: int, b: int):
    return {"sum": a + b}

def crash() -> str:
    os._exit(3)

def segfault() -> str:
    ctypes.string_at(0)

def hang() -> str:
    time.sleep(1000)

def hang_with_child(pid_file: str) -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(1000)

def boom() -> str:
    raise ValueError("boom")

def leave() -> str:
    sys.exit(2)

def huge() -> str:
    return "x" * 1_000_000

def not_json():
    return object()

def noisy() -> str:
    print("x" * 200_000)
    sys.stderr.write("y" * 200_000)
    return input()  # stdin is /dev/null: EOFError
'''
TOOL_NAMES = ("echo", "add", "crash", "segfault", "hang", "hang_with_child", "boom", "leave", "huge", "not_json",
              "noisy")


@pytest.fixture(scope="module")
def tools_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    (root / "bad_tools_for_tests.py").write_text(textwrap.dedent(BAD_TOOLS))
    (root / "exits_on_import_for_tests.py").write_text(
        "import os, sys\nsys.stderr.write('no licence server')\nsys.stderr.flush()\nos._exit(1)\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))  # the worker inherits the caller's sys.path
        yield "bad_tools_for_tests"


@pytest.fixture
def sandbox(tools_module):
    with ToolSandbox([f"{tools_module}:{name}" for name in TOOL_NAMES], timeout_s=1.0, max_output_chars=1000) as box:
        yield box


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed orphan may wait for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_gone(pid: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def call_text(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


# ---- parse_tool_calls ---------------------------------------------------------------------------

def test_parse_one_and_several_calls_in_order():
    text = ("let me compute " + call_text("calculator", '{"expression": "12*7"}') + " and\n"
            '<tool_call>\n{"name": "echo", "arguments": {"text": "a</b"}}\n</tool_call> done')
    first, second = parse_tool_calls(text)
    assert (first.name, first.arguments, first.error) == ("calculator", {"expression": "12*7"}, None)
    assert (second.name, second.arguments, second.error) == ("echo", {"text": "a</b"}, None)
    assert strip_tool_calls(text) == "let me compute  and\n done"


def test_text_without_calls_has_none():
    assert parse_tool_calls("answer: 84, no tools <tool_result>1</tool_result>") == []


@pytest.mark.parametrize(("body", "error"), [
    ('{"name": "calculator", "arguments": {"expression": "1+1"', "not valid JSON"),
    ('["calculator"]', "expected a JSON object"),
    ('{"arguments": {}}', "expected a JSON object"),
    ('{"name": "calculator", "arguments": [1, 2]}', "arguments must be a JSON object"),
])
def test_malformed_calls_are_returned_with_an_error_not_raised(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert error in call.error and call.raw == body and call.arguments == {}


def test_unclosed_call_is_an_error_and_string_arguments_are_decoded():
    unclosed, = parse_tool_calls('answer <tool_call>{"name": "calculator"')
    assert "unclosed <tool_call>" in unclosed.error
    (call,) = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert (call.arguments, call.error) == ({"a": 1, "b": 2}, None)  # OpenAI-style encoded arguments


# ---- the sandbox --------------------------------------------------------------------------------

def test_good_calls_reuse_one_worker(sandbox):
    assert sandbox.call("echo", {"text": "hi"}).output == "hi"
    pid = sandbox.worker_pid
    result = sandbox.call("add", '{"a": 2, "b": 3}')
    assert (result.ok, result.output, result.kind) == (True, '{"sum": 5}', None)  # non-str results as JSON
    assert sandbox.worker_pid == pid and sandbox.counters["worker_starts"] == 1


@pytest.mark.parametrize(("tool", "reason"), [("crash", "exit code 3"), ("segfault", "killed by SIGSEGV")])
def test_a_crashing_tool_is_reported_and_the_worker_restarted(sandbox, tool, reason):
    sandbox.start()
    pid = sandbox.worker_pid
    result = sandbox.call(tool, {})
    assert (result.ok, result.kind) == (False, "crash") and reason in result.error
    assert not alive(pid) and sandbox.worker_pid is None
    assert sandbox.call("echo", {"text": "after"}).output == "after"
    assert sandbox.worker_pid != pid and sandbox.counters["worker_starts"] == 2 and sandbox.counters["crash"] == 1


def test_a_hanging_tool_times_out_and_its_process_is_killed(sandbox):
    sandbox.start()
    pid = sandbox.worker_pid
    start = time.monotonic()
    result = sandbox.call("hang", {})
    assert time.monotonic() - start < 3.0
    assert (result.ok, result.kind) == (False, "timeout") and "1 s deadline" in result.error
    assert not alive(pid)
    assert sandbox.call("echo", {"text": "after"}).output == "after" and sandbox.counters["timeout"] == 1


def test_a_timeout_also_kills_what_the_tool_started(sandbox, tmp_path):
    pid_file = tmp_path / "child.pid"
    assert sandbox.call("hang_with_child", {"pid_file": str(pid_file)}).kind == "timeout"
    assert wait_until_gone(int(pid_file.read_text()))


@pytest.mark.parametrize(("tool", "error"), [("boom", "ValueError: boom"), ("leave", "SystemExit: 2"),
                                             ("noisy", "EOFError: EOF when reading a line")])
def test_an_exception_is_reported_and_the_worker_survives(sandbox, tool, error):
    sandbox.start()
    pid = sandbox.worker_pid
    result = sandbox.call(tool, {})
    assert (result.ok, result.kind, result.error) == (False, "exception", error)
    assert sandbox.call("echo", {"text": "after"}).output == "after" and sandbox.worker_pid == pid


def test_output_over_the_cap_is_cut_and_reported(sandbox):
    result = sandbox.call("huge", {})
    assert (result.ok, result.kind) == (False, "output_too_large")
    assert result.output == "x" * 1000 and "1000000 characters is over the cap of 1000" in result.error
    assert sandbox.call("echo", {"text": "after"}).output == "after"


@pytest.mark.parametrize(("name", "arguments", "kind", "error"), [
    ("echo", '{"text": ', "bad_json", "arguments are not valid JSON"),
    ("echo", "[1]", "bad_json", "arguments must be a JSON object, got list"),
    ("not_json", {}, "bad_json", "returned a object, which is not JSON-serialisable"),
    ("rm_rf", {}, "unknown_tool", "no tool named 'rm_rf'; the tools are add, boom"),
    ("echo", {"wrong": 1}, "exception", "TypeError"),
])
def test_bad_calls_fail_with_their_kind(sandbox, name, arguments, kind, error):
    result = sandbox.call(name, arguments)
    assert (result.ok, result.kind) == (False, kind) and error in result.error
    assert sandbox.call("echo", {"text": "after"}).output == "after"
    assert sandbox.counters[kind] == 1 and sandbox.counters["calls"] == 2


def test_a_malformed_parsed_call_is_bad_json_without_reaching_the_worker(sandbox):
    (call,) = parse_tool_calls("<tool_call>{oops}</tool_call>")
    result = sandbox.run(call)
    assert result.kind == "bad_json" and result.error.startswith("malformed tool call: not valid JSON")
    assert sandbox.worker_pid is None and sandbox.counters["bad_json"] == 1


def test_close_kills_the_worker(sandbox):
    sandbox.start()
    pid = sandbox.worker_pid
    sandbox.close()
    assert not alive(pid) and sandbox.worker_pid is None


def test_a_tool_that_does_not_import_stops_the_run_naming_it(tools_module):
    box = ToolSandbox(["rlhf_ray.envs.toy:calculator", "rlhf_ray.envs.toy:no_such_tool"])
    with pytest.raises(ToolSandboxError, match="rlhf_ray.envs.toy:no_such_tool: LoadError: module 'rlhf_ray.envs.toy' "
                                               "has no attribute 'no_such_tool'.*importable where the rollout runs"):
        box.start()
    with pytest.raises(ToolSandboxError, match="did not start \\(died\\); its stderr: no licence server"):
        ToolSandbox(["exits_on_import_for_tests:anything"]).start()
    with pytest.raises(ValueError, match="share the name 'calculator'"):
        ToolSandbox(["rlhf_ray.envs.toy:calculator", "other.module:calculator"])


# ---- schemas and prompts ------------------------------------------------------------------------

def undocumented(city: str, days: int = 3, *rest, metric: bool = False):
    return city


def test_tool_schema_from_docstring_and_from_the_signature_alone():
    schema = tool_schema("rlhf_ray.envs.toy:calculator")["function"]
    assert schema["name"] == "calculator" and schema["description"] == "Evaluate an arithmetic expression exactly."
    assert schema["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["parameters"]["required"] == ["expression"]
    fallback = tool_schema(undocumented)["function"]
    assert fallback["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}


MESSAGES = [{"role": "user", "content": "What is 12*7?"}]
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|system|>tools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}{% endfor %}"
    "{{ '\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_the_toy_template_ignores_tools_so_the_preamble_goes_in_a_system_turn():
    tokenizer = build_char_tokenizer()
    text = render_tools_prompt(tokenizer, MESSAGES, [calculator])
    assert text.startswith("<|system|>You can call tools. To call one, write <tool_call>")
    assert '- calculator: Evaluate an arithmetic expression exactly. Arguments: {"type": "object"' in text
    assert text.endswith("</s><|user|>What is 12*7?</s><|assistant|>")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_an_existing_system_turn_gets_the_preamble_appended():
    text = render_tools_prompt(build_char_tokenizer(), [{"role": "system", "content": "Be brief."}, *MESSAGES],
                               ["rlhf_ray.envs.toy:calculator"])
    assert text.startswith("<|system|>Be brief.\n\nYou can call tools.") and text.count("<|system|>") == 1


def test_a_template_that_renders_tools_is_used():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    text = render_tools_prompt(tokenizer, MESSAGES, [calculator, undocumented])
    assert text == "<|system|>tools: calculator undocumented\n<|user|>What is 12*7?<|assistant|>"


def test_a_template_that_rejects_tools_or_no_template_falls_back_to_the_preamble():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}" + TOOLS_TEMPLATE
    assert "You can call tools." in render_tools_prompt(tokenizer, MESSAGES, [calculator])
    tokenizer.chat_template = None
    text = render_tools_prompt(tokenizer, MESSAGES, [calculator])
    assert text.startswith("system: You can call tools.") and text.endswith("user: What is 12*7?\nassistant: ")


# ---- the calculator tool and task ---------------------------------------------------------------

@pytest.mark.parametrize(("expression", "value"), [("12*7", "84"), ("12 * (3 + 4) - -2", "86"), ("7/2", "3.5"),
                                                   ("964*7311", "7047804"), ("(1+2)/3", "1")])
def test_calculator_is_exact(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(("expression", "error"), [
    ("__import__('os')", "only digits, + - * / and parentheses are allowed"),
    ("2**100", "only integers, + - * /"), ("7//2", "only integers, + - * /"), ("1/(2-2)", "division by zero"),
    ("1 2", "not an arithmetic expression"), ("1+" * 101 + "1", "at most 200"),
])
def test_calculator_refuses_anything_else(expression, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        calculator(expression)


@pytest.mark.parametrize(("text", "answer"), [("answer: 4,517,277", 4517277), ("Answer: 7 since 3+4", 7),
                                              ("it is 12, no 13", 13), ("answer: none", None), ("", None)])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.fixture
def calculator_row():
    return calculator_prompts(1, seed=0)[0]


def play(env, row, actions):
    assert env.reset(row["prompt"], row["metadata"]) == ""
    return [env.step(action) for action in actions]


def test_a_tool_call_then_the_right_answer_wins_with_tool_use_recorded(calculator_row):
    [question] = calculator_row["prompt"]
    expression = question["content"].removeprefix("What is ").removesuffix("?")
    assert question["role"] == "user" and calculator_row["metadata"]["expression"] == expression
    env = CalculatorArithmetic()
    tool_turn, answer_turn = play(env, calculator_row, [
        "I will use the tool. " + call_text("calculator", f'{{"expression": "{expression}"}}'),
        f"answer: {calculator_row['metadata']['answer']}"])
    assert tool_turn.observation == f"<tool_result>{calculator_row['metadata']['answer']}</tool_result>\n"
    assert (tool_turn.reward, tool_turn.done) == (0.0, False)
    assert (answer_turn.reward, answer_turn.done) == (1.0, True)
    assert answer_turn.info == {"turns": 2, "tool_calls": 1, "tool_errors": 0, "tool_failures": {}, "tool_used": True,
                                "turn_limit": False}
    assert env.sandbox is CalculatorArithmetic().sandbox is shared_sandbox(CalculatorArithmetic.tools, 5.0, 1024, 4)


def test_wrong_or_unaided_answers(calculator_row):
    env = CalculatorArithmetic()
    (wrong,) = play(env, calculator_row, ["answer: 12345"])
    assert (wrong.reward, wrong.done, wrong.info["tool_used"]) == (0.0, True, False)
    (guessed,) = play(env, calculator_row, [f"it is {calculator_row['metadata']['answer']}"])
    assert (guessed.reward, guessed.info["tool_used"]) == (1.0, False)  # right, but no tool: the metric tells


def test_failed_tool_calls_are_observed_and_the_turn_limit_ends_the_episode(calculator_row):
    env = CalculatorArithmetic(max_turns=2)
    bad, last = play(env, calculator_row, [call_text("calculator", '{"expression": "2**8"}'),
                                           call_text("calculator", '{"expression": "2*8"}')])
    assert bad.observation.startswith("<tool_result>error (exception): ValueError: only integers")
    assert bad.info["tool_errors"] == 1 and not bad.info["tool_used"]
    assert (last.done, last.reward, last.info["turn_limit"], last.info["tool_calls"]) == (True, 0.0, True, 1)
    with pytest.raises(ValueError, match="needs metadata 'answer'"):
        env.reset("What is 2*3?", {"question": "What is 2*3?"})
