"""ParallelDims resolution / validation, init_distributed from torchrun env vars, the mesh layout, and the
one-all_reduce routing-count sum (gloo CPU, 4 ranks)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from kimi.config import ConfigError, KimiConfig, MoEConfig, ParallelConfig
from kimi.parallel import ParallelDims, build_mesh, init_distributed
from tests.dist_utils import RankFailed, run_distributed


@pytest.mark.parametrize(
    "args, resolved",
    [
        ((1, -1, 1, 8), (1, 8, 1, 8)),
        ((1, -1, 2, 8), (1, 8, 2, 4)),
        ((2, -1, 2, 8), (2, 4, 2, 2)),
        ((-1, 2, 2, 8), (4, 2, 2, 1)),
        ((1, 1, 1, 1), (1, 1, 1, 1)),
    ],
)
def test_parallel_dims_resolve(args, resolved):
    d = ParallelDims(*args)
    assert (d.dp_replicate, d.dp_shard, d.ep, d.dp_shard_mod_ep) == resolved
    assert d.dp == d.world_size == args[3]


@pytest.mark.parametrize(
    "args, message",
    [
        ((3, -1, 1, 8), "world size 8 is not divisible by parallel.dp_replicate=3"),
        ((-1, 3, 1, 8), "world size 8 is not divisible by parallel.dp_shard=3"),
        ((-1, -1, 1, 8), "both -1"),
        ((2, 2, 1, 8), "!= world size 8"),
        ((1, 4, 8, 4), "parallel.ep=8 must divide parallel.dp_shard=4"),
        ((1, 6, 4, 6), "parallel.ep=4 must divide parallel.dp_shard=6"),
        ((1, 0, 1, 4), "parallel.dp_shard=0 must be >= 1"),
        ((1, -1, 0, 4), "parallel.ep=0 must be >= 1"),
        ((1, -1, 4, 4, 6), "moe.num_experts=6 must be divisible by parallel.ep=4"),
    ],
)
def test_parallel_dims_errors(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims(*args)


def test_for_model_checks_ep_against_the_models_experts_only_when_it_has_them():
    pcfg = ParallelConfig(dp_shard=-1, ep=4)
    moe6 = KimiConfig(moe=MoEConfig(num_experts=6, n_group=1, topk_group=1, top_k=2))
    with pytest.raises(ConfigError, match="moe.num_experts=6 must be divisible by parallel.ep=4"):
        ParallelDims.for_model(pcfg, moe6, 8)
    dense = KimiConfig(moe=MoEConfig(use_moe=False, num_experts=6, n_group=1, topk_group=1, top_k=2))
    assert ParallelDims.for_model(pcfg, dense, 8).ep == 4  # a dense model has no experts to divide


def test_world_size_one_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert tuple(init_distributed("auto", "cpu")) == (0, 1, 0)
    assert not dist.is_initialized()
    assert build_mesh(ParallelDims(1, -1, 1, 1)) is None
    with pytest.raises(ConfigError, match="parallel.backend='mpi'"):
        init_distributed("mpi", "cpu")


SUBMESHES = ("dp", "fsdp", "ep", "hsdp", "efsdp", "dp_replicate", "dp_shard_mod_ep")


def _ranks(mesh):
    return mesh.mesh.flatten().tolist()


def _body(rank, world_size):
    from kimi.model import KimiModel
    from kimi.parallel import all_reduce_routing_counts, submesh

    info = init_distributed("auto", "cpu", timeout_s=60)  # from the env vars dist_utils set, like torchrun
    assert tuple(info) == (rank, world_size, rank) and dist.get_backend() == "gloo"

    layouts = {}
    for dims in (ParallelDims(1, -1, 2, 4), ParallelDims(2, -1, 2, 4), ParallelDims(1, -1, 1, 4)):
        mesh = build_mesh(dims, "cpu", timeout_s=17)
        # Every group times out after parallel.timeout_s, not torch's 30-minute default for new groups.
        groups = [submesh(mesh, n).get_group(i) for n in SUBMESHES for i in range(submesh(mesh, n).ndim)]
        assert {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups} == {17.0}
        assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep")
        assert submesh(mesh, "dp").get_local_rank() == rank  # data rank = global rank
        names = ("dp", "fsdp", "ep", "hsdp", "efsdp")
        layouts[(dims.dp_replicate, dims.dp_shard, dims.ep)] = {n: _ranks(submesh(mesh, n)) for n in names}
        assert submesh(mesh, "hsdp").ndim == (2 if dims.hsdp else 1)
    with pytest.raises(ValueError, match="no submesh 'tp'"):
        submesh(mesh, "tp")

    # Routing counts: every layer summed over all ranks in ONE all_reduce.
    model = KimiModel(KimiConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    for i, m in enumerate(model.moe_layers()):
        m.tokens_per_expert.copy_(torch.arange(8.0) * (rank + 1) + i)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        counts = all_reduce_routing_counts(model, submesh(mesh, "dp"))
    finally:
        dist.all_reduce = real
    assert len(calls) == 1 and len(counts) == 3
    for i, c in enumerate(counts):
        torch.testing.assert_close(c, torch.arange(8.0) * 10 + 4 * i)  # sum over ranks of (r + 1) = 10
    return layouts


def test_mesh_layout_and_routing_counts():
    layouts = run_distributed(_body, 4, init_pg=False)
    # ep groups are contiguous ranks (intra-node on GPU); experts' FSDP groups stride across them.
    r0, r3 = layouts[0], layouts[3]
    assert r0[(1, 4, 2)] == {
        "dp": [0, 1, 2, 3],
        "fsdp": [0, 1, 2, 3],
        "ep": [0, 1],
        "hsdp": [0, 1, 2, 3],
        "efsdp": [0, 2],
    }
    assert r3[(1, 4, 2)] == {
        "dp": [0, 1, 2, 3],
        "fsdp": [0, 1, 2, 3],
        "ep": [2, 3],
        "hsdp": [0, 1, 2, 3],
        "efsdp": [1, 3],
    }
    # HSDP 2 x 2, ep=2: the dense mesh is (replicate, shard) = [[0, 1], [2, 3]]; experts replicate only.
    assert r3[(2, 2, 2)] == {"dp": [0, 1, 2, 3], "fsdp": [2, 3], "ep": [2, 3], "hsdp": [0, 1, 2, 3], "efsdp": [1, 3]}
    assert r0[(1, 4, 1)]["ep"] == [0] and r0[(1, 4, 1)]["efsdp"] == [0, 1, 2, 3]


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits for a peer that is gone: run_distributed must kill it, not hang


def test_run_distributed_reports_the_failing_rank():
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2 failed.*boom from rank 1"):
        run_distributed(_fail_on_rank_1, 2)
    assert time.monotonic() - t0 < 55  # well before gloo's 60 s timeout would have freed rank 0
