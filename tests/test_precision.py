"""The "auto" precision rule on CPU: bf16 only for models large enough that matmuls dominate."""

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
