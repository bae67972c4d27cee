"""How a run's cost grows with the data: start-up time and per-step data overhead at 1k / 100k / 1M prompts.

    python bench/scaling.py                            # 1k, 100k and 1M prompts, SmolLM2's tokenizer
    python bench/scaling.py --sizes 1000,100000        # fewer sizes
    python bench/scaling.py --model PATH --json out.json

For each size a ``--data`` JSONL file of short arithmetic prompts is written once (under ``--work``), then
fresh processes each build the run as ``unisd train`` does (``build_run``: the data, the tokenizer,
the model, the ``max_prompt_tokens`` filter) and draw ``--draws`` batches from the data stream,
tokenising each drawn example's student and teacher prompts as a step does:

* ``cold``: a first start on the file (a private, empty cache directory): the file is indexed and every
  prompt measured once;
* ``warm``: the median of ``--repeats`` later starts, which read both from the cache.

Reported per size: cold and warm start-up seconds (process start to the run built, imports included,
the first epoch's shuffle included) and the data overhead of one step in milliseconds (the median
batch of draws and tokenisation, after the first). The last line reads
``startup_1m_over_1k=<warm start-up at the largest size / at the smallest> step_overhead_1m_s=<seconds
per step at the largest size>`` (the issue's targets: ≤ 2 and ≤ 0.010).

Part ``g``: the teacher + student time of one ``distill_step`` per completion with G = 1, 4 and 8
completions per prompt (``--num-generations``: each prompt runs once for its G completions), on
``--g-batch`` completions of the demo task with fixed sampled completions, the median of ``--g-repeats``.
The last line adds ``g8_per_completion_speedup=<time per completion at G = 1 / at G = 8>`` (target ≥ 2).
Generation's seconds per completion are printed beside it (each distinct prompt is prefilled once for
its G samples).

Part ``k``: one ``distill_step``'s time and peak memory (above the level before it) with K = 0, 1, 3, 5
agreement contexts (random demonstrations: three more teacher prompts per example at K = 3), same
examples and completions, median of ``--g-repeats``. The last line adds ``k3_time_ratio=<K = 3 / K = 0>``.

Part ``dp``: data parallelism. The tokens per second of one optimiser step (teacher, student, gradient
synchronisation, AdamW; fixed completions, no generation) over the same global batch of ``--g-batch``
completions, run by 1 process and by 2 (``torch.distributed.run``, gloo), each process with
``--dp-threads`` threads, the median of ``--g-repeats``. The 2-process run is timed twice: gradients
all-reduced in buckets during the last backward pass (what a run does) and in one bucket after it (the
previous behaviour), to show what the overlap gives. The last line adds ``dp2_efficiency=<2-process
tokens/s / 1-process tokens/s>`` (target ≥ 1.6 where each process has cores of its own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
from unisd.config import RunConfig
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import DataStream, build_run

args = json.loads(sys.argv[1])
cfg = RunConfig(model=args["model"], data=args["data"], batch_size=args["batch"], max_prompt_tokens=256, lora=True)
run = build_run(cfg, get_plugin_manager(), Reporter(), None)
stream = DataStream(run.examples, cfg.seed)
stream.take(1)  # the first epoch's permutation: part of start-up
startup = time.perf_counter() - START
steps = []
for _ in range(args["draws"]):
    t = time.perf_counter()
    for ex in stream.take(args["batch"]):
        run.student_ids(ex)
        run.teacher_ids(ex)
    steps.append(time.perf_counter() - t)
print(json.dumps({"startup_s": startup, "step_s": sorted(steps)[len(steps) // 2], "examples": len(run.examples)}))
"""


def write_prompts(path: Path, n: int) -> None:
    """``n`` short arithmetic prompts with their answers, the demo's kind of record."""
    if path.exists() and path.stat().st_size > 0:
        return
    rng = random.Random(n)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"What is {a} + {b}? Reply with only the number.",
                                 "reference": str(a + b)}) + "\n")
    tmp.replace(path)


def private_cache(work: Path) -> Path:
    """An empty cache directory for the data index, sharing the user's converted models: a cold start
    measures the data, not the one-time conversion of the bundled model."""
    try:
        from unisd.io.cachedir import cache_dir
    except ImportError:  # a version before the data index (measuring "before" with PYTHONPATH=<old tree>)
        from unisd.model.models import cache_dir

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    if (cache_dir() / "models").is_dir():
        (cache / "models").symlink_to(cache_dir() / "models")
    return cache

DP_CHILD = r"""
import json, statistics, sys, time
import torch
from unisd.config import RunConfig
from unisd.io.reporting import Reporter
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.parallel import distributed, gradient_sync
from unisd.plugins import get_plugin_manager
from unisd.run import build_run
from unisd.step import distill_step

args = json.loads(sys.argv[1])
env = distributed.init_from_env()
b = args["batch"]
cfg = RunConfig(model=args["model"], task="demo", batch_size=b // 2, grad_accum=2 // env.world_size, lora_r=16,
                lora_alpha=32, lora_dropout=0.0, max_new_tokens=12, seed=1)
run = build_run(cfg, get_plugin_manager(), Reporter(), None)
params = [p for p in run.model.parameters() if p.requires_grad]
if not args["overlap"]:  # one bucket, sent when backward has ended
    run._gradient_sync = gradient_sync.BucketedAllReduce(params, 2**40, 2**40) if env.active else None
examples = run.examples[:b]
torch.manual_seed(0)  # the same completions whatever the process count
completions = HFBackend(run.model, run.tokenizer, batch_size=b).generate(
    [run.student_ids(e) for e in examples], SamplingParams(temperature=0.7, max_new_tokens=12))
tokens = sum(len(run.student_ids(e)) + len(c.ids) for e, c in zip(examples, completions))
mine = distributed.shard(list(range(b)), env)
optimizer = torch.optim.AdamW(params, lr=1e-5)
times = []
for repeat in range(args["repeats"] + 1):  # the first round warms up
    distributed.barrier()
    start = time.perf_counter()
    distill_step(run, [examples[i] for i in mine], [completions[i] for i in mine])
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    distributed.barrier()
    if repeat:
        times.append(time.perf_counter() - start)
if env.is_main:
    print(json.dumps({"step_s": statistics.median(times), "tokens": tokens}))
distributed.shutdown()
"""


def dp_once(args, processes: int, overlap: bool) -> dict:
    """One data-parallel measurement in fresh processes: seconds per step and tokens per step."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.dp_threads)}
    payload = json.dumps({"model": args.model, "batch": args.g_batch, "repeats": args.g_repeats, "overlap": overlap})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "dp_child.py"
        script.write_text(DP_CHILD)
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={processes}"]
        out = subprocess.run([sys.executable, *launcher, str(script), payload], env=env, capture_output=True,
                             text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the {processes}-process run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dp_part(args) -> dict[str, dict]:
    """Tokens/s of one step with 1 process and with 2 (overlapped, and after backward)."""
    rows = {"1 process": dp_once(args, 1, True), "2 processes": dp_once(args, 2, True),
            "2 processes, after backward": dp_once(args, 2, False)}
    for row in rows.values():
        row["tokens_per_s"] = row["tokens"] / row["step_s"]
    return rows


def start_once(args, data: Path, cache: Path) -> dict:
    env = {**os.environ, "UNISD_CACHE_DIR": str(cache)}
    payload = json.dumps({"model": args.model, "data": str(data), "batch": args.batch_size, "draws": args.draws})
    code = "import time\nSTART = time.perf_counter()\n" + CHILD  # the clock starts at the child's first line
    out = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the run failed at {data.name}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def g_part(args) -> dict[int, float]:
    """Teacher + student seconds per completion of one distill_step at G = 1, 4, 8 (interleaved)."""
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.model.rollout import HFBackend, SamplingParams
    from unisd.plugins import get_plugin_manager
    from unisd.run import DataStream, build_run
    from unisd.step import distill_step

    b = args.g_batch
    cfg = RunConfig(model=args.model, task="demo", batch_size=b, grad_accum=1, num_generations=b, lora_r=16,
                    lora_alpha=32, max_new_tokens=12, seed=1)
    run = build_run(cfg, get_plugin_manager(), Reporter(), None)
    backend, stream = HFBackend(run.model, run.tokenizer, batch_size=b), DataStream(run.examples, 1)
    sampling = SamplingParams(temperature=0.7, max_new_tokens=12)
    times: dict[int, list[float]] = {g: [] for g in (1, 4, 8) if b % g == 0}
    generation: dict[int, list[float]] = {g: [] for g in times}
    for repeat in range(args.g_repeats + 1):  # the first round warms up
        for g in times:
            examples = [ex for ex in stream.take(b // g) for _ in range(g)]
            start = time.perf_counter()
            completions = backend.generate([run.student_ids(e) for e in examples], sampling)
            generated = time.perf_counter()
            distill_step(run, examples, completions)
            run.model.zero_grad(set_to_none=True)
            if repeat:
                times[g].append((time.perf_counter() - generated) / b)
                generation[g].append((generated - start) / b)
    return ({g: statistics.median(v) for g, v in times.items()},
            {g: statistics.median(v) for g, v in generation.items()})


def k_part(args) -> dict[int, dict[str, float]]:
    """Seconds and peak bytes of one distill_step with K agreement contexts, K = 0, 1, 3, 5."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from divergence import PeakMemory

    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.model.rollout import HFBackend, SamplingParams
    from unisd.plugins import get_plugin_manager
    from unisd.run import build_run
    from unisd.step import distill_step

    b, out = args.g_batch, {}
    cpu = torch.device("cpu")
    probe = PeakMemory(cpu) if PeakMemory.available(cpu) else None  # None: no way to read a peak here
    completions = None
    for k in (0, 1, 3, 5):
        components = {"agreement": {"num_contexts": k, "builder": "random"}} if k else {}
        cfg = RunConfig(model=args.model, task="demo", batch_size=b, grad_accum=1, lora_r=16, lora_alpha=32,
                        max_new_tokens=12, seed=1, components=components)
        run = build_run(cfg, get_plugin_manager(), Reporter(), None)
        examples = run.examples[:b]
        if completions is None:  # the same completions for every K
            torch.manual_seed(0)
            completions = HFBackend(run.model, run.tokenizer, batch_size=b).generate(
                [run.student_ids(e) for e in examples], SamplingParams(temperature=0.7, max_new_tokens=12))
        times, peaks = [], []
        for repeat in range(args.g_repeats + 1):  # the first round warms up
            if probe is not None:
                probe.start()
            start = time.perf_counter()
            distill_step(run, examples, completions)
            seconds = time.perf_counter() - start
            peak = probe.peak() if probe is not None else float("nan")
            run.model.zero_grad(set_to_none=True)
            if repeat:
                times.append(seconds)
                peaks.append(peak)
        out[k] = {"step_s": statistics.median(times), "peak_bytes": statistics.median(peaks)}
        del run
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000,1000000", help="numbers of prompts, comma-separated")
    ap.add_argument("--model", default="smollm2", help="model whose tokenizer and weights are loaded")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=50, help="batches drawn after start-up")
    ap.add_argument("--repeats", type=int, default=3, help="warm starts per size")
    ap.add_argument("--work", default=None, help="where the data files go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write every number as JSON here")
    ap.add_argument("--parts", default="data,g,k,dp",
                    help="data (start-up by data size), g (completions per prompt), k (agreement contexts), "
                         "dp (1 against 2 processes)")
    ap.add_argument("--dp-threads", type=int, default=1, help="torch threads per process in part dp")
    ap.add_argument("--g-batch", type=int, default=8, help="completions per step in part g")
    ap.add_argument("--g-repeats", type=int, default=3)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="unisd-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    summary: dict[str, float] = {}
    if "data" in parts:
        print(f"{'prompts':>9} {'cold start s':>13} {'warm start s':>13} {'step data ms':>13}")
        for n in sizes:
            data = work / f"prompts-{n}.jsonl"
            write_prompts(data, n)
            cache = private_cache(work)
            cold = start_once(args, data, cache)
            warm = [start_once(args, data, cache) for _ in range(args.repeats)]
            row = {"prompts": n, "cold_startup_s": cold["startup_s"],
                   "warm_startup_s": statistics.median(w["startup_s"] for w in warm),
                   "step_overhead_s": statistics.median(w["step_s"] for w in warm), "examples": warm[0]["examples"]}
            rows.append(row)
            print(f"{n:>9} {row['cold_startup_s']:>13.2f} {row['warm_startup_s']:>13.2f} "
                  f"{row['step_overhead_s'] * 1e3:>13.2f}")
        summary["startup_1m_over_1k"] = rows[-1]["warm_startup_s"] / rows[0]["warm_startup_s"]
        summary["step_overhead_1m_s"] = rows[-1]["step_overhead_s"]
    per_completion: dict[int, float] = {}
    generation_per_completion: dict[int, float] = {}
    if "g" in parts:
        per_completion, generation_per_completion = g_part(args)
        print(f"{'G':>3} {'teacher+student s per completion':>34} {'generation s per completion':>28}")
        for g, seconds in per_completion.items():
            print(f"{g:>3} {seconds:>34.3f} {generation_per_completion[g]:>28.3f}")
        if 8 in per_completion:
            summary["g8_per_completion_speedup"] = per_completion[1] / per_completion[8]
    contexts: dict[int, dict[str, float]] = {}
    if "k" in parts:
        contexts = k_part(args)
        print(f"{'K':>3} {'distill_step s':>15} {'peak MiB':>10}")
        for k, row in contexts.items():
            print(f"{k:>3} {row['step_s']:>15.3f} {row['peak_bytes'] / 2**20:>10.1f}")
        summary["k3_time_ratio"] = contexts[3]["step_s"] / contexts[0]["step_s"]
    parallel: dict[str, dict] = {}
    if "dp" in parts:
        parallel = dp_part(args)
        print(f"{'':>28} {'step s':>8} {'tokens/s':>9}  ({args.dp_threads} thread(s) per process, "
              f"{os.cpu_count()} cores)")
        for name, row in parallel.items():
            print(f"{name:>28} {row['step_s']:>8.3f} {row['tokens_per_s']:>9.1f}")
        summary["dp2_efficiency"] = parallel["2 processes"]["tokens_per_s"] / parallel["1 process"]["tokens_per_s"]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "model": args.model, "batch_size": args.batch_size, "rows": rows,
            "g_per_completion_s": per_completion, "g_generation_per_completion_s": generation_per_completion,
            "contexts": contexts, "data_parallel": parallel,
            "dp_threads": args.dp_threads, **summary}, indent=2))
    print(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
