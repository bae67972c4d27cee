"""Gradient synchronisation over 2 processes (gloo, CPU): bucketed all-reduce overlapped with the last
backward pass equals the one-process gradient, and no micro-batch but the last communicates."""

import os
import subprocess
import sys
import textwrap

import torch

from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl

BUCKETED = textwrap.dedent('''
    import sys, torch
    import torch.distributed as dist
    from unisd.parallel import distributed, gradient_sync

    env = distributed.init_from_env()
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "a": torch.nn.Linear(6, 5), "b": torch.nn.Linear(5, 4), "c": torch.nn.Linear(4, 3),
        "rank0_only": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1),
    }).double()
    x = torch.randn(8, 6, dtype=torch.float64)

    def loss_of(rows, rank0_only_rows=()):
        h = model["c"](torch.tanh(model["b"](torch.tanh(model["a"](x)))))
        out = (h[rows] ** 2).sum()
        if rank0_only_rows:  # a parameter that only process 0 uses (in its last micro-batch)
            out = out + model["rank0_only"](h[list(rank0_only_rows)]).sum()
        return out / 8  # every process divides by the global count

    # the reference: one process, the whole batch in one backward pass
    loss_of(list(range(8)), [4, 6]).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **kw: calls.append(kw.get("async_op", False)) or real(*a, **kw)
    params = list(model.parameters())
    sync = gradient_sync.BucketedAllReduce(params, bucket_bytes=64, first_bucket_bytes=64)  # several buckets
    mine = distributed.shard(list(range(8)), env)  # process 0: rows 0, 2 | 4, 6
    started_in_backward = None
    for step in range(2):  # the hooks stay registered: a second step works the same way
        for m, rows in enumerate((mine[:2], mine[2:])):
            with sync.micro_batch(last=m == 1):
                loss_of(rows, rows if env.rank == 0 and m == 1 else ()).backward()
                if m == 0:
                    assert calls == [], "a micro-batch before the last communicated"
        started_in_backward = sum(b.work is not None for b in sync.buckets)
        sync.finish()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert set(got) == set(expected), (sorted(got), sorted(expected))  # "unused" keeps no gradient
        for name in expected:
            assert torch.allclose(got[name], expected[name], rtol=1e-12, atol=1e-14), name
        assert len(calls) == len(sync.buckets) and all(calls), calls
        calls.clear()
        model.zero_grad(set_to_none=True)
    # In the first step the unused parameters (last in the model, first in the initial order) hold every
    # bucket back; from the second, buckets follow the order gradients arrived in on process 0, and most
    # are sent during backward there. Process 1 never has a gradient for rank0_only, whose bucket comes
    # first in that order: there everything starts at finish(), in the same order as on process 0.
    assert len(sync.buckets) >= 4, len(sync.buckets)
    assert started_in_backward >= (len(sync.buckets) - 2 if env.rank == 0 else 0), started_in_backward
    distributed.shutdown()
''')

SHARDED = textwrap.dedent('''
    import sys, torch
    import torch.distributed as dist
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.model.rollout import Completion
    from unisd.parallel import distributed, gradient_sync
    from unisd.plugins import get_plugin_manager
    from unisd.run import build_run
    from unisd.step import distill_step

    env = distributed.init_from_env()
    scatters = []
    real = dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *a, **kw: scatters.append(1) or real(*a, **kw)
    counts = {}
    for accum in (1, 2):
        cfg = RunConfig(model=sys.argv[1], data=sys.argv[2], batch_size=2, grad_accum=accum, lora_dropout=0.0,
                        max_new_tokens=4, shard="fsdp")
        run = build_run(cfg, get_plugin_manager(), Reporter(), None)
        assert isinstance(run.gradient_sync(), gradient_sync.ShardedGradientSync)
        examples = run.examples[: 2 * accum]
        completions = [Completion([20 + i, 30 + i, 40], False) for i in range(len(examples))]
        scatters.clear()
        distill_step(run, examples, completions)
        counts[accum] = len(scatters)
    assert counts[1] > 0 and counts[2] == counts[1], counts  # one reduce-scatter per unit, not per micro-batch
    distributed.shutdown()
''')


def _launch(tmp_path, source, *args):
    script = tmp_path / "worker.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNISD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_bucketed_all_reduce_overlaps_backward_and_equals_one_process(tmp_path):
    _launch(tmp_path, BUCKETED)


def test_sharded_micro_batches_before_the_last_do_not_reduce(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    _launch(tmp_path, SHARDED, str(model_dir), str(data))


def test_one_process_needs_no_synchronisation():
    from unisd.parallel import gradient_sync

    model = torch.nn.Linear(3, 2)
    sync = gradient_sync.for_model(model)
    assert type(sync) is gradient_sync.GradientSync
    with sync.micro_batch(last=True):
        model(torch.ones(1, 3)).sum().backward()
    grad = model.weight.grad.clone()
    sync.finish()
    assert torch.equal(model.weight.grad, grad)


def test_buckets_keep_dtype_and_size_limits_and_the_first_is_small():
    from unisd.parallel.gradient_sync import _buckets

    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              [(4, torch.float32), (4, torch.float32), (4, torch.float32), (2, torch.float64), (8, torch.float32)]]
    buckets = [[tuple(p.shape)[0] for p in b.params] for b in _buckets(params, bucket_bytes=32, first_bytes=16)]
    # the first bucket holds 16 bytes (one float32 × 4), the others 32; a dtype change starts a new one
    assert buckets == [[4], [4, 4], [2], [8]]
