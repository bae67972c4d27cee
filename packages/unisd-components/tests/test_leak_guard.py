"""leak-guard: the divergence of tokens that copy teacher-only text is masked (or down-weighted)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from components_testlib import scores, step_batch

from unisd.components import make_options
from unisd.config import RunConfig
from unisd.data.demo import DemoTask
from unisd.data.tasks import Example
from unisd.errors import OptionError
from unisd.io.reporting import Reporter
from unisd.model.models import apply_lora
from unisd.model.rollout import Completion, HFBackend
from unisd.model.teacher import default_teacher
from unisd.plugins import get_plugin_manager
from unisd.run import Run
from unisd.step import distill_step
from unisd.testing import make_tiny_model, make_tokenizer
from unisd_components.clip import Clip
from unisd_components.leak_guard import LeakGuard

EX = Example("u1", "Rewrite 'cloud table' in capital letters. Reply with only the rewritten words.", "CLOUD TABLE")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def guard(tokenizer, **options):
    """The guard with ``options``; its stop term off unless asked for, so the other mechanisms are seen alone."""
    options = {"stop_weight": 0, **options}
    comp = LeakGuard(make_options(LeakGuard, {k: str(v) for k, v in options.items()}))
    comp.setup(SimpleNamespace(tokenizer=tokenizer, task=DemoTask()))
    return comp


def weights_for(comp, tokenizer, texts):
    completions = [ids_of(tokenizer, t) for t in texts]
    width = max(len(c) for c in completions)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions])
    batch = step_batch([EX] * len(texts), [mask], [{}])
    batch.completions = completions
    return comp.token_weights(scores(mask), batch), completions


def test_leaking_completion_is_masked_from_the_leak_on_and_a_clean_one_is_untouched(tokenizer):
    comp = guard(tokenizer)
    w, (leaky, clean) = weights_for(comp, tokenizer, ["CLOUD TABLE\n\nThis is an example for a", "CLOUD TABLE"])
    answer = len(tokenizer("CLOUD TABLE", add_special_tokens=False)["input_ids"])  # tokens of the answer itself
    assert w[0, :answer].tolist() == [1.0] * answer  # the correct answer before the leak is still trained
    assert w[0, answer:len(leaky)].tolist() == [0.0] * (len(leaky) - answer)  # "\n\n", the template, EOS
    assert tokenizer.decode(leaky[answer:], skip_special_tokens=True) == "\n\nThis is an example for a"
    assert w[1].tolist() == [1.0] * w.shape[1]
    guarded = pytest.approx((len(leaky) - answer) / (len(leaky) + len(clean)))
    assert comp.metrics() == {"leaking_fraction": 0.5, "guarded_fraction": guarded, "activity": guarded}


def test_scope_and_weight(tokenizer):
    text = "This is an example for a response to the question:\nCLOUD TABLE"
    leaky = ids_of(tokenizer, text)
    template = len(tokenizer("This is an example for a response to the question", add_special_tokens=False)["input_ids"])
    span = guard(tokenizer, scope="span").guarded_positions(EX, leaky)
    assert span == list(range(template))  # the copied template phrase only, not the answer or EOS after it
    assert guard(tokenizer).guarded_positions(EX, leaky) == list(range(len(leaky)))  # rest: from token 0 on
    w, _ = weights_for(guard(tokenizer, weight=0.25, scope="completion"), tokenizer, ["CLOUD TABLE\n\nThis is an example"])
    assert set(w[0].tolist()) == {0.25}
    assert guard(tokenizer).guarded_positions(EX, ids_of(tokenizer, "CLOUD TABLE\n\nThis is an")) == []  # 3 words
    assert guard(tokenizer, min_template_words=3).guarded_positions(EX, ids_of(tokenizer, "CLOUD TABLE\n\nThis is an"))
    with pytest.raises(OptionError, match="weight"):
        make_options(LeakGuard, {"weight": "1"})
    with pytest.raises(OptionError, match="scope"):
        make_options(LeakGuard, {"scope": "everything"})


def test_registered_by_its_own_entry_point():
    pm = get_plugin_manager()
    assert pm.registries.components.get("leak-guard") is LeakGuard
    assert any(r.name == "leak_guard" and r.status == "loaded" for r in pm.reports)


def tiny_run(tokenizer, components):
    model = make_tiny_model(tokenizer, hidden=32, seed=3)
    run = Run(RunConfig(lora=False, batch_size=4, grad_accum=1, temperature=1.0), model, tokenizer, DemoTask(),
              [EX], components, None, Reporter())
    run.teacher = default_teacher(model, lora=False)
    for c in components:
        if hasattr(c, "setup"):
            c.setup(run)
    return run


def grads(run, completions):
    run.model.zero_grad(set_to_none=True)
    stats = distill_step(run, [EX] * len(completions), completions)
    return stats, torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])


def test_step_runs_composed_with_clip_and_leaked_tokens_get_no_gradient(tokenizer):
    leaky = Completion(ids_of(tokenizer, "This is an example for a response to the question:"), truncated=False)
    clean = Completion(ids_of(tokenizer, "CLOUD TABLE"), truncated=False)
    options = {"max_value": "0.5"}  # low enough to clip some of a random model's tokens
    lg = guard(tokenizer)
    stats, guarded = grads(tiny_run(tokenizer, [Clip(make_options(Clip, options)), lg]), [leaky, clean])
    assert torch.isfinite(guarded).all() and guarded.abs().sum() > 0 and stats["loss"] > 0
    assert lg.metrics()["leaking_fraction"] == 0.5
    # The leaky completion is masked whole (its leak starts at token 0), so the step's gradient is the clean
    # completion's alone, divided by both completions' token count (the step's denominator).
    _, alone = grads(tiny_run(tokenizer, [Clip(make_options(Clip, options))]), [clean])
    both = len(leaky.ids) + len(clean.ids)
    torch.testing.assert_close(guarded * both, alone * len(clean.ids), rtol=1e-4, atol=1e-6)
    _, unguarded = grads(tiny_run(tokenizer, [Clip(make_options(Clip, options))]), [leaky, clean])
    assert not torch.allclose(guarded, unguarded)


def lora_run(tokenizer, components):
    model = apply_lora(make_tiny_model(tokenizer, hidden=32, seed=3), 4, 8, 0.0)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: move the student away from the teacher so there is a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run = Run(RunConfig(lora=True, lora_dropout=0.0, batch_size=4, grad_accum=1, temperature=1.0), model, tokenizer,
              DemoTask(), [EX], components, None, Reporter())
    run.teacher = default_teacher(model, lora=True)
    for c in components:
        if hasattr(c, "setup"):
            c.setup(run)
    return run


def test_lookahead_guards_the_eos_where_the_teacher_would_go_on_copying(tokenizer, monkeypatch):
    seen = []

    def continue_with_template(self, prompts, params):
        seen.extend(prompts)
        return [Completion(tokenizer("\n\nThis is an example for a", add_special_tokens=False)["input_ids"], True)
                for _ in prompts]

    comp = LeakGuard(make_options(LeakGuard, {"lookahead": "8", "stop_weight": "0", "opening": "false"}))
    run = lora_run(tokenizer, [comp])
    monkeypatch.setattr(HFBackend, "generate", continue_with_template)
    texts = ["CLOUD TABLE", "CLOUD TABLE\n\nThis is an example for a"]
    w, (clean, leaky) = weights_for(comp, tokenizer, texts)
    assert w[0, : len(clean) - 1].tolist() == [1.0] * (len(clean) - 1) and w[0, len(clean) - 1] == 0.0  # its EOS
    # Only the clean completion is continued, from the teacher's prompt, without its EOS.
    assert seen == [run.teacher_ids(EX) + clean[:-1]]
    assert comp.metrics()["teacher_start_fraction"] == 0.5 and comp.metrics()["leaking_fraction"] == 0.5
    off = guard(tokenizer)
    assert weights_for(off, tokenizer, texts)[0][0].tolist() == [1.0] * w.shape[1]  # lookahead 0: not looked at


EX2 = Example("u2", "What is 20 + 26? Reply with only the number.", "46")


def test_opening_guards_the_first_position_where_the_teachers_own_answer_opens_with_the_template(
        tokenizer, monkeypatch):
    """The teacher answers each example once from its bare prompt; only an answer that *opens* with
    teacher-only text guards the first position of that example's completions."""
    seen = []
    answers = {"u1": "This is an example for a response", "u2": "46\n\nThis is an example for"}

    def teacher_answers(self, prompts, params):
        seen.extend(prompts)
        bare = {tuple(run.teacher_ids(ex)): answers[ex.id] for ex in (EX, EX2)}
        return [Completion(tokenizer(bare.get(tuple(p), ""), add_special_tokens=False)["input_ids"], True)
                for p in prompts]

    comp = LeakGuard(make_options(LeakGuard, {"lookahead": "8", "stop_weight": "0", "opening": "true"}))
    run = lora_run(tokenizer, [comp])
    monkeypatch.setattr(HFBackend, "generate", teacher_answers)
    examples = [EX, EX, EX2]
    completions = [ids_of(tokenizer, t) for t in ("CLOUD TABLE", "CLOUD", "46")]
    width = max(len(c) for c in completions)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions])
    batch = step_batch(examples, [mask], [{}])
    batch.completions = completions
    w = comp.token_weights(scores(mask), batch)
    assert w[0, 0] == 0.0 and w[1, 0] == 0.0  # the rewrite item: its teacher opens with the template
    assert w[0, 1:len(completions[0])].tolist() == [1.0] * (len(completions[0]) - 1)
    assert w[2].tolist() == [1.0] * width  # "46" first, the template after it: not an opening
    # one bare-prompt answer per example, beside the three EOS continuations
    bare = [p for p in seen if p in (run.teacher_ids(EX), run.teacher_ids(EX2))]
    assert sorted(map(len, bare)) == sorted(len(run.teacher_ids(ex)) for ex in (EX, EX2)) and len(seen) == 5
    assert comp.metrics()["teacher_opening_fraction"] == pytest.approx(2 / 3)
    assert comp._opens_with_leak("**This is an example for a response", EX)  # markdown before it: still an opening
    assert not comp._opens_with_leak("CLOUD: This is an example for a response", EX)
    comp_off = LeakGuard(make_options(LeakGuard, {"lookahead": "8", "stop_weight": "0"}))  # off by default
    lora_run(tokenizer, [comp_off])
    assert comp_off.token_weights(scores(mask), batch)[0, 0] == 1.0
    assert "teacher_opening_fraction" not in comp_off.metrics()


def test_lookahead_between_forward_and_backward_leaves_the_gradient_alone(tokenizer):
    """The teacher generates (adapter off) after the student's forward; the gradient must not notice."""
    completions = [Completion(ids_of(tokenizer, "CLOUD TABLE"), False), Completion(ids_of(tokenizer, "46"), False)]
    comp = LeakGuard(make_options(LeakGuard, {"lookahead": "6", "stop_weight": "0"}))
    _, looked = grads(lora_run(tokenizer, [comp]), completions)
    assert comp.metrics()["teacher_start_fraction"] == 0.0  # a random model does not write the template
    _, plain = grads(lora_run(tokenizer, []), completions)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(looked, plain)


def test_with_leak_guard_and_clip_from_the_command_line(tiny_model_dir, data_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from unisd.cli.app import make_app

    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_model_dir), "--data", str(data_file), "--steps", "1", "--batch-size", "2",
        "--grad-accum", "1", "--max-new-tokens", "4", "--with", "leak-guard", "--with", "clip",
        "-o", "leak-guard.scope=span", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["leak-guard/leaking_fraction"] == record["leakage"] == 0.0  # a random model copies nothing
    assert record["leak-guard/guarded_fraction"] == 0.0 and "clip/fraction" in record
    assert record["leak-guard/reference_end_fraction"] == 0.0  # the stop term is on by default


def test_reference_end_is_the_first_position_after_a_reproduced_reference(tokenizer):
    comp = guard(tokenizer, stop_weight=1)
    answer = len(tokenizer("CLOUD TABLE", add_special_tokens=False)["input_ids"])
    assert comp.reference_end(EX, ids_of(tokenizer, "CLOUD TABLE\n\nThis is a classic example")) == answer
    assert comp.reference_end(EX, ids_of(tokenizer, "CLOUD TABLE")) == answer  # the EOS: stopping there is right
    no_eos = tokenizer("CLOUD TABLE", add_special_tokens=False)["input_ids"]
    assert comp.reference_end(EX, no_eos) is None  # cut right after it: no position left to stop at
    assert comp.reference_end(EX, ids_of(tokenizer, "CLOUDY TABLE\n\n")) is None
    sums = Example("s", "What is 20 + 56? Reply with only the number.", "76")
    assert comp.reference_end(sums, ids_of(tokenizer, "20 + 156 = 176\n")) is None  # "76" inside a word is not it
    ids = ids_of(tokenizer, "So 20 + 56 = 76 and that is all")
    end = comp.reference_end(sums, ids)
    prefix = tokenizer.decode(ids[:end], skip_special_tokens=True)
    assert prefix.endswith("76") and "76" not in tokenizer.decode(ids[: end - 1], skip_special_tokens=True)
    with pytest.raises(OptionError, match="stop_weight"):
        make_options(LeakGuard, {"stop_weight": "-1"})


def test_stop_term_is_minus_log_p_eos_where_the_reference_ends_and_the_rest_is_guarded(tokenizer):
    texts = ["CLOUD TABLE\n\nThis is a classic", "CLOUD TABLE", "GREEN"]
    comp = LeakGuard(make_options(LeakGuard, {"stop_weight": "0.5"}))
    run = lora_run(tokenizer, [comp])
    completions = [Completion(ids_of(tokenizer, t), False) for t in texts]
    run.model.zero_grad(set_to_none=True)
    stats = distill_step(run, [EX] * len(texts), completions)
    answer = len(tokenizer("CLOUD TABLE", add_special_tokens=False)["input_ids"])
    # The reference: -log p_student(EOS) at the position after "CLOUD TABLE" (float64 softmax of the full logits).
    expected = 0.0
    with torch.no_grad():
        for c in completions[:2]:
            ids = run.student_ids(EX) + c.ids[:answer]
            logits = run.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            expected += -0.5 * float(torch.log_softmax(logits, -1)[tokenizer.eos_token_id])
    tokens = sum(len(c.ids) for c in completions)
    assert stats["loss/stop"] == pytest.approx(expected / tokens, rel=1e-4)
    assert comp.metrics()["reference_end_fraction"] == pytest.approx(2 / 3)
    w, done = weights_for(comp, tokenizer, texts)
    assert w[0, :answer].tolist() == [1.0] * answer and w[0, answer : len(done[0])].eq(0).all()
    assert w[1, :answer].tolist() == [1.0] * answer and w[1, answer] == 0.0  # its EOS: taught by the stop term
    assert w[2, : len(done[2])].eq(1).all()  # "GREEN" never reproduced the reference
    without = LeakGuard(make_options(LeakGuard, {}))
    assert "stop" not in without.extra_losses(scores(w), step_batch([EX], [w], [{}]))


def test_lookahead_with_an_ema_teacher_between_forward_and_backward(tokenizer):
    """An EMA teacher swaps its values into the LoRA parameters to generate; the backward after it must
    neither fail (autograd version counters) nor change: the same gradient as without the lookahead."""
    from unisd_components.ema import Ema

    completions = [Completion(ids_of(tokenizer, "CLOUD TABLE"), False), Completion(ids_of(tokenizer, "46"), False)]

    def ema_run(components):
        ema = Ema(make_options(Ema, {"sync_steps": "1", "beta": "0.5"}))
        run = lora_run(tokenizer, [ema, *components])
        run.teacher = ema.teacher(run)
        with torch.no_grad():  # an EMA copy that differs from the student, so a swap is visible
            for value in ema.shadow.values():
                value.mul_(0.5)
        return run

    comp = LeakGuard(make_options(LeakGuard, {"lookahead": "4", "stop_weight": "0"}))
    _, looked = grads(ema_run([comp]), completions)
    _, plain = grads(ema_run([]), completions)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(looked, plain)
