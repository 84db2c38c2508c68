"""The "auto" precision rule on CPU: bf16 only for models large enough that matmuls dominate."""

import os
import subprocess
import sys

import pytest
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignloop.config import ModelConfig, TrainConfig
from alignloop.models import precision
from alignloop.models.load import load_pretrained, planned_matmul_parameters
from alignloop.models.tiny import tiny_config
from alignloop.training import accelerator


def test_small_models_stay_fp32_and_large_ones_get_bf16_where_the_cpu_has_it(monkeypatch):
    small = nn.Linear(100, 100)  # 10,100 parameters
    assert precision.matmul_parameter_count(small) == 10_100
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


def test_an_input_embedding_is_a_lookup_unless_the_output_layer_shares_it():
    tied = AutoModelForCausalLM.from_config(tiny_config("llama", 1000, hidden=32, layers=1))
    untied_config = tiny_config("llama", 1000, hidden=32, layers=1)
    untied_config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(untied_config)
    assert not untied.config.tie_word_embeddings and tied.config.tie_word_embeddings
    every = sum(p.numel() for p in untied.parameters())
    assert precision.matmul_parameter_count(untied) == every - 1000 * 32  # the LM head's 32,000 stay
    assert precision.matmul_parameter_count(tied) == sum(p.numel() for p in tied.parameters())


def test_the_planned_size_is_the_loaded_models_without_reading_its_weights(tiny_model_factory):
    folder = tiny_model_factory("qwen2")
    cfg = ModelConfig(name_or_path=str(folder))
    loaded, _ = load_pretrained(cfg)
    assert planned_matmul_parameters(cfg) == precision.matmul_parameter_count(loaded)
    heads, _ = load_pretrained(cfg, auto_cls=AutoModelForSequenceClassification, config_overrides={"num_labels": 3})
    assert planned_matmul_parameters(cfg, AutoModelForSequenceClassification, {"num_labels": 3}) == \
        precision.matmul_parameter_count(heads)


def test_auto_training_precision_on_cpu_follows_the_models_size(monkeypatch):
    monkeypatch.setattr(accelerator.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    auto = TrainConfig(mixed_precision="auto", report_to=[])
    big, small = precision.BF16_CPU_MIN_PARAMS, precision.BF16_CPU_MIN_PARAMS - 1
    assert accelerator.make_accelerator(auto, trackers=False, matmul_parameters=big).mixed_precision == "bf16"
    assert accelerator.make_accelerator(auto, trackers=False, matmul_parameters=small).mixed_precision == "no"
    assert accelerator.make_accelerator(auto, trackers=False).mixed_precision == "no"  # size unknown
    forced = TrainConfig(mixed_precision="no", report_to=[])
    assert accelerator.make_accelerator(forced, trackers=False, matmul_parameters=big).mixed_precision == "no"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert accelerator.make_accelerator(auto, trackers=False, matmul_parameters=big).mixed_precision == "no"
