"""The GPU paths of the merges, checked on the CPU: ``gram_svd`` against a plain SVD of the dense
ΔW, the device a faithfulness report computes on, and every merged adapter placed on the device
asked for (issue 16)."""

from __future__ import annotations

import pytest
import torch

from interp.adapters import merge as M
from interp.adapters.factors import LoraDelta


def _svd_reference(W: torch.Tensor, rtol: float = 1e-7):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = int((S > rtol * S[0]).sum())
    return U[:, :k], S[:k], Vh[:k]


def _ties_like(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    """A TIES merge of two random rank-4 updates: trimming makes it (near) full rank."""
    g = torch.Generator().manual_seed(seed)
    stack = torch.stack([torch.randn(d_out, 4, generator=g, dtype=torch.float64)
                         @ torch.randn(4, d_in, generator=g, dtype=torch.float64) for _ in range(2)])
    return M.ties_dense(stack, [1.0, 1.0], density=0.3)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_gram_svd_equals_the_svd_of_the_dense_update(shape):
    W = _ties_like(*shape, seed=sum(shape))
    got = M.gram_svd(W)
    U, S, Vh = _svd_reference(W)
    assert got.rank == S.numel()
    assert got.A.dtype == got.B.dtype == torch.float32
    # singular values: the column norms of B (tall) / row norms of A (wide)
    sig = torch.linalg.svdvals(got.dense())
    assert torch.allclose(sig[:S.numel()], S, rtol=1e-6, atol=1e-6 * float(S[0]))
    # the product reproduces ΔW to float32 precision, as dense_to_delta's SVD does on the CPU
    err = float((got.dense() - W).abs().max()) / float(W.abs().max())
    ref = float((M.dense_to_delta(W).dense() - W).abs().max()) / float(W.abs().max())
    assert err < 1e-6 and ref < 1e-6, (err, ref)
    # the same subspaces: projectors onto the row (column) space agree
    Pv_ref = Vh.T @ Vh
    Q, _ = torch.linalg.qr(got.A.double().T)
    assert float((Q @ Q.T - Pv_ref).abs().max()) < 1e-6
    Pu_ref = U @ U.T
    Qb, _ = torch.linalg.qr(got.B.double())
    assert float((Qb @ Qb.T - Pu_ref).abs().max()) < 1e-6


def test_gram_svd_keeps_the_rank_of_a_low_rank_update_and_orders_sigma():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(80, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 50, generator=g, dtype=torch.float64)
    for A_wide in (W, W.T):
        got = M.gram_svd(A_wide)
        ref = torch.linalg.svdvals(A_wide)[:5]
        assert got.rank == 5
        norms = (torch.linalg.vector_norm(got.B.double(), dim=0) if A_wide.shape[1] <= A_wide.shape[0]
                 else torch.linalg.vector_norm(got.A.double(), dim=1))
        assert torch.allclose(norms, ref, rtol=1e-6)
        assert torch.all(norms[:-1] >= norms[1:])
    zero = M.gram_svd(torch.zeros(6, 4, dtype=torch.float64))
    assert zero.rank == 1 and float(zero.dense().abs().max()) == 0.0
    with pytest.raises(M.MergeError):
        M.gram_svd(torch.zeros(5))


def test_ties_through_gram_svd_equals_the_cpu_merge():
    """The GPU path of a TIES merge (dense ΔW → gram_svd), forced here on the CPU, against the
    CPU path (torch.linalg.svd): the same merged ΔW to float32 precision."""
    g = torch.Generator().manual_seed(3)
    experts = [{"m": LoraDelta(torch.randn(4, 48, generator=g), torch.randn(72, 4, generator=g), 2.0)}
               for _ in range(2)]
    cpu = M.ties(experts, density=0.5)["m"].dense()
    dense = M.ties_dense(M._dense_stack(experts, "m"), [1.0, 1.0], 0.5)
    gpu_path = M.gram_svd(dense).dense()
    assert float((gpu_path - cpu).abs().max()) <= 1e-6 * float(cpu.abs().max())


def test_work_device_prefers_the_accelerator_term():
    cpu = torch.zeros(2)
    meta = torch.zeros(2, device="meta")  # stands in for a GPU: any device that is not the CPU
    assert M.work_device([cpu, meta, cpu]) == torch.device("meta")
    assert M.work_device([cpu, cpu]) == torch.device("cpu")
    assert M.work_device([]) == torch.device("cpu")


def test_faithfulness_runs_on_the_merges_device(monkeypatch):
    """_fro_sq_combo's Gram products run on the device of the term that is off the CPU (a TIES
    merge built on the GPU), not on the CPU experts' device; checked by spying on the device it
    picks with a meta tensor standing in for the GPU."""
    seen = []
    orig = M.work_device

    def spy(tensors):
        dev = orig(tensors)
        seen.append(dev)
        return torch.device("cpu")  # compute here (a meta tensor has no values)

    monkeypatch.setattr(M, "work_device", spy)
    g = torch.Generator().manual_seed(1)
    ex = [{"m": LoraDelta(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0)} for _ in range(2)]
    merged = {"m": LoraDelta(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g), 1.0)}
    M.faithfulness_report(merged, ex)
    assert seen and set(seen) == {torch.device("cpu")}
    seen.clear()
    merged_meta = {"m": LoraDelta(torch.zeros(3, 6, device="meta"), torch.zeros(5, 3, device="meta"), 1.0)}
    with pytest.raises(Exception):
        M.faithfulness_report(merged_meta, ex)  # computing "on the GPU" (meta) needs the spy's CPU
    assert torch.device("meta") in seen
