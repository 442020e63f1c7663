"""The dtype a quantized base's products multiply in (``matmul_dtype``): bfloat16 where the hardware has it.

A format's own arithmetic is tested in float32 (test_quantized.py); here, that bfloat16 products really run in
bfloat16, add only the activations' rounding (int8 scales are applied in float32 after the product), give
gradients to match, and that ``auto`` takes bfloat16 exactly where the device multiplies it in hardware.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.quantization import base, quantize_base, set_matmul_dtype

HAS_BNB = __import__("importlib").util.find_spec("bitsandbytes") is not None
KINDS = ["int8", pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes"))]
MATMULS = {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm}


class ProductDtypes(TorchDispatchMode):
    """Records the dtypes of the float matrix operands of every matrix product run inside it (aten's, and
    bitsandbytes' own 4-bit GEMM, which it runs for float32 activations on a CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS or "gemm" in str(func):
            self.seen |= {
                a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2
            }
        return func(*args, **(kwargs or {}))


def layer(kind: str, matmul_dtype: str, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return quantize_base(nn.Sequential(nn.Linear(64, 48, bias=False)), kind, matmul_dtype=matmul_dtype)[0]


def test_int8_bfloat16_product_is_exact_where_bfloat16_holds_the_sums_and_scales_apply_in_float32():
    """Codes and small integer inputs make every sum an integer bfloat16 holds exactly: the output must then be
    (x·Qᵀ)·s to the last bit. Folding the scales into a bfloat16 weight block would round s·Q and miss."""
    codes = torch.tensor([[127, 1, -2, 3], [-127, 0, 2, -1], [127, -3, 1, 1]], dtype=torch.float64)
    scales = torch.tensor([0.0123, 0.0456, 0.00789], dtype=torch.float64)
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(codes * scales[:, None])
    int8 = quantize_base(nn.Sequential(linear), "int8", matmul_dtype="bfloat16")[0]
    assert torch.equal(int8.weight_int8.double(), codes)
    x = torch.tensor([[0.0, 1, -1, 1], [0, 0, 1, 1]] * 9, requires_grad=True)  # 18 rows: the chunked product
    with ProductDtypes() as products:
        out = int8(x)
    expected = ((x.detach().double() @ codes.T) * int8.weight_scale.double()).float()
    assert products.seen == {torch.bfloat16} and out.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_products_add_only_bfloat16_rounding_forward_and_backward(kind):
    q = layer(kind, "bfloat16")
    w = q.dequantize().double()
    x = torch.randn(3, 7, 64, requires_grad=True)
    grad_out = torch.randn(3, 7, 48)
    with ProductDtypes() as products:
        out = q(x)
        out.backward(grad_out)
    assert products.seen == {torch.bfloat16} and out.dtype == x.grad.dtype == torch.float32
    exact = x.detach().double() @ w.T  # float64: what the float32 product approximates closely
    rounded = x.detach().bfloat16().double() @ w.T  # the activations rounded to bfloat16, nothing else
    error = (out.double() - exact).norm() / exact.norm()
    assert error < 2**-7 and (out.double() - rounded).norm() / exact.norm() < 2**-7
    assert error > 1e-5  # not a float32 product: that is within 1e-6
    grad_exact = grad_out.double() @ w
    assert (x.grad.double() - grad_exact).norm() / grad_exact.norm() < 2**-7


@pytest.mark.parametrize("kind", KINDS)
def test_float32_keeps_float32_products(kind):
    q = layer(kind, "float32")
    x = torch.randn(20, 64, requires_grad=True)
    with ProductDtypes() as products:
        out = q(x)
    assert products.seen == {torch.float32}
    torch.testing.assert_close(out, x @ q.dequantize().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bfloat16_only_where_the_device_multiplies_it_in_hardware(native, monkeypatch):
    monkeypatch.setattr(base, "native_bfloat16", lambda device: native)
    q = layer("int8", "auto")
    with ProductDtypes() as products:
        q(torch.randn(20, 64, requires_grad=True))
        q(torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True))  # bfloat16 activations: bfloat16 anyway
    assert products.seen == ({torch.bfloat16} if native else {torch.float32, torch.bfloat16})


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_the_hardware_probe_reads_the_cpus_bfloat16_features(avx512_bf16, amx, native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert base.native_bfloat16.__wrapped__(torch.device("cpu")) is native


def test_lora_on_a_bfloat16_product_base_trains_like_float32_products():
    """The same LoRA steps on the same int8 base, products in bfloat16 or float32: LoRA's own factors stay float32
    and the losses agree to bfloat16's rounding."""
    losses = {}
    for matmul_dtype in ("bfloat16", "float32"):
        torch.manual_seed(0)
        model = dt.wrap(quantize_base(tiny_llama(), "int8", matmul_dtype=matmul_dtype), dt.LoraConfig(r=4))
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=5e-2)
        ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
        losses[matmul_dtype] = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[matmul_dtype].append(loss.item())
    assert losses["float32"][-1] < losses["float32"][0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(losses["bfloat16"]), torch.tensor(losses["float32"]), rtol=5e-3, atol=0)
    assert losses["bfloat16"] != losses["float32"]


def test_a_wrong_matmul_dtype_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown matmul_dtype 'fp16': choose one of auto, float32, bfloat16"):
        set_matmul_dtype(nn.Sequential(), "fp16")
    with pytest.raises(ConfigError, match="matmul_dtype"):  # before any weight is read
        quantize_base(tiny_llama(), "int8", matmul_dtype="half")
    with pytest.raises(ConfigError, match="matmul_dtype"):  # before the model is even looked for
        dt.load_base(str(tmp_path / "missing"), quantize="int8", matmul_dtype="half")


def test_train_config_checks_matmul_dtype_and_the_trainer_passes_it(tiny_llama_dir, tmp_path, monkeypatch):
    from deltatune import quantization
    from deltatune.cli import main
    from deltatune.training.config import TrainConfig

    with pytest.raises(ConfigError, match="applies to a quantized base: add --quantize"):
        TrainConfig(matmul_dtype="bfloat16")
    with pytest.raises(ConfigError, match="matmul_dtype must be"):
        TrainConfig(quantize="int8", matmul_dtype="fp8")
    chosen = []
    real = quantization.set_matmul_dtype
    monkeypatch.setattr(quantization, "set_matmul_dtype", lambda model, d: chosen.append(d) or real(model, d))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c d e f"}\n' * 8)
    argv = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--quantize", "int8"]
    argv += ["--matmul-dtype", "float32", "--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    assert chosen == ["float32"]


@pytest.mark.parametrize(("kind", "matmul_dtype"), [("int8", "bfloat16"), ("int8", "float32"), (None, None)])
def test_reports_show_size_bytes_per_weight_and_the_products_dtype(kind, matmul_dtype, capsys):
    from deltatune.inspection import inspect_report

    model = tiny_llama() if kind is None else quantize_base(tiny_llama(), kind, matmul_dtype=matmul_dtype)
    size, weights = dt.quantization.base_storage(model)
    per_weight = f"{size / weights:.2f} bytes per weight"
    described = "not quantized" if kind is None else f"{kind}, products in {matmul_dtype}"
    report = inspect_report(model, "lora", dt.LoraConfig(r=2), {})
    assert f"base size: {size / 2**20:,.1f} MiB, {per_weight} ({described})" in report
    dt.wrap(model, dt.LoraConfig(r=2)).print_trainable_parameters()
    assert f"base: {size / 2**20:,.1f} MiB, {per_weight} ({described})" in capsys.readouterr().out
    assert (size == 4 * weights) == (kind is None)  # float32: four bytes per weight; int8 linears: fewer
