"""Greedy completions of the base model, kept between runs.

Every run evaluates its model on the held-out items before training (eval/before.json), and the teacher
with the reference before and after. Where those weights are the base model's (an adapter not trained
yet; the adapter-off teacher at any time; a frozen copy no component has moved; an EMA teacher before its
first update), greedy decoding of the same items gives the same completions in every run of a sweep: with ``--eval-limit 384`` about four minutes of a 2-core machine per
run, spent again and again. The completions are kept under ``$UNISD_CACHE_DIR/base-eval/``; scores,
leakage and overruns are always computed afresh from them, by the current scoring code.

A completion is reused only under a key that holds everything the generation depends on: the model
directory's files (names, sizes, modification times), its config, dtype and attention kernel, the float32
matmul precision, the tokenizer
(vocabulary, chat template), the prompts and system prompts in order, the budget, the batch size, the
device, the torch thread count (a different reduction order can flip a near-tie) and the package
versions, and the source of the prompt rendering and generation code. A hub id (not a local directory) or
several processes: nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import atomic
from ..io.cachedir import cache_dir, digest, package_versions

if TYPE_CHECKING:
    from ..run import Run


def base_weights_key(run: Run) -> str | None:
    """What identifies the run's base weights as loaded, or None where they cannot be told apart cheaply
    (a hub id, several processes)."""
    from ..data.example_file import tokenizer_fingerprint
    from ..parallel import distributed

    source = Path(run.source) if run.source else None
    if source is None or not source.is_dir() or distributed.current().active:
        return None
    files = sorted((str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in source.rglob("*") if p.is_file())
    config = getattr(run.model, "config", None)
    settings = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    # (to_json_string leaves out the attention kernel the model was loaded with, and the dtype may differ)
    kernel = [getattr(config, "_attn_implementation", None), str(getattr(run.model, "dtype", None)),
              torch.get_float32_matmul_precision()]
    versions = [f"torch=={torch.__version__}", *package_versions(("unisd-core", "transformers", "tokenizers", "peft"))]
    return digest([str(source.resolve()), files, settings, kernel, tokenizer_fingerprint(run.tokenizer), versions,
                   _code_stamp()])


def _code_stamp() -> str:
    """The source of what renders the prompts and generates: under an editable install the code changes
    without a new version number, and a fix there must not be hidden by completions kept before it."""
    from ..data import prompts
    from ..model import rollout
    from . import evaluate

    sources = hashlib.sha256()
    for module in (prompts, rollout, evaluate):
        sources.update(Path(str(module.__file__)).read_bytes())
    return sources.hexdigest()


def student_is_base(run: Run) -> bool:
    """Whether the student still computes the base model's function: an adapter whose every ``lora_B`` is
    zero (its initial value), or full weights before the first step."""
    if not run.config.lora:
        return run.step == 0
    named = [(n, p) for n, p in run.model.named_parameters() if "lora_B" in n]
    return bool(named) and all(not p.detach().any() for _, p in named)


def teacher_is_base(run: Run) -> bool:
    """Whether the teacher computes the base model's function now: the adapter switched off; a frozen copy
    whose weights no component has moved; swapped-in values (an EMA adapter) equal to a base student's."""
    from ..model.teacher import AdapterDisabledTeacher, FrozenCopyTeacher, SwappedWeightsTeacher

    teacher = run.teacher
    if type(teacher) is AdapterDisabledTeacher:
        return True
    if type(teacher) is FrozenCopyTeacher:
        return teacher.unchanged()
    if type(teacher) is SwappedWeightsTeacher:
        return student_is_base(run) and teacher.swaps_in_current_values()
    return False


def cached_completions(weights: str | None, texts: list[str], systems: list[str | None], max_new_tokens: int,
                       batch_size: int, generate: Callable[[], list[str]]) -> list[str]:
    """``generate()``'s completions of ``texts``, read from the cache where ``weights`` (a
    :func:`base_weights_key`) names the weights generating them, else generated and kept."""
    if weights is None:
        return generate()
    key = digest([weights, texts, systems, max_new_tokens, batch_size, torch.get_num_threads(),
                   "cuda" if torch.cuda.is_available() else "cpu"])
    path = cache_dir() / "base-eval" / f"{key}.json"
    kept = _read(path, len(texts))
    if kept is not None:
        return kept
    completions = generate()
    try:
        atomic.write_text(path, json.dumps(completions, ensure_ascii=False))
    except OSError:  # a read-only cache is no reason to fail a run
        pass
    return completions


def _read(path: Path, count: int) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, list) or len(data) != count or not all(isinstance(c, str) for c in data):
        return None
    return data
