"""TRL's SDFTTrainer against unisd on the built-in demo task: same settings, same evaluator, timed.

    bench/.venv-peer/bin/python bench/peer_trl.py --smoke      # 2 steps, 4 held-out items: a check
    bench/.venv-peer/bin/python bench/peer_trl.py              # 60 steps, all 384 held-out items

Runs in its own venv (``bench/.venv-peer``, see bench/README.md): TRL is a benchmark-only dependency and
the unisd packages never import it. Both trainers start from the same SmolLM2-135M-Instruct directory
(unisd's ``smollm2`` loader converts the bundled GGUF once), train a LoRA adapter on the demo's train
split with the demo's settings (60 steps, batch 4 x 2, lr 1e-3 cosine with 10 % warm-up, LoRA r16/α32
on every attention and MLP projection, 12 new tokens at temperature 0.7, forward KL on the full
logits, the teacher = the base with the adapter off, shown the reference in unisd's teacher template)
and are scored by unisd's own evaluator (``unisd.evaluation.evaluate.evaluate``, greedy, the demo's scoring) on
the first ``--eval-limit`` held-out items. The base model is evaluated once: both adapters start as
zero updates, so "before" is the same model for both.

unisd runs as its own ``unisd train`` process (exactly the CLI's run); TRL runs in this process. The
step time is the median of the per-step wall times: unisd's ``step_s`` (metrics.jsonl) and, for TRL, a
callback's ``on_step_begin`` to ``on_step_end`` (both cover generation, teacher and student passes and
the optimizer; neither the logging nor a checkpoint). The last line is

    peer_step_s=.. unisd_step_s=.. speedup=.. peer_gain=.. unisd_gain=.. n=..

with ``speedup = peer_step_s / unisd_step_s`` and ``gain`` = student accuracy after - before on n items.

Differences that remain, all TRL's own behaviour: its loss is a per-sequence mean, then a mean over
sequences (unisd's ``loss_reduction = "sequence"``; unisd's default is the step's token mean, see
``--loss-reduction``); its linear warm-up starts at lr 0 (unisd's at lr/(w+1)), over the same number of
steps; its data order and sampling RNG differ. It zeroes dropout (``disable_dropout``, its default), so
unisd runs with ``--lora-dropout 0`` here unless told otherwise (the demo itself trains with 0.05).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FINAL_KEYS = ("peer_step_s", "unisd_step_s", "speedup", "peer_gain", "unisd_gain", "n")


@dataclass(frozen=True)
class Settings:
    """The run settings both trainers get (the demo's, data/demo.toml, with forward KL)."""

    steps: int = 60
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 12
    temperature: float = 0.7
    alpha: float = 0.0  # forward KL(teacher || student), in unisd's and TRL's convention alike
    seed: int = 42
    loss_reduction: str = "token"  # unisd's; TRL's is always "sequence"
    num_generations: int = 1  # completions per prompt (TRL's own default is 8)
    # TRL's SDFTConfig zeroes every dropout (disable_dropout, its default), so 0 is the setting TRL runs
    # with; the demo's 0.05 costs unisd ~17 % of its teacher + student time on CPU (bench/RESULTS.md)
    lora_dropout: float = 0.0


# ---- pure helpers (no torch, no trl: tests/test_bench_peer_trl.py runs them in the project's venv) ----


def warmup_steps(settings: Settings) -> int:
    """unisd's warm-up length (``loop.py``: ceil(ratio x steps)), given to TRL as an exact step count so
    both warm up over the same steps (HF would also take ceil, but a count leaves nothing to version)."""
    return math.ceil(settings.warmup_ratio * settings.steps)


def split_teacher_text(prompt: str, teacher: str) -> tuple[str, str]:
    """``(prefix, context)`` with ``teacher == prefix + prompt + context``.

    TRL builds the teacher's user turn as ``teacher_prompt_template.format(prompt=..., privileged_context=...)``
    with one template for every example; unisd's template puts text before the problem (a newline) and the
    reference after it. The text after the problem is the per-example privileged context.
    """
    at = teacher.find(prompt)
    if at < 0:
        raise ValueError("the teacher text does not contain the student prompt")
    return teacher[:at], teacher[at + len(prompt):]


def trl_template(prefix: str) -> str:
    """TRL's ``teacher_prompt_template`` for a fixed ``prefix`` (braces escaped for ``str.format``)."""
    return prefix.replace("{", "{{").replace("}", "}}") + "{prompt}{privileged_context}"


def trl_teacher_inputs(pairs: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """One TRL template and each example's privileged context, from ``(prompt, unisd teacher text)`` pairs.

    Checks what TRL will do with them: ``template.format(prompt, context)`` must give unisd's teacher
    text exactly, for every example (so both teachers read the same words).
    """
    prefixes, contexts = zip(*(split_teacher_text(p, t) for p, t in pairs), strict=True)
    if len(set(prefixes)) != 1:
        raise ValueError(f"the teacher texts put different text before the problem: {sorted(set(prefixes))!r}")
    template = trl_template(prefixes[0])
    for (prompt, teacher), context in zip(pairs, contexts, strict=True):
        if template.format(prompt=prompt, privileged_context=context) != teacher:
            raise ValueError(f"TRL's template would not rebuild the teacher text of {prompt!r}")
    return template, list(contexts)


def unisd_settings_mapping(settings: Settings, model: str) -> dict[str, Any]:
    """The ``unisd train --config`` keys for ``settings`` (no before/after evaluation: this script scores)."""
    return {
        "model": model, "task": "demo", "steps": settings.steps, "batch_size": settings.batch_size,
        "grad_accum": settings.grad_accum, "lr": settings.lr, "warmup_ratio": settings.warmup_ratio,
        "lora_r": settings.lora_r, "lora_alpha": settings.lora_alpha, "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature, "alpha": settings.alpha, "seed": settings.seed,
        "loss_reduction": settings.loss_reduction, "eval_before_after": False, "save_every": 0,
        "num_generations": settings.num_generations, "lora_dropout": settings.lora_dropout,
    }


def toml_text(mapping: dict[str, Any]) -> str:
    """Flat ``key = value`` TOML for strings, numbers and booleans: only the keys the benchmark sets, so
    everything else keeps unisd's defaults (a fully dumped config would also pin the rest)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)  # a JSON string is a TOML basic string

    return "".join(f"{key} = {value(v)}\n" for key, v in mapping.items())


def median_step(seconds: list[float]) -> float:
    """The run's step time: the median step (robust to a busy machine's pauses)."""
    if not seconds:
        raise ValueError("no step was timed")
    return statistics.median(seconds)


def final_line(peer_step_s: float, unisd_step_s: float, peer_gain: float, unisd_gain: float, n: int) -> str:
    """The last line: times, speedup (peer / unisd: above 1 means unisd is faster) and accuracy gains."""
    return (f"peer_step_s={peer_step_s:.3f} unisd_step_s={unisd_step_s:.3f} speedup={peer_step_s / unisd_step_s:.3f} "
            f"peer_gain={peer_gain:+.3f} unisd_gain={unisd_gain:+.3f} n={n}")


def parse_final_line(line: str) -> dict[str, float]:
    """The numbers of :func:`final_line`'s line; a ValueError when a field is missing or not a number."""
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    missing = [k for k in FINAL_KEYS if k not in fields]
    if missing:
        raise ValueError(f"final line lacks {', '.join(missing)}: {line!r}")
    return {k: float(fields[k]) for k in FINAL_KEYS}


# ---- the runs (torch, transformers, unisd; trl only inside run_trl) ----


def demo_items(eval_limit: int | None) -> tuple[Any, list, list]:
    """The demo task, its train split and the first ``eval_limit`` held-out items (all when None)."""
    from unisd.data.demo import DemoTask

    task = DemoTask()
    return task, task.load("train"), task.load(task.eval_split, limit=eval_limit)


def score(model: Any, tokenizer: Any, task: Any, examples: list, settings: Settings) -> dict[str, float]:
    """unisd's evaluation of the student (greedy, the task's scoring) with the run's completion budget,
    as unisd's own before/after evaluation uses."""
    from unisd.evaluation.evaluate import evaluate

    return evaluate(model, tokenizer, task, examples, settings.max_new_tokens).metrics


def run_unisd(settings: Settings, model_dir: str, work: Path, task: Any, held_out: list) -> dict[str, Any]:
    """``unisd train`` in a child process, then its final adapter scored; step times from metrics.jsonl."""
    from unisd.config import load_config
    from unisd.model.models import load_model, load_tokenizer

    config = work / "unisd.toml"
    config.write_text(toml_text(unisd_settings_mapping(settings, model_dir)))
    load_config(config)  # a bad key fails here, with unisd's message, before anything trains
    out, log = work / "unisd-run", work / "unisd-train.log"
    began = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "unisd", "train", "--config", str(config), "--output", str(out)],
                              stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"unisd train failed ({done.returncode}); its output:\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = load_model(str(out / "final"))
    after = score(trained, load_tokenizer(str(out / "final")), task, held_out, settings)
    return {"step_seconds": [r["step_s"] for r in records], "after": after, "process_wall_s": wall,
            "last_loss": records[-1]["loss"]}


def step_timer() -> Any:
    """A TrainerCallback timing each optimiser step from ``on_step_begin`` to ``on_step_end``."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # CUDA runs ahead of the host: time finished work only

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.seconds.append(time.perf_counter() - self._t0)

    return StepTimer()


def trl_dataset(task: Any, train: list) -> tuple[Any, str]:
    """TRL's training rows (a chat ``prompt`` and the ``privileged_context``) and its teacher template,
    built from unisd's teacher text (``task.teacher_text``: the method's template around the reference)."""
    from datasets import Dataset

    template, contexts = trl_teacher_inputs([(ex.prompt, task.teacher_text(ex)) for ex in train])
    rows = [{"prompt": [{"role": "user", "content": ex.prompt}], "privileged_context": ctx}
            for ex, ctx in zip(train, contexts, strict=True)]
    return Dataset.from_list(rows), template


def trl_config(settings: Settings, template: str, out: Path, bf16: bool) -> Any:
    """SDFTConfig with the demo's settings; comments name what each TRL default would change."""
    from trl.experimental.sdft import SDFTConfig

    return SDFTConfig(
        output_dir=str(out), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr, lr_scheduler_type="cosine",
        warmup_steps=warmup_steps(settings), weight_decay=0.0, max_grad_norm=1.0, seed=settings.seed, bf16=bf16,
        num_generations=settings.num_generations,  # TRL's default 8 is GRPO-style groups
        max_completion_length=settings.max_new_tokens, temperature=settings.temperature, top_p=1.0, top_k=0,
        distillation_mode="full_logits",  # TRL's default is a top-100 approximation
        distillation_alpha=settings.alpha,  # TRL's default 0.5 is a JSD
        distillation_is_clip=None,  # only acts on rollouts reused across steps, which this setup never has
        teacher_model_kind="base", teacher_prompt_template=template,
        gradient_checkpointing=False,  # TRL's default is on; unisd's (gradient_checkpointing) is off
        max_prompt_length=None,  # TRL cuts prompts from the left at 512 by default; demo prompts are < 100
        chat_template_kwargs={"enable_thinking": False},  # what unisd's render_chat passes
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
    )


def check_same_prompts(trainer: Any, task: Any, train: list, template: str) -> bool:
    """Whether TRL tokenises the student and teacher prompts of a few items exactly as unisd does
    (through TRL's own ``_tokenize_prompts`` and context builder: private, but the path training takes)."""
    from unisd.data.prompts import encode, render_chat

    tok = trainer.processing_class
    for ex in train[:4]:
        conv = [{"role": "user", "content": ex.prompt}]
        teacher_conv = trainer.teacher_context_builder._compose_teacher_prompt(conv, split_teacher_text(
            ex.prompt, task.teacher_text(ex))[1])
        ours = [encode(tok, render_chat(tok, ex.prompt)), encode(tok, render_chat(tok, task.teacher_text(ex)))]
        if trainer._tokenize_prompts([conv, teacher_conv]) != ours:
            return False
    return True


@contextlib.contextmanager
def blas_products() -> Iterator[None]:
    """``UNISD_ONEDNN=0`` inside (unisd.model.onednn), the earlier value restored after."""
    from unisd.switches import environ_set

    with environ_set("UNISD_ONEDNN", "0"):
        yield


def run_trl(settings: Settings, model_dir: str, work: Path, task: Any, train: list, held_out: list,
            trl_onednn: bool = False) -> dict[str, Any]:
    """TRL's SDFTTrainer on unisd's model load (same dtype), timed per step, then scored. ``trl_onednn``:
    TRL's forwards through unisd's oneDNN layers too (a what-if; TRL's users get the BLAS)."""
    import torch
    from peft import LoraConfig
    from trl.experimental.sdft import SDFTTrainer

    from unisd.model.models import load_model, load_tokenizer, lora_targets

    # unisd's dtype choice; transformers' default Hub kernels, as TRL's users load models (unisd leaves them out)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, "auto", hub_kernels=True)
    dataset, template = trl_dataset(task, train)
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=lora_targets(model))  # unisd's modules
    timer = step_timer()
    trainer = SDFTTrainer(model=model, args=trl_config(settings, template, work / "trl-run", model.dtype == torch.bfloat16),
                          train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    same_prompts = check_same_prompts(trainer, task, train, template)
    began = time.perf_counter()
    # TRL as its users run it: float32 products through PyTorch's BLAS, not the oneDNN layers that unisd's
    # load_model installs (each layer reads the switch per call); scoring, like unisd's, runs with them
    with contextlib.nullcontext() if trl_onednn else blas_products():
        trainer.train()
    wall = time.perf_counter() - began
    trained = trainer.accelerator.unwrap_model(trainer.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": timer.seconds, "after": score(trained, tokenizer, task, held_out, settings),
            "train_wall_s": wall, "same_prompt_tokens": same_prompts, "last_loss": losses[-1] if losses else None}


def summary(name: str, before: dict, result: dict) -> str:
    """One line per trainer: step times and the student's accuracy before and after."""
    after, steps = result["after"], result["step_seconds"]
    return (f"{name:<5} steps {len(steps)}  step s median {median_step(steps):.3f} mean {statistics.mean(steps):.3f}  "
            f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}  strict {before['strict_accuracy']:.3f} -> "
            f"{after['strict_accuracy']:.3f}  leakage {after['leakage']:.3f}  last loss {result['last_loss']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of each run (default 60)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="held-out items scored before and after (default: the demo's whole test split, 384)")
    parser.add_argument("--smoke", action="store_true", help="a check: 2 steps, 4 held-out items")
    parser.add_argument("--model", default="smollm2", help="what unisd's --model takes (default: the bundled SmolLM2)")
    parser.add_argument("--loss-reduction", default="token", choices=["token", "sequence"],
                        help="unisd's loss reduction (sequence is TRL's; default token, the demo's)")
    parser.add_argument("--num-generations", type=int, default=1, help="completions per prompt, both trainers")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="unisd's LoRA dropout (default 0: TRL zeroes dropout whatever its config says)")
    parser.add_argument("--trl-onednn", action="store_true",
                        help="a what-if: TRL's training products through unisd's oneDNN layers as well (TRL as "
                             "its users run it uses PyTorch's BLAS, the default here)")
    parser.add_argument("--workdir", default=None, help="keep both runs here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 2
        args.eval_limit = args.eval_limit or 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from unisd.model.models import load_model, load_tokenizer, resolve_model

    settings = Settings(steps=args.steps or Settings.steps, loss_reduction=args.loss_reduction,
                        num_generations=args.num_generations, lora_dropout=args.lora_dropout)
    model_dir = resolve_model(args.model, print)  # the same local HF directory for both trainers
    task, train, held_out = demo_items(args.eval_limit)
    print(f"model {model_dir}; {settings.steps} steps; {len(held_out)} held-out items; settings {asdict(settings)}",
          flush=True)
    before = score(load_model(model_dir, "auto"), load_tokenizer(model_dir), task, held_out, settings)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        peer = run_trl(settings, model_dir, work, task, train, held_out, args.trl_onednn)
        ours = run_unisd(settings, model_dir, work, task, held_out)
    print(f"TRL tokenises student and teacher prompts as unisd does: {'yes' if peer['same_prompt_tokens'] else 'NO'}")
    print(summary("trl", before, peer))
    print(summary("unisd", before, ours))
    line = final_line(median_step(peer["step_seconds"]), median_step(ours["step_seconds"]),
                      peer["after"]["accuracy"] - before["accuracy"], ours["after"]["accuracy"] - before["accuracy"],
                      len(held_out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": asdict(settings), "trl_onednn": args.trl_onednn, "before": before, "trl": peer,
                                               "unisd": ours, "final": parse_final_line(line)}, indent=2))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
