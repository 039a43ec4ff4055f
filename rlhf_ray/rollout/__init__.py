"""Rollout engines: the `RolloutEngine` interface (`base`), HF generate (`hf`, CPU and GPU)."""

from __future__ import annotations

import importlib.util


class BackendUnavailable(RuntimeError):
    """The configured rollout backend cannot run here."""


def resolve_backend(backend: str) -> str:
    """'auto' → 'vllm' where vLLM imports and CUDA is present, else 'hf'; 'vllm' elsewhere is an error."""
    import torch

    vllm_ok = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "auto":
        return "vllm" if vllm_ok and _vllm_engine_available() else "hf"
    if backend == "vllm" and not vllm_ok:
        missing = "the vllm package (pip install 'rlhf_ray[vllm]')" if importlib.util.find_spec("vllm") is None else "a CUDA GPU"
        raise BackendUnavailable(f"rollout.backend=vllm needs {missing} on the rollout workers; "
                                 f"use rollout.backend=hf (or auto) on CPU.")
    if backend == "vllm" and not _vllm_engine_available():
        raise BackendUnavailable("rollout.backend=vllm: this build has no vLLM engine yet (rlhf_ray/rollout/vllm.py); "
                                 "use rollout.backend=hf.")
    return backend


def _vllm_engine_available() -> bool:
    return importlib.util.find_spec("rlhf_ray.rollout.vllm") is not None
