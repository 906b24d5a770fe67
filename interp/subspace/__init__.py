"""Geometry of LoRA updates ΔW = s·B·A, computed from the factors.

Everything here works on one module's :class:`~interp.adapters.factors.LoraDelta` or on an
adapter as ``{module_path: LoraDelta}``. The d_out × d_in matrix ΔW is never formed unless a
function says so (``dense=True``, the TIES sign-conflict rate, intruder dimensions): the thin SVD
of ΔW comes from thin QRs of B and Aᵀ and the SVD of an r × r core, cost
O((d_in + d_out)·r²) instead of O(d_out·d_in·min(d_out, d_in)).

Numerics: all results are computed in float64 on the factors' own device (CPU or GPU), so a
GPU tensor stays on the GPU; float64 gives ~1e-12 relative agreement with a dense SVD.

Modules (sources in each docstring):

* ``svd`` — :func:`factor_svd` (the one shared with :mod:`interp.adapters.merge`), :func:`spectrum`,
  :func:`left_right_bases`, :func:`weighted_sum`; ``ranks`` [1, 2] — :func:`effective_rank`,
  :func:`stable_rank`, :func:`energy_rank`;
* ``overlap`` between adapters [6, 9]: :func:`principal_angles`, :func:`subspace_similarity` (Hu et
  al.'s φ), :func:`grassmann_distance`, :func:`task_cosine`, :func:`sign_conflict_rate`;
  and with the base weight [7, 8]: :func:`amplification_factor`, :func:`intruder_dimensions`;
* ``merges`` — :func:`energy_kept`, :func:`cross_term_energy`, :func:`truncation_loss`, span deficit
  [11] :func:`span_deficit`;
* ``keys`` — key overlap [12]: :func:`module_inputs`, :func:`key_overlap`, :func:`key_overlap_table`;
* ``layers`` — placement [14]: :func:`layer_energy`, :func:`late_mass`;
* ``tables`` — :func:`adapter_table`, :func:`overlap_table`, :func:`spectra_table`,
  :func:`layer_energy_table`, :func:`merge_table`, :func:`span_deficit_table`.
"""

from __future__ import annotations

from interp.errors import SubspaceError
from interp.subspace.svd import (
    DTYPE, RANK_RTOL, factor_svd, weighted_sum, spectrum, left_right_bases,
)
from interp.subspace.ranks import (
    effective_rank, stable_rank, participation_ratio, energy_rank, tail_energy_rank,
)
from interp.subspace.overlap import (
    principal_angles, subspace_similarity, grassmann_distance, frobenius_inner, task_cosine,
    sign_conflict_rate, amplification_factor, intruder_dimensions, resolve_linear, base_weight,
)
from interp.subspace.merges import energy_kept, cross_term_energy, truncation_loss, span_deficit
from interp.subspace.keys import module_inputs, key_overlap, key_overlap_table
from interp.subspace.layers import layer_energy, late_mass
from interp.subspace.tables import (
    adapter_table, spectra_table, overlap_table, layer_energy_table, merge_table,
    span_deficit_table,
)

__all__ = [
    'SubspaceError', 'DTYPE', 'RANK_RTOL', 'factor_svd', 'weighted_sum', 'spectrum',
    'left_right_bases', 'effective_rank', 'stable_rank', 'participation_ratio', 'energy_rank',
    'tail_energy_rank', 'principal_angles', 'subspace_similarity', 'grassmann_distance',
    'frobenius_inner', 'task_cosine', 'sign_conflict_rate', 'amplification_factor',
    'intruder_dimensions', 'resolve_linear', 'base_weight', 'energy_kept', 'cross_term_energy',
    'truncation_loss', 'span_deficit', 'module_inputs', 'key_overlap', 'key_overlap_table',
    'layer_energy', 'late_mass', 'adapter_table', 'spectra_table', 'overlap_table',
    'layer_energy_table', 'merge_table', 'span_deficit_table',
]
