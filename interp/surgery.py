"""Every reach into TransformerLens, transformers or peft internals, in one module.

interp wraps PEFT LoRA layers inside a TransformerLens ``TransformerBridge`` and adds hook points
of its own; doing that needs a few names those libraries do not promise to keep. They are all
here, so a version bump has one place to look (pinned: transformer-lens 4.3.0, transformers
5.23.0, peft 0.21.2):

- TransformerLens bridge components keep the wrapped HF module as the attribute
  ``original_component``, registered as the child ``_original_component`` (so module paths read
  through a bridge carry those segments); hook points are looked up in the bridge's
  ``_hook_registry`` (``hook_dict`` reads it), and its unembedding's linear layer is
  ``bridge.unembed.original_component``.
- peft LoRA layers keep the wrapped layer as ``base_layer``; a ``PeftModel``'s HF model is
  ``base_model.model``.
- transformers model configs select their attention kernel with ``config._attn_implementation``.
- A module's ``forward`` is replaced per instance (never on the class) to insert the per-adapter
  hook points; the original bound method is kept by the replacement.
- A bridge component's hooks live on its ``HookPoint`` children; every bridge component is a
  ``GeneralizedComponent`` child of the HF module it replaced (``_modules[name]``), so putting
  ``_original_component`` back in that slot runs the HF module tree as transformers wrote it
  (:func:`bridge_bypassed`). TransformerLens wires torch hooks of its own on some components
  (``BlockBridge``'s capture hooks, functions defined in ``transformer_lens``); any other torch
  hook on a component is a caller's and keeps a forward on the bridge (:func:`bridge_hooks_in_use`).
- Bridge components for fused projections (``JointQKVAttentionBridge`` and subclasses,
  ``JointGateUpMLPBridge``) split the fused weight once, at boot, with their ``split_qkv_matrix``
  / ``split_gate_up_matrix`` callable, into plain ``nn.Linear`` copies held as the
  ``original_component`` of their ``q``/``k``/``v`` (``gate``/``in``) children, and never call the
  fused module again; the fused module is the child named ``submodules["qkv"].name`` (resp.
  ``fused_attr``) of the component's ``original_component``.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch

BRIDGE_SEGMENTS = ("_original_component", "original_component")
LORA_SEGMENT = "base_layer"
PEFT_PREFIX = "base_model.model."


def clean_module_path(name: str, drop_lora_wrapper: bool = False, drop_peft_prefix: bool = False) -> str:
    """A module path as the base HF model names it: bridge wrapper segments removed (optionally
    peft's ``base_layer`` segments and its ``base_model.model.`` prefix too).

    >>> clean_module_path("model.layers.0._original_component.self_attn.q_proj")
    'model.layers.0.self_attn.q_proj'
    """
    drop = BRIDGE_SEGMENTS + ((LORA_SEGMENT,) if drop_lora_wrapper else ())
    out = ".".join(p for p in name.split(".") if p not in drop)
    if drop_peft_prefix and out.startswith(PEFT_PREFIX):
        out = out[len(PEFT_PREFIX):]
    return out


def unwrap(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module one wrapper below ``module`` (a bridge component's HF module, or a LoRA layer's
    base layer), or ``None`` if ``module`` wraps nothing."""
    for attr in ("_original_component", LORA_SEGMENT):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def peft_inner_model(model: Any) -> Any | None:
    """The HF model inside a ``PeftModel`` (``base_model.model``), or ``None`` for a plain model."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and inner is not model else None


def register_hook_point(bridge: Any, hook_point: Any) -> None:
    """Make a ``HookPoint`` created outside the bridge visible to ``bridge.hook_dict``,
    ``run_with_hooks`` and ``run_with_cache`` under ``hook_point.name``."""
    bridge._hook_registry[hook_point.name] = hook_point


def replace_forward(module: torch.nn.Module, make: Callable[[Callable], Callable]) -> None:
    """Replace ``module.forward`` on this instance by ``make(original_bound_forward)``, bound to
    the module (the class and other instances are untouched)."""
    module.forward = types.MethodType(make(module.forward), module)


def use_eager_attention(config: Any) -> Any:
    """Select transformers' eager attention kernel on ``config`` (returned): the one the bridge's
    attention hooks (patterns, scores) see every step of."""
    config._attn_implementation = "eager"
    return config


def attention_kernels(model: torch.nn.Module) -> tuple[str, ...]:
    """The attention kernels (``config._attn_implementation``) the modules of ``model`` select, sorted."""
    return tuple(sorted({str(getattr(m.config, "_attn_implementation", None))
                         for m in model.modules() if getattr(m, "config", None) is not None}))


def unembed_linear(bridge: Any) -> torch.nn.Linear | None:
    """The bridge's unembedding as a plain ``nn.Linear`` (``W_U`` rows readable directly), or
    ``None`` when it is anything else (e.g. a LoRA layer on ``lm_head``)."""
    lin = getattr(bridge.unembed, "original_component", None)
    return lin if type(lin) is torch.nn.Linear else None


#: bridge components that split a fused projection: (split callable attribute, part names, site kind)
_SPLITTERS = (("split_qkv_matrix", ("q", "k", "v"), "attn"), ("split_gate_up_matrix", ("gate", "in"), "mlp"))


class FusedSplit:
    """One fused projection that a bridge runs as separate copies of row blocks of its weight.

    Attributes:
        kind: ``"attn"`` (fused q/k/v) or ``"mlp"`` (fused gate/up).
        attr: the fused module's attribute name in its HF parent (``c_attn``, ``qkv_proj``, …).
        fused: the module the HF model holds at the fused position (a peft LoRA layer, or the
            plain ``nn.Linear`` / ``Conv1D``).
        parts: ``[(name, linear, rows)]``: the bridge's component name (``q``, ``k``, ``v``,
            ``gate``, ``in``), the ``nn.Linear`` the bridge calls for it (weight
            ``[len(rows), d_in]``), and ``rows`` (int64 ``[d_part]``): the fused output rows it
            computes, in its output order (``part(x) == fused(x)[..., rows]`` for the base weights).
    """

    def __init__(self, kind: str, attr: str, fused: torch.nn.Module,
                 parts: list[tuple[str, torch.nn.Module, torch.Tensor]]):
        self.kind, self.attr, self.fused, self.parts = kind, attr, fused, parts


def _probe_rows(split: Callable, original: torch.nn.Module, attr: str, shape: tuple[int, ...],
                out_dim: int, parts: int) -> list[torch.Tensor] | None:
    """Run the bridge's own split callable on a stand-in whose fused weight holds, in every entry,
    the index of its output row (float64, exact): each part's rows are then read off its weight."""
    import copy

    d_out = shape[out_dim]
    idx = torch.arange(d_out, dtype=torch.float64)
    probe_lin = torch.nn.Module()
    probe_lin.weight = torch.nn.Parameter(idx.view(-1, 1).expand(shape).clone() if out_dim == 0
                                          else idx.view(1, -1).expand(shape).clone(), requires_grad=False)
    probe_lin.bias = torch.nn.Parameter(idx.clone(), requires_grad=False)
    probe = copy.copy(original)  # the other attributes as they are; its own child table
    probe.__dict__["_modules"] = dict(original._modules)
    probe._modules[attr] = probe_lin
    try:
        with torch.no_grad():
            out = split(probe)
    except Exception:  # noqa: BLE001 - a splitter that needs more than the weight: not mappable
        return None
    if len(out) != parts:
        return None
    rows = []
    for lin in out:
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
            return None
        r = w[:, 0].detach().double()
        if not (bool((w.detach().double() == r[:, None]).all()) and bool((r == r.round()).all())
                and float(r.min()) >= 0 and float(r.max()) < d_out):
            return None
        rows.append(r.long())
    return rows


def fused_splits(bridge: Any, select: Callable[[torch.nn.Module], bool] | None = None) -> list[FusedSplit]:
    """The fused projections ``bridge`` runs as split copies, with the rows each copy computes.

    The row map is read from the bridge's own split function (run once on a stand-in weight that
    encodes row indices), so any layout it implements — GPT-2's ``[q | k | v]`` columns of a
    ``Conv1D``, Phi-3's GQA sizes, GPT-NeoX's per-head interleaving ``[head, (q,k,v), d_head]``,
    Falcon's multi-query and per-head layouts — is the bridge's, not restated here.

    Args:
        bridge: a booted ``TransformerBridge``.
        select: map only the fused modules for which it returns True (e.g. peft LoRA layers);
            default all.

    Returns:
        One :class:`FusedSplit` per (selected) fused module; ``parts`` is empty when the split could
        not be mapped (a splitter that reads more than the fused weight).
    """
    out = []
    for comp in bridge.modules():
        for attr, names, kind in _SPLITTERS:
            split = getattr(comp, attr, None)
            if not callable(split):
                continue
            original = getattr(comp, "original_component", None)
            subs = getattr(comp, "submodules", {}) or {}
            fname = subs["qkv"].name if kind == "attn" and "qkv" in subs else getattr(comp, "fused_attr", None)
            fused = getattr(original, fname, None) if fname else None
            while isinstance(fused, torch.nn.Module) and isinstance(fused._modules.get(BRIDGE_SEGMENTS[0]),
                                                                    torch.nn.Module):
                fused = fused._modules[BRIDGE_SEGMENTS[0]]  # the bridge's LinearBridge around it
            if not isinstance(fused, torch.nn.Module) or (select is not None and not select(fused)):
                continue
            base = getattr(fused, LORA_SEGMENT, fused)  # a peft layer's base layer: the weight's orientation
            w = getattr(base, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            out_dim = 1 if type(base).__name__ == "Conv1D" else 0
            rows = _probe_rows(split, original, fname, tuple(w.shape), out_dim, len(names))
            linears = [getattr(getattr(comp, n, None), "original_component", None) for n in names]
            if rows is None or any(not isinstance(lin, torch.nn.Linear) for lin in linears):
                out.append(FusedSplit(kind, fname, fused, []))
                continue
            out.append(FusedSplit(kind, fname, fused, [(n, lin, r) for n, lin, r in zip(names, linears, rows)]))
    return out


def _has_hooks(m: torch.nn.Module, own: str | None = None) -> bool:
    """Whether ``m`` has a torch forward/backward hook (not counting those defined in the module
    ``own`` or below it)."""
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values(),
             *m._backward_pre_hooks.values()]
    return any(own is None or not str(getattr(h, "__module__", "")).startswith(own) for h in hooks)


def bridge_hooks_in_use(bridge: Any) -> bool:
    """Whether any hook point of ``bridge`` (its own and those interp registered) or any bridge
    component itself (a torch hook registered on ``bridge.blocks[0]``, which is also the module in
    the HF model's slot) has a forward or backward hook, or torch has a global module hook: then a
    forward must go through the bridge (:func:`bridge_bypassed` would skip those hooks). Torch hooks
    that TransformerLens wires on its own components (``BlockBridge``'s capture hooks feeding
    ``hook_resid_mid`` and kin, defined in ``transformer_lens``) are its own work, not counted."""
    from torch.nn.modules import module as nn_module
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    if any(getattr(nn_module, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                 "_global_backward_hooks", "_global_backward_pre_hooks")):
        return True
    return (any(_has_hooks(hp) for hp in bridge._hook_registry.values())
            or any(_has_hooks(m, own="transformer_lens.") for m in bridge.modules()
                   if isinstance(m, GeneralizedComponent)))


def runs_split_copies(hf_model: torch.nn.Module) -> bool:
    """Whether a bridge component of ``hf_model`` runs a fused projection as split copies (the HF
    module tree would call the fused module instead, without interp's per-copy LoRA sites)."""
    return any(hasattr(m, attr) for m in hf_model.modules() for attr, _, _ in _SPLITTERS)


@contextlib.contextmanager
def bridge_bypassed(hf_model: torch.nn.Module) -> Iterator[int]:
    """Inside the block, ``hf_model`` runs its own modules, not the ``TransformerBridge``'s
    wrappers around them: each bridge component is replaced, in its parent's slot, by the HF
    module it wraps (peft LoRA layers and interp's LoRA sites are those modules or inside them,
    so adapters still apply). The wrappers' Python work per module (hook points, device
    alignment) is skipped, which on a GPU is most of a small model's forward; no hook point
    fires. The components are put back on exit, also on an error. Yields the number replaced.

    Only for callers that checked :func:`bridge_hooks_in_use` and :func:`runs_split_copies`
    (and, as :func:`interp.evaluate.score_examples` does, that the logits are unchanged).
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    swaps = [(m, name, c) for m in hf_model.modules() if not isinstance(m, GeneralizedComponent)
             for name, c in m._modules.items()
             if isinstance(c, GeneralizedComponent) and c._modules.get("_original_component") is not None]
    try:
        for m, name, c in swaps:
            m._modules[name] = c._modules["_original_component"]
        yield len(swaps)
    finally:
        for m, name, c in reversed(swaps):
            m._modules[name] = c
