"""The trained model under DeepSpeed: process-group setup, the DeepSpeed config, optimizer and schedule,
and `DeepSpeedModel`, which runs forward / backward / step and exports weights.

The only module of rlhf_ray that imports `deepspeed`, and only inside functions, so importing
this module stays cheap (torch only). The same code runs on CPU (gloo, fp32, tests) and on GPU
(NCCL, bf16, ZeRO-3 and offload).

Facts it relies on, measured on this stack (deepspeed 0.19.8, torch 2.13 CPU; /work/shared/STACK-NOTES.md):
- `DS_ACCELERATOR=cpu` must be set before deepspeed is first imported; ZeRO 0-3 then train over
  gloo with no oneCCL or Intel extension.
- `deepspeed.init_distributed()` on the CPU accelerator builds a C++ shared-memory op
  (27-31 s cold, fails without a compiler) used only for an inference all-reduce. Replacing
  `build_shm_op` in the module `deepspeed.comm.torch` with a no-op (reached through `sys.modules`:
  `import deepspeed.comm.torch as x` resolves to the real `torch`) makes init take < 0.2 s.
  `LOCAL_SIZE` must stay unset.
- A torch optimizer is passed in: a config "optimizer" section defaults to FusedAdam (49.6 s
  compile) and DeepSpeedCPUAdam compiles too (48.7 s).
- Without RANK/WORLD_SIZE in the environment DeepSpeed tries MPI discovery (mpi4py): we set the
  variables and pass `auto_mpi_discovery=False`.
- fp32 gives identical losses across ZeRO stages 0-3; bf16 with stage 0 drifts
  (FP16_UnfusedOptimizer), so use stage >= 1 with bf16.
- Under ZeRO-3, `deepspeed.zero.GatheredParameters` is a collective: every rank must enter it.

Loss and gradient convention (ALGORITHMS.md §5.3, `rlhf_ray.algorithms.losses.LossScale`):
the loss handed to `DeepSpeedModel.backward` is already normalised over the whole mini-batch (all
micro-batches of all ranks), so micro-batch losses *sum* to the mini-batch loss. DeepSpeed must
therefore not divide by gradient_accumulation_steps again (`scale_wrt_gas=False`). DeepSpeed
*averages* gradients over data-parallel ranks, so each rank multiplies its share by world_size:

    loss_rank_micro = Σ_tokens(token_loss) / num_tokens_global × world_size
    grad = (1 / world_size) Σ_ranks Σ_micro ∇ loss_rank_micro = ∇ (global token mean)

tests/integration/test_deepspeed_model.py checks this numerically (2 ranks × 1 micro-batch = 1 rank ×
2 micro-batches = 1 × 4 = 4 × 1 = plain PyTorch on the whole batch).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from rlhf_ray.config import DeepSpeedConfig, OptimConfig

STEPS_PER_PRINT = 2**62  # DeepSpeed's own progress lines stay silent; we log our metrics


# ---------------------------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------------------------


def setup_deepspeed_env(device: str) -> None:
    """Prepare this process for DeepSpeed on `device` ("cpu" or "cuda"); call before any deepspeed import.

    On CPU: select DeepSpeed's CPU accelerator and disable its shared-memory op build (see the
    module docstring). Raises RuntimeError when deepspeed was already imported with another
    accelerator, since DeepSpeed fixes its accelerator on first use.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    os.environ["DS_ACCELERATOR"] = device
    import deepspeed  # noqa: F401  (lazy: the heavy import happens here, after DS_ACCELERATOR)
    from deepspeed.accelerator import get_accelerator

    found = get_accelerator().device_name()
    if found != device:
        raise RuntimeError(
            f"DeepSpeed already uses accelerator {found!r}, not {device!r}: deepspeed was imported before "
            f"setup_deepspeed_env({device!r}); call it first in the process.")
    if device == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    """Stands in for deepspeed.comm.torch.build_shm_op: no C++ build; DeepSpeed then uses plain gloo."""
    return None


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str,
    timeout_s: float,
    local_rank: int = 0,
) -> None:
    """Join the default torch.distributed group through DeepSpeed; idempotent.

    `backend`: "gloo" on CPU, "nccl" on GPU. `local_rank` picks the CUDA device; under Ray each
    actor sees only its own GPU(s), so 0 is right there. A process holds one default group: a
    second call with the same rank and world size returns at once, a different one raises.
    Every rank must call this before any of them can return (rendezvous).
    """
    if torch.distributed.is_initialized():
        _check_same_group(rank, world_size)
        return
    os.environ.update({
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    })
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=False, verbose=False)


def _check_same_group(rank: int, world_size: int) -> None:
    have = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    if have != (rank, world_size):
        raise RuntimeError(
            f"this process already joined a process group as rank {have[0]} of {have[1]}; it cannot join "
            f"another as rank {rank} of {world_size} (one default group per process: use a new worker).")


def free_port() -> int:
    """A TCP port free on this host right now (rank 0 picks the rendezvous port with it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This host's address as other nodes see it (the interface of the default route), else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks the interface
            return s.getsockname()[0]
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


def set_torch_threads(n: int) -> None:
    """Use `n` intra-op threads (Ray sets OMP_NUM_THREADS=1 for 1-CPU actors; fractional CPUs need this)."""
    torch.set_num_threads(max(1, int(n)))


# ---------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer, schedule
# ---------------------------------------------------------------------------------------------


def effective_zero(ds: DeepSpeedConfig, world_size: int) -> DeepSpeedConfig:
    """ZeRO partitions state across ranks; on one rank, fp32 and without offload, it partitions
    nothing and only adds bookkeeping (a flat fp32 copy of the gradients each step: 26 ms of a
    199 ms update at 1M parameters, 0.6 s of 6.4 s at 50M; docs/performance.md), so stage 0 runs:
    the same math (the DeepSpeed equivalence tests cover every stage)."""
    if world_size == 1 and ds.zero_stage > 0 and ds.precision == "fp32" and not (ds.offload_optimizer or ds.offload_params):
        return ds.model_copy(update={"zero_stage": 0})
    return ds


def ds_config(
    optim: OptimConfig, ds: DeepSpeedConfig, micro_batch_size: int, grad_accum: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config dict. No "optimizer"/"scheduler" sections: torch ones are passed in."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": _zero_section(ds),
        "bf16": {"enabled": ds.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # offload with a torch AdamW: DeepSpeed would otherwise demand the compiled DeepSpeedCPUAdam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }


def _zero_section(ds: DeepSpeedConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return zero


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) get no weight decay.
    The scheduler is built on these groups, so an empty one (which DeepSpeed would drop) is left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(_full_shape(p)) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (LoRA: no 1-D tensor trains)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def _full_shape(p: Tensor) -> torch.Size:
    """Shape of the whole parameter, also when ZeRO-3 has already partitioned it (`ds_shape`)."""
    return getattr(p, "ds_shape", p.shape)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_optimizer_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `optim.warmup_steps`, then constant / cosine / linear decay to 0 at the end."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, optim.scheduler, total_optimizer_steps))


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the peak lr for the update with index `step` (0-based).

    Warm-up: (step + 1) / (warmup_steps + 1), so the first update already moves the weights and
    update `warmup_steps` is the first at the peak. After warm-up, progress p ∈ [0, 1] runs over
    the remaining steps: constant 1, cosine ½(1 + cos πp), linear 1 - p.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, cosine, linear")


# ---------------------------------------------------------------------------------------------
# The trained model
# ---------------------------------------------------------------------------------------------


class DeepSpeedModel:
    """A model trained by DeepSpeed: forward, backward per micro-batch, one step per mini-batch.

    Usage per mini-batch, on every data-parallel rank (`grad_accum` micro-batches each):

        for micro in micro_batches:                 # exactly grad_accum of them
            logits = model.forward(micro.input_ids, micro.attention_mask, micro.position_ids)
            loss = <sum of token losses> / <tokens in the GLOBAL mini-batch> * world_size
            model.backward(loss)
        metrics = model.step()                     # {"grad_norm": ..., "lr": ...}

    Under ZeRO-3 every call that touches weights (forward, save_hf, gathered_named_parameters)
    is a collective: all ranks must make it, in the same order.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        ds: DeepSpeedConfig,
        micro_batch_size: int,
        grad_accum: int,
        total_optimizer_steps: int,
        lora: Any = None,
        export_merged: bool = True,
        packing: bool = False,
    ) -> None:
        """Wrap `model` (an HF PreTrainedModel) after `init_distributed`; world size is the default group's.
        `lora`: the PEFT LoraConfig of a model with LoRA layers injected (`rlhf_ray.lora`): weights then
        leave merged, checkpoints hold the trained parameters only, exports add the adapter."""
        import deepspeed

        self.lora, self.export_merged, self.packing = lora, export_merged, packing
        world_size = torch.distributed.get_world_size()
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, total_optimizer_steps)
        self.config = ds_config(optim, ds, micro_batch_size, grad_accum, world_size)
        self.zero_stage = ds.zero_stage
        self._ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        self._micro_batches = 0
        self._counted = True  # backward() counts micro-batches against grad_accum (else: `last` marks the end)

    # --- training --------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) of the module (HF `.logits`); inputs (B, L) are moved to the model's device.
        With `packing` the real tokens run as one row (`rlhf_ray.packing`; positions restart per sequence,
        the same as `position_ids` of the padded layout), and the logits come back padded (0 on padding)."""
        device = self._ds.device
        if self.packing:
            from rlhf_ray.packing import packed_forward

            return packed_forward(self._ds, input_ids.to(device), attention_mask.to(device), config=self.module.config)
        out = self._ds(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=None if position_ids is None else position_ids.to(device),
            use_cache=False,
        )
        return out.logits

    def backward(self, loss: Tensor, last: bool | None = None) -> None:
        """Accumulate gradients of one micro-batch's loss, already normalised over the mini-batch.

        `scale_wrt_gas=False`: DeepSpeed must not divide by gradient_accumulation_steps again. On
        non-final micro-batches DeepSpeed's `step()` only advances its micro-step counter, which
        tells ZeRO when the accumulation boundary (gradient reduction) comes. `last` (token-budget
        micro-batches, a number per mini-batch that varies): whether this is the mini-batch's final
        micro-batch, set as DeepSpeed's accumulation boundary instead of the fixed count.
        """
        if last is not None:
            self._ds.set_gradient_accumulation_boundary(last)
            self._ds.backward(loss, scale_wrt_gas=False)
            self._micro_batches += 1
            self._counted = False
            return
        self._counted = True
        accum = self._ds.gradient_accumulation_steps()
        if self._micro_batches == accum:
            raise RuntimeError(f"backward() after {accum} micro-batches without step(); call step() first")
        self._ds.backward(loss, scale_wrt_gas=False)
        self._micro_batches += 1
        if self._micro_batches < accum:
            self._ds.step()

    def step(self) -> dict[str, float]:
        """Clip, update and advance the schedule after the last micro-batch of a mini-batch.

        Returns the lr used by this update and, where known, the gradient norm before clipping.
        """
        accum = self._ds.gradient_accumulation_steps()
        if self._counted and self._micro_batches != accum:
            raise RuntimeError(
                f"step() after {self._micro_batches} micro-batches, but this model was built with "
                f"grad_accum={accum}: run exactly that many backward() calls per mini-batch")
        lr = self.lr
        local_norm = _grad_norm(self._ds.module) if self.zero_stage == 0 else None
        skipped = local_norm is not None and not math.isfinite(local_norm)
        if skipped:  # ZeRO-0 has no overflow check: drop the gradients so the optimizer leaves every weight alone
            for p in self._ds.module.parameters():
                p.grad = None
        with _no_clipping(self._ds) if skipped else contextlib.nullcontext():  # no gradient left to clip
            self._ds.step()
        self._micro_batches = 0
        # ZeRO 1-3 skip the update themselves when the (all-reduced) gradient norm is not finite
        skipped = skipped or bool(getattr(self._ds.optimizer, "overflow", False))
        grad_norm = self._ds.get_global_grad_norm()
        grad_norm = local_norm if grad_norm is None else float(grad_norm)
        out = {"lr": lr, "skipped": float(skipped)}
        return out if grad_norm is None else out | {"grad_norm": grad_norm}

    @property
    def lr(self) -> float:
        """Learning rate the next update will use."""
        return float(self._ds.get_lr()[0])

    @property
    def device(self) -> torch.device:
        return self._ds.device

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped HF model (under ZeRO-3 its parameters are partitioned outside a gather)."""
        return self._ds.module

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    # --- weights out -----------------------------------------------------------------------------

    def gathered_named_parameters(self, bucket_bytes: int, device: str | torch.device = "cpu"
                                  ) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield buckets of (name, full detached copy on `device`) of at most `bucket_bytes` each
        (a GPU device for NCCL and CUDA IPC: no round trip through host memory).

        A tensor larger than `bucket_bytes` travels alone. Under ZeRO-3 each bucket is gathered
        with `GatheredParameters` (collective: every rank must iterate this to the end, in the
        same order; ranks other than 0 may discard what they get). Stages 0-2 read the local
        full parameters. Names are those of `module.named_parameters()` (tied weights once).
        """
        if self.lora is None:
            for bucket in _buckets(list(self.module.named_parameters()), bucket_bytes):
                yield self._copy_out(bucket, device)
            return
        from rlhf_ray.lora import layer_key, merged_state

        scaling = self.lora.lora_alpha / self.lora.r
        for bucket in _buckets(list(self.module.named_parameters()), bucket_bytes, group=layer_key):
            yield merged_state(self._copy_out(bucket, device), scaling, self.lora.fan_in_fan_out)

    def trained_named_parameters(self) -> list[tuple[str, Tensor]]:
        """Full CPU copies of the parameters that train (a LoRA model's adapters), gathered under ZeRO-3."""
        trained = [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]
        return self._copy_out(trained, "cpu")

    def _copy_out(self, bucket: list[tuple[str, torch.nn.Parameter]], device) -> list[tuple[str, Tensor]]:
        if self.zero_stage != 3:
            return [(name, p.detach().to(device, copy=True)) for name, p in bucket]
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            return [(name, p.detach().to(device, copy=True)) for name, p in bucket]

    def save_hf(self, path: str | os.PathLike, tokenizer: Any = None, bucket_bytes: int = 2**28) -> None:
        """Rank 0 writes the full weights in Hugging Face format (safetensors) to `path`; with LoRA the
        merged model there and the adapter in `path`/adapter, or the adapter alone in `path` when
        `export_merged` is off.

        Every rank must call this (under ZeRO-3 the weights are gathered bucket by bucket, a
        collective); only rank 0 keeps a copy and writes. Persistent buffers are included.
        """
        is_main = torch.distributed.get_rank() == 0
        if self.lora is not None:
            self._save_adapter(os.path.join(str(path), "adapter") if self.export_merged else str(path), is_main)
        if self.lora is None or self.export_merged:
            self._save_full(path, is_main, bucket_bytes)
        if is_main and tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        torch.distributed.barrier()

    def _save_full(self, path: str | os.PathLike, is_main: bool, bucket_bytes: int) -> None:
        state: dict[str, Tensor] = {}
        if is_main or self.zero_stage == 3:  # stages 0-2: rank 0 holds everything already
            for bucket in self.gathered_named_parameters(bucket_bytes):
                if is_main:
                    state.update(bucket)
        if is_main:
            state.update({name.replace(".base_layer.", "."): b for name, b in _persistent_buffers(self.module).items()})
            self.module.save_pretrained(str(path), state_dict=state)

    def _save_adapter(self, path: str, is_main: bool) -> None:
        from rlhf_ray.lora import adapter_state, save_adapter

        trained = self.trained_named_parameters() if is_main or self.zero_stage == 3 else []
        if is_main:
            save_adapter(path, self.lora, adapter_state(trained))

    # --- DeepSpeed checkpoints (model + optimizer + scheduler; all ranks call) ---------------------

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """With LoRA the frozen base is left out: it is the model path's, reloaded at every start. A
        write the storage refuses raises a StorageError naming `directory` (DeepSpeed's own errors
        may carry no errno: torch's zip writer reports a full disk as "unexpected pos")."""
        from rlhf_ray.checkpoint import storage_errors

        with storage_errors(directory):
            self._ds.save_checkpoint(str(directory), tag=tag, exclude_frozen_parameters=self.lora is not None)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        path, _ = self._ds.load_checkpoint(str(directory), tag=tag, load_module_strict=self.lora is None)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} under {directory}")


@contextlib.contextmanager
def _no_clipping(engine):
    """Gradient clipping off for one `engine.step()`: after a skip no gradient is left, and DeepSpeed's
    fp32 clip (ZeRO-0) reads the device of the first one (IndexError on none)."""
    clip, engine._config.gradient_clipping = engine._config.gradient_clipping, 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = clip


def _grad_norm(module: torch.nn.Module) -> float | None:
    """L2 norm of the local gradients (ZeRO-0: identical on every rank after the all-reduce)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _buckets(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int, group=lambda name: name) -> Iterator[list]:
    """Consecutive groups of parameters whose full sizes add up to at most `bucket_bytes`; parameters
    with the same `group(name)` (consecutive: a LoRA layer's base, A and B) always share a bucket."""
    bucket: list = []
    size = 0
    for _, members in itertools.groupby(named, key=lambda item: group(item[0])):
        members = list(members)
        nbytes = sum(_full_numel(p) * p.element_size() for _, p in members)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += members
        size += nbytes
    if bucket:
        yield bucket



def _full_numel(p: Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


def _persistent_buffers(module: torch.nn.Module) -> dict[str, Tensor]:
    """Buffers that belong in a state dict (ZeRO never partitions buffers)."""
    keys = set(module.state_dict().keys())
    return {name: b.detach().to("cpu", copy=True) for name, b in module.named_buffers() if name in keys}

