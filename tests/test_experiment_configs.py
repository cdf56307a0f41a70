"""Experiment config files (experiments/configs/*.py) and `--config` loading; the experiment scripts' command
lines (experiments/*.py, through experiments/harness.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import jax
import pytest

from transformer import sharding
from transformer.config import Config, ConfigError, config_from_args, get_preset, load_config_file

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIG_DIR = EXPERIMENTS / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))
SCRIPTS = ("bench_attention", "long_context", "moe_routing", "pe_extrapolation")


def test_there_are_experiment_configs():
    assert {p.stem for p in CONFIG_FILES} >= {"kjv_small", "moe_kjv", "long_context_1m"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_file_validates_fits_8_devices_and_states_its_command(path):
    relative = path.relative_to(CONFIG_DIR.parents[1]).as_posix()
    cfg = config_from_args(["--config", str(path)])
    assert isinstance(cfg, Config)
    assert f"python -m transformer.train --config {relative}" in load_doc(path)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices())
    sharding.validate_for_mesh(cfg, mesh)
    for line in load_doc(path).splitlines():
        if line.strip().startswith("python -m transformer.train"):
            argv = line.split("#")[0].split()[3:]
            config_from_args(argv)  # every documented command parses and validates


def load_doc(path: Path) -> str:
    match = re.match(r'\s*"""(.*?)"""', path.read_text(), re.S)
    assert match, f"{path} has no docstring"
    return match.group(1)


def test_overrides_apply_on_top_of_a_config_file():
    path = str(CONFIG_DIR / "moe_kjv.py")
    base = load_config_file(path)
    cfg = config_from_args(["--config", path, "model.moe.top_k=1", "steps=7"])
    assert (cfg.model.moe.top_k, cfg.steps) == (1, 7)
    assert cfg.model.moe.num_experts == base.model.moe.num_experts == 8
    assert config_from_args([f"--config={path}"]) == base


def test_default_is_the_tiny_preset():
    assert config_from_args([]) == get_preset("tiny").validate()


@pytest.mark.parametrize("make_argv, needle", [
    (lambda tmp: ["--config", str(tmp / "missing.py")], "no such Python file"),
    (lambda tmp: ["--config", write(tmp / "empty.py", "x = 1\n")], "defines no get_config()"),
    (lambda tmp: ["--config", write(tmp / "wrong.py", "def get_config():\n    return 3\n")], "returned int"),
    (lambda tmp: ["--preset", "tiny", "--config", str(CONFIG_DIR / "moe_kjv.py")], "not several"),
    (lambda tmp: ["--config"], "--config needs a value"),
    (lambda tmp: ["--cofnig", "x.py"], "unknown option '--cofnig'"),
])
def test_bad_config_arguments_raise_clear_errors(tmp_path, make_argv, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_args(make_argv(tmp_path))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_states_its_command_and_has_help(name, capsys):
    script = importlib.import_module(name)
    assert f"python experiments/{name}.py --preset cpu" in script.__doc__
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0 and f"experiments/results/{name}/<preset>" in capsys.readouterr().out


def test_unset_flags_take_the_presets_values():
    bench = importlib.import_module("bench_attention")
    args = bench.parse_args(["--preset", "gpu", "--heads", "32", "--lengths", "8192,16384"])
    assert (args.heads, args.lengths, args.kv_heads) == (32, (8192, 16384), bench.PRESETS["gpu"].kv_heads)
    assert args.results_dir == Path("experiments/results/bench_attention/gpu")
    pe = importlib.import_module("pe_extrapolation").parse_args(["--runs-dir", "elsewhere"])
    assert (pe.runs_dir, pe.results_dir) == (Path("elsewhere"), Path("experiments/results/pe_extrapolation/cpu"))


BAD_ARGUMENTS = {  # script: {arguments: the error they give}
    "bench_attention": {"--methods ring,flash": r"unknown method 'flash'",
                        "--heads 6 --kv-heads 4": r"--heads=6 must be a multiple of --kv-heads=4"},
    "long_context": {"--lengths 1000": r"1000, which is not divisible by 2 x ring 8 = 16",
                     "--check-len 24": r"--check-len has 24.*multiple of 16",
                     "--ring 0": r"--ring 0 must be >= 1",
                     "--lengths 8k": r"'8k' is not a comma-separated list of integers"},
    "moe_routing": {"--only softmax_topk_e8_k2_lb0,topk": r"--only 'topk' is not a run of this sweep",
                    "--seeds 0": r"--seeds 0 must be >= 1",
                    "model.moe.router=top1": r"moe.router='top1' is not valid",
                    "--sweep missing.py": r"--sweep 'missing.py': no such Python file"},
    "pe_extrapolation": {"--only rope,xpos": r"--only 'xpos' is not an encoding of this sweep",
                         "steps=x": r"steps='x': expected an integer"},
}


@pytest.mark.parametrize("name, arguments, match", [
    (name, arguments, match) for name, cases in BAD_ARGUMENTS.items() for arguments, match in cases.items()])
def test_script_rejects_bad_arguments_before_running(name, arguments, match, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(name).parse_args(arguments.split())
    assert re.search(match, capsys.readouterr().err)


SWEEP_FILES = sorted((CONFIG_DIR / "sweeps").glob("*.py"))
SWEEP_SCRIPTS = {"pe": "pe_extrapolation", "moe": "moe_routing"}


def test_every_sweep_preset_names_a_sweep_file():
    named = {Path(preset.sweep).name for name in SWEEP_SCRIPTS.values()
             for preset in importlib.import_module(name).PRESETS.values()}
    assert named == {p.name for p in SWEEP_FILES}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_loads_and_states_its_commands(path):
    relative = path.relative_to(CONFIG_DIR.parents[1]).as_posix()
    name = SWEEP_SCRIPTS[path.stem.split("_")[0]]
    script = importlib.import_module(name)
    doc = load_doc(path)
    commands = [line.split("#")[0].split() for line in doc.splitlines()
                if line.strip().startswith(f"python experiments/{name}.py")]
    assert commands and any(relative in command or "--preset" in command for command in commands)
    for command in commands:
        args = script.parse_args(command[2:])  # every documented command parses, loads and validates its sweep
        assert isinstance(args.sweep, script.Sweep) and args.sweep.seeds >= 1
        for job in [j for group in [script.jobs(args.sweep, Path("runs"))] for j in
                    (group[0] + group[1] if isinstance(group, tuple) else group)]:
            job.cfg.validate()
