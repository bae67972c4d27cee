"""ReAct tool-call parsing and tool-use scoring (§5.3).

Completions are parsed as ReAct text (``Action: name`` then ``Action Input: {...}``), the format the
model is trained on; the research eval switched to JSON-guided decoding instead (§7.24). A JSON
``{"tool_calls": [...]}`` answer is accepted too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .jsonobj import json_object

_CALL = re.compile(
    r"Action(?:\s*\d+)?\s*:[ \t]*([^\n]*?)[ \t]*\r?\n\s*Action(?:\s*\d+)?\s+Input\s*:[ \t]*(.*?)"
    r"(?=\r?\n\s*(?:Thought|Observation|Final Answer|Action(?:\s*\d+)?\s*:)|\Z)",
    re.DOTALL | re.IGNORECASE,
)
_SINGLE = re.compile(r"Action(?:\s*\d+)?\s*:[ \t]*([^\n]+)", re.IGNORECASE)


def parse_calls(text: str) -> list[dict[str, str]]:
    """Every tool call in a completion, as ``{"Action": name, "Action_Input": text}`` in order."""
    from_json = _parse_json_calls(text)
    if from_json is not None:
        return from_json
    calls = [{"Action": m.group(1).strip(), "Action_Input": m.group(2).strip()} for m in _CALL.finditer(text)]
    if calls:
        return calls
    single = _SINGLE.search(text)  # an action without an input line is still one (argument-less) call
    if single and single.group(1).strip():
        return [{"Action": single.group(1).strip(), "Action_Input": ""}]
    return []


def _parse_json_calls(text: str) -> list[dict[str, str]] | None:
    obj = json_object(text)
    calls = obj.get("tool_calls") if obj is not None else None
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if isinstance(call, dict):
            args = call.get("Action_Input", {})
            out.append({"Action": str(call.get("Action", "")).strip(),
                        "Action_Input": args if isinstance(args, str) else json.dumps(args)})
    return out


def parse_arguments(value: Any) -> dict:
    """An Action Input as a dict: a dict as is, a JSON object string parsed, anything else ``{}``."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            obj = json.loads(value.strip())
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}
    return {}


def score_calls(pred: list[dict[str, Any]], gold: list[dict[str, Any]]) -> dict[str, float]:
    """``action_correct``, ``argument_accuracy`` and ``full_match`` of predicted vs gold calls."""
    same_count = len(pred) == len(gold)
    action = float(same_count and all(
        str(p.get("Action", "")).strip() == str(g.get("Action", "")).strip() for p, g in zip(pred, gold, strict=False)
    ))
    if not same_count:
        argument = 0.0
    elif not gold:
        argument = 1.0
    else:
        per_step = []
        for p, g in zip(pred, gold, strict=True):
            pa, ga = parse_arguments(p.get("Action_Input")), parse_arguments(g.get("Action_Input"))
            keys = [k for k, v in ga.items() if v not in (None, "", [], {})]
            if not keys:
                per_step.append(1.0 if not pa else 0.0)
                continue
            hits = sum(k in pa and str(pa[k]).strip() == str(ga[k]).strip() for k in keys)
            per_step.append(hits / len(keys))
        argument = sum(per_step) / len(per_step)
    return {"action_correct": action, "argument_accuracy": argument,
            "full_match": float(action == 1.0 and argument == 1.0)}


def golden_text(golden_response: list[str] | None, golden_answer: list[dict[str, Any]]) -> str:
    """The teacher's demonstration: the golden ReAct lines, or rebuilt from the gold calls."""
    if golden_response:
        return "\n".join(golden_response)
    lines = []
    for call in golden_answer:
        args = call.get("Action_Input", "")
        lines.append(f"Action: {call.get('Action', '')}")
        lines.append(f"Action Input: {args if isinstance(args, str) else json.dumps(args)}")
    return "\n".join(lines)
