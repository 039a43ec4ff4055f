"""The DPO-family constants of the `dpo` section reach the loss the stage trains with
(`trainers/dpo.make_stage(cfg, inputs).loss`, what every rank and the evaluation call),
each checked against a hand computation on fixed sequence log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data import KTOExample, PreferenceExample
from rlhf_ray.toy import build_char_tokenizer
from rlhf_ray.trainers import dpo
from rlhf_ray.trainers.common import RunInputs
from rlhf_ray.trainers.offline import batch_scale
from rlhf_ray.workers import ModelPaths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> RunInputs:
    path = str(tmp_path_factory.mktemp("tok"))
    build_char_tokenizer().save_pretrained(path)
    return RunInputs(ModelPaths(path, path, path, path), [], "unused", None)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# one pair: chosen has 2 response tokens (ℓ = −2, mean −1), rejected 4 (ℓ = −8, mean −2)
PAIR = PreferenceExample([20, 21], [30, 2], [40, 41, 42, 2])
PAIR_LOGPROBS = torch.tensor([[-2.0, -8.0]])


def pair_loss(inputs: RunInputs, overrides: list[str]) -> tuple[float, dict]:
    cfg = load_config(None, ["stage=dpo"] + overrides)
    stage = dpo.make_stage(cfg, inputs)
    batch = stage.collate([PAIR])
    loss, shares, _ = stage.loss(PAIR_LOGPROBS, batch, batch_scale(batch, cfg.data.max_response_len))
    return float(loss), {k: float(v) for k, v in shares.items()}


def test_simpo_gamma_is_the_target_margin(inputs):
    loss, _ = pair_loss(inputs, ["dpo.loss=simpo", "dpo.simpo_gamma=0.3", "dpo.beta=0.5"])
    # −log σ(β·(−1) − β·(−2) − γ) = −log σ(0.5 − 0.3)
    assert loss == pytest.approx(-log_sigmoid(0.2), abs=1e-6)
    default, _ = pair_loss(inputs, ["dpo.loss=simpo", "dpo.beta=0.5"])
    assert default == pytest.approx(-log_sigmoid(0.0), abs=1e-6)  # default γ = 0.5


def test_orpo_lambda_weighs_the_odds_ratio_term(inputs):
    loss, shares = pair_loss(inputs, ["dpo.loss=orpo", "dpo.orpo_lambda=0.5"])

    def log_odds(avg: float) -> float:
        return avg - math.log(1 - math.exp(avg))

    log_odds_ratio = log_odds(-1.0) - log_odds(-2.0)
    # L_SFT(y_c) = its mean token NLL = 1, plus λ·(−log σ(log odds ratio))
    assert loss == pytest.approx(1.0 + 0.5 * -log_sigmoid(log_odds_ratio), abs=1e-6)
    assert shares["odds_ratio_loss"] == pytest.approx(-log_sigmoid(log_odds_ratio), abs=1e-6)


def test_kto_weights_scale_desirable_and_undesirable_examples(inputs):
    cfg = load_config(None, ["stage=dpo", "dpo.loss=kto", "dpo.kto_desirable_weight=2.0",
                             "dpo.kto_undesirable_weight=0.5"])
    stage = dpo.make_stage(cfg, inputs)
    batch = stage.collate([KTOExample([20], [30, 2], True), KTOExample([21], [31, 2], False)])
    batch.ref_logprobs = torch.tensor([[-3.0], [-1.0]])
    logprobs = torch.tensor([[-2.0], [-4.0]])  # r = ℓ − ℓ_ref = +1 (desirable), −3 (undesirable)
    batch.kl_ref = stage.kl_ref(logprobs, batch)  # z_0 = max(0, mean r) = 0, as the trainer sets it
    loss, _, _ = stage.loss(logprobs, batch, batch_scale(batch, cfg.data.max_response_len))
    beta = 0.1
    # (λ_D·σ(−β(r_d − z_0)) + λ_U·σ(−β(z_0 − r_u))) / 2
    expected = (2.0 * sigmoid(-beta * 1.0) + 0.5 * sigmoid(-beta * 3.0)) / 2
    assert batch.kl_ref == 0.0
    assert float(loss) == pytest.approx(expected, abs=1e-6)
