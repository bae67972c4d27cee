"""Tool use on ToolAlpaca (``Ahren09/ToolAlpaca``): ReAct tool calls scored by action and arguments (§5.3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from unisd.data.prompts import DEMO_MARKER, SELF_DISTILLATION_INSTRUCTION
from unisd.data.tasks import Example, Score, Task

from ..metrics import mean
from ..parsing.react import golden_text, parse_calls, score_calls
from ..protocols import DEFAULT
from .sources import check_split, hub_rows, read_rows, require_fields, take

HUB_ID = "Ahren09/ToolAlpaca"
THOUGHT_SUFFIX = " Include your thought process (the 'Thought' field in your response)."


@dataclass
class ToolScore(Score):
    """A :class:`Score` that also keeps the action and argument sub-scores of one completion."""

    action: float = 0.0
    argument: float = 0.0


def _gold_calls(row: dict[str, Any]) -> list[dict[str, Any]]:
    answer = row.get("golden_answer")
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except ValueError:
            answer = None
    if isinstance(answer, list):
        return [{"Action": c.get("Action", ""), "Action_Input": c.get("Action_Input", "")}
                for c in answer if isinstance(c, dict)]
    return parse_calls("\n".join(row.get("golden_response") or []))


class ToolUseTask(Task):
    """ToolAlpaca: pick the right API calls with the right arguments (full-match accuracy)."""

    name: ClassVar[str] = "tooluse"
    description: ClassVar[str] = "ToolAlpaca ReAct tool calls (full/action/argument accuracy)"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_split: ClassVar[str] = "test"
    max_new_tokens: ClassVar[int] = 512
    protocol: str = DEFAULT  # "research" retries unparsed completions (unisd_eval.protocols)

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, split, self.splits)
        rows = read_rows(path) if path else hub_rows(self.name, HUB_ID, None, split)
        source = path or HUB_ID
        examples = []
        for idx, row in enumerate(take(rows, limit)):
            require_fields(self.name, row, ("prompt",), f"{source}[{idx}]")
            if "golden_answer" not in row and "golden_response" not in row:
                require_fields(self.name, row, ("golden_answer",), f"{source}[{idx}]")
            gold = _gold_calls(row)
            examples.append(Example(
                id=f"tooluse_{split}_{idx}",
                prompt=str(row["prompt"]),
                reference=golden_text(row.get("golden_response"), gold),
                meta={"gold_calls": gold, "api": row.get("name"), "instruction": row.get("instruction")},
            ))
        return examples

    def teacher_text(self, example: Example) -> str:
        """The method's tool-use teacher template (asks for the Thought; no final newline)."""
        return (f"\n{example.prompt}\n\n{DEMO_MARKER}\n{example.reference}\n\n"
                f"{SELF_DISTILLATION_INSTRUCTION}{THOUGHT_SUFFIX}")

    def retry_wanted(self, example: Example, completion: str) -> bool:
        """Whether the research protocol generates this item again: no tool call parses (§5.3)."""
        return not parse_calls(completion)

    def score(self, example: Example, completion: str) -> Score:
        calls = parse_calls(completion)
        gold = example.meta["gold_calls"]
        parts = score_calls(calls, gold)
        if not calls and gold:
            return ToolScore(0.0, None, "unparsed", "no 'Action: …' / 'Action Input: …' found", 0.0, 0.0)
        full = parts["full_match"]
        return ToolScore(full, json.dumps(calls), "correct" if full else "wrong", None,
                         parts["action_correct"], parts["argument_accuracy"])

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        """Full-match accuracy (the headline), action and argument accuracy, extraction rate."""
        return {
            "accuracy": mean([s.value for s in scores]),
            "action_accuracy": mean([getattr(s, "action", s.value) for s in scores]),
            "argument_accuracy": mean([getattr(s, "argument", s.value) for s in scores]),
            "extraction_rate": mean([float(s.extracted is not None) for s in scores]),
        }
