"""Per-token routers over a library's experts: Arrow, uniform output mixture, oracle.

A router gives, at every LoRA site (see :mod:`interp.adapters.hooks`), weights
``[batch, pos, n_experts]``; the site outputs ``base(x) + Σ_e w_e · s_e B_e A_e x``. The weights
are visible (and patchable) at ``blocks.{l}.{site}.lora.hook_router``.

* :class:`ArrowRouter` — Arrow (Ostapenko et al., ICML 2024, §4 "Arrow routing"), with peft's
  exact conventions (``peft/tuners/lora/arrow.py``, 0.21.2): per site, prototype ``p_e`` = top
  right singular vector of ``B_e A_e`` (the *unscaled* product; scale does not change the
  direction) by 15 steps of power iteration on ``Aᵀ(BᵀB)A`` from ``randn(d_in)`` drawn with a
  generator seeded ``seed`` (re-seeded per site and expert; ``method="svd"`` gives the exact
  vector instead); logits ``|⟨x, p_e⟩|`` with the raw, un-normalised token ``x`` (sign-free; peft
  calls it cosine similarity but does not normalise ``x``); keep the ``top_k`` largest, softmax
  of ``logit/τ`` over those (others get weight 0). Every LoRA site is routed (peft routes every
  module the experts share).
* :class:`StaticRouter` — fixed weights per expert at every token: ``mixture`` (1/n each: the
  uniform *output* mixture, which for linear sites equals Uniform parameter averaging site by site
  but not end to end, since the layers compose non-linearly), ``weighted``, ``task_arithmetic``.
* :class:`OracleRouter` — caller-given routing (per-example adapter names or per-token weights),
  set with :func:`route_examples` / :func:`route_tokens`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from interp.adapters.hooks import LoraSite
from interp.errors import InterpError


class RoutingError(InterpError, ValueError):
    """Routing inputs do not fit the model's experts or the batch."""


class StaticRouter:
    """The same weight for each expert at every token: ``w`` ``[n_experts]`` (global expert order).

    Sites whose adapter list differs from the global order get each adapter's weight by name
    (0 for adapters not in ``experts``).
    """

    def __init__(self, experts: Sequence[str], weights: Sequence[float]):
        if len(experts) != len(weights):
            raise RoutingError(f"{len(weights)} weights for {len(experts)} experts")
        self.by_name = {e: float(w) for e, w in zip(experts, weights)}

    def weights(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([self.by_name.get(a, 0.0) for a in site.adapters], dtype=x.dtype, device=x.device)
        return w.expand(*x.shape[:-1], len(site.adapters))


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor, method: str = "power",
                              iters: int = 15, seed: int | None = 0, eps: float = 1e-8) -> torch.Tensor:
    """Top right singular vector ``[d_in]`` of ``B @ A`` (A ``[r, d_in]``, B ``[d_out, r]``).

    ``method="power"`` reproduces peft's Arrow prototype exactly (power iteration
    ``v ← Aᵀ(BᵀB)(Av) / ‖·‖`` from a seeded ``randn``, fp32); ``"svd"`` is the exact vector from
    the factored SVD (sign arbitrary).

    Raises:
        RoutingError: unknown method.
    """
    if method == "svd":
        from interp.adapters.factors import LoraDelta
        from interp.adapters.merge import factored_svd

        _, _, V = factored_svd(LoraDelta(A.detach(), B.detach(), 1.0))
        return V[:, 0].to(A.dtype)
    if method != "power":
        raise RoutingError(f"unknown prototype method {method!r} (power or svd)")
    A32, B32 = A.detach().float(), B.detach().float()
    C = B32.T @ B32
    gen = None
    if seed is not None:
        gen = torch.Generator(device=A32.device.type)
        gen.manual_seed(int(seed))
    v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = A32.T @ (C @ (A32 @ v))
        v = w / (w.norm() + eps)
    return v.to(A.dtype)


class ArrowRouter:
    """Arrow routing (Ostapenko et al. 2024) with peft's conventions (module docstring).

    Per token ``x`` ``[d_in]`` at a site with prototypes ``P`` ``[n, d_in]``:
    ``ℓ = |P x|``; ``w = softmax(ℓ_topk / τ)`` on the ``top_k`` largest, 0 elsewhere.

    Args:
        top_k: experts kept per token (≤ number of experts).
        temperature: softmax temperature τ > 0.
        seed: power-iteration seed (peft's ``ArrowConfig.rng_seed``).
        method: ``"power"`` (peft's) or ``"svd"`` (exact prototypes).
    """

    def __init__(self, top_k: int = 3, temperature: float = 1.0, seed: int | None = 0,
                 method: str = "power", iters: int = 15):
        if top_k < 1:
            raise RoutingError(f"Arrow top_k must be >= 1, got {top_k}")
        if temperature <= 0:
            raise RoutingError(f"Arrow temperature must be > 0, got {temperature}")
        self.top_k, self.temperature, self.seed, self.method, self.iters = top_k, temperature, seed, method, iters

    def prototypes(self, site: LoraSite) -> torch.Tensor:
        """Prototypes ``[n_experts, d_in]`` of a site (computed once, cached on the site)."""
        if "arrow_prototypes" not in site.cache:
            lay = site.layer
            site.cache["arrow_prototypes"] = torch.stack([
                top_right_singular_vector(lay.lora_A[a].weight, lay.lora_B[a].weight, self.method,
                                          self.iters, self.seed) for a in site.adapters])
        return site.cache["arrow_prototypes"]

    def weights(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor:
        P = self.prototypes(site).to(x.dtype)
        n = P.shape[0]
        if self.top_k > n:
            raise RoutingError(f"Arrow top_k={self.top_k} exceeds the {n} experts at {site.name}")
        sim = torch.abs(x @ P.T)  # [..., n]
        top_v, idx = torch.topk(sim, self.top_k, dim=-1)
        score = torch.full_like(sim, float("-inf")).scatter(-1, idx, top_v)
        return torch.softmax(score / self.temperature, dim=-1)


class OracleRouter:
    """Caller-given routing; weights are set per batch by :func:`route_examples` / :func:`route_tokens`.

    Outside those context managers it uses ``default`` (a :class:`StaticRouter`, or raises if None).
    """

    def __init__(self, experts: Sequence[str], default: StaticRouter | None = None):
        self.experts = list(experts)
        self.default = default
        self.current: torch.Tensor | None = None  # [batch, pos, n_experts] or [batch, 1, n]

    def weights(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            if self.default is None:
                raise RoutingError("oracle routing needs weights: use route_examples(hm, names) or "
                                   "route_tokens(hm, weights) around the forward")
            return self.default.weights(site, x)
        w = self.current.to(x.dtype).to(x.device)
        if w.shape[0] != x.shape[0] or (w.shape[1] not in (1, x.shape[1])):
            raise RoutingError(f"oracle weights {tuple(w.shape)} do not fit activations {tuple(x.shape[:-1])} "
                               "([batch, pos] of the forward)")
        cols = []
        for a in site.adapters:
            cols.append(w[..., self.experts.index(a)] if a in self.experts else torch.zeros_like(w[..., 0]))
        out = torch.stack(cols, -1)
        return out.expand(*x.shape[:-1], len(site.adapters))


def _runtime(hm: Any):
    rt = hm.info.get("lora_runtime")
    if rt is None:
        raise RoutingError(f"{hm!r} has no LoRA hooks installed (load it with interp.adapters.load_hooked)")
    return rt


@contextlib.contextmanager
def route_tokens(hm: Any, weights: torch.Tensor) -> Iterator[None]:
    """Use per-token expert weights ``[batch, pos, n_experts]`` (or ``[batch, n_experts]``) at every site.

    Expert order is ``hm.info["router_adapters"]``. Works with any combine mode that keeps the
    experts unmerged (``none``, ``uniform``, ``mixture``, ``arrow``, ``oracle`` ...): it overrides
    the router for the duration. Example (two-hop, oracle): tokens up to the end of e₁'s span →
    ``[1, 0]``, later tokens → ``[0, 1]``.

    Raises:
        RoutingError: no hooks, or the last dimension is not the number of experts.
    """
    rt = _runtime(hm)
    experts = list(hm.info["router_adapters"])
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.dim() == 2:
        w = w[:, None, :]
    if w.dim() != 3 or w.shape[-1] != len(experts):
        raise RoutingError(f"weights must be [batch, pos, {len(experts)}] for experts {experts}, "
                           f"got {tuple(w.shape)}")
    oracle = OracleRouter(experts)
    oracle.current = w
    prev = rt.override
    rt.override = oracle.weights
    try:
        yield
    finally:
        rt.override = prev


@contextlib.contextmanager
def route_examples(hm: Any, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Route each example of the batch wholly to one expert (``None`` or ``"__base__"``: no adapter).

    Raises:
        RoutingError: an unknown adapter name.
    """
    experts = list(hm.info.get("router_adapters", []))
    w = torch.zeros(len(adapter_names), 1, len(experts))
    for i, a in enumerate(adapter_names):
        if a is None or a == "__base__":
            continue
        if a not in experts:
            raise RoutingError(f"unknown adapter {a!r}; experts are {experts}")
        w[i, 0, experts.index(a)] = 1.0
    with route_tokens(hm, w):
        yield
