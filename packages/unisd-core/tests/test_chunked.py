"""The chunked divergence against the naive path run in float64 (the oracle), and its memory shape."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unisd.divergence import chunk_math
from unisd.divergence.chunked import chunked_target_logprobs, chunked_token_outputs
from unisd.divergence.losses import token_outputs
from unisd.errors import UsageError

B, C, H, V = 4, 9, 16, 97


def make_case(dtype: torch.dtype, seed: int = 0, same_head: bool = False):
    """Random hidden states and heads with logits of order 1-5, a ragged mask (rows of 9, 6, 0 and
    5 valid tokens: N = 20), random targets and per-token loss weights."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, C, H, generator=g) * 1.5
    h_t = h_s + torch.randn(B, C, H, generator=g)
    w_s = torch.randn(V, H, generator=g) * 0.5
    w_t = w_s if same_head else w_s + 0.3 * torch.randn(V, H, generator=g)
    mask = torch.zeros(B, C)
    for row, length in enumerate((9, 6, 0, 5)):  # row 2 fully masked
        mask[row, :length] = 1.0
    targets = torch.randint(0, V, (B, C), generator=g)
    w_div, w_lp = torch.rand(B, C, generator=g), torch.randn(B, C, generator=g)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(h_s=cast(h_s), w_s=cast(w_s), h_t=cast(h_t), w_t=w_s.to(dtype) if same_head else cast(w_t),
                targets=targets, mask=mask, w_div=w_div, w_lp=w_lp)


def run(fn, case, alpha, temperature, dtype=None, loss_fn=None, frozen_head=False, **kw):
    """Forward + backward of a loss built from the per-token outputs; returns outputs, loss and grads.
    ``dtype`` casts every float input first (float64 for the oracle). ``frozen_head``: the student's
    head gets no gradient (LoRA), which the chunked path handles by projecting in forward."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    h_s = cast(case["h_s"]).detach().requires_grad_()
    w_s = cast(case["w_s"]).detach().requires_grad_(not frozen_head)
    h_t, w_t = cast(case["h_t"]), (w_s if case["w_t"] is case["w_s"] else cast(case["w_t"]))
    out = fn(h_s, w_s, h_t, w_t, case["targets"], case["mask"], alpha=alpha, temperature=temperature, **kw)
    if loss_fn is None:  # the loop's shape: weighted divergence plus a term linear in student_logp
        loss = (out.divergence * case["w_div"].to(out.divergence.dtype)).sum() / 20 + (
            out.student_logp * case["w_lp"].to(out.student_logp.dtype)).sum() / 20
    else:
        loss = loss_fn(out)
    loss.backward()
    return out, loss.detach(), h_s.grad, w_s.grad


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-trained", "head-frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.2])
def test_matches_fp64_oracle(alpha, temperature, dtype, frozen_head):
    case = make_case(dtype)
    out, loss, gh, gw = run(chunked_token_outputs, case, alpha, temperature, chunk_size=7,  # 7 ∤ 20
                            frozen_head=frozen_head)
    ref, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, temperature, dtype=torch.float64)
    assert rel(loss, ref_loss) <= 1e-4
    assert gh.dtype == dtype
    assert rel(gh, ref_gh) <= GRAD_TOL[dtype]
    if frozen_head:
        assert gw is None
    else:
        assert gw.dtype == dtype and rel(gw, ref_gw) <= GRAD_TOL[dtype]
    for name in ("divergence", "student_logp", "entropy", "teacher_logp"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == (B, C) and got.dtype == torch.float32
        assert rel(got, want) <= 1e-5, name
        assert torch.all(got[case["mask"] == 0] == 0), f"{name} not zero on padding"
    assert not out.entropy.requires_grad and not out.teacher_logp.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 20, 1024])  # 4, 5, 20 divide N=20; 1, 7, 1024 edge / not
def test_chunk_size_does_not_change_results(chunk_size):
    case = make_case(torch.float32, seed=1)
    out, loss, gh, gw = run(chunked_token_outputs, case, 0.5, 1.0, chunk_size=chunk_size)
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, 0.5, 1.0, dtype=torch.float64)
    assert rel(loss, ref_loss) <= 1e-5
    assert rel(gh, ref_gh) <= 1e-5 and rel(gw, ref_gw) <= 1e-5


def test_float64_inputs_agree_to_rounding():
    case = make_case(torch.float64, seed=2)
    for alpha in (0.0, 0.3, 1.0):
        out, loss, gh, gw = run(chunked_token_outputs, case, alpha, 0.8, chunk_size=3)
        ref, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 0.8)
        assert out.divergence.dtype == torch.float64
        assert rel(loss, ref_loss) < 1e-12 and rel(gh, ref_gh) < 1e-12 and rel(gw, ref_gw) < 1e-12


@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-trained", "head-frozen"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_nonlinear_loss_on_student_logp_only(alpha, frozen_head):
    """A hinge on the student log-prob alone (no divergence term: its upstream gradient is None)."""
    case = make_case(torch.float32, seed=3)
    hinge = lambda o: torch.relu(-2.0 - o.student_logp).mul(case["mask"]).sum()  # noqa: E731
    _, loss, gh, gw = run(chunked_token_outputs, case, alpha, 1.0, loss_fn=hinge, chunk_size=6, frozen_head=frozen_head)
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 1.0, dtype=torch.float64, loss_fn=hinge)
    assert ref_gh.abs().sum() > 0  # the hinge is active somewhere, so the check means something
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5
    assert gw is None if frozen_head else rel(gw, ref_gw) <= 1e-5


@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-trained", "head-frozen"])
def test_divergence_only_and_squared_combination(frozen_head):
    case = make_case(torch.float32, seed=4)
    for alpha in (0.0, 0.5, 1.0):
        for loss_fn in (lambda o: o.divergence.sum(), lambda o: (o.divergence * o.student_logp).sum()):
            _, loss, gh, gw = run(chunked_token_outputs, case, alpha, 1.3, loss_fn=loss_fn, chunk_size=8,
                                  frozen_head=frozen_head)
            _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 1.3, dtype=torch.float64, loss_fn=loss_fn)
            assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5
            assert gw is None if frozen_head else rel(gw, ref_gw) <= 1e-5


def test_gradcheck_float64():
    """Finite differences on both differentiable outputs and both differentiable inputs."""
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    w_s = torch.randn(7, 4, dtype=torch.float64, generator=g).requires_grad_()
    h_t, w_t = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    y, mask = torch.randint(0, 7, (2, 3), generator=g), torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    for alpha in (0.0, 0.4, 1.0):
        def f(a, b, alpha=alpha):
            o = chunked_token_outputs(a, b, h_t, w_t, y, mask, alpha=alpha, temperature=0.9, chunk_size=2)
            return o.divergence, o.student_logp
        assert torch.autograd.gradcheck(f, (h_s, w_s), fast_mode=True)
        # a frozen head (LoRA): the divergence's gradient is projected in forward
        assert torch.autograd.gradcheck(lambda a, alpha=alpha: f(a, w_s.detach(), alpha), (h_s,), fast_mode=True)


def test_shared_head_and_teacher_gets_no_gradient():
    case = make_case(torch.float32, seed=6, same_head=True)
    _, loss, gh, gw = run(chunked_token_outputs, case, 0.5, 1.0, chunk_size=4)
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, 0.5, 1.0, dtype=torch.float64)
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5 and rel(gw, ref_gw) <= 1e-5
    # A teacher whose tensors require grad (e.g. the student's own head under full fine-tuning):
    h_t = case["h_t"].clone().requires_grad_()
    w_t = case["w_t"].clone().requires_grad_()
    h_s = case["h_s"].clone().requires_grad_()
    out = chunked_token_outputs(h_s, case["w_s"], h_t, w_t, case["targets"], case["mask"], alpha=0.5)
    (out.divergence.sum() + out.student_logp.sum()).backward()
    assert h_t.grad is None and w_t.grad is None and h_s.grad is not None


@pytest.mark.parametrize("k", [1, 3])
def test_teacher_contexts(k):
    case = make_case(torch.float32, seed=7)
    g = torch.Generator().manual_seed(8)
    contexts = {
        f"ctx{i}": (torch.randn(B, C, H, generator=g), torch.randn(V, H, generator=g) * 0.5, 0.6 + 0.3 * i)
        for i in range(k)
    }
    out = chunked_token_outputs(case["h_s"], case["w_s"], case["h_t"], case["w_t"], case["targets"], case["mask"],
                                alpha=0.5, chunk_size=6, teacher_contexts=contexts)
    assert sorted(out.context_logp) == sorted(contexts)
    for name, (hidden, head, temperature) in contexts.items():
        logits = hidden.double() @ head.double().T / temperature
        want = torch.log_softmax(logits, -1).gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1) * case["mask"]
        got = out.context_logp[name]
        assert got.shape == (B, C) and not got.requires_grad
        assert rel(got, want) <= 1e-6
        assert torch.all(got[case["mask"] == 0] == 0)
    # The main teacher's log-prob is unchanged by extra contexts and equals the standalone helper.
    main = chunked_target_logprobs(case["h_t"], case["w_t"], case["targets"], case["mask"], 1.0, chunk_size=3)
    assert torch.allclose(out.teacher_logp, main, atol=1e-6)


def test_all_tokens_masked():
    case = make_case(torch.float32, seed=9)
    case["mask"] = torch.zeros(B, C)
    out, loss, gh, gw = run(chunked_token_outputs, case, 0.5, 1.0)
    assert float(loss) == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)
    assert out.divergence.shape == (B, C) and torch.all(out.entropy == 0)


def test_bad_arguments_are_usage_errors():
    case = make_case(torch.float32)
    args = (case["h_s"], case["w_s"], case["h_t"], case["w_t"], case["targets"], case["mask"])
    with pytest.raises(UsageError, match="alpha"):
        chunked_token_outputs(*args, alpha=1.5)
    with pytest.raises(UsageError, match="temperature"):
        chunked_token_outputs(*args, temperature=0.0)
    with pytest.raises(UsageError, match="chunk_size"):
        chunked_token_outputs(*args, chunk_size=0)


# ----------------------------------------------------------------------------------------------
# Memory shape: no [N, V] tensor, in forward, in backward, or saved between them.

MN, MH, MV, MCHUNK = 64, 8, 300, 8  # N·V = 19200 > every other tensor: chunk·V = 2400, V·H = 2400


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def memory_case():
    g = torch.Generator().manual_seed(10)
    return dict(
        h_s=torch.randn(2, MN // 2, MH, generator=g), w_s=torch.randn(MV, MH, generator=g),
        h_t=torch.randn(2, MN // 2, MH, generator=g), w_t=torch.randn(MV, MH, generator=g),
        targets=torch.randint(0, MV, (2, MN // 2), generator=g), mask=torch.ones(2, MN // 2),
    )


def probe_largest(fn, alpha, **kw):
    """(largest tensor created by any op, largest tensor saved for backward) over one fwd+bwd."""
    case = memory_case()
    h_s, w_s = case["h_s"].requires_grad_(), case["w_s"].requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(h_s, w_s, case["h_t"], case["w_t"], case["targets"], case["mask"], alpha=alpha, **kw)
        (out.divergence.sum() + out.student_logp.sum()).backward()
    return mode.largest, max(saved)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_tokens_by_vocab_tensor(alpha):
    largest, saved = probe_largest(chunked_token_outputs, alpha, chunk_size=MCHUNK)
    assert largest <= max(MCHUNK * MV, MV * MH, MN * MH), largest
    assert saved <= max(MV * MH, MN * MH), saved
    # The probe sees the naive path's full logits, so the bounds above can fail.
    naive_largest, naive_saved = probe_largest(token_outputs, alpha)
    assert naive_largest >= MN * MV and naive_saved >= MN * MV


class Recorder(TorchDispatchMode):
    """Records (dtype, shape) of every tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, tuple(t.shape)))
        return out


def test_bf16_head_is_never_converted_whole(monkeypatch):
    """A bf16 head is converted a slice of rows at a time: forward holds no float32 [V, H] copy."""
    import unisd.divergence.chunked as chunked

    monkeypatch.setattr(chunked._Head, "SLICE", 40)  # 97 = 40 + 40 + 17 rows
    case = make_case(torch.bfloat16, seed=11)
    with Recorder() as rec:
        chunked_token_outputs(case["h_s"], case["w_s"], case["h_t"], case["w_t"], case["targets"], case["mask"],
                              alpha=0.5, chunk_size=7)
    assert (torch.float32, (V, H)) not in rec.seen
    assert (torch.float32, (40, H)) in rec.seen  # the probe does see the slices


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_low_precision_matmul_path(monkeypatch, alpha):
    """The CUDA path (bf16 operands, float32 accumulation and output), emulated on CPU: exact products
    of the bf16 values accumulated in float32 — what ``torch.mm(..., out_dtype=torch.float32)`` does."""
    import unisd.divergence.chunked as chunked

    def emulated(a, b, out):
        assert a.dtype == b.dtype == torch.bfloat16  # the logit gradient is rounded to bf16 on this path
        return torch.mm(a.float(), b.float(), out=out) if out is not None else torch.mm(a.float(), b.float())

    monkeypatch.setattr(chunked, "_lowp_available", lambda w, compute: w.dtype == torch.bfloat16)
    monkeypatch.setattr(chunked, "_lowp_mm", emulated)
    monkeypatch.setattr(chunked._Head, "SLICE", 40)
    case = make_case(torch.bfloat16, seed=12)
    out, loss, gh, gw = run(chunked_token_outputs, case, alpha, 0.7, chunk_size=6)
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 0.7, dtype=torch.float64)
    assert rel(loss, ref_loss) <= 1e-4
    assert rel(gh, ref_gh) <= 1e-2 and rel(gw, ref_gw) <= 1e-2


def test_mixed_dtypes_keep_float32_precision(monkeypatch):
    """float32 hidden states with a bf16 head: never rounded to bf16, even where the fast path exists."""
    import unisd.divergence.chunked as chunked

    monkeypatch.setattr(chunked, "_lowp_available", lambda w, compute: True)
    monkeypatch.setattr(chunked, "_lowp_mm", lambda *a: pytest.fail("float32 hidden states went to bf16"))
    case = make_case(torch.float32, seed=13)
    case["w_s"], case["w_t"] = case["w_s"].bfloat16(), case["w_t"].bfloat16()
    _, loss, gh, gw = run(chunked_token_outputs, case, 0.5, 1.0, chunk_size=7)
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, 0.5, 1.0, dtype=torch.float64)
    assert gw.dtype == torch.bfloat16
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5 and rel(gw, ref_gw) <= 1e-2


class VocabMatmuls(TorchDispatchMode):
    """Counts matrix products with a vocabulary-sized operand or result (the cost that dominates)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # the BLAS's products, and oneDNN's (unisd.model.onednn, float32 on the CPU)
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.mkldnn._linear_pointwise):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] + [tuple(out.shape)]
            self.count += any(self.vocab in s for s in shapes)
        return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_frozen_head_needs_three_vocabulary_products_per_chunk(alpha):
    """LoRA's frozen head: student logits, teacher logits and one projection of the divergence's
    gradient per chunk (the naive path's count), instead of 2 forward + 3 recomputed in backward.
    A loss on the student log-prob as well brings the recompute back for that term only."""
    case = make_case(torch.float32, seed=8)
    chunks = 3  # N = 20 masked tokens in chunks of 7

    def count(frozen: bool, with_logp: bool) -> int:
        h_s = case["h_s"].clone().requires_grad_()
        w_s = case["w_s"].clone().requires_grad_(not frozen)
        with VocabMatmuls(V) as mode:
            out = chunked_token_outputs(h_s, w_s, case["h_t"], case["w_t"], case["targets"], case["mask"],
                                        alpha=alpha, chunk_size=7)
            loss = out.divergence.sum() + (out.student_logp.sum() if with_logp else 0)
            loss.backward()
        return mode.count

    assert count(frozen=True, with_logp=False) == 3 * chunks
    assert count(frozen=True, with_logp=True) == 5 * chunks
    assert count(frozen=False, with_logp=False) == 6 * chunks  # + the head's own gradient


# ----------------------------------------------------------------------------------------------
# The compiled chunk math (torch.compile, on CPU here) and its fallback


@pytest.fixture(autouse=True)
def fresh_compile_state(monkeypatch):
    monkeypatch.setattr(chunk_math, "_BROKEN", [])
    monkeypatch.delenv("UNISD_CHUNKED_COMPILE", raising=False)


@pytest.mark.parametrize(("alpha", "frozen_head"), [(0.0, False), (0.5, False), (1.0, False), (0.5, True)])
def test_compiled_matches_fp64_oracle(alpha, frozen_head):
    case = make_case(torch.float32, seed=11)
    out, loss, gh, gw = run(chunked_token_outputs, case, alpha, 0.7, chunk_size=7, frozen_head=frozen_head,
                            compile="on")
    ref, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 0.7, dtype=torch.float64)
    assert not chunk_math._BROKEN, chunk_math._BROKEN  # it really ran compiled
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5
    assert gw is None if frozen_head else rel(gw, ref_gw) <= 1e-5
    for name in ("divergence", "student_logp", "entropy", "teacher_logp"):
        assert rel(getattr(out, name), getattr(ref, name)) <= 1e-5, name
    logp = chunked_target_logprobs(case["h_t"], case["w_t"], case["targets"], case["mask"], 0.7, 7, compile="on")
    assert rel(logp, ref.teacher_logp) <= 1e-5


class Uncompiled(dict):
    """Stands in for chunk_math's table of compiled functions: each name runs its plain function."""

    def __contains__(self, name):
        return True

    def __getitem__(self, name):
        return chunk_math._PLAIN[name]


@pytest.mark.parametrize(("alpha", "frozen_head", "with_logp"),
                         [(0.0, False, True), (0.5, False, True), (1.0, False, True), (0.5, True, False),
                          (0.5, True, True), (0.3, True, False)])
def test_the_kernels_math_and_the_eager_path_agree_in_float64(monkeypatch, alpha, frozen_head, with_logp):
    """The two implementations of one formula (docs/architecture.md): chunk_math's functions, run
    uncompiled, against the in-place eager path, in float64 where only the formulas can differ."""
    case = make_case(torch.float64, seed=14)
    divergence_only = (lambda out: (out.divergence * case["w_div"].double()).sum() / 20) if not with_logp else None
    kwargs = dict(chunk_size=7, frozen_head=frozen_head, loss_fn=divergence_only)
    eager = run(chunked_token_outputs, case, alpha, 0.7, compile="off", **kwargs)
    monkeypatch.setattr(chunk_math, "_COMPILED", Uncompiled())
    kernels = run(chunked_token_outputs, case, alpha, 0.7, compile="on", **kwargs)
    for a, b in zip(eager[1:], kernels[1:], strict=True):
        assert (a is None and b is None) or rel(a, b) <= 1e-12
    for name in ("divergence", "student_logp", "entropy", "teacher_logp"):
        assert rel(getattr(eager[0], name), getattr(kernels[0], name)) <= 1e-12, name


class EveryName(dict):
    """Stands in for chunk_math's table of compiled functions: the same function under every name."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __contains__(self, name):
        return True

    def __getitem__(self, name):
        return self.fn


def test_a_failing_compile_falls_back_to_the_eager_path_once(monkeypatch):
    import subprocess

    calls = []

    def broken(*args):
        calls.append(1)
        raise subprocess.CalledProcessError(1, ["g++"], "no C++ compiler")

    monkeypatch.setattr(chunk_math, "_COMPILED", EveryName(broken))
    case = make_case(torch.float32, seed=12)
    with pytest.warns(RuntimeWarning, match="CalledProcessError"):
        out, loss, gh, gw = run(chunked_token_outputs, case, 0.5, 1.0, chunk_size=7, compile="on")
    _, ref_loss, ref_gh, ref_gw = run(token_outputs, case, 0.5, 1.0, dtype=torch.float64)
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5 and rel(gw, ref_gw) <= 1e-5
    assert len(calls) == 1  # tried once; the rest of the process runs eagerly
    assert not chunk_math.compile_wanted(torch.device("cpu"), "on")


def test_an_error_that_is_not_about_compiling_propagates_and_keeps_compiling(monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(chunk_math, "_COMPILED", EveryName(out_of_memory))
    case = make_case(torch.float32, seed=13)
    with pytest.raises(torch.OutOfMemoryError):
        run(chunked_token_outputs, case, 0.5, 1.0, chunk_size=7, compile="on")
    assert not chunk_math._BROKEN and chunk_math.compile_wanted(torch.device("cpu"), "on")


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_compiled_keeps_tiny_divergences_exact(alpha):
    """A student a hair from its teacher, logits around ±30: the divergence is ~1e-6, and a log-softmax
    that skips subtracting the row maximum would be off by tens of percent."""
    g = torch.Generator().manual_seed(14)
    h_s = torch.randn(2, 16, 32, generator=g)
    w = torch.randn(500, 32, generator=g) * 2.5
    h_t = h_s + 1e-3 * torch.randn(2, 16, 32, generator=g)
    mask, targets = torch.ones(2, 16), torch.randint(0, 500, (2, 16), generator=g)
    args = (h_s, w, h_t, w, targets, mask)
    ref = token_outputs(*(a.double() if a.is_floating_point() else a for a in args), alpha=alpha)
    eager = chunked_token_outputs(*args, alpha=alpha, chunk_size=8, compile="off")
    fused = chunked_token_outputs(*args, alpha=alpha, chunk_size=8, compile="on")
    assert not chunk_math._BROKEN
    assert float(ref.divergence.mean()) < 1e-4  # the regime in question
    assert rel(fused.divergence, ref.divergence) <= 2 * rel(eager.divergence, ref.divergence) + 1e-6


def test_when_compilation_is_wanted(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not chunk_math.compile_wanted(cpu, "auto") and chunk_math.compile_wanted(cuda, "auto")
    assert chunk_math.compile_wanted(cpu, "on") and not chunk_math.compile_wanted(cuda, "off")
    monkeypatch.setenv("UNISD_CHUNKED_COMPILE", "off")
    assert not chunk_math.compile_wanted(cuda, "on")
    monkeypatch.setenv("UNISD_CHUNKED_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="must be auto, on or off"):
        chunk_math.compile_wanted(cpu)


# ----------------------------------------------------------------------------------------------
# gjsd_scale = "research" on every path: eager, compiled, trained and frozen head (issue 13, item 9)


@pytest.mark.parametrize("compile", ["off", "on"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-trained", "head-frozen"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_research_scale_matches_fp64_oracle(alpha, frozen_head, compile):
    case = make_case(torch.float32, seed=12)
    out, loss, gh, gw = run(chunked_token_outputs, case, alpha, 0.7, chunk_size=7, frozen_head=frozen_head,
                            compile=compile, gjsd_scale="research")
    ref, ref_loss, ref_gh, ref_gw = run(token_outputs, case, alpha, 0.7, dtype=torch.float64, gjsd_scale="research")
    assert not chunk_math._BROKEN, chunk_math._BROKEN
    assert rel(loss, ref_loss) <= 1e-5 and rel(gh, ref_gh) <= 1e-5
    assert gw is None if frozen_head else rel(gw, ref_gw) <= 1e-5
    assert rel(out.divergence, ref.divergence) <= 1e-5
    # the oracle's research value is the normalized one times α(1−α) (the ends are unscaled KLs)
    normalized, *_ = run(token_outputs, case, alpha, 0.7, dtype=torch.float64)
    factor = alpha * (1 - alpha) if 0 < alpha < 1 else 1.0
    assert rel(ref.divergence, normalized.divergence * factor) <= 1e-12


def test_unknown_gjsd_scale_is_refused_by_the_chunked_path():
    case = make_case(torch.float32)
    with pytest.raises(UsageError, match="gjsd_scale"):
        chunked_token_outputs(case["h_s"], case["w_s"], case["h_t"], case["w_t"], case["targets"], case["mask"],
                              alpha=0.5, gjsd_scale="4x")
