"""LoRA through PEFT (rlhf_ray/lora.py) on tiny random Llamas: what trains, the merged weights under the
base model's names, the base model with adapters switched off, and the saved adapter loaded by PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from rlhf_ray.config import LoraConfig
from rlhf_ray.lora import adapter_state, adapters_disabled, apply_lora, layer_key, merged_state, save_adapter
from rlhf_ray.toy import build_char_tokenizer, build_policy
from rlhf_ray.toy.models import build_critic


LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture
def tok():
    return build_char_tokenizer()


def _trained_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter (B starts at 0) and module to save non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _inputs(tok):
    ids = torch.tensor([tok.encode("say: abc\nxyz", add_special_tokens=False)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_only_the_adapters_train_and_the_untrained_model_is_the_base(tok):
    base = build_policy(tok, seed=1, num_heads=2)
    reference = copy.deepcopy(base)
    model, config = apply_lora(base, LORA, sequence_classifier=False)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert not any("lm_head" in n or "embed" in n for n in trained)  # all-linear: not the output head
    assert (config.r, config.lora_alpha) == (4, 8.0)
    with torch.no_grad():  # B = 0 at the start: the same function as the base
        assert torch.equal(model(**_inputs(tok)).logits, reference(**_inputs(tok)).logits)


def test_merged_weights_are_peft_s_merge_under_the_base_names(tok):
    model, config = apply_lora(build_policy(tok, seed=2, num_heads=2), LORA, sequence_classifier=False)
    _trained_adapters(model)
    merged = dict(merged_state(list(model.named_parameters()), config.lora_alpha / config.r))
    expected = build_policy(tok, seed=2, num_heads=2).state_dict()
    assert list(merged) == [n for n, _ in build_policy(tok, seed=2, num_heads=2).named_parameters()]
    with torch.no_grad():  # a plain model holding the merged weights computes what the adapted one does
        fresh = build_policy(tok, seed=2, num_heads=2)
        fresh.load_state_dict(merged | {k: v for k, v in expected.items() if k not in merged})
        assert torch.allclose(fresh(**_inputs(tok)).logits, model(**_inputs(tok)).logits, atol=1e-5)
    changed = [n for n in merged if not torch.equal(merged[n], expected[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)


def test_merge_matches_peft_merge_and_unload(tok):
    wrapped = peft.get_peft_model(build_policy(tok, seed=3, num_heads=2),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _trained_adapters(wrapped.get_base_model())
    mine = dict(merged_state(list(wrapped.get_base_model().named_parameters()), 2.0))
    theirs = wrapped.merge_and_unload().state_dict()
    assert set(mine) <= set(theirs)
    for name, value in mine.items():
        assert torch.allclose(value, theirs[name], atol=1e-6), name


def test_adapters_disabled_is_the_base_model_and_restores_them(tok):
    base = build_policy(tok, seed=4, num_heads=2)
    reference = copy.deepcopy(base)
    model, _ = apply_lora(base, LORA, sequence_classifier=False)
    _trained_adapters(model)
    with torch.no_grad():
        adapted = model(**_inputs(tok)).logits
        with adapters_disabled(model):
            assert torch.equal(model(**_inputs(tok)).logits, reference(**_inputs(tok)).logits)
        assert torch.equal(model(**_inputs(tok)).logits, adapted) and not torch.equal(adapted, reference(**_inputs(tok)).logits)


def test_a_critic_trains_its_score_head_and_merges_it_under_score(tok):
    model, config = apply_lora(build_critic(tok, seed=5, num_heads=2), LORA, sequence_classifier=True)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("score.modules_to_save.") for n in trained)
    _trained_adapters(model)
    merged = dict(merged_state(list(model.named_parameters()), config.lora_alpha / config.r))
    assert "score.weight" in merged and not any("modules_to_save" in n or "original_module" in n for n in merged)
    assert torch.equal(merged["score.weight"], dict(model.named_parameters())["score.modules_to_save.default.weight"])


def test_a_saved_adapter_loads_with_peft_onto_the_base(tok, tmp_path):
    model, config = apply_lora(build_policy(tok, seed=6, num_heads=2), LORA, sequence_classifier=False)
    _trained_adapters(model)
    save_adapter(str(tmp_path), config, adapter_state([(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]))
    loaded = peft.PeftModel.from_pretrained(build_policy(tok, seed=6, num_heads=2), str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(loaded(**_inputs(tok)).logits, model(**_inputs(tok)).logits, atol=1e-6)


def test_a_layer_s_parameters_share_a_key():
    names = ["model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.lora_A.default.weight",
             "model.layers.0.self_attn.q_proj.lora_B.default.weight", "score.original_module.weight",
             "score.modules_to_save.default.weight", "model.norm.weight"]
    assert [layer_key(n) for n in names] == ["model.layers.0.self_attn.q_proj"] * 3 + ["score"] * 2 + ["model.norm.weight"]


def test_adapter_sync_config_rules_and_default():
    from pathlib import Path

    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.rollout.vllm import lora_slot_rank

    grpo = Path(__file__).resolve().parents[2] / "configs" / "toy_grpo.yaml"
    lora = ["model.lora.rank=8", "rollout.backend=vllm"]
    assert not load_config(grpo, lora).adapter_sync  # auto on CPU engines: merged (vLLM's CPU LoRA is slower)
    assert load_config(grpo, [*lora, "model.lora.sync=adapter"]).adapter_sync
    assert not load_config(grpo, [*lora, "model.lora.sync=adapter", "model.lora.roles=[critic]"]).adapter_sync
    with pytest.raises(ConfigError, match=r"model.lora.sync=adapter needs vLLM engines .*'hf'"):
        load_config(grpo, ["model.lora.rank=8", "model.lora.sync=adapter", "rollout.backend=hf"])
    with pytest.raises(ConfigError, match=r"rollout.weight_sync=object_store \(got 'gloo'\)"):
        load_config(grpo, [*lora, "model.lora.sync=adapter", "rollout.weight_sync=gloo"])
    assert [lora_slot_rank(r) for r in (1, 2, 8, 9, 512)] == [1, 8, 8, 16, 512]
    with pytest.raises(ValueError, match="model.lora.sync=merged"):
        lora_slot_rank(513)
