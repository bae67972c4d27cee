"""The research code's three bugs, as regression tests (unisd-method.md §7.1, §7.2, §7.9)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from components_testlib import examples

from unisd.components import make_options
from unisd.config import RunConfig
from unisd.data.prompts import teacher_text
from unisd.data.tasks import Example, Task
from unisd.io.reporting import Reporter
from unisd.model.models import apply_lora
from unisd.model.rollout import Completion
from unisd.model.scoring import completion_hidden, pack
from unisd.model.teacher import AdapterDisabledTeacher, default_teacher
from unisd.run import Run
from unisd.step import distill_step
from unisd.testing import make_tiny_model, make_tokenizer
from unisd_components.agreement import Agreement
from unisd_components.contrastive import Contrastive
from unisd_components.ema import Ema


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def lora_model(tokenizer):
    model = apply_lora(make_tiny_model(tokenizer, hidden=32), r=4, alpha=8, dropout=0.0)
    model.train()
    return model


def some_packed(tokenizer):
    return pack([tokenizer("What is 12 + 34?")["input_ids"], tokenizer("apple river")["input_ids"]],
                [[5, 6, 7, 2], [8, 9, 2]], tokenizer.pad_token_id)


# ---------------------------------------------------------------- §7.1: EMA must move the teacher under LoRA

def test_ema_teacher_moves_after_a_sync_under_lora(tokenizer):
    torch.manual_seed(0)
    model = lora_model(tokenizer)
    run = SimpleNamespace(config=SimpleNamespace(lora=True), model=model, teacher=AdapterDisabledTeacher(model), step=0)
    ema = Ema(make_options(Ema, {"sync_steps": 2, "beta": 0.9}))
    ema.setup(run)
    teacher = ema.teacher(run)
    packed = some_packed(tokenizer)
    base = AdapterDisabledTeacher(model).hidden(packed)
    torch.testing.assert_close(teacher.hidden(packed), base)  # starts as the base (B = 0)

    with torch.no_grad():  # "training": the student's adapter moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    student_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    run.step = 1
    ema.on_step_end(run)  # not a sync step
    torch.testing.assert_close(teacher.hidden(packed), base)
    run.step = 2
    ema.on_step_end(run)  # sync: teacher adapter = 0.9·initial + 0.1·student
    moved = teacher.hidden(packed)
    assert (moved - base).abs().max() > 1e-4, "the EMA teacher did not move under LoRA"

    # It equals the model with the averaged adapter, computed independently ...
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.requires_grad:
                p.copy_(ema.shadow[name])
    reference.eval()
    torch.testing.assert_close(moved, completion_hidden(reference, packed), rtol=1e-5, atol=1e-5)
    # ... and the student's own weights came back untouched after the teacher's forwards.
    for n, p in model.named_parameters():
        assert torch.equal(p, student_state[n]), n
    with teacher.as_model() as tm:
        torch.testing.assert_close(completion_hidden(tm, packed), moved)
    assert ema.metrics()["distance"] > 0


def test_ema_state_round_trips(tokenizer):
    torch.manual_seed(1)
    model = lora_model(tokenizer)
    run = SimpleNamespace(config=SimpleNamespace(lora=True), model=model, teacher=None, step=1)
    ema = Ema(make_options(Ema, {"sync_steps": 1}))
    ema.setup(run)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.on_step_end(run)
    state = ema.state_dict()
    fresh = Ema(make_options(Ema, {"sync_steps": 1}))
    fresh.setup(run)
    fresh.load_state_dict(state)
    assert fresh.updates == 1
    for name in ema.shadow:
        torch.testing.assert_close(fresh.shadow[name], ema.shadow[name])


def test_ema_under_full_finetuning_averages_the_frozen_copy(tokenizer):
    model = make_tiny_model(tokenizer, hidden=32)
    frozen = default_teacher(model, lora=False)
    run = SimpleNamespace(config=SimpleNamespace(lora=False), model=model, teacher=frozen, step=10)
    ema = Ema()  # CLI defaults: sync 10, β 0.9
    ema.setup(run)
    assert ema.teacher(run) is frozen  # no second copy
    name, param = next(iter(model.named_parameters()))
    before = dict(frozen.model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    ema.on_step_end(run)
    after = dict(frozen.model.named_parameters())[name]
    torch.testing.assert_close(after, 0.9 * before + 0.1 * param.detach())


# ------------------------------------------------- §7.2: sequence-level weights must change the gradient

def tiny_run(tokenizer, components, exs):
    model = make_tiny_model(tokenizer, hidden=32, seed=3)
    config = RunConfig(lora=False, batch_size=4, grad_accum=1, temperature=1.0)
    run = Run(config, model, tokenizer, None, exs, components, None, Reporter())
    run.teacher = default_teacher(model, lora=False)
    for c in components:
        if hasattr(c, "setup"):
            c.setup(run)
    return run


def grads_of(run, exs, completions):
    run.model.zero_grad(set_to_none=True)
    distill_step(run, exs, completions)
    return torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])


def test_sequence_level_weight_scales_the_gradient(tokenizer):
    exs = examples(4)
    one = [exs[0]]
    completions = [Completion([5, 6, 7, 8, 2], truncated=False)]
    plain = grads_of(tiny_run(tokenizer, [], exs), one, completions)
    probe = Agreement(make_options(Agreement, {"level": "seq", "num_contexts": 3}))
    grads_of(tiny_run(tokenizer, [probe], exs), one, completions)
    spread = probe.metrics()["disagreement_mean"]  # a random tiny model disagrees only slightly
    assert spread > 0
    gamma = 0.6931471805599453 / spread  # chosen so that w = exp(−γ·D) = 1/2
    comp = Agreement(make_options(Agreement, {"level": "seq", "gamma": gamma, "num_contexts": 3}))
    weighted = grads_of(tiny_run(tokenizer, [comp], exs), one, completions)
    w = comp.metrics()["weight_mean"]
    assert w == pytest.approx(0.5, rel=1e-3)
    # One sequence, per-sequence weight w: the loss (normalised by the token count) and therefore
    # the gradient are exactly w times the unweighted ones. In the research code they were equal.
    torch.testing.assert_close(weighted, w * plain, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(weighted, plain)


# ------------------------------------------------ §7.9: the negative uses the positive teacher template

class ToolishTask(Task):
    name = "toolish"

    def teacher_text(self, example):
        return teacher_text(example.prompt, example.reference, " Include your thought process.")


@pytest.mark.parametrize("task", [None, ToolishTask()])
def test_negative_context_shares_the_positive_template(task):
    ex = Example("q1", "Which letter? A. x B. y", "Reasoning: because x.\nAnswer: A\n", {})
    negative = "Reasoning: because y.\nAnswer: B\n"
    comp = Contrastive()
    comp.task = task
    comp.attach([ex], {"q1": [{"reference": negative}]})
    text = comp.teacher_contexts(ex)["negative"]
    positive = task.teacher_text(ex) if task else teacher_text(ex.prompt, ex.reference)
    assert text == positive.replace(ex.reference, negative)  # only the demonstration differs
    assert text.startswith("\n" + ex.prompt) and text.count("This is an example for a response") == 1
