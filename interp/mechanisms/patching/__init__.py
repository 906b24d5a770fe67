"""Activation patching: layer × position sweeps, back-patching, attention knockout.

Modules: ``pairs`` (clean/corrupted pairs) · ``engine`` (resumed and packed forwards, the metric,
batch sizes) · ``plan`` (the typed plan of packed forwards and their execution) · ``sweep``
(:func:`patch_layer_pos`, :func:`activation_patching`) · ``backpatch`` · ``knockout`` ·
``tables`` · ``swap`` (a bridge representation from another prompt). Every public name is re-exported here.

**Activation patching** (Meng et al. 2022; TransformerLens ``patching``; notation of Heimersheim &
Nanda 2024): run a clean prompt (answer a) and a corrupted prompt (e₁ swapped, answer a'), write
the clean activation of one hook at one (layer, position) into the corrupted run, and measure the
logit difference ``LD = logit[a] − logit[a']`` (first answer tokens, final position), normalised

    value = (LD_patched − LD_corrupted) / (LD_clean − LD_corrupted)        (1 = fully restored).

**How the engine is fast and still exact.** TransformerLens's ``get_act_patch_resid_pre`` runs one
full forward of the whole corrupted batch per (layer, position). Here, for a patch at layer ℓ and
position p:

* nothing before block ℓ changes, so the forward *starts at block ℓ* from the cached corrupted
  ``resid_pre`` (the bridge's ``start_at_layer``; blocks < ℓ are skipped outright — the bridge
  itself would still execute them and discard the result);
* nothing at positions < p changes (causal attention), so those positions come from the cached
  corrupted keys/values (a ``DynamicCache`` prefix), and positions after the prompt's final
  token are never needed: each patched copy recomputes exactly its own segment ``p .. final``;
* the segments of one prompt are packed into rows (first-fit decreasing; suffix lengths
  1..n pair up), a row reads its prompt's corrupted keys/values and a block-diagonal causal
  mask keeps segments apart, so no position is computed twice;
* one pass over the blocks carries the rows of every layer, each row joining at its block ℓ
  (Llama and Qwen2; other models run one bridge forward per layer): up to ``max_batch``
  copies per pass (64 on the CPU; on CUDA from the free memory, ≥ 256), so the matrix
  products are few and large and Python runs once per block, not once per (layer, block);
* a copy whose clean activation equals the corrupted one bit for bit (every position before
  the first differing token; at layer 0 of ``resid_pre``, every position whose token agrees)
  would run the corrupted forward unchanged: its value is the corrupted logit difference;
* nothing is unembedded: the final normalised residual is projected on the two answer rows of
  ``W_U`` (``logit[a] − logit[a']``), never on the whole vocabulary;
* prompts are processed in chunks (``prompt_chunk``) whose cached runs fit a memory budget.

Results equal ``transformer_lens.patching.get_act_patch_resid_pre / _attn_out / _mlp_out`` on the
same bridge (tests: ≤ 1e-4 on tiny Llama and Qwen2).

**Back-patching** (Biran et al. 2024, "Hopping Too Late", EMNLP 2024, §5): the final-position
residual at source layer ℓs written into ``resid_pre`` of target layer ℓt ≤ ℓs of the *same*
prompt; a query is *fixed* when its first answer token becomes top-1 and was not.

**Attention knockout** (Geva et al. 2023, "Dissecting Recall of Factual Associations", EMNLP 2023,
§5): attention from the final token to the e₁ span is blocked in a window of layers by setting
those pre-softmax scores to −∞ (``attn.hook_attn_scores``), so softmax renormalises over the
remaining keys exactly.
"""

from __future__ import annotations

from interp.mechanisms.patching.backpatch import back_patching
from interp.mechanisms.patching.engine import (
    SHORT_HOOKS,
    _pack,
    _run_cached,
    answer_logit_diff,
    auto_prompt_chunk,
    default_max_batch,
    final_states,
    forward_from,
    forward_packed,
    skip_blocks,
    stacked_ok,
    supported_hooks,
)
from interp.mechanisms.patching.knockout import attention_knockout
from interp.mechanisms.patching.pairs import PatchPair, make_corrupted_pairs
from interp.mechanisms.patching.plan import Forward, PlanArrays, Span
from interp.mechanisms.patching.swap import pick_donors, swap_patching
from interp.mechanisms.patching.sweep import PatchGrid, activation_patching, patch_layer_pos
from interp.mechanisms.patching.tables import difference, summarise

__all__ = [
    "SHORT_HOOKS", "Forward", "PatchGrid", "PatchPair", "PlanArrays", "Span", "activation_patching",
    "answer_logit_diff", "attention_knockout", "auto_prompt_chunk", "back_patching",
    "default_max_batch", "difference", "final_states", "forward_from", "forward_packed",
    "make_corrupted_pairs", "patch_layer_pos", "pick_donors", "skip_blocks", "stacked_ok",
    "summarise", "supported_hooks", "swap_patching",
]
