"""The engine interface (kimi/engine/): DeepSpeed ZeRO-1/2 against FSDP2 on 2 gloo CPU ranks, debug model, EP=2.

One spawn runs everything that needs the two ranks (each engine from the same seed and data, a few steps
of the loop's own calls: engine.model -> engine.backward per micro-batch -> engine.clip_grad_norm -> engine.step -> router bias):
  - Muon and AdamW: ZeRO-1 and ZeRO-2 give the FSDP2 engine's losses, grad norms and parameters;
  - expert weights differ across EP ranks, and each rank's experts are the FSDP2 engine's shard;
  - a DeepSpeed checkpoint round trip (save, keep going; load into a fresh engine, same steps) is exact;
  - a user JSON override reaches DeepSpeed.

Tolerance: parameters 5e-6 absolute (weights ~0.02-1, moved >= 3e-3 by the steps), losses 1e-6 and grad
norms 1e-6 relative. Measured (2-core CPU, fp32): parameters differ by <= 3e-7 with Muon and <= 1.5e-6 with
AdamW (ZeRO-2; Adam's division by sqrt(v) magnifies last-bit gradient differences), losses by <= 8e-8 and
norms by <= 2.1e-7 relative. What limits it: the engines reduce gradients in a different order (FSDP2's
reduce-scatter vs ZeRO's bucketed reduce to each partition's owner; ZeRO-2 reduces every micro-batch,
ZeRO-1 once) and clip with a different formula (DeepSpeed divides by (norm + 1e-6) / max, we multiply by
max / (norm + 1e-6)). The debug run clips (norms ~1.2 > 1.0), so clipping is part of what matches.
Every engine computes its loss with the chunked cross-entropy (model.loss_chunk_tokens=48), and the golden
curve they follow was made with the full logits (tests/golden).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi.checkpoint import CheckpointError
from kimi.config import ConfigError, load_config
from tests.dist_utils import run_distributed

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
ENGINES = [("fsdp2", 1), ("deepspeed", 1), ("deepspeed", 2)]
PARAM_ATOL = 5e-6
LOSS_RTOL = 1e-6
NORM_RTOL = 1e-6


def _cfg(out, engine="fsdp2", *extra):
    return load_config(
        ROOT / "configs" / "debug.yaml",
        [
            f"--train.out_dir={out}",
            "--logging.mlflow=false",
            f"--train.max_steps={STEPS + 2}",
            "--train.eval_interval=0",
            "--train.micro_batch_size=2",  # 8 sequences / 2 ranks / 2 per micro-batch: 2 accumulation steps
            "--parallel.ep=2",
            f"--parallel.engine={engine}",
            "--model.loss_chunk_tokens=48",  # the chunked cross-entropy, 3 chunks (a short last one) of 128 tokens
            *extra,
        ],
    )


def _runtime(cfg):
    from kimi.engine import engine_class
    from kimi.runtime import setup_runtime

    return setup_runtime(cfg.train, cfg.parallel, cfg.model, engine_class(cfg.parallel.engine).needs_process_group)


def _build(cfg, rt):
    from kimi.data.dataset import BatchIterator, build_dataset
    from kimi.engine import build_engine
    from kimi.model import KimiModel

    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, KimiModel(cfg.model).to(rt.device), rt)
    data = build_dataset(cfg.data, cfg.block_size, cfg.model.vocab_size, cfg.train.seed)
    batches = BatchIterator(data, cfg.train.global_batch_size, cfg.train.micro_batch_size, rt.rank, rt.world)
    return engine, batches


def _train(engine, batches, rt, steps):
    """The trainer's calls to the engine (kimi/train.py train_step). Returns (losses, grad norms)."""
    from kimi.parallel import update_router_bias

    losses, norms = [], []
    for _ in range(steps):
        micro = batches.next_step()
        loss = torch.zeros(())
        for i, (x, y) in enumerate(micro):
            out = engine.model(x, y)
            engine.backward(out.loss, i, len(micro))
            loss += out.ce_loss.detach()
        norms.append(engine.grad_norm().item())
        engine.step()
        update_router_bias(engine.raw_model)
        losses.append(rt.all_reduce_mean(loss / len(micro)).item())
    return losses, norms


def _params(engine, ep_rank, ep):
    """name -> this rank's view: dense weights whole, experts this EP rank's shard (L, F, D)."""
    out = {}
    for name, p in engine.raw_model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        if ".experts." in name and t.shape[0] == engine.raw_model.config.moe.num_experts:
            t = t.chunk(ep)[ep_rank]
        out[name] = t.detach().clone()
    return out


def _all(rank, world, tmp):
    from kimi.checkpoint import Checkpointer

    res = {}
    for optim in ("muon", "adamw"):
        for engine, stage in ENGINES:
            cfg = _cfg(f"{tmp}/{optim}", engine, f"--optim.name={optim}", f"--parallel.zero_stage={stage}")
            rt = _runtime(cfg)
            eng, batches = _build(cfg, rt)
            initial = _params(eng, rank, 2)
            losses, norms = _train(eng, batches, rt, STEPS)
            res[optim, engine, stage] = (losses, norms, _params(eng, rank, 2), initial)

    # Checkpoint round trip (ZeRO-2, Muon): save after 2 steps, train 1 more; a fresh engine loads and repeats it.
    cfg = _cfg(f"{tmp}/ckpt", "deepspeed", "--parallel.zero_stage=2")
    rt = _runtime(cfg)
    eng, batches = _build(cfg, rt)
    _train(eng, batches, rt, 2)
    saved = Checkpointer(cfg, eng, {"scheduler": eng.schedule_state, "data": batches}).save(2, last=True)
    after = _train(eng, batches, rt, 1), _params(eng, rank, 2)
    eng2, batches2 = _build(cfg, rt)
    with torch.no_grad():  # whatever the fresh engine holds must be replaced by the load
        for p in eng2.raw_model.parameters():
            p.add_(0.5)
    ckpt2 = Checkpointer(cfg, eng2, {"scheduler": eng2.schedule_state, "data": batches2})
    train_state = ckpt2.load()
    meta = json.loads((saved / "meta.json").read_text())
    resumed = _train(eng2, batches2, rt, 1), _params(eng2, rank, 2)
    res["ckpt"] = (after, resumed, meta, sorted(p.name for p in saved.iterdir()), ckpt2.latest() == saved)
    res["ckpt_step"] = train_state["step"]
    other_cfg = _cfg(f"{tmp}/ckpt", "fsdp2")
    other, other_batches = _build(other_cfg, rt)
    try:
        Checkpointer(other_cfg, other, {"scheduler": other.schedule_state, "data": other_batches}).load()
        res["wrong_engine"] = None
    except CheckpointError as e:
        res["wrong_engine"] = str(e)

    # A user JSON merged over the generated one: a field we can read back from DeepSpeed.
    user = Path(tmp) / "ds.json"
    if rank == 0:
        user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123456}}))
    torch.distributed.barrier()
    cfg = _cfg(f"{tmp}/json", "deepspeed", "--parallel.zero_stage=2", f"--parallel.deepspeed_config={user}")
    eng, batches = _build(cfg, rt := _runtime(cfg))
    res["json"] = (eng.ds.optimizer.reduce_bucket_size, eng.ds.zero_optimization_stage())

    # A skipped step (train.nonfinite=skip) under ZeRO-2: NaN gradients on one rank; the norm says so on
    # both, and skip() leaves weights, fp32 masters and optimizer state as they were; the next step is clean.
    zero = eng.ds.optimizer
    _train(eng, batches, rt, 1)  # the optimizer holds state by now

    def snapshot():
        state = [v.clone() for st in eng._optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return [p.detach().clone() for p in eng.raw_model.parameters()] + [
            m.clone() for m in zero.single_partition_of_fp32_groups] + state  # fmt: skip

    def backward(micro, nan_on_rank1=False):
        for i, (x, y) in enumerate(micro):
            out = eng.model(x, y)
            eng.backward(out.loss * (float("nan") if nan_on_rank1 and rank == 1 else 1.0), i, len(micro))

    before, micro = snapshot(), batches.next_step()
    backward(micro, nan_on_rank1=True)
    nan_norm = eng.grad_norm()
    eng.skip()
    norms = []
    for _ in range(2):  # finite gradients, skipped twice: nothing stepped, nothing left over
        backward(micro)
        norms.append(eng.grad_norm().item())
        eng.skip()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    res["skip"] = (nan_norm.isfinite().item(), unchanged, len(before), norms)

    # QK-clip through the engine: ZeRO's fp32 master partitions must take the same row scaling as the model.
    from kimi.optim import QKClip

    attn = eng.raw_model.attention_layers()
    before = [p.detach().clone() for p in eng.raw_model.parameters()]
    for m in attn:
        m.max_logits_H.fill_(1000.0)  # every head over tau
    stats = QKClip(attn, tau=100.0, scale_fn=eng.scale_rows_).step()
    zero = eng.ds.optimizer
    masters_follow = all(
        torch.equal(master, zero.parallel_partitioned_bit16_groups[i][torch.distributed.get_rank(pg)])
        for i, (master, pg) in enumerate(zip(zero.single_partition_of_fp32_groups, zero.real_dp_process_group))
    )
    changed = sum(not torch.equal(a, b) for a, b in zip(before, eng.raw_model.parameters()))
    res["qk"] = (stats["clipped_heads"], changed, masters_follow)
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_all, 2, args=(str(tmp_path_factory.mktemp("engines")),), timeout=600)


def _assert_params_close(a, b, atol=PARAM_ATOL):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("optim", ["muon", "adamw"])
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_matches_fsdp2(runs, optim, stage):
    for rank_res in runs:
        ref_losses, ref_norms, ref_params, initial = rank_res[optim, "fsdp2", 1]
        losses, norms, params, _ = rank_res[optim, "deepspeed", stage]
        assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
        assert norms == pytest.approx(ref_norms, rel=NORM_RTOL)
        assert ref_params.keys() == params.keys()
        # The steps moved the weights by much more than the tolerance (else this would prove nothing).
        assert min((ref_params[n] - initial[n]).abs().max() for n in ref_params) > 100 * PARAM_ATOL
        _assert_params_close(params, ref_params)


def test_experts_differ_across_ep_ranks_and_match_fsdp2_shards(runs):
    r0, r1 = (r["muon", "deepspeed", 2][2] for r in runs)
    experts = [n for n in r0 if ".experts." in n]
    assert experts
    for n in experts:
        assert r0[n].shape[0] == 2  # 4 experts over ep=2
        assert (r0[n] - r1[n]).abs().max() > 1e-3, n  # each rank holds (and trained) its own experts
    # ...and each rank's are the FSDP2 engine's shard on that rank (checked for all params above; here by name)
    for rank_res in runs:
        ds, ref = rank_res["muon", "deepspeed", 2][2], rank_res["muon", "fsdp2", 1][2]
        _assert_params_close({n: ds[n] for n in experts}, {n: ref[n] for n in experts})


def test_deepspeed_checkpoint_round_trip_is_exact(runs):
    for after, resumed, meta, files, latest_ok in (r["ckpt"] for r in runs):
        assert resumed[0] == after[0]  # losses and grad norm of the step after the checkpoint, bit for bit
        _assert_params_close(resumed[1], after[1], atol=0)
        assert meta["engine"] == "deepspeed" and meta["zero_stage"] == 2 and meta["ep"] == 2
        assert {"experts_ep000.pt", "experts_ep001.pt", "meta.json", "train_state.pt", "config.yaml"} <= set(files)
        assert latest_ok


def test_deepspeed_skip_leaves_the_state_untouched(runs):
    for nan_norm_finite, unchanged, n_tensors, norms in (r["skip"] for r in runs):
        assert not nan_norm_finite  # a NaN on rank 1 shows in the global norm on both ranks
        assert unchanged and n_tensors > 0  # weights, fp32 masters, optimizer state
        assert norms[0] == norms[1] and norms[0] > 0  # the skipped gradients were cleared, not accumulated


def test_qk_clip_scales_zero_master_weights(runs):
    for clipped, changed, masters_follow in (r["qk"] for r in runs):
        assert clipped > 0 and changed > 0
        assert masters_follow  # else ZeRO's next step would copy the unclipped masters back


def test_engines_follow_the_golden_curve(runs):
    """The loop's calls through either engine reproduce the single-process run (tests/golden), EP=2, 2 ranks."""
    golden = json.loads((ROOT / "tests" / "golden" / "debug_losses.json").read_text())["losses"][:STEPS]
    for engine, stage in ENGINES:
        assert runs[0]["muon", engine, stage][0] == pytest.approx(golden, rel=2e-5)


def test_fsdp2_engine_refuses_a_deepspeed_checkpoint_in_one_line(runs):
    for msg in (r["wrong_engine"] for r in runs):
        assert msg and "written by the deepspeed engine; resume it with --parallel.engine=deepspeed" in msg
        assert "\n" not in msg


def test_user_json_overrides_generated_config(runs):
    for bucket, stage in (r["json"] for r in runs):
        assert (bucket, stage) == (123456, 2)


def test_zero3_refused_in_one_line():
    cmd = [sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", "--parallel.engine=deepspeed",
           "--parallel.zero_stage=3"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("error: parallel.zero_stage=3 is not supported") and p.stderr.count("\n") == 1


def test_user_json_cannot_bring_zero3_or_its_own_optimizer(tmp_path):
    from kimi.engine.deepspeed import ds_config

    for bad, msg in (
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
        ({"optimizer": {"type": "Adam"}}, "sets optimizer"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ):
        (tmp_path / "ds.json").write_text(json.dumps(bad))
        cfg = _cfg(tmp_path, "deepspeed", f"--parallel.deepspeed_config={tmp_path / 'ds.json'}")
        with pytest.raises(ConfigError, match=msg):
            ds_config(cfg.optim, cfg.parallel, cfg.train, world=2, bf16=False)


def _one_process(rank, world, tmp):
    res = {}
    for engine in ("fsdp2", "deepspeed"):  # deepspeed makes its own one-rank process group
        cfg = _cfg(tmp, engine, "--parallel.ep=1")
        rt = _runtime(cfg)
        eng, batches = _build(cfg, rt)
        res[engine] = _train(eng, batches, rt, STEPS), _params(eng, 0, 1)
    return res


def test_deepspeed_one_process_matches_fsdp2(tmp_path):
    (res,) = run_distributed(_one_process, 1, args=(str(tmp_path),), init_pg=False, timeout=300)
    (ref_losses, ref_norms), ref_params = res["fsdp2"]
    (losses, norms), params = res["deepspeed"]
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL) and norms == pytest.approx(ref_norms, rel=NORM_RTOL)
    _assert_params_close(params, ref_params)


def _group_timeouts(rank, world, tmp):
    from torch.distributed import distributed_c10d as c10d

    cfg = _cfg(f"{tmp}/t", "deepspeed", "--parallel.timeout_s=17", "--parallel.zero_stage=2")
    rt = _runtime(cfg)  # init_pg=False: the runtime makes the process group, as under torchrun
    _build(cfg, rt)
    cpu = torch.device("cpu")
    return [(g.group_desc, g._get_backend(cpu).options._timeout.total_seconds()) for g in c10d._world.pg_map]


def test_every_group_times_out_after_parallel_timeout_s(tmp_path):
    """The world, the mesh's groups and DeepSpeed's own clone of the world: a hung rank stops each of
    their collectives after parallel.timeout_s, none waits torch's 30-minute default for new groups."""
    for timeouts in run_distributed(_group_timeouts, 2, args=(str(tmp_path),), init_pg=False, timeout=300):
        assert len(timeouts) > 3 and {t for _, t in timeouts} == {17.0}, timeouts


def test_zero_reduce_bucket_is_capped_at_the_rank_parameters(tmp_path):
    """DeepSpeed allocates its whole reduce bucket at every backward (5e8 elements by default: 2 GB per CPU
    rank, 1 GB per GPU in bf16, measured 2e9 bytes for the 0.6M-parameter debug model); ds_config caps it at
    the rank's parameter count, which still holds every gradient of the rank (one bucket, as before)."""
    from kimi.engine.deepspeed import DEEPSPEED_BUCKET, ds_config

    cfg = _cfg(tmp_path, "deepspeed")
    for local, want in ((611_584, 611_584), (10 * DEEPSPEED_BUCKET, DEEPSPEED_BUCKET)):
        gen = ds_config(cfg.optim, cfg.parallel, cfg.train, world=2, bf16=False, local_params=local)
        assert gen["zero_optimization"]["reduce_bucket_size"] == want
