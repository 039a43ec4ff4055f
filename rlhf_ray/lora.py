"""LoRA (Hu et al. 2021, through PEFT) for the trained roles: adapters in, merged weights out.

Decisions:
- DeepSpeed trains the Hugging Face model with PEFT's LoRA layers injected (`get_peft_model(...)
  .get_base_model()`), not the `PeftModel` wrapper: every forward path of the project (logits, the
  critic's per-token `score`) stays the HF model's own, and parameter names stay HF names with
  `.base_layer`, `.lora_A.default`, `.lora_B.default` inserted. The PEFT config is kept to write
  the adapter in PEFT's format.
- Only the adapters require grad (and a sequence classifier's `score` head, a new head that PEFT
  trains whole as a "module to save"): the optimizer, gradient reduction and checkpoints hold
  only them; the frozen base comes from the model path at every start.
- Weights leave as the merged model, W + (α/r)·B·A under the base model's names (`merged_state`),
  so rollout engines, exports and the next pipeline stage see an ordinary model.
- When the reference is the initial policy, it is the trained model with its adapters switched
  off (`adapters_disabled`): no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rlhf_ray.config import LoraConfig

ADAPTER = "default"  # PEFT's adapter name
_PARTS = re.compile(r"\.(base_layer|lora_A\.default|lora_B\.default|original_module|modules_to_save\.default)\.")


def apply_lora(model: torch.nn.Module, lora: LoraConfig, sequence_classifier: bool) -> tuple[torch.nn.Module, Any]:
    """`model` with LoRA layers injected (in place) and everything else frozen; → (model, PEFT LoraConfig)."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=peft.TaskType.SEQ_CLS if sequence_classifier else peft.TaskType.CAUSAL_LM)
    wrapped = peft.get_peft_model(model, config)
    return wrapped.get_base_model(), wrapped.peft_config[ADAPTER]


def is_lora(module: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in module.named_parameters())


def layer_key(name: str) -> str:
    """The module a parameter belongs to for merging: base, A and B of one layer share a key."""
    match = _PARTS.search(name)
    return name[: match.start()] if match else name


def merged_state(named: list[tuple[str, Tensor]], scaling: float, fan_in_fan_out: bool = False) -> list[tuple[str, Tensor]]:
    """Full parameters of a LoRA model (whole layers: base, A and B together) → the merged model's
    parameters under the base model's names: W + scaling·B·A for each adapted layer, the trained copy
    of each module to save, every other parameter as it is."""
    by_name = dict(named)
    out = []
    for name, tensor in named:
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            key, leaf = name.split(".base_layer.")
            a, b = by_name.get(f"{key}.lora_A.{ADAPTER}.{leaf}"), by_name.get(f"{key}.lora_B.{ADAPTER}.{leaf}")
            if a is not None and b is not None:
                delta = (b.float() @ a.float()) * scaling
                tensor = (tensor.float() + (delta.T if fan_in_fan_out else delta)).to(tensor.dtype)
            out.append((f"{key}.{leaf}", tensor))
        else:
            out.append((name.replace(f".modules_to_save.{ADAPTER}.", "."), tensor))
    return out


def adapter_state(named: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """The trained parameters in PEFT's saved-adapter naming (what `PeftModel.from_pretrained` loads)."""
    out = {}
    for name, tensor in named:
        if ".lora_A." in name or ".lora_B." in name or f".modules_to_save.{ADAPTER}." in name:
            out["base_model.model." + name.replace(f".{ADAPTER}.", ".")] = tensor
    return out


def save_adapter(path: str, config: Any, state: dict[str, Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors in `path`, as `PeftModel.save_pretrained` writes them."""
    from pathlib import Path

    from safetensors.torch import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(path) / "adapter_model.safetensors"),
              metadata={"format": "pt"})


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The base model: every LoRA layer (and module to save) runs without its adapter inside the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
