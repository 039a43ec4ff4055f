"""Pre-flight (rlhf_ray/preflight.py): each unresolvable input of a run is one line naming field, value, what
was looked for and the fix; every problem at once; toy configs and real local model directories pass."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

import launch
from rlhf_ray.config import load_config
from rlhf_ray.preflight import preflight_problems

ROOT = Path(__file__).resolve().parents[2]
GRPO = ROOT / "configs" / "toy_grpo.yaml"

MISSING_MODEL = ("model.policy='/nonexistent': no such directory, and not a hub id (org/name); looked for a local "
                 "model directory holding config.json; fix the path, or use a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) "
                 "or 'toy'")
MISSING_DATA = ("data.train='/nope.jsonl': no such file or directory; looked for a local .jsonl/.json/.parquet file "
                "or a directory of them; fix the path, or use a hub dataset id or 'toy'")
MISSING_FUNCTION = ("reward.sources.0.path='nomod:nofn': cannot import module 'nomod' (No module named 'nomod'); "
                    "looked for a module:function importable by the driver; fix the module path, install its package, "
                    "or add its folder to PYTHONPATH")


def problems(*overrides: str, config: Path = GRPO) -> list[str]:
    return preflight_problems(load_config(config, list(overrides)))


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    from rlhf_ray.toy.models import save_toy_models

    return save_toy_models(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("override, expected", [
    ("model.policy=/nonexistent", MISSING_MODEL),
    ("data.train=/nope.jsonl", MISSING_DATA),
    ("reward.sources.0.path=nomod:nofn", MISSING_FUNCTION),
], ids=["model", "data", "function"])
def test_each_missing_input_is_one_line_naming_field_and_value(override, expected):
    assert problems(override) == [expected]


def test_every_problem_is_reported_at_once():
    found = problems("model.policy=/nonexistent", "data.train=/nope.jsonl", "reward.sources.0.path=nomod:nofn",
                     "data.eval=/nope.jsonl")
    assert found == [MISSING_MODEL, MISSING_DATA, MISSING_DATA.replace("data.train", "data.eval"), MISSING_FUNCTION]
    assert all("\n" not in line for line in found)


# toy configs that evaluate another run's exports: the run, and the exports it writes
EXPORTS_OF = {"toy_eval": ("runs/toy_pipeline", {"sft/export/policy": "policy", "ppo/export/policy": "policy",
                                                 "rm/export/reward": "reward"})}


@pytest.mark.parametrize("config", sorted(p for p in (ROOT / "configs").glob("toy_*.yaml") if p.stem not in EXPORTS_OF),
                         ids=lambda p: p.stem)
def test_toy_configs_pass(config):
    assert problems(config=config) == []


@pytest.mark.parametrize("name", sorted(EXPORTS_OF))
def test_a_config_on_another_runs_exports_names_that_run_until_it_has_run(name, toy_models, tmp_path, monkeypatch):
    run, exports = EXPORTS_OF[name]
    monkeypatch.chdir(tmp_path)  # a fresh clone: nothing exported yet
    found = problems(config=ROOT / "configs" / f"{name}.yaml")
    assert found and all(any(f"'{run}/{sub}'" in line for sub in exports) for line in found)  # nothing else
    for sub in exports:
        lines = [line for line in found if f"'{run}/{sub}': no such directory" in line]
        assert lines and all(line.endswith(f"it is what stage {sub.split('/')[0]!r} of run {run!r} exports: run "
                                           "that first (python launch.py: the toy pipeline)") for line in lines)
    for sub, kind in exports.items():  # the run has happened: its exports are saved models
        (tmp_path / run / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / run / sub).symlink_to(getattr(toy_models, kind))
    assert problems(config=ROOT / "configs" / f"{name}.yaml") == []


def test_saved_local_models_pass(toy_models):
    sources = (f"reward.sources=[{{kind: model, path: {toy_models.reward}}}, "
               f"{{kind: judge, path: {toy_models.policy}, judge: {{mode: grade}}}}]")
    assert problems(f"model.policy={toy_models.policy}", f"model.reference={toy_models.policy}",
                    f"model.critic={toy_models.critic}", f"model.tokenizer={toy_models.tokenizer}", sources,
                    config=ROOT / "configs" / "toy_ppo.yaml") == []


def test_model_directory_needs_config_and_tokenizer(toy_models, tmp_path):
    (tmp_path / "weights_only").mkdir()
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((Path(toy_models.policy) / "config.json").read_text())
    assert problems(f"model.policy={tmp_path / 'weights_only'}") == [
        f"model.policy='{tmp_path / 'weights_only'}': a directory without config.json; looked for a saved model "
        f"(config.json and weights); point model.policy at the folder save_pretrained wrote"]
    assert problems(f"model.policy={no_tokenizer}") == [
        f"model.policy='{no_tokenizer}': a directory without tokenizer files (looked for tokenizer.json, "
        f"tokenizer_config.json, tokenizer.model, vocab.json, spiece.model, vocab.txt); save the tokenizer there "
        f"(tokenizer.save_pretrained) or set model.tokenizer"]
    assert problems(f"model.policy={no_tokenizer}", f"model.tokenizer={toy_models.tokenizer}") == []


def test_chat_turns_need_a_tokenizer_with_a_chat_template(toy_models, tmp_path):
    """rollout.env_turns=chat renders the environment's replies with the chat template: a local tokenizer
    without one is named before Ray starts; raw turns, or a tokenizer that has one, pass."""
    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    tokenizer = AutoTokenizer.from_pretrained(toy_models.tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    agent = ("rollout.env=rlhf_ray.envs.toy:GuessingGame", "reward.sources=[{kind: function, path: 'rlhf_ray.envs:env_return'}]",
             f"model.policy={toy_models.policy}")
    assert problems(*agent, f"model.tokenizer={plain}", "rollout.env_turns=chat") == [
        f"model.tokenizer='{plain}': has no chat template, which rollout.env_turns=chat renders the environment's "
        f"replies with; set rollout.env_turns=raw (replies as plain text) or use a chat model's tokenizer"]
    assert problems(*agent, f"model.tokenizer={plain}", "rollout.env_turns=raw") == []
    assert problems(*agent, f"model.tokenizer={toy_models.tokenizer}", "rollout.env_turns=chat") == []


def test_hub_ids_are_accepted_online_and_need_the_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert problems("model.policy=org/missing-model", "data.train=org/missing-data") == []  # it may download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    found = problems("model.policy=org/missing-model", "data.train=org/missing-data")
    assert [line.partition(": ")[0] for line in found] == ["model.policy='org/missing-model'",
                                                           "data.train='org/missing-data'"]
    assert all("not found locally" in line and "unreachable/offline (HF_HUB_OFFLINE=1)" in line for line in found)
    assert "hf download org/missing-data --repo-type dataset" in found[1]

    snapshot = tmp_path / "models--org--missing-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    for name in ("config.json", "tokenizer_config.json"):
        (snapshot / name).write_text("{}")
    (tmp_path / "datasets" / "org___missing-data").mkdir(parents=True)
    assert problems("model.policy=org/missing-model", "data.train=org/missing-data") == []


def test_strings_that_are_neither_paths_nor_hub_ids(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert problems("data.train=some/nested/name") == [
        f"data.train='some/nested/name': no such file or directory (relative to {tmp_path}), and not a hub dataset "
        f"id (org/name); looked for a local .jsonl/.json/.parquet file or a directory of them, or a hub dataset; fix "
        f"the path, or use a hub id or 'toy'"]
    assert problems("model.policy=runs/sft/export/policy")[0].startswith(
        f"model.policy='runs/sft/export/policy': no such directory (relative to {tmp_path}), and not a hub id")


def test_existing_data_files_and_directories_pass(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "say: a\n"}) + "\n")
    assert problems(f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path}") == []


def test_reward_functions_must_import_and_be_callable(monkeypatch, tmp_path):
    (tmp_path / "broken_reward.py").write_text("raise RuntimeError('needs a GPU\\nsee the docs')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = problems("reward.sources.0.path=json:nofn", "reward.sources.1.path=math:pi",
                     "reward.sources.2.path=broken_reward:score", config=ROOT / "configs" / "toy_pipeline.yaml")
    assert found == [  # not sources.0: the pipeline's PPO stage replaces it by the RM export
        "reward.sources.1.path='math:pi': 'pi' in module 'math' is a float, not callable; name a function",
        "reward.sources.2.path='broken_reward:score': importing module 'broken_reward' raised RuntimeError: needs a "
        "GPU see the docs; fix the module"]  # one line, though the error's message has two
    assert problems("reward.sources.0.path=json:nofn") == [
        f"reward.sources.0.path='json:nofn': module 'json' ({json.__file__}) has no attribute 'nofn'; fix the "
        f"function name"]


def test_only_the_inputs_a_stage_reads_are_checked():
    sft = ROOT / "configs" / "toy_sft.yaml"
    assert problems("reward.sources.0.path=nomod:nofn", "model.critic=/nonexistent", config=sft) == []
    assert problems("feedback.input=/nope.jsonl", config=sft) == []
    assert problems("feedback.input=/nope.jsonl", config=ROOT / "configs" / "toy_feedback.yaml") == [
        "feedback.input='/nope.jsonl': no such file; looked for a JSONL file of feedback records; fix the path, "
        "or use 'toy'"]


def test_pipeline_and_iterate_name_the_stage_override_and_skip_what_the_run_writes():
    pipeline = ROOT / "configs" / "toy_pipeline.yaml"
    assert problems("pipeline.sft=[data.train=/nope.jsonl]", config=pipeline) == [
        "pipeline.sft: " + MISSING_DATA]
    assert problems("data.train=/nope.jsonl", config=pipeline) == [MISSING_DATA]  # once, not once per stage
    iterate = ROOT / "configs" / "toy_iterate.yaml"
    assert problems("label.labeler.path=nomod:nofn", config=iterate) == [
        MISSING_FUNCTION.replace("reward.sources.0.path", "label.labeler.path")]


def test_cai_files_checkpoint_and_token_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    assert problems("cai.constitution=/nope.yaml", "cai.critiques=/nope.jsonl",
                    config=ROOT / "configs" / "toy_cai.yaml") == [
        "cai.constitution='/nope.yaml': no such file; looked for a YAML/JSON constitution file (e.g. "
        "configs/constitutions/example.yaml); fix the path, or use 'toy'",
        "cai.critiques='/nope.jsonl': no such file; looked for a feedback JSONL file with critique records; fix the "
        "path, or set cai.critiques=null"]
    assert problems("checkpoint.resume=/nope/step_5") == [
        "checkpoint.resume='/nope/step_5': no such checkpoint directory; pass a step_* directory under the checkpoint "
        "root, or checkpoint.resume=auto / off"]
    http = "reward.sources.0={kind: http, http: {url: 'http://127.0.0.1:1/score', token_env: NO_SUCH_TOKEN}}"
    assert problems(http) == ["reward.sources.0.http.token_env='NO_SUCH_TOKEN': the environment variable "
                              "NO_SUCH_TOKEN is unset or empty; export NO_SUCH_TOKEN=<token> before launching"]
    monkeypatch.setenv("NO_SUCH_TOKEN", "secret")
    assert problems(http) == []


def test_launch_prints_one_line_per_problem_and_exits_2_before_ray(monkeypatch, capsys):
    monkeypatch.setattr(launch, "init_ray", lambda cfg: pytest.fail("Ray started despite pre-flight problems"))
    monkeypatch.setattr(launch, "preload", lambda stage: pytest.fail("stage modules loaded despite problems"))
    code = launch.main(["--config", str(GRPO), "model.policy=/nonexistent", "data.train=/nope.jsonl",
                        "reward.sources.0.path=nomod:nofn"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"preflight: {line}" for line in (MISSING_MODEL, MISSING_DATA, MISSING_FUNCTION)]
