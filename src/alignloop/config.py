"""Typed configuration shared by every stage: YAML file + CLI flags + dotted overrides.

Every stage config is a pydantic model with ``extra="forbid"``, so a misspelt key, a wrong
type or an impossible value is rejected before any model or data is loaded, with a message
that names the key (``train.lr: must be > 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignloop.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "auto" = every linear layer inside the transformer blocks (attention and MLP projections).
    target_modules: list[str] | Literal["auto"] = "auto"


class ModelConfig(Strict):
    name_or_path: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    adapter: Literal["none", "lora", "qlora"] = "none"
    lora: LoraSettings = LoraSettings()
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0)
    # None keeps the checkpoint's own dropout; a number overrides every dropout probability in the config.
    dropout: float | None = Field(None, ge=0, lt=1)


class CleanConfig(Strict):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = True
    strip_html: bool = False
    normalize_whitespace: bool = True
    drop_empty: bool = True
    min_chars: int = Field(0, ge=0)
    max_chars: int | None = Field(None, gt=0)
    dedupe_exact: bool = True
    dedupe_near: bool = False
    near_threshold: float = Field(0.9, gt=0, le=1)


class SplitConfig(Strict):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _fits(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test fractions must be below 1")
        return self


class DataConfig(Strict):
    train: str | None = None
    eval: str | None = None
    test: str | None = None
    format: Literal["auto", "jsonl", "csv", "parquet", "dataset", "conll"] = "auto"
    # source column -> alignloop field, e.g. {"instruction": "prompt", "output": "completion"}
    column_map: dict[str, str] = {}
    split: SplitConfig = SplitConfig()
    max_seq_len: int = Field(1024, gt=8)
    # Never cut the completion below this many tokens: the prompt is shortened from the left first.
    min_completion_tokens: int = Field(32, ge=1)
    packing: bool = False
    chat_template: str | None = None
    clean: CleanConfig = CleanConfig()


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # auto: bf16 autocast on GPUs that support it, plain fp32 on CPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # Batches of similar length waste less compute on padding; order stays seeded and resumable.
    group_by_length: bool = True
    log_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, ge=1)
    metric: str = "eval_loss"
    greater_is_better: bool | None = None
    early_stopping_patience: int | None = Field(None, gt=0)
    load_best_at_end: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # classification: "balanced" weights each class's loss by n_examples / (n_classes * n_in_class).
    class_weighting: Literal["none", "balanced"] = "none"
    seed: int = 42
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]


class SFTConfig(Strict):
    # causal_lm: prompt/completion, messages or text; classification: {"text", "label"};
    # tagging: {"tokens", "tags"} (BIO; CoNLL files too).
    task: Literal["causal_lm", "classification", "tagging"] = "causal_lm"
    output_dir: str = "runs/sft"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _needs_inputs(self) -> SFTConfig:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (or pass --model)")
        if not self.data.train:
            raise ValueError("data.train is required (or pass --data)")
        return self


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-5`` -> (["train", "lr"], 1e-05); the value is read as YAML so lists and bools work."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: the config must be a mapping of keys to values")
    return data


def describe_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the dotted key."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{key}: {msg}" if err["loc"] else msg)
    return f"{source}: " + "; ".join(parts)


def build_config(
    cls: type[C],
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> C:
    """YAML file, then CLI flags (dotted key -> value, None means unset), then ``key=value`` overrides."""
    tree: dict = read_yaml(config_file) if config_file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key.split("."), value)
    for item in overrides or []:
        path, value = parse_override(item)
        set_dotted(tree, path, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, str(config_file) if config_file else "config")) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    from alignloop.runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
