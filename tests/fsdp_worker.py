"""Run by test_fsdp under torchrun: one training step of a tiny causal LM with train.distributed=fsdp (and
again with CPU offload), then what this process holds and what the gathered model generates. Writes
rank-<N>.json into the output folder given as the second argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from alignloop.config import ModelConfig, TrainConfig
from alignloop.models.load import load_pretrained
from alignloop.training.accelerator import make_accelerator
from alignloop.training.distributed import (
    close_process_group,
    full_parameters,
    full_state_dict,
    local_numel,
    local_parameter_count,
    wrap_for_training,
)
from alignloop.training.optim import build_optimizer, param_groups


def train_one_step(model_dir: str, cfg: TrainConfig, acc) -> tuple[torch.nn.Module, dict, object]:
    model, tok = load_pretrained(ModelConfig(name_or_path=model_dir, dropout=0.0), device=acc.device,
                                 for_training=True)
    model = wrap_for_training(acc, model, cfg)
    optimizer = build_optimizer(param_groups(model.named_parameters(), 0.0), cfg)
    ids = torch.tensor([tok("red cat runs big tree")["input_ids"]] * 2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    held = {"parameters": local_parameter_count(model),
            "state_bytes": sum(local_numel(p) * p.element_size() for p in model.parameters())
            + sum(local_numel(p.grad) * p.grad.element_size() for p in model.parameters())
            + sum(local_numel(v) * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                  if k != "step"),
            "loss": loss.item()}
    return model, held, tok


def main(model_dir: str, out: Path) -> None:
    cfg = TrainConfig(distributed="fsdp", lr=1e-2, report_to=[])
    acc = make_accelerator(cfg, trackers=False)
    rank = acc.process_index
    model, held, tok = train_one_step(model_dir, cfg, acc)
    offloaded, held_offloaded, _ = train_one_step(model_dir, cfg.model_copy(update={"fsdp_cpu_offload": True}), acc)
    # Each process generates its own number of tokens: outside full_parameters the processes' forwards
    # would no longer pair up (each forward gathers the layers' parameters from every process).
    prompt = torch.tensor([tok("big tree")["input_ids"]])
    model.eval()
    with torch.no_grad(), full_parameters(model):
        generated = model.generate(prompt, max_new_tokens=2 + 5 * rank, min_new_tokens=2 + 5 * rank,
                                   do_sample=False).tolist()
    weights = full_state_dict(model)
    weights_offloaded = full_state_dict(offloaded)
    result = {"total": sum(p.numel() for p in model.parameters()), "held": held, "held_offloaded": held_offloaded,
              "generated": generated}
    if rank == 0:
        plain = AutoModelForCausalLM.from_pretrained(model_dir)
        plain.load_state_dict(weights, strict=False)
        result["plain_generated"] = plain.generate(prompt, max_new_tokens=7, min_new_tokens=7,
                                                   do_sample=False).tolist()
        result["weights_missing"] = sorted(set(plain.state_dict()) - set(weights) - {"lm_head.weight"})
        result["offload_difference"] = max((weights[k] - weights_offloaded[k]).abs().max().item() for k in weights)
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
