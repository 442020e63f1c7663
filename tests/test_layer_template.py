"""The layer template (DeltaLayer.forward calls the method's ``delta``/``delta_rows``), per-adapter values
that deletion drops without a hand-written ``delete_adapter``, and ``Method.layer_for`` with a layer
registered for a module type of the user's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune import methods
from deltatune.config import ConfigError
from deltatune.methods.base import DeltaLayer
from deltatune.methods.lora import LoraLinear


class Doubled(nn.Module):
    """A module type of the user's own: y = 2·W·x, nothing deltatune knows (not an nn.Linear)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.linear(x, self.weight)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Doubled(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))


@pytest.fixture
def doubled_layer():
    methods.register_layer("lora", Doubled, LoraLinear)
    yield
    methods.unregister_layer("lora", Doubled)


def lora_config(**kw):
    return dt.LoraConfig(target_modules=["proj"], r=2, lora_alpha=4, init_lora_weights=False, **kw)


def test_a_registered_module_type_gets_wrapped(doubled_layer):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 6)
    base_out = net(x)
    model = dt.wrap(net, lora_config())
    layer = model.base_model.proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Doubled)
    assert methods.method_named("lora").layer_for(layer) is LoraLinear  # a wrapper stands for its module
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = net.out(2 * F.linear(x, net.proj.base_layer.weight) + 2 * F.linear(F.linear(x, a), b))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), base_out)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out)
        rows = model(x, adapter_names=["default", "__base__", "default", "__base__"])  # the mixed path too
        torch.testing.assert_close(rows, torch.stack([expected[0], base_out[1], expected[2], base_out[3]]))


def test_an_unregistered_module_type_is_refused():
    with pytest.raises(ConfigError, match="matches no adaptable module"):
        dt.wrap(Net(), lora_config())
    lora = methods.method_named("lora")
    assert lora.layer_for(Doubled(2, 2)) is None
    with pytest.raises(ConfigError, match=r"register one with deltatune\.methods\.register_layer"):
        lora.layers_for(Net(), ["proj"])


def test_a_registered_layer_must_keep_the_methods_claims():
    class NoMix(DeltaLayer):  # lora mixes weights per row and merges: this layer can do neither
        adapter_attrs = ("x",)

    with pytest.raises(TypeError, match="NoMix has no forward_mixed"):
        methods.register_layer("lora", Doubled, NoMix)
    assert methods.method_named("lora").layer_for(Doubled(2, 2)) is None


def test_a_layer_that_defines_only_delta_runs_through_the_template():
    class Shift(DeltaLayer):
        adapter_attrs = ("shift",)

        def __init__(self, base_layer: nn.Module) -> None:
            super().__init__(base_layer)
            self.shift = nn.ParameterDict({"a": nn.Parameter(torch.full((3,), 0.5))})

        def delta(self, name, x, base_out):
            return self.shift[name]

    layer = Shift(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))  # nothing active
        layer.active_adapter = "a"
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 0.5)
        layer.disabled = True
        torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize(
    ("config", "values"),
    [
        (dt.LoraConfig(target_modules=["proj"], use_dora=True), ("scaling", "norms")),
        (dt.IA3Config(target_modules=["proj"], feedforward_modules=[]), ("feedforward",)),
        (dt.LoKrConfig(target_modules=["proj"]), ("scaling", "dropouts")),
    ],
    ids=["lora", "ia3", "lokr"],
)
def test_deleting_an_adapter_drops_its_declared_values(config, values):
    net = nn.Sequential()
    net.proj = nn.Linear(8, 8)
    model = dt.wrap(net, config, "one")
    model.add_adapter("two", config)
    layer = model.base_model.proj
    with torch.no_grad():
        model(torch.randn(2, 8))  # fills caches (DoRA's norm)
    assert layer.adapter_values == values
    assert all("two" in getattr(layer, attr) for attr in values)
    model.delete_adapter("two")
    assert not any("two" in getattr(layer, attr) for attr in values)
    assert all("one" in getattr(layer, attr) for attr in values)
