"""bench/peer_trl.py's pure parts, in the project's venv (no trl there): the final line, the teacher
prompt handed to TRL, and the unisd config it runs. The comparison itself runs in bench/.venv-peer
(bench/README.md); the unisd packages must never import trl."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from unisd.config import load_config
from unisd.data.demo import DemoTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_trl", ROOT / "bench" / "peer_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_importing_the_benchmark_loads_no_trl(peer):
    assert "trl" not in sys.modules


def test_final_line_round_trips(peer):
    line = peer.final_line(2.5, 1.25, 0.1, -0.05, 384)
    assert line == "peer_step_s=2.500 unisd_step_s=1.250 speedup=2.000 peer_gain=+0.100 unisd_gain=-0.050 n=384"
    assert peer.parse_final_line(line) == {"peer_step_s": 2.5, "unisd_step_s": 1.25, "speedup": 2.0,
                                           "peer_gain": 0.1, "unisd_gain": -0.05, "n": 384}
    with pytest.raises(ValueError, match="speedup"):
        peer.parse_final_line("peer_step_s=1 unisd_step_s=1 peer_gain=0 unisd_gain=0 n=4")


def test_trl_template_rebuilds_unisds_teacher_text_for_every_demo_item(peer):
    task = DemoTask()
    items = task.load("train")
    template, contexts = peer.trl_teacher_inputs([(ex.prompt, task.teacher_text(ex)) for ex in items])
    for ex, context in zip(items, contexts, strict=True):
        assert template.format(prompt=ex.prompt, privileged_context=context) == task.teacher_text(ex)
        assert ex.reference in context and ex.prompt not in context  # the reference is the privileged part
    assert "{prompt}" in template and "{privileged_context}" in template  # TRL's config demands both


def test_braces_in_the_fixed_text_survive_formatting(peer):
    template, _ = peer.trl_teacher_inputs([("Q?", "{x}\nQ?\nref"), ("R?", "{x}\nR?\nother")])
    assert template.format(prompt="Q?", privileged_context="\nref") == "{x}\nQ?\nref"
    with pytest.raises(ValueError, match="different text before"):
        peer.trl_teacher_inputs([("Q?", "a Q? r"), ("R?", "b R? r")])


def test_unisd_run_settings_are_the_demos_with_forward_kl(peer, tmp_path):
    settings = peer.Settings()
    path = tmp_path / "unisd.toml"
    path.write_text(peer.toml_text(peer.unisd_settings_mapping(settings, "/models/x")))
    config = load_config(path)  # what the benchmark writes is a valid run config
    assert (config.steps, config.batch_size, config.grad_accum, config.lr) == (60, 4, 2, 1e-3)
    assert (config.lora_r, config.lora_alpha, config.max_new_tokens, config.alpha) == (16, 32, 12, 0.0)
    assert config.task == "demo" and config.temperature == 0.7 and not config.eval_before_after
    assert config.num_generations == 1 and config.lora_dropout == 0.0  # TRL zeroes dropout
    assert peer.warmup_steps(settings) == 6 and peer.median_step([3.0, 1.0, 2.0]) == 2.0


def test_the_unisd_packages_never_import_trl():
    pattern = re.compile(r"^\s*(import trl\b|from trl\b)", re.MULTILINE)
    offenders = [str(p) for p in ROOT.glob("packages/*/src/**/*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders


@pytest.mark.parametrize("earlier", [None, "1"])
def test_trl_trains_on_the_blas_and_the_switch_comes_back(peer, monkeypatch, earlier):
    import os

    import torch

    from unisd.model import onednn

    if earlier is None:
        monkeypatch.delenv("UNISD_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("UNISD_ONEDNN", earlier)
    x = torch.ones(2, 3)
    with peer.blas_products():
        assert not onednn.usable(x)
    assert onednn.usable(x) == onednn.enabled()
    assert os.environ.get("UNISD_ONEDNN") == earlier
