"""Naive vs chunked per-token divergence, side by side in one process: peak memory, fwd+bwd time, errors vs fp64.

    python bench/divergence.py                      # CPU shape: B·T=2048, H=512, V=32768, fp32
    python bench/divergence.py --gpu-target         # B·T=8192, H=896 and 3584, V=151936, bf16, cuda
    python bench/divergence.py --json out.json      # also write every number as JSON

The last line reads ``memory_ratio=<chunked/naive> time_ratio=<naive/chunked> max_rel_err=<vs fp64>``
(worst case over the hidden sizes run). How memory is measured: bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def _fix_malloc() -> None:
    """Make glibc hand every big block straight back to the OS, so resident memory tracks live tensors.

    Without this, glibc raises its mmap threshold after the first large free (up to 32 MB) and keeps
    later blocks in its heap, which hides allocations of one variant inside memory left by the other.
    Must run before torch allocates anything.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks ≥ 64 KiB come from mmap, freed at once
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


_fix_malloc()

import torch  # noqa: E402

from unisd.divergence.chunked import chunked_token_outputs  # noqa: E402
from unisd.divergence.losses import token_outputs  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak bytes above the level at ``start()``: CUDA allocator statistics on a GPU; on CPU the
    kernel's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    @staticmethod
    def available(device: torch.device) -> bool:
        if device.type == "cuda":
            return True
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._status("VmHWM") - self.base


# ----------------------------------------------------------------------------------------------
# Inputs and one fwd+bwd


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Student and teacher hidden states ``[B, T, H]`` and separate heads ``[V, H]`` (the frozen-copy
    teacher: both heads are held), realistic logit scales, every token in the loss."""
    g = torch.Generator().manual_seed(seed)
    rows = 4 if tokens % 4 == 0 else 1
    shape = (rows, tokens // rows, hidden)
    std = 1.0 / hidden**0.5  # logits of order 1-3, as from a trained model's normed hidden states
    h_s = torch.randn(shape, generator=g) * 2.0
    h_t = h_s + 0.5 * torch.randn(shape, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * std
    w_t = w_s + 0.2 * std * torch.randn(vocab, hidden, generator=g)
    targets = torch.randint(0, vocab, shape[:2], generator=g)
    weights = torch.rand(shape[:2], generator=g)  # per-token weights, as the components give
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        h_s=cast(h_s), w_s=cast(w_s), h_t=cast(h_t), w_t=cast(w_t), targets=targets.to(device),
        mask=torch.ones(shape[:2], device=device), weights=weights.to(device),
    )


# How the loss uses the outputs and which weights train: set once from the command line.
LOSS = {"frozen_head": False, "divergence_only": False}


def step(fn, inputs: dict, alpha: float, temperature: float, **kw):
    """One forward + backward of ``sum(div·w)/N − 0.1·sum(student_logp)/N`` — both outputs carry
    gradient, as in the loop with a log-prob based extra term (``--divergence-only``: the first term,
    as in plain distillation). ``--frozen-head``: the head gets no gradient (LoRA, the default run).
    Returns (loss, grad_h, grad_w or None)."""
    h_s = inputs["h_s"].detach().requires_grad_()
    w_s = inputs["w_s"].detach().requires_grad_(not LOSS["frozen_head"])
    out = fn(h_s, w_s, inputs["h_t"], inputs["w_t"], inputs["targets"], inputs["mask"],
             alpha=alpha, temperature=temperature, **kw)
    n = inputs["mask"].sum()
    loss = (out.divergence * inputs["weights"]).sum() / n
    if not LOSS["divergence_only"]:
        loss = loss - 0.1 * out.student_logp.sum() / n
    loss.backward()
    return loss.detach(), h_s.grad, w_s.grad


def subset(inputs: dict, tokens: int, dtype: torch.dtype | None = None) -> dict:
    """The first ``tokens`` tokens of the first row(s), optionally cast (for the fp64 oracle)."""
    rows = max(1, tokens // inputs["mask"].shape[1])
    cols = min(tokens, inputs["mask"].shape[1])
    out = {}
    for k, v in inputs.items():
        if k in ("w_s", "w_t"):
            out[k] = v
        else:
            out[k] = v[:rows, :cols]
        if dtype is not None and out[k].is_floating_point():
            out[k] = out[k].to(dtype)
    return out


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------
# One shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(args, hidden: int, device: torch.device, dtype: torch.dtype) -> dict:
    inputs = make_inputs(args.tokens, hidden, args.vocab, dtype, device, args.seed)
    variants = {
        "naive": (token_outputs, {}),
        "chunked": (chunked_token_outputs, {"chunk_size": args.chunk_size, "compile": args.compile}),
    }
    result: dict = {"tokens": args.tokens, "hidden": hidden, "vocab": args.vocab, "dtype": str(dtype).split(".")[-1],
                    "alpha": args.alpha, "temperature": args.temperature, "chunk_size": args.chunk_size,
                    "compile": args.compile, **LOSS}
    meter = PeakMemory(device)
    for name, (fn, kw) in variants.items():
        for _ in range(args.warmup):
            step(fn, inputs, args.alpha, args.temperature, **kw)
        meter.start()  # a separate, untimed run for memory, from a clean level
        step(fn, inputs, args.alpha, args.temperature, **kw)
        result[name] = {"peak_bytes": meter.peak(), "times_s": []}
    # Timed runs alternate between the variants, so a machine shared with other work slows both alike.
    for _ in range(args.repeats):
        for name, (fn, kw) in variants.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            step(fn, inputs, args.alpha, args.temperature, **kw)
            sync(device)
            result[name]["times_s"].append(time.perf_counter() - t0)
    for name in variants:
        result[name]["time_s"] = statistics.median(result[name]["times_s"])
    # Errors vs an fp64 oracle (the naive path in float64) on the first oracle_tokens tokens:
    # per-token outputs do not depend on other tokens, and a subset keeps the oracle's own memory small.
    k = min(args.oracle_tokens, args.tokens)
    small = subset(inputs, k)
    oracle = step(token_outputs, subset(inputs, k, torch.float64), args.alpha, args.temperature)
    for name, (fn, kw) in variants.items():
        got = step(fn, small, args.alpha, args.temperature, **kw)
        errs = {k: rel(g, o) for k, g, o in zip(("loss", "grad_hidden", "grad_head"), got, oracle, strict=True)
                if g is not None}
        result[name]["rel_err"] = errs
        result[name]["max_rel_err"] = max(errs.values())
    result["oracle_tokens"] = int(small["mask"].numel())
    result["memory_ratio"] = result["chunked"]["peak_bytes"] / max(result["naive"]["peak_bytes"], 1)
    result["time_ratio"] = result["naive"]["time_s"] / result["chunked"]["time_s"]
    del inputs, small, oracle
    gc.collect()
    return result


def table(r: dict) -> str:
    mib = 2**20
    lines = [
        f"B·T={r['tokens']} H={r['hidden']} V={r['vocab']} {r['dtype']} alpha={r['alpha']} T={r['temperature']} "
        f"chunk={r['chunk_size']} compile={r['compile']} head={'frozen' if r['frozen_head'] else 'trained'} "
        f"loss={'div' if r['divergence_only'] else 'div+logp'} (errors on {r['oracle_tokens']} tokens vs fp64)",
        f"{'':10}{'peak MiB':>12}{'fwd+bwd s':>12}{'err loss':>11}{'err dh':>11}{'err dW':>11}",
    ]
    for name in ("naive", "chunked"):
        v = r[name]
        e = v["rel_err"]
        lines.append(f"{name:10}{v['peak_bytes'] / mib:12.1f}{v['time_s']:12.4f}"
                     f"{e['loss']:11.2e}{e['grad_hidden']:11.2e}{e.get('grad_head', float('nan')):11.2e}")
    lines.append(f"{'ratio':10}{r['memory_ratio']:12.3f}{r['time_ratio']:12.2f}   (chunked/naive memory, naive/chunked time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="B·T, loss tokens")
    p.add_argument("--hidden", type=int, nargs="+", default=[512], help="one or more hidden sizes H")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=None, help="default: 512 on CPU, 1024 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--oracle-tokens", type=int, default=512, help="tokens in the fp64 error check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-target", action="store_true",
                   help="B·T=8192, H=896 and 3584, V=151936, bf16, --device cuda")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the chunk math with torch.compile (auto: on CUDA only); warm-up runs absorb the compile")
    p.add_argument("--frozen-head", action="store_true", help="the head gets no gradient (LoRA runs)")
    p.add_argument("--divergence-only", action="store_true", help="loss on the divergence alone (no log-prob term)")
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)
    LOSS.update(frozen_head=args.frozen_head, divergence_only=args.divergence_only)
    if args.gpu_target:
        args.tokens, args.hidden, args.vocab, args.dtype = 8192, [896, 3584], 151936, "bfloat16"
        args.device = "cuda" if args.device == "cpu" else args.device
    device = torch.device(args.device)
    if args.chunk_size is None:
        args.chunk_size = 1024 if device.type == "cuda" else 512
    if not PeakMemory.available(device):
        print("cannot measure peak memory here (/proc/self/clear_refs not writable)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"# {machine}; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    results = []
    for hidden in args.hidden:
        r = run_shape(args, hidden, device, dtype)
        results.append(r)
        print(table(r), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "results": results}, indent=2))
    memory_ratio = max(r["memory_ratio"] for r in results)
    time_ratio = min(r["time_ratio"] for r in results)
    max_rel_err = max(r["chunked"]["max_rel_err"] for r in results)
    print(f"memory_ratio={memory_ratio:.4f} time_ratio={time_ratio:.3f} max_rel_err={max_rel_err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
