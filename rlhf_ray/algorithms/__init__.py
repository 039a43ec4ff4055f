"""Pure tensor math of RLHF (spec: ALGORITHMS.md); no Ray, DeepSpeed or I/O.

- `logprobs`:   per-token log-probabilities and entropy from logits (§1)
- `kl`:         k1/k2/k3 KL estimators and fixed/adaptive KL coefficients (§2)
- `advantages`: GAE, group estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++), whitening (§4)
- `losses`:     token-loss aggregation, PPO policy/value losses, SFT, KL and entropy terms (§5, §8)
- `preference`: reward-model losses and offline preference losses, DPO family (§6, §7)

Import the submodule you need; this package imports nothing itself.
"""
