"""Whether bf16 pays on this machine for this model: the one test behind every "auto" precision on CPU.

On a CPU with native bf16 instructions (AVX512-BF16, AMX) a bf16 matmul runs several times faster than
fp32, but a small model's step is dominated by Python and kernel launches rather than matmuls, so bf16
buys nothing there and only changes the numbers. "auto" therefore means bf16 on such CPUs from
``BF16_CPU_MIN_PARAMS`` parameters on, fp32 below (measurements: bench/README.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

# Models from this many parameters on get bf16 under "auto" on a CPU with native bf16.
BF16_CPU_MIN_PARAMS = 20_000_000


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles. torch has no public query for this; torch.cpu's capability checks are the
    ones its own CPU kernels dispatch on."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bf16_pays_on_cpu(model: nn.Module) -> bool:
    """True where "auto" precision on CPU means bf16 for ``model``."""
    return cpu_has_native_bf16() and parameter_count(model) >= BF16_CPU_MIN_PARAMS
