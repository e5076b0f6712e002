"""kimi.bench compare / throughput / memory: the baseline model against a nanoGPT reference, the matching of
active parameters, the loss measurements, and each command's --quick mode through the real CLI (so the
benchmarks do not rot). Speeds are never asserted."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kimi.bench.compare import full_split_loss, gap_table, gaps_by_tokens, markdown_table, summarise, tokens_to_reach
from kimi.bench.variants import (
    _width_overrides,
    baseline_at_total,
    build_variants,
    matched_pair,
    nanogpt_overrides,
    param_counts,
)
from kimi.config import ConfigError, load_config, merge_dicts
from kimi.data.dataset import ToyDataset
from kimi.model import KimiModel

ROOT = Path(__file__).resolve().parents[2]
BYTE = str(ROOT / "configs" / "bench" / "byte.yaml")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kimi.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


# ----------------------------------------------------------------------------- the baseline model


class NanoGPTReference(nn.Module):
    """nanoGPT's model.py (bias=False, dropout=0) reduced to its forward: the reference for our baseline."""

    def __init__(self, V, T, D, H, L):
        super().__init__()
        self.H = H
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.h = nn.ModuleList(
            nn.ModuleDict(dict(ln_1=nn.LayerNorm(D, bias=False), c_attn=nn.Linear(D, 3 * D, bias=False),
                               c_proj=nn.Linear(D, D, bias=False), ln_2=nn.LayerNorm(D, bias=False),
                               c_fc=nn.Linear(D, 4 * D, bias=False), mlp_proj=nn.Linear(4 * D, D, bias=False)))
            for _ in range(L))  # fmt: skip
        self.ln_f = nn.LayerNorm(D, bias=False)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            q, k, v = b.c_attn(b.ln_1(x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.H, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b.c_proj(y)
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x))))
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head


def test_baseline_matches_nanogpt_reference():
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 97, "block_size": 32}
    ov = nanogpt_overrides(load_config(None, {"model": shape}), 1e-3)
    cfg = load_config(None, {**ov, "model": {**ov["model"], **shape}})
    torch.manual_seed(0)
    ours = KimiModel(cfg.model)
    ref = NanoGPTReference(97, 32, 64, 4, 2)
    with torch.no_grad():
        for p in ours.parameters():  # non-trivial norm weights, so a swapped norm would show
            p.add_(torch.randn_like(p) * 0.05)
        ref.wte.weight.copy_(ours.embed_tokens.weight)
        ref.wpe.weight.copy_(ours.embed_positions.weight)
        ref.ln_f.weight.copy_(ours.norm.weight)
        for b, blk in zip(ref.h, ours.layers):
            a = blk.attn
            b.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            b.c_proj.weight.copy_(a.o_proj.weight)
            b.ln_1.weight.copy_(blk.attn_norm.weight)
            b.ln_2.weight.copy_(blk.ffn_norm.weight)
            b.c_fc.weight.copy_(blk.ffn.up_proj.weight)
            b.mlp_proj.weight.copy_(blk.ffn.down_proj.weight)
    idx = torch.randint(0, 97, (3, 32))
    assert ours.lm_head.weight is ours.embed_tokens.weight
    torch.testing.assert_close(ours(idx).logits, ref(idx), rtol=1e-5, atol=1e-5)
    # nanoGPT's own count for shakespeare_char (6 x 384, vocab 65) is 10.65M = 10,621,824 + the 65 x 384 wte.
    baseline = build_variants(BYTE, [1e-3], [])[0][0]
    counts = param_counts(load_config(BYTE, baseline.overrides))
    assert counts["params_non_embedding"] == 10_621_824


def test_model_switches_are_validated():
    with pytest.raises(ConfigError, match="model.pos_emb=learned needs attention.type=mha"):
        load_config(None, {"model": {"pos_emb": "learned"}})
    with pytest.raises(ConfigError, match="model.norm='batchnorm' is not one of"):
        load_config(None, {"model": {"norm": "batchnorm"}})


def test_variants_match_active_non_embedding_params():
    variants, target = build_variants(BYTE, [5e-4, 1e-3, 2e-3], ["dense_muon", "kimi_mha", "kimi_e16k4"])
    assert [v.name for v in variants][:4] == ["nanogpt_lr0.0005", "nanogpt_lr0.001", "nanogpt_lr0.002", "kimi"]
    for v in variants:
        cfg = load_config(BYTE, v.overrides)
        assert (cfg.model.n_layer, cfg.model.n_embd) == (6, 384), v.name
        active = param_counts(cfg)["params_active_non_embedding"]
        # The FFN width is rounded to 8: the count lands within half of what 8 more units would add (with
        # 8 active experts + 1 shared that is ~2% of the target, with top-2 under 1%).
        h = cfg.model.moe.expert_hidden if cfg.model.moe.use_moe else cfg.model.intermediate_size
        wider = merge_dicts(v.overrides, _width_overrides(cfg, h + 8))  # the FFN widths kimi.bench solves, +8
        step = param_counts(load_config(BYTE, wider))["params_active_non_embedding"] - active
        assert 0 < step < 0.05 * target and abs(active - target) <= step / 2, (v.name, active, target, step)
    kimi = param_counts(load_config(BYTE, variants[3].overrides))
    assert kimi["params_total"] > 2 * kimi["params_active"]  # the MoE holds more than it uses per token


def test_kimi_adamw_keeps_one_lr_where_the_recipe_splits_it():
    """byte.yaml puts the routed experts on AdamW at lr / 6; the all-AdamW ablation must not inherit that."""
    variants, _ = build_variants(BYTE, [1e-3], ["kimi_adamw"])
    kimi, ablation = (load_config(BYTE, v.overrides).optim for v in variants[1:])
    assert (kimi.name, kimi.expert_optimizer, kimi.expert_lr_mult) == ("muon", "adamw", pytest.approx(1 / 6))
    assert (ablation.name, ablation.expert_lr_mult) == ("adamw", 1.0)


def test_baseline_at_total_holds_as_many_params_as_nanokimi():
    kimi_cfg, base_cfg = matched_pair(BYTE, [])
    wide = baseline_at_total(BYTE, [])
    kimi, wide_n = param_counts(kimi_cfg)["params_total"], param_counts(wide)["params_total"]
    assert abs(wide_n - kimi) / kimi < 0.003, (wide_n, kimi)  # MLP width rounded to 8: 37k params
    assert wide.model.intermediate_size > base_cfg.model.intermediate_size  # only the MLP grew
    assert (wide.model.n_layer, wide.model.n_embd, wide.model.mlp) == (6, 384, "gelu")


# ----------------------------------------------------------------------------- measurements


def test_tokens_to_reach_interpolates():
    curve = [(100, 3.0), (200, 2.0), (300, 1.5)]
    assert tokens_to_reach(curve, 2.5) == 150
    assert tokens_to_reach(curve, 1.5) == 300
    assert tokens_to_reach(curve, 3.5) == 100
    assert tokens_to_reach(curve, 1.0) is None


def test_summary_gives_tokens_and_seconds_to_the_reference_loss():
    # Two seeds; the model reaches the reference's final curve loss in half its tokens and a third of its time.
    def run(variant, seed, curve, seconds):
        return {"variant": variant, "group": variant, "about": "", "lr": 1e-3, "seed": seed, "tokens": 300,
                "params_total": 1, "params_active": 1, "params_non_embedding": 1, "params_active_non_embedding": 1,
                "curve": curve, "curve_time": [(t, loss) for t, (_, loss) in zip(seconds, curve)],
                "final_curve_val": curve[-1][1], "final_val_loss": curve[-1][1], "train_time_s": seconds[-1],
                "tokens_per_s": None, "peak_rss_bytes": None}  # fmt: skip

    ref = [(100, 3.0), (200, 2.0), (300, 1.0)]
    runs = [run("dense_muon", s, ref, [10, 20, 30]) for s in (1, 2)]
    runs += [run("kimi", 1, [(100, 2.0), (150, 1.0), (300, 0.5)], [5, 10, 20]),
             run("kimi", 2, [(100, 2.5), (150, 1.0), (300, 0.7)], [5, 10, 20])]  # fmt: skip
    rows = {row["variant"]: row for row in summarise(runs, "dense_muon")}
    assert rows["dense_muon"]["speedup_tokens"] == 1.0 and rows["dense_muon"]["speedup_time"] == 1.0
    assert rows["kimi"]["tokens_to_baseline"] == 150 and rows["kimi"]["speedup_tokens"] == 2.0
    assert rows["kimi"]["time_to_baseline_s"] == 10 and rows["kimi"]["speedup_time"] == 3.0
    assert rows["kimi"]["n_seeds"] == 2 and "| 10 | 3.00 |" in markdown_table(list(rows.values()), "")
    # The gap against the reference at the evals both ran, per seed, then its mean and range.
    assert gaps_by_tokens(runs) == {"kimi": {100: [-1.0, -0.5], 300: [-0.5, pytest.approx(-0.3)]}}
    # A seed that never reaches the reference's loss leaves the mean to the others, and the table says so.
    runs[3] = run("kimi", 2, [(100, 2.5), (150, 1.5), (300, 1.2)], [5, 10, 20])
    rows = {row["variant"]: row for row in summarise(runs, "dense_muon")}
    assert rows["kimi"]["tokens_to_baseline"] == 150 and rows["kimi"]["n_reached"] == 1
    assert "| 150 (1 of 2 seeds) | 2.00 (1 of 2 seeds) |" in markdown_table(list(rows.values()), "")
    runs[3] = run("kimi", 2, [(100, 2.5), (150, 1.0), (300, 0.7)], [5, 10, 20])
    table = gap_table(runs)
    assert "| 100 | -0.7500 [-1.0000, -0.5000] (2) |" in table and "| 300 | -0.4000 [-0.5000, -0.3000] (2) |" in table
    assert "- kimi: too few evals in the last half of the budget" in table  # its trend line (one eval past 150)


def test_tabling_against_a_named_reference(tmp_path):
    """--from-runs --reference kimi: an ablation of kimi (here kimi_mha) measured against kimi, with no
    baseline or dense_muon among the runs; a name that is not among them is one line of bad input."""

    def run(variant, curve):
        return {"variant": variant, "group": variant, "about": "", "lr": 1e-3, "seed": 1, "tokens": 300,
                "params_total": 1, "params_active": 1, "params_non_embedding": 1, "params_active_non_embedding": 1,
                "curve": curve, "curve_time": curve, "final_curve_val": curve[-1][1], "final_val_loss": curve[-1][1],
                "train_time_s": 30, "tokens_per_s": None, "peak_rss_bytes": None}  # fmt: skip

    runs = [run("kimi", [(100, 3.0), (300, 2.0)]), run("kimi_mha", [(100, 2.5), (300, 1.5)])]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    r = _cli("compare", "--from-runs", str(tmp_path / "runs.json"), "--no-mlflow", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.endswith("table them with --reference VARIANT\n")  # no default reference
    r = _cli("compare", "--from-runs", str(tmp_path / "runs.json"), "--no-mlflow", "--reference", "kimi",
             "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(row["variant"], row["reference"]) for row in res["rows"]] == [("kimi", True), ("kimi_mha", False)]
    assert "minus kimi's" in (tmp_path / "results.md").read_text() and "| 300 | -0.5000" in r.stdout
    # the header names the tabled files, not this process's config default and threads
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert header.startswith(f"`python -m kimi.bench compare --from-runs {tmp_path / 'runs.json'}`: 300 tokens")
    assert "threads" not in header and "--config" not in header
    assert "config" not in res and res["from_runs"] == str(tmp_path / "runs.json")
    assert not (tmp_path / "lr_sweep.png").exists()  # no variant ran at two lrs
    r = _cli("compare", "--from-runs", str(tmp_path / "runs.json"), "--reference", "kimi_mla", "--out", str(tmp_path))
    assert (
        r.returncode == 2
        and r.stderr == "error: --reference=kimi_mla: no such variant in the runs; give one of kimi, kimi_mha\n"
    )


def test_an_lr_sweep_of_one_variant_is_tabled_per_lr_not_averaged_as_seeds(tmp_path):
    """dense_muon run at two lrs (--optim.lr overrides), merged with --from-runs: two rows named by lr, each
    one seed, measured against the one named as --reference; never one row averaging the two lrs."""

    def run(lr, curve):
        return {"variant": "dense_muon", "group": "dense_muon", "about": "", "lr": lr, "seed": 1, "tokens": 300,
                "params_total": 1, "params_active": 1, "params_non_embedding": 1, "params_active_non_embedding": 1,
                "curve": curve, "curve_time": curve, "final_curve_val": curve[-1][1], "final_val_loss": curve[-1][1],
                "train_time_s": 30, "tokens_per_s": None, "peak_rss_bytes": None}  # fmt: skip

    (tmp_path / "a.json").write_text(json.dumps([run(6e-3, [(100, 3.0), (300, 2.0)])]))
    (tmp_path / "b.json").write_text(json.dumps([run(4e-3, [(100, 3.2), (300, 1.9)])]))
    files = f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    r = _cli(
        "compare", "--from-runs", files, "--no-mlflow", "--reference", "dense_muon@lr0.006", "--out", str(tmp_path)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(row["variant"], row["final_val_loss"], row["n_seeds"]) for row in rows] == [
        ("dense_muon@lr0.006", 2.0, 1), ("dense_muon@lr0.004", 1.9, 1)]  # fmt: skip
    assert "| 300 | -0.1000" in r.stdout  # the gap of 4e-3 against 6e-3
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0  # final loss against lr


def test_full_split_loss_scores_every_token_once():
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / "configs" / "debug.yaml")).model
    model = KimiModel(cfg)
    ds = ToyDataset(cfg.vocab_size, 16, split="val", num_tokens=16 * 5 + 3)  # 5 whole windows + a remainder
    res = full_split_loss(model, ds, batch_size=2)
    assert res["tokens"] == 16 * 5
    with torch.no_grad():
        data = torch.from_numpy(ds._data)
        ref = F.cross_entropy(model(data[:80].view(5, 16)).logits.reshape(80, -1), data[1:81])
    assert math.isclose(res["loss"], ref.item(), rel_tol=1e-6)


def test_loss_by_position_buckets_the_per_position_loss():
    """Each bucket is the mean loss of the targets at those window positions over the split's windows,
    as a direct per-position computation gives it; the buckets are issue 19's, cut at the window."""
    from kimi.bench.positions import bucket_edges, loss_by_position

    assert bucket_edges(2048) == [0, 256, 1024, 2048] and bucket_edges(512) == [0, 256, 512]
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / "configs" / "debug.yaml")).model
    model = KimiModel(cfg)
    ds = ToyDataset(cfg.vocab_size, 16, split="val", num_tokens=16 * 5 + 3)
    got = loss_by_position(model, ds, [0, 4, 16], batch_size=2)
    with torch.no_grad():
        data = torch.from_numpy(ds._data).long()
        nll = F.cross_entropy(model(data[:80].view(5, 16)).logits.reshape(80, -1), data[1:81], reduction="none")
    nll = nll.view(5, 16)
    assert got == pytest.approx({"0-4": nll[:, :4].mean().item(), "4-16": nll[:, 4:].mean().item()}, rel=1e-6)


def test_python_api_compare_models():
    from kimi.bench import NanoGPTComparison

    dbg = str(ROOT / "configs" / "debug.yaml")
    kimi = KimiModel(load_config(dbg).model)
    gpt = KimiModel(load_config(dbg, nanogpt_overrides(load_config(dbg), 1e-3)).model)
    ds = ToyDataset(512, 64, split="train", num_tokens=4096)
    res = NanoGPTComparison(steps=3, batch_size=2, eval_every=1).compare_models(kimi, gpt, ds)
    assert len(res["gpt"]["curve"]) == 3 and res["gpt"]["curve"][-1][0] == 3 * 2 * 64
    assert math.isfinite(res["kimi"]["val_loss"]) and res["target_loss"] == res["gpt"]["curve"][-1][1]


# ----------------------------------------------------------------------------- the commands, --quick


def test_compare_quick_against_dense_muon(tmp_path):
    """MoE against dense (no nanoGPT run): dense_muon is the reference, and the gap plot is drawn."""
    r = _cli("compare", "--quick", "--ablations", "dense_muon", "--only", "dense_muon,kimi", "--no-mlflow",
             "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["best_baseline"] == "dense_muon"
    assert {row["variant"]: row["reference"] for row in res["rows"]} == {"kimi": False, "dense_muon": True}
    assert (tmp_path / "gap_vs_tokens.png").stat().st_size > 0
    assert "minus dense_muon's at the same tokens" in (tmp_path / "results.md").read_text()  # and tabled


@pytest.mark.slow
def test_compare_resume_continues_a_killed_compare_on_the_same_curve(tmp_path):
    """SIGKILL a real `kimi.bench compare --resume` (and its training child) mid-run; the same command
    continues from the run's last checkpoint and gives the uninterrupted run's curve bit for bit; a third
    call trains nothing (the finished run's result.json is read back)."""
    import os
    import signal
    import time

    cmd = ["compare", "--quick", "--only", "kimi", "--no-mlflow", "--resume", "--eval-every", "2"]  # ckpt every 2
    assert _cli(*cmd, "--out", str(tmp_path / "whole")).returncode == 0
    metrics = tmp_path / "cut" / "runs" / "kimi-s1337" / "metrics.jsonl"
    ckpts = metrics.parent / "checkpoints"
    for _attempt in range(3):  # the 6 steps take ~1 s: on a fast or idle machine the kill can come too late
        shutil.rmtree(tmp_path / "cut", ignore_errors=True)
        p = subprocess.Popen([sys.executable, "-m", "kimi.bench", *cmd, "--out", str(tmp_path / "cut")], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while not any(c.suffix != ".tmp" for c in ckpts.glob("step_*")) and time.monotonic() < deadline:
            assert p.poll() is None, "compare ended before it could be killed"
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGKILL)  # right after the first checkpoint's rename (step 2)
        p.wait()
        steps_before = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        if len(steps_before) < 6:
            break
    assert len(steps_before) < 6, "the run finished before the kill, three times"
    r = _cli(*cmd, "--out", str(tmp_path / "cut"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in (tmp_path / "cut" / "runs" / "kimi-s1337.log").read_text()  # not started over
    whole, cut = (json.loads((tmp_path / d / "runs.json").read_text())[0] for d in ("whole", "cut"))
    assert cut["curve"] == whole["curve"] and cut["final_val_loss"] == whole["final_val_loss"]
    assert cut["train_steps"] == 6  # the tracker dropped the rows logged after the last checkpoint
    t0 = time.monotonic()
    r = _cli(*cmd, "--out", str(tmp_path / "cut"))
    assert r.returncode == 0 and json.loads((tmp_path / "cut" / "runs.json").read_text())[0] == cut
    assert not any("kimi.train" in line for line in r.stdout.splitlines()) and time.monotonic() - t0 < 60
    # ... unless it finished with other settings: refused in one line, not tabled as this budget's
    r = _cli(*cmd, "--optim.lr=1e-2", "--out", str(tmp_path / "cut"))
    assert r.returncode == 2 and "finished with other settings" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_sigterm_to_compare_stops_its_training_children_and_resume_continues(tmp_path):
    """SIGTERM to a real `kimi.bench compare` process alone (not its group, as `kill PID` or a scheduler
    sends it): its kimi.train child gets SIGTERM too, saves a checkpoint and exits, no later run starts,
    and compare exits 143; `--resume` then continues the run from that checkpoint."""
    import signal
    import time

    import psutil

    toy = ["--data.dataset=toy", "--data.mix=", "--train.global_batch_size=4", "--train.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "kimi.bench", "compare", "--config", "configs/debug.yaml", "--steps", "400",
           "--eval-every", "100", "--eval-batches", "1", "--only", "kimi,dense_muon", "--ablations", "dense_muon",
           "--no-mlflow", "--resume", "--out", str(tmp_path), *toy]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "kimi-s1337" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    children = psutil.Process(p.pid).children(recursive=True)
    assert any("kimi.train" in " ".join(c.cmdline()) for c in children)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=180)[0]
    gone, alive = psutil.wait_procs(children, timeout=10)
    for c in alive:  # a failing run must not leave a trainer behind
        c.kill()
    assert p.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert not alive, [c.cmdline() for c in alive]
    steps = len(metrics.read_text().splitlines())
    assert steps < 400 and (metrics.parent / "checkpoints" / "latest").exists()  # saved on the way out
    assert not (tmp_path / "runs" / "dense_muon-s1337").exists() and "FAILED" not in out  # nothing more started
    log = (tmp_path / "runs" / "kimi-s1337.log").read_text()
    r = subprocess.run([*cmd, "--only", "kimi"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "runs" / "kimi-s1337.log").read_text()[len(log) :]
    assert "resumed from" in log and json.loads((tmp_path / "runs.json").read_text())[0]["train_steps"] == 400


@pytest.mark.slow
def test_compare_quick(tmp_path):
    r = _cli("compare", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    names = [row["variant"] for row in res["rows"]]
    assert names == ["nanogpt_lr0.0005", "nanogpt_lr0.001", "kimi"]
    ref = next(row for row in res["rows"] if row["reference"])
    assert ref["variant"] == res["best_baseline"] and ref["speedup_tokens"] == 1.0
    for run in res["runs"]:  # same tokens for all; the whole-split loss is a real number; peak RSS measured
        assert run["tokens"] == 6 * 4 * 64 and math.isfinite(run["final_val_loss"]) and run["peak_rss_bytes"] > 0
        assert len(run["curve"]) == 6  # --quick evaluates every step
    assert "| **" + ref["variant"] in (tmp_path / "results.md").read_text()
    assert (tmp_path / "val_vs_tokens.png").stat().st_size > 0 and (tmp_path / "val_vs_time.png").exists()
    # Re-tabling finished runs (e.g. a sweep done in two goes) gives the same table, and logs it to MLflow.
    r = _cli("compare", "--from-runs", str(tmp_path / "runs.json"), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-2000:]
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["rows"] == res["rows"]
    from mlflow import MlflowClient

    # A client bound to this store: mlflow.set_tracking_uri() would export MLFLOW_TRACKING_URI into the
    # test process, and every later job it starts (the SLURM tests' included) would log to this store.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'merged' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("kimi-bench-compare").experiment_id])
    assert [run.info.run_name for run in found] == ["compare-summary"]
    assert found[0].data.metrics["kimi/final_val_loss"] == pytest.approx(res["rows"][2]["final_val_loss"])
    # A recipe variant trained alone (--only, renamed by --tag) and tabled beside the first go's runs.
    r = _cli("compare", "--quick", "--only", "kimi", "--tag", "fastbias", "--moe.bias_update_rate=0.01",
             "--out", str(tmp_path / "tagged"))  # fmt: skip
    assert r.returncode == 0 and "table them with --from-runs" in r.stdout, r.stderr[-2000:]
    r = _cli("compare", "--from-runs", f"{tmp_path / 'runs.json'},{tmp_path / 'tagged' / 'runs.json'}", "--no-mlflow",
             "--out", str(tmp_path / "both"))  # fmt: skip
    rows = json.loads((tmp_path / "both" / "results.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == [*names, "kimi+fastbias"]
    assert rows[-1]["final_val_loss"] != rows[2]["final_val_loss"]  # the override reached the training


@pytest.mark.parametrize(
    "args, needle",
    [
        (["compare", "--quick", "--ablations", "kimi_moar"], "unknown ablation(s) kimi_moar"),
        (["compare", "--quick", "--reference", "kimi"], "--reference only tables finished runs"),
        (["memory", "--quick", "--contexts", "1k"], "--contexts='1k': give comma-separated context lengths"),
        (["throughput", "--config", "configs/debug.yaml", "--steps", "3"], "--steps=3: need more than --warmup=3"),
        (["throughput", "--config", "configs/debug.yaml", "--warmup", "-1"], "--warmup=-1: need >= 0"),
        (["throughput", "--config", "configs/debug.yaml", "--rounds", "0"], "--rounds=0: need >= 1"),
        (["throughput", "--quick", "--ablations", "kimi_moar"], "unknown ablation(s) kimi_moar"),
        (["throughput", "--quick", "--ablations", "kimi_mha", "--ops", "-1"], "--ops=-1: give the number of ops"),
        (
            ["throughput", "--quick", "--ops", "5"],
            "--ops tables the ops of compare's variants: give it with --ablations",
        ),
        (
            ["throughput", "--quick", "--ablations", "kimi_mha", "--reference", "dense_muon"],
            "--reference dense_muon: not among the timed variants (kimi, kimi_mha)",
        ),  # fmt: skip
        (["data", "--sizes", "lots"], "--sizes: 'lots' is not a size; give e.g. 100M,1G,5G"),
        (["data", "--data-workers", "two"], "--data-workers='two': give worker counts, e.g. 1,2"),
        (["convert", "--shards", "0"], "--shards=0: give at least 1"),
        (["ns", "--variants", "quintic"], "--variants: 'quintic' is not method:steps[:gram]"),
        (["ns", "--variants", "cubic:3"], "Newton-Schulz method 'cubic' is not one of"),
    ],
)
def test_bad_bench_input_is_one_line(args, needle):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_throughput_quick(tmp_path):
    r = _cli("throughput", "--quick", "--json", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "t.json").read_text())
    for name in ("nanokimi", "nanogpt"):
        m = res[name]
        parts = m["forward_s"] + m["backward_s"] + m["optimizer_s"]
        assert 0 < parts <= m["step_s"] * 1.001 and 0 < m["mfu_measured_peak"]
    assert res["nanokimi"]["routing_s"] > 0 and res["nanogpt"]["flops_per_token"] > 0
    assert res["moe_vs_dense"][0]["moe_ms"] > 0 and "| nanokimi |" in r.stdout
    # --rounds 2 (the default): each model ran twice, the figures are medians over both runs
    assert len(res["mfu_ratio_rounds"]) == 2 and "MFU nanoKimi / nanoGPT" in r.stdout
    assert res["mfu_ratio"] == pytest.approx(sum(res["mfu_ratio_rounds"]) / 2)
    # Muon's Newton-Schulz FLOPs (Muon.newton_schulz_flops, checked against torch's flop counter in test_muon)
    assert res["nanokimi"]["ns_flops_per_step"] > 0 and res["nanogpt"]["ns_flops_per_step"] == 0  # AdamW
    assert "Muon's Newton-Schulz:" in r.stdout and "the MFU ratio is at most" in r.stdout
    # with those FLOPs counted, each round's ratio grows by exactly nanoKimi's (model + NS) / model FLOPs
    k = res["nanokimi"]
    grow = 1 + k["ns_flops_per_step"] / (k["flops_per_token"] * k["tokens_per_step"])
    assert res["hw_flops_ratio_rounds"] == pytest.approx([x * grow for x in res["mfu_ratio_rounds"]])
    assert "Counting them (hardware FLOPs/s), nanoKimi / nanoGPT" in r.stdout
    for name in ("nanokimi", "nanogpt"):
        m = res[name]
        assert len(m["rounds_tokens_per_s"]) == 2 and m["tokens_per_s"] == pytest.approx(
            sum(m["rounds_tokens_per_s"]) / 2
        )
        # every step's time is kept, and the warm-up step (--quick: the first of 2) is not in the medians
        assert [len(each) for each in m["step_s_each"]] == [2, 2]
        assert m["step_s"] == pytest.approx(sum(each[1] for each in m["step_s_each"]) / 2)


def test_throughput_of_compare_variants(tmp_path):
    """--ablations: kimi and the named variants, built as compare builds them, each timed once per round,
    with speeds relative to the reference per round and their median."""
    args = ["--ablations", "dense_muon,kimi_mha", "--ops", "4", "--json", str(tmp_path / "t.json")]
    r = _cli("throughput", "--quick", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["reference"] == "dense_muon" and list(res["variants"]) == ["kimi", "dense_muon", "kimi_mha"]
    assert "| kimi_mha |" in r.stdout and "speed vs dense_muon" in r.stdout and "nanogpt" not in r.stdout
    ref = res["variants"]["dense_muon"]
    assert ref["speed_rounds"] == [1.0, 1.0]
    for m in res["variants"].values():
        assert len(m["rounds_tokens_per_s"]) == 2 and 0 < m["forward_s"] + m["backward_s"] <= m["step_s"] * 1.001
        rounds = [a / b for a, b in zip(m["rounds_tokens_per_s"], ref["rounds_tokens_per_s"])]
        assert m["speed_rounds"] == pytest.approx(rounds) and m["speed"] == pytest.approx(sum(rounds) / 2)
    assert res["variants"]["kimi"]["routing_s"] > 0 and res["variants"]["dense_muon"]["routing_s"] == 0
    # --ops: a profiled run each, the ops' self time per step of the steps after the first (2 - 1 here)
    assert "| aten::mm |" in r.stdout and "| all ops |" in r.stdout and "CPU self time per step" in r.stdout
    for m in res["variants"].values():
        # the ops' self times add up to the profiled run's own step (not the timed rounds': load varies)
        assert m["ops_s"]["aten::mm"] > 0 and 0.75 < sum(m["ops_s"].values()) / m["ops_step_s"] < 1.33
    # the variants are compare's: the same active non-embedding size
    assert res["active_non_embedding"] == build_variants("configs/debug.yaml", [1e-3], ["dense_muon", "kimi_mha"])[1]


def test_checkpoint_quick(tmp_path):
    """The saves the trainer itself timed: sync and async runs' saves but their last, one row per world size."""
    r = _cli("checkpoint", "--quick", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "c.json").read_text())
    sa = res["sync_vs_async"]
    assert (
        sa["sync"]["saves"] == sa["async"]["saves"] == 1
    )  # --quick: 3 saves per run, the first apart, the last not counted
    assert 0 < sa["async"]["blocked_s"] and 0 < sa["sync"]["blocked_s"] and sa["sync"]["waited_s"] < 0.01
    assert sa["async"]["background_s"] > 0 and sa["async"]["first_blocked_s"] > 0
    assert [w["world"] for w in res["by_world"]] == [1, 2]
    assert all(w["save_s"] > w["hash_share_s"] > 0 and w["hash_all_one_process_s"] > 0 for w in res["by_world"])
    assert "async / sync blocked time" in r.stdout


@pytest.mark.slow
def test_memory_quick(tmp_path):
    r = _cli("memory", "--quick", "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "m.json").read_text())
    kv = {(k["attention"], k["context"]): k for k in res["kv_cache"]}
    cfg = load_config(str(ROOT / "configs" / "debug.yaml")).model
    a = cfg.attention  # MLA caches the latent + the shared RoPE key; MHA all heads' K and V (bf16: 2 bytes)
    assert kv[("mla", 128)]["bytes_per_token_bf16"] == (a.kv_lora_rank + a.qk_rope_head_dim) * cfg.n_layer * 2
    assert kv[("mha", 128)]["bytes_per_token_bf16"] == 2 * cfg.n_embd * cfg.n_layer * 2
    assert kv[("mla", 128)]["measured_bytes"] == 2 * kv[("mla", 64)]["measured_bytes"] > 0
    assert {(g["attention"], g["cache"]) for g in res["generation"]} == {(x, c) for x in ("mla", "mha")
                                                                          for c in (True, False)}  # fmt: skip
    assert all(t["peak_bytes"] > 0 for t in res["training"])
    assert [t["model"] for t in res["training"]] == ["nanokimi", "nanogpt (equal active)", "nanogpt (equal total)"]


@pytest.mark.slow
def test_data_quick(tmp_path):
    r = _cli("data", "--quick", "--data-workers", "1,2", "--work", str(tmp_path), "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "d.json").read_text())
    kimi = {x["tokens"] for x in res["scale"] + res["workers"] if x["what"] == "kimi.prepare"}
    script = {x["tokens"] for x in res["workers"] if x["what"] == "tiktoken script"}
    assert len(kimi) == 1 and len(script) == 1  # any worker count
    # the same text: only the hold-out's cut (a newline dropped, an <|endoftext|> added) may differ
    assert abs(kimi.pop() - script.pop()) <= 2
    assert all(x["main_peak_mb"] > 10 and x["wall_s"] > 0 for x in res["scale"] + res["workers"])
    assert res["loader"]["windows_per_s"] > 0 and res["loader"]["train_tokens_per_s"] > 0
    assert "| kimi.prepare | 1 |" in r.stdout and "| tiktoken script | 2 |" in r.stdout


@pytest.mark.slow
def test_convert_quick(tmp_path):
    r = _cli("convert", "--quick", "--shards", "3", "--fp8", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["shards"] == 3 and res["fp8"] and 0 < res["largest_tensor_mb"] <= res["shards_mb"] < res["output_mb"]
    assert res["peak_mb"] > 10 and res["floor_mb"] > 10 and "FP8 128x128" in r.stdout


def test_ns_quick(tmp_path):
    r = _cli("ns", "--rounds", "1", "--variants", "quintic:5,polar_express:4:gram", "--json", str(tmp_path / "n.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "n.json").read_text())
    assert res["matrices"] > 0 and res["ns_calls"] >= res["chunks"] > 0
    assert all(len(v["cpu_ms"]) == 1 and v["wall_median_ms"] > 0 for v in res["variants"].values())
    assert "| polar_express:4:gram |" in r.stdout
    q5, pe4 = res["variants"]["quintic:5"], res["variants"]["polar_express:4:gram"]
    assert pe4["gflop"] < q5["gflop"]  # one iteration fewer, and the Gram form on the non-square ones
    assert q5["tflops_per_s"] == pytest.approx(q5["gflop"] / q5["wall_median_ms"])  # GFLOP per ms = TFLOP/s
