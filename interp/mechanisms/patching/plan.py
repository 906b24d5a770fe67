"""The packed-forward plan of a layer × position sweep, typed (:class:`Forward`, :class:`Span`,
:class:`PlanArrays`), and the forwards that execute it (stacked over layers or one per layer)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch

from interp.mechanisms.patching.engine import _pack, answer_logit_diff, final_states, forward_packed


class Span(NamedTuple):
    """Rows ``r0:r1`` and copies ``c0:c1`` of one forward belong to swept layer index ``i``
    (model layer ``layer``)."""

    i: int
    layer: int
    r0: int
    r1: int
    c0: int
    c1: int


@dataclasses.dataclass
class PlanArrays:
    """Index arrays of one packed forward (numpy when planned, device tensors when run).

    Rows × slots ``[R, C]``: ``slot_copy`` (copy index, −1 = empty), ``slot_pos`` (position
    in the prompt), ``slot_start`` (the copy's first position: keys before it come from the
    corrupted prefix cache); ``row_b`` ``[R]`` the prompt of each row. Per copy ``[n]``:
    ``c_row``/``c_off``/``c_last`` (row, first and final slot), ``c_b``/``c_p`` (prompt,
    patched position) and ``c_i``/``c_j`` (its cell of the result grid).
    """

    row_b: Any
    slot_copy: Any
    slot_pos: Any
    slot_start: Any
    c_row: Any
    c_off: Any
    c_last: Any
    c_b: Any
    c_p: Any
    c_j: Any
    c_i: Any

    def values(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclasses.dataclass
class Forward:
    """One planned forward: its spans (one per swept layer it carries), the corrupted prefix
    length every row reads (``prefix`` keys/values), and its index arrays."""

    spans: list[Span]
    prefix: int
    arrays: PlanArrays


def upload(plan: list[Forward], dev: Any) -> list[PlanArrays]:
    """Every forward's index arrays on ``dev`` in ONE host-to-device transfer (views of one
    flat int64 tensor), so the forwards queue on a GPU without host synchronisation."""
    flat = np.concatenate([a.ravel() for g in plan for a in g.arrays.values()]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    flat_t = torch.from_numpy(flat).to(dev)
    out, off = [], 0
    for g in plan:
        views = {}
        for f in dataclasses.fields(g.arrays):
            a = getattr(g.arrays, f.name)
            views[f.name] = flat_t[off:off + a.size].view(a.shape)
            off += a.size
        out.append(PlanArrays(**views))
    return out


def _plan(live: np.ndarray, layers: list[int], pos_np: np.ndarray, fin_np: np.ndarray,
          max_batch: int, stacked: bool) -> list[Forward]:
    """Rows and forwards for the live copies ``live[i, j, b]`` (index arrays, numpy).

    Segment of copy (i, p, b): slots ``p .. fin_b``. Each prompt's segments of one swept layer
    are packed (capacity: the longest segment, or one more where that needs fewer slots:
    suffixes 1..n pair up into rows of n + 1); rows are ordered by layer and cut into forwards
    of at most ``max_batch`` copies (with ``stacked=False`` a forward holds one layer only).
    Each forward is a :class:`Forward` whose :class:`Span` s say which rows and copies belong
    to which swept layer.
    """
    ii, jj, bb = np.nonzero(live)
    if len(ii) == 0:
        return []
    seg_len = fin_np[bb] - pos_np[jj] + 1
    cap = int(seg_len.max())
    packings: dict[tuple, list] = {}
    rows = []  # (i, b, [(copy index into ii/jj/bb, offset)])
    for i in sorted(np.unique(ii).tolist(), key=lambda i: (layers[i], i)):
        sel = np.nonzero(ii == i)[0]
        for b in np.unique(bb[sel]):
            idx = sel[bb[sel] == b]
            key = tuple(seg_len[idx].tolist())
            if key not in packings:
                cands = [_pack(key, c, max_batch) for c in (cap, cap + 1)]
                packings[key] = min(cands, key=lambda r: len(r) * max(
                    sum(key[s] for s, _ in row) for row in r))
            rows += [(i, int(b), [(int(idx[s]), o) for s, o in row]) for row in packings[key]]
    groups, cur, n = [], [], 0
    for row in rows:
        if cur and (n + len(row[2]) > max_batch or (not stacked and row[0] != cur[-1][0])):
            groups.append(cur)
            cur, n = [], 0
        cur.append(row)
        n += len(row[2])
    groups.append(cur)
    out = []
    for group in groups:
        R = len(group)
        C = max(sum(int(seg_len[c]) for c, _ in segs) for _, _, segs in group)
        slot_copy = np.full((R, C), -1, dtype=np.int64)
        slot_pos = np.zeros((R, C), dtype=np.int64)
        slot_start = np.zeros((R, C), dtype=np.int64)
        c_row, c_off, c_idx, spans = [], [], [], []
        for r, (i, _, segs) in enumerate(group):
            if not spans or spans[-1][0] != i:
                spans.append([i, layers[i], r, r, len(c_idx), len(c_idx)])
            for c, o in segs:
                s, p = int(seg_len[c]), int(pos_np[jj[c]])
                slot_copy[r, o:o + s] = c
                slot_pos[r, o:o + s] = np.arange(p, p + s)
                slot_start[r, o:o + s] = p
                c_row.append(r)
                c_off.append(o)
                c_idx.append(c)
            spans[-1][3], spans[-1][5] = r + 1, len(c_idx)
        c_idx = np.asarray(c_idx)
        c_off = np.asarray(c_off)
        out.append(Forward([Span(*s) for s in spans], int(pos_np[jj[c_idx]].max()), PlanArrays(
            row_b=np.array([b for _, b, _ in group]), slot_copy=slot_copy, slot_pos=slot_pos,
            slot_start=slot_start, c_row=np.asarray(c_row), c_off=c_off,
            c_last=c_off + seg_len[c_idx] - 1, c_b=bb[c_idx], c_p=pos_np[jj[c_idx]],
            c_j=jj[c_idx], c_i=ii[c_idx])))
    return out


def _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts, is_resid_pre, dtype, dev):
    """Starting residuals of the rows (patched for ``resid_pre``), hooks for other hook points,
    and the additive attention mask ``[R, 1, C, prefix + C]``."""
    R, C = a.slot_copy.shape
    valid = a.slot_copy >= 0
    resid = None
    hooks = []
    for i, _, r0, r1, c0, c1 in g.spans:
        base = corr_acts[resid_names[i]]
        if resid is None:
            resid = torch.empty((R, C) + tuple(base.shape[2:]), dtype=base.dtype, device=dev)
        resid[r0:r1] = base[a.row_b[r0:r1, None], a.slot_pos[r0:r1]]
        rows, offs = a.c_row[c0:c1], a.c_off[c0:c1]
        src = clean_acts[names[i]][a.c_b[c0:c1], a.c_p[c0:c1]]
        if is_resid_pre:
            resid[rows, offs] = src
        else:
            def patch(act, hook, rows=rows, offs=offs, src=src):
                act = act.clone()
                act[rows, offs] = src.to(act.dtype)
                return act
            hooks.append((names[i], patch))
    resid = resid * valid[..., None].to(resid.dtype)
    k = torch.arange(C, device=dev)
    sc = a.slot_copy
    allowed = (sc[:, :, None] == sc[:, None, :]) & (k[None, None, :] <= k[None, :, None])
    if g.prefix > 0:
        pre = torch.arange(g.prefix, device=dev)[None, None, :] < a.slot_start[:, :, None]
        allowed = torch.cat([pre, allowed], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]
    return resid, hooks, mask


class _PrefixKV:
    """Stand-in for a transformers cache at one layer: fixed prefix keys/values before the new."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))

    def get_seq_length(self, *args, **kwargs) -> int:
        return int(self.keys.shape[-2])


@contextlib.contextmanager
def _mlp_only_at(mlp: Any, rows: torch.Tensor, cols: torch.Tensor):
    """Run ``mlp`` (a per-token MLP) only at slots ``(rows, cols)``; zeros elsewhere.

    Used in the last block, where only each copy's final slot is read: the other slots'
    outputs are never used, so their MLP (most of the block's arithmetic) is not computed.
    """
    def sub(x, *args, **kwargs):
        object.__delattr__(mlp, "forward")
        try:
            part = mlp(x[rows, cols][:, None], *args, **kwargs)
        finally:
            object.__setattr__(mlp, "forward", sub)
        y = torch.zeros(x.shape[:-1] + part.shape[-1:], dtype=part.dtype, device=part.device)
        y[rows, cols] = part[:, 0]
        return y

    object.__setattr__(mlp, "forward", sub)
    try:
        yield
    finally:
        object.__delattr__(mlp, "forward")


def _stacked_forward(hm, out, g, a, names, resid_names, clean_acts, corr_acts, layers,
                     is_resid_pre, corr_kv, ca, xa) -> None:
    """One pass over the blocks for packed rows of several layers (rows join at their block).

    In the last block only the final slot of each copy is read, so its MLP runs on those slots
    alone (unless a hook of that block is being patched).
    """
    dev = hm.device
    dtype = next(hm.hf_model.parameters()).dtype
    h, hooks, mask = _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts,
                                     is_resid_pre, dtype, dev)
    R = h.shape[0]
    L = hm.n_layers
    first = min(s.layer for s in g.spans)
    n_active = [max([s.r1 for s in g.spans if s.layer <= l], default=0) for l in range(L)]
    pos = a.slot_pos
    cos, sin = hm.hf_model.model.rotary_emb(h, position_ids=pos)
    P = g.prefix
    rb = a.row_b
    blocks = list(hm.bridge.blocks)
    last_mlp = getattr(blocks[L - 1], "mlp", None)
    trim = last_mlp is not None and not (not is_resid_pre and any(s.layer == L - 1 for s in g.spans))
    with hm.bridge.hooks(fwd_hooks=hooks):
        for l in range(first, L):
            n = n_active[l]
            past = _PrefixKV(corr_kv[l][0][rb[:n], :, :P], corr_kv[l][1][rb[:n], :, :P]) \
                if P > 0 else None
            ctx = _mlp_only_at(last_mlp, a.c_row, a.c_last) if trim and l == L - 1 \
                else contextlib.nullcontext()
            with ctx:
                o = blocks[l](h[:n], attention_mask=mask[:n], position_ids=pos[:n],
                              past_key_values=past, use_cache=past is not None,
                              position_embeddings=(cos[:n], sin[:n]))
            o = o[0] if isinstance(o, tuple) else o
            if n == R:
                h = o
            else:
                h[:n] = o
        final = hm.bridge.ln_final(h[a.c_row, a.c_last])
    out[a.c_i, a.c_j, a.c_b] = answer_logit_diff(hm, final, ca[a.c_b], xa[a.c_b])


def _packed_forward(hm, out, g, a, names, resid_names, clean_acts, corr_acts, layers,
                    is_resid_pre, corr_kv, ca, xa) -> None:
    """One bridge forward (from block ℓ) of packed rows of one layer ℓ."""
    dev = hm.device
    dtype = next(hm.hf_model.parameters()).dtype
    layer = g.spans[0].layer
    resid, hooks, mask = _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts,
                                         is_resid_pre, dtype, dev)
    kv = None
    if g.prefix > 0:
        rb, P = a.row_b, g.prefix
        kv = [(kk[rb, :, :P], vv[rb, :, :P]) if l >= layer else None
              for l, (kk, vv) in enumerate(corr_kv)]
        kv = [x if x is not None else kv[layer] for x in kv]
    h = forward_packed(hm, layer, resid, kv, mask, a.slot_pos, hooks)
    out[a.c_i, a.c_j, a.c_b] = answer_logit_diff(hm, h[a.c_row, a.c_last],
                                                          ca[a.c_b], xa[a.c_b])


def _full_forward_layer(hm, out_i, corrupted_tokens, clean_act, name, jj, bb, pos_np, finals, ca,
                        xa, max_batch) -> None:
    """Batched full forwards from the tokens (exact for any hook point) for one layer."""
    dev = hm.device
    T = corrupted_tokens.shape[1]
    for g0 in range(0, len(jj), max_batch):
        js = torch.as_tensor(jj[g0:g0 + max_batch], device=dev)
        bs = torch.as_tensor(bb[g0:g0 + max_batch], device=dev)
        ps = torch.as_tensor(pos_np, device=dev)[js]
        rows = torch.arange(len(bs), device=dev)
        src = clean_act[bs, ps]
        fin = finals[bs]

        def patch(act, hook, rows=rows, ps=ps, src=src):
            return act.index_put((rows, ps), src.to(act.dtype))
        keep = T - int(fin.min())
        with final_states(hm.bridge):
            h = hm.bridge.run_with_hooks(corrupted_tokens[bs], fwd_hooks=[(name, patch)],
                                         logits_to_keep=keep)
        h = h if isinstance(h, torch.Tensor) else h[0]
        out_i[js, bs] = answer_logit_diff(hm, h[rows, fin - (T - keep)], ca[bs], xa[bs])


