"""Helpers shared by integration tests."""


def toy_overrides(tmp_path, *extra: str) -> list[str]:
    """A small, fast toy PPO config writing into tmp_path."""
    return [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false", "trainer.eval_every=0",
            "trainer.eval_prompts=16", "data.toy_train_size=128", "data.toy_eval_size=16", *extra]


def policy_weights(trainer) -> dict:
    """The policy's full weights as rank 0 sends them (every rank takes part: gathered under ZeRO-3)."""
    import numpy as np
    import ray

    sent = ray.get(trainer.roles.policy.call(lambda w: w.send_to_object_store.remote(trainer.roles.probe_ids)),
                   timeout=120)
    out = {}
    for bucket in ray.get(sent[0][0], timeout=120):
        out |= {k: np.array(v) for k, v in bucket.items()}
    return out


def policy_probe(trainer):
    """The policy's log-probs of the sync probe sequence (every rank takes part)."""
    import ray

    refs = trainer.roles.policy.call(lambda w: w.probe_logprobs.remote(trainer.roles.probe_ids))
    return ray.get(refs, timeout=120)[0]


def engine_states(trainer) -> list:
    """(version held, probe log-probs) of every rollout engine."""
    import ray

    rollout = trainer.roles.pools["rollout"]
    return ray.get(rollout.call(lambda w: w.weight_state.remote(trainer.roles.probe_ids)), timeout=120)
