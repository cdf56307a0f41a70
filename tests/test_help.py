"""`--help` of every entry point: options, presets, config files and every config field with its default and
meaning, generated from the dataclasses (`transformer.config.help_text`)."""

import dataclasses
import importlib
import re
import subprocess
import sys

import pytest

from processes import REPO, cpu_env
from transformer import aot, config, evaluate, generate, train
from transformer.config import Config, describe_fields
from transformer.inference.sampling import SamplingConfig

EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if re.search(r"harness\.\w*Parser\(",
                                                                                      p.read_text()))


@pytest.mark.parametrize("cls", [Config, evaluate.Options, generate.Options, SamplingConfig])
def test_every_field_has_a_one_line_meaning(cls):
    rows = describe_fields(cls)
    missing = [name for name, _, meaning in rows if not meaning]
    assert not missing, f"fields without help: {missing}"
    assert all("\n" not in meaning for _, _, meaning in rows)


def test_describe_fields_flattens_nested_configs_with_override_spelling():
    rows = {name: (default, meaning) for name, default, meaning in describe_fields(Config)}
    assert len(rows) == sum(1 for _ in _leaves(Config()))
    assert rows["model.moe.router"] == ("softmax_topk", "router: " + ", ".join(config.ROUTERS))
    assert rows["model.tie_embeddings"][0] == "true" and rows["data.paths"][0] == "()"
    assert rows["checkpoint.init_from"][0] == "''"
    tiny = {name: default for name, default, _ in describe_fields(config.get_preset("tiny"))}
    assert tiny["model.d_model"] == "128" and tiny["run_dir"] == "runs/tiny"


def _leaves(obj):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield from _leaves(value) if dataclasses.is_dataclass(value) else [f.name]


def _help_of(main, argv, capsys) -> str:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def _assert_config_fields(text: str) -> None:
    for name, default, meaning in describe_fields(Config):
        assert any(line.split(maxsplit=1)[:1] == [name] and f"  {default}  " in line and line.endswith(meaning)
                   for line in text.splitlines()), name


def test_train_help_lists_presets_config_files_and_fields(capsys):
    text = _help_of(train.main, ["--help"], capsys)
    assert text.startswith("Training: sharded state")
    assert "Presets (--preset NAME" in text and "Config files (--config FILE.py)" in text
    assert "experiments/configs/moe_kjv.py" in text
    tiny = next(line for line in text.splitlines() if line.lstrip().startswith("tiny "))
    assert "model.d_model=128" in tiny
    _assert_config_fields(text)


def test_aot_help_lists_its_flags_and_the_config(capsys):
    text = _help_of(aot.main, ["--preset", "1b", "-h"], capsys)
    assert "--topology" in text and "--devices" in text and "Presets (--preset NAME" in text
    _assert_config_fields(text)


@pytest.mark.parametrize("module, titles", [
    (evaluate, ["Options (key=value)"]),
    (generate, ["Options (key=value)", "Sampling (key=value)"]),
])
def test_run_dir_tools_list_their_options_and_the_overrides(module, titles, capsys):
    text = _help_of(module.main, ["--help"], capsys)
    assert all(title in text for title in titles) and "Presets" not in text
    assert "Config overrides of the run's saved config" in text
    own = [evaluate.Options] if module is evaluate else [generate.Options, SamplingConfig]
    for name, default, meaning in (row for cls in own for row in describe_fields(cls)):
        assert f"  {name} " in text and meaning in text
    _assert_config_fields(text)


def test_inspect_help(capsys):
    inspect = pytest.importorskip("transformer.inspect")
    text = _help_of(inspect.main, ["--help"], capsys)
    assert "Presets (--preset NAME" in text
    _assert_config_fields(text)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_scripts_list_options_and_presets(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text and "--results-dir" in text and "Presets (--preset NAME):" in text
    for preset in module.PRESETS:
        assert any(line.startswith(f"  {preset} ") for line in text.splitlines())
    if "overrides" in text.split("options:")[0]:
        _assert_config_fields(text)


def test_help_from_the_command_line_exits_0_on_stdout():
    proc = subprocess.run([sys.executable, "-m", "transformer.aot", "--help"], cwd=REPO, env=cpu_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.moe.num_experts" in proc.stdout and "Traceback" not in proc.stderr


def test_convert_help_lists_both_directions_and_the_config_fields(capsys):
    from transformer import convert

    text = _help_of(convert.main, ["--help"], capsys)
    assert "--from-hf" in text and "--to-hf" in text and "--run-dir" in text and "--out" in text
    _assert_config_fields(text)
