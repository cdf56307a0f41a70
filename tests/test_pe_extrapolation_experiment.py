"""experiments/pe_extrapolation.py: the runs a sweep config makes (encodings, learned-table size, RoPE fine-tune,
passkey curriculum, seeds), the mean ± std tables and CSVs built from per-seed rows, and a tiny sweep end to end."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest

import harness
import pe_extrapolation as pe
from transformer.config import ConfigError

TINY_SWEEP = '''
from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig


def get_config():
    base = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=2, max_seq_len=16, attention_block_size=32),
                  mesh=MeshConfig(data=-1), data=DataConfig(seq_len=16, global_batch_size=8),
                  optim=OptimConfig(warmup_steps=1), checkpoint=CheckpointConfig(every_steps=2, keep_last=1),
                  steps=3, eval_every=0, log_every=1, tensorboard=False, progress_bar=False)
    return dict(base=base, encodings={"rope": ("model.position=rope",), "learned": ("model.position=learned",)},
                factors=(1, 2), eval_sequences=2, rope="rope", rope_scalings=("yarn",), sliding_window=True,
                finetune=("steps=2", "data.seq_len=32", "model.rope_scaling=yarn", "model.rope_scaling_factor=2"),
                finetune_label="rope + yarn ft",
                passkey=("data.dataset=passkey", "data.seq_len=96", "steps=2"),
                passkey_curriculum={"learned": (("data.passkey_digits=8",),)}, passkey_skip=("rope",),
                passkey_factors=(1,), passkey_depths=(0.0, 1.0), passkey_trials=2, seeds=2)
'''


def tiny_argv(tmp_path: Path) -> list[str]:
    path = tmp_path / "tiny_pe.py"
    path.write_text(TINY_SWEEP)
    return ["--sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]


def test_cpu_sweep_makes_one_run_per_encoding_and_seed_with_the_paper_embedding_scale():
    args = pe.parse_args([])
    sweep = args.sweep
    perplexity, passkey = pe.jobs(sweep, Path("runs"))
    per_seed = len(sweep.encodings) + 1  # + the RoPE fine-tune
    assert len(perplexity) == per_seed * sweep.seeds == per_seed * 3
    by = {(j.label, j.seed): j.cfg for j in perplexity}
    assert by["learned", 0].model.max_seq_len == sweep.train_len * max(sweep.factors)
    assert {by[c, 0].model.embed_scale for c in ("sinusoidal", "learned", "rope")} == {"auto"}
    assert by["sinusoidal, unscaled", 0].model.embed_scale == "none"
    finetune = by[sweep.finetune_label, 1]
    assert finetune.checkpoint.init_from == by["rope", 1].run_dir and finetune.model.rope_scaling == "yarn"
    assert (finetune.seed, finetune.data.seed, finetune.data.seq_len) == (1, 1, 4 * sweep.train_len)
    assert len({j.cfg.run_dir for j in perplexity + passkey}) == len(perplexity + passkey)
    final = [j for j in passkey if "stage" not in j.label]
    assert {j.label for j in final} == set(sweep.encodings) - set(sweep.passkey_skip)
    assert {j.cfg.data.dataset for j in final} == {"passkey"}
    stages = {(j.label.split(" stage")[0], j.seed): j.cfg for j in passkey if "stage" in j.label}
    assert {label for label, _ in stages} == set(sweep.passkey_curriculum) == {"alibi", "learned"}
    assert {cfg.data.dataset for cfg in stages.values()} == {"copy"}
    for j in final:
        assert j.cfg.checkpoint.init_from == (stages[j.label, j.seed].run_dir if (j.label, j.seed) in stages else "")


def test_subset_keeps_rope_variants_only_with_rope():
    sweep = pe.parse_args(["--only", "alibi"]).sweep
    perplexity, passkey = pe.jobs(sweep, Path("runs"))
    assert {j.label for j in perplexity} == {"alibi"} and not sweep.rope
    with pytest.raises(ConfigError, match="'xpos' is not an encoding"):
        sweep.select(["xpos"])
    with pytest.raises(ConfigError, match="'rop' .* is not an encoding column"):
        dataclasses.replace(sweep, passkey_curriculum={"rop": ()}).validate()


def test_curriculum_stages_chain_their_parameters(tmp_path):
    sweep = harness.load_sweep(tiny_argv(tmp_path)[1], pe.Sweep)
    _, passkey = pe.jobs(sweep, tmp_path)
    stage, final = passkey[:2]
    assert (stage.label, final.label) == ("learned stage 0", "learned")
    assert stage.cfg.data.passkey_digits == 8 and final.cfg.data.passkey_digits == 5
    assert stage.cfg.checkpoint.init_from == "" and final.cfg.checkpoint.init_from == stage.cfg.run_dir
    assert final.cfg.model.max_seq_len == stage.cfg.model.max_seq_len == 97  # passkey prompt + answer at 96


def fake_rows() -> list[dict]:
    rows = []
    for seed, shift in enumerate((0.0, 2.0, 1.0)):
        for method in ("rope", "alibi"):
            for length in (64, 128):
                rows.append({"seed": seed, "method": method, "length": length, "perplexity": 5 + shift + length / 64,
                             "loss": 1.0})
    return rows


def test_perplexity_table_reports_mean_and_std_over_seeds(tmp_path):
    sweep = pe.parse_args([]).sweep
    table = pe.write_perplexity(fake_rows(), sweep, tmp_path)
    assert "| 64 | 7.00 ± 1.00 | 7.00 ± 1.00 |" in table and "| 128 | 8.00 ± 1.00 |" in table
    with open(tmp_path / "perplexity.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    with open(tmp_path / "perplexity_summary.csv") as f:
        first = next(csv.DictReader(f))
    assert (first["method"], first["seeds"], float(first["perplexity_std"])) == ("rope", "3", 1.0)
    assert first["perplexity_seeds"] == "6 8 7"
    assert (tmp_path / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_passkey_table_averages_depths_within_a_seed_then_seeds(tmp_path):
    sweep = pe.parse_args([]).sweep
    rows = [{"seed": seed, "method": "rope", "length": 128, "depth": depth, "accuracy": acc,
             "digit_accuracy": 1.0} for seed, accs in enumerate(([1.0, 0.0], [1.0, 1.0])) for depth, acc in
            zip((0.0, 1.0), accs)]
    table = pe.write_passkey(rows, sweep, 128, tmp_path)
    assert f"| 128 | 0.75 ± {math.sqrt(0.125):.2f} |" in table
    assert "| rope, 1.0 | 0.50 ± 0.71 |" in (tmp_path / "passkey.md").read_text()


@pytest.mark.slow  # ~2 minutes of CPU: XLA compiles train, eval and generation programs of 5 tiny configs
def test_tiny_sweep_end_to_end(tmp_path):
    argv = tiny_argv(tmp_path)
    assert pe.main(argv) == 0
    results = tmp_path / "results"
    with open(results / "perplexity.csv") as f:
        rows = list(csv.DictReader(f))
    methods = ["rope", "rope + sliding window", "rope + yarn", "rope + yarn ft", "learned"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    assert len(rows) == len(methods) * 2 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    assert all(math.isfinite(float(r["perplexity"])) for r in rows)
    assert "±" in (results / "perplexity.md").read_text()
    with open(results / "passkey.csv") as f:
        assert [(r["method"], r["length"], r["depth"]) for r in csv.DictReader(f)] == \
            [("learned", "96", "0.0"), ("learned", "96", "1.0")] * 2
    manifest = json.loads((results / "manifest.json").read_text())
    assert len(manifest["runs"]) == 2 * 5 and manifest["seeds"] == [0, 1]
    assert all(Path(r["run_dir"]).name.startswith(r["label"].split(" ")[0]) or "passkey" in r["run_dir"]
               for r in manifest["runs"])
    for name in ("perplexity.png", "passkey.png", "perplexity.md", "passkey.md", "passkey_summary.csv"):
        assert (results / name).is_file()


def test_every_line_of_the_cpu_plot_has_its_own_colour():
    sweep = pe.parse_args([]).sweep
    methods = [*sweep.encodings, sweep.finetune_label, f"{sweep.rope} + sliding window",
               *(f"{sweep.rope} + {s}" for s in sweep.rope_scalings)]
    styles = pe.line_styles(methods)
    assert len({str(style["color"]) for style in styles.values()}) == len(methods) == 13
