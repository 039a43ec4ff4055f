"""Helpers shared by integration tests."""


def toy_overrides(tmp_path, *extra: str) -> list[str]:
    """A small, fast toy PPO config writing into tmp_path."""
    return [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false", "trainer.eval_every=0",
            "trainer.eval_prompts=16", "data.toy_train_size=128", "data.toy_eval_size=16", *extra]
