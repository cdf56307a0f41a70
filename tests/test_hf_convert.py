"""transformer.convert: Hugging Face folders (built here with random weights, no network, no torch) imported
into run directories and exported back. References: the bytes of the source tensors (round trip) and a
float64 NumPy forward of the Llama / Mistral / Mixtral equations written from the HF code, independent of the
library's mapping. With `transformers` installed, its logits and greedy generation too."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from flax import nnx

from transformer import convert
from transformer.hf import folder as hf_folder
from transformer.runs import load_model

D, H, G, W, F, V, N, E = 32, 4, 2, 8, 48, 97, 3, 4

BASE = {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": G, "head_dim": W, "intermediate_size": F,
        "vocab_size": V, "num_hidden_layers": N, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
FAMILIES = {
    "llama": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False,
              "mlp_bias": False},
    "llama_tied_scaled": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                          "tie_word_embeddings": True, "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "mistral": {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5},
    "mixtral": {**BASE, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": E,
                "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "sliding_window": None},
}


def hf_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with the names and (out, in) shapes of the HF checkpoints."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(dtype)
    out = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": (1 + normal(D)).astype(dtype)}
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = normal(V, D)
    for i in range(N):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": normal(H * W, D), p + "self_attn.k_proj.weight": normal(G * W, D),
                p + "self_attn.v_proj.weight": normal(G * W, D), p + "self_attn.o_proj.weight": normal(D, H * W),
                p + "input_layernorm.weight": (1 + normal(D)).astype(dtype),
                p + "post_attention_layernorm.weight": (1 + normal(D)).astype(dtype)}
        if config["model_type"] == "mixtral":
            out[p + "block_sparse_moe.gate.weight"] = normal(E, D)
            for e in range(E):
                q = p + f"block_sparse_moe.experts.{e}."
                out |= {q + "w1.weight": normal(F, D), q + "w3.weight": normal(F, D), q + "w2.weight": normal(D, F)}
        else:
            out |= {p + "mlp.gate_proj.weight": normal(F, D), p + "mlp.up_proj.weight": normal(F, D),
                    p + "mlp.down_proj.weight": normal(D, F)}
    return out


def write_hf(path: Path, config: dict, tensors: dict, *, shards: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_numpy.save_file(part, str(path / file))
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ---------------------------------------------------------------- float64 reference of the HF equations


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _inv_freq(config):
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, W, 2) / W)
    scaling = config.get("rope_scaling")
    if scaling and scaling["rope_type"] == "llama3":  # transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def _rope(x_LHW, inv):
    angles = np.arange(x_LHW.shape[0])[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]
    rotated = np.concatenate([-x_LHW[..., W // 2:], x_LHW[..., :W // 2]], -1)
    return x_LHW * cos + rotated * sin


def reference_logits(config: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    eps, L = config["rms_norm_eps"], len(tokens)
    x = t["model.embed_tokens.weight"][tokens]
    q_pos, k_pos = np.arange(L)[:, None], np.arange(L)[None]
    visible = k_pos <= q_pos
    if config.get("sliding_window"):
        visible &= q_pos - k_pos < config["sliding_window"]
    silu = lambda z: z / (1 + np.exp(-z))
    for i in range(N):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        q = _rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(L, H, W), _inv_freq(config))
        k = _rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(L, G, W), _inv_freq(config))
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(L, G, W)
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
        scores = np.einsum("qhw,khw->hqk", q, k) / np.sqrt(W)
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khw->qhw", probs, v).reshape(L, H * W) @ t[p + "self_attn.o_proj.weight"].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if config["model_type"] == "mixtral":
            logits = h @ t[p + "block_sparse_moe.gate.weight"].T
            out = np.zeros_like(h)
            for row in range(L):
                top = np.argsort(-logits[row])[:config["num_experts_per_tok"]]
                gates = np.exp(logits[row, top] - logits[row, top].max())
                gates /= gates.sum()
                for e, g in zip(top, gates):
                    q_ = p + f"block_sparse_moe.experts.{e}."
                    a = silu(h[row] @ t[q_ + "w1.weight"].T) * (h[row] @ t[q_ + "w3.weight"].T)
                    out[row] += g * (a @ t[q_ + "w2.weight"].T)
            x = x + out
        else:
            a = silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)
            x = x + a @ t[p + "mlp.down_proj.weight"].T
    x = _rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def our_logits(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    loaded = load_model(run_dir)
    model = nnx.merge(loaded.graphdef, loaded.state)
    logits, _ = model(jax.numpy.asarray(tokens)[None])
    return np.asarray(logits[0], np.float64)


TOKENS = np.random.default_rng(7).integers(0, V, 12)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_import_matches_the_float64_reference_and_round_trips_bit_for_bit(tmp_path, name):
    config = FAMILIES[name]
    tensors = hf_tensors(config)
    source = write_hf(tmp_path / "hf", config, tensors)
    convert.import_hf(source, tmp_path / "run")
    np.testing.assert_allclose(our_logits(tmp_path / "run", TOKENS), reference_logits(config, tensors, TOKENS),
                               atol=2e-5, rtol=2e-5)
    files = convert.export_hf(tmp_path / "run", tmp_path / "out")
    back = {k: v for f in files for k, v in safetensors_numpy.load_file(str(f)).items()}
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {**config, **_normalised(config)}


def _normalised(config: dict) -> dict:
    """Keys the export writes in canonical form (same values as the source's)."""
    out = {"head_dim": W}
    if config["model_type"] != "llama":
        out["sliding_window"] = config.get("sliding_window")
    if config.get("rope_scaling") is None:
        out["rope_scaling"] = None
    return out


def test_sharded_bfloat16_folder_imports_onto_a_mesh_shard_by_shard_and_exports_the_same_bytes(tmp_path, monkeypatch):
    config = {**FAMILIES["mixtral"], "torch_dtype": "bfloat16"}
    tensors = hf_tensors(config, seed=3, dtype=ml_dtypes.bfloat16)
    source = write_hf(tmp_path / "hf", config, tensors, shards=3)
    reads = []
    original = hf_folder.HFFolder.read
    monkeypatch.setattr(hf_folder.HFFolder, "read", lambda self, n: reads.append(n) or original(self, n))
    convert.import_hf(source, tmp_path / "run", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"])
    assert len(reads) >= len(tensors)  # read per device shard, never as one whole-model load
    single = our_logits(tmp_path / "run", TOKENS)
    np.testing.assert_allclose(single, reference_logits(config, tensors, TOKENS), atol=2e-4, rtol=2e-4)
    files = convert.export_hf(tmp_path / "run", tmp_path / "out", max_shard_bytes=40_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = {k: v for f in files for k, v in safetensors_numpy.load_file(str(f)).items()}
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key


def test_converted_run_generates_and_fine_tunes(tmp_path):
    from transformer import generate, train
    from transformer.config import Config, apply_overrides

    config = FAMILIES["llama"]
    convert.import_hf(write_hf(tmp_path / "hf", config, hf_tensors(config)), tmp_path / "run")
    out = tmp_path / "gen.json"
    assert generate.main([f"run_dir={tmp_path / 'run'}", "prompt_ids=5,6,7", "max_new_tokens=4",
                          "temperature=0", f"out={out}"]) == 0
    generated = json.loads(out.read_text())["rows"][0]["generated_ids"]
    expected, tokens = [], [5, 6, 7]
    for _ in range(4):  # greedy continuation by the float64 reference
        nxt = int(np.argmax(reference_logits(config, hf_tensors(config), np.array(tokens))[-1]))
        expected.append(nxt)
        tokens.append(nxt)
    assert generated == expected
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16))
    cfg = apply_overrides(Config.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())), [
        f"checkpoint.init_from={tmp_path / 'run'}", f"run_dir={tmp_path / 'ft'}", "steps=2", "data.dataset=npy",
        f"data.paths={tokens_file}", "data.seq_len=16", "data.global_batch_size=8", "checkpoint.every_steps=2",
        "optim.warmup_steps=1", "progress_bar=false", "sample_tokens=0", "eval_every=0"])
    summary = train.train(cfg)
    assert summary["origin"] == "init_from" and summary["step"] == 2 and np.isfinite(summary["losses"]).all()


@pytest.mark.parametrize("problem, expected", [
    ("no_config", "has no config.json"),
    ("unknown_type", "model_type='gptj'"),
    ("not_yet", "model_type='qwen2': needs q/k/v projection biases"),
    ("bias", "attention_bias=True"),
    ("missing", "lacks tensor 'model.layers.2.mlp.up_proj.weight'"),
    ("extra", "has tensor 'model.layers.0.self_attn.q_proj.bias'"),
    ("shape", "tensor 'model.norm.weight' has shape (31,) but config.json implies (32,)"),
    ("rope", "rope_scaling.rope_type='longrope'"),
])
def test_bad_folders_fail_with_one_line_and_write_nothing(tmp_path, capsys, problem, expected):
    config, tensors = dict(FAMILIES["llama"]), hf_tensors(FAMILIES["llama"])
    if problem == "unknown_type":
        config["model_type"] = "gptj"
    if problem == "not_yet":
        config["model_type"] = "qwen2"
    if problem == "bias":
        config["attention_bias"] = True
    if problem == "missing":
        del tensors["model.layers.2.mlp.up_proj.weight"]
    if problem == "extra":
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(H * W, np.float32)
    if problem == "shape":
        tensors["model.norm.weight"] = np.ones(D - 1, np.float32)
    if problem == "rope":
        config["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    source = write_hf(tmp_path / "hf", config, tensors)
    if problem == "no_config":
        (source / "config.json").unlink()
    assert convert.main(["--from-hf", str(source), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_existing_directories_are_never_overwritten(tmp_path, capsys):
    config = FAMILIES["llama"]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert convert.main(["--from-hf", str(source), "--run-dir", str(tmp_path / "run")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    convert.import_hf(source, tmp_path / "run2")
    assert convert.main(["--to-hf", str(tmp_path / "run2"), "--out", str(source)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- against transformers (optional extra)

FOR_CLASS = {"llama": "LlamaForCausalLM", "llama_tied_scaled": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "mixtral": "MixtralForCausalLM"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_and_greedy_generation_match_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformer.inference.generate import Generator
    from transformer.inference.sampling import SamplingConfig

    config = FAMILIES[name]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config, seed=1))
    convert.import_hf(source, tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "out")
    model = getattr(transformers, FOR_CLASS[name]).from_pretrained(str(tmp_path / "out"), torch_dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)[None]).logits[0].double().numpy()
    np.testing.assert_allclose(our_logits(tmp_path / "run", TOKENS), theirs, atol=1e-4, rtol=1e-4)
    prompt = [3, 9, 4, 1]
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    ours = Generator(str(tmp_path / "run")).generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=6),
                                                     max_len=16)
    assert list(ours.tokens[0]) == hf_out
