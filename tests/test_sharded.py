"""Sharded K-medoids: world size 1 equals the search strategy; 2 gloo ranks equal world size 1."""

from __future__ import annotations

import pytest
import torch

from ravl_engine.kernels.kmedoids import kmedoids_sweep
from ravl_engine.kernels.seeding import kmedoids_pp_init
from ravl_engine.kernels.sharded import LocalComm, Shard, sharded_fit, sharded_pp_init, sharded_sweep
from tests.conftest import clustered_rows
from tests.gloo import run_ranks

KS = [6, 8, 11]


def _data(n: int = 1500, d: int = 24) -> torch.Tensor:
    return clustered_rows(n, d, centers=8, spread=0.8, seed=5, dtype=torch.float32)


def test_world_size_one_equals_the_search_strategy():
    x = _data()
    want = kmedoids_sweep(x, KS, generator=torch.Generator().manual_seed(3), strategy="search")
    got = sharded_sweep(x, KS, LocalComm(), generator=torch.Generator().manual_seed(3))
    assert got.k == want.k
    assert torch.equal(got.fit.medoids, want.fit.medoids) and torch.equal(got.fit.labels, want.fit.labels)
    for k in KS:
        assert got.silhouettes[k] == pytest.approx(want.silhouettes[k], abs=1e-6)
    assert got.fit.objective == pytest.approx(want.fit.objective, rel=1e-6)


def test_duplicate_rows_and_every_row_a_center():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0], [1.0, 1.0]]), dim=1)
    for dtype in (torch.float32, torch.float64):
        y = x.to(dtype)
        got = sharded_pp_init(Shard.of(y, LocalComm()), 5, LocalComm(), generator=torch.Generator().manual_seed(0))
        want, _ = kmedoids_pp_init(y, 5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want)
    fit = sharded_fit(Shard.of(x, LocalComm()), torch.tensor([0, 2]), LocalComm())
    assert fit.converged and fit.labels.tolist()[:4] == [0, 0, 1, 1]


def _worker(rank: int, world: int, split: list[int], path: str) -> None:
    from ravl_engine.distributed import TorchComm

    x = _data()
    start = sum(split[:rank])
    comm = TorchComm()
    result = sharded_sweep(x[start : start + split[rank]], KS, comm, generator=torch.Generator().manual_seed(3))
    labels = comm.gather(result.fit.labels)
    if rank == 0:
        torch.save({"k": result.k, "medoids": result.fit.medoids, "labels": labels, "sil": result.silhouettes}, path)


@pytest.mark.parametrize("split", [[800, 700], pytest.param([1499, 1], marks=pytest.mark.slow)])
def test_two_ranks_equal_one_process(tmp_path, split):
    path = str(tmp_path / "result.pt")
    assert run_ranks(_worker, split, path) == [0, 0]
    got = torch.load(path)
    want = sharded_sweep(_data(), KS, LocalComm(), generator=torch.Generator().manual_seed(3))
    assert got["k"] == want.k
    assert torch.equal(got["medoids"], want.fit.medoids) and torch.equal(got["labels"], want.fit.labels)
    for k in KS:
        assert got["sil"][k] == pytest.approx(want.silhouettes[k], abs=1e-6)
