"""Importing real HF checkpoints: sharded safetensors with an index, DeepSeek's block-FP8 weights, Kimi-K2's
config (MTP layers dropped), and one line for each kind of bad folder.

The reference is transformers' DeepseekV3ForCausalLM holding the same weights: for FP8 the test quantises
each linear weight itself (per-block amax / 448, a loop over tiles) and dequantises it again the same
plain way, and HF loads those dequantised weights from an unquantised folder. Logits agree to the
parity tests' TOL (relative 1e-5, fp32 CPU). Block sizes that divide none of the tiny model's dims leave
partial tiles at the bottom and right edges.
"""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from kimi import load_model  # noqa: E402
from kimi.checkpoint.fp8 import dequantize_fp8  # noqa: E402
from kimi.checkpoint.hf import INDEX, iter_hf_tensors  # noqa: E402
from kimi.convert import main as convert_main  # noqa: E402
from tests.unit.test_hf_parity import TOL, hf_config, random_hf_model, rel_err, tokens  # noqa: E402

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def tiles(shape, block):
    rows, cols = shape
    for i in range(0, rows, block[0]):
        for j in range(0, cols, block[1]):
            yield i // block[0], j // block[1], slice(i, i + block[0]), slice(j, j + block[1])


def quantise(w, block):
    """(FP8 weight, float32 scale_inv) the way DeepSeek's checkpoints store them: one scale per tile."""
    n_r, n_c = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
    q, scale = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(n_r, n_c)
    for bi, bj, rs, cs in tiles(w.shape, block):
        s = w[rs, cs].abs().max().clamp(min=1e-12) / FP8_MAX
        q[rs, cs], scale[bi, bj] = (w[rs, cs] / s).to(torch.float8_e4m3fn), s
    return q, scale


def dequantise(q, scale, block):
    w = q.to(torch.float32)
    for bi, bj, rs, cs in tiles(q.shape, block):
        w[rs, cs] *= scale[bi, bj]
    return w


def is_quantised_in_deepseek(name, t):  # every linear weight in the blocks except the router
    return t.dim() == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")


def write_folder(d, tensors, config, n_shards=1):
    """config.json + tensors in `n_shards` files; several get an index. Keys go round-robin in name order,
    so a weight and its `weight_scale_inv` land in different shards."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    if n_shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    where = {k: names[i % n_shards] for i, k in enumerate(sorted(tensors))}
    for name in names:
        save_file({k: v for k, v in tensors.items() if where[k] == name}, str(d / name))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return d


def hf_files(hf, tmp_path):
    """HF's own on-disk layout (per-expert tensors) and config.json, as save_pretrained writes them."""
    hf.save_pretrained(tmp_path / "saved")
    return load_file(str(tmp_path / "saved" / "model.safetensors")), json.loads(hf.config.to_json_string())


def fp8_folder(tmp_path, hf, block, n_shards):
    """(FP8 folder, HF model loaded from the same weights dequantised)."""
    sd, config = hf_files(hf, tmp_path)
    fp8, plain = {}, {}
    for k, t in sd.items():
        if is_quantised_in_deepseek(k, t):
            q, s = quantise(t, block)
            fp8[k], fp8[k + "_scale_inv"], plain[k] = q, s, dequantise(q, s, block)
        else:
            fp8[k] = plain[k] = t
    write_folder(tmp_path / "plain", plain, config)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").float().eval()
    assert rel_err(plain["model.layers.0.self_attn.o_proj.weight"], sd["model.layers.0.self_attn.o_proj.weight"]) > TOL
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    return write_folder(tmp_path / "fp8", fp8, config, n_shards), ref


def import_logits(folder, tmp_path):
    assert convert_main(["--from-hf", str(folder), str(tmp_path / "k.pt")]) == 0
    with torch.no_grad():
        return load_model(tmp_path / "k.pt").eval()(tokens()).logits


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2**-24), (torch.bfloat16, 2**-8)], ids=["fp32", "bf16"])
def test_fp8_dequantisation_against_float64(dtype, bound):
    """Each weight is one FP8 value times one float32 scale: the float64 product is exact, so the import's
    error is one rounding to the training dtype (<= 2^-24 relative in fp32, 2^-8 in bf16) per element, with
    partial tiles on both edges (300 x 200 in 128 x 128 blocks) and a leading expert dim."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 300, 200, generator=g) * torch.logspace(-3, 1, 200)  # columns over 4 decades
    q, scale = zip(*(quantise(m, (128, 128)) for m in w))
    q, scale = torch.stack(q), torch.stack(scale)
    want = q.double().clone()
    for bi, bj, rs, cs in tiles(q.shape[-2:], (128, 128)):
        want[:, rs, cs] *= scale[:, bi, bj, None, None].double()
    got = dequantize_fp8(q, scale, (128, 128), dtype, "w").double()
    err = ((got - want).abs() / want.abs().clamp(min=1e-30)).max().item()
    print(f"fp8 -> {dtype}: max rel err {err:.2e} against float64 (bound {bound:.1e})")
    assert err <= bound
    assert (got - want).abs().max() > 0 or dtype == torch.float32  # bf16 does round


def test_sharded_folder_with_an_index(tmp_path):
    hf = random_hf_model(hf_config(24), seed=11)
    sd, config = hf_files(hf, tmp_path)
    d = write_folder(tmp_path / "sharded", sd, config, n_shards=3)
    with torch.no_grad():
        ref = hf(tokens()).logits
    assert rel_err(import_logits(d, tmp_path), ref) <= TOL


@pytest.mark.parametrize("block,n_shards", [((24, 40), 1), ((128, 128), 4)], ids=["24x40", "128x128-4-shards"])
def test_fp8_block_quantised_weights_are_dequantised(tmp_path, block, n_shards):
    d, ref = fp8_folder(tmp_path, random_hf_model(hf_config(24), seed=12), block, n_shards)
    with torch.no_grad():
        want = ref(tokens()).logits
    err = rel_err(import_logits(d, tmp_path), want)
    print(f"fp8 {block} {n_shards} shard(s): rel err {err:.2e}")
    assert err <= TOL


# Kimi-K2-Instruct's config.json as published (moonshotai/Kimi-K2-Instruct), sizes shrunk to the test
# model's. Left out: torch_dtype bfloat16 (the dequantised weights would be rounded to bf16 and the
# comparison with fp32 HF loses exactness).
K2_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "model_type": "kimi_k2",
    "aux_loss_alpha": 0.001,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "float32",
    "use_cache": True,
}


def test_kimi_k2_config_with_its_mtp_layer(tmp_path, capsys):
    yarn = {"rope_type": "yarn", "rope_theta": 50000.0, **K2_CONFIG["rope_scaling"]}
    hf = random_hf_model(hf_config(24, n_group=1, topk_group=1, routed_scaling_factor=2.827, rope_parameters=yarn))
    d, ref = fp8_folder(tmp_path, hf, (128, 128), 2)
    config = json.loads((d / "config.json").read_text())
    config = {**{k: config[k] for k in config if k not in ("model_type", "rope_parameters")}, **K2_CONFIG}
    (d / "config.json").write_text(json.dumps(config))
    # the MTP layer sits at index n_layer (3): a shard of its own, as in the published checkpoint
    mtp = {f"model.layers.3.{k}": torch.randn(64, 64) for k in ("eh_proj.weight", "self_attn.o_proj.weight")}
    mtp["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(mtp, str(d / "mtp.safetensors"))
    index = json.loads((d / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (d / INDEX).write_text(json.dumps(index))
    with torch.no_grad():
        want = ref(tokens()).logits
    capsys.readouterr()
    assert rel_err(import_logits(d, tmp_path), want) <= TOL
    notes = [line for line in capsys.readouterr().out.splitlines() if "num_nextn_predict_layers" in line]
    assert len(notes) == 1 and "model.layers.3" in notes[0]


def test_every_variant_at_once(tmp_path):
    """V3's YaRN, block FP8 with partial tiles, three shards, group-limited routing with norm_topk_prob=False
    and a K2-style tiktoken tokenizer, all in one folder: the import matches HF at 4x the original context
    and takes the tokenizer along; --to-hf gives back a folder transformers loads to the same logits, with
    a tokenizer that gives tiktoken's ids."""
    from kimi.data import tokenizer as tk
    from kimi.generate import load_generator
    from tests.unit.test_hf_parity import GROUPED
    from tests.unit.test_hf_tokenizer import add_k2_tokenizer, k2_style_file

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # fmt: skip
    hf = random_hf_model(hf_config(24, vocab_size=3072, rope_parameters=yarn, **GROUPED), seed=21)
    d, ref = fp8_folder(tmp_path, hf, (24, 40), 3)
    add_k2_tokenizer(d, tmp_path / "src")
    idx = torch.randint(0, 3072, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(idx).logits
    assert convert_main(["--from-hf", str(d), str(tmp_path / "k.pt")]) == 0
    ours = load_model(tmp_path / "k.pt").eval()
    moe, scaling = ours.config.moe, ours.config.attention.rope_scaling
    assert (moe.n_group, moe.topk_group, moe.norm_topk_prob, scaling.type) == (4, 2, False, "yarn")
    with torch.no_grad():
        assert rel_err(ours(idx).logits, want) <= TOL
    tk._cached.cache_clear()
    text = "the cat sat on the mat. 日本語 It's 1234!"
    ids = tk.get_tokenizer(k2_style_file(tmp_path / "src")).encode_ordinary(text)
    assert load_generator(str(tmp_path / "k.pt")).tokenizer.encode_ordinary(text) == ids
    assert convert_main(["--to-hf", str(tmp_path / "k.pt"), str(tmp_path / "back"), "--max-shard-size", "200KB"]) == 0
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        assert rel_err(back(idx).logits, want) <= TOL
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")(text).input_ids == ids


def test_to_hf_fp8_writes_what_the_import_reads_back(tmp_path):
    """--to-hf --dtype fp8: every linear weight of the blocks but the router is e4m3 with 128 x 128 scales,
    bit for bit what this file's plain per-tile quantiser makes of the same weights; the rest is bf16; and
    the import reads the folder back to within e4m3's rounding (bf16's for the rest)."""
    from safetensors import safe_open

    hf = random_hf_model(hf_config(24, moe_intermediate_size=136), seed=31)  # 136 rows: partial tiles
    ref, _ = hf_files(hf, tmp_path)
    assert convert_main(["--from-hf", str(tmp_path / "saved"), str(tmp_path / "k.pt")]) == 0
    assert convert_main(["--to-hf", str(tmp_path / "k.pt"), str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128] and config["dtype"] == "bfloat16"
    linear = {k for k, t in ref.items() if t.dim() == 2 and k.startswith("model.layers.") and ".mlp.gate." not in k}
    assert len(linear) == 3 * 5 + 3 + 2 * (8 + 1) * 3  # MLA x 3 layers, the dense MLP, experts + shared x 2
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ref) | {k + "_scale_inv" for k in linear}
        for k in ref:
            t = f.get_tensor(k)
            if k in linear:
                q, scale = quantise(ref[k], (128, 128))
                assert torch.equal(t.view(torch.uint8), q.view(torch.uint8)), k
                assert torch.equal(f.get_tensor(k + "_scale_inv"), scale), k
            else:
                assert t.dtype == torch.bfloat16 and torch.equal(t, ref[k].bfloat16()), k
    assert convert_main(["--from-hf", str(tmp_path / "fp8"), str(tmp_path / "back.pt")]) == 0
    src, back = torch.load(tmp_path / "k.pt")["model"], torch.load(tmp_path / "back.pt")["model"]
    errs = {k: rel_err(back[k], t) for k, t in src.items()}
    print(f"fp8 export round trip: largest rel err {max(errs.values()):.2e}")
    assert max(errs.values()) <= 0.05 and min(errs.values()) < 4e-3  # e4m3: 3 mantissa bits; bf16: 8


def test_to_hf_fp8_loads_in_transformers(tmp_path):
    """transformers (with accelerate; on a CPU it dequantises to bf16 at load, as the import does) reads the
    FP8 export to the same logits as the import. Every weight here is one tile: transformers' CPU dequantiser
    (5.24) takes the tile size as rows // scale rows, which misplaces the scales of partial tiles in
    multi-tile weights (136 rows: 68-row tiles; it refuses 576 rows, Kimi-K2's kv_a_proj_with_mqa); its
    GPU path and this project's import tile from the top-left as DeepSeek's own kernel does."""
    hf_files(random_hf_model(hf_config(24), seed=32), tmp_path)
    assert convert_main(["--from-hf", str(tmp_path / "saved"), str(tmp_path / "k.pt")]) == 0
    assert convert_main(["--to-hf", str(tmp_path / "k.pt"), str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    assert convert_main(["--from-hf", str(tmp_path / "fp8"), str(tmp_path / "back.pt")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8").float().eval()
    ours = load_model(tmp_path / "back.pt").float().eval()
    with torch.no_grad():
        assert rel_err(ours(tokens()).logits, theirs(tokens()).logits) <= TOL


def refused(tmp_path, capsys, d, *why):
    capsys.readouterr()  # drop save_pretrained's progress bars
    assert convert_main(["--from-hf", str(d), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in why:
        assert w in err, err
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def small_hf():
    return random_hf_model(hf_config(None), seed=13)


def test_missing_shard(tmp_path, capsys, small_hf):
    sd, config = hf_files(small_hf, tmp_path)
    d = write_folder(tmp_path / "hf", sd, config, n_shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    refused(tmp_path, capsys, d, "'model-00002-of-00003.safetensors'", INDEX, "download it again")


def test_truncated_shard_and_an_index_that_misplaces_a_tensor(tmp_path, capsys, small_hf):
    sd, config = hf_files(small_hf, tmp_path)
    d = write_folder(tmp_path / "hf", sd, config, n_shards=2)
    index = json.loads((d / INDEX).read_text())
    name = next(k for k, f in index["weight_map"].items() if f == "model-00001-of-00002.safetensors")
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (d / INDEX).write_text(json.dumps(index))
    refused(tmp_path, capsys, d, f"'{name}' is not in", "model-00002-of-00002.safetensors' although", "download")
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    refused(tmp_path, capsys, d, f"cannot read '{shard}'")


def test_tensor_shape_that_disagrees_with_the_config(tmp_path, capsys, small_hf):
    sd, config = hf_files(small_hf, tmp_path)
    config["moe_intermediate_size"] = 48
    d = write_folder(tmp_path / "hf", sd, config, n_shards=2)
    refused(tmp_path, capsys, d, "experts.0.gate_proj.weight' has shape (32, 64) but config.json implies (48, 64)")


def test_scales_for_another_block_size(tmp_path, capsys, small_hf):
    d, _ = fp8_folder(tmp_path, small_hf, (24, 24), 1)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    (d / "config.json").write_text(json.dumps(config))
    refused(tmp_path, capsys, d, "_scale_inv' has shape", "in [128, 128] blocks needs", "weight_block_size")


@pytest.mark.parametrize(
    "edit,why",
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method='gptq'"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures=['LlamaForCausalLM']"),
    ],
    ids=["gptq", "llama"],
)
def test_foreign_configs_are_refused(tmp_path, capsys, edit, why):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**json.loads(hf_config(None).to_json_string()), **edit}))
    refused(tmp_path, capsys, d, why)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_tensors_read_do_not_keep_their_shard_mapped(tmp_path, small_hf):
    """Peak memory is the output plus about one tensor (kimi.bench convert measures it) only if what is
    read owns its memory: a tensor viewing the mmapped shard keeps every page read from it resident."""
    sd, config = hf_files(small_hf, tmp_path)
    d = write_folder(tmp_path / "hf", sd, config, n_shards=2)
    kept = list(iter_hf_tensors(d, config))
    assert len(kept) == len(sd)
    assert str(d) not in Path("/proc/self/maps").read_text()
