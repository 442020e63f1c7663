"""HyperFormer: Houlsby sites, the trainable-count formula, exact identity at init, mixed-task
batches (forward and greedy generate) against each task alone, task-id errors, adding a task,
gradients, checkpoints, no merging, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, batch, output, randomize_adapters
from safetensors.torch import load_file

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.methods.hyperformer import HyperAdapterLayer, add_task

T, E, H, M, D = 6, 5, 7, 4, 32  # task/layer embedding dims, hypernet hidden, bottleneck; hidden size
TASKS = ["sst2", "rte", "mnli"]
OUTPUTS = {  # the attention and feed-forward output projections of layer {i}: the Houlsby sites
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
}
MIXED = torch.tensor([0, 2, 1, 0])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds wake-up latency (and waits on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kw) -> dt.HyperAdapterConfig:
    options = dict(tasks=TASKS, task_embedding_dim=T, layer_embedding_dim=E, hypernet_hidden=H, bottleneck_size=M)
    return dt.HyperAdapterConfig(**{**options, **kw})


def adapted(arch: str, randomize: bool = True, **kw) -> tuple[torch.nn.Module, dt.DeltaModel]:
    base = TINY_MODELS[arch]()
    reference = copy.deepcopy(base)
    model = dt.wrap(base, config(**kw))
    if randomize:
        randomize_adapters(model, std=0.3)
    return reference, model


def sites(model: dt.DeltaModel) -> dict[str, HyperAdapterLayer]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, HyperAdapterLayer)}


def formula(tasks: int, sites: int) -> int:
    return tasks * T + sites * E + (T + E) * H + H + (H + 1) * (2 * M * D + M + 3 * D)


def head_params(model: dt.DeltaModel) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".classifier." in n)


def rows(inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in inputs.items()}


@pytest.mark.parametrize(("options", "layers", "kinds"), [({}, (0, 1), (0, 1)), ({"placement": ["ffn"]}, (0, 1), (1,))])
def test_sites_are_the_houlsby_positions_and_share_one_hypernetwork(arch, options, layers, kinds):
    _, model = adapted(arch, randomize=False, **options)
    wanted = [OUTPUTS[arch][k].format(i) for i in layers for k in kinds]
    assert list(sites(model)) == wanted
    owners = [n for n, layer in sites(model).items() if "default" in layer.hypernet]
    assert owners == wanted[:1]  # the first site holds the network, the others a reference
    nets = {id(layer._hypernets["default"]) for layer in sites(model).values()}
    assert len(nets) == 1


def test_trainable_count_matches_the_formula(arch):
    _, model = adapted(arch, randomize=False)
    assert model.trainable_parameters()[0] == formula(len(TASKS), 4) + head_params(model)
    assert head_params(model) == (3 * D + 3 if arch == "bert" else 0)  # a sequence classifier's new head
    _, one_layer = adapted(arch, randomize=False, leave_out=[0], tasks=["a"])
    assert one_layer.trainable_parameters()[0] == formula(1, 2) + head_params(one_layer)


def test_starts_as_exactly_the_base_model(arch):
    reference, model = adapted(arch, randomize=False)
    inputs = batch(rows=4)
    assert torch.equal(model(**inputs, task_ids=MIXED).logits, output(reference, inputs))


def test_a_mixed_batch_equals_each_task_alone(arch):
    _, model = adapted(arch)
    inputs = batch(rows=4)
    mixed = output(model, {**inputs, "task_ids": MIXED})
    for task, name in enumerate(TASKS):
        keep = task == MIXED
        alone = output(model, {**rows(inputs, keep), "task_ids": name})
        torch.testing.assert_close(mixed[keep], alone, atol=1e-5, rtol=1e-5)
    names = output(model, {**inputs, "task_ids": [TASKS[i] for i in MIXED]})
    assert torch.equal(names, mixed)
    same_input = {k: v[[0, 0, 0]] for k, v in inputs.items()}
    per_task = output(model, {**same_input, "task_ids": torch.arange(3)})
    assert not torch.allclose(per_task[0], per_task[1]) and not torch.allclose(per_task[1], per_task[2])


def test_task_id_errors_and_defaults():
    _, model = adapted("llama")
    inputs = batch(rows=2)
    with pytest.raises(ValueError, match=r"several tasks \(0=sst2, 1=rte, 2=mnli\).*task_ids="):
        model(**inputs)
    with pytest.raises(ValueError, match=r"unknown task 'cola'.*0=sst2, 1=rte, 2=mnli"):
        model(**inputs, task_ids=["sst2", "cola"])
    with pytest.raises(ValueError, match="task id 3 is out of range"):
        model(**inputs, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids has 3 rows but the batch has 2"):
        model(**inputs, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(**inputs, task_ids=torch.tensor([0.0, 1.0]))
    _, default = adapted("llama", default_task="rte")
    randomize_adapters(default, std=0.3)
    torch.testing.assert_close(output(default, inputs), output(default, {**inputs, "task_ids": "rte"}))
    _, single = adapted("llama", tasks=["only"])
    torch.testing.assert_close(output(single, inputs), output(single, {**inputs, "task_ids": [0, 0]}))


def test_only_the_hypernetwork_and_embeddings_train_and_get_gradients(arch):
    _, model = adapted(arch)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".hypernet.default." in name or ".layer_embedding.default" in name or ".classifier." in name, name
    assert sum(".layer_embedding." in n for n in trainable) == 4
    assert sum(".task_embeddings." in n for n in trainable) == len(TASKS)
    model(**batch(rows=4), task_ids=torch.tensor([0, 1, 2, 0])).logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name


def test_adding_a_task_trains_only_its_embedding_and_keeps_old_outputs(arch):
    _, model = adapted(arch)
    inputs = batch(rows=4)
    before = output(model, {**inputs, "task_ids": MIXED})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_task(model, "qnli") == 3
    assert model.peft_config["default"].tasks == [*TASKS, "qnli"]
    assert model.trainable_parameters()[0] == T
    new = output(model, {**inputs, "task_ids": "qnli"})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    model(**inputs, task_ids="qnli").logits.float().pow(2).mean().backward()
    optimizer.step()
    model.eval()
    changed = {k for k, v in model.state_dict().items() if k not in state or not torch.equal(v, state[k])}
    assert changed == {next(k for k in model.state_dict() if k.endswith("task_embeddings.3"))}
    assert torch.equal(output(model, {**inputs, "task_ids": MIXED}), before)
    assert not torch.allclose(output(model, {**inputs, "task_ids": "qnli"}), new)
    with pytest.raises(ConfigError, match="already exists"):
        add_task(model, "rte")


def test_save_and_load_reproduce_logits(arch, tmp_path):
    _, model = adapted(arch, leave_out=[0], non_linearity="relu")
    inputs = {**batch(rows=4), "task_ids": MIXED}
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HYPERFORMER" and saved["tasks"] == TASKS
    keys = load_file(tmp_path / "adapter_model.safetensors")
    first, second = (f"base_model.model.{OUTPUTS[arch][k].format(1)}" for k in (0, 1))
    assert f"{first}.hypernet.task_embeddings.2" in keys and f"{second}.layer_embedding" in keys
    assert not any(k.startswith(second + ".hypernet") for k in keys)  # stored once
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    assert torch.equal(output(loaded, inputs), expected)
    assert loaded.trainable_parameters()[0] == 0


def test_a_saved_added_task_reloads_training_only_that_task(tmp_path):
    _, model = adapted("gpt2")
    add_task(model, "qnli", init="random")
    expected = output(model, {**batch(rows=4), "task_ids": torch.tensor([3, 0, 1, 3])})
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS["gpt2"](), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].new_tasks == ["qnli"]
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "base_model.transformer.h.0.attn.c_proj.hypernet.default.task_embeddings.3"
    ]
    assert torch.equal(output(loaded, {**batch(rows=4), "task_ids": torch.tensor([3, 0, 1, 3])}), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_of_a_mixed_batch_equals_each_task_alone(arch):
    _, model = adapted(arch)
    inputs = batch(rows=4, length=5)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model.generate(**inputs, task_ids=MIXED, **settings)
        no_cache = model.generate(**inputs, task_ids=MIXED, use_cache=False, **settings)
        assert torch.equal(no_cache.sequences, mixed.sequences)
        for task, name in enumerate(TASKS):
            keep = task == MIXED
            alone = model.generate(**rows(inputs, keep), task_ids=name, **settings)
            assert torch.equal(alone.sequences, mixed.sequences[keep])
            for step, scores in enumerate(alone.scores):  # the logits of every step, not just the argmax
                torch.testing.assert_close(scores, mixed.scores[step][keep], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed.scores[0][0], mixed.scores[0][1])
        settings.update(num_beams=2, num_return_sequences=2, output_scores=False)
        beams = model.generate(**inputs, task_ids=MIXED, **settings).sequences
        alone = model.generate(**rows(inputs, MIXED == 1), task_ids="rte", **settings).sequences
        assert torch.equal(beams[4:6], alone)  # row 2 (rte) expands to beam rows 4 and 5


def test_merge_is_a_clear_error_and_disable_gives_the_base_model(arch):
    reference, model = adapted(arch)
    inputs = batch(rows=4)
    expected = output(model, {**inputs, "task_ids": MIXED})
    with pytest.raises(TypeError, match="do not fold into the base weights"):
        model.merge_and_unload()
    assert model.peft_config and len(sites(model)) == 4 and model.merged_adapter is None
    assert torch.equal(output(model, {**inputs, "task_ids": MIXED}), expected)
    with model.disable_adapter():
        assert torch.equal(output(model, inputs), output(reference, inputs))
        # the same batch, task ids included, runs as the base model: its ids are dropped, not passed on
        assert torch.equal(output(model, {**inputs, "task_ids": MIXED}), output(reference, inputs))


def test_two_adapters_switch_and_delete():
    _, model = adapted("llama")
    inputs = {**batch(rows=2), "task_ids": ["a", "b"]}
    model.add_adapter("other", config(tasks=["a", "b"], placement=["attention"]))
    first = output(model, {**inputs, "task_ids": [0, 1]})
    model.set_adapter("other")
    randomize_adapters(model, seed=3, std=0.3)
    other = output(model, inputs)
    assert not torch.allclose(other, first)
    model.set_adapter("default")
    assert torch.equal(output(model, {**inputs, "task_ids": [0, 1]}), first)
    model.delete_adapter("default")
    assert all(layer.adapter_names == ["other"] for layer in sites(model).values())
    assert all(layer._hypernets.keys() == {"other"} for layer in sites(model).values())
    assert torch.equal(output(model, inputs), other)


def test_config_errors():
    for bad in (
        {"tasks": []},
        {"tasks": ["a", "a"]},
        {"tasks": ["a.b"]},
        {"bottleneck_size": 0},
        {"hypernet_hidden": 1.5},
        {"default_task": "cola"},
        {"new_tasks": ["cola"]},
        {"placement": ["mlp"]},
        {"non_linearity": "swishy"},
    ):
        with pytest.raises(ConfigError):
            config(**bad)
    model = dt.wrap(TINY_MODELS["llama"](), dt.LoraConfig(target_modules=["o_proj"]))
    with pytest.raises(ConfigError, match=r"o_proj already carries a \w+; a HyperFormer adapter cannot wrap it"):
        model.add_adapter("hyper", config())
    assert not sites(model) and "hyper" not in model.peft_config


def test_cli_trains_one_data_file_as_the_default_task(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    examples = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in examples))
    out = tmp_path / "run"
    argv = ["train", "--method", "hyperformer", "--tasks", "sst2", "rte", "--default-task", "rte"]
    argv += ["--bottleneck-size", "4", "--hypernet-hidden", "8", "--task-embedding-dim", "4"]
    argv += ["--layer-embedding-dim", "4", "--base", str(tiny_llama_dir), "--data", str(data), "--max-steps", "2"]
    argv += ["--output-dir", str(out), "--max-new-tokens", "3", "--threads", "1"]
    assert main(argv) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HYPERFORMER" and saved["tasks"] == ["sst2", "rte"] and saved["default_task"] == "rte"
