"""Checkpoints that make resume exact: trainable weights, optimizer, scheduler, RNG states, data position.

Only trainable tensors are stored (frozen ones are reloaded from the base model), so a LoRA
checkpoint holds just the adapter. Everything is safetensors, JSON, or an optimizer state loaded
with ``weights_only=True``; nothing is unpickled.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignloop.runs import atomic_write_json, atomic_write_text

LATEST = "latest"


def capture_rng() -> dict:
    np_state = np.random.get_state()
    out = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


class Checkpointer:
    """``checkpoints/step-NNNNNNN/`` folders, a ``latest`` pointer written last, and ``best/``."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = root
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
             extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write a complete folder under a temp name, rename it, then move the pointer."""
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": capture_rng()})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
        if optimizer is not None and (path / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        state = json.loads((path / "state.json").read_text())
        restore_rng(state["rng"])
        return state

    def load_extra(self, path: Path, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(path / f"{name}.safetensors"))

    def save_best(self, model: nn.Module, info: dict) -> None:
        tmp = self.root / ".best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        atomic_write_json(tmp / "best.json", info)
        best = self.root / "best"
        if best.exists():
            shutil.rmtree(best)
        tmp.rename(best)

    def load_best(self, model: nn.Module) -> dict | None:
        best = self.root / "best"
        if not (best / "best.json").is_file():
            return None
        load_trainable_state(model, load_file(str(best / "trainable.safetensors")))
        return json.loads((best / "best.json").read_text())
