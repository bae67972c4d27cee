"""Float32 CPU products through oneDNN (unisd.model.onednn): values and gradients against float64, the
BLAS wherever oneDNN cannot serve, the layer swap on a loaded model, and the padded row counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unisd.model import onednn
from unisd.model.models import apply_lora, load_model
from unisd.testing import make_tiny_model, make_tokenizer

pytestmark = pytest.mark.skipif(not onednn.enabled(), reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How many products went through oneDNN."""
    calls = [0]
    real = onednn._op

    def product(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(onednn, "_op", product)
    return calls


def random(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


def layer(features_in: int, features_out: int, bias: bool, trainable: bool, seed: int) -> onednn.OneDnnLinear:
    module = torch.nn.Linear(features_in, features_out, bias=bias)
    with torch.no_grad():
        module.weight.copy_(random(features_out, features_in, seed=seed))
        if bias:
            module.bias.copy_(random(features_out, seed=seed + 1))
    module.requires_grad_(trainable)
    assert onednn.use_for_linears(module) == 1
    return module


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


def test_padded_rows_stay_within_an_eighth_and_few_shapes_per_octave():
    assert [onednn.padded_rows(r) for r in (1, 8, 63, 64)] == [1, 8, 63, 64]
    for rows in range(65, 5000):
        padded = onednn.padded_rows(rows)
        assert rows <= padded <= rows * 1.125, rows
    assert len({onednn.padded_rows(r) for r in range(257, 513)}) == 8  # 288, 320, ..., 512
    assert onednn.padded_rows(400) == 416


@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 30, 24), (2, 150, 24)])  # 1, 7, 90 and 300 rows
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_values_and_gradients_match_float64(counted, shape, bias, trainable):
    module = layer(24, 40, bias, trainable, seed=1)
    x64 = random(*shape, seed=2)
    x = x64.float().requires_grad_(True)
    out = module(x)
    assert counted[0] == 1  # the forward went through oneDNN
    weight64 = module.weight.detach().double().requires_grad_(trainable)
    bias64 = module.bias.detach().double().requires_grad_(trainable) if bias else None
    want = F.linear(x64.requires_grad_(True), weight64, bias64)
    assert out.shape == want.shape
    assert relative(out, want) < 1e-6
    upstream = random(*want.shape, seed=3)
    out.backward(upstream.float())
    want.backward(upstream)
    assert counted[0] == 2  # and so did the input's gradient
    assert relative(x.grad, x64.grad) < 1e-6
    if trainable:
        assert relative(module.weight.grad, weight64.grad) < 1e-6
        if bias:
            assert relative(module.bias.grad, bias64.grad) < 1e-6
    else:
        assert module.weight.grad is None


def test_without_grad_the_product_is_direct_and_equal(counted):
    module = layer(24, 40, True, False, seed=4)
    x = random(5, 9, 24, seed=5).float()
    with torch.no_grad():
        got = module(x)
    with torch.inference_mode():
        again = module(x)
    assert counted[0] == 2
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    assert relative(got, F.linear(x.double(), module.weight.double(), module.bias.double())) < 1e-6


@pytest.mark.parametrize("case", ["float64", "bfloat16", "switched off", "autocast", "no rows"])
def test_the_blas_serves_what_onednn_cannot(counted, monkeypatch, case):
    module = layer(24, 40, True, False, seed=6)
    x = random(6, 24, seed=7).float()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.no_grad()
    if case == "float64":
        module, x = module.double(), x.double()
    elif case == "bfloat16":
        module, x = module.bfloat16(), x.bfloat16()
    elif case == "switched off":
        monkeypatch.setenv("UNISD_ONEDNN", "0")
    elif case == "no rows":
        x = x[:0]
    with context:
        got = module(x)
        want = F.linear(x, module.weight, module.bias)
    assert counted[0] == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vocabulary_products_match_float64_and_keep_their_buffers(counted):
    weight = random(300, 24, seed=8).float()
    h, g = random(70, 24, seed=9).float(), random(70, 300, seed=10).float()
    logits, grad_h = torch.empty(70, 300), torch.empty(70, 24)
    assert onednn.matmul_t(h, weight, logits) is logits
    assert onednn.matmul(g, weight, grad_h) is grad_h
    assert counted[0] == 2
    assert relative(logits, h.double() @ weight.double().t()) < 1e-6
    assert relative(grad_h, g.double() @ weight.double()) < 1e-6
    empty = torch.empty(0, 300)
    assert onednn.matmul_t(h[:0], weight, empty).shape == (0, 300)
    assert counted[0] == 2


def test_a_lora_models_logits_and_adapter_gradients_match_float64():
    tokenizer = make_tokenizer()
    base = make_tiny_model(tokenizer, hidden=32, layers=2, seed=3)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a non-zero B, so the adapter's path carries gradient into A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model).double()
    swapped = onednn.use_for_linears(model)
    assert swapped == sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(type(m) is onednn.OneDnnLinear for m in reference.modules())
    ids = torch.randint(3, len(tokenizer), (3, 90), generator=torch.Generator().manual_seed(11))
    out, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert relative(out, want) < 1e-5
    out.square().mean().backward()
    want.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert relative(grads[name], p.grad) < 1e-5, name


def test_loaded_models_use_onednn_and_save_as_before(tmp_path):
    tokenizer = make_tokenizer()
    make_tiny_model(tokenizer, hidden=32, layers=2).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), dtype="float32")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is onednn.OneDnnLinear for m in linears)
    assert all(type(m) is onednn.OneDnnLinear for m in copy.deepcopy(model).modules() if isinstance(m, torch.nn.Linear))
    model.save_pretrained(tmp_path / "again")
    reloaded = load_model(str(tmp_path / "again"), dtype="float32")
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_wrong_adapter_target_lists_the_swapped_linear_layers(tmp_path):
    from unisd.errors import UsageError

    tokenizer = make_tokenizer()
    make_tiny_model(tokenizer, hidden=32, layers=1).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), dtype="float32")
    with pytest.raises(UsageError, match=r"its linear layers are: .*q_proj"):
        apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["qkv"])


def test_models_load_without_hub_kernels_unless_asked(tmp_path, monkeypatch):
    from unisd.model.models import hub_kernels_wanted

    tokenizer = make_tokenizer()
    make_tiny_model(tokenizer, hidden=32, layers=1).save_pretrained(tmp_path / "m")
    monkeypatch.delenv("UNISD_HUB_KERNELS", raising=False)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    assert not hub_kernels_wanted()
    assert not getattr(load_model(str(tmp_path / "m"), dtype="float32"), "use_kernels", False)
    monkeypatch.setenv("UNISD_HUB_KERNELS", "1")
    assert hub_kernels_wanted()
    pytest.importorskip("kernels")  # transformers kernelizes only with the kernels package
    assert load_model(str(tmp_path / "m"), dtype="float32").use_kernels
    assert load_model(str(tmp_path / "m"), dtype="float32", hub_kernels=False).use_kernels is False


@pytest.mark.parametrize("shape", [(3, 30, 24), (70, 24)])  # a 3-D input; 70 rows, padded to 72
def test_outputs_can_be_edited_in_place_under_autograd(counted, shape):
    """PEFT adds an adapter's output into the base layer's in place (``result += ...``)."""
    module = layer(24, 40, True, False, seed=13)
    x64 = random(*shape, seed=14)
    x = x64.float().requires_grad_(True)
    out = module(x)
    out += 1.0
    out[..., :3].mul_(2.0)
    out.square().sum().backward()
    want = F.linear(x64.requires_grad_(True), module.weight.double(), module.bias.double()) + 1.0
    want[..., :3] = want[..., :3] * 2.0
    want.square().sum().backward()
    assert counted[0] == 2
    assert relative(out, want) < 1e-6 and relative(x.grad, x64.grad) < 1e-6


def test_compiled_code_gets_the_plain_product(counted):
    module = layer(24, 40, True, False, seed=15)
    x = random(6, 24, seed=16).float()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, module.weight, module.bias), rtol=0, atol=0)
    assert counted[0] == 0


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_the_switch_reads_the_usual_spellings_of_off(monkeypatch, value):
    monkeypatch.setenv("UNISD_ONEDNN", value)
    assert not onednn.enabled()
