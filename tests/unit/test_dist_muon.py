"""Distributed Muon, QK-clip and grad clipping on gloo CPU ranks (spawned inside pytest) against a
single-process reference built from the same weights and gradients. fp32 everywhere; tolerance 1e-6.

Covered layouts: FSDP2 fully_shard over a 1-D mesh (2-D weights with even, uneven and empty row shards;
a 3-D expert stack sharded along the expert dim, empty shards at 4 ranks), a weight sharded along its
columns, and at 4 ranks on a 2x2 mesh: HSDP (Replicate, Shard(0)), an expert stack (Shard(0), Shard(1)),
(Shard(0), Shard(1)) on a 2-D weight (the full_tensor fallback), and expert stacks placed the way
kimi/parallel does (EP Shard(0), then fully_shard over the other mesh dim on dim 0 or dim 1); and ZeRO's
flat partitions (zero_muon.orthogonalize_flat, the DeepSpeed engine's path), matrices straddling partitions.
Muon runs each with the default Newton-Schulz and with Polar Express on Gram iterations (NS_VARIANTS):
the distributed paths pass the choice through to the one newton_schulz.
"""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  imported before forking, so ranks do not each import it
import torch.distributed.tensor  # noqa: F401
import torch.multiprocessing as mp
from torch import nn

from kimi.config import OptimConfig
from kimi.optim.grad_clip import clip_grad_norm_
from kimi.optim.muon import Muon, build_optimizer
from kimi.optim.qk_clip import QKClip, all_reduce_max
from tests.unit.test_qk_clip import StandInMLA

TOL = dict(rtol=1e-6, atol=1e-6)
STEPS = 3
# Muon / OptimConfig keyword arguments: the plain loop (what bf16 runs) and Gram iterations
NS_VARIANTS = [dict(ns_gram=False), dict(ns_method="polar_express", ns_gram=True)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 16)  # AdamW
        self.l1 = nn.Linear(16, 24)  # 24 rows: even shards; its bias goes to AdamW
        self.l2 = nn.Linear(24, 10)  # 10 rows over 4 ranks: 3, 3, 3, 1
        self.l3 = nn.Linear(10, 5, bias=False)  # 5 rows over 4 ranks: 2, 2, 1, 0
        self.l4 = nn.Linear(10, 24, bias=False)  # same shape as l1: batched NS on its owner
        self.experts_w1 = nn.Parameter(torch.randn(2, 12, 16) * 0.1)  # 2 experts over 4 ranks: 1, 1, 0, 0

    def forward(self, x):
        return self.l3(self.l2(self.l1(x)))


def _grads(named, step):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=g) for n, p in named}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_fsdp_muon(mesh, ns):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(0)
    ref = Net()
    model = Net()
    model.load_state_dict(ref.state_dict())
    fully_shard(model, mesh=mesh)
    opt_ref, opt = build_optimizer(ref, OptimConfig(lr=0.02, **ns)), build_optimizer(model, OptimConfig(lr=0.02, **ns))
    opt.chunk_numel = 300  # the sharded run steps in several chunks (each a collective), the reference in one
    for step in range(STEPS):
        grads = _grads(ref.named_parameters(), step)
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        for n, p in model.named_parameters():
            p.grad = distribute_tensor(grads[n].clone(), p.device_mesh, p.placements)
        opt_ref.step()
        opt.step()
    for (n, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        assert type(p).__name__ == "DTensor", n
        torch.testing.assert_close(_full(p.detach()), p_ref.detach(), **TOL, msg=n)
        assert (p_ref.detach() - Net().state_dict()[n]).abs().max() > 1e-3  # it did train
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # FSDP's all-gather sees the in-place updates of the local shards
        torch.testing.assert_close(model(x), ref(x), **TOL)


def _layout_params(world):
    """[(full tensor, the same as a DTensor parameter)] in layouts placed by hand or composed like
    kimi/parallel (EP Shard(0) over `ep`, then fully_shard over `efsdp`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    mesh1 = init_device_mesh("cpu", (world,))
    layouts = [(mesh1, (Shard(1),), (12, 10))]  # shard along columns: gathered on dim 1
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
        layouts += [
            (mesh2, (Replicate(), Shard(0)), (9, 8)),  # HSDP
            (mesh2, (Shard(0), Shard(1)), (4, 7, 6)),  # experts: one mesh dim on E, the other on F
            (mesh2, (Shard(0), Shard(1)), (8, 6)),  # both matrix dims split: full_tensor fallback
        ]
    out = [
        (f, nn.Parameter(distribute_tensor(f.clone(), m, pl)))
        for m, pl, shape in layouts
        for f in [torch.randn(shape, generator=g)]
    ]
    if world == 4:
        for E, dim in [(4, 0), (2, 1)]:  # -> (_StridedShard(0), Shard(0)): local NS; (Shard(1), Shard(0)): gathered
            full = torch.randn(E, 6, 8, generator=g)
            experts = nn.Module()
            experts.w = nn.Parameter(distribute_tensor(full.clone(), mesh2["ep"], [Shard(0)]))
            fully_shard(experts, mesh=mesh2["efsdp"], shard_placement_fn=lambda p, dim=dim: Shard(dim))
            out.append((full, experts.w))
    return out


def _check_manual_layouts(world, ns):
    """Muon on DTensor params in each layout vs plain params."""
    from torch.distributed.tensor import distribute_tensor

    pairs = _layout_params(world)
    ref = [nn.Parameter(f.clone()) for f, _ in pairs]
    dps = [d for _, d in pairs]
    opt_ref, opt = Muon(ref, lr=0.02, **ns), Muon(dps, lr=0.02, **ns)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(200 + step)
        for r, d in zip(ref, dps):
            full_g = torch.randn(r.shape, generator=g)
            r.grad = full_g.clone()
            d.grad = distribute_tensor(full_g.clone(), d.device_mesh, d.placements)
        opt_ref.step()
        opt.step()
    for r, d in zip(ref, dps):
        torch.testing.assert_close(_full(d.detach()), r.detach(), **TOL, msg=str(d.placements))


def _check_zero_flat(rank, world, ns):
    """orthogonalize_flat on this rank's equal partition of a flat buffer (matrices back to back, some
    straddling partitions, padding at the end) == its one-process call on the whole buffer, which is each
    matrix's update, scaled (to 1e-4 relative: it runs them batched, which rounds differently)."""
    from kimi.optim.newton_schulz import NSSpec
    from kimi.optim.zero_muon import FlatShard, orthogonalize_flat

    spec = NSSpec(ns.get("ns_method", "quintic"), gram=ns.get("ns_gram", False))
    shapes = [torch.Size(s) for s in [(6, 20), (3, 8, 16), (20, 6), (5, 5), (6, 20)]]
    offsets, at = [], 0
    for s in shapes:
        offsets.append(at)
        at += s.numel()
    numel = -(-(at + 3) // world) * world  # >= 3 elements of padding, divisible by world
    scales = [0.5 + j for j in range(len(shapes))]
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(6))
    ref = orthogonalize_flat(FlatShard(shapes, offsets, scales, numel, 0, 1, None), flat.clone(), spec, torch.float32)
    for s, o, c in zip(shapes, offsets, scales):
        one = spec(flat[o : o + s.numel()].view(s), torch.float32).reshape(-1) * c
        torch.testing.assert_close(ref[o : o + s.numel()], one, rtol=1e-4, atol=1e-5)
    assert not ref[at:].any()  # padding
    shard = FlatShard(shapes, offsets, scales, numel, rank, world, dist.group.WORLD)
    part = orthogonalize_flat(shard, flat[shard.start : shard.start + shard.size].clone(), spec, torch.float32)
    torch.testing.assert_close(part, ref[shard.start : shard.start + shard.size], **TOL)
    assert part.abs().max() > 0.1  # real updates, not zeros


def _check_qk_clip(mesh, rank, world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(2)
    ref = StandInMLA(D=16, H=3, n=8, r=3)  # q rows 33, k rows 24: uneven shards at 2 and 4 ranks
    with torch.no_grad():
        ref.q_proj.weight.view(3, 11, 16)[1] *= 8
    m = StandInMLA(D=16, H=3, n=8, r=3)
    m.load_state_dict(ref.state_dict())
    fully_shard(m, mesh=mesh)
    xs = torch.randn(world, 2, 6, 16, generator=torch.Generator().manual_seed(3))
    for i in range(world):  # the reference sees every rank's batch
        ref(xs[i : i + 1].reshape(2, 6, 16))
    m(xs[rank : rank + 1].reshape(2, 6, 16))
    m.reshard()  # in training, backward leaves the params sharded before the optimizer step
    tau = float(ref.max_logits_H.sort().values[1:].mean())  # clips the top head(s), not all
    s_ref = QKClip([ref], tau=tau).step()
    s = QKClip([m], tau=tau, reduce_fn=all_reduce_max(mesh.get_group())).step()
    assert s == s_ref and 0 < s["clipped_heads"] < 3, (s, s_ref)
    for (n, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        assert type(p).__name__ == "DTensor", n
        torch.testing.assert_close(_full(p.detach()), p_ref.detach(), **TOL, msg=n)


def _check_grad_clip(mesh, world):
    """Norm over plain tensors + FSDP DTensors + DTensors on other meshes == one-process norm."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(4)
    ref = Net()
    model = Net()
    model.load_state_dict(ref.state_dict())
    plain_ref, plain = nn.Parameter(torch.zeros(7)), nn.Parameter(torch.zeros(7))  # replicated, not a DTensor
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(5)
    refs, dists = [plain_ref, *ref.parameters()], [plain, *model.parameters()]
    for f, d in _layout_params(world):
        refs.append(nn.Parameter(f.clone()))
        dists.append(d)
    for r, d in zip(refs, dists):
        full_g = torch.randn(r.shape, generator=g)
        r.grad = full_g.clone()
        d.grad = distribute_tensor(full_g.clone(), d.device_mesh, d.placements) if hasattr(d, "to_local") else full_g
    norm_ref = torch.nn.utils.clip_grad_norm_(refs, 1.0)
    norm = clip_grad_norm_(dists, 1.0)
    torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)
    assert norm > 1.0  # the clip did something
    for r, d in zip(refs, dists):
        torch.testing.assert_close(_full(d.grad), r.grad, **TOL)


def _worker(rank, world, port):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        for ns in NS_VARIANTS:
            _check_fsdp_muon(mesh, ns)
            _check_manual_layouts(world, ns)
            _check_zero_flat(rank, world, ns)
        _check_qk_clip(mesh, rank, world)
        _check_grad_clip(mesh, world)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_single_process(world):
    # fork: the ranks inherit the imported torch (a spawned rank spends seconds re-importing it)
    mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, join=True, start_method="fork")


def test_world_size_one_needs_no_process_group():
    """Plain tensors: the same class, no collectives (no process group exists here), and the same math as
    the reference written out from Muon's contract: EMA momentum, Nesterov, Newton-Schulz, decoupled weight
    decay, lr * 0.2 * sqrt(max(A, B)); grad clipping returns the pre-clip norm and scales to max_norm."""
    from kimi.optim.newton_schulz import newton_schulz

    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4, generator=gen))
    grads = [torch.randn(8, 4, generator=gen) for _ in range(2)]
    lr, wd, mom = 0.02, 0.1, 0.9
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=mom, ns_dtype=torch.float32)
    p0 = ref = p.detach().clone()
    buf = torch.zeros(8, 4)
    for g in grads:  # two steps: the second one uses the momentum the first one left
        p.grad = g.clone()
        opt.step()
        buf = mom * buf + (1 - mom) * g
        ref = ref * (1 - lr * wd) - lr * 0.2 * 8**0.5 * newton_schulz(g + mom * (buf - g), 5, dtype=torch.float32)
        torch.testing.assert_close(p.detach(), ref, **TOL)
    assert (p.detach() - p0).abs().max() > 1e-3  # the steps moved p by far more than the tolerance

    g = grads[0] * 3
    p.grad = g.clone()
    norm = clip_grad_norm_([p], 1.0)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(g), **TOL)
    torch.testing.assert_close(p.grad, g / (torch.linalg.vector_norm(g) + 1e-6), **TOL)
    assert torch.linalg.vector_norm(g) > 2  # so the clip really scaled
