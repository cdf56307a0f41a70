"""Experiment config files (experiments/configs/*.py) and `--config` loading."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

from transformer import sharding
from transformer.config import Config, ConfigError, config_from_args, get_preset, load_config_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))


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
