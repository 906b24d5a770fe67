"""Bridge-entity mechanisms: logit lens / EntRec, Patchscopes, activation patching, probes.

Every function takes any ``HookedModel`` (base, expert, merge, router) and returns a tidy
pandas DataFrame; :func:`difference` subtracts two variants' tables in one call.
"""

from interp.mechanisms.lens import entrec, lens_logits, logit_lens, residual_stack
from interp.mechanisms.patching import (
    PatchGrid,
    PatchPair,
    activation_patching,
    attention_knockout,
    back_patching,
    difference,
    make_corrupted_pairs,
    patch_layer_pos,
    pick_donors,
    summarise,
    swap_patching,
)
from interp.mechanisms.patchscope import patchscope
from interp.mechanisms.probes import collect_features, probe_bridge_entity, probe_features, probe_scores

__all__ = [
    "entrec", "lens_logits", "logit_lens", "residual_stack", "PatchGrid", "PatchPair",
    "activation_patching", "attention_knockout", "back_patching", "difference",
    "make_corrupted_pairs", "patch_layer_pos", "summarise", "patchscope", "collect_features",
    "probe_bridge_entity", "probe_features", "probe_scores", "pick_donors", "swap_patching",
]
