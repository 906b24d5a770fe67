"""The training recipe: every setting of :func:`interp.adapters.train.train_expert`, in one place.

The study's ``[training]`` config section *is* this dataclass (:mod:`interp.config` validates TOML
keys against its fields), so the defaults below are the study's measured recipe and a quickstart
``TrainConfig()`` trains what ``make demo`` trains. Kept free of torch so that reading a config is
cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib

# the seven linear projections of a Llama-style block
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "constant")
INITS = ("per_expert", "shared")


def expert_init_seed(seed: int, name: str) -> int:
    """The LoRA-init seed of expert ``name`` under training seed ``seed``.

    ``int(sha256(f"{seed}:{name}"))`` truncated to its low 63 bits (a non-negative int64 that
    ``torch.manual_seed`` takes). Experts of one study then start from independent A matrices
    (peft draws A Kaiming-uniform, B = 0), so the principal angles and φ between their trained
    updates measure what they learned, not a shared random start; the same (seed, name) always
    gives the same init.

    Raises:
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"expert name must be a string, got {type(name).__name__}")
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclasses.dataclass
class TrainConfig:
    """LoRA training hyper-parameters (defaults: the two-hop study's recipe, measured on SmolLM2 to
    take every expert past 90% on its own facts, with :attr:`min_accuracy` as the floor).

    Attributes:
        r: LoRA rank. lora_alpha: α (scale s = α/r). target_modules: projection names.
        lr: AdamW peak learning rate (of the A matrices under LoRA+). schedule: ``"linear"``
            (linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0, as
            transformers' ``get_linear_schedule_with_warmup``) or ``"constant"``.
        warmup_ratio: warm-up fraction in [0, 1).
        epochs: passes over the data (ignored if max_steps).
        max_steps: total optimiser steps (overrides epochs; ``None`` or 0: no cap).
        min_steps: floor on the steps that ``epochs`` gives (a small dataset still gets enough
            updates; ignored with max_steps). The 96-example D_AC set gets 60 steps, not 30.
        batch_size: examples per step.
        seed: seed of the batch order, and of the LoRA init under ``init="shared"``.
        init: ``"per_expert"`` (default): each expert's LoRA init is seeded by
            :func:`expert_init_seed` ``(seed, expert name)``, so experts of one study do not share
            their A matrices; ``"shared"``: every expert's init is seeded by ``seed`` itself (the
            behaviour before per-expert inits: identical A at step 0 across experts).
        weight_decay: AdamW decay. checkpoint_every: steps between resume checkpoints (0: none).
            add_eos: append the tokenizer's EOS after each answer.
        lora_dropout: dropout on the LoRA input. max_grad_norm: global gradient-norm clip
            (0: none; 1.0 as transformers' Trainer), which keeps memorisation runs from spiking.
        loraplus_lr_ratio: 0 for plain AdamW; else LoRA+ (Hayou et al., ICML 2024): B matrices
            learn ``ratio`` times faster than A (peft's ``create_loraplus_optimizer``).
        precision: ``"fp32"``; ``"bf16"``: mixed precision (frozen base held in bf16,
            ``torch.autocast`` bf16 matmuls, fp32 LoRA weights, optimiser state and loss); or
            ``"auto"``: bf16 where this machine runs it clearly faster than fp32, measured
            (:func:`interp.hardware.choose_precision`; on an AVX512-BF16 CPU a SmolLM2 step is
            ~1.5x faster in bf16, on an AVX2-only CPU bf16 is ~5x *slower*). The adapter is
            saved in fp32 and its reported training accuracy is measured on the fp32 base.
        packing: pack each batch's examples into rows of twice its longest example (first-fit
            decreasing; each example's positions restart at 0, attention kept within it by
            transformers' packed-sequence mask) instead of right-padding every example to the
            longest: the same loss and gradient (with dropout off; with dropout, masks of another
            shape) with ~30% fewer tokens (1.34x faster a step
            on an AVX2 CPU in fp32, 1.22x in bf16 on AVX512-BF16, the study's data).
            ``train_expert`` checks on its first examples, in fp32, that the model gives packed
            and padded examples the same answer log-probabilities, and pads if not. Part of
            :meth:`identity`: experts trained before it existed are trained again. On CUDA,
            transformers' packed-sequence detection reads one flag from the GPU per step.
        min_accuracy: the study's floor on an expert's first-token accuracy on its own training
            facts (0: none). The experts step trains an expert below it for as many epochs
            again, continuing from its weights (``train_expert(start_from=...)``, a warm restart)
            and keeps that one; ``train_expert`` itself ignores it. Not part of :meth:`identity`.
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1.5e-3
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    epochs: int = 5
    max_steps: int | None = None
    min_steps: int = 60
    batch_size: int = 16
    seed: int = 0
    init: str = "per_expert"
    weight_decay: float = 0.0
    checkpoint_every: int = 20
    add_eos: bool = False
    lora_dropout: float = 0.0
    precision: str = "auto"
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float = 8.0
    packing: bool = True
    min_accuracy: float = 0.9

    def __post_init__(self) -> None:
        self.max_steps = self.max_steps or None  # TOML has no null: 0 means "no cap" there
        self.target_modules = tuple(self.target_modules)

    def problems(self) -> list[str]:
        """Every impossible value, as ``"field=value (allowed)"`` strings (empty if none)."""
        bad = []
        for f in ("r", "batch_size", "epochs"):
            if getattr(self, f) < 1:
                bad.append(f"{f}={getattr(self, f)} (must be >= 1)")
        if self.lr <= 0:
            bad.append(f"lr={self.lr} (must be > 0)")
        if self.schedule not in SCHEDULES:
            bad.append(f"schedule={self.schedule!r} ({'|'.join(SCHEDULES)})")
        if not 0 <= self.warmup_ratio < 1:
            bad.append(f"warmup_ratio={self.warmup_ratio} (in [0, 1))")
        if self.init not in INITS:
            bad.append(f"init={self.init!r} ({'|'.join(INITS)})")
        if self.precision not in PRECISIONS:
            bad.append(f"precision={self.precision!r} ({'|'.join(PRECISIONS)})")
        if self.max_steps is not None and self.max_steps < 0:
            bad.append(f"max_steps={self.max_steps} (>= 0; 0 or None: no cap)")
        if self.min_steps < 0 or self.checkpoint_every < 0 or self.loraplus_lr_ratio < 0:
            bad.append("min_steps, checkpoint_every and loraplus_lr_ratio must be >= 0")
        if not self.target_modules:
            bad.append("target_modules is empty")
        if not 0 <= self.min_accuracy <= 1:
            bad.append(f"min_accuracy={self.min_accuracy} (in [0, 1]; 0: no floor)")
        return bad

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def init_seed(self, expert: str | None) -> int:
        """The seed of ``torch.manual_seed`` before the LoRA init of ``expert``: :attr:`seed`
        under ``init="shared"`` or without a name, else :func:`expert_init_seed`."""
        if self.init == "shared" or expert is None:
            return int(self.seed)
        return expert_init_seed(self.seed, expert)

    def total_steps(self, n_examples: int) -> int:
        """Optimiser steps of one training on ``n_examples`` pairs: :attr:`max_steps` if set,
        else ``epochs · ⌈n / batch_size⌉``, at least :attr:`min_steps`."""
        if self.max_steps:
            return int(self.max_steps)
        return max(self.epochs * -(-int(n_examples) // self.batch_size), self.min_steps)

    def identity(self) -> dict:
        """The fields that determine the trained weights of one training (checkpoint cadence and
        the study's accuracy floor excluded)."""
        d = self.to_json()
        d.pop("checkpoint_every")
        d.pop("min_accuracy")
        return d

    def longer(self) -> "TrainConfig":
        """Twice the epochs (and twice ``min_steps`` / ``max_steps``), everything else, the init
        included, unchanged: the floor's retraining recipe before continuation replaced it (runs
        made then are still recognised by it)."""
        return dataclasses.replace(self, epochs=2 * self.epochs, min_steps=2 * self.min_steps,
                                   max_steps=2 * self.max_steps if self.max_steps else None)
