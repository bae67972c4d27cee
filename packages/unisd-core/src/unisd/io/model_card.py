"""The model card of a run: ``final/README.md`` (and of an exported or pushed model).

Written from what the run directory already records — ``config.toml`` (the resolved configuration),
``eval/before.json`` / ``eval/after.json`` (held-out accuracies) and ``metrics.jsonl`` (the steps) — so
``unisd export`` and ``unisd push`` can write the same card for a run finished earlier. It replaces
peft's empty template ("[More Information Needed]"): a card should say what the weights are.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from . import atomic
from .runlog import MetricsLog

HEADLINE_METRICS = (
    ("student_accuracy", "student accuracy"),
    ("student_strict_accuracy", "student strict accuracy"),
    ("teacher_accuracy", "teacher-with-reference accuracy"),
    ("privileged_gap", "privileged gap"),
    ("leakage", "leakage (share of completions with teacher-only text)"),
    ("overrun", "overrun (share of completions that go on after a finished answer)"),
)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _last_step(run_dir: Path) -> dict[str, Any] | None:
    records = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if isinstance(r, dict) and "step" in r]
    return records[-1] if records else None


def _front_matter(config: dict[str, Any]) -> str:
    base = str(config.get("model", ""))
    lines = ["---", "library_name: peft" if config.get("lora", True) else "library_name: transformers"]
    if base and not base.startswith((".", "/")) and base != "smollm2":
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- unisd", "- self-distillation", "---"]
    return "\n".join(lines)


def _metrics_table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    if not before and not after:
        return ["No held-out evaluation was run (`--eval-task`, or a task with an evaluation split)."]
    rows = ["| metric | before training | after training |", "| --- | --- | --- |"]
    for key, label in HEADLINE_METRICS:
        values = [side.get(key) if side else None for side in (before, after)]
        if all(v is None for v in values):
            continue
        rows.append(f"| {label} | " + " | ".join("—" if v is None else f"{float(v):.3f}" for v in values) + " |")
    n = (after or before or {}).get("n")
    if n is not None:
        rows.append("")
        rows.append(f"Held-out items: {int(n)} (greedy decoding).")
    return rows


def _components(config: dict[str, Any]) -> list[str]:
    components = config.get("components") or {}
    if not components:
        return ["plain self-distillation (no mechanism added)"]
    out = []
    for name, options in components.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in (options or {}).items())
        out.append(f"`{name}`" + (f" ({opts})" if opts else ""))
    return out


def render_model_card(run_dir: Path, command: str | None = None) -> str:
    """The card's Markdown for the run in ``run_dir`` (``command``: how it was started, when known)."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    before = _read_json(run_dir / "eval" / "before.json")
    after = _read_json(run_dir / "eval" / "after.json")
    last = _last_step(run_dir)
    data = config.get("data") or (f"task `{config['task']}`" if config.get("task") else "the built-in demo task")
    adapter = (f"a LoRA adapter (r={config.get('lora_r')}, alpha={config.get('lora_alpha')}, "
               f"dropout={config.get('lora_dropout')})" if config.get("lora", True) else "full fine-tuning")
    divergence = config.get("alpha", 0.0)
    lines = [
        _front_matter(config), "",
        f"# {run_dir.name}", "",
        "Trained with unisd by on-policy self-distillation: the model "
        "samples a completion from the plain prompt, and is trained toward its own per-token distribution "
        "when it is shown privileged context (the reference answer) as the teacher.", "",
        "## Training", "",
        f"- base model: `{config.get('model', 'unknown')}`",
        f"- weights: {adapter}",
        f"- data: {data}" + (f", split `{config.get('split')}`" if config.get("task") else ""),
        f"- mechanisms: {'; '.join(_components(config))}",
        f"- preset: `{config['preset']}`" if config.get("preset") else "- preset: none",
        f"- divergence: generalized JSD with alpha={divergence} (0 = forward KL(teacher||student), 1 = reverse KL)",
        f"- steps: {config.get('steps')} (reached: {last.get('step') if last else 'unknown'}), batch "
        f"{config.get('batch_size')} x {config.get('grad_accum')} accumulation, lr {config.get('lr')}, "
        f"sampling temperature {config.get('temperature')}, seed {config.get('seed')}",
    ]
    if last and "loss" in last:
        lines.append(f"- last step's loss: {float(last['loss']):.4g}")
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    lines += ["", "## Held-out evaluation", "", *_metrics_table(before, after), "",
              "The full configuration is in `config.toml` of the run directory; every key there can be "
              "passed back with `unisd train --config config.toml`.", ""]
    return "\n".join(lines)


def is_unisd_card(path: Path) -> bool:
    """True when ``path`` is a card this module wrote (not peft's template or a user's own)."""
    try:
        return "\n- unisd\n" in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_model_card(run_dir: Path, target_dir: Path, command: str | None = None) -> Path:
    """Write ``target_dir/README.md`` for the run in ``run_dir`` (atomically); returns its path."""
    path = Path(target_dir) / "README.md"
    atomic.write_text(path, render_model_card(run_dir, command))
    return path
