"""Generation with the LoRA adapter merged into its base weights, against generation through the adapter:
a demo training step's rollouts and greedy evaluation of a trained-looking student, side by side.

    python bench/merged_adapter.py                  # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/merged_adapter.py --threads 1 --repeats 6 --eval-items 128

``HFBackend`` merges ``W + scaling * B @ A`` into a copy of each adapted weight for every ``generate`` call
(``unisd.model.merged_adapter``); "adapter" turns that off (``merge_adapter_for_generation = "off"``),
which is the previous behaviour. The adapter's B starts at zero in PEFT, so it is filled with small random
values first: the merged weights must differ from the base for the comparison to mean anything. Modes
alternate which runs first; every repeat reports whether both drew the same tokens from the same seed
(float32 rounding of the merged weights may flip a rare near-tie).

Last line: ``generate_ratio=.. eval_ratio=.. same_samples=../..`` (merged over adapter: below 1 is faster).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
from demo_run import demo_arguments, demo_run  # bench/demo_run.py, beside this script

from unisd.data.demo import DemoTask
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.run import DataStream


def backend(run, merge: bool, batch_size: int) -> HFBackend:
    return HFBackend(run.model, run.tokenizer, batch_size=batch_size,
                     config=SimpleNamespace(merge_adapter_for_generation="on" if merge else "off"))


def timed_generate(gen: HFBackend, prompts: list[list[int]], params: SamplingParams, seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = gen.generate(prompts, params)
    return [c.ids for c in out], time.perf_counter() - start


def compare(run, prompts_per_repeat, params, batch_size: int, label: str) -> tuple[dict[str, list[float]], int]:
    times: dict[str, list[float]] = {"merged": [], "adapter": []}
    backends = {mode: backend(run, mode == "merged", batch_size) for mode in times}  # kept, as training keeps one
    same = 0
    for rep, prompts in enumerate(prompts_per_repeat):
        ids = {}
        for mode in ("merged", "adapter") if rep % 2 else ("adapter", "merged"):
            ids[mode], t = timed_generate(backends[mode], prompts, params, rep)
            if rep:  # the first repeat warms up
                times[mode].append(t)
        same += ids["merged"] == ids["adapter"]
        print(f"{label} repeat {rep}: same tokens {ids['merged'] == ids['adapter']}", flush=True)
    return times, same


def main() -> None:
    args = demo_arguments(__doc__.split("\n")[0], "timed repeats of the rollouts",
                          "prompts per training step's generation", eval_items=64).parse_args()
    run = demo_run(args)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    rollouts = [[run.student_ids(e) for e in DataStream(run.examples, rep).take(args.batch)]
                for rep in range(args.repeats + 1)]
    gen_times, gen_same = compare(run, rollouts, SamplingParams(0.7, 1.0, 12), 16, "rollout")
    items = [run.student_ids(e) for e in DemoTask().load("test")[: args.eval_items]]
    eval_times, eval_same = compare(run, [items, items, items], SamplingParams(0.0, 1.0, 12), 32, "eval")
    rows = {"generate": gen_times, "eval": eval_times}
    print(f"\n{'phase':10} {'adapter s':>10} {'merged s':>10} {'ratio':>7}")
    ratios = {}
    for phase, t in rows.items():
        adapter, merged = statistics.median(t["adapter"]), statistics.median(t["merged"])
        ratios[phase] = merged / adapter
        print(f"{phase:10} {adapter:10.3f} {merged:10.3f} {ratios[phase]:7.2f}")
    print(" ".join(f"{p}_ratio={r:.2f}" for p, r in ratios.items())
          + f" same_samples={gen_same + eval_same}/{len(rollouts) + 3}")


if __name__ == "__main__":
    main()
