"""Negative demonstrations: prompts per kind, parsing, validation, rendering like the positive, the
resumable cache, generation, `unisd cache negatives`, and the demo's own negatives."""

from __future__ import annotations

import json

import pytest
import torch
from components_testlib import examples
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.data.demo import DemoTask
from unisd.data.prompts import reference_with_reasoning
from unisd.data.tasks import Example, teacher_text_with
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tokenizer, toy_records, write_jsonl
from unisd_components.contrastive import Contrastive
from unisd_components.negatives import (
    BUG_TYPES,
    DEFAULT_MAX_NEW_TOKENS,
    JSON_ALLOWANCE,
    JSON_SCHEMA,
    METHOD_MAX_NEW_TOKENS,
    ParsedOutput,
    build_negatives,
    json_object_end,
    negative_budget,
    negative_prompts,
    parse_output,
    parse_sample,
    read_cache,
    rejection,
    render_negative,
    schema_object_end,
    wrong_targets,
)
from unisd_components.negatives_gen import (
    guided_json_kwargs,
    hf_generator,
    json_closed_criteria,
    pick_backend,
)

MCQA = Example("m1", "Q? A. cat B. dog C. cow D. owl", "Reasoning: r\nAnswer: B\n",
               {"choices": ["cat", "dog", "cow", "owl"], "correct_letter": "B"})


def test_mcqa_wrong_letters_round_robin():
    assert wrong_targets(MCQA, 4) == ["A", "C", "D", "A"]
    prompts = negative_prompts(MCQA, "mcqa", 2)
    assert [t for _, t in prompts] == ["A", "C"]
    assert "answer is A (cat)" in prompts[0][0] and "answer is C (cow)" in prompts[1][0]


def test_mcqa_letters_from_num_choices_as_unisd_eval_stores_them():
    ex = Example("m2", "Q? A. x B. y C. z", "Answer: C", {"correct_letter": "C", "num_choices": 3})
    assert wrong_targets(ex, 3) == ["A", "B", "A"]
    assert "the answer is B.\n" in negative_prompts(ex, "mcqa", 2)[1][0]


def test_code_and_tool_prompts_cycle_their_types():
    code = Example("c1", "Write add.", "def add(a, b):\n    return a + b", {"test_list": ["assert add(1, 2) == 3"]})
    prompts = negative_prompts(code, "code", 5)
    assert [t for _, t in prompts] == [*BUG_TYPES, BUG_TYPES[0]]
    assert "Function name: add" in prompts[0][0] and "assert add(1, 2) == 3" in prompts[0][0]
    tool = negative_prompts(Example("t", "Use the API.", "Action: x", {}), "tooluse", 4)
    assert [t for _, t in tool] == ["wrong_action", "wrong_args", "wrong_interpretation", "extra_tool_calls"]


def test_parse_and_layout_match_the_positive_reference():
    assert parse_output('noise {"reasoning": "Dogs bark.", "answer": "Z"} tail') == ("Dogs bark.", "Z")
    assert parse_output("not json at all") == ("", "not json at all")
    # MCQA: the wrong letter in the positive layout, whatever letter the model wrote.
    assert render_negative(MCQA, "mcqa", "A", "Cats purr.", "B") == reference_with_reasoning("A", "Cats purr.")
    # Code: laid out like the positive reference (bare here, as this --data example's is).
    bare = Example("c", "Write f.", "def f():\n    return 1", {"test_list": ["assert f() == 1"]})
    fenced_answer = "```python\ndef f():\n    return 2\n```"
    assert render_negative(bare, "code", "wrong operator", "", fenced_answer) == "def f():\n    return 2"
    fenced = Example("c", "Write f.", "```python\ndef f():\n    return 1\n```", {"test_list": ["assert f() == 1"]})
    assert render_negative(fenced, "code", "wrong operator", "", fenced_answer) == fenced_answer
    assert render_negative(fenced, "code", "wrong operator", "", "def f():\n    return 2") == fenced_answer


def test_build_is_resumable(tmp_path):
    exs = examples(3)
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [json.dumps({"reasoning": "", "answer": f"wrong {i}"}) for i in range(len(prompts))]

    out = tmp_path / "neg.jsonl"
    first = build_negatives(exs[:2], generate, out, num_negatives=2, batch_examples=1)
    assert (first["skipped"], first["written"], first["without"]) == (0, 2, 0)
    with out.open("a") as fh:
        fh.write('{"id": "ex-2", "negat')  # an interrupted write: redone, never fatal
    second = build_negatives(exs, generate, out, num_negatives=2)
    assert (second["skipped"], second["written"]) == (2, 1)
    assert calls == [2, 2, 2]
    cache = read_cache(out)
    assert set(cache) == {"ex-0", "ex-1", "ex-2"}
    assert [n["reference"] for n in cache["ex-0"]] == ["wrong 0", "wrong 1"]


def test_contrastive_without_any_negative_says_how_to_fix(tmp_path):
    from types import SimpleNamespace

    from unisd.errors import UsageError
    from unisd.io.reporting import Reporter

    run = SimpleNamespace(task=None, examples=examples(2), reporter=Reporter(),
                          config=SimpleNamespace(model="m", data="d.jsonl", task=None))
    with pytest.raises(UsageError, match="unisd cache negatives --model m --data d.jsonl"):
        Contrastive().setup(run)


def fake_hf_generator(seen):
    """Stands in for the model: its very first sample is degenerate (rejected, then redone)."""
    def make(model, tokenizer, params, batch_size=16):
        seen["max_new_tokens"] = params.max_new_tokens
        counter = iter(range(10**6))

        def generate(texts):
            seen.setdefault("calls", []).append(len(texts))
            return [json.dumps({"reasoning": "", "answer": "\U0001F600" * 40}) if i == 0 and len(seen["calls"]) == 1 else
                    json.dumps({"reasoning": "a slip", "answer": str(1000 + next(counter))}) for i in range(len(texts))]
        return generate
    return make


def test_cache_negatives_command_then_train_with_it(tiny_model_dir, tmp_path, monkeypatch):
    import unisd_components.negatives_gen as gen

    seen = {}
    monkeypatch.setattr(gen, "hf_generator", fake_hf_generator(seen))
    data = write_jsonl(tmp_path / "plain.jsonl", toy_records(4))  # no negative_reference in meta
    out = tmp_path / "neg.jsonl"
    app = make_app(get_plugin_manager())
    runner = CliRunner()
    args = ["cache", "negatives", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "3",
            "--num-negatives", "2", "--backend", "hf", "--output", str(out)]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert seen["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS + JSON_ALLOWANCE  # --data: no task budget to take
    assert seen["calls"] == [6, 1]  # all 3 examples x 2 at once, then the one rejected sample again
    assert "negatives: 0/3 example(s) done, 0 without a negative, 6 sample(s) generated, 1 rejected" in first.output
    assert "negatives: 3/3 example(s) done, 0 without a negative, 7 sample(s) generated, 1 rejected" in first.output
    assert "3 example(s) written, 0 already done, 0 without any valid negative" in first.output
    assert "rejected samples: 1 degenerate repetition" in first.output
    again = runner.invoke(app, args, catch_exceptions=False)
    assert "0 example(s) written, 3 already done" in again.output
    cache = read_cache(out)
    assert len(cache) == 3 and all(len(v) == 2 for v in cache.values())

    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir), "--steps", "1",
        "--batch-size", "4", "--grad-accum", "1", "--max-new-tokens", "4", "--with", "contrastive",
        "-o", f"contrastive.cache={out}",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 of 4 example(s) have no negative" in result.output  # toy-3 was beyond --limit
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["contrastive/missing_fraction"] == pytest.approx(0.25)


def test_cache_negatives_for_the_demo_needs_no_model():
    result = CliRunner().invoke(make_app(get_plugin_manager()),
                                ["cache", "negatives", "--model", "no/such-model", "--task", "demo"])
    assert result.exit_code == 0, result.output
    assert "supplies its own negatives for 384 of 384 example(s)" in result.output


def test_demo_negatives_are_wrong_deterministic_and_used_without_a_cache():
    task = DemoTask()
    exs = task.load("train")
    negatives = [task.negative(e) for e in exs]
    assert negatives == [task.negative(e) for e in task.load("train")]
    for ex, neg in zip(exs, negatives, strict=True):
        assert neg and neg != ex.reference and task.score(ex, neg).value == 0.0
        if ex.meta["kind"] == "uppercase":
            assert sorted(neg.split()) == sorted(ex.reference.split())  # the right words, wrongly rewritten
        else:
            assert neg.isdigit()
    comp = Contrastive()
    comp.task = task
    comp.attach(exs, {})
    assert not comp.missing and comp.negatives[exs[0].id] == negatives[0]


def test_unisd_star_trains_on_the_demo_without_a_negatives_cache(tiny_model_dir, tmp_path, private_cache):
    from unisd_components.contexts.retrieval import EMBEDDER_NAME, cached_embeddings, embedding_text

    # The preset's retrieval contexts: pre-fill the embedding cache so MiniLM is not loaded.
    texts = [embedding_text(e) for e in DemoTask().load("train")]
    gen = torch.Generator().manual_seed(0)
    cached_embeddings(texts, lambda: (lambda t: torch.randn(len(t), 8, generator=gen)), EMBEDDER_NAME,
                      folder=private_cache / "embeddings")
    out = tmp_path / "star"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_model_dir), "--task", "demo", "--preset", "unisd-star", "--steps", "1",
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not list(private_cache.rglob("negatives.jsonl"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["contrastive/missing_fraction"] == 0.0 and "loss/contrastive" in record


# -- MBPP: the positive and negative teacher prompts differ only inside the code --------------------

MBPP_ROW = {"task_id": 11, "prompt": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3"], "test_imports": []}
BUGGY = "def add(a, b):\n    return a - b"


@pytest.mark.parametrize("answer", [BUGGY, f"```python\n{BUGGY}\n```", f"```\n{BUGGY}\n```"])
def test_mbpp_negative_context_differs_from_the_positive_only_in_the_code(answer):
    from unisd_eval.tasks.mbpp import MBPPTask

    task = MBPPTask()
    ex = task.example(MBPP_ROW, "row")
    raw = json.dumps({"reasoning": "an operator slip", "answer": answer})
    parsed = parse_sample(raw)
    negative = render_negative(ex, "code", "wrong operator", parsed.reasoning, parsed.answer, task)
    assert rejection(ex, "code", parsed, negative) is None
    positive_text = task.teacher_text(ex)
    comp = Contrastive()
    comp.task = task
    # An older cache entry (bare code) is re-rendered by the task too.
    comp.attach([ex], {ex.id: [{"kind": "code", "target": "wrong operator", "reasoning": "", "answer": BUGGY,
                                "reference": BUGGY}]})
    for negative_text in (teacher_text_with(task, ex, negative), comp.teacher_contexts(ex)["negative"]):
        assert positive_text != negative_text
        assert positive_text.replace(ex.meta["code"], "<CODE>") == negative_text.replace(BUGGY, "<CODE>")
        assert "```python\n```python" not in negative_text


# -- parsing and validation -------------------------------------------------------------------------


def test_json_object_end_skips_braces_in_strings():
    assert json_object_end('x {"a": "}{", "b": {"c": 1}} tail}') == len('x {"a": "}{", "b": {"c": 1}}')
    assert json_object_end('{"a": "\\"}') is None  # still open: the quote is escaped
    assert json_object_end("no object") is None
    assert parse_sample('{"answer": "7"} then {"answer": "8"}') == ParsedOutput("", "7", True)
    assert parse_sample("{not json} {\"answer\": \"9\", \"reasoning\": \"r\"}") == ParsedOutput("r", "9", True)
    assert parse_sample("plain 47") == ParsedOutput("", "plain 47", False)
    # A brace pair of code or prose is not the answer's object.
    assert parse_sample('x = {} ; {"other": 1} {"answer": "5"}') == ParsedOutput("", "5", True)
    assert schema_object_end("def f():\n    return {}") is None


def why(text, kind="generic", example=Example("n", "What is 12 + 34?", "46", {})):
    parsed = parse_sample(text)
    return rejection(example, kind, parsed, render_negative(example, kind, "t", parsed.reasoning, parsed.answer))


def test_validation_rejects_bad_samples():
    assert why(json.dumps({"reasoning": "forgot the carry", "answer": "36"})) is None
    assert why("36, because I forgot the carry") == "not JSON"
    assert why(json.dumps({"reasoning": "", "answer": "  "})) == "empty"
    assert why(json.dumps({"reasoning": "sure", "answer": " 46 "})) == "same as the reference"
    assert why(json.dumps({"reasoning": "", "answer": " ".join(f"w{i}" for i in range(120))})) == "too long"
    assert why(json.dumps({"reasoning": "", "answer": "\U0001F600" * 30})) == "degenerate repetition"
    assert why(json.dumps({"reasoning": "ha " * 20, "answer": "36"})) == "degenerate repetition"
    assert why(json.dumps({"reasoning": "x\ny\ny\ny\ny", "answer": "36"})) == "degenerate repetition"
    code = Example("c", "Write f.", "```python\ndef f():\n    return 1\n```", {"test_list": ["assert f() == 1"]})
    assert why(json.dumps({"reasoning": "", "answer": "def f(:\n"}), "code", code) == "not valid Python"
    assert why("```python\ndef f():\n    return 2\n```", "code", code) is None  # raw fenced code is parsed too
    indented = "def f(x):\n                if x:\n                    return 2\n                return 0"
    assert why(json.dumps({"reasoning": "", "answer": indented}), "code", code) is None  # indentation is no repeat


def test_rejected_samples_are_retried_a_bounded_number_of_times(tmp_path):
    exs = examples(2)
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return ["not json"] * len(prompts)

    stats = build_negatives(exs, generate, tmp_path / "n.jsonl", num_negatives=2, max_retries=2)
    assert calls == [4, 4, 4]
    assert stats["without"] == 2 and stats["rejected"] == {"not JSON": 12}
    assert read_cache(tmp_path / "n.jsonl") == {"ex-0": [], "ex-1": []}


def test_a_negative_the_task_scores_correct_is_rejected(tmp_path):
    from unisd_eval.tasks.mbpp import MBPPTask

    task = MBPPTask()
    ex = task.example(MBPP_ROW, "row")
    answers = iter(["def add(a, b):\n    return b + a", BUGGY])  # a correct solution, then a buggy one

    def generate(prompts):
        return [json.dumps({"reasoning": "", "answer": next(answers)}) for _ in prompts]

    stats = build_negatives([ex], generate, tmp_path / "n.jsonl", num_negatives=1, task=task)
    assert stats["rejected"] == {"scored correct by the task": 1} and stats["negatives"] == 1
    assert [n["reference"] for n in read_cache(tmp_path / "n.jsonl")[ex.id]] == [f"```python\n{BUGGY}\n```"]


def test_negative_budget_follows_the_method_and_the_task():
    from unisd_eval.tasks.mbpp import MBPPTask
    from unisd_eval.tasks.mcqa import MedMCQATask

    assert negative_budget(MBPPTask(), "code") == negative_budget(MedMCQATask(), "mcqa") == METHOD_MAX_NEW_TOKENS == 1024
    assert negative_budget(DemoTask(), "generic") == DemoTask.max_new_tokens + JSON_ALLOWANCE


# -- generation ---------------------------------------------------------------------------------------


def test_sampling_stops_once_the_json_object_closes():
    tok = make_tokenizer()
    ids = tok('{"reasoning": "a } b", "answer": "47"} and then more text', add_special_tokens=False)["input_ids"]
    crit = json_closed_criteria(tok, prompt_width=1)
    stops = [bool(crit(torch.tensor([[0, *ids[:n]]]), None)[0]) for n in range(1, len(ids) + 1)]
    first = stops.index(True)
    assert not any(stops[:first]) and all(stops[first:])
    assert json_object_end(tok.decode(ids[:first + 1])) is not None
    assert json_object_end(tok.decode(ids[:first])) is None
    code = tok("def f(a, b):\n    return {} if a else {1: 2}", add_special_tokens=False)["input_ids"]
    crit = json_closed_criteria(tok, prompt_width=0)
    assert not any(bool(crit(torch.tensor([code[:n]]), None)[0]) for n in range(1, len(code) + 1))


def test_hf_generator_samples_with_the_tiny_model(tiny_model_dir):
    from unisd.model.models import load_model, load_tokenizer
    from unisd.model.rollout import SamplingParams

    tok = load_tokenizer(str(tiny_model_dir))
    generate = hf_generator(load_model(str(tiny_model_dir)), tok, SamplingParams(max_new_tokens=5), batch_size=2)
    texts = generate(["What is 1 + 1?", "Write f.", "Say hi."])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_vllm_gets_guided_json_in_either_spelling(monkeypatch):
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "vllm.sampling_params",
                        SimpleNamespace(StructuredOutputsParams=lambda json: ("structured", json)))
    assert guided_json_kwargs(JSON_SCHEMA) == {"structured_outputs": ("structured", JSON_SCHEMA)}
    monkeypatch.setitem(sys.modules, "vllm.sampling_params",
                        SimpleNamespace(GuidedDecodingParams=lambda json: ("guided", json)))
    assert guided_json_kwargs(JSON_SCHEMA) == {"guided_decoding": ("guided", JSON_SCHEMA)}
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", SimpleNamespace())
    assert guided_json_kwargs(JSON_SCHEMA) == {}
    assert pick_backend("hf") == "hf"


def test_cache_negatives_needs_a_source():
    result = CliRunner().invoke(make_app(get_plugin_manager()), ["cache", "negatives", "--model", "x"])
    assert result.exit_code == 2 and "exactly one of --task NAME or --data" in result.output


def test_train_builds_missing_negatives_itself_and_trains_as_if_they_were_there(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import unisd_components.negatives_gen as gen

    seen = {}
    fake = fake_hf_generator(seen)

    def drawing(*args, **kwargs):  # like a real sampler, it draws from torch's RNG
        generate = fake(*args, **kwargs)
        return lambda texts: (torch.rand(3), generate(texts))[1]

    monkeypatch.setattr(gen, "hf_generator", drawing)
    data = write_jsonl(tmp_path / "plain.jsonl", toy_records(4))  # no negatives anywhere
    app, runner = make_app(get_plugin_manager()), CliRunner()

    def train(out, *extra):
        return runner.invoke(app, [
            "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--steps", "2",
            "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--with", "contrastive", *extra,
        ], catch_exceptions=False)

    refused = train(tmp_path / "refused", "--no-build-cache")
    assert refused.exit_code == 2
    assert "none of the 4 examples has a negative demonstration" in refused.output
    assert "drop --no-build-cache" in refused.output

    built = train(tmp_path / "built")
    assert built.exit_code == 0, built.output
    assert "contrastive: building negatives for 4 example(s)" in built.output
    assert "negatives: 4/4 example(s) done" in built.output  # progress lines, through the run's reporter
    assert seen["calls"][0] == 16  # 4 examples x 4 negatives, sampled together
    records = [json.loads(line) for line in (tmp_path / "built" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["contrastive/missing_fraction"] == 0 for r in records)

    again = train(tmp_path / "again")  # the cache is there now: nothing is generated
    assert again.exit_code == 0, again.output
    assert "building negatives" not in again.output and len(seen["calls"]) == 2
    # building forked the RNG: both runs trained on the same samples, to the same weights
    a = load_file(str(tmp_path / "built" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
