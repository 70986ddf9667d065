"""Typed arguments of every stage, and the profiles ``smoke``, ``cpu`` and ``paper``.

A profile picks the model, the LoRA spec and, per task, the subsample sizes and the
training hyper-parameters. Every field can be overridden from the command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Optional, Union

from .errors import UserError
from .models.formatting import LOSS_ON_CHOICES
from .models.lora import LoraSpec

PerGroup = Optional[Union[int, dict[str, int]]]


@dataclass
class TrainArgs:
    """Fine-tuning hyper-parameters.

    ``lr`` peaks after ``warmup_ratio`` of all steps (linear warm-up) and decays linearly to
    0 at the end of ``epochs`` (the transformers Trainer's default schedule). Early
    stopping ends training when the validation loss has risen for ``patience`` consecutive
    evaluations (the paper's rule); it needs a validation split: ``validation="held-out"``
    (default) uses the task's ``val`` examples, ``val_per_group`` per group drawn from the
    test file but never attributed (:func:`llm_influence.data.tasks.split_validation`);
    ``"none"`` (or ``val_per_group=None``) trains without validation. ``autocast="bf16"`` asks for the training
    forward/backward under bfloat16 autocast (weights, optimizer state and the saved adapter
    stay float32); it is used only where bfloat16 is native (a CUDA GPU with bf16, or a CPU
    with AVX512-BF16/AMX-BF16: ~1.5-2x faster there), otherwise the run warns once and trains
    in float32 (:func:`llm_influence.hardware.resolve_autocast`; emulated bf16 was 29x slower
    than float32 on an AVX2-only CPU). The default, and every profile's, is ``"none"``
    (float32). Attribution features are always computed in float32 or float64.
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 5e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    loss_on: Literal["response", "all", "all-padded"] = "response"
    seed: int = 0
    early_stopping: bool = True
    patience: int = 3
    eval_batch_size: int = 16
    validation: Literal["held-out", "none"] = "held-out"
    val_per_group: Optional[int] = None
    autocast: Literal["none", "bf16"] = "none"

    def validation_per_group(self) -> Optional[int]:
        """Validation rows per group to hold out when loading the task (``None``: none)."""
        return self.val_per_group if self.validation == "held-out" else None

    def validate(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1), ("max_length", self.max_length >= 8),
            ("patience", self.patience >= 1), ("eval_batch_size", self.eval_batch_size >= 1),
            ("loss_on", self.loss_on in LOSS_ON_CHOICES), ("validation", self.validation in ("held-out", "none")),
            ("weight_decay", self.weight_decay >= 0), ("max_grad_norm", self.max_grad_norm >= 0),
            ("val_per_group", self.val_per_group is None or self.val_per_group >= 1),
            ("autocast", self.autocast in ("none", "bf16")),
        ]
        for name, ok in checks:
            if not ok:
                raise UserError(f"invalid training argument {name}={getattr(self, name)!r}")


@dataclass
class TaskProfile:
    """Per-task settings of a profile: subsample caps per group and training overrides."""

    train_per_group: PerGroup = None
    test_per_group: PerGroup = None
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class Profile:
    name: str
    model: str
    description: str
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainArgs = field(default_factory=TrainArgs)
    tasks: dict[str, TaskProfile] = field(default_factory=dict)

    def task(self, name: str) -> TaskProfile:
        return self.tasks.get(name, TaskProfile())

    def train_args(self, task: str) -> TrainArgs:
        return replace(self.train, **self.task(task).train)


def _smoke() -> Profile:
    small = TaskProfile(train_per_group=4, test_per_group=2)
    return Profile(
        name="smoke", model="tiny-llama",
        description="tiny-llama on tiny subsets: the whole pipeline in seconds (tests)",
        lora=LoraSpec(r=4, alpha=32, dropout=0.0),
        train=TrainArgs(epochs=2, batch_size=4, lr=1e-3, max_length=64, eval_batch_size=8, val_per_group=1),
        tasks={name: small for name in [
            "mixed-small", "mixed-large", "grammars", "math", "harmfulcheck",
            "backdoor-1", "backdoor-3", "backdoor-5", "mixed-l", "emotion", "grammars-rule"]},
    )


def _cpu() -> Profile:
    # Every task must fit ~45 minutes on 2 CPU cores while the model still learns it.
    # Training is float32 (autocast="none"): bfloat16 autocast is only faster on CPUs with
    # native bf16 (AVX512-BF16/AMX) and is emulated, 29x slower, on AVX2-only CPUs
    # (benchmarks/README.md, "CPU classes"); float32 also keeps the committed numbers the
    # same on every CPU class up to float32 rounding. Measured on the AVX512-BF16 machine
    # this was sized on (benchmarks/README.md, section 1): a float32 training epoch costs
    # ~0.65 s per 96-token example (~0.45 s under bf16 autocast), gradient extraction
    # ~0.6 s per example and a validation forward ~0.15 s. So: 96-token sequences (the
    # prompt and the first ~50 response tokens, which already separate harmful/benign,
    # refusal/compliance and the trigger classes; grammar and math examples fit whole in
    # 96/112 tokens), ~100 training examples (all 40 for mixed-small), 30-40 test
    # examples, 4-5 epochs at lr 1e-3, validation on at most 16 test examples.
    return Profile(
        name="cpu", model="smollm2-135m",
        description="embedded SmolLM2-135M on stratified subsets, every task in about 45 minutes on 2 CPU cores",
        lora=LoraSpec(),
        train=TrainArgs(epochs=4, batch_size=8, lr=1e-3, max_length=96, val_per_group=8, autocast="none"),
        tasks={
            "mixed-small": TaskProfile(train=dict(epochs=5, val_per_group=8)),  # all 40 test rows: 8 held out
            "mixed-large": TaskProfile(train_per_group={"harmful": 20, "benign": 80}, test_per_group=40,
                                       train=dict(val_per_group=16)),
            "grammars": TaskProfile(train_per_group=10, test_per_group=3, train=dict(val_per_group=1)),
            "math": TaskProfile(train_per_group=10, test_per_group=3, train=dict(max_length=112, val_per_group=1)),
            "harmfulcheck": TaskProfile(train_per_group=50, test_per_group=15),
            "backdoor-1": TaskProfile(train_per_group=50, test_per_group=15),
            "backdoor-3": TaskProfile(train_per_group=25, test_per_group=8, train=dict(val_per_group=4)),
            "backdoor-5": TaskProfile(train_per_group=16, test_per_group=5, train=dict(val_per_group=3)),
            "mixed-l": TaskProfile(train_per_group={"harmful": 20, "benign": 80}, test_per_group=40,
                                   train=dict(val_per_group=16)),
            "emotion": TaskProfile(train_per_group=20, test_per_group=6, train=dict(max_length=64)),
            "grammars-rule": TaskProfile(train_per_group=10, test_per_group=3, train=dict(val_per_group=1)),
        },
    )


def _paper() -> Profile:
    # The paper: LoRA r=4, alpha=32, dropout 0.1 on q/v in every layer; batch 32; up to 25
    # epochs with early stopping; HF Trainer defaults otherwise (AdamW, lr 5e-5, linear).
    base = TrainArgs(epochs=25, batch_size=32, lr=5e-5, max_length=128, val_per_group=20)
    return Profile(
        name="paper", model="smollm2-135m",
        description="the paper's full datasets and hyper-parameters (for a GPU)",
        lora=LoraSpec(), train=base,
        tasks={"harmfulcheck": TaskProfile(train=dict(max_length=256))},
    )


PROFILES: dict[str, Profile] = {p.name: p for p in (_smoke(), _cpu(), _paper())}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(f"unknown profile {name!r}; available: {', '.join(PROFILES)}")
    return PROFILES[name]


def dataclass_fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def to_dict(obj) -> dict:
    return asdict(obj)


def load_profile_task(profile: Profile, task_name: str, data_dir=None, *, train_per_group: PerGroup = None,
                      test_per_group: PerGroup = None, train: Optional[dict[str, Any]] = None,
                      data_seed: int = 0):
    """``(task, train_args, task_config)`` of paper task ``task_name`` under ``profile``.

    The subsample sizes default to the profile's (``train_per_group`` / ``test_per_group``
    override them), ``train`` overrides training arguments, and ``data_seed`` draws the
    train/test/validation subsamples (the training seed does not: seeds of a fine-tune
    change the LoRA initialisation, the data order and dropout, never the data). The
    validation rows (``val_per_group`` of the training arguments) are never attributed.
    ``task_config`` is what :func:`~llm_influence.training.finetune` records as the task
    section of ``config.json``, so runs made by ``reproduce`` and by the studies match."""
    from .data import load_task

    tp = profile.task(task_name)
    args = replace(profile.train_args(task_name), **(train or {}))
    tpg = tp.train_per_group if train_per_group is None else train_per_group
    tepg = tp.test_per_group if test_per_group is None else test_per_group
    task = load_task(task_name, data_dir, train_per_group=tpg, test_per_group=tepg, seed=data_seed,
                     val_per_group=args.validation_per_group())
    task_config = {"profile": profile.name, "train_per_group": tpg, "test_per_group": tepg,
                   "data_seed": data_seed, "val_per_group": args.validation_per_group()}
    return task, args, task_config
