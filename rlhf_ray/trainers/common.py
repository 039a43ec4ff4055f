"""What every stage does before its loop: resolve 'toy' sources, save the effective config, load data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import TOY, RunConfig, dump_config
from rlhf_ray.data import Keys
from rlhf_ray.rollout import check_rollout_model
from rlhf_ray.workers import ModelPaths


@dataclass(frozen=True)
class RunInputs:
    """Real paths for every model and dataset of a run ('toy' already built into the run directory)."""

    models: ModelPaths
    reward_paths: list[str | None]  # one per reward source, aligned with cfg.reward.sources (None for kind=http)
    train: str
    eval: str | None


def prepare_run(cfg: RunConfig) -> RunInputs:
    """Create the run directory, write config.yaml, build toy models/data where asked."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    toy = _ToyBuilder(cfg, run_dir / "toy")
    m = cfg.model
    policy = toy.model("policy") if m.policy == TOY else m.policy
    toy_roles = {"model": "reward", "judge": "policy"}  # a 'toy' judge is the toy policy (a causal LM)
    reward_paths = [toy.model(toy_roles[s.served_kind]) if s.path == TOY and s.served_kind in toy_roles else s.path
                    for s in cfg.reward.sources]
    first_rm = next((p for s, p in zip(cfg.reward.sources, reward_paths) if s.kind == "model"), None)
    toy_critic = TOY if m.policy == TOY else None  # the toy kit ships a critic; a real policy gets a new head
    critic = _first(m.critic, first_rm, toy_critic, policy)
    critic = toy.model("critic") if critic == TOY else critic
    models = ModelPaths(
        policy=policy,
        reference=toy.model("policy") if m.reference == TOY else (m.reference or policy),
        critic=critic,
        tokenizer=m.tokenizer or policy,
    )
    check_rollout_model(cfg, policy)
    train = toy.data("train") if cfg.data.train == TOY else cfg.data.train
    eval_ = toy.data("eval") if cfg.data.eval == TOY else cfg.data.eval
    return RunInputs(models=models, reward_paths=reward_paths, train=train, eval=eval_)


def _first(*values: str | None) -> str:
    return next(v for v in values if v)


class _ToyBuilder:
    """Builds the toy models and datasets once per run directory, on first use."""

    def __init__(self, cfg: RunConfig, out: Path):
        self.cfg, self.out = cfg, out
        self._models = None
        self._data = None

    def model(self, role: str) -> str:
        if self._models is None:
            from rlhf_ray.toy import save_toy_models

            t = self.cfg.model.toy
            self._models = save_toy_models(self.out / "models", seed=t.seed, hidden_size=t.hidden_size,
                                           intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                                           num_heads=t.num_heads)
        return getattr(self._models, role)

    def data(self, split: str) -> str:
        if self.cfg.data.toy_task in ("guess", "calc"):  # the toy agents' tasks (rollout.env); calc's SFT cold start
            from rlhf_ray.envs.toy import write_env_demonstrations, write_env_prompts

            d = self.cfg.data
            write = write_env_demonstrations if self.cfg.stage == "sft" else write_env_prompts
            paths = write(self.out / "data", d.toy_task, self.cfg.trainer.seed, d.toy_train_size, d.toy_eval_size)
            return str(paths[split == "eval"])
        if self.cfg.data.toy_task == "arith":
            from rlhf_ray.toy.arith import write_arith_datasets

            d = self.cfg.data
            paths = write_arith_datasets(self.out / "data", self.cfg.trainer.seed, d.toy_train_size, d.toy_eval_size)
            return getattr(paths, f"prompts_{split}")
        if self._data is None:
            from rlhf_ray.toy import write_toy_datasets

            self._data = write_toy_datasets(self.out / "data", seed=self.cfg.trainer.seed,
                                            n_train=self.cfg.data.toy_train_size, n_eval=self.cfg.data.toy_eval_size)
        return getattr(self._data, f"{self._kind()}_{split}")

    def _kind(self) -> str:
        return toy_data_kind(self.cfg)


def toy_data_kind(cfg: RunConfig) -> str:
    """The toy dataset a stage reads (a kind of `rlhf_ray.toy.write_toy_datasets`)."""
    if cfg.stage == "sft":
        return "sft"
    if cfg.stage == "rm":
        return "preference" if cfg.rm.loss == "pairwise" else "ranked"
    if cfg.stage == "dpo":
        return {"kto": "kto", "rrhf": "ranked"}.get(cfg.dpo.loss, "preference")
    return "prompts"


def toy_model(cfg: RunConfig, role: str) -> str:
    """Directory of the toy model of `role` ('policy' | 'reward' | 'critic'), built into the run directory."""
    return _ToyBuilder(cfg, cfg.run_dir / "toy").model(role)


def data_keys(cfg: RunConfig) -> Keys:
    d = cfg.data
    return Keys(prompt=d.prompt_key, response=d.response_key, chosen=d.chosen_key, rejected=d.rejected_key)


def start_served_rewards(cfg: RunConfig, reward_paths: list[str | None], timeout_s: float) -> list[str]:
    """Deploy the run's own Ray Serve reward applications (kind=serve without connect) before its actors
    reserve the cluster; → their names, for `delete_served_rewards` at the end."""
    if not any(s.kind == "serve" and not s.serve.connect for s in cfg.reward.sources):
        return []
    from rlhf_ray.rewards.serve import start_apps

    return start_apps(cfg, reward_paths, timeout_s)


def delete_served_rewards(names: list[str]) -> None:
    if names:
        from rlhf_ray.rewards.serve import delete_apps

        delete_apps(names)
