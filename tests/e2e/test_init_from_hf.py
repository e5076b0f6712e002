"""`python -m kimi.train --init-from-hf DIR`: a fresh run starts from an HF DeepSeek-V3 folder, on one process
and sharded (2 ranks, EP=2, FSDP2), each rank reading only its own experts.

With lr 1e-30 (and no router-bias update or QK-clip) one step leaves every weight as it was loaded, so the
run's checkpoint must hold exactly what `kimi.convert --from-hf` makes of the folder, and the first-step
losses of both layouts agree (2e-5, a different summation order)."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kimi import load_model  # noqa: E402
from kimi.checkpoint.hf import from_hf  # noqa: E402
from kimi.train import Hooks, config_from_args, parse_args, train  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.unit.test_hf_parity import hf_config, random_hf_model, rel_err, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STILL = ["--optim.lr=1e-30", "--moe.bias_update_rate=0", "--optim.qk_clip=false"]


def _args(out, hf_dir, *extra):
    return ["--config", str(ROOT / "configs" / "debug.yaml"), "--init-from-hf", str(hf_dir), f"--out-dir={out}",
            "--max-steps=1", "--logging.mlflow=false", "--train.eval_interval=0", *STILL, *extra]  # fmt: skip


def _rank(rank, world, out, hf_dir, extra):
    built = []
    row = train(config_from_args(*parse_args(_args(out, hf_dir, *extra))), hooks=Hooks(on_build=built.append))
    return row["loss"], built[0].hf_tensors_read


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "model"
    random_hf_model(hf_config(None), seed=7).save_pretrained(d, max_shard_size="100KB")  # several shards
    assert (d / "model.safetensors.index.json").is_file()
    return d


def test_one_process_and_ep2_start_from_the_folder(tmp_path, hf_dir):
    (loss1, read1), = run_distributed(_rank, 1, args=(str(tmp_path / "one"), str(hf_dir), []), timeout=300)  # fmt: skip
    ranks = run_distributed(_rank, 2, args=(str(tmp_path / "ep2"), str(hf_dir), ["--parallel.ep=2"]), timeout=300)
    assert abs(ranks[0][0] - loss1) <= 2e-5 * abs(loss1)
    assert all(n < read1 for _, n in ranks)  # each rank read only its half of the routed experts
    cfg, want = from_hf(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    for run in ("one", "ep2"):
        got = load_model(tmp_path / run).eval()
        assert got.config.n_layer == cfg.n_layer and got.config.block_size == 64  # block_size: debug.yaml's
        state = got.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want), run
        with torch.no_grad():
            assert rel_err(got(tokens()).logits, hf(tokens()).logits) <= 1e-5, run


def test_a_model_that_is_not_the_folders_and_deepspeed_are_refused(tmp_path, hf_dir, capsys):
    from kimi.config import load_config
    from kimi.train import main

    cfg = load_config(
        ROOT / "configs" / "debug.yaml", [f"--train.init_from_hf={hf_dir}", f"--train.out_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match=r"differs from .*model.n_layer=2 vs 3.*--init-from-hf"):
        train(cfg)
    for extra, why in ((["--parallel.engine=deepspeed"], "not supported by parallel.engine=deepspeed"),
                       (["--init-from-hf", str(tmp_path)], "has no config.json")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*_args(tmp_path / "x", hf_dir), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and err.count("\n") == 1, err
    assert json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"] == 3
