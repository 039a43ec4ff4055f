"""Constitutional AI with `cai.endpoint`: the stage (`run_cai`, real code from the drafts to report.json)
with the policy's engines replaced by a fake session that only drafts, and critiques and revisions
asked of a fake OpenAI-compatible server on 127.0.0.1 through the real openai client. Checks what the
server receives (the constitution's conversations as chat messages, critique then revision, the
critique reply inside the revision conversation, the token limits), what the outputs hold, the
counters in report.json, that the policy's context limit is not applied to the endpoint and that a
conversation the server refuses fails the run with its error; and the `cai.endpoint.api` config rule."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rlhf_ray.batch import Samples
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.constitution import critique_messages, load_constitution, revision_messages
from rlhf_ray.rewards import RewardError
from rlhf_ray.rewards.endpoint import OpenAIEndpoint
from rlhf_ray.toy.feedback import TOY_CONSTITUTION, write_toy_constitution
from rlhf_ray.trainers import cai
from tests.local_http import send_json, serving

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL = "critic-model"
REVISION_REQUESTS = {p["revision"] for p in TOY_CONSTITUTION["principles"]} | {TOY_CONSTITUTION["feedback"]["revision"]}
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say: hi\n"}]
GIVEN = [{"kind": "critique", "prompt": "say: abc\n", "response": "xyz", "critique": "Too few vowels."},
         {"kind": "critique", "prompt": CHAT, "response": "hmm", "critique": "Use letters."}]


def reply(messages: list[dict]) -> str:
    """The fake model: names what it was asked and the response under review (the assistant turn after the prompt)."""
    if messages[-1]["content"] in REVISION_REQUESTS:
        return f"rev<{messages[-4]['content']}>"
    return f"crit<{messages[-2]['content']}>"


class ChatServer(ThreadingHTTPServer):
    """/v1/chat/completions answering `reply(messages)` with usage = characters; a 400 (as vLLM words it) for a
    conversation of more than `refuse_over` characters. Records every request body in arrival order."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, refuse_over: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.refuse_over = refuse_over
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        fake: ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.bodies.append(body)
        size = sum(len(m["content"]) for m in body["messages"])
        if fake.refuse_over is not None and size > fake.refuse_over:
            message = f"This model's maximum context length is {fake.refuse_over} tokens. However, you requested {size}."
            return send_json(self, 400, {"error": {"message": message}})
        text = reply(body["messages"])
        send_json(self, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": size, "completion_tokens": len(text)}})



class DraftingSession:
    """Stands in for SamplingSession: the policy's engines draft `draft<i>` for prompt i; records each call."""

    def __init__(self, cfg, models, **_):
        from rlhf_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(models.tokenizer)
        self.calls: list[str] = []
        DraftingSession.last = self

    def generate(self, prompts, params, seed, phase, pad_token_id) -> Samples:
        self.calls.append(phase)
        drafts = [self.tokenizer.encode(f"draft{i}", add_special_tokens=False) for i in range(len(prompts))]
        width = max(map(len, drafts))
        ids = torch.tensor([d + [pad_token_id] * (width - len(d)) for d in drafts])
        mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in drafts])
        return Samples(prompt_ids=torch.zeros(len(prompts), 1, dtype=torch.long),
                       prompt_mask=torch.ones(len(prompts), 1, dtype=torch.long), response_ids=ids,
                       response_mask=mask, stopped=torch.ones(len(prompts), dtype=torch.bool))

    def close(self) -> None:
        pass


def endpoint_override(server: ChatServer) -> str:
    return (f"cai.endpoint={{base_url: {server.base_url}, model: {MODEL}, max_concurrency: 3, backoff_s: 0.01, "
            f"input_price_per_mtok: 2.0, output_price_per_mtok: 10.0}}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cai_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cai_endpoint")
    given = tmp / "critiques.jsonl"
    given.write_text("".join(json.dumps(r) + "\n" for r in GIVEN))
    with serving(ChatServer()) as server:
        cfg = load_config(CONFIGS / "toy_cai.yaml", [
            f"trainer.output_dir={tmp}", "logging.progress_bar=false", "data.toy_train_size=16", "cai.num_prompts=3",
            "cai.rounds=2", "cai.critique_max_new_tokens=7", "rollout.max_new_tokens=9", f"cai.critiques={given}",
            endpoint_override(server)])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cai, "SamplingSession", DraftingSession)
            report = cai.run_cai(cfg)
    return cfg, report, server.bodies, DraftingSession.last


def test_the_policy_drafts_and_the_endpoint_critiques_then_revises_each_round(cai_run):
    cfg, _, bodies, session = cai_run
    assert session.calls == ["cai/draft@0"]  # the engines wrote the drafts and nothing else
    constitution = load_constitution(cfg.run_dir / "toy" / "constitution.yaml")
    principles = {p.name: p for p in constitution.principles} | {"feedback": constitution.feedback}
    trace = _rows(cfg.run_dir / "trace.jsonl")
    assert [t["draft"] for t in trace] == ["draft0", "draft1", "draft2", "xyz", "hmm"]
    expected = {(k, phase): [] for k in (1, 2) for phase in ("critique", "revision")}
    for t in trace:  # replay each example's rounds with the fake model
        assert t["dropped"] is None and len(t["steps"]) == 2
        response = t["draft"]
        for k, step in enumerate(t["steps"], start=1):
            p = principles[step["principle"]]
            if k == 1 and t["given_critique"]:
                assert (step["principle"], step["critique_prompt"], step["critique"]) == ("feedback", None, t["given_critique"])
            else:
                asked = critique_messages(t["prompt"], response, p)
                assert step["critique_prompt"] == asked and step["critique"] == f"crit<{response}>"
                expected[k, "critique"].append(asked)
            asked = revision_messages(t["prompt"], response, p, step["critique"])
            assert asked[-2] == {"role": "assistant", "content": step["critique"]}
            assert step["revision_prompt"] == asked and step["revision"] == f"rev<{response}>"
            expected[k, "revision"].append(asked)
            response = step["revision"]
        assert t["final"] == response
    # arrival order: round 1's critiques, its revisions, then round 2's (within a batch, any order)
    batches = [expected[k, phase] for k in (1, 2) for phase in ("critique", "revision")]
    assert [len(b) for b in batches] == [3, 5, 5, 5]
    start = 0
    for batch, phase in zip(batches, ["critique", "revision"] * 2):
        got = bodies[start:start + len(batch)]
        start += len(batch)
        assert sorted(json.dumps(b["messages"]) for b in got) == sorted(json.dumps(m) for m in batch)
        limit = cfg.cai.critique_max_new_tokens if phase == "critique" else cfg.rollout.max_new_tokens
        assert {(b["model"], b["max_tokens"], b["temperature"]) for b in got} == {(MODEL, limit, 0)}
    assert start == len(bodies)


def test_outputs_hold_the_endpoints_revisions_and_the_report_its_counters(cai_run):
    cfg, report, bodies, _ = cai_run
    trace = _rows(cfg.run_dir / "trace.jsonl")
    finals = [f"rev<rev<{t['draft']}>>" for t in trace]
    assert [t["final"] for t in trace] == finals
    assert _rows(cfg.run_dir / "sft.jsonl") == [{"prompt": t["prompt"], "response": f} for t, f in zip(trace, finals)]
    assert [r["chosen"] for r in _rows(cfg.run_dir / "pairs.jsonl")] == finals
    prompt_tokens = sum(len(m["content"]) for b in bodies for m in b["messages"])
    completion_tokens = sum(len(reply(b["messages"])) for b in bodies)
    on_disk = json.loads((cfg.run_dir / "report.json").read_text())["endpoint"]
    assert on_disk == report["endpoint"]
    assert {k: on_disk[k] for k in ("base_url", "model", "requests", "retries", "prompt_tokens", "completion_tokens")} \
        == {"base_url": cfg.cai.endpoint.base_url, "model": MODEL, "requests": 18, "retries": 0,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    assert on_disk["estimated_cost"] == pytest.approx(prompt_tokens * 2.0 / 1e6 + completion_tokens * 10.0 / 1e6)


def _reviser(tmp_path, server: ChatServer) -> tuple[cai.Reviser, list[cai.Example]]:
    cfg = load_config(CONFIGS / "toy_cai.yaml", [f"trainer.output_dir={tmp_path}", "cai.max_context_len=16",
                                                 endpoint_override(server)])
    constitution = load_constitution(write_toy_constitution(tmp_path / "constitution.yaml"))
    examples = [cai.Example("say: " + "a" * 40, None, "given", draft="b" * 40)]
    return cai.Reviser(cfg, None, None, constitution, OpenAIEndpoint(cfg.cai.endpoint, name="cai")), examples


def test_the_policys_context_limit_is_not_the_endpoints(tmp_path):
    with serving(ChatServer()) as server:
        reviser, examples = _reviser(tmp_path, server)  # cai.max_context_len=16: the policy would drop it
        reviser.round(examples, 1)
    assert examples[0].dropped is None and examples[0].response == "rev<" + "b" * 40 + ">"


def test_a_conversation_the_server_refuses_fails_the_run_with_its_error(tmp_path):
    with serving(ChatServer(refuse_over=50)) as server:
        reviser, examples = _reviser(tmp_path, server)
        with pytest.raises(RewardError, match=rf"{server.base_url}/chat/completions \(model '{MODEL}'\) answered "
                                              rf"HTTP 400: .*maximum context length is 50 tokens"):
            reviser.round(examples, 1)
    assert len(server.bodies) == 1  # a 400 is not retried


def test_cai_endpoint_must_speak_chat():
    endpoint = "cai.endpoint={base_url: 'http://127.0.0.1:8000/v1', model: m, api: completions}"
    with pytest.raises(ConfigError, match=r"cai\.endpoint\.api=completions: .* set cai\.endpoint\.api=chat"):
        load_config(CONFIGS / "toy_cai.yaml", [endpoint])
    assert load_config(CONFIGS / "toy_cai.yaml", [endpoint.replace("completions", "chat")]).cai.endpoint.api == "chat"
