"""`unisd doctor`: each preflight check passes on a healthy tiny model and catches what it is for."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from unisd.cli import doctor_cmd
from unisd.config import RunConfig
from unisd.ops import doctor
from unisd.ops.doctor import exit_code, run_doctor
from unisd.ops.memory import FreeMemory, estimate_step_memory
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model, make_tokenizer, toy_records, write_jsonl


def make_app():
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        pass

    doctor_cmd.register(app, get_plugin_manager(load_entry_points=False))
    return app


def save_model(path, tokenizer, model):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def by_name(checks):
    return {c.name: c for c in checks}


def doctor_on(tmp_path, tokenizer, model, records=None, **settings):
    data = write_jsonl(tmp_path / "d.jsonl", records or toy_records(6))
    cfg = RunConfig(model="in-memory", data=str(data), batch_size=2, max_new_tokens=8, lora_r=4, **settings)
    return by_name(run_doctor(cfg, get_plugin_manager(load_entry_points=False), loader=lambda _c: (tokenizer, model)))


def test_healthy_model_passes_every_check_and_exits_0(tmp_path):
    tok = make_tokenizer(pad_is_eos=False)
    path = save_model(tmp_path / "m", tok, make_tiny_model(tok))
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(6))
    result = CliRunner().invoke(make_app(), ["doctor", "--model", str(path), "--data", str(data), "--batch-size", "2",
                                             "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {name: "pass" for name in ("data", "chat template", "EOS vs pad", "vocab size",
                                                  "teacher-prompt budget", "zero-divergence self-test",
                                                  "generation backend", "memory")}
    assert report["ok"] is True


def test_missing_chat_template_fails_with_exit_1(tmp_path):
    tok = make_tokenizer(chat_template=False)
    path = save_model(tmp_path / "m", tok, make_tiny_model(tok))
    result = CliRunner().invoke(make_app(), ["doctor", "--model", str(path), "--batch-size", "2"])
    assert result.exit_code == 1, result.output
    assert "[FAIL] chat template: the tokenizer has no chat template" in result.output
    assert "fix: use the instruct/chat version" in result.output
    assert "[SKIP] teacher-prompt budget" in result.output  # no --task/--data


def test_vocab_mismatch_fails_and_skips_the_checks_that_would_crash(tmp_path):
    tok = make_tokenizer()
    model = make_tiny_model(tok)
    model.resize_token_embeddings(len(tok) - 50)
    checks = doctor_on(tmp_path, tok, model)
    vocab = checks["vocab size"]
    assert vocab.status == "fail"
    assert vocab.details["embedding_rows"] == len(tok) - 50 and vocab.details["tokenizer"] == len(tok)
    assert checks["zero-divergence self-test"].status == "skip"
    assert checks["generation backend"].status == "skip"
    assert exit_code(list(checks.values())) == 1


def test_over_budget_teacher_prompts_are_counted(tmp_path):
    tok = make_tokenizer()
    records = toy_records(6)
    for r in records[:4]:
        r["reference"] = "Reasoning: because the sky is blue. " * 30 + "Answer: A"
    checks = doctor_on(tmp_path, tok, make_tiny_model(tok), records, max_teacher_prompt_tokens=120)
    budget = checks["teacher-prompt budget"]
    assert budget.status == "fail"
    assert sorted(budget.details["truncated"]) == ["toy-0", "toy-1", "toy-2", "toy-3"]
    assert budget.details["over_budget"] == []
    assert "4 reference(s) would be truncated" in budget.message
    assert budget.details["longest_teacher_prompt"] > 120
    assert str(budget.details["longest_teacher_prompt"]) in budget.fix

    ok = doctor_on(tmp_path, tok, make_tiny_model(tok), records, max_teacher_prompt_tokens=2000)
    assert ok["teacher-prompt budget"].status == "pass"


def test_pad_equal_to_eos_warns_and_confirms_eos_in_mask(tmp_path):
    tok = make_tokenizer(pad_is_eos=True)
    checks = doctor_on(tmp_path, tok, make_tiny_model(tok))
    eos = checks["EOS vs pad"]
    assert eos.status == "warn" and "EOS stays in it" in eos.message
    assert eos.details["pad_id"] == eos.details["eos_id"] == tok.eos_token_id
    assert exit_code(list(checks.values())) == 0  # a warning does not fail the preflight


def test_zero_divergence_self_test_catches_dropout_in_training_mode(tmp_path):
    tok = make_tokenizer()
    healthy = doctor_on(tmp_path, tok, make_tiny_model(tok))["zero-divergence self-test"]
    assert healthy.status == "pass" and healthy.details["max"] < 1e-6
    model = make_tiny_model(tok)
    for layer in model.model.layers:  # the student forward runs in train mode, as in the loop
        layer.self_attn.attention_dropout = 0.9
        with torch.no_grad():  # a random tiny model barely uses attention; make it matter as in a trained one
            layer.self_attn.o_proj.weight.mul_(10)
    broken = doctor_on(tmp_path, tok, model)["zero-divergence self-test"]
    assert broken.status == "fail", broken.message
    assert broken.details["max"] > 10 * broken.details["tolerance"]
    assert "dropout" in broken.fix


def test_memory_check_fails_when_the_estimate_exceeds_free_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "free_memory", lambda device: FreeMemory(1024, 2048, "fake"))
    tok = make_tokenizer()
    mem = doctor_on(tmp_path, tok, make_tiny_model(tok))["memory"]
    assert mem.status == "fail" and "fake" in mem.message and "--batch-size" in mem.fix


def test_memory_estimate_formula():
    tok = make_tokenizer()
    model = make_tiny_model(tok, hidden=32, layers=2)
    n = sum(p.numel() for p in model.parameters())
    est = estimate_step_memory(model, batch_size=3, grad_accum=2, prompt_tokens=10, new_tokens=6, lora=False)
    v, h, layers, kv_dim = len(tok), 32, 2, 2 * (32 // 4)
    assert est.optimizer == n * 4 * 3 + n * 4
    assert est.activations == 3 * 16 * layers * h * 4 * 17
    assert est.logits == 5 * 18 * v * 4 + 2 * 18 * h * 4  # 18 completion tokens fit one chunk
    assert est.kv_cache == 2 * layers * kv_dim * 16 * 6 * 4
    assert est.peak == est.optimizer + max(est.kv_cache, est.activations + est.logits)
    # the divergence's buffers are bounded by the chunk, not the tokens; sharding splits the optimizer
    small = estimate_step_memory(model, batch_size=3, grad_accum=2, prompt_tokens=10, new_tokens=6, lora=False,
                                 chunk_size=4, processes=2)
    assert small.logits == 5 * 4 * v * 4 + 2 * 18 * h * 4
    assert small.optimizer == est.optimizer // 2


@pytest.mark.parametrize("flag", ["--batch-size", "--max-new-tokens"])
def test_bad_numbers_exit_2(flag, tmp_path):
    result = CliRunner().invoke(make_app(), ["doctor", "--model", str(tmp_path), flag, "0"])
    assert result.exit_code == 2


def test_zero_divergence_self_test_runs_the_loops_chunked_path_with_the_runs_settings(tmp_path, monkeypatch):
    from unisd.divergence import chunked

    seen = []
    real = chunked.chunked_token_outputs

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunked_token_outputs", spy)
    tok = make_tokenizer(pad_is_eos=False)
    checks = doctor_on(tmp_path, tok, make_tiny_model(tok), divergence_chunk_size=3, alpha=0.5)
    assert checks["zero-divergence self-test"].status == "pass"
    assert [(k["chunk_size"], k["alpha"]) for k in seen] == [(3, 0.5)]  # the run's chunking and divergence
