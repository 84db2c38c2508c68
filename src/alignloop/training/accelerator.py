"""One accelerate setup for every loop: device, mixed precision and the experiment trackers."""

from __future__ import annotations

import importlib.util

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from alignloop.config import TrainConfig
from alignloop.models.precision import bf16_pays_on_cpu_for, bound_onednn_kernel_caches
from alignloop.runs import RunDir

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_accelerator(cfg: TrainConfig, run: RunDir | None = None, trackers: bool = True,
                     matmul_parameters: int | None = None) -> Accelerator:
    """``mixed_precision=auto`` is bf16 on GPUs that support it, bf16 on a CPU where
    ``models.precision.bf16_pays_on_cpu_for(matmul_parameters)`` (the model's size, from
    ``models.load.planned_matmul_parameters``; None: fp32) and fp32 elsewhere; trackers named in
    ``report_to`` that are not installed are skipped."""
    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        if cuda:
            mp = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            mp = "bf16" if matmul_parameters is not None and bf16_pays_on_cpu_for(matmul_parameters) else "no"
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision; a pipeline runs its stages in one process (SFT and PPO in bf16, the reward model in fp32),
    # so a stage that asks for another precision starts from a fresh state (the process group is kept).
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        AcceleratorState._reset_state(reset_partial_state=False)
    if mp == "bf16" and not cuda:
        bound_onednn_kernel_caches()
    log_with = []
    if trackers and run is not None:
        log_with = [t for t in cfg.report_to if importlib.util.find_spec(TRACKER_MODULES[t])]
    return Accelerator(cpu=not cuda, mixed_precision=mp, log_with=log_with or None,
                       project_dir=str(run.root / "logs") if run else None)
