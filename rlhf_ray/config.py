"""Typed run configuration: one default and one line of help per field, validated before any actor starts.

A run is configured by a YAML file holding *overrides only* plus `a.b.c=value` command-line
overrides, applied last. Everything is checked here — unknown keys (with the nearest valid key
suggested), types, ranges and every cross-field rule (batch divisibility, estimator vs critic vs
samples per prompt, ZeRO stage vs offload) — and every problem is reported as one `ConfigError`
that names the field, the value and the fix. Validation never uses `assert` (it vanishes under -O).

The value "toy" for a model or data source means the offline toy kit (`rlhf_ray.toy`): tiny
random models and the synthetic vowel task, built into the run directory at start.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TOY = "toy"
TRAINED_ROLES = ("policy", "critic")
ROLES = ("policy", "critic", "reference", "reward", "rollout")


class ConfigError(ValueError):
    """A configuration problem, reported before anything starts; the message names field, value and fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class ToyModelConfig(Section):
    hidden_size: int = Field(64, gt=0, description="Toy Llama hidden size.")
    intermediate_size: int = Field(128, gt=0, description="Toy Llama MLP size.")
    num_layers: int = Field(2, gt=0, description="Toy Llama decoder layers.")
    num_heads: int = Field(4, gt=0, description="Toy Llama attention heads (must divide hidden_size).")
    seed: int = Field(0, description="Seed of the toy models' random weights.")


class ModelConfig(Section):
    policy: str = Field(TOY, description="Policy to train: local path, hub id, or 'toy' for the offline toy model.")
    reference: str | None = Field(None, description="Frozen reference; default: the initial policy.")
    critic: str | None = Field(None, description="Critic initialisation (backbone + scalar head); default: the first reward model, else the policy.")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; default: the policy's.")
    trust_remote_code: bool = Field(False, description="Allow model/tokenizer repos to run their own code. Keep false unless you trust the source.")
    toy: ToyModelConfig = Field(default_factory=ToyModelConfig, description="Sizes of the toy models when a model is 'toy'.")


class DataConfig(Section):
    train: str = Field(TOY, description="Training data: .jsonl/.json/.parquet path, hub id, or 'toy'. Prompts for RL; pairs for SFT/RM/DPO.")
    eval: str | None = Field(TOY, description="Held-out data (same format as train); null disables evaluation.")
    split: str = Field("train", description="Split name when `train` is a hub id.")
    eval_split: str = Field("test", description="Split name when `eval` is a hub id.")
    prompt_key: str = Field("prompt", description="Column holding the prompt (a string or a list of chat messages).")
    response_key: str = Field("response", description="Column holding the SFT response.")
    chosen_key: str = Field("chosen", description="Column holding the preferred response.")
    rejected_key: str = Field("rejected", description="Column holding the dispreferred response.")
    max_prompt_len: int = Field(64, gt=0, description="Longest prompt in tokens; longer ones follow `overlength`.")
    max_response_len: int = Field(32, gt=0, description="Longest SFT/preference response in tokens (RL uses rollout.max_new_tokens).")
    overlength: Literal["error", "skip", "truncate_left"] = Field("error", description="What to do with prompts over max_prompt_len.")
    on_bad_row: Literal["error", "skip"] = Field("error", description="Bad rows stop the run naming file and row, or are dropped and counted per reason.")
    toy_train_size: int = Field(512, gt=0, description="Rows generated per toy training file.")
    toy_eval_size: int = Field(64, gt=0, description="Rows generated per toy eval file.")
    toy_task: Literal["vowel", "arith"] = Field("vowel", description="Toy prompts: 'vowel' (reward the share of vowels) or 'arith' (single-digit sums, exact-answer reward).")


class VLLMConfig(Section):
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per vLLM engine.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    max_model_len: int | None = Field(None, gt=0, description="vLLM context length; default: prompt + response limits.")
    enable_sleep: bool = Field(False, description="Sleep the engine (free weights and KV cache) while training runs; for colocation.")


class RolloutConfig(Section):
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="Generation engine: vLLM where it imports and CUDA exists, else HF generate.")
    num_engines: int = Field(1, gt=0, description="Rollout engines (Ray actors); prompts are split across them.")
    samples_per_prompt: int = Field(1, gt=0, description="Responses sampled per prompt (n); group estimators need n >= 2.")
    max_new_tokens: int = Field(16, gt=0, description="Longest response in tokens; a response without EOS by then is truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same temperature).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    suppress_special_tokens: bool = Field(False, description="Never sample special tokens (EOS included): every response has max_new_tokens tokens. For benchmarks.")
    seed: int = Field(0, description="Base sampling seed; step and engine are mixed in.")
    weight_sync: Literal["object_store", "gloo"] = Field("object_store", description="Policy → engine weight transport: Ray object store (numpy) or a stateless gloo group.")
    sync_bucket_mb: float = Field(64.0, gt=0, description="Weights are sent in buckets of about this many MiB.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine options.")


class RewardSourceConfig(Section):
    kind: Literal["model", "function"] = Field(..., description="'model': HF sequence classifier scored at the last token; 'function': a Python `module:function`.")
    path: str = Field(..., description="Model path / hub id / 'toy' for kind=model; `module:function` for kind=function.")
    name: str | None = Field(None, description="Name in metrics (reward/<name>); default: derived from path.")
    weight: float = Field(1.0, description="Weight of this source in the summed score.")


def _default_reward_sources() -> list[RewardSourceConfig]:
    return [RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward", name="vowel")]


class RewardConfig(Section):
    sources: list[RewardSourceConfig] = Field(default_factory=_default_reward_sources, description="Reward sources; the score is their weighted sum.")
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip] before advantages; null disables.")
    normalize: Literal["none", "batch", "running"] = Field("none", description="Normalise scores per batch or with running mean/std.")
    missing_eos_penalty: float | None = Field(None, description="Added to the score of responses that hit the length limit without EOS; null disables.")
    batch_size: int = Field(32, gt=0, description="Sequences per reward-model forward pass.")
    overlong_buffer: int | None = Field(None, gt=0, description="DAPO soft overlong penalty: responses longer than max_new_tokens - overlong_buffer lose up to overlong_penalty linearly; null disables.")
    overlong_penalty: float = Field(1.0, ge=0, description="Largest overlong penalty (reached at max_new_tokens).")


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="KL estimator (Schulman 2020): k1 = log-ratio, k2 = ½ log-ratio², k3 = exp(-r) - 1 + r.")
    placement: Literal["reward", "loss"] = Field("reward", description="KL as a per-token reward penalty (InstructGPT) or a loss term (GRPO, needs k3).")
    coef: float = Field(0.05, ge=0, description="KL coefficient β (initial value when adaptive).")
    adaptive: bool = Field(False, description="Adapt β towards `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per sequence for the adaptive controller.")
    horizon: int = Field(10000, gt=0, description="Adaptive controller horizon in samples.")


class AlgoConfig(Section):
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "gae", description="Advantage estimator; only 'gae' uses a critic.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool | None = Field(None, description="Whiten advantages over the batch's response tokens; null: the estimator's default (on for gae and reinforce_pp*, off for grpo/dr_grpo/rloo).")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference policy.")
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip below: 1 - clip_low.")
    clip_high: float = Field(0.2, gt=0, description="PPO ratio clip above: 1 + clip_high (> clip_low is DAPO's clip-higher).")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip constant c for negative advantages (Ye et al. 2020); null disables.")
    value_clip: float | None = Field(0.2, gt=0, description="Value-loss clip ε_v; null disables.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient c_H.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How token losses are averaged (ALGORITHMS.md §5.3).")
    epochs: int = Field(1, gt=0, description="PPO epochs over each rollout batch.")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: drop prompt groups whose scores are all equal and refill the batch with new prompts.")
    max_refills: int = Field(3, ge=0, description="Extra generation rounds per step for dynamic sampling; groups still missing are filled from dropped ones.")
    mask_truncated: bool = Field(False, description="Leave responses that hit max_new_tokens without EOS out of the loss (DAPO overlong filtering).")


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="LR schedule after warm-up.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null disables.")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage for trained roles.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision (bf16 on GPU; fp32 on CPU).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states on CPU (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO 3 only).")
    timeout_s: int = Field(300, gt=0, description="Deadline of torch.distributed collectives, seconds.")


class RoleResources(Section):
    num_workers: int = Field(1, gt=0, description="Ray actors of this role (data-parallel ranks for trained roles).")
    cpus: float = Field(1.0, gt=0, description="CPUs per actor (fractions allowed when colocated).")
    gpus: float = Field(0.0, ge=0, description="GPUs per actor; 0 on CPU-only clusters.")


class PlacementConfig(Section):
    policy: RoleResources = Field(default_factory=RoleResources, description="Policy ranks.")
    critic: RoleResources = Field(default_factory=RoleResources, description="Critic ranks (created only for estimators that need one).")
    reference: RoleResources = Field(default_factory=RoleResources, description="Reference workers.")
    reward: RoleResources = Field(default_factory=RoleResources, description="Reward workers.")
    rollout: RoleResources = Field(default_factory=RoleResources, description="Resources per rollout engine (count is rollout.num_engines).")
    colocate: list[list[str]] = Field(default_factory=list, description="Groups of roles sharing one placement group's bundles, e.g. [[policy, reference, rollout]].")
    torch_threads: int | None = Field(None, gt=0, description="torch threads per actor; default: its CPU count rounded up.")
    timeout_s: float = Field(120.0, gt=0, description="Deadline for actors to start and placement to be granted.")


class LoggingConfig(Section):
    jsonl: bool = Field(True, description="Write one JSON line per step to <run_dir>/metrics.jsonl.")
    tensorboard: bool = Field(False, description="Write TensorBoard events to <run_dir>/tb.")
    wandb: bool = Field(False, description="Log to Weights & Biases when installed (WANDB_API_KEY from env).")
    wandb_project: str = Field("rlhf_ray", description="W&B project.")
    progress_bar: bool = Field(True, description="Show a progress bar on the console.")
    log_every: int = Field(1, gt=0, description="Console summary every N steps.")


class CheckpointConfig(Section):
    export_hf: bool = Field(True, description="Export the final trained model(s) in Hugging Face format to <run_dir>/export.")


class TrainerConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent of run directories.")
    seed: int = Field(0, description="Global seed (data order, model init, sampling).")
    total_steps: int = Field(20, gt=0, description="Training steps (RL: rollout batches; offline: optimizer steps).")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per RL step; sequences per step = prompts_per_step × samples_per_prompt.")
    mini_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step (all data-parallel ranks together).")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward/backward on one rank.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (and at the start and end); 0: only at the end.")
    eval_prompts: int = Field(32, gt=0, description="Held-out prompts per evaluation.")
    eval_greedy: bool = Field(False, description="Evaluate with greedy decoding instead of the rollout sampling settings.")
    eval_samples: int = Field(1, gt=0, description="Responses per held-out prompt (n for pass@k).")
    eval_pass_k: list[int] = Field(default_factory=list, description="k values for pass@k on verifiable tasks (each <= eval_samples); a sample passes when its score >= eval_pass_threshold.")
    eval_pass_threshold: float = Field(1.0, description="Score at or above which an eval sample counts as correct for pass@k.")
    eval_win_rate: bool = Field(False, description="Also report the win-rate of the policy against the reference policy's responses, judged by the reward sources.")
    timeout_s: float = Field(600.0, gt=0, description="Deadline of one phase's remote calls, seconds.")


class RunConfig(Section):
    stage: Literal["ppo"] = Field("ppo", description="What to run: 'ppo' (RL with any estimator).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Models.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward sources.")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Estimators and losses.")
    policy_optim: OptimConfig = Field(default_factory=OptimConfig, description="Policy optimiser.")
    critic_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-5), description="Critic optimiser.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed engine.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Actors and resources.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metric sinks.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and export.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loop sizes and schedule.")

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        problems = cross_field_problems(self)
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    # Derived sizes, computed in one place.
    @property
    def uses_critic(self) -> bool:
        return self.algo.advantage == "gae"

    @property
    def sequences_per_step(self) -> int:
        return self.trainer.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.output_dir) / self.trainer.name

    def grad_accum_steps(self, role: str) -> int:
        ranks = getattr(self.placement, role).num_workers
        return self.trainer.mini_batch_size // (self.trainer.micro_batch_size * ranks)


# ---------------------------------------------------------------------------------------------
# Cross-field rules: each returns a message naming fields, values and the fix, or nothing.
# ---------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def cross_field_problems(cfg: RunConfig) -> list[str]:
    checks = (_batch_divisibility, _estimator_rules, _kl_rules, _deepspeed_rules, _placement_rules, _dapo_rules, _toy_rules)
    return [msg for check in checks for msg in check(cfg)]


def _batch_divisibility(cfg: RunConfig) -> list[str]:
    t = cfg.trainer
    out = []
    seqs = cfg.sequences_per_step
    if seqs % t.mini_batch_size:
        out.append(
            f"trainer.mini_batch_size={t.mini_batch_size} must divide the sequences per step "
            f"(trainer.prompts_per_step={t.prompts_per_step} × rollout.samples_per_prompt="
            f"{cfg.rollout.samples_per_prompt} = {seqs}); set trainer.mini_batch_size to a divisor of {seqs}.")
    roles = TRAINED_ROLES if cfg.uses_critic else ("policy",)
    for role in roles:
        ranks = getattr(cfg.placement, role).num_workers
        per_step = t.micro_batch_size * ranks
        if t.mini_batch_size % per_step:
            out.append(
                f"trainer.mini_batch_size={t.mini_batch_size} must be a multiple of trainer.micro_batch_size="
                f"{t.micro_batch_size} × placement.{role}.num_workers={ranks} = {per_step}; "
                f"change one of them (e.g. trainer.mini_batch_size={per_step * max(1, t.mini_batch_size // per_step)}).")
    if cfg.rollout.num_engines > t.prompts_per_step:
        out.append(
            f"rollout.num_engines={cfg.rollout.num_engines} exceeds trainer.prompts_per_step={t.prompts_per_step}: "
            f"some engines would get no prompts; lower rollout.num_engines.")
    return out


def _estimator_rules(cfg: RunConfig) -> list[str]:
    a, n = cfg.algo.advantage, cfg.rollout.samples_per_prompt
    if a in GROUP_ESTIMATORS and n < 2:
        return [f"algo.advantage={a} compares samples of the same prompt and needs rollout.samples_per_prompt >= 2 "
                f"(got {n}); set rollout.samples_per_prompt=4, or use algo.advantage=gae or reinforce_pp."]
    return []


def _kl_rules(cfg: RunConfig) -> list[str]:
    kl = cfg.algo.kl
    if kl.placement == "loss" and kl.estimator != "k3":
        return [f"algo.kl.placement=loss needs algo.kl.estimator=k3 (got {kl.estimator}): k1/k2 in the loss give "
                f"biased gradients; set algo.kl.estimator=k3 or algo.kl.placement=reward."]
    if cfg.algo.clip_high < cfg.algo.clip_low:
        return [f"algo.clip_high={cfg.algo.clip_high} is below algo.clip_low={cfg.algo.clip_low}; clip-higher needs "
                f"clip_high >= clip_low."]
    return []


def _deepspeed_rules(cfg: RunConfig) -> list[str]:
    ds = cfg.deepspeed
    out = []
    if ds.offload_optimizer and ds.zero_stage == 0:
        out.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1 (got 0); raise the stage or disable offload.")
    if ds.offload_params and ds.zero_stage != 3:
        out.append(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {ds.zero_stage}); set zero_stage=3 or disable offload_params.")
    if cfg.rollout.backend == "vllm" and cfg.placement.rollout.gpus <= 0:
        out.append("rollout.backend=vllm needs GPUs: set placement.rollout.gpus (e.g. 1), or use rollout.backend=hf on CPU.")
    return out


def _placement_rules(cfg: RunConfig) -> list[str]:
    out, seen = [], set()
    for group in cfg.placement.colocate:
        for role in group:
            if role not in ROLES:
                out.append(f"placement.colocate names unknown role '{role}'; roles are {', '.join(ROLES)}.")
            elif role in seen:
                out.append(f"placement.colocate lists role '{role}' in more than one group; each role may appear once.")
            seen.add(role)
    return out


def _dapo_rules(cfg: RunConfig) -> list[str]:
    out = []
    if cfg.algo.dynamic_sampling and cfg.rollout.samples_per_prompt < 2:
        out.append(f"algo.dynamic_sampling=true drops groups of equal scores and needs rollout.samples_per_prompt >= 2 "
                   f"(got {cfg.rollout.samples_per_prompt}).")
    buffer = cfg.reward.overlong_buffer
    if buffer is not None and buffer > cfg.rollout.max_new_tokens:
        out.append(f"reward.overlong_buffer={buffer} exceeds rollout.max_new_tokens={cfg.rollout.max_new_tokens}; "
                   f"use a buffer no longer than the response limit.")
    bad_k = [k for k in cfg.trainer.eval_pass_k if not 1 <= k <= cfg.trainer.eval_samples]
    if bad_k:
        out.append(f"trainer.eval_pass_k={cfg.trainer.eval_pass_k} needs every k in 1..trainer.eval_samples="
                   f"{cfg.trainer.eval_samples}; raise trainer.eval_samples or drop {bad_k}.")
    return out


def _toy_rules(cfg: RunConfig) -> list[str]:
    toy = cfg.model.toy
    if toy.hidden_size % toy.num_heads:
        return [f"model.toy.num_heads={toy.num_heads} must divide model.toy.hidden_size={toy.hidden_size}."]
    return []


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides → validated RunConfig
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults ← YAML file (overrides only) ← `a.b.c=value` overrides; validated, or ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}.")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form section.field=value (e.g. trainer.total_steps=5).")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node or not isinstance(node[part], (dict, list)):
            node[part] = _defaults_at(parts[: i + 1]) if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: '{part}' is not an index of a list of {len(node)} items.")
    return int(part)


def _defaults_at(parts: list[str]) -> Any:
    """The default value at a dotted path, as plain data (so `reward.sources.0.weight=2` edits the default list)."""
    node: Any = RunConfig().model_dump(mode="json")
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node.get(part, {})
    return node


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_suggest(e['loc'])}")
        elif e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), ConfigError):
            lines.append(str(e["ctx"]["error"]))
        else:
            lines.append(f"{loc}={e.get('input')!r}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _suggest(loc: tuple) -> str:
    section = _section_at(loc[:-1])
    if section is None:
        return ""
    names = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    prefix = ".".join(str(p) for p in loc[:-1])
    if close:
        return f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return f"; valid keys here: {', '.join(names)}"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _section_type(field.annotation)
        if cls is None:
            return None
    return cls


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: RunConfig) -> str:
    """The effective config as YAML (what `--print-config` shows and the run directory keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
