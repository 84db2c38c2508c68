"""How a trained model is spread over the processes of a run, in one place: ``train.distributed`` ddp (every
process holds the whole model, DDP averages the gradients) or fsdp (FSDP2's ``fully_shard``: parameters,
gradients and optimizer states sharded over the processes, one shard group per decoder layer).

A sharded model takes part in a collective on every forward (each layer gathers its parameters), so every
process must run the same number of forwards. Training and scoring do (equal shares); generation does not
(a process stops when its own rows end), so it runs inside ``full_parameters``, which gathers the
parameters once and keeps them until the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from alignloop.config import TrainConfig
from alignloop.errors import UserError
from alignloop.models.lean_layers import use_lean_layers

# accelerate's resolved precision -> the dtype FSDP2 computes in (gradients are reduced in float32)
PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded_run(cfg: TrainConfig, world: int) -> bool:
    return cfg.distributed == "fsdp" and world > 1


def decoder_layer_classes(model: nn.Module) -> set[str]:
    """The class names transformers marks as the unit not to split (``_no_split_modules``: the decoder
    layers), collected from every transformers model inside ``model`` (a PEFT wrapper, a value model's body)."""
    return {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``train.gradient_checkpointing``: every decoder layer of every transformers model in ``model`` (itself,
    under a PEFT wrapper, or a value model's body) keeps only its input for the backward, which recomputes the
    rest; non-reentrant checkpointing, so frozen embeddings (LoRA) need nothing extra."""
    if hasattr(model, "gradient_checkpointing_enable"):  # a transformers model or a PEFT wrapper around one
        models = [model]
    else:  # our own module around transformers bodies (PPO's value model)
        models = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    for m in models:
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.23; the old name warns there
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_for_training(acc: Accelerator, model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The module the training loop calls, its Llama-formula norms and MLPs keeping fewer activations
    (models.lean_layers) and with activation checkpointing where ``cfg`` asks for it. ddp, or
    one process: the accelerator's preparation (device, DDP on several processes). fsdp on several processes:
    ``fully_shard`` in place on every decoder layer, then on the whole model, with the run's mixed precision
    and optional CPU offload; the model itself is returned. Build the optimizer after this call: sharding
    replaces the parameters."""
    use_lean_layers(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if not is_sharded_run(cfg, acc.num_processes):
        return acc.prepare(model)
    if getattr(model, "peft_config", None):
        # an adapter's reference forward (adapter disabled) and its merge at save are not built for shards
        raise UserError("train.distributed=fsdp trains whole models; train a LoRA/QLoRA adapter with "
                        "train.distributed=ddp (its trainable weights are small)")
    options: dict = {}
    if acc.mixed_precision in PARAM_DTYPES:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[acc.mixed_precision],
                                                    reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    layers = decoder_layer_classes(model)
    for module in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(module, **options)
    # The root group (embeddings, final norm, head) stays gathered between forward and backward, as FSDP2
    # sets it itself at the first forward; said here so that full_parameters can restore it.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP group of ``model`` back on its shards, so that its registered parameters are the
    sharded ones the optimizer holds: the root group keeps its gathered parameters after a forward that
    no backward follows (an evaluation)."""
    for m in fsdp_modules(model):
        m.reshard()


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block every FSDP group of ``model`` holds its full parameters and forwards run without
    collectives, so processes may run different numbers of them (generation). No-op on a plain model."""
    groups = fsdp_modules(model)
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for i, m in enumerate(groups):
            m.reshard()
            m.set_reshard_after_forward(i > 0, recurse=False)  # the root (first) keeps its parameters gathered


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded model, gathered on the CPU of process 0 (a collective: every process
    calls it; the others get an empty dict). None for a plain model, whose own state_dict() is whole."""
    if not is_sharded(model):
        return None
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights appear under each of their names here; the model's own save writes the first one only.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in gathered.items() if k in names}


# Bytes per parameter of what training keeps between steps: float32 weights, float32 gradients, and AdamW's
# two float32 moments. Mixed precision changes none of it (FSDP2 and autocast compute in bf16 from
# float32 weights); activations and the one layer FSDP gathers at a time come on top.
WEIGHT_BYTES, GRADIENT_BYTES, ADAMW_BYTES = 4, 4, 8


def training_state_bytes(n_parameters: int, world: int, sharded: bool, cpu_offload: bool = False) -> dict[str, int]:
    """Bytes of weights, gradients and AdamW states one of ``world`` processes holds, on its device and in CPU
    memory: ddp holds everything on every device; fsdp a 1/world shard of each (rounded up per process);
    fsdp with CPU offload keeps those shards in CPU memory instead."""
    share = -(-n_parameters // world) if sharded else n_parameters
    held = share * (WEIGHT_BYTES + GRADIENT_BYTES + ADAMW_BYTES)
    on_cpu = sharded and cpu_offload
    return {"device": 0 if on_cpu else held, "cpu": held if on_cpu else 0}


def close_process_group() -> None:
    """End a torchrun process's part in the run: wait for every process, then destroy the process group.
    A process that exits with its gloo group alive while another still works can abort in the group's
    teardown (std::terminate, SIGABRT), which torchrun reports as the whole run failing."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the elements every process holds (an all-reduce of their sum and count,
    in float64); ``values.mean()`` in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values.mean()
    total = torch.stack([values.double().sum(), torch.tensor(values.numel(), dtype=torch.float64,
                                                              device=values.device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).to(values.dtype)


def local_numel(t: torch.Tensor) -> int:
    """Elements this process holds of ``t`` (its shard of a sharded tensor)."""
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def local_parameter_count(model: nn.Module) -> int:
    reshard(model)
    return sum(local_numel(p) for p in model.parameters())
