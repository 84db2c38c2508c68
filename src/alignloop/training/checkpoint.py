"""Checkpoints that make resume exact: trainable weights, optimizer, scheduler, RNG states, data position.

Only trainable tensors are stored (frozen ones are reloaded from the base model), so a LoRA
checkpoint holds just the adapter. Everything is safetensors, JSON, or an optimizer state loaded
with ``weights_only=True``; nothing is unpickled.

A sharded run (``train.distributed: fsdp``) writes the tensors with torch.distributed.checkpoint (DCP)
instead: every process writes its own shards into ``dcp/`` and the optimizer state is keyed by parameter
name, so the checkpoint loads on another number of processes (DCP reshards on load).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from alignloop.runs import atomic_write_json, atomic_write_text
from alignloop.training.distributed import reshard

LATEST = "latest"
SHARDS = "dcp"


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


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """``checkpoints/step-NNNNNNN/`` folders, a ``latest`` pointer written last, and ``best/``.

    Every process calls save, load, save_best and load_best: in a plain run process 0 writes and every
    process reads; in a sharded run (``sharded``) every process writes and reads its shards. ``model`` is
    every trained module (a ModuleDict when a loop trains several), ``optimizer`` the one optimizer over them;
    ``tensors`` are further named tensor dicts (an EMA of the weights), loaded back in place."""

    def __init__(self, root: Path, keep: int = 2, sharded: bool = False):
        self.root = root
        self.keep = keep
        self.sharded = sharded

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
             tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write a complete folder under a temp name, rename it, then move the pointer."""
        final = self.root / f"step-{step:07d}"
        tmp = self._fresh_folder(f".step-{step:07d}.tmp")
        self._write_tensors(tmp, model, optimizer, tensors or {})
        if is_main_process():
            atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": capture_rng()})
            _replace(final, tmp)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune()
        barrier()
        return final

    def _fresh_folder(self, name: str) -> Path:
        """An empty temporary folder under the root (made by the main process), once every process may write."""
        tmp = self.root / name
        if is_main_process():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        return tmp

    def _shard_content(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """What DCP saves and loads in place: trainable parameters, extra tensors, the optimizer's state."""
        content: dict[str, Any] = {"model": _trainable_parameters(model), "tensors": tensors}
        if optimizer is not None:
            content["optimizer"] = get_optimizer_state_dict(model, optimizer)
        return content

    def _write_tensors(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.sharded:
            content = self._shard_content(model, optimizer, tensors)
            with warnings.catch_warnings():  # one process writes all of it: DCP warns that this is meant
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(content, checkpoint_id=folder / SHARDS, no_dist=not dist.is_initialized())
            return
        if not is_main_process():
            return
        save_file(trainable_state(model), str(folder / "trainable.safetensors"))
        for name, extra in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(folder / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
        self._read_tensors(path, model, optimizer, tensors or {})
        state = json.loads((path / "state.json").read_text())
        restore_rng(state["rng"])
        return state

    def _read_tensors(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.sharded:
            content = self._shard_content(model, optimizer, tensors)
            with torch.no_grad():  # DCP loads into the given tensors in place, the parameters included
                dcp.load(content, checkpoint_id=folder / SHARDS, no_dist=not dist.is_initialized())
            if optimizer is not None:
                set_optimizer_state_dict(model, optimizer, content["optimizer"])
            return
        load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
        for name, extra in tensors.items():
            stored = load_file(str(folder / f"{name}.safetensors"))
            if stored.keys() != extra.keys():
                raise RuntimeError(f"checkpoint {name} does not match: {sorted(stored.keys() ^ extra.keys())[:3]}")
            for k, t in extra.items():
                t.copy_(stored[k])
        if optimizer is not None and (folder / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))

    def save_best(self, model: nn.Module, info: dict) -> None:
        tmp = self._fresh_folder(".best.tmp")
        self._write_tensors(tmp, model, None, {})
        if is_main_process():
            atomic_write_json(tmp / "best.json", info)
            _replace(self.root / "best", tmp)
        barrier()

    def load_best(self, model: nn.Module) -> dict | None:
        best = self.root / "best"
        if not (best / "best.json").is_file():
            return None
        self._read_tensors(best, model, None, {})
        return json.loads((best / "best.json").read_text())


def _trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters themselves (shards on a sharded model), for DCP to save or to load into."""
    reshard(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _replace(final: Path, complete: Path) -> None:
    """``complete`` (a fully written folder) renamed to ``final``, replacing what was there."""
    if final.exists():
        shutil.rmtree(final)
    complete.rename(final)
