"""The "auto" precision rule on CPU: bf16 only for models large enough that matmuls dominate."""

import os
import subprocess
import sys

import pytest
from torch import nn

from alignloop.models import precision


def test_small_models_stay_fp32_and_large_ones_get_bf16_where_the_cpu_has_it(monkeypatch):
    small = nn.Linear(100, 100)  # 10,100 parameters
    assert precision.parameter_count(small) == 10_100
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert not precision.bf16_pays_on_cpu(small)
    monkeypatch.setattr(precision, "BF16_CPU_MIN_PARAMS", 10_000)
    assert precision.bf16_pays_on_cpu(small)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.bf16_pays_on_cpu(small)


def test_onednn_cache_bound_is_set_once_and_an_explicit_capacity_wins(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    precision.bound_onednn_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(precision.ONEDNN_KERNEL_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


# A fresh process (the caches read their capacity at the process's first oneDNN matmul): a bf16 accelerator,
# then bf16 matmuls of 60 row counts never seen before. Uncapped, every shape's kernels stay cached (243 MB here).
GROWTH_SCRIPT = """
import torch
from alignloop.config import TrainConfig
from alignloop.training.accelerator import make_accelerator

torch.set_num_threads(1)
make_accelerator(TrainConfig(mixed_precision="bf16"), trackers=False)
layers = torch.nn.Sequential(torch.nn.Linear(256, 688, bias=False), torch.nn.Linear(688, 256, bias=False))


def rss_mb():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


def step(rows):
    x = torch.randn(rows, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layers(x)
    y.float().sum().backward()


for rows in range(64, 128, 8):
    step(rows)
start = rss_mb()
for rows in range(200, 680, 8):
    step(rows)
print(rss_mb() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not precision.cpu_has_native_bf16(),
                    reason="oneDNN's bf16 kernels and /proc: Linux on a CPU with native bf16")
def test_bf16_training_on_cpu_does_not_keep_a_kernel_per_batch_shape():
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 60  # MB; 17 with the bound
