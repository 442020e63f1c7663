"""A DeltaModel with no adapter is a valid model that runs the base; adapter names are checked in one
place before anything is wrapped; ``load_adapter`` reads a checkpoint's config once and returns it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import adapter_names
from deltatune.config import DeltaConfig
from deltatune.methods.base import DeltaLayer
from deltatune.methods.lora import LoraLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def lora() -> dt.LoraConfig:
    return dt.LoraConfig(target_modules=["a", "b"], init_lora_weights=False)


def wrappers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DeltaLayer)]


def test_an_empty_model_runs_the_base_and_takes_adapters():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 6)
    expected = net(x)
    model = dt.DeltaModel(net)
    assert model.peft_config == {} and model.active_adapter is None and model.active_adapters == []
    torch.testing.assert_close(model(x), expected)
    model.add_adapter("one", lora())
    model.set_adapter("one")
    assert not torch.allclose(model(x), expected)
    model.delete_adapter("one")  # the last one: a valid model again, running the base
    assert wrappers(model) == [] and model.active_adapter is None
    torch.testing.assert_close(model(x), expected)
    model.add_adapter("two", lora())
    model.set_adapter("two")
    assert wrappers(model) == ["base_model.a", "base_model.b"]


def test_unload_leaves_a_model_that_runs_the_base(tmp_path):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 6)
    expected = net(x)
    model = dt.wrap(net, lora())
    model.save_pretrained(tmp_path)
    with_adapter = model(x)
    model.unload()
    assert model.active_adapter is None and model.peft_config == {}
    torch.testing.assert_close(model(x), expected)
    model.load_adapter(tmp_path, "again")  # the first adapter of an empty model becomes active
    assert model.active_adapter == "again"
    torch.testing.assert_close(model(x), with_adapter)


@pytest.mark.parametrize("name", ["keys", "__base__", "a/b", "", "one"])
def test_a_bad_name_fails_before_anything_is_wrapped(name):
    net = Net()
    model = dt.wrap(net, dt.LoraConfig(target_modules=["a"]), "one")
    before = dict(net.named_modules())
    with pytest.raises(ValueError, match=r"adapter (name )?'.*'"):
        model.add_adapter(name, dt.LoraConfig(target_modules=["b"]))
    assert dict(net.named_modules()) == before and list(model.peft_config) == ["one"]
    assert wrappers(net) == ["a"]


def test_a_bad_name_leaves_a_fresh_base_untouched():
    net = Net()
    with pytest.raises(ValueError, match="reserved"):
        dt.wrap(net, lora(), "items")
    assert wrappers(net) == [] and all(p.requires_grad for p in net.parameters())


def test_a_method_failing_halfway_through_wrapping_is_undone(monkeypatch):
    net = Net()
    model = dt.DeltaModel(net)
    calls = []
    add = LoraLinear.add

    def add_then_fail(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:  # the first module is wrapped and holds the adapter by now
            raise RuntimeError("out of memory")
        add(self, name, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add", add_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.add_adapter("one", lora())
    assert wrappers(net) == [] and model.peft_config == {}


def test_the_server_and_the_library_share_one_rule():
    from deltatune.serving.adapters import RESERVED, name_problem

    assert name_problem is adapter_names.name_problem and RESERVED is adapter_names.RESERVED
    assert "keys" in RESERVED and name_problem("tiny", base_name="tiny") is not None
    assert name_problem("poet", base_name="tiny") is None
    assert "already exists" in name_problem("poet", taken={"poet"})


def test_load_adapter_reads_the_config_once_and_returns_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dt.wrap(Net(), lora()).save_pretrained(tmp_path)
    reads = []
    load = DeltaConfig.load.__func__

    def counted(cls, directory):
        reads.append(directory)
        return load(cls, directory)

    monkeypatch.setattr(DeltaConfig, "load", classmethod(counted))
    model = dt.DeltaModel(Net())
    config = model.load_adapter(tmp_path, "one")
    assert len(reads) == 1 and config is model.peft_config["one"] and config.inference_mode
    given = DeltaConfig.from_dict(load(DeltaConfig, tmp_path).to_dict())
    reads.clear()
    model.load_adapter(tmp_path, "two", config=given)  # a caller that read it already: no second read
    assert reads == [] and model.peft_config["two"].r == given.r


def test_the_server_reads_adapter_config_once_per_load(tmp_path, monkeypatch):
    from deltatune.serving.adapters import Adapters

    torch.manual_seed(0)
    dt.wrap(Net(), lora()).save_pretrained(tmp_path / "poet")
    store = Adapters(Net(), "tiny", tmp_path, max_loaded=None)
    reads = []
    load = DeltaConfig.load.__func__
    monkeypatch.setattr(DeltaConfig, "load", classmethod(lambda cls, d: reads.append(d) or load(cls, d)))
    assert store.ensure("poet", set())
    assert len(reads) == 1
    model = store.model
    store.unload("poet")  # the last one: deleted, not unloaded; the server keeps the model, with no adapter
    assert store.model is model and model.peft_config == {} and wrappers(model) == []
    assert store.ensure("poet", set()) and len(reads) == 2 and store.model is model
