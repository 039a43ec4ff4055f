"""Pre-flight: every model, tokenizer, dataset, reward function and file a run names, resolved before Ray starts.

`preflight_problems(cfg)` returns one line per problem — the field, its value, what was looked for and
the fix — so that a wrong path fails in a second with every problem listed, not in a traceback after
Ray and the actors have started. What counts as resolvable mirrors what the loaders accept:

- 'toy' always resolves (built into the run directory at start).
- A model is a local directory holding `config.json`; a tokenizer one holding tokenizer files.
- Data is an existing file or directory (`rlhf_ray.data.sources` checks its contents); a missing path
  that looks local (a data suffix, or starting with `/`, `.`, `~`) is a problem.
- Any other string must have the form of a hub id (`huggingface_hub.utils.validate_repo_id`). It is
  then looked up in the local HF cache, and reported only when it is not there and `HF_HUB_OFFLINE`
  is set; otherwise it may still download.
- A reward function `module:function` is imported here (its module only) and must be callable.

Cheap by design: directory listings, the HF cache and reward modules' imports; no model is loaded and
the network is never used. Only the fields the stage reads are checked; paths a pipeline or iterate
run writes before it reads them (exports, a round's pairs) are skipped.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from rlhf_ray.config import (
    TOY, RewardSourceConfig, RunConfig, iterate_paths, iterate_stage_configs, pipeline_exports, pipeline_stage_configs,
    toy_policy_seed)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")
OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub reads as true


class Need(NamedTuple):
    field: str  # dotted config field, e.g. reward.sources.0.path
    value: str
    kind: str  # "model" | "tokenizer" | "data" | "function" | "file" | "checkpoint" | "env" | "chat_template"


def preflight_problems(cfg: RunConfig) -> list[str]:
    """One line per input of the run that cannot be resolved; empty when all can."""
    problems, checked, failed = [], set(), set()
    for need in stage_needs(cfg):
        if need in checked or (need.field, need.value) in failed:  # a missing model is not also a missing tokenizer
            continue
        checked.add(need)
        problem = CHECKS[need.kind](need)
        if problem:
            failed.add((need.field, need.value))
            problems.append(f"{need.field}={need.value!r}: {' '.join(problem.splitlines())}")  # one line each
    return problems


# ---------------------------------------------------------------------------------------------
# What each stage reads
# ---------------------------------------------------------------------------------------------


def stage_needs(cfg: RunConfig) -> list[Need]:
    if cfg.stage == "pipeline":
        return _composite(cfg, "pipeline", pipeline_stage_configs(cfg), set(pipeline_exports(cfg).values()))
    if cfg.stage == "iterate":  # the final evaluation first, so shared inputs carry their own field names
        rounds = iterate_stage_configs(cfg, 1, cfg.model.policy)
        wired = {path for path in iterate_paths(cfg, 1).values() if path}
        return _sampling_needs(cfg, labeler=False) + _composite(cfg, "iterate", rounds, wired)
    if cfg.stage == "feedback":
        return [Need("feedback.input", cfg.feedback.input, "file")]
    if cfg.stage == "label":
        return _sampling_needs(cfg, labeler=True)
    if cfg.stage == "eval":
        return _eval_needs(cfg)
    if cfg.stage == "cai":
        c = cfg.cai
        files = [Need("cai.constitution", c.constitution, "file")] + ([Need("cai.critiques", c.critiques, "file")]
                                                                       if c.critiques else [])
        key = c.endpoint.api_key_env if c.endpoint else None
        return _sampling_needs(cfg, labeler=c.pairs == "judge") + files + (
            [Need("cai.endpoint.api_key_env", key, "env")] if key else [])
    needs = _policy_needs(cfg) + _data_needs(cfg) + _resume_needs(cfg)
    if cfg.model.reference and (cfg.stage == "dpo" or cfg.stage == "ppo" and cfg.uses_reference):
        needs.append(Need("model.reference", cfg.model.reference, "model"))
    if cfg.stage == "ppo":
        if cfg.uses_critic and cfg.model.critic:
            needs.append(Need("model.critic", cfg.model.critic, "model"))
        needs += _reward_needs(cfg)
        if cfg.rollout.env and cfg.rollout.env_turns == "chat":
            tokenizer = _policy_needs(cfg)[1]
            needs.append(Need(tokenizer.field, tokenizer.value, "chat_template"))
    return needs


def _policy_needs(cfg: RunConfig) -> list[Need]:
    """The trained (or sampled) model and the tokenizer read with it (model.tokenizer, else the model's own)."""
    m = cfg.model
    field, model = ("rm.init", cfg.rm.init) if cfg.stage == "rm" and cfg.rm.init else ("model.policy", m.policy)
    tokenizer = Need("model.tokenizer", m.tokenizer, "tokenizer") if m.tokenizer else Need(field, model, "tokenizer")
    return [Need(field, model, "model"), tokenizer]


def _data_needs(cfg: RunConfig) -> list[Need]:
    d = cfg.data
    return [Need("data.train", d.train, "data")] + ([Need("data.eval", d.eval, "data")] if d.eval else [])


def _resume_needs(cfg: RunConfig) -> list[Need]:
    resume = cfg.checkpoint.resume
    return [] if resume in ("off", "auto") else [Need("checkpoint.resume", resume, "checkpoint")]


def _sampling_needs(cfg: RunConfig, labeler: bool) -> list[Need]:
    """cai, label and iterate's evaluation: the policy samples prompts; the reward sources score held-out ones."""
    needs = _policy_needs(cfg) + _data_needs(cfg)
    if labeler:
        needs += _source_needs("label.labeler", cfg.label.labeler)
    return needs + (_reward_needs(cfg) if cfg.data.eval else [])


def _eval_needs(cfg: RunConfig) -> list[Need]:
    """Each policy (and its tokenizer, or model.tokenizer), the golden prompts, reward.sources, the judge,
    the rule functions, the reward model and its preference pairs."""
    e, needs = cfg.eval, []
    for name, spec in e.policies.items():
        if toy_policy_seed(spec, cfg.model.toy.seed) is None:
            needs.append(Need(f"eval.policies.{name}", spec, "model"))
            if not cfg.model.tokenizer:
                needs.append(Need(f"eval.policies.{name}", spec, "tokenizer"))
    if cfg.model.tokenizer:
        needs.append(Need("model.tokenizer", cfg.model.tokenizer, "tokenizer"))
    needs += [Need("data.eval", cfg.data.eval, "data")] if cfg.data.eval else []
    needs += _reward_needs(cfg) + (_source_needs("eval.judge", e.judge) if e.judge else [])
    needs += _source_needs("eval.refusal_judge", e.refusal_judge) if e.refusal_judge else []
    needs += [Need(f"eval.rules.{i}", spec, "function") for i, spec in enumerate(e.rules)]
    if e.reward_model:
        needs += [Need("eval.reward_model", e.reward_model, "model"), Need("eval.reward_model", e.reward_model, "tokenizer")]
    if e.preference_data:
        needs.append(Need("eval.preference_data", e.preference_data, "data"))
    return needs


def _reward_needs(cfg: RunConfig) -> list[Need]:
    sources = enumerate(cfg.reward.sources)
    return [need for i, source in sources for need in _source_needs(f"reward.sources.{i}", source)]


def _source_needs(prefix: str, source: RewardSourceConfig) -> list[Need]:
    if source.kind == "serve" and source.serve.connect:  # the application, running elsewhere, holds the source
        return []
    kind = source.served_kind
    if kind == "function":
        return [Need(f"{prefix}.path", source.path, "function")]
    if kind == "http":
        token = source.http.token_env
        return [Need(f"{prefix}.http.token_env", token, "env")] if token else []
    if kind == "judge" and source.judge and source.judge.endpoint:
        key = source.judge.endpoint.api_key_env
        return [Need(f"{prefix}.judge.endpoint.api_key_env", key, "env")] if key else []
    return [Need(f"{prefix}.path", source.path, "model"), Need(f"{prefix}.path", source.path, "tokenizer")]


def _composite(cfg: RunConfig, section: str, stages: dict[str, RunConfig], wired: set[str]) -> list[Need]:
    """Every stage's needs except the paths the run itself writes; a value the stage's own overrides set is
    named `<section>.<stage>: <field>`."""
    needs = []
    for name, stage_cfg in stages.items():
        for need in stage_needs(stage_cfg):
            if need.value in wired:
                continue
            shared = _value_at(cfg, need.field) == need.value
            needs.append(need if shared else need._replace(field=f"{section}.{name}: {need.field}"))
    return needs


def _value_at(cfg: RunConfig, field: str):
    node = cfg
    for part in field.split("."):
        if isinstance(node, list):
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


# ---------------------------------------------------------------------------------------------
# Checks: each returns what is wrong, what was looked for and the fix, or None
# ---------------------------------------------------------------------------------------------


def check_model(need: Need) -> str | None:
    value, path = need.value, Path(need.value).expanduser()
    if value == TOY:
        return None
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        return (f"a directory without config.json; looked for a saved model (config.json and weights); point "
                f"{need.field} at the folder save_pretrained wrote")
    if path.exists():
        return "is a file; looked for a model directory holding config.json; point at that directory"
    return _export_note(_hub_problem(need, "model", ("config.json",),
                                     f"no such directory{_relative_note(path)}, and not a hub id (org/name); looked "
                                     f"for a local model directory holding config.json; fix the path, or use a hub id "
                                     f"(e.g. Qwen/Qwen2.5-0.5B-Instruct) or 'toy'"), path)


def check_tokenizer(need: Need) -> str | None:
    value, path = need.value, Path(need.value).expanduser()
    if value == TOY:
        return None
    if path.is_dir():
        if any((path / name).is_file() for name in TOKENIZER_FILES):
            return None
        field = need.field.rpartition(" ")[2]  # without a `pipeline.<stage>: ` prefix
        fix = ("point it at a folder holding a tokenizer, or a hub id" if field == "model.tokenizer" else
               "save the tokenizer there (tokenizer.save_pretrained) or set model.tokenizer"
               if field.startswith(("model.", "rm.init")) else
               "this source loads its tokenizer from its own directory: save it there (tokenizer.save_pretrained)")
        return f"a directory without tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); {fix}"
    if path.exists():
        return "is a file; looked for a directory holding tokenizer files; point at that directory"
    return _hub_problem(need, "model", ("tokenizer_config.json", "tokenizer.json"),
                        f"no such directory{_relative_note(path)}, and not a hub id (org/name); looked for a local "
                        f"directory holding tokenizer files; fix the path, or use a hub id or 'toy'")


def check_data(need: Need) -> str | None:
    value, path = need.value, Path(need.value).expanduser()
    if value == TOY or path.exists():  # a file's or directory's contents are the loader's to check
        return None
    looked_for = f"looked for a local {'/'.join(DATA_SUFFIXES)} file or a directory of them"
    if path.suffix in DATA_SUFFIXES or value.startswith(("/", ".", "~")):
        return (f"no such file or directory{_relative_note(path)}; {looked_for}; fix the path, or use a hub "
                f"dataset id or 'toy'")
    return _hub_problem(need, "dataset", (),
                        f"no such file or directory{_relative_note(path)}, and not a hub dataset id (org/name); "
                        f"{looked_for}, or a hub dataset; fix the path, or use a hub id or 'toy'")


def check_function(need: Need) -> str | None:
    module_name, _, attr = need.value.partition(":")
    if not module_name or not attr:
        return "not of the form module.path:function; write e.g. rlhf_ray.rewards.verifiers:math_answer"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        return (f"cannot import module '{module_name}' ({err}); looked for a module:function importable by the "
                f"driver; fix the module path, install its package, or add its folder to PYTHONPATH")
    except Exception as err:  # noqa: BLE001 - the user's module failing at import, whatever the error
        return f"importing module '{module_name}' raised {type(err).__name__}: {err}; fix the module"
    fn = getattr(module, attr, None)
    if fn is None:
        return f"module '{module_name}' ({module.__file__}) has no attribute '{attr}'; fix the function name"
    if not callable(fn):
        return f"'{attr}' in module '{module_name}' is a {type(fn).__name__}, not callable; name a function"
    return None


FILES = {  # field → (what the file is, the fix besides the path)
    "feedback.input": ("a JSONL file of feedback records", "or use 'toy'"),
    "cai.constitution": ("a YAML/JSON constitution file (e.g. configs/constitutions/example.yaml)", "or use 'toy'"),
    "cai.critiques": ("a feedback JSONL file with critique records", "or set cai.critiques=null"),
}


def check_file(need: Need) -> str | None:
    path = Path(need.value).expanduser()
    if need.value == TOY or path.is_file():
        return None
    what, alternative = FILES[need.field.rpartition(" ")[2]]  # field without a `pipeline.<stage>: ` prefix
    return f"no such file{_relative_note(path)}; looked for {what}; fix the path, {alternative}"


def check_checkpoint(need: Need) -> str | None:
    if Path(need.value).expanduser().is_dir():
        return None  # a step_* directory; its contents are verified when it is loaded
    return (f"no such checkpoint directory{_relative_note(Path(need.value))}; pass a step_* directory under "
            f"the checkpoint root, or checkpoint.resume=auto / off")


def check_env(need: Need) -> str | None:
    if os.environ.get("RAY_ADDRESS") or os.environ.get(need.value):
        return None  # on a cluster the reward worker's environment may come from the runtime env
    return f"the environment variable {need.value} is unset or empty; export {need.value}=<token> before launching"


def check_chat_template(need: Need) -> str | None:
    """rollout.env_turns=chat: a local tokenizer directory must carry a chat template (hub ids load later)."""
    path = Path(need.value).expanduser()
    if need.value == TOY or not path.is_dir() or check_tokenizer(need):
        return None  # the toy's has one; a hub id or a missing tokenizer is reported elsewhere
    config = path / "tokenizer_config.json"
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists() or \
            (config.exists() and json.loads(config.read_text()).get("chat_template")):
        return None
    return ("has no chat template, which rollout.env_turns=chat renders the environment's replies with; "
            "set rollout.env_turns=raw (replies as plain text) or use a chat model's tokenizer")


CHECKS = {"model": check_model, "tokenizer": check_tokenizer, "data": check_data, "function": check_function,
          "file": check_file, "checkpoint": check_checkpoint, "env": check_env, "chat_template": check_chat_template}


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"


def _export_note(problem: str | None, path: Path) -> str | None:
    """A missing <run_dir>/<stage>/export/<policy|reward>: the problem, and which run writes that directory."""
    if problem is None or len(path.parts) < 3 or path.parts[-2] != "export":
        return problem
    run = path.parents[2]
    return (f"{problem}; it is what stage {path.parts[-3]!r} of run {str(run)!r} exports: run that first"
            + (" (python launch.py: the toy pipeline)" if run.name == "toy_pipeline" else ""))


# ---------------------------------------------------------------------------------------------
# Hub ids: the form, and the local cache when the hub is offline
# ---------------------------------------------------------------------------------------------


def _hub_problem(need: Need, repo_type: str, files: tuple[str, ...], not_an_id: str) -> str | None:
    """`not_an_id` when the value is not hub-id shaped; a problem when offline and not cached; else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(need.value)
    except HFValidationError:
        return not_an_id
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() not in OFFLINE_VALUES or _cached(need.value, repo_type, files):
        return None  # online it may still download
    download = f"hf download {need.value}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    return (f"no such local path, and the hub {repo_type} is not found locally (looked in the HF cache, "
            f"{_cache_dir(repo_type)}) and the hub is unreachable/offline (HF_HUB_OFFLINE={offline}); download it "
            f"first ({download}) with the network on, unset HF_HUB_OFFLINE, or use a local path")


def _cached(repo_id: str, repo_type: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    if repo_type == "dataset":  # the hub cache, or a dataset `datasets` already prepared
        return (Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}").is_dir() or \
            (_datasets_cache() / repo_id.replace("/", "___")).is_dir()
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files)


def _datasets_cache() -> Path:
    """`datasets`' own cache (datasets.config.HF_DATASETS_CACHE, without importing datasets)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")


def _cache_dir(repo_type: str) -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE + (f" and {_datasets_cache()}" if repo_type == "dataset" else "")
