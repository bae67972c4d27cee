"""Run-level settings from names: a preset's own (UniSD*'s halved batch) and ``--recipe paper``'s per task.

The training itself is replaced by a stand-in that records the resolved RunConfig: what is tested is
that the settings reach the run (and that explicit flags and the --config file still win).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from unisd.cli import train_cmd
from unisd.cli.app import make_app
from unisd.config import RunConfig
from unisd.plugins import get_plugin_manager
from unisd.recipes import PAPER_COMMON, named_run_settings, recipe_settings, recipe_task

runner = CliRunner()


@pytest.fixture
def resolved(monkeypatch, tmp_path):
    """Run ``unisd train ARGS`` with training replaced; returns (result, the RunConfig it would train)."""
    seen: list[RunConfig] = []

    def fake_train(cfg, pm, reporter, resume=None):
        seen.append(cfg)
        return tmp_path / "run"

    monkeypatch.setattr(train_cmd, "train", fake_train)

    def run(args):
        result = runner.invoke(make_app(get_plugin_manager()), ["train", "--model", "m", *args,
                                                               "--output", str(tmp_path / "run")])
        return result, (seen[-1] if seen else None)

    return run


def test_plugins_shows_each_presets_run_settings_and_the_recipes():
    data = json.loads(runner.invoke(make_app(get_plugin_manager()), ["plugins", "--json"]).output)
    presets = {p["name"]: p for p in data["presets"]}
    assert presets["unisd-star"]["run"] == {"batch_size": 2}
    assert "unisd_star" not in presets  # one name per preset; the research code's spelling still resolves:
    assert get_plugin_manager().registries.presets.get("unisd_star").name == "unisd-star"
    assert presets["clip"]["run"] == {"alpha": 0.0}
    assert all("run" in p for p in presets.values())
    (paper,) = data["recipes"]
    assert paper["name"] == "paper" and paper["run"] == PAPER_COMMON and paper["tasks"] == {"mbpp": "mbpp-full"}
    text = runner.invoke(make_app(get_plugin_manager()), ["plugins"], terminal_width=200).output
    assert "run: batch_size=2" in text and "run: alpha=0.0" in text and "run: (defaults)" in text
    assert "max_prompt_tokens=3072, max_new_tokens=1024" in text and "mbpp: trains mbpp-full" in text


def test_a_presets_run_settings_reach_the_run_config(resolved):
    result, cfg = resolved(["--task", "demo", "--preset", "unisd-star"])
    assert result.exit_code == 0, result.output
    assert cfg.batch_size == 2 and cfg.preset == "unisd-star" and "ema" in cfg.components


def test_an_explicit_flag_beats_the_presets_run_setting(resolved):
    result, cfg = resolved(["--task", "demo", "--preset", "unisd-star", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert cfg.batch_size == 3


def test_the_config_file_beats_the_preset_too(resolved, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "m"\ntask = "demo"\npreset = "unisd-star"\nbatch_size = 4\n')
    result, cfg = resolved(["--config", str(config)])
    assert result.exit_code == 0, result.output
    assert cfg.batch_size == 4


def test_paper_recipe_sets_the_runners_budgets_and_tooluse_masking(resolved):
    result, cfg = resolved(["--task", "tooluse", "--recipe", "paper"])
    assert result.exit_code == 0, result.output
    assert (cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.mask_truncated) == (3072, 1024, True)
    assert (cfg.loss_reduction, cfg.gjsd_scale) == ("sequence", "research")
    assert cfg.recipe == "paper"


def test_paper_recipe_with_a_flag_and_a_preset(resolved):
    result, cfg = resolved(["--task", "demo", "--recipe", "paper", "--preset", "unisd-star", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert (cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.batch_size, cfg.mask_truncated) == (8, 3072, 2, False)


def test_paper_recipe_trains_mbpp_on_the_full_set(resolved):
    result, cfg = resolved(["--task", "mbpp", "--recipe", "paper"])
    assert result.exit_code == 0, result.output
    assert cfg.task == "mbpp-full" and "training task 'mbpp-full' for 'mbpp'" in result.output


def test_without_a_recipe_nothing_changes(resolved):
    result, cfg = resolved(["--task", "mbpp"])
    assert result.exit_code == 0, result.output
    defaults = RunConfig()
    assert cfg.task == "mbpp" and cfg.max_prompt_tokens == defaults.max_prompt_tokens
    assert cfg.max_new_tokens is None and cfg.batch_size == defaults.batch_size


def test_unknown_recipe_exits_2_naming_the_choices(resolved):
    result, cfg = resolved(["--task", "demo", "--recipe", "papr"])
    assert result.exit_code == 2 and cfg is None
    assert "--recipe must be one of paper, got 'papr'" in result.output


def test_recipe_functions():
    assert recipe_settings(None, "mbpp") == {} and recipe_task(None, "mbpp") == "mbpp"
    assert recipe_settings("paper", "gsm8k") == PAPER_COMMON
    assert named_run_settings("paper", "tooluse", {"max_new_tokens": 5})["max_new_tokens"] == 5  # preset wins


def test_a_sweep_applies_the_recipe_per_task_under_the_preset_and_run_table(tmp_path):
    from unisd.ops.sweep import load_sweep, plan

    sweep = tmp_path / "paper.toml"
    sweep.write_text('models = ["smollm2"]\ntasks = ["mbpp", "tooluse"]\npresets = ["unisd-star"]\n'
                     '[run]\nrecipe = "paper"\nmax_new_tokens = 64\n', encoding="utf-8")
    jobs = {(j.meta["task"]): j for j in plan(load_sweep(sweep), get_plugin_manager()) if j.phase == "train"}
    mbpp, tool = jobs["mbpp"].config, jobs["tooluse"].config
    assert mbpp.task == "mbpp-full" and tool.task == "tooluse"  # the paper's training set
    assert mbpp.max_prompt_tokens == tool.max_prompt_tokens == 3072  # the recipe
    assert mbpp.max_new_tokens == tool.max_new_tokens == 64  # [run] beats the recipe
    assert tool.mask_truncated and not mbpp.mask_truncated  # per task
    assert mbpp.batch_size == tool.batch_size == 2  # the preset's run settings
