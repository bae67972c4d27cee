"""The base model's held-out completions are generated once and reused (unisd.evaluation.base_cache)."""

from __future__ import annotations

import json

import pytest
import torch

from unisd.config import RunConfig
from unisd.evaluation import base_cache, evaluate
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import build_run
from unisd.testing import make_tiny_model_dir


@pytest.fixture
def generated(monkeypatch):
    """Every text the evaluation generates for, in calls."""
    calls: list[list[str]] = []
    real = evaluate.generate_texts

    def counting(model, tokenizer, texts, *args, **kwargs):
        calls.append(list(texts))
        return real(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_texts", counting)
    return calls


def _run(model_dir, **options):
    cfg = RunConfig(model=str(model_dir), task="demo", max_new_tokens=4, eval_limit=3, **options)
    return build_run(cfg, get_plugin_manager(), Reporter(), None)


def test_a_second_run_reuses_the_base_models_completions(tmp_path, generated):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    task = _run(model_dir).task
    first = evaluate.privileged_gap(_run(model_dir), task, 3)
    assert len(generated) == 2  # the student, then the teacher with the reference
    run = _run(model_dir)  # another run of the same model: nothing is generated again
    again = evaluate.privileged_gap(run, task, 3, tmp_path / "predictions.jsonl")
    assert len(generated) == 2 and again == first
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["student"]["completion"], str) for r in rows)

    # a trained adapter is not the base any more: the student generates, the adapter-off teacher does not
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    assert not base_cache.student_is_base(run) and base_cache.teacher_is_base(run)
    evaluate.privileged_gap(run, task, 3)
    assert len(generated) == 3 and generated[-1] == generated[0]  # the student's prompts only

    # other items, another budget, or the model's files changed: generated anew
    evaluate.privileged_gap(_run(model_dir), task, 2)
    assert len(generated) == 5
    (model_dir / "config.json").touch()
    evaluate.privileged_gap(_run(model_dir), task, 3)
    assert len(generated) == 7


def test_an_ema_teacher_is_the_base_until_it_moves(tmp_path, generated):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    plain = _run(model_dir)
    evaluate.privileged_gap(plain, plain.task, 3)
    assert len(generated) == 2
    # before training the EMA adapter is the student's own (B = 0): both sides are the base's, read back
    ema = _run(model_dir, components={"ema": {"sync_steps": 1}})
    assert base_cache.student_is_base(ema) and base_cache.teacher_is_base(ema)
    assert evaluate.privileged_gap(ema, ema.task, 3) == evaluate.privileged_gap(plain, plain.task, 3)
    assert len(generated) == 2
    # the student trains and the teacher averages it in: neither is the base any more
    with torch.no_grad():
        for name, p in ema.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    assert not base_cache.teacher_is_base(ema)  # (swapped-in zeros now differ from the student's values)
    ema.components[0].update()
    assert not base_cache.student_is_base(ema) and not base_cache.teacher_is_base(ema)
    evaluate.privileged_gap(ema, ema.task, 3)
    assert len(generated) == 4


def test_a_full_fine_tuning_ema_teacher_is_the_base_until_it_moves(tmp_path, generated):
    run = _run(make_tiny_model_dir(tmp_path / "model"), lora=False, components={"ema": {"sync_steps": 1}})
    assert base_cache.teacher_is_base(run)  # the frozen copy of the initial weights
    with torch.no_grad():
        next(run.model.parameters()).add_(0.01)  # an optimiser step
    run.step = 1
    assert base_cache.teacher_is_base(run)  # the copy has not moved
    run.components[0].update()  # the EMA averages the student into the copy, in place
    assert not base_cache.teacher_is_base(run)
    evaluate.privileged_gap(run, run.task, 3)
    assert len(generated) == 2  # both sides generated: neither holds the base weights


def test_what_the_cache_holds_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_CACHE_DIR", str(tmp_path))
    calls = []

    def make():
        calls.append(1)
        return ["a", "b"]

    keep = lambda: base_cache.cached_completions("w", ["x", "y"], [None, None], 4, 16, make)  # noqa: E731
    assert keep() == ["a", "b"] and keep() == ["a", "b"] and len(calls) == 1
    assert base_cache.cached_completions(None, ["x", "y"], [None, None], 4, 16, make) == ["a", "b"]
    assert len(calls) == 2  # no key: always generated
    for broken in ("{not json", json.dumps(["only one"]), json.dumps([1, 2])):
        for path in tmp_path.glob("base-eval/*.json"):
            path.write_text(broken)
        keep()
    assert len(calls) == 5  # an unreadable or mismatched file is generated again (and replaced)
    assert keep() == ["a", "b"] and len(calls) == 5


def test_several_processes_or_a_hub_id_keep_nothing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from unisd.parallel import distributed

    run = _run(make_tiny_model_dir(tmp_path / "model"))
    key = base_cache.base_weights_key(run)
    assert key is not None
    with monkeypatch.context() as patch:  # an edited generation or prompt module (an editable install)
        patch.setattr(base_cache, "_code_stamp", lambda: "edited")
        assert base_cache.base_weights_key(run) not in (None, key)
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "current", lambda: SimpleNamespace(active=True))
        assert base_cache.base_weights_key(run) is None
    run.source = "someone/some-model"
    assert base_cache.base_weights_key(run) is None


def test_the_frozen_copy_checksum_is_exact_in_chunks_and_kept_only_where_it_can_be_used(monkeypatch):
    from types import SimpleNamespace

    from unisd.model import teacher as teachers
    from unisd.parallel import distributed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2, bias=False))
    monkeypatch.setattr(teachers, "FINGERPRINT_CHUNK", 4)  # every tensor in several chunks, one left over
    expected = torch.tensor([[p.detach().double().sum().item(), p.detach().double().square().sum().item()]
                             for p in model.parameters()], dtype=torch.float64)
    torch.testing.assert_close(teachers.weights_fingerprint(model), expected, rtol=1e-12, atol=1e-12)

    frozen = teachers.FrozenCopyTeacher(model)
    assert frozen.unchanged()
    with torch.no_grad():
        frozen.model[1].weight[0, 0] += 1e-3
    assert not frozen.unchanged()
    # several processes: nothing is cached, so nothing is recorded (ranks may hold meta weights)
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(active=True))
    assert not teachers.FrozenCopyTeacher(model).unchanged()
    with torch.device("meta"):
        on_meta = torch.nn.Linear(5, 3)
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(active=False))
    assert not teachers.FrozenCopyTeacher(on_meta).unchanged()


def test_a_failing_base_evaluation_cache_job_is_only_a_note(tmp_path, capsys):
    from unisd.ops import prepare

    assert prepare.main(["--base-eval", str(tmp_path / "missing.toml"), "--side", "teacher"]) == 0
    assert "not kept" in capsys.readouterr().out
