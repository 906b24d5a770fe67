"""Theory checks: the one-layer key-value model of Chen et al. and the Zeng & Lee rank bound.

**Key-value model** (Chen, Hoang, Hahn, Sarfraz 2025, arXiv 2506.13479, §theory / Prop. 1 and
Thm. 2 of Chen et al. 2025, arXiv 2506.13479; following the associative-memory
view of Nichani et al. 2024). A prompt "X REL" has the MLP key

    v(x, rel) = ReLU(U·V·e_x + U·e_rel) ∈ R^m

and the model outputs scores W·v ∈ R^N over N entities, read out by argmax over the one-hot entity
codes i_y. A LoRA on W that rewrites one fact (x, rel): y_old → y_new is the rank-one

    ΔW = (i_new − i_old) vᵀ / ‖v‖²                                   (Prop. 1)

**Two-hop query (our explicit choice; the digest is cut off).** For the composed prompt
"X REL1 REL2" we use the key v_q = ReLU(U·V·e_x + U·e_rel1 + U·e_rel2) (``mode="sum"``: each
relation token adds its embedding to the MLP input as in the one-hop key). ``mode="last"`` uses
ReLU(U·V·e_x + U·e_rel2) ("X REL2", the second relation asked of X). The composed answer is
r2(r1(x)) after both edits. Thm. 2 says the sum of the A→B and B→C edits does not produce it:
the sum acts linearly on v_q, so C's score gain, ⟨v(B, r2), v_q⟩/‖v(B, r2)‖², does not depend on
the bridge B that the first edit installed (:func:`two_hop_trials` records this). With the
defaults and ``mode="sum"``, the summed edits output the bridge B on ~80% of random triples and C
on ~18% (by the key overlap of v_q with v(B, r2), not through B); tests assert the C rate < 0.3.

Dimensions (defaults of :func:`build_kv_model`): N = 32 entities, 2 relations, embedding d = 64,
MLP width m = 256; entity/relation embeddings ~ N(0, 1/d), U ~ N(0, 1), V ~ N(0, 1/d); each
(x, rel) has a seeded uniform random answer; W = T K⁺ is the minimum-norm linear memory that maps
each stored key exactly to its one-hot answer (exact while #facts ≤ m). Everything is float64.

**Zeng & Lee** (ICLR 2024, arXiv 2310.17513): for frozen square layers
W_1 … W_L and a linear target W̄, the best error of rank-≤R updates in the spectral norm is
min ‖∏(W_l + ΔW_l) − W̄‖₂ = σ_{RL+1}(E), E = W̄ − ∏W_l; the constructive ΔW_l follow the authors'
``helper.our_construction``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import pandas as pd
import torch

from interp.adapters.factors import LoraDelta, layer_of, short_module
from interp import subspace
from interp.errors import InterpError

DTYPE = torch.float64


class TheoryError(InterpError, ValueError):
    """Bad arguments to a theory construction (indices, shapes, ranks)."""


# --------------------------------------------------------------------------------------------
# The one-layer key-value model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KeyValueModel:
    """One-layer key-value memory: scores = W · ReLU(U V e_x + U e_rel).

    Attributes:
        entity_emb: ``[N, d]`` entity embeddings e_x (rows).
        relation_emb: ``[n_rel, d]`` relation embeddings e_rel.
        U: ``[m, d]`` MLP input matrix.
        V: ``[d, d]`` value matrix applied to the entity embedding.
        W: ``[N, m]`` MLP output matrix (the matrix LoRA adapts).
        facts: ``[N, n_rel]`` long, the stored answer y of each (x, rel).
    """

    entity_emb: torch.Tensor
    relation_emb: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    W: torch.Tensor
    facts: torch.Tensor

    @property
    def n_entities(self) -> int:
        return int(self.entity_emb.shape[0])

    @property
    def n_relations(self) -> int:
        return int(self.relation_emb.shape[0])

    @property
    def width(self) -> int:
        return int(self.U.shape[0])

    def _check(self, x: int, rel: int) -> None:
        if not 0 <= x < self.n_entities:
            raise TheoryError(f"entity {x} outside [0, {self.n_entities})")
        if not 0 <= rel < self.n_relations:
            raise TheoryError(f"relation {rel} outside [0, {self.n_relations})")

    def key(self, x: int, rel: int) -> torch.Tensor:
        """MLP key v = ReLU(U V e_x + U e_rel) of the prompt "x rel", ``[m]``."""
        self._check(x, rel)
        return torch.relu(self.U @ (self.V @ self.entity_emb[x]) + self.U @ self.relation_emb[rel])

    def two_hop_key(self, x: int, r1: int, r2: int, mode: str = "sum") -> torch.Tensor:
        """Key of the composed prompt "x r1 r2" (module docstring: ``"sum"`` or ``"last"``), ``[m]``.

        Raises:
            TheoryError: bad indices or mode.
        """
        self._check(x, r1)
        self._check(x, r2)
        h = self.U @ (self.V @ self.entity_emb[x])
        if mode == "sum":
            return torch.relu(h + self.U @ self.relation_emb[r1] + self.U @ self.relation_emb[r2])
        if mode == "last":
            return torch.relu(h + self.U @ self.relation_emb[r2])
        raise TheoryError(f"two_hop_key: mode must be 'sum' or 'last', got {mode!r}")

    def keys(self) -> torch.Tensor:
        """All stored keys ``[N·n_rel, m]``, row x·n_rel + rel."""
        return torch.stack([self.key(x, r) for x in range(self.n_entities) for r in range(self.n_relations)])

    def scores(self, v: torch.Tensor, delta_W: torch.Tensor | None = None) -> torch.Tensor:
        """(W + ΔW) v: ``[N]`` for a key ``[m]`` (or ``[k, N]`` for keys ``[k, m]``)."""
        W = self.W if delta_W is None else self.W + delta_W
        return v @ W.T

    def answers(self, delta_W: torch.Tensor | None = None) -> torch.Tensor:
        """Argmax answer of every stored prompt, ``[N, n_rel]`` long."""
        return self.scores(self.keys(), delta_W).argmax(-1).reshape(self.n_entities, self.n_relations)


def build_kv_model(n_entities: int = 32, n_relations: int = 2, d: int = 64, width: int = 256,
                   seed: int = 0) -> KeyValueModel:
    """A seeded key-value model storing one random answer per (entity, relation).

    W = T K⁺ (T ``[N, F]`` one-hot answers, K ``[m, F]`` keys, F = N·n_rel facts): the
    minimum-norm linear associative memory with W k_f = i_{y_f} exactly.

    Raises:
        TheoryError: non-positive sizes, or more facts than the MLP width (W could not store them).
    """
    if min(n_entities, n_relations, d, width) < 1:
        raise TheoryError("build_kv_model: all sizes must be >= 1")
    if n_entities * n_relations > width:
        raise TheoryError(f"build_kv_model: {n_entities * n_relations} facts exceed the MLP width {width}")
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n_entities, d, generator=g, dtype=DTYPE) / math.sqrt(d)
    R = torch.randn(n_relations, d, generator=g, dtype=DTYPE) / math.sqrt(d)
    U = torch.randn(width, d, generator=g, dtype=DTYPE)
    V = torch.randn(d, d, generator=g, dtype=DTYPE) / math.sqrt(d)
    facts = torch.randint(0, n_entities, (n_entities, n_relations), generator=g)
    model = KeyValueModel(E, R, U, V, torch.zeros(n_entities, width, dtype=DTYPE), facts)
    K = model.keys().T                                        # [m, F]
    T = torch.nn.functional.one_hot(facts.flatten(), n_entities).to(DTYPE).T   # [N, F]
    model.W = T @ torch.linalg.pinv(K)
    if not torch.equal(model.answers(), facts):
        raise TheoryError("build_kv_model: keys are degenerate, the facts could not be stored; change the seed")
    return model


def rank_one_edit(model: KeyValueModel, x: int, rel: int, new_target: int) -> torch.Tensor:
    """Chen et al.'s Prop. 1 edit ΔW = (i_new − i_old) vᵀ / ‖v‖², v = key(x, rel).

    (W + ΔW) v = W v + i_new − i_old, so with the exact memory the prompt now scores i_new.

    Returns:
        ΔW ``[N, m]`` (rank one).

    Raises:
        TheoryError: bad indices, or new_target equal to the stored answer.
    """
    model._check(x, rel)
    if not 0 <= new_target < model.n_entities:
        raise TheoryError(f"new_target {new_target} outside [0, {model.n_entities})")
    old = int(model.facts[x, rel])
    if old == new_target:
        raise TheoryError(f"fact ({x}, {rel}) already answers {new_target}")
    v = model.key(x, rel)
    delta = torch.zeros(model.n_entities, dtype=DTYPE)
    delta[new_target] += 1
    delta[old] -= 1
    return torch.outer(delta, v) / (v @ v)


def edit_report(model: KeyValueModel, delta_W: torch.Tensor, x: int, rel: int, new_target: int) -> dict:
    """Does ΔW flip fact (x, rel) to new_target, and which other stored facts does it change?

    Returns:
        ``{"flipped": bool, "n_disturbed": int, "disturbed": [(x', rel'), ...]}`` over the other
        N·n_rel − 1 stored facts.
    """
    before, after = model.facts, model.answers(delta_W)
    changed = (after != before)
    changed[x, rel] = False
    return dict(flipped=bool(after[x, rel] == new_target), n_disturbed=int(changed.sum()),
                disturbed=[tuple(map(int, p)) for p in changed.nonzero()])


def _edit_factors(model: KeyValueModel, v: torch.Tensor, old: int, new: int) -> LoraDelta:
    """Prop. 1's edit for key v as LoRA factors: B = i_new − i_old ``[N, 1]``, A = vᵀ/‖v‖² ``[1, m]``."""
    d = torch.zeros(model.n_entities, dtype=DTYPE)
    d[new] += 1
    d[old] -= 1
    return LoraDelta((v / (v @ v))[None, :].clone(), d[:, None], 1.0)


def two_hop_trials(model: KeyValueModel, n_trials: int = 50, r1: int = 0, r2: int = 1,
                   mode: str = "sum", seed: int = 0) -> pd.DataFrame:
    """Sum the A→B (relation r1) and B→C (relation r2) edits and ask the two-hop query.

    For each trial, distinct entities (a, b, c) are drawn (seeded) with facts[a, r1] ≠ b and
    facts[b, r2] ≠ c; ΔW_sum = ΔW(a, r1 → b) + ΔW(b, r2 → c). Columns:

    ``a, b, c``; ``hop1_ok`` / ``hop2_ok``: the summed update answers each one-hop prompt;
    ``answer``: argmax on the two-hop key under ΔW_sum; ``answers_c`` (the composed answer),
    ``answers_b`` (the bridge, i.e. only the first hop); ``c_gain``: C's score gain on v_q under
    ΔW_sum; ``c_gain_other_bridge``: the same with the first edit installing another bridge b' —
    equal to ``c_gain`` (the sum cannot route through B); ``oracle_span_deficit``: span deficit of the composing rank-one edit ΔW(v_q → c) with respect to the two edits.

    Raises:
        TheoryError: bad relations or fewer than 4 entities.
    """
    model._check(0, r1)
    model._check(0, r2)
    if model.n_entities < 4:
        raise TheoryError("two_hop_trials: needs at least 4 entities")
    g = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < n_trials:
        a, b, c, b2 = torch.randperm(model.n_entities, generator=g)[:4].tolist()
        if model.facts[a, r1] in (b, b2) or model.facts[b, r2] == c:
            continue
        e1, e2 = rank_one_edit(model, a, r1, b), rank_one_edit(model, b, r2, c)
        dW = e1 + e2
        vq = model.two_hop_key(a, r1, r2, mode)
        s = model.scores(vq, dW)
        base = model.scores(vq)
        s_other = model.scores(vq, rank_one_edit(model, a, r1, b2) + e2)
        # the composing edit (an "oracle" keyed on the two-hop prompt itself, target c)
        old_q = int(base.argmax())
        oracle = None if old_q == c else _edit_factors(model, vq, old_q, c)
        lib = [_edit_factors(model, model.key(a, r1), int(model.facts[a, r1]), b),
               _edit_factors(model, model.key(b, r2), int(model.facts[b, r2]), c)]
        rows.append(dict(
            a=a, b=b, c=c,
            hop1_ok=bool(model.scores(model.key(a, r1), dW).argmax() == b),
            hop2_ok=bool(model.scores(model.key(b, r2), dW).argmax() == c),
            answer=int(s.argmax()), answers_c=bool(s.argmax() == c), answers_b=bool(s.argmax() == b),
            c_gain=float(s[c] - base[c]), c_gain_other_bridge=float(s_other[c] - base[c]),
            oracle_span_deficit=0.0 if oracle is None else subspace.span_deficit(oracle, lib)))
    return pd.DataFrame(rows)


def train_lora_rank1(model: KeyValueModel, x: int, rel: int, new_target: int, steps: int = 2000,
                     lr: float = 0.1, init_scale: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Train a rank-1 LoRA ΔW = b aᵀ on the single fact by gradient descent.

    Loss ½‖(W + b aᵀ) v − i_new‖² (squared error to the one-hot code, the objective under which
    Prop. 1's edit is exact); LoRA init b = 0, a ~ N(0, init_scale²) (Hu et al. 2021 zero-init
    of B); plain GD with step lr/‖v‖ on both factors (full batch of one prompt). From a small
    init the row factor grows along v and the column factor along i_new − W v, so the result
    approaches the closed form of :func:`rank_one_edit`.

    Returns:
        ``(ΔW [N, m], final loss)``.

    Raises:
        TheoryError: bad indices or non-positive steps/lr; RuntimeError: the loss diverged.
    """
    model._check(x, rel)
    if steps < 1 or lr <= 0:
        raise TheoryError("train_lora_rank1: steps and lr must be positive")
    g = torch.Generator().manual_seed(seed)
    v = model.key(x, rel)
    t = torch.zeros(model.n_entities, dtype=DTYPE)
    t[new_target] = 1
    a = init_scale * torch.randn(model.width, generator=g, dtype=DTYPE)
    b = torch.zeros(model.n_entities, dtype=DTYPE)
    eta = lr / float(v.norm())
    Wv = model.W @ v
    for _ in range(steps):
        res = Wv + b * (a @ v) - t
        gb, ga = res * (a @ v), (b @ res) * v
        b, a = b - eta * gb, a - eta * ga
    res = Wv + b * (a @ v) - t
    loss = 0.5 * float(res @ res)
    if not math.isfinite(loss):
        raise RuntimeError("train_lora_rank1: the loss diverged; lower lr")
    return torch.outer(b, a), loss


def compare_lora_closed_form(model: KeyValueModel, x: int, rel: int, new_target: int, **train_kw) -> dict:
    """Trained rank-1 LoRA against Prop. 1's closed form on the same fact.

    Returns:
        ``{"cosine": ⟨ΔW_lora, ΔW_closed⟩_F/(‖·‖‖·‖), "norm_ratio": ‖ΔW_lora‖_F/‖ΔW_closed‖_F,
        "lora_flips": bool, "closed_flips": bool, "loss": final training loss}``.
    """
    closed = rank_one_edit(model, x, rel, new_target)
    trained, loss = train_lora_rank1(model, x, rel, new_target, **train_kw)
    v = model.key(x, rel)
    return dict(cosine=float((trained * closed).sum() / (trained.norm() * closed.norm())),
                norm_ratio=float(trained.norm() / closed.norm()),
                lora_flips=bool(model.scores(v, trained).argmax() == new_target),
                closed_flips=bool(model.scores(v, closed).argmax() == new_target), loss=loss)


# --------------------------------------------------------------------------------------------
# Zeng & Lee (ICLR 2024): linear model
# --------------------------------------------------------------------------------------------


def _sv(E: torch.Tensor) -> torch.Tensor:
    E = torch.as_tensor(E)
    if E.dim() != 2:
        raise TheoryError(f"expected a matrix, got shape {tuple(E.shape)}")
    return torch.linalg.svdvals(E.to(DTYPE))


def zeng_lee_error(E: torch.Tensor, R: int, L: int) -> float:
    """Best spectral-norm error of L rank-≤R adapted layers for target difference E:
    σ_{RL+1}(E) (0 when RL ≥ min(E.shape)) — Zeng & Lee 2024, linear-model lemma.

    Args:
        E: ``[D_out, D_in]`` error matrix W̄ − ∏ W_l; R ≥ 0 per-layer rank; L ≥ 1 layers.

    Raises:
        TheoryError: E not 2-D, R < 0 or L < 1.
    """
    if R < 0 or L < 1:
        raise TheoryError(f"zeng_lee_error: need R >= 0 and L >= 1, got R={R}, L={L}")
    s = _sv(E)
    k = R * L
    return float(s[k]) if k < s.shape[0] else 0.0


def zeng_lee_min_rank(E: torch.Tensor, eps: float, L: int) -> int:
    """Smallest per-layer rank R with σ_{RL+1}(E) ≤ eps, i.e. ⌈#{σ_i(E) > eps} / L⌉
    (Zeng & Lee 2024; with eps = 0 this is the exact-adaptation threshold ⌈rank(E)/L⌉).

    Raises:
        TheoryError: eps < 0, L < 1 or E not 2-D.
    """
    if eps < 0 or L < 1:
        raise TheoryError(f"zeng_lee_min_rank: need eps >= 0 and L >= 1, got eps={eps}, L={L}")
    s = _sv(E)
    tol = max(eps, float(s[0]) * s.shape[0] * torch.finfo(DTYPE).eps if s.numel() else 0.0)
    return math.ceil(int((s > tol).sum()) / L)


def _prod(mats: Sequence[torch.Tensor], D: int) -> torch.Tensor:
    out = torch.eye(D, dtype=DTYPE)
    for M in mats:             # mats in application order: W_1 first
        out = M @ out
    return out


def zeng_lee_construction(Ws: Sequence[torch.Tensor], W_target: torch.Tensor, R: int) -> list[torch.Tensor]:
    """Zeng & Lee's constructive adapters (authors' ``helper.our_construction``).

    With E = W̄ − W_L⋯W_1 = UΣVᵀ and Q_l the projector onto right singular vectors
    (l−1)R … lR−1, ΔW_l = S_l⁻¹ E Q_l A_{l−1}⁻¹ (S_l = W_L⋯W_{l+1} frozen suffix, A_{l−1} the
    adapted prefix). Then ∏(W_l + ΔW_l) = W̄ − E(I − Σ Q_l) and the spectral error is σ_{RL+1}(E).

    Args:
        Ws: frozen ``[D, D]`` layers in application order (W_1 first); must be non-singular, as
            must the adapted prefixes. W_target: ``[D, D]``. R: per-layer rank ≥ 0.

    Returns:
        ``[ΔW_1, …, ΔW_L]``, each ``[D, D]`` of rank ≤ R.

    Raises:
        TheoryError: shapes not square/equal, R < 0, or a singular matrix.
    """
    if not Ws:
        raise TheoryError("zeng_lee_construction: no layers")
    D = int(W_target.shape[0])
    Ws = [torch.as_tensor(W).to(DTYPE) for W in Ws]
    if any(tuple(W.shape) != (D, D) for W in Ws) or tuple(W_target.shape) != (D, D):
        raise TheoryError("zeng_lee_construction: all matrices must be [D, D] with the same D")
    if R < 0:
        raise TheoryError(f"zeng_lee_construction: R must be >= 0, got {R}")
    L = len(Ws)
    E = W_target.to(DTYPE) - _prod(Ws, D)
    _, _, Vh = torch.linalg.svd(E)
    deltas: list[torch.Tensor] = []
    try:
        for l in range(L):
            Vl = Vh[l * R:(l + 1) * R].T                       # [D, ≤R]
            if Vl.shape[1] == 0:
                deltas.append(torch.zeros(D, D, dtype=DTYPE))
                continue
            S = _prod(Ws[l + 1:], D)
            A = _prod([W + dW for W, dW in zip(Ws[:l], deltas)], D)
            X = torch.linalg.solve(S, E @ Vl @ Vl.T)           # S⁻¹ E Q_l
            deltas.append(torch.linalg.solve(A.T, X.T).T)      # · A⁻¹
    except torch.linalg.LinAlgError as e:
        raise TheoryError(f"zeng_lee_construction: a suffix or adapted prefix is singular: {e}") from e
    return deltas


def chain_error(Ws: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], W_target: torch.Tensor) -> float:
    """‖∏_l (W_l + ΔW_l) − W̄‖₂ (spectral norm) for layers in application order."""
    if len(Ws) != len(deltas):
        raise TheoryError(f"chain_error: {len(Ws)} layers but {len(deltas)} updates")
    D = int(W_target.shape[0])
    P = _prod([torch.as_tensor(W).to(DTYPE) + torch.as_tensor(d).to(DTYPE) for W, d in zip(Ws, deltas)], D)
    return float(torch.linalg.matrix_norm(P - W_target.to(DTYPE), ord=2))


def rank_need_table(oracle: Mapping[str, LoraDelta], candidate: Mapping[str, LoraDelta] | None = None,
                    eps: float = 0.1, available_rank: int | None = None, block_size: int = 1) -> pd.DataFrame:
    """Rank needed vs rank available per module and per block of layers (Zeng & Lee as a
    diagnostic template).

    Per module, the residual E = O − X (oracle minus candidate, e.g. a merge; E = O without a
    candidate) is decomposed from the factors (:func:`interp.subspace.factor_svd`):
    ``r_need`` = min{k : Σ_{i>k} σ_i(E)² ≤ ε² ‖E‖_F²}, ``r_avail`` = ``available_rank`` or the
    candidate's LoRA rank, ``tail_ratio`` = σ_{r_avail+1}(E)/σ_1(E), ``sufficient`` =
    r_need ≤ r_avail. Per block P of ``block_size`` consecutive layers and projection type,
    ``block_need`` = max_{ℓ∈P} r_need and ``block_avail`` = Σ_{ℓ∈P} r_avail: Zeng & Lee's
    depth pooling (ranks add along a chain) says a block could at best realise a change of rank
    Σ r_ℓ — an optimistic, linearised bound [D/H], not a guarantee for transformers.

    Raises:
        TheoryError: no modules, no rank available (neither candidate nor available_rank),
            eps outside [0, 1), block_size < 1.
    """
    if not oracle:
        raise TheoryError("rank_need_table: empty oracle")
    if candidate is None and available_rank is None:
        raise TheoryError("rank_need_table: give a candidate or available_rank")
    if not 0 <= eps < 1 or block_size < 1:
        raise TheoryError(f"rank_need_table: need 0 <= eps < 1 and block_size >= 1 (eps={eps}, block_size={block_size})")
    rows = []
    for m, o in oracle.items():
        if candidate is not None and m not in candidate:
            continue
        E = o if candidate is None else subspace.weighted_sum([o, candidate[m]], [1.0, -1.0])
        r_av = available_rank if available_rank is not None else candidate[m].rank
        s = subspace.factor_svd(E)[1]
        if s.numel() == 0 or float(s[0]) == 0:
            r_need, tail = 0, 0.0
        else:
            r_need = subspace.tail_energy_rank(s, eps)
            tail = float(s[r_av] / s[0]) if r_av < s.shape[0] else 0.0
        ell = layer_of(m)
        rows.append(dict(module=m, layer=ell, proj=short_module(m), r_need=r_need, r_avail=r_av,
                         tail_ratio=tail, sufficient=r_need <= r_av,
                         block=None if ell is None else ell // block_size))
    if not rows:
        raise TheoryError("rank_need_table: oracle and candidate share no module")
    df = pd.DataFrame(rows)
    grp = df.groupby(["block", "proj"], dropna=False)
    df["block_need"] = grp.r_need.transform("max")
    df["block_avail"] = grp.r_avail.transform("sum")
    df["block_sufficient"] = df.block_need <= df.block_avail
    return df
