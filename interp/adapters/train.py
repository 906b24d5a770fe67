"""Train one LoRA expert (PEFT) on (prompt, answer) pairs, resumably and deterministically.

:func:`train_expert` fine-tunes a LoRA (Hu et al., ICLR 2022: ``W x + s·B·A x``, ``s = α/r``) on
a base model with the next-token cross-entropy on the *answer tokens only* (prompt and padding
labels are −100), each batch's examples packed into rows of twice its longest example (or
right-padded to it), AdamW (optionally LoRA+)
with linear warm-up and decay, and gradient-norm clipping. The result is a standard PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) plus ``interp_meta.json``
and ``manifest.json``, written atomically.

Determinism and resume: the LoRA init uses ``torch.manual_seed(config.init_seed(expert))`` —
by default a seed derived from the training seed and the expert's name
(:func:`interp.adapters.recipe.expert_init_seed`), so the experts of one study start from
different A matrices; ``init="shared"`` or no name: the training seed itself. The batches of
epoch ``e`` come from a generator seeded ``seed·1_000_003 + e`` (:func:`epoch_batches`) and the learning rate
of step ``t`` from :func:`lr_scale`, so step ``t``'s batch and rate are pure functions of
``(seed, t)``. Every ``checkpoint_every`` steps the adapter weights
(safetensors), AdamW state (``torch.save``, re-read with ``weights_only=True``), torch RNG state
and step go to ``out_dir + ".partial"``; re-running after a crash resumes from it and ends with the
same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from interp.adapters.recipe import TrainConfig
from interp.adapters.testing import META
from interp.errors import TrainingError
from interp.hardware import check_device, choose_precision
from interp.models import (atomic_directory, atomic_write_text, check_fused_targets, decoder_and_head, load_hf,
                           model_skeleton, verify_manifest, write_manifest)
from interp.packing import first_fit_decreasing

CKPT_WEIGHTS = "lora_weights.safetensors"
CKPT_OPTIM = "optimizer.pt"
CKPT_STATE = "state.json"
#: training losses are copied to the host in blocks of this many steps (one device sync each)
LOSS_READ_EVERY = 32
#: packed rows hold this many times a batch's longest example: on the study's data (8-22 tokens)
#: 1x packs few pairs, 2x and 3x cut a step by a quarter on an AVX2 CPU, and one row for the whole
#: batch is slower than padding (attention over the row; benchmarks/bench_packing.py)
PACK_ROW_FACTOR = 2
#: largest |difference| of an answer token's log-probability, packed against padded, in fp32:
#: rounding is ~1e-6; a model that let packed examples see each other is off by far more
PACKING_ATOL = 1e-4
#: examples in that check (a forward of each layout; on the CPU, before the base moves to its device)
PACKING_CHECK_EXAMPLES = 4


def _data_sha256(examples: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps([list(e) for e in examples], ensure_ascii=False).encode()).hexdigest()


def _encode(tok: Any, examples: Sequence[tuple[str, str]], add_eos: bool) -> list[tuple[list[int], list[int]]]:
    out = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
            raise TrainingError(f"example {i} must be a (prompt, answer) pair of strings, got {ex!r}")
        p = list(tok(ex[0], add_special_tokens=False)["input_ids"])
        a = list(tok(ex[1], add_special_tokens=False)["input_ids"])
        if not p or not a:
            raise TrainingError(f"example {i} {ex!r}: prompt and answer must both tokenise to ≥ 1 token")
        if add_eos:
            if tok.eos_token_id is None:
                raise TrainingError("add_eos=True but the tokenizer has no EOS token")
            a.append(int(tok.eos_token_id))
        out.append((p, a))
    return out


def _batch(encoded: list[tuple[list[int], list[int]]], idx: Sequence[int], pad: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ``[b, longest]`` (answer-only labels)."""
    seqs = [encoded[i] for i in idx]
    L = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for j, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[j, :n] = torch.tensor(p + a)
        mask[j, :n] = 1
        labels[j, len(p):n] = torch.tensor(a)
    return ids, mask, labels


def _packed_batch(encoded: list[tuple[list[int], list[int]]], idx: Sequence[int], pad: int,
                  factor: int | None = None):
    """The examples ``idx`` packed first-fit decreasing into rows of ``factor`` (default
    :data:`PACK_ROW_FACTOR`) × the longest:
    ``input_ids``, ``position_ids``, ``labels`` and ``example`` (the position in ``idx`` of the
    example each token belongs to, −1 on padding), each ``[rows, capacity]`` long.

    Each example's positions restart at 0, which is how transformers recognises packed
    sequences and keeps attention within each one (``masking_utils.find_packed_sequence_indices``,
    used when no attention mask is given); each pad token that ends a row is a one-token segment
    of its own (position 0, label −100), so no example attends to it.
    """
    lens = [len(encoded[i][0]) + len(encoded[i][1]) for i in idx]
    cap = (factor or PACK_ROW_FACTOR) * max(lens)
    rows = first_fit_decreasing(lens, cap)
    ids = torch.full((len(rows), cap), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), cap), dtype=torch.long)
    labels = torch.full((len(rows), cap), -100, dtype=torch.long)
    example = torch.full((len(rows), cap), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        end = 0
        for j, off in row:
            p, a = encoded[idx[j]]
            end = off + len(p) + len(a)
            ids[r, off:end] = torch.tensor(p + a)
            pos[r, off:end] = torch.arange(end - off)
            labels[r, off + len(p):end] = torch.tensor(a)
            example[r, off:end] = j
        # pad tokens at position 0: each its own one-token segment, no position past the
        # longest example (absolute position tables, dynamic RoPE)
        pos[r, end:] = 0
    return ids, pos, labels, example


def _answer_logprobs(model: Any, ids: torch.Tensor, labels: torch.Tensor, example: torch.Tensor,
                     mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of the answer tokens, ordered by (example, token): ``[n_answer_tokens]``."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    rows, cols, targets = answer_positions(labels)
    lp = torch.log_softmax(logits[rows, cols].float(), -1).gather(-1, targets[:, None])[:, 0]
    order = torch.argsort(example[rows, cols + 1] * ids.shape[1] + cols, stable=True)
    return lp[order]


@torch.no_grad()
def packing_error(model: Any, encoded: list[tuple[list[int], list[int]]], idx: Sequence[int], pad: int) -> float:
    """The largest |difference| (nats) between an answer token's log-probability with the
    examples ``idx`` packed (:func:`_packed_batch`) and right-padded (:func:`_batch`), the model
    as it is (``train_expert`` calls it on the fp32 base before LoRA is attached: the adapters
    act on each token alone, so only attention and positions can tell the layouts apart).
    ``inf`` when the layouts do not even give the same answer tokens, or the model fails on the
    packed one (an architecture that does not take ``position_ids``, say)."""
    was_training = model.training
    model.eval()
    idx = list(idx)
    try:
        ids, mask, labels = _batch(encoded, idx, pad)
        rows = torch.arange(len(idx))[:, None].expand_as(ids)
        padded = _answer_logprobs(model, ids, labels, rows, mask=mask)
        pids, pos, plabels, example = _packed_batch(encoded, idx, pad)
        try:
            packed = _answer_logprobs(model, pids, plabels, example, position_ids=pos)
        except Exception:  # noqa: BLE001 - any failure of the packed layout means: pad
            return math.inf
    finally:
        model.train(was_training)
    if packed.shape != padded.shape:
        return math.inf
    return float((packed - padded).abs().max()) if len(padded) else 0.0


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the answer tokens are predicted: ``(rows, cols, targets)``, each ``[n_answer_tokens]``
    (long), in row-major order, with ``hidden[rows, cols]`` the states that predict ``targets``.

    The same elements, in the same order, as the boolean mask ``labels[:, 1:] != -100`` selects;
    computed on the host before the batch goes to a GPU, so the step never waits for the device
    to count the mask (a boolean index is a host sync on CUDA).
    """
    target = labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)
    return rows, cols, target[rows, cols]


def answer_loss(pm: Any, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
                positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) over answer tokens, as HF's causal-LM loss.

    Only the positions that predict an answer token go through the unembedding: with answers of
    a few tokens after ~10-token prompts, projecting every position onto a 49k vocabulary is about
    a fifth of a SmolLM2 training step for nothing. Falls back to the model's own loss for
    architectures whose head does more than a linear map (logit soft-capping).

    Args:
        pm: the PEFT model (LoRA layers active). ids, mask, labels: ``[batch, pos]`` (labels −100
            outside answers); ``mask`` ``None`` with ``position_ids`` for packed rows
            (:func:`_packed_batch`).
        positions: :func:`answer_positions` of ``labels``, on the model's device (default: taken
            from ``labels`` by a boolean mask: the same values, with a host sync on a GPU).
    """
    split = decoder_and_head(pm.get_base_model())
    if split is None:
        return pm(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False).loss
    decoder, head = split
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    if positions is None:
        target = labels[:, 1:]
        keep = target != -100
        return torch.nn.functional.cross_entropy(head(hidden[:, :-1][keep]).float(), target[keep])
    rows, cols, targets = positions
    return torch.nn.functional.cross_entropy(head(hidden[rows, cols]).float(), targets)


@torch.no_grad()
def answer_accuracy(model: Any, encoded: list[tuple[list[int], list[int]]], pad: int,
                    batch_size: int = 64) -> tuple[float, float]:
    """Teacher-forced accuracy on answers: (first-token accuracy, exact-match accuracy).

    Exact match = every answer token is the argmax given the true prefix, which is equivalent to
    greedy decoding reproducing the answer exactly. As in :func:`answer_loss`, only the positions
    that predict an answer token are unembedded.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    split = decoder_and_head(base)
    dev = next(model.parameters()).device
    first, exact = 0, 0
    # batched by length: each row is independent of its batch mates (causal, right padding)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    for s in range(0, len(encoded), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, labels = _batch(encoded, idx, pad)
        ids, mask = ids.to(dev), mask.to(dev)
        if split is None:
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        else:
            hidden = split[0](input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            keep = (labels[:, 1:] != -100).to(dev)
            pred = torch.full(keep.shape, -1, dtype=torch.long, device=dev)
            pred[keep] = split[1](hidden[:, :-1][keep]).argmax(-1)
        for j, i in enumerate(idx):
            p, a = encoded[i]
            got = pred[j, len(p) - 1: len(p) - 1 + len(a)].tolist()
            first += int(got[0] == a[0])
            exact += int(got == a)
    return first / len(encoded), exact / len(encoded)


def lr_scale(config: TrainConfig, step: int, total: int) -> float:
    """Multiplier in [0, 1] of every parameter group's peak learning rate at optimiser step
    ``step`` (0-based) of ``total``: a pure function of the step, so a resumed run follows the
    same schedule without saving scheduler state."""
    if config.schedule == "constant":
        return 1.0
    warm = max(1, round(config.warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (example indices) of one epoch: ``randperm(n)`` from a generator seeded
    ``seed·1_000_003 + epoch``, cut into batches, a pure function of ``(seed, epoch)``.

    (Grouping batches by length was measured on the two-hop data: 5% faster per step, higher
    final loss; not used.)
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(n, generator=g).tolist()
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def _trainable(pm: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def _save_checkpoint(partial: Path, pm: Any, opt: Any, step: int, losses: list[float], ident: dict) -> None:
    from safetensors.torch import save_file

    with atomic_directory(partial) as tmp:
        save_file({n: p.detach().contiguous() for n, p in _trainable(pm).items()}, str(tmp / CKPT_WEIGHTS))
        torch.save(opt.state_dict(), tmp / CKPT_OPTIM)
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        atomic_write_text(tmp / CKPT_STATE, json.dumps({"step": step, "losses": losses, "identity": ident}))


def _load_checkpoint(partial: Path, pm: Any, opt: Any, ident: dict) -> tuple[int, list[float]] | None:
    from safetensors.torch import load_file

    try:
        state = json.loads((partial / CKPT_STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("identity") != ident:
        return None
    weights = load_file(str(partial / CKPT_WEIGHTS))
    params = _trainable(pm)
    if set(weights) != set(params):
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt.load_state_dict(torch.load(partial / CKPT_OPTIM, weights_only=True))
    torch.set_rng_state(load_file(str(partial / "rng.safetensors"))["torch_rng"])
    return int(state["step"]), list(state["losses"])


def _start_point(start_from: str | os.PathLike, ident: dict) -> dict:
    """What :func:`train_expert` continues from: ``{"sha256", "weights", "steps", "epochs_done"}``
    of a finished expert directory, read once (its weights in memory, so ``out_dir`` may be it)."""
    from safetensors.torch import load

    src = Path(start_from)
    ok, why = verify_manifest(src) if (src / META).is_file() else (False, f"no {META} in {src}")
    if not ok:
        raise TrainingError(f"start_from={str(src)!r} is not a finished expert: {why}")
    meta = json.loads((src / META).read_text())
    cfg = meta.get("config") or {}
    for key in ("base_model", "data_sha256"):
        if meta.get(key) != ident[key]:
            raise TrainingError(f"start_from={str(src)!r} was trained with {key} {meta.get(key)!r}, "
                                f"not this training's {ident[key]!r}")
    for key in ("r", "lora_alpha", "target_modules", "batch_size"):
        if cfg.get(key) != ident["config"].get(key):
            raise TrainingError(f"start_from={str(src)!r} has {key} = {cfg.get(key)!r}, this training "
                                f"{ident['config'].get(key)!r}: only the same LoRA shape and batches can continue")
    blob = (src / "adapter_model.safetensors").read_bytes()
    steps_per_epoch = math.ceil(int(meta["n_examples"]) / int(cfg["batch_size"]))
    return {"sha256": hashlib.sha256(blob).hexdigest(), "weights": load(blob), "steps": int(meta["steps"]),
            "epochs_done": math.ceil(int(meta["steps"]) / steps_per_epoch)}


def _load_start_weights(pm: Any, weights: dict[str, torch.Tensor], src: Any) -> None:
    """Copy a saved adapter's LoRA factors into ``pm``'s trainable ones (names as peft saves them)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(pm, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise TrainingError(f"start_from={str(src)!r}: its weights do not fit this LoRA "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def check_target_modules(hf: torch.nn.Module, target_modules: Sequence[str], label: str) -> None:
    """Refuse LoRA targets the model lacks, or fused projections the bridge bypasses.

    Args:
        hf: the Hugging Face model (real or on the meta device).
        target_modules: module leaf names (``TrainConfig.target_modules``).
        label: the model's name, for the message.

    Raises:
        TrainingError: a target no module of the model is named, listing its linear layers.
        interp.models.FusedProjectionError: a fused projection (GPT-2 ``c_attn`` and kin).
    """
    leaves = {n.rsplit(".", 1)[-1] for n, _ in hf.named_modules() if n}
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in hf.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise TrainingError(f"training.target_modules {missing} not found in {label}; its linear layers are "
                            f"named {', '.join(linear)}")
    check_fused_targets(hf, list(target_modules))


def check_training_targets(model: str, target_modules: Sequence[str]) -> None:
    """:func:`check_target_modules` on ``model``'s module tree built on the meta device (no
    weights loaded), so a run refuses bad targets before its first step; a no-op for a
    registered model that declares no config.

    Raises:
        TrainingError, interp.models.FusedProjectionError: as :func:`check_target_modules`.
    """
    skeleton = model_skeleton(model)
    if skeleton is not None:
        check_target_modules(skeleton, target_modules, model)


def train_expert(base: str | os.PathLike, examples: Sequence[tuple[str, str]], out_dir: str | os.PathLike,
                 config: TrainConfig = TrainConfig(), progress: bool = True,
                 callback: Callable[[int, float], None] | None = None,
                 device: str | torch.device = "cpu", expert: str | None = None,
                 start_from: str | os.PathLike | None = None) -> dict:
    """Train a LoRA expert on ``(prompt, answer)`` pairs and save it as a PEFT directory.

    Input text per example is ``prompt + answer`` (answers carry their own leading space, e.g.
    ``" Paris"``; EOS appended iff ``config.add_eos``); the loss is the mean next-token
    cross-entropy (nats/token) over answer tokens only.

    Args:
        base: registered model name or local HF directory (the plain HF model is trained; no bridge).
        examples: the training pairs (the data's SHA-256 is recorded).
        out_dir: output directory (written atomically; resume state lives in ``out_dir + ".partial"``).
        config: :class:`TrainConfig`.
        progress: show a tqdm bar.
        callback: called as ``callback(step, loss)`` after every step (raising aborts training;
            a later call resumes from the last checkpoint).
        device: torch device to train on (``"cpu"``, ``"cuda"``, ``"cuda:N"``; checked by
            :func:`interp.hardware.check_device`); the frozen base is fp32, or bf16 with
            ``precision="bf16"``; LoRA factors and optimiser state stay fp32 (peft's default).
        expert: the expert's name. With ``config.init == "per_expert"`` the LoRA init is seeded
            by ``expert_init_seed(config.seed, expert)`` (the batch order keeps ``config.seed``);
            ``None`` (or ``init="shared"``): seeded by ``config.seed``, as every expert was
            before per-expert inits.
        start_from: a finished expert directory of this function (same base, data, r, α and
            targets) to continue from: its LoRA weights replace the fresh init, AdamW starts
            afresh and the learning-rate schedule (warm-up, decay) runs again over ``config``'s
            steps, a warm restart; the batch order goes on with the epochs after the ones it was
            trained for. The study's accuracy floor uses it to give an expert below the floor
            ``config.epochs`` more epochs at the cost of those epochs alone. Its adapter
            weights' SHA-256 enters the identity (``start_from`` in the metadata), so it may be
            ``out_dir`` itself: that is read once, before the first step, and replaced at the end.

    Returns:
        The metadata written to ``interp_meta.json``: ``base_model, data_sha256, n_examples,
        config, seed, init_seed, steps, final_loss, losses, train_first_token_acc, train_exact_match,
        wall_time_s, steps_per_s, resumed_from_step, packed`` (whether batches were packed). If
        ``out_dir`` is already complete (manifest verifies) with the same data hash and config, that metadata is returned without training.

    Raises:
        interp.errors.TrainingError (a ValueError): no examples, malformed examples, bad config
            values, target modules the model does not have.
        interp.models.FusedProjectionError: a fused projection is targeted.
        interp.models.ModelLoadError: unknown base.
        interp.errors.TrainingError: ``start_from`` is not a complete expert directory (manifest,
            metadata) trained on the same base and data with the same LoRA shape.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    if not examples:
        raise TrainingError("train_expert got no examples")
    bad = config.problems()
    if bad:
        raise TrainingError(f"bad TrainConfig: {'; '.join(bad)}")
    device = check_device(device)  # a GPU asked for where there is none: HardwareError, not a CPU run
    choice = choose_precision(config.precision, device)
    if choice.precision != config.precision:  # "auto" resolved: the weights depend on the choice
        config = dataclasses.replace(config, precision=choice.precision)
    out = Path(out_dir)
    data_sha = _data_sha256(examples)
    init_seed = config.init_seed(expert)
    ident = {"base_model": str(base), "data_sha256": data_sha, "config": config.identity(), "init_seed": init_seed}
    start = _start_point(start_from, ident) if start_from is not None else None
    if start is not None:
        ident["start_from"] = start["sha256"]
    keys = ("base_model", "data_sha256", "init_seed", "start_from")
    if (out / META).is_file() and verify_manifest(out)[0]:
        meta = json.loads((out / META).read_text())
        if {k: meta.get(k) for k in keys} == {k: ident.get(k) for k in keys} \
                and meta.get("config_identity") == ident["config"]:
            return meta
    t0 = time.perf_counter()
    hf, tok = load_hf(base)
    encoded = _encode(tok, examples, config.add_eos)
    pad = next(c for c in (tok.pad_token_id, tok.eos_token_id, 0) if c is not None)
    n = len(encoded)
    packing = config.packing
    if packing:  # checked on the fp32 base as loaded (on the CPU), with the first examples: with
        # rows of twice the longest, the two longest always share one, so some example is offset
        err = packing_error(hf, encoded, range(min(n, PACKING_CHECK_EXAMPLES)), pad)
        packing = err <= PACKING_ATOL
        if not packing:
            print(f"packing off for {base}: packed and padded examples differ by {err:.3g} nats "
                  f"(> {PACKING_ATOL}) in answer log-probability; batches are right-padded")
    # a checkpoint resumes only under the layout it was trained with (the check could go the
    # other way on another machine or library version)
    ident["packed"] = packing
    # bf16: the frozen base is held in bf16 (no per-step weight casts); LoRA weights, AdamW state
    # and the loss stay fp32 (peft keeps adapters in fp32), matmuls run under bf16 autocast.
    hf = hf.to(device, dtype=torch.bfloat16 if config.precision == "bf16" else None)
    check_target_modules(hf, config.target_modules, str(base))
    torch.manual_seed(init_seed)  # draws the LoRA init (A Kaiming-uniform, B = 0), then any dropout
    lcfg = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                      lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(hf, lcfg)
    pm.peft_config["default"].base_model_name_or_path = str(base)
    if start is not None:  # a warm restart: the trained factors replace the fresh init
        _load_start_weights(pm, start["weights"], start_from)
    epoch_offset = start["epochs_done"] if start is not None else 0
    if config.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=config.lr, weight_decay=config.weight_decay,
                                        loraplus_lr_ratio=config.loraplus_lr_ratio)
    else:
        opt = torch.optim.AdamW(list(_trainable(pm).values()), lr=config.lr, weight_decay=config.weight_decay)
    peak = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.total_steps(n)
    partial = Path(str(out) + ".partial")
    step, losses = 0, []
    resumed = _load_checkpoint(partial, pm, opt, ident) if partial.is_dir() else None
    if resumed:
        step, losses = resumed
    start_step = step
    pm.train()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"LoRA {out.name}")
    t_train = time.perf_counter()
    batches, batches_epoch = None, -1
    on_gpu = torch.device(device).type == "cuda"
    params = list(_trainable(pm).values())
    # the step's losses stay on the device and are read every LOSS_READ_EVERY steps (and before a
    # checkpoint or a callback), so the host queues the next steps instead of waiting on each one
    pending: list[torch.Tensor] = []

    def read_losses() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if on_gpu else t.to(device)

    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(n, config.batch_size, config.seed, epoch + epoch_offset)
            batches_epoch = epoch
        idx = batches[k]
        if packing:
            ids, pos, labels, _ = _packed_batch(encoded, idx, pad)
            mask, pos = None, to_device(pos)
        else:
            (ids, mask, labels), pos = _batch(encoded, idx, pad), None
            mask = to_device(mask)
        positions = tuple(to_device(t) for t in answer_positions(labels))
        ids, labels = to_device(ids), to_device(labels)
        for group, lr in zip(opt.param_groups, peak):
            group["lr"] = lr * lr_scale(config, step, total)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            loss = answer_loss(pm, ids, mask, labels, positions, position_ids=pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        step += 1
        pending.append(loss.detach())
        bar.update(1)
        checkpoint = bool(config.checkpoint_every and step % config.checkpoint_every == 0 and step < total)
        if checkpoint or callback is not None or len(pending) >= LOSS_READ_EVERY or step == total:
            read_losses()
        if checkpoint:
            _save_checkpoint(partial, pm, opt, step, losses, ident)
        if callback is not None:
            callback(step, losses[-1])
    read_losses()
    bar.close()
    train_s = time.perf_counter() - t_train
    pm.eval()
    if config.precision == "bf16":
        # measured as the adapter is used: on the fp32 base, not the bf16 training copy
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        fp32, _ = load_hf(base)
        trained = get_peft_model_state_dict(pm)
        del pm, hf
        pm = get_peft_model(fp32.to(device), lcfg)
        set_peft_model_state_dict(pm, trained)
        pm.peft_config["default"].base_model_name_or_path = str(base)
        pm.eval()
    first, exact = answer_accuracy(pm, encoded, pad)
    meta = {"base_model": str(base), "data_sha256": data_sha, "n_examples": n, "config": config.to_json(),
            "config_identity": ident["config"], "seed": config.seed, "init_seed": init_seed, "steps": step,
            "final_loss": losses[-1] if losses else None, "losses": losses,
            "train_first_token_acc": first, "train_exact_match": exact,
            "wall_time_s": time.perf_counter() - t0,
            "steps_per_s": (step - start_step) / train_s if train_s > 0 and step > start_step else None,
            "resumed_from_step": start_step, "precision": choice.to_json(), "packed": packing,
            "start_from": ident.get("start_from"), "start_from_steps": start["steps"] if start else None}
    with atomic_directory(out) as tmp:
        pm.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_text(tmp / META, json.dumps(meta, indent=1))
        write_manifest(tmp)
    shutil.rmtree(partial, ignore_errors=True)
    return meta
