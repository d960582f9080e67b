"""Run configuration: typed dataclasses, YAML files and dotted command-line overrides.

    cfg = load_config("examples/configs/ark_asr_opd.yaml", ["optim.lr=1e-5", "steps=20"])

Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml

from .distributed import ParallelConfig
from .kernels.union_kl import check_divergence


@dataclass
class ModelConfig:
    preset: str = "tiny_ark_asr"
    overrides: dict = field(default_factory=dict)  # e.g. {"decoder.num_layers": 2}
    checkpoint: str | None = None  # megatron checkpoint folder with the initial weights
    tokenizer: str | None = None  # tokenizer.json (or its folder)
    # layers, as Megatron-LM's --transformer-impl: auto (TE when it imports, with CUDA) | local |
    # transformer_engine; fp8 (TE only): null | hybrid | e4m3
    transformer_impl: str = "auto"
    fp8: str | None = None
    # activation recomputation, as Megatron-LM's --recompute-granularity: none | selective (core
    # attention) | full (every decoder layer keeps only its input); and the audio encoder's
    # layers recomputed in full
    recompute: str = "none"
    recompute_encoder: bool = False


@dataclass
class DataConfig:
    train: str = "examples/data/train.jsonl"
    # a NeMo tarred dataset: its tar files (brace-expanded, `audio_{0..7}.tar`), with `train`
    # its per-shard manifests (`manifest_{0..7}.json`)
    tarred_audio_filepaths: str | None = None
    heldout: str | None = "examples/data/heldout.jsonl"
    subset: float = 1.0  # fraction of the training manifest used, evenly spread over it
    # a step = micro_batches packed micro-batches of up to max_tokens decoder tokens on each
    # data-parallel rank (global batch <= max_tokens * micro_batches * DP tokens)
    max_tokens: int = 4096
    micro_batches: int = 1
    num_buckets: int = 10
    num_workers: int = 2
    skip_bad: bool = False
    max_skip_fraction: float = 0.01
    max_duration: float = 30.0

    def __post_init__(self):
        for name in ("max_tokens", "micro_batches", "num_buckets"):
            _check(f"data.{name}", getattr(self, name), getattr(self, name) >= 1, "at least 1")
        _check("data.num_workers", self.num_workers, self.num_workers >= 0, "at least 0")
        _check("data.subset", self.subset, 0.0 < self.subset <= 1.0, "in (0, 1]")
        _check("data.max_skip_fraction", self.max_skip_fraction,
               0.0 <= self.max_skip_fraction <= 1.0, "in [0, 1]")
        _check("data.max_duration", self.max_duration, self.max_duration > 0, "positive")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.005
    clip_grad: float = 1.0
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # megatron's distributed optimizer shards the optimizer state over data-parallel ranks; it
    # needs reduce-scatter, which gloo lacks, so by default (None) it is on with CUDA only
    distributed: bool | None = None
    # torch's fused AdamW: one kernel over the parameters where torch's default on CUDA (without
    # TE or apex, whose fused Adam megatron would take) makes ~10 passes; by default (None) on
    # with CUDA (on the CPU torch's default is its per-parameter loop)
    fused: bool | None = None
    # a resumed run whose optimizer settings (the LR schedule: optim.lr, min_lr, warmup_steps,
    # schedule, weight_decay and steps, the cosine's length; Adam's betas) differ from its
    # checkpoint's: check (refuse, naming each difference) | checkpoint (keep the checkpoint's)
    # | config (the config's from the resumed step on); as Megatron-LM's
    # --use-checkpoint-opt_param-scheduler / --override-opt_param-scheduler
    on_resume: str = "check"

    def __post_init__(self):
        _check("optim.schedule", self.schedule, self.schedule in ("constant", "cosine"),
               "constant or cosine")
        _check("optim.on_resume", self.on_resume,
               self.on_resume in ("check", "checkpoint", "config"),
               "check, checkpoint or config")
        _check("optim.lr", self.lr, self.lr > 0, "positive")
        for name in ("min_lr", "weight_decay", "clip_grad", "warmup_steps"):
            _check(f"optim.{name}", getattr(self, name), getattr(self, name) >= 0, "at least 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(f"optim.{name}", getattr(self, name), 0.0 <= getattr(self, name) < 1.0,
                   "in [0, 1)")
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) is above optim.lr ({self.lr})")


@dataclass
class GenerationConfig:
    """How a rollout decodes (ark_mega.opd.generate)."""

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    # candidates kept per step: the student top-k of the OPD union (in a run config it follows
    # opd.top_k; None there), and the sampling pool
    top_k: int | None = None
    seed: int = 0
    # replay each decoding step as one CUDA graph (on a GPU): the step's ~1,300 kernel launches
    # through Python become one
    cuda_graph: bool = True
    # the host reads the picked tokens (and stops once every row has ended) every this many
    # steps, queueing steps ahead of the device in between; 0: 8 on a GPU, 1 on the CPU
    check_every: int = 0

    def __post_init__(self):
        where = "opd.generation."
        _check(where + "max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1,
               "at least 1")
        _check(where + "temperature", self.temperature, self.temperature > 0, "positive")
        _check(where + "top_p", self.top_p, 0.0 < self.top_p <= 1.0, "in (0, 1]")
        _check(where + "check_every", self.check_every, self.check_every >= 0, "at least 0")


@dataclass
class OPDSettings:
    top_k: int = 32
    temperature: float = 1.0
    fallback_to_reference: bool = False
    min_token_map_coverage: float = 0.5
    blocked_from: int | None = None  # ids >= this are never generated (151670 for Ark-ASR)
    # the divergence over the union support: forward_kl (the paper's Eq. 1), reverse_kl, or
    # jsd with mixing weight jsd_beta (docs/kernels.md gives each formula and gradient)
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        check_divergence(self.divergence, self.jsd_beta)
        _check("opd.top_k", self.top_k, self.top_k >= 1, "at least 1")
        _check("opd.temperature", self.temperature, self.temperature > 0, "positive")
        _check("opd.min_token_map_coverage", self.min_token_map_coverage,
               0.0 <= self.min_token_map_coverage <= 1.0, "in [0, 1]")
        _check("opd.blocked_from", self.blocked_from,
               self.blocked_from is None or self.blocked_from >= 0, "at least 0 (or null)")
        # one distillation width: the rollout keeps the student's top-k for the union
        if self.generation.top_k is None:
            self.generation.top_k = self.top_k
        elif self.generation.top_k != self.top_k:
            raise ValueError(f"opd.generation.top_k ({self.generation.top_k}) differs from "
                             f"opd.top_k ({self.top_k}): the rollout's top-k is the student's "
                             f"side of the union; set opd.top_k only")


@dataclass
class SFTSettings:
    # joint CTC / attention training (sft and td stages, one pipeline stage): the weight of the
    # CTC loss of an auxiliary head on the audio embeddings; 0 is plain cross-entropy. An aid
    # for models trained from scratch (ESPnet / WeNet use 0.3); the head is not exported.
    ctc_weight: float = 0.0

    def __post_init__(self):
        _check("sft.ctc_weight", self.ctc_weight, 0.0 <= self.ctc_weight < 1.0, "in [0, 1)")


@dataclass
class RunConfig:
    stage: str = "opd"  # sft | td | opd
    name: str = "run"
    output_dir: str = "runs/opd"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    opd: OPDSettings = field(default_factory=OPDSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 100
    seed: int = 1234  # the data order (sampler); initial weights follow parallel.seed
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    save_every: int = 100
    keep_last: int = 3  # 0 keeps every checkpoint
    resume: bool = True  # continue from the newest checkpoint in output_dir
    log_every: int = 1
    max_nonfinite_in_a_row: int = 5
    eval_batch_tokens: int = 8192
    # held-out CER / WER (data.heldout) every eval_every steps into the metrics (0: at the end
    # only); keep_best also saves the weights with the lowest mean error to output_dir/best
    eval_every: int = 0
    keep_best: bool = False
    td_manifest: str | None = None  # TD: where the teacher's transcripts go

    def __post_init__(self):
        _check("stage", self.stage, self.stage in ("sft", "td", "opd"), "sft, td or opd")
        _check("dtype", self.dtype, self.dtype in ("auto", "bf16", "fp32"), "auto, bf16 or fp32")
        for name in ("steps", "save_every", "log_every", "max_nonfinite_in_a_row",
                     "eval_batch_tokens"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        for name in ("keep_last", "eval_every"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "at least 0")
        if self.stage in ("td", "opd") and self.teacher is None:
            raise ValueError(f"stage {self.stage} needs a teacher model (teacher.preset, "
                             f"teacher.checkpoint)")
        if self.sft.ctc_weight and self.stage == "opd":
            raise ValueError("sft.ctc_weight applies to the sft and td stages, not opd")
        if self.sft.ctc_weight and self.parallel.pipeline_parallel > 1:
            raise ValueError("sft.ctc_weight needs parallel.pipeline_parallel 1 (the CTC head "
                             "and the loss would sit on different pipeline stages)")
        if (self.eval_every or self.keep_best) and not self.data.heldout:
            raise ValueError("eval_every / keep_best need a held-out manifest (data.heldout)")
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best compares the evaluations during training: it needs "
                             "eval_every >= 1")


def _check(setting: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{setting} must be {expected}, got {value!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise TypeError(f"config {where or 'root'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f"unknown config key {where + unknown[0]!r}; known here: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = coerce(hints[key], value, where + key)
    return cls(**kwargs)


def coerce(hint, value, where: str):
    """`value` as type `hint` (dataclasses built from mappings; YAML's string floats such as
    1e-05 read as floats), or a TypeError naming the key `where`."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if is_union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if dataclasses.is_dataclass(option):
            return value if isinstance(value, option) else _build(option, value, where + ".")
    for option in options:
        if option in (int, float, str, bool) and isinstance(value, option) and not (
                option is int and isinstance(value, bool)):
            return value
        if option is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if typing.get_origin(option) is dict or option is dict:
            if isinstance(value, dict):
                return value
    raise TypeError(f"config {where}: {value!r} is not a {hint}")


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise KeyError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional), then `key.sub=value` overrides (values parsed as YAML)."""
    tree = {}
    if path:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(RunConfig, tree, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
