"""HyperFormer (Mahabadi et al., 2021): one shared hypernetwork writes every adapter, per task.

Instead of a bottleneck adapter per task and layer, a single network generates each adapter's
weights from a learned task embedding and a learned embedding of the adapter's site. Tasks share
what the generator learns; a new task costs one embedding vector.

    task τ ──► z_τ (t)                    site s ──► l_s (e)     one per adapter site: the
         └─────────────── concat ───────────┘                    layer index × position pair
                            │
                    projector: Linear(t+e → H), ReLU              shared by every site and task
                            │ I (H)
          ┌─────────────────┼─────────────────────┐
     down head         up head (zero)        norm head (zero)      linear heads, shared
     D (m×d), b_D      U (d×m), b_U          γ = 1 + g, β (d)
          │                 │                     │
          ▼                 ▼                     ▼
    at each site (where Houlsby adapters sit: attention and feed-forward output projections):

        h = frozen output projection(x)                         (batch rows may mix tasks)
        y = h + U · act(D · LN_γ,β(h) + b_D) + b_U

Choices made here (and why):

* Layer id. Each adapter site has its own embedding l_s, so the generator tells apart the layer
  index *and* the position (attention or feed-forward output) in one table; the paper's separate
  layer and position embeddings are the special case where l_s splits into two shared parts.
  The embedding lives in the site's wrapper, so every adapted module owns checkpoint tensors.
* Layer norm. The generated, task-conditioned LayerNorm normalises the adapter's *input*, as
  the HyperFormer code's ``add_layer_norm_before_adapter``. The paper's output LayerNorm would
  turn the zero up-projection of the start into β (not the identity) and starve U of gradient.
* Near-identity start. The up and norm heads start at zero: U = 0, b_U = 0, γ = 1, β = 0, so the
  model's output equals the base model's exactly until the first step.
* The paper's projector is a two-layer MLP followed by linear heads; its second linear layer is
  folded into the heads here (a linear map followed by a linear map), leaving one hidden size H.

Trainable parameters (T tasks, S sites, hidden size d, bottleneck m)::

    T·t + S·e + (t + e)·H + H + (H + 1)·(2·m·d + m + 3·d)

plus a sequence classifier's head, which ``DeltaModel`` trains for every adapter. After
:func:`add_task` only the new task's t numbers train.

Task ids reach the layers through the ``prepare_inputs``/``generate`` hooks, which resolve them
into a :class:`Selection` kept in the call's own state (deltatune.routing), never on the shared
hypernetwork, so threads may run different tasks through one model at once:
``model(**batch, task_ids=...)`` takes a LongTensor[B] of indices into ``config.tasks``, a list
of task names, or one name or index for the whole batch. Without ``task_ids`` the forward uses
``config.default_task``, or the only task; with several tasks and no default it is an error.
Rows of the same task share generated weights; a mixed batch gathers each row's weights and
runs batched matmuls (no loop over examples). The hypernetwork is a module of the adapter's first
site (its checkpoint keys are ``<first site>.hypernet.*``); the other sites hold a reference.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from deltatune import routing
from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.constants import valid_name
from deltatune.methods.adapter import adapter_targets, check_sites, normalize_sites
from deltatune.methods.base import DeltaLayer, wrap_modules
from deltatune.methods.contract import AdapterHost, Method, register
from deltatune.methods.hypernetwork import HyperNetwork, Selection, bottleneck

_STATE_KEY = "hyperformer"  # with the adapter name: where a call's Selection lives in its state


@method_config
class HyperAdapterConfig(DeltaConfig):
    """The tasks (in order: a task id is an index into ``tasks``) and the hypernetwork's sizes.

    ``default_task`` is the task of forwards that pass no ``task_ids`` (the command line trains
    one data file this way); ``new_tasks`` lists tasks added by :func:`add_task`, which alone
    train. ``placement``/``leave_out``/``target_modules`` choose sites as ``AdapterConfig`` does.
    """

    peft_type = "HYPERFORMER"
    tasks: list[str] = field(default_factory=list)
    """the task names, in order: a task id is an index into this list"""
    task_embedding_dim: int = 64
    """t, the size of each task's learned embedding: what adding a task costs"""
    layer_embedding_dim: int = 64
    """e, the size of each adapter site's learned embedding, which tells the generator the layer and position"""
    bottleneck_size: int = 32
    """m, the hidden width of each generated adapter; the generator's heads grow with m × the model width"""
    hypernet_hidden: int = 128
    """H, the hypernetwork projector's hidden width; every head reads it, so parameters grow with H"""
    non_linearity: str = "gelu"
    """activation inside the generated adapters: a transformers ACT2FN name (gelu, relu, silu...)"""
    placement: tuple[str, ...] | list[str] = ("attention", "ffn")
    """where the generated adapters go: after the attention output, the feed-forward output, or both (as for the
    adapter method)"""
    leave_out: list[int] = field(default_factory=list)
    """layer indices that get no adapter"""
    default_task: str | None = None
    """the task of forwards that pass no task_ids (the command line trains one data file this way)"""
    new_tasks: list[str] = field(default_factory=list)
    """tasks added by add_task, which alone train"""

    def __post_init__(self) -> None:
        self.tasks = [self.tasks] if isinstance(self.tasks, str) else list(self.tasks)
        self.new_tasks = [self.new_tasks] if isinstance(self.new_tasks, str) else list(self.new_tasks)
        normalize_sites(self)
        super().__post_init__()

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks is empty: name the tasks this adapter serves, e.g. tasks=['sst2', 'rte']")
        for task in self.tasks:
            _check_task_name(task, [])
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be distinct, got {self.tasks}")
        for option in ("task_embedding_dim", "layer_embedding_dim", "bottleneck_size", "hypernet_hidden"):
            value = getattr(self, option)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{option} must be a positive integer, got {value!r}")
        if self.non_linearity not in ACT2FN:
            raise ConfigError(f"non_linearity {self.non_linearity!r} is unknown; choose one of: {', '.join(ACT2FN)}")
        check_sites(self)
        if self.default_task is not None and self.default_task not in self.tasks:
            raise ConfigError(f"default_task {self.default_task!r} is not one of tasks {self.tasks}")
        if set(self.new_tasks) - set(self.tasks):
            raise ConfigError(f"new_tasks {self.new_tasks} must be among tasks {self.tasks}")


def _check_task_name(task: Any, existing: list[str]) -> None:
    if not valid_name(task):
        raise ConfigError(f"task name {task!r} must be letters, digits, '_' or '-'")
    if task in existing:
        raise ConfigError(f"task {task!r} already exists; tasks: {', '.join(existing)}")


class HyperAdapterLayer(DeltaLayer):
    """A frozen output projection followed by the adapter the hypernetwork generates for it."""

    # layer_embedding first: every site has one (adapter_active() and adapter_names look there).
    adapter_attrs = ("layer_embedding", "hypernet")
    adapter_values = ("_hypernets",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight  # Conv1D stores in×out, nn.Linear out×in
        self.features = weight.shape[1] if isinstance(base_layer, Conv1D) else weight.shape[0]
        self.layer_embedding = nn.ParameterDict()
        self.hypernet = nn.ModuleDict()  # only at the adapter's first site
        self._hypernets: dict[str, HyperNetwork] = {}  # not registered: one copy in state_dict

    def add(self, name: str, embedding_dim: int, net: HyperNetwork, owner: bool) -> None:
        device = self.base_layer.weight.device
        self.layer_embedding[name] = nn.Parameter(torch.randn(embedding_dim, device=device))
        if owner:
            self.hypernet[name] = net.to(device)
        self._hypernets[name] = net

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What trains: everything, or after :func:`add_task` only the new tasks' embeddings."""
        net = self._hypernets.get(name)
        if net is None or not net.new_tasks:
            return super().adapter_parameters(name)
        return [net.task_embeddings[i] for i in net.new_tasks] if name in self.hypernet else []

    def parameters_by_adapter(self) -> dict[str, list[nn.Parameter]]:
        return {name: self.adapter_parameters(name) for name in self.adapter_names}

    def delta(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The bottleneck the hypernetwork generates for this call's tasks, on the base output ``h``."""
        net = self._hypernets[name]
        selection = _selection(net, name)
        weights = net.generate(self.layer_embedding[name], selection)
        return bottleneck(h.to(weights.down_weight.dtype), weights, selection.row_index(h.shape[0]), net.act)


def _selection(net: HyperNetwork, adapter_name: str) -> Selection:
    """The tasks this call runs: chosen by the call's ``prepare_inputs``/``generate`` hook, else the default
    task (kept in the call's state, so every site of one forward shares it)."""
    state = routing.state()
    if state is None:  # a bare forward of the base model, outside any DeltaModel call
        return net.select(None)
    key = (_STATE_KEY, adapter_name)
    if key not in state:
        state[key] = net.select(None)
    return state[key]


# --- the method's functions (see deltatune.methods) ----------------------------------------------
def inject(model: nn.Module, adapter_name: str, config: HyperAdapterConfig) -> list[str]:
    """Wrap the Houlsby adapter sites and give them one shared hypernetwork; return their names."""
    names = adapter_targets(model, config)
    layers = list(wrap_modules(model, dict.fromkeys(names, HyperAdapterLayer), who="a HyperFormer adapter").values())
    widths = {layer.features for layer in layers}
    if len(widths) > 1:
        raise ConfigError(f"one hypernetwork needs sites of one width; the targeted modules output {sorted(widths)}")
    net = HyperNetwork(config, widths.pop())
    for i, layer in enumerate(layers):
        layer.add(adapter_name, config.layer_embedding_dim, net, owner=i == 0)
    if config.new_tasks:  # a saved adapter after add_task: only the new embeddings train
        _freeze(layers, adapter_name)
    return names


def _freeze(layers: list[DeltaLayer], adapter_name: str) -> None:
    for layer in layers:
        for p in DeltaLayer.adapter_parameters(layer, adapter_name):
            p.requires_grad_(False)


def _hypernet(host: AdapterHost, adapter_name: str) -> HyperNetwork:
    for _, layer in host.delta_layers():
        if isinstance(layer, HyperAdapterLayer) and adapter_name in layer.hypernet:
            return layer.hypernet[adapter_name]
    raise KeyError(f"adapter {adapter_name!r} is not a HyperFormer adapter")


# Forward arguments that belong to this method: dropped, not passed on, while adapters are disabled.
INPUT_KEYS = ("task_ids",)


def _call_state() -> dict[Any, Any]:
    state = routing.state()
    if state is None:
        raise RuntimeError(
            "HyperFormer's task_ids belong to one call: run prepare_inputs and the base model's forward inside "
            "`with delta_model.call_scope():` (DeltaModel's forward and generate open it themselves)"
        )
    return state


def prepare_inputs(
    host: AdapterHost, adapter_name: str, kwargs: dict[str, Any], generating: bool = False
) -> dict[str, Any]:
    """Take ``task_ids`` out of the forward's arguments; the call's layers read them from its state."""
    selection = _hypernet(host, adapter_name).select(kwargs.pop("task_ids", None))
    _call_state()[(_STATE_KEY, adapter_name)] = selection
    return kwargs


def generate(host: AdapterHost, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """The base model's generate with ``task_ids`` per row; each site's weights are made once per call."""
    selection = _hypernet(host, adapter_name).select(kwargs.pop("task_ids", None), cache=True)
    _call_state()[(_STATE_KEY, adapter_name)] = selection
    return host.base_model.generate(*args, **kwargs)


def add_task(delta_model: AdapterHost, task: str, adapter_name: str | None = None, init: str = "mean") -> int:
    """Append task ``task`` to a trained HyperFormer adapter and return its id.

    Its embedding starts at the mean of the existing ones (``init="random"``: normal noise), and
    everything else of the adapter (the hypernetwork, layer embeddings, older tasks, a classifier
    head) is frozen, so training changes only the new embedding and older tasks keep their exact
    outputs. ``config.new_tasks`` records this, so a saved and reloaded adapter trains the same
    way. (A later ``set_adapter`` makes ``modules_to_save`` copies trainable again.)
    """
    adapter_name = adapter_name or delta_model.active_adapter
    delta_model.check_adapter(adapter_name)
    config = delta_model.peft_config[adapter_name]
    if not isinstance(config, HyperAdapterConfig):
        raise TypeError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a HyperFormer adapter")
    _check_task_name(task, config.tasks)
    if init not in ("mean", "random"):
        raise ValueError(f"init must be 'mean' or 'random', got {init!r}")
    net = _hypernet(delta_model, adapter_name)
    _freeze([layer for _, layer in delta_model.delta_layers()], adapter_name)
    index = net.add_task(task, init)
    config.tasks.append(task)
    config.new_tasks.append(task)
    trains = adapter_name == delta_model.active_adapter and not config.inference_mode
    net.task_embeddings[index].requires_grad_(trains)
    return index


register(
    Method(
        "hyperformer",
        HyperAdapterConfig,
        inject,
        (HyperAdapterLayer,),
        prepare_inputs=prepare_inputs,
        generate=generate,
        input_keys=INPUT_KEYS,
        task_option="tasks",
        compilable=False,
        not_compilable_because="its layers read each row's task from the call's context variable, which "
        "torch.compile cannot trace (a graph break in every layer)",
    )
)
