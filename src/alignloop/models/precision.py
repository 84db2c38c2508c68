"""Whether bf16 pays on this machine for this model: the one test behind every "auto" precision on CPU.

On a CPU with native bf16 instructions (AVX512-BF16, AMX) a bf16 matmul runs several times faster than
fp32, but the smallest models' steps are dominated by Python and kernel launches rather than matmuls, so
bf16 buys nothing there and only changes the numbers. "auto" therefore means bf16 on such CPUs from
``BF16_CPU_MIN_PARAMS`` matmul parameters on, fp32 below, for sampling and for training alike
(measurements: bench/README.md).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

# Models from this many matmul parameters (matmul_parameter_count) on get bf16 under "auto" on a CPU with
# native bf16: between the largest size where bf16 sampled slower and the smallest where it sampled faster
# (bench/README.md). The peer benchmark's Llamas, MiniLM and SmolLM2 get bf16; the test suite's models and the
# tiny demo's policy stay fp32.
BF16_CPU_MIN_PARAMS = 1_500_000


# torch runs CPU bf16 matmuls through oneDNN, which JIT-compiles a kernel per matmul shape and keeps it in two
# caches (oneDNN's primitive cache and ideep's), 1,024 entries each by default. Training on variable-length
# batches meets new shapes at every step, so an SFT epoch on the 25m peer model (64 steps) grew bf16 peak RSS
# by ~17 MB a step, to 2,864 MB against fp32's flat 1,789 (fp32 matmuls go to MKL, which caches nothing). A
# step needs about 15 kernels (forward and both backward matmuls of each linear shape, and the head's), so 32
# entries keep every kernel a step reuses across its layers while old batch shapes are dropped.
ONEDNN_KERNEL_CACHE_ENTRIES = 32


def bound_onednn_kernel_caches() -> None:
    """Cap oneDNN's per-shape kernel caches at ``ONEDNN_KERNEL_CACHE_ENTRIES``. Both caches read their capacity
    from the environment once, at the first oneDNN matmul of the process, so this must run before the first
    bf16 matmul; a capacity already set in the environment is kept."""
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(ONEDNN_KERNEL_CACHE_ENTRIES))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles. torch has no public query for this; torch.cpu's capability checks are the
    ones its own CPU kernels dispatch on."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def matmul_parameter_count(model: nn.Module) -> int:
    """The parameters that take part in matmuls: all but an input embedding table, which is a lookup
    (MiniLM's is half of its 22.7 M); a table tied to the output layer is counted, as that layer is a matmul."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        return total
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and getattr(output, "weight", None) is embeddings.weight
    return total if tied else total - embeddings.weight.numel()


def bf16_pays_on_cpu_for(matmul_parameters: int) -> bool:
    """True where "auto" precision on CPU means bf16 for a model of that many matmul parameters."""
    return cpu_has_native_bf16() and matmul_parameters >= BF16_CPU_MIN_PARAMS


def bf16_pays_on_cpu(model: nn.Module) -> bool:
    """True where "auto" precision on CPU means bf16 for ``model``."""
    return bf16_pays_on_cpu_for(matmul_parameter_count(model))
