"""Adapter-aware hook points: each adapter's own contribution and the router weights, per LoRA site.

A *LoRA site* is one PEFT ``lora.Linear`` (one projection of one layer). :func:`install_lora_hooks`
replaces each site's forward by an equivalent one that computes, for every adapter ``e`` loaded
at the site (in the site's adapter order)::

    w   = hook_router(router.weights(site, x))          # [batch, pos, n_adapters]
    c_e = hook_delta_e( w[..., e] · s_e · B_e A_e x )     # [batch, pos, d_out]
    out = base_layer(x) + Σ_e c_e

and registers TransformerLens ``HookPoint`` s in the bridge, so ``bridge.run_with_cache``,
``run_with_hooks`` and ``bridge.hooks`` see them:

* ``blocks.{l}.{site}.lora.{adapter}.hook_delta`` — ``[batch, pos, d_out]``: adapter's
  contribution to the projection's output, *router weight included* (``w_e·s_e·B_e·A_e·x``; with
  one active adapter and no router this is exactly ``s·B·A·x``). The contributions at a site sum to
  adapted output − base output; zeroing one removes that adapter at that site.
* ``blocks.{l}.{site}.lora.hook_router`` — ``[batch, pos, n_adapters]``: the weight of each
  adapter at each token (order: :attr:`LoraSite.adapters`, also ``hm.info["router_adapters"]``).

``{site}`` follows the bridge's own component names: ``attn.q``, ``attn.k``, ``attn.v``,
``attn.o``, ``mlp.gate``, ``mlp.in`` (``up_proj``), ``mlp.out`` (``down_proj``); other projections
use their module name. Adapters with weight exactly 0 everywhere (inactive) are skipped: their
``hook_delta`` does not fire.

With one active adapter and ``router=None`` the arithmetic is PEFT's own (``result + B(A(x))·s``,
``lora_B``'s bias included with ``lora_bias``; a DoRA adapter's contribution is computed by peft's
own ``DoraLinearVariant.forward``), so logits equal PEFT's forward. GPT-2 ``Conv1D`` sites and
``.h.N.`` layer paths (GPT-2, Falcon) are supported.

Fused projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX / Falcon
``query_key_value``): the bridge never calls the fused module; at boot it copies row blocks of its
weight into separate ``q``, ``k``, ``v`` (``gate``, ``in``) ``nn.Linear`` s and calls those. A LoRA on
the fused layer therefore becomes one site per copy, run by that copy, adding the copy's rows of
the update: ``s·B[rows]·A·x`` (+ ``s·b_B[rows]``; DoRA's ``m/‖W₀+sBA‖`` is row by row, so peft's DoRA
arithmetic on those rows). ``rows`` are read off the bridge's own split function
(:func:`interp.surgery.fused_splits`: GPT-NeoX's per-head ``[head, (q,k,v), d_head]`` interleaving,
Falcon's multi-query layout, Phi-3's GQA sizes, GPT-2's transposed ``Conv1D``) and checked against
the copies' weights at install. Hook points: ``blocks.{l}.attn.q.lora.{adapter}.hook_delta``,
``…attn.k…``, ``…attn.v…``, ``blocks.{l}.mlp.gate…`` / ``mlp.in…`` (and one ``hook_router`` per copy,
all with the same weights). Arrow prototypes are the whole fused ``B·A``'s, as in peft.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Iterator, Protocol

import torch

from interp.errors import AdapterError
from interp.surgery import clean_module_path, fused_splits, register_hook_point, replace_forward

SITE_NAMES = {
    "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
    "gate_proj": "mlp.gate", "up_proj": "mlp.in", "down_proj": "mlp.out",
}
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class Router(Protocol):
    """Gives per-token adapter weights at a site (see :mod:`interp.adapters.route`)."""

    def weights(self, site: "LoraSite", x: torch.Tensor) -> torch.Tensor:  # [batch, pos, n]
        ...


def check_adapter_name(name: str) -> str:
    """Adapter names become hook-name components: letters, digits, ``_`` and ``-`` only.

    Raises:
        AdapterError: any other character (a dot would break hook names).
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise AdapterError(f"adapter name {name!r} must match [A-Za-z0-9_-]+ (it becomes part of hook names)")
    return name


def site_name(module_path: str) -> str:
    """Bridge-style site name of a module path: ``model.layers.3.self_attn.q_proj`` -> ``blocks.3.attn.q``.

    Layers are found as ``.layers.N.`` (Llama, Qwen2, Gemma2, Phi-3, GPT-NeoX), ``.h.N.`` (GPT-2,
    Falcon) or ``.blocks.N.``. Projections outside :data:`SITE_NAMES` keep their parent's name, so
    GPT-2's two ``c_proj`` stay apart: ``transformer.h.0.attn.c_proj`` -> ``blocks.0.attn.c_proj``.

    Raises:
        AdapterError: the path has no layer index (LoRA on ``lm_head`` or another module outside
            the transformer layers, which the hooked runtime does not run).
    """
    from interp.adapters.factors import layer_of

    layer = layer_of(module_path)
    if layer is None:
        raise AdapterError(f"LoRA target {module_path!r} is outside the transformer layers (no .layers.N. / .h.N. / "
                           ".blocks.N. in its path; e.g. lm_head): interp hooks LoRA only inside transformer "
                           "layers. Save the adapter without that target, or use combine='merge_and_unload'")
    parent, _, proj = module_path.rpartition(".")
    if proj in SITE_NAMES:
        return f"blocks.{layer}.{SITE_NAMES[proj]}"
    parent = parent.rpartition(".")[2]
    return f"blocks.{layer}.{proj}" if parent.isdigit() else f"blocks.{layer}.{parent}.{proj}"


def delta_hook_name(module_path: str, adapter: str) -> str:
    """``blocks.{l}.{site}.lora.{adapter}.hook_delta`` for a module path and adapter name."""
    return f"{site_name(module_path)}.lora.{adapter}.hook_delta"


def router_hook_name(module_path: str) -> str:
    """``blocks.{l}.{site}.lora.hook_router`` for a module path."""
    return f"{site_name(module_path)}.lora.hook_router"


@dataclasses.dataclass
class LoraSite:
    """One PEFT ``lora.Linear`` with its hook points.

    Attributes:
        module_path: path in the base model (``model.layers.0.self_attn.q_proj``).
        name: bridge-style site name (``blocks.0.attn.q``).
        layer: the PEFT ``lora.Linear`` module.
        adapters: adapter names at this site, in router order.
        hook_delta: adapter -> ``HookPoint`` of its contribution.
        hook_router: ``HookPoint`` of the router weights.
        cache: free slot for routers (e.g. Arrow prototypes ``[n, d_in]``).
        rows: for one part of a fused projection the bridge splits (see :func:`install_lora_hooks`):
            the fused output rows it computes (int64 ``[d_part]``); ``None`` for a whole layer.
        part: the bridge's ``nn.Linear`` copy of those rows, which runs the site; ``None`` for a
            whole layer (then ``layer.base_layer`` does).
    """

    module_path: str
    name: str
    layer: Any
    adapters: list[str]
    hook_delta: dict[str, Any]
    hook_router: Any
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: torch.Tensor | None = None
    part: Any = None

    @property
    def base(self) -> Any:
        """The module whose weight the site's forward multiplies (the split copy, or the base layer)."""
        return self.part if self.part is not None else self.layer.base_layer


class LoraRuntime:
    """The installed sites and the current router of one hooked model.

    ``router=None`` means "PEFT's active adapters at weight 1" (``set_adapter`` is honoured).
    Set :attr:`override` (a callable ``(site, x) -> [batch, pos, n]``) to take precedence over
    any router (used by :func:`interp.adapters.route.route_tokens`).
    """

    def __init__(self, sites: list[LoraSite], router: Router | None = None):
        self.sites = sites
        self.router = router
        self.override: Callable[[LoraSite, torch.Tensor], torch.Tensor] | None = None
        self.folded = False  # set by fold_static_update: sites pass straight to their base layer

    def weights(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor | None:
        if self.override is not None:
            return self.override(site, x)
        if self.router is not None:
            return self.router.weights(site, x)
        return None

    def hook_names(self) -> list[str]:
        out = []
        for s in self.sites:
            out += [h.name for h in s.hook_delta.values()] + [s.hook_router.name]
        return out


def _active_weights(site: LoraSite, x: torch.Tensor) -> torch.Tensor:
    active = set(site.layer.active_adapters)
    w = torch.tensor([1.0 if a in active else 0.0 for a in site.adapters], dtype=x.dtype, device=x.device)
    return w.expand(*x.shape[:-1], len(site.adapters))


def _contribution(site: LoraSite, a: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """Adapter ``a``'s own (unrouted) change of the site's output: peft's arithmetic, on the site's rows."""
    layer = site.layer
    lora_A, lora_B = layer.lora_A[a], layer.lora_B[a]
    xa = layer._cast_input_dtype(x, lora_A.weight.dtype)
    s = layer.scaling[a]
    if site.rows is None:
        if a in layer.lora_variant:  # DoRA (the only variant load_hooked admits): peft's own arithmetic,
            # on the base output alone so each adapter's contribution is its own (m/‖W+sBA‖)(W+sBA)x − Wx
            base = base_out.to(lora_A.weight.dtype)
            return layer.lora_variant[a].forward(layer, active_adapter=a, x=xa, result=base) - base
        return lora_B(lora_A(layer.lora_dropout[a](xa))) * s
    # one part of a fused projection: the rows of B (and of lora_B's bias) that produce its outputs
    rows = site.rows
    Bw = lora_B.weight[rows]
    Bb = None if lora_B.bias is None else lora_B.bias[rows]
    lora = torch.nn.functional.linear(lora_A(layer.lora_dropout[a](xa)), Bw, Bb)
    if a not in layer.lora_variant:
        return lora * s
    # DoRA is row-local: peft's DoraLinearLayer.forward (eval) restricted to these rows, W₀ the part's copy
    W = site.part.weight.to(xa.dtype)
    eye = torch.eye(lora_A.weight.shape[1], dtype=lora_A.weight.dtype, device=lora_A.weight.device)
    lora_weight = torch.nn.functional.linear(lora_A(eye), Bw, Bb).T.to(xa.dtype)
    norm = torch.linalg.norm(W + s * lora_weight, dim=1).detach()
    mag = (layer.lora_magnitude_vector[a].weight[rows] / norm).view(1, -1)
    base = base_out.to(xa.dtype)
    if site.part.bias is not None:
        base = base - site.part.bias
    return (mag - 1) * base + mag * lora * s


def _add_contributions(site: LoraSite, runtime: LoraRuntime, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result + Σ_e hook_delta_e(w_e · c_e)`` with ``w = hook_router(router weights)``."""
    if runtime.folded:  # the update already sits in the base weight (and its bias change here)
        fb = site.cache.get("folded_bias")
        return result if fb is None else result + fb.to(result.dtype)
    w = runtime.weights(site, x)
    static_active = w is None
    if static_active:
        w = _active_weights(site, x)
    if w.shape != (*x.shape[:-1], len(site.adapters)):
        raise ValueError(f"router weights at {site.name} have shape {tuple(w.shape)}, expected "
                         f"{(*x.shape[:-1], len(site.adapters))} ([batch, pos, n_adapters])")
    w = site.hook_router(w)
    base_out = result
    for i, a in enumerate(site.adapters):
        wi = w[..., i:i + 1]
        if not bool((wi != 0).any()):
            continue
        d = _contribution(site, a, x, base_out)
        if not (static_active and bool((wi == 1).all())):
            d = wi.to(d.dtype) * d
        result = result + site.hook_delta[a](d).to(result.dtype)
    return result


def _make_forward(site: LoraSite, runtime: LoraRuntime, original: Callable) -> Callable:
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged
                or getattr(self, "lora_arrow", None)):
            return original(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        return _add_contributions(site, runtime, x, self.base_layer(x, *args, **kwargs))

    return forward


def _make_part_forward(site: LoraSite, runtime: LoraRuntime, original: Callable) -> Callable:
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = site.layer
        if layer.merged or getattr(layer, "lora_arrow", None):
            # peft's merge_adapter writes into the fused weight, which the bridge copied (or viewed) at boot;
            # peft's own Arrow layer routes the fused output as a whole
            from interp.models import FusedProjectionError

            raise FusedProjectionError(
                f"{site.module_path}: adapters merged by peft (merge_adapter) or routed by peft's Arrow layer on a "
                f"fused projection that the bridge runs as split copies ({site.name}); unmerge them (or use "
                "fold_static_update), and route with load_hooked(..., combine='arrow')")
        result = original(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        return _add_contributions(site, runtime, x, result)

    return forward


def install_lora_hooks(peft_inner_model: Any, bridge: Any, router: Router | None = None,
                       adapters: list[str] | None = None) -> LoraRuntime:
    """Wrap every PEFT ``lora.Linear`` of a (bridged) PEFT model and register its hook points.

    Call after ``interp.models.bridge_model(pm.base_model.model, ...)``. Module paths are read
    with the bridge's ``_original_component`` segments removed. A LoRA layer on a fused projection
    that the bridge splits gets one site per split copy (module docstring).

    Args:
        peft_inner_model: ``peft_model.base_model.model`` (the HF model with LoRA layers).
        bridge: the ``TransformerBridge`` wrapping it; hook points join ``bridge.hook_dict``.
        router: weights per token (``None``: PEFT's active adapters at weight 1).
        adapters: adapter order at every site (default: all adapters of the layer, load order;
            PEFT's internal ``arrow_router`` is never included).

    Returns:
        The :class:`LoraRuntime` (its ``router`` / ``override`` can be changed later).

    Raises:
        ValueError: an adapter name unusable in a hook name; no LoRA layers found.
        interp.models.FusedProjectionError: a LoRA on a fused projection whose split copies the
            bridge does not build as row blocks of the base weight (checked exactly).
    """
    from peft.tuners.lora import Linear as LoraLinear
    from transformer_lens.hook_points import HookPoint

    runtime = LoraRuntime([], router)
    splits = {id(fs.fused): fs for fs in fused_splits(bridge, lambda m: isinstance(m, LoraLinear))}
    paths: dict[int, list[str]] = {}
    for name, mod in peft_inner_model.named_modules(remove_duplicate=False):
        if isinstance(mod, LoraLinear):
            paths.setdefault(id(mod), []).append(clean_module_path(name))

    def add_site(path: str, name: str, mod: Any, names: list[str], **part: Any) -> LoraSite:
        hooks = {}
        for a in names:
            hp = HookPoint()
            hp.name = f"{name}.lora.{a}.hook_delta"
            hooks[a] = hp
        rp = HookPoint()
        rp.name = f"{name}.lora.hook_router"
        site = LoraSite(path, name, mod, names, hooks, rp, **part)
        runtime.sites.append(site)
        for hp in [*hooks.values(), rp]:
            register_hook_point(bridge, hp)
        return site

    for name, mod in peft_inner_model.named_modules():
        if not isinstance(mod, LoraLinear) or hasattr(mod, "_interp_site"):
            continue
        names = [a for a in (adapters or list(mod.lora_A.keys())) if a in mod.lora_A and a != "arrow_router"]
        for a in names:
            check_adapter_name(a)
        fs = splits.get(id(mod))
        if fs is None:
            path = clean_module_path(name)
            site = add_site(path, site_name(path), mod, names)
            mod._interp_site = site
            replace_forward(mod, lambda orig, site=site: _make_forward(site, runtime, orig))
            continue
        # a fused projection the bridge runs as split copies: one site per copy, on its rows of B
        path = next((p for p in paths[id(mod)] if p.endswith("." + fs.attr)), clean_module_path(name))
        _check_split(path, mod, fs)
        block = site_name(path).split(".")[1]  # the layer index (site_name refuses paths without one)
        dev = mod.base_layer.weight.device
        mod._interp_site = [add_site(path, f"blocks.{block}.{fs.kind}.{part_name}", mod, names, rows=rows.to(dev),
                                     part=lin) for part_name, lin, rows in fs.parts]
        for site in mod._interp_site:
            replace_forward(site.part, lambda orig, site=site: _make_part_forward(site, runtime, orig))
        # what runs this layer (and the base layer's input) in the bridge: assert_lora_reached, module_inputs
        mod._interp_parts = mod.base_layer._interp_parts = [site.part for site in mod._interp_site]
    if not runtime.sites:
        raise ValueError("no PEFT LoRA layers found to hook")
    return runtime


def _check_split(path: str, layer: Any, fs: Any) -> None:
    """Refuse a fused LoRA layer whose split copies are not exactly its base weight's row blocks."""
    from interp.models import FusedProjectionError

    if not fs.parts:
        raise FusedProjectionError(
            f"LoRA on the fused projection {path!r}: the bridge splits it with a function whose row layout "
            "could not be read, so the adapter cannot be applied to the split copies exactly. Use "
            "combine='merge_and_unload' or target other modules")
    W = layer.base_layer.weight
    W = W.T if getattr(layer, "fan_in_fan_out", False) else W
    b = layer.base_layer.bias
    for part_name, lin, rows in fs.parts:
        r = rows.to(W.device)
        same = torch.equal(lin.weight, W[r]) and ((lin.bias is None and b is None) or (
            lin.bias is not None and b is not None and torch.equal(lin.bias, b[r])))
        if not same:
            raise FusedProjectionError(
                f"LoRA on the fused projection {path!r}: the bridge's split copy {part_name!r} is not the base "
                "weight's rows it should compute, so the adapter cannot be applied to it exactly. Use "
                "combine='merge_and_unload' or target other modules")


@contextlib.contextmanager
def fold_static_update(hm: Any) -> Iterator[bool]:
    """Inside the block, a hooked model with a *static* LoRA update runs at the base model's cost.

    Each LoRA site's update ``ΔW = Σ_e w_e · s_e · B_e A_e`` (``w`` from a
    :class:`~interp.adapters.route.StaticRouter`, i.e. Uniform / weighted / task arithmetic /
    mixture, or PEFT's active adapters at weight 1: single experts, TIES, DARE, SVD and peft
    merges) is added to the site's ``base_layer.weight`` — a new tensor, so the original is put
    back bit for bit on exit (kept in host memory meanwhile when GPU memory is short) — and the site passes straight to its base layer. The forward equals
    the unfolded one up to float32 rounding (``(W + ΔW)x`` vs ``Wx + ΔWx``; tested), without the
    ``2·n_adapters`` extra matmuls per site: on SmolLM2 the Uniform merge of two experts scores
    prompts 1.5x faster. This is peft's ``merge_adapter`` done reversibly.

    Nothing is folded (the block runs the model unchanged and the context yields ``False``) when
    the update depends on the input or cannot be folded exactly: no adapters, an input-dependent
    router (Arrow, oracle) or ``runtime.override`` (``route_tokens``), the model in training mode
    (LoRA dropout), adapters disabled or merged by peft, or base weights that are not
    float32/float64 (folding into bf16 would round ΔW away). Adapter hook points (``hook_delta``, ``hook_router``) do not fire while folded; use
    it for evaluation and residual-stream analyses, not for per-adapter attributions.

    Yields:
        ``True`` if the update was folded.

    Raises:
        RuntimeError: nested use on the same model.
    """
    from interp.adapters.route import StaticRouter

    runtime = (getattr(hm, "info", None) or {}).get("lora_runtime")
    foldable = (runtime is not None and getattr(hm, "peft_model", None) is not None
                and runtime.override is None and (runtime.router is None or isinstance(runtime.router, StaticRouter))
                and not hm.hf_model.training
                and not any(s.layer.disable_adapters or s.layer.merged for s in runtime.sites))
    if foldable and runtime.folded:
        raise RuntimeError("fold_static_update is already active on this model")
    if foldable:
        foldable = all(s.base.weight.dtype in (torch.float32, torch.float64) for s in runtime.sites)
    if not foldable:
        yield False
        return
    from interp.adapters.factors import LoraDelta

    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    park = _park_originals_on_host([s.base.weight for s in runtime.sites])
    try:
        with torch.no_grad():
            for site in runtime.sites:
                layer, W = site.layer, site.base.weight  # a split copy's weight for a part of a fused projection
                # the weights the forward itself would use: any token gives them (static router)
                x0 = torch.zeros(1, W.shape[1], dtype=W.dtype, device=W.device)
                w = runtime.weights(site, x0)
                w = (_active_weights(site, x0) if w is None else w)[0].tolist()
                # GPT-2 Conv1D: W is [d_in, d_out] (the bridge's split copies are nn.Linear)
                conv1d = site.part is None and bool(getattr(layer, "fan_in_fan_out", False))
                W0 = W.data.double().T if conv1d else W.data.double()
                delta = torch.zeros(W0.shape, dtype=torch.float64, device=W.device)
                bias = torch.zeros(W0.shape[0], dtype=torch.float64, device=W.device)
                for a, wa in zip(site.adapters, w):
                    if wa != 0.0:
                        dw, db = site_update(layer, a, W0, site.rows)
                        delta += wa * dw
                        if db is not None:
                            bias += wa * db
                saved.append((W, W.data.to("cpu") if park else W.data))
                W.data = (W0 + delta).T.to(W.dtype) if conv1d else (W0 + delta).to(W.dtype)
                if bool((bias != 0).any()):  # added by the folded forward: the base layer may have no bias
                    site.cache["folded_bias"] = bias.to(W.dtype)
        runtime.folded = True
        yield True
    finally:
        runtime.folded = False
        for W, original in saved:
            W.data = original if original.device == W.device else original.to(W.device)
        for site in (runtime.sites if runtime is not None else []):
            site.cache.pop("folded_bias", None)


def _park_originals_on_host(weights: list[torch.Tensor]) -> bool:
    """Whether folding must keep the original weights in host memory: on a GPU whose free memory
    is under twice their size (a second copy would not fit with room to run). Otherwise they stay
    where they are: a host round trip of an 8B model's weights costs ~20 s on an H200 (measured)."""
    dev = weights[0].device if weights else torch.device("cpu")
    if dev.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(dev)
    return free < 2 * sum(w.numel() * w.element_size() for w in weights)


def site_update(layer: Any, adapter: str, W0: torch.Tensor,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One adapter's exact update ``(ΔW [d_out, d_in], Δb [d_out] or None)`` at a peft ``lora.Linear``,
    in float64, given the base weight ``W0`` ``[d_out, d_in]`` (float64, unmerged).

    Plain LoRA: ``ΔW = s·B·A``, ``Δb = s·b_B`` with ``lora_bias``. DoRA (peft's ``DoraLinearLayer``):
    ``ΔW = (m/‖W0 + s·B·A‖_row)·(W0 + s·B·A) − W0`` and the same ``Δb`` (DoRA leaves the bias alone).
    With ``rows`` (int64 ``[d_part]``, a split part of a fused projection), only those output rows:
    ``B``, ``b_B`` and ``m`` are restricted to them and ``W0`` is ``[d_part, d_in]`` (both formulas
    are row by row, so this is exactly the rows of the whole layer's update).
    """
    from interp.adapters.factors import LoraDelta

    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    b = layer.lora_B[adapter].bias
    if rows is not None:
        B = B[rows]
        b = None if b is None else b[rows]
    s = float(layer.scaling[adapter])
    dw = LoraDelta(A, B, s).dense()
    db = None if b is None else s * b.detach().double()
    if adapter in getattr(layer, "lora_magnitude_vector", {}):
        m = layer.lora_magnitude_vector[adapter].weight.detach().double()
        m = m if rows is None else m[rows]
        merged = W0 + dw
        # peft computes the norm in the weight's dtype (float32) and detaches it
        norm = torch.linalg.norm((W0.float() + (s * (B.float() @ A.float()))), dim=1).double()
        dw = (m / norm)[:, None] * merged - W0
    return dw, db
