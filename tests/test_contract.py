"""The method record and contract: one registry, checked claims, and a house without circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

import deltatune as dt
from deltatune import flags, methods
from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, SplitsRows
from deltatune.methods.contract import Method, MixesRows
from deltatune.training.config import TrainConfig

PACKAGE = Path(dt.__file__).parent


@method_config
class ToyConfig(DeltaConfig):
    peft_type = "TOY_CONTRACT_TEST"


class IgnoresRows(DeltaLayer):
    adapter_attrs = ("toy",)


class ServesRows(SplitsRows, DeltaLayer):
    adapter_attrs = ("toy",)


def inject(model: nn.Module, adapter_name: str, config: DeltaConfig) -> list[str]:
    return []


def test_every_builtin_method_is_one_record_and_configs_is_a_view_of_them():
    names = [m.name for m in methods.registered()]
    assert list(methods.CONFIGS) == names[: len(methods.CONFIGS)]
    assert names[:9] == [
        "lora", "adapter", "bitfit", "partial", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter",
        "hyperformer",
    ]  # fmt: skip
    assert methods.method_for(dt.LoraConfig()).merges and methods.method_for(dt.LoraConfig()).mixes == "weights"
    assert methods.method_named("hyperformer").input_keys == ("task_ids",)
    for method in methods.registered():
        if method.mixes in ("weights", "rows"):
            assert all(issubclass(layer, MixesRows) for layer in method.layer_classes), method.name


@pytest.mark.parametrize("config_class", [*methods.CONFIGS.values(), TrainConfig], ids=lambda c: c.__name__)
def test_every_option_documents_itself(config_class):
    """Each flag of ``deltatune train --help`` has a description, not only its type."""
    assert flags.undocumented_fields(config_class) == []


def test_a_method_that_claims_to_mix_rows_needs_layers_that_do():
    with pytest.raises(TypeError, match=r"IgnoresRows has no forward_mixed"):
        Method("toy", ToyConfig, inject, (IgnoresRows,), mixes="rows")
    assert Method("toy", ToyConfig, inject, (ServesRows,), mixes="rows").mixes == "rows"
    with pytest.raises(TypeError, match="defines no delta_weight or merge"):
        Method("toy", ToyConfig, inject, (ServesRows,), merges=True)
    with pytest.raises(TypeError, match="no prepare_inputs hook"):
        Method("toy", ToyConfig, inject, (ServesRows,), mixes="virtual_tokens")
    with pytest.raises(ConfigError, match="mixes must be one of"):
        Method("toy", ToyConfig, inject, (ServesRows,), mixes="columns")


def test_lookups_and_errors_list_the_registered_methods():
    with pytest.raises(ConfigError, match=r"unknown method 'loar'; choose one of: lora, adapter, bitfit"):
        methods.method_named("loar")
    with pytest.raises(ConfigError, match=r"'NOPE' is not supported by deltatune; supported: LORA, BOTTLENECK"):
        DeltaConfig.from_dict({"peft_type": "NOPE"})
    with pytest.raises(ConfigError, match=r"ToyConfig is no registered method's config; registered: lora \(LoraConfig"):
        methods.method_for(ToyConfig())
    with pytest.raises(ConfigError, match="already registered"):
        methods.register(Method("lora", ToyConfig, inject, (ServesRows,)))


def test_merging_refusal_names_the_method_and_the_ones_that_merge():
    from conftest import tiny_llama

    model = dt.wrap(tiny_llama(), dt.AdapterConfig(bottleneck_size=4))
    refusal = r"adapter \(BottleneckAdapter, ModulesToSave\).*methods that merge: lora \(LORA\), bitfit"
    with pytest.raises(TypeError, match=refusal):
        model.merge_adapter()


# The bottom floors import nothing of deltatune above them (lazy imports included).
BOTTOM = {
    "constants.py": set(),
    "wrappers.py": set(),
    "compat.py": set(),
    "atomic.py": set(),
    "config.py": {"deltatune.atomic"},
    "routing.py": {"deltatune.constants"},
    "targeting.py": {"deltatune.config", "deltatune.wrappers"},
}


def deltatune_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deltatune"):
            found |= {node.module} if node.module != "deltatune" else {f"deltatune.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("deltatune")}
    return found


@pytest.mark.parametrize("name", sorted(BOTTOM))
def test_bottom_floors_import_nothing_above_them(name):
    assert deltatune_imports(PACKAGE / name) <= BOTTOM[name]


def test_method_files_never_import_the_model_or_mixing():
    for path in (PACKAGE / "methods").glob("*.py"):
        assert not {i for i in deltatune_imports(path) if i in ("deltatune.model", "deltatune.mixed")}, path.name
