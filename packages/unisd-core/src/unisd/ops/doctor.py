"""``unisd doctor``: preflight checks of a model and a dataset before a long run.

Each check returns pass, warn, fail or skip with a one-line finding and, unless it passed, a fix.
The checks load the tokenizer and the model once and use the run's own code paths (chat rendering,
teacher-prompt budgeting, packing, the teacher view, the divergence), so what passes here is what the
loop will do.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import RunConfig
from ..data.prompts import budget_teacher_prompt, encode, render_chat
from ..data.tasks import Example, Task, teacher_text_with
from ..errors import UnisdError
from ..plugins import UnisdPluginManager
from ..run import Budgets
from .memory import GIB, estimate_step_memory, free_memory

BUDGET_SAMPLE = 200  # the longest examples whose teacher prompts are tokenised
TRUNCATION_FAIL_FRACTION = 0.05  # more truncated references than this is a failure, fewer a warning
SELFTEST_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # other dtypes (bf16/fp16): HALF_TOL
HALF_TOL = 2e-2
FALLBACK_EXAMPLES = [  # used when neither --task nor --data is given
    Example("doctor-0", "What is 12 + 34? Reply with only the number.", "46"),
    Example("doctor-1", "Rewrite 'apple river' in capital letters.", "APPLE RIVER"),
]


@dataclass
class Check:
    """The outcome of one preflight check."""

    name: str
    status: str  # "pass" | "warn" | "fail" | "skip"
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context(Budgets):
    """What the checks share: the config, tokenizer, model, examples and the task (if any); the budgets
    and pad id are the run's own (:class:`unisd.run.Budgets`)."""

    config: RunConfig
    pm: UnisdPluginManager
    tokenizer: Any = None
    model: Any = None
    task: Task | None = None
    examples: Sequence[Example] = field(default_factory=list)
    from_data: bool = False  # the examples are the user's (else the fallback pair)

    def teacher_builder(self, ex: Example) -> Callable[[str], str]:
        return lambda ref: teacher_text_with(self.task, ex, ref)


# ----------------------------------------------------------------------------------------------
# The checks


def check_chat_template(ctx: Context) -> Check:
    tok = ctx.tokenizer
    if not getattr(tok, "chat_template", None):
        if ctx.config.allow_no_chat_template:  # a base model trained on plain-text prompts, by choice
            return Check("chat template", "warn", "no chat template: prompts are plain text "
                         "(allow_no_chat_template is set)", "fine for a base model; a chat model needs its template")
        return Check(
            "chat template", "fail",
            "the tokenizer has no chat template: student and teacher prompts would be raw text, a format a chat "
            "model never sees when it is used",
            "use the instruct/chat version of the model, set chat_template in the run config, or add a "
            "chat_template to its tokenizer_config.json (or a chat_template.jinja file) in the model directory; "
            "base models: allow_no_chat_template = true (unisd train --allow-no-chat-template)",
        )
    ex = ctx.examples[0]
    student_text = ex.prompt
    teacher_user = ctx.teacher_builder(ex)(ex.reference)
    student, teacher = render_chat(tok, student_text), render_chat(tok, teacher_user)
    i, j = student.find(student_text), teacher.find(teacher_user)
    if i < 0 or j < 0:
        return Check("chat template", "fail", "the chat template changes the user text it wraps (e.g. strips or "
                     "escapes it), so the prompt the model sees is not the one given",
                     "check the template's handling of message content")
    s_pre, s_post = student[:i], student[i + len(student_text):]
    t_pre, t_post = teacher[:j], teacher[j + len(teacher_user):]
    if (s_pre, s_post) != (t_pre, t_post):
        return Check("chat template", "fail",
                     "student and teacher prompts are wrapped differently by the chat template "
                     f"(prefix {s_pre!r} vs {t_pre!r}), so the teacher's advantage is not only the reference",
                     "use a template that does not depend on the message content (e.g. no date or length logic)")
    pre_ids = encode(tok, s_pre)
    s_ids, t_ids = encode(tok, student), encode(tok, teacher)
    shared = s_ids[: len(pre_ids)] == pre_ids == t_ids[: len(pre_ids)]
    without_gen = tok.apply_chat_template([{"role": "user", "content": student_text}], tokenize=False,
                                          add_generation_prompt=False, enable_thinking=False)
    details = {"prefix_tokens": len(pre_ids), "suffix": s_post}
    if without_gen == student:
        return Check("chat template", "warn",
                     "the chat template adds no assistant header for generation, so completions start right "
                     "after the user turn", "use a template that honours add_generation_prompt", details)
    if not shared:
        return Check("chat template", "warn",
                     "the template prefix tokenises differently depending on the text after it; student and "
                     "teacher prompts do not share their first tokens", "put a newline or special token at the "
                     "end of the template prefix", details)
    return Check("chat template", "pass",
                 f"present and identical for student and teacher ({len(pre_ids)} shared prefix tokens, "
                 f"assistant header {s_post.strip()[:40]!r})", details=details)


def check_eos_pad(ctx: Context) -> Check:
    from ..model.rollout import eos_ids_of
    from ..model.scoring import pack

    tok = ctx.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        return Check("EOS vs pad", "fail", "the tokenizer has no EOS token: generation never stops and the "
                     "student cannot learn to stop", "set eos_token in the tokenizer configuration")
    ex = ctx.examples[0]
    prompt = encode(tok, render_chat(tok, ex.prompt))
    completion = encode(tok, ex.reference)[:8] + [eos]
    # A second, shorter row makes the first one's EOS sit next to padding, as in a real batch.
    packed = pack([prompt, prompt], [completion, [eos]], ctx.pad_id)
    last = len(completion) - 1
    kept = bool(packed.mask[0, last] == 1 and packed.targets[0, last] == eos and packed.mask[1, 0] == 1
                and packed.mask[1, 1:].sum() == 0)
    stops = sorted(eos_ids_of(tok, ctx.model))
    details = {"eos_id": eos, "pad_id": tok.pad_token_id, "stop_ids": stops}
    if not kept:
        return Check("EOS vs pad", "fail", "EOS is not in the loss mask of a packed completion: the student would "
                     "never be taught to stop", "report this as a bug in unisd.model.scoring.pack", details)
    if tok.pad_token_id is None or tok.pad_token_id == eos:
        return Check("EOS vs pad", "warn",
                     f"pad token == EOS (id {eos}); unisd builds the loss mask from lengths, and EOS stays in it "
                     "(checked on a packed batch)",
                     "nothing to do for unisd; set a distinct pad token if other tools that mask by pad id "
                     "train on this data", details)
    return Check("EOS vs pad", "pass", f"EOS id {eos}, pad id {tok.pad_token_id}; EOS is in the loss mask "
                 f"(generation stops on {stops})", details=details)


def check_vocab(ctx: Context) -> Check:
    tok, model = ctx.tokenizer, ctx.model
    n_tok = len(tok)
    max_id = max(tok.get_vocab().values())
    rows_in = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    rows_out = head.weight.shape[0] if head is not None else rows_in
    details = {"tokenizer": n_tok, "max_token_id": max_id, "embedding_rows": rows_in, "lm_head_rows": rows_out}
    if max_id >= min(rows_in, rows_out):
        return Check("vocab size", "fail",
                     f"the tokenizer has {n_tok} tokens (ids up to {max_id}) but the model's embedding has "
                     f"{rows_in} rows and its lm-head {rows_out}: ids ≥ {min(rows_in, rows_out)} are out of range",
                     "use the tokenizer saved with this model, or call model.resize_token_embeddings(len(tokenizer)) "
                     "and save the model", details)
    if rows_in != rows_out:
        return Check("vocab size", "warn", f"embedding ({rows_in}) and lm-head ({rows_out}) sizes differ",
                     "check the model's config (vocab_size, tie_word_embeddings)", details)
    extra = rows_in - (max_id + 1)
    note = f"; {extra} unused embedding rows (padding, harmless)" if extra > 0 else ""
    return Check("vocab size", "pass", f"tokenizer {n_tok} tokens fit the model's {rows_in} embedding rows{note}",
                 details=details)


def check_budget(ctx: Context, sample: int = BUDGET_SAMPLE) -> Check:
    if not ctx.from_data:
        return Check("teacher-prompt budget", "skip", "no --task or --data given", "pass --task NAME or --data FILE")
    tok, cfg = ctx.tokenizer, ctx.config
    budget = ctx.teacher_budget
    longest = sorted(ctx.examples, key=lambda e: len(e.prompt) + len(e.reference), reverse=True)[:sample]
    truncated, over, student_over = [], [], []
    longest_tokens = 0
    for ex in longest:
        build = ctx.teacher_builder(ex)
        full = len(encode(tok, render_chat(tok, build(ex.reference))))
        longest_tokens = max(longest_tokens, full)
        result = budget_teacher_prompt(tok, build, ex.reference, budget)
        if result.over_budget:
            over.append(ex.id)
        elif result.reference_truncated:
            truncated.append(ex.id)
        if len(encode(tok, render_chat(tok, ex.prompt))) > cfg.max_prompt_tokens:
            student_over.append(ex.id)
    n = len(ctx.examples)
    details = {"budget": budget, "checked": len(longest), "examples": n, "truncated": truncated, "over_budget": over,
               "student_over": student_over, "longest_teacher_prompt": longest_tokens}
    msg = (f"budget {budget} tokens; checked the {len(longest)} longest of {n} examples: "
           f"{len(truncated)} reference(s) would be truncated, {len(over)} prompt(s) over budget even without "
           f"the reference, {len(student_over)} student prompt(s) over max_prompt_tokens={cfg.max_prompt_tokens} "
           f"(longest teacher prompt {longest_tokens} tokens)")
    fix = (f"raise --max-teacher-prompt-tokens to {longest_tokens} (or --max-prompt-tokens), "
           "or shorten the references")
    if over or len(truncated) > TRUNCATION_FAIL_FRACTION * n or (student_over and len(student_over) == n):
        first = (over or truncated or student_over)[0]
        return Check("teacher-prompt budget", "fail", f"{msg}; e.g. {first}", fix, details)
    if truncated or student_over:
        return Check("teacher-prompt budget", "warn", msg, fix, details)
    return Check("teacher-prompt budget", "pass", msg, details=details)


def check_zero_divergence(ctx: Context) -> Check:
    """Student == teacher on a real batch: with the same weights the divergence must be ≈ 0.

    The student side runs as in training (a padded micro-batch, train mode, the LoRA adapter on);
    the teacher side through the teacher view, one unpadded row at a time. Dropout left on, padding
    leaking into real positions, or a teacher view that does not match the weights show up here.
    """
    from ..divergence.chunked import chunked_token_outputs
    from ..model.models import apply_lora
    from ..model.scoring import completion_hidden, lm_head_weight, pack
    from ..model.teacher import default_teacher

    cfg, tok = ctx.config, ctx.tokenizer
    if cfg.lora and not hasattr(ctx.model, "disable_adapter"):
        ctx.model = apply_lora(ctx.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    model = ctx.model
    teacher = default_teacher(model, cfg.lora)
    batch = ctx.examples[: max(2, cfg.batch_size)]
    prompts = [encode(tok, render_chat(tok, ex.prompt)) for ex in batch]
    completions = [encode(tok, ex.reference)[: ctx.max_new_tokens - 1] + [tok.eos_token_id] for ex in batch]
    model.train()
    with torch.no_grad():
        packed = pack(prompts, completions, ctx.pad_id)
        student_hidden = completion_hidden(model, packed)
        rows = [teacher.hidden(pack([p], [c], ctx.pad_id))[0] for p, c in zip(prompts, completions, strict=True)]
        teacher_hidden = torch.zeros_like(student_hidden)
        for i, row in enumerate(rows):
            teacher_hidden[i, : row.shape[0]] = row.to(teacher_hidden.device)
        mask = packed.mask.to(student_hidden.device)
        # The loop's own divergence path (chunked over the vocabulary, compiled where it would be), not the
        # float64 oracle: a preflight that passes must have exercised what training runs.
        out = chunked_token_outputs(
            student_hidden, lm_head_weight(model), teacher_hidden, teacher.head_weight(),
            packed.targets.to(mask.device), mask, alpha=cfg.alpha, temperature=cfg.divergence_temperature,
            chunk_size=cfg.divergence_chunk_size, compile=cfg.compile_divergence, gjsd_scale=cfg.gjsd_scale,
        )
    values = out.divergence[mask > 0]
    dtype = next(model.parameters()).dtype
    tol = SELFTEST_TOL.get(dtype, HALF_TOL)
    worst, mean = float(values.abs().max()), float(values.mean())
    details = {"max": worst, "mean": mean, "tolerance": tol, "tokens": int(values.numel()), "dtype": str(dtype)}
    msg = f"max per-token divergence {worst:.2e}, mean {mean:.2e} over {values.numel()} tokens ({dtype}, tol {tol:g})"
    if not torch.isfinite(values).all():
        return Check("zero-divergence self-test", "fail", f"non-finite divergence: {msg}",
                     "try --dtype float32; check the model's weights", details)
    if worst > 10 * tol:
        return Check("zero-divergence self-test", "fail", f"student and teacher disagree with the same weights: {msg}",
                     "dropout active in training mode (set the model's dropout probabilities to 0), an attention "
                     "implementation that leaks padding (try attn_implementation='eager'), or a broken teacher view",
                     details)
    if worst > tol:
        return Check("zero-divergence self-test", "warn", f"small numerical disagreement: {msg}",
                     "expected with half precision kernels; use --dtype float32 to confirm", details)
    return Check("zero-divergence self-test", "pass", msg, details=details)


def check_backend(ctx: Context) -> Check:
    from ..model.rollout import SamplingParams

    cls = ctx.pm.registries.backends.get(ctx.config.backend)
    backend = cls(ctx.model, ctx.tokenizer)
    prompt = encode(ctx.tokenizer, render_chat(ctx.tokenizer, ctx.examples[0].prompt))
    out = backend.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=2))
    if len(out) != 1:
        return Check("generation backend", "fail", f"backend '{ctx.config.backend}' returned {len(out)} completions "
                     "for 1 prompt", "report this to the backend's plugin")
    return Check("generation backend", "pass", f"'{ctx.config.backend}' generated {len(out[0].ids)} token(s)")


def check_memory(ctx: Context) -> Check:
    cfg, tok = ctx.config, ctx.tokenizer
    device = next(ctx.model.parameters()).device
    free = free_memory(device)
    # The student forward (with gradients) is what stores activations; the teacher's runs without.
    longest = max(len(encode(tok, render_chat(tok, ex.prompt))) for ex in ctx.examples[:BUDGET_SAMPLE])
    prompt_tokens = min(longest, cfg.max_prompt_tokens)
    est = estimate_step_memory(ctx.model, cfg.batch_size, cfg.grad_accum, prompt_tokens, ctx.max_new_tokens, cfg.lora,
                               chunk_size=cfg.divergence_chunk_size)
    details = {"free": free.free, "total": free.total, "where": free.where, "estimate": est.peak,
               "breakdown": asdict(est)}
    msg = (f"{free.free / GIB:.1f} GiB free on {free.where}; a step at batch size {cfg.batch_size} needs about "
           f"{est.peak / GIB:.2f} GiB beyond the weights ({est.describe()})")
    fix = "lower --batch-size (raise --grad-accum to keep the update), --max-new-tokens or max_prompt_tokens"
    if est.peak > free.free:
        return Check("memory", "fail", msg, fix, details)
    if est.peak > 0.8 * free.free:
        return Check("memory", "warn", msg, fix, details)
    return Check("memory", "pass", msg, details=details)


CHECKS: list[tuple[str, Callable[[Context], Check]]] = [
    ("chat template", check_chat_template),
    ("EOS vs pad", check_eos_pad),
    ("vocab size", check_vocab),
    ("teacher-prompt budget", check_budget),
    ("zero-divergence self-test", check_zero_divergence),
    ("generation backend", check_backend),
    ("memory", check_memory),
]
NEEDS_VOCAB = {"zero-divergence self-test", "generation backend"}  # index the embedding with every token id


def _safely(name: str, fn: Callable[[Context], Check], ctx: Context) -> Check:
    try:
        return fn(ctx)
    except UnisdError as exc:
        return Check(name, "fail", str(exc), "see the message")
    except Exception as exc:  # a crashing check is a finding, not a crash of the doctor
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Check(name, "fail", f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})",
                     "fix the error above; rerun with a smaller model to narrow it down")


def run_doctor(config: RunConfig, pm: UnisdPluginManager, loader: Callable[[RunConfig], tuple[Any, Any]] | None = None,
               progress: Callable[[str], None] | None = None) -> list[Check]:
    """Run every check for ``config`` (its model, task or data, batch size and budgets).

    ``loader(config) -> (tokenizer, model)`` replaces loading from ``config.model`` (tests, notebooks).
    """
    from ..model.models import load_model, load_tokenizer, resolve_model, training_dtype
    from ..run import load_examples

    say = progress or (lambda _msg: None)
    checks: list[Check] = []
    ctx = Context(config, pm)
    if config.task or config.data:
        try:
            ctx.task, ctx.examples = load_examples(config, pm)
            ctx.from_data = True
            checks.append(Check("data", "pass", f"{len(ctx.examples)} examples from "
                                f"{'task ' + config.task if config.task else config.data}"))
        except UnisdError as exc:
            checks.append(Check("data", "fail", str(exc), "fix the task name or the data file"))
    if not ctx.examples:
        ctx.examples = list(FALLBACK_EXAMPLES)
    try:
        say(f"Loading {config.model} ...")
        if loader is not None:
            ctx.tokenizer, ctx.model = loader(config)
        else:
            source = resolve_model(config.model, progress=say)
            ctx.tokenizer = load_tokenizer(source)
            if config.chat_template:  # the run's setting replaces the tokenizer's, as in training
                ctx.tokenizer.chat_template = config.chat_template
            ctx.model = load_model(source, training_dtype(config.dtype, not config.lora), config.attn_implementation)
    except Exception as exc:
        checks.append(Check("model", "fail", f"cannot load {config.model}: {type(exc).__name__}: {exc}",
                            "check --model (a hub id, a local Hugging Face directory or a .gguf file)"))
        return checks
    vocab_ok = True
    for name, fn in CHECKS:
        if name in NEEDS_VOCAB and not vocab_ok:
            checks.append(Check(name, "skip", "skipped: the vocab check failed", "fix the vocab size first"))
            continue
        say(f"Checking {name} ...")
        check = _safely(name, fn, ctx)
        if name == "vocab size" and check.status == "fail":
            vocab_ok = False
        checks.append(check)
    return checks


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail a preflight)."""
    return 1 if any(c.status == "fail" for c in checks) else 0
