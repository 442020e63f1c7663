"""The HyperFormer hypernetwork (see deltatune.methods.hyperformer): task embeddings and the generator
every adapter site shares, the weights it generates for one call's tasks, and the bottleneck that runs them
(plain linear maps for one task, batched matmuls for a batch that mixes tasks)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

_LN_EPS = 1e-5


class Generated(NamedTuple):
    """One site's adapter for each of U tasks: weights [U, ...] in the hypernetwork's dtype."""

    down_weight: torch.Tensor  # [U, m, d]
    down_bias: torch.Tensor  # [U, m]
    up_weight: torch.Tensor  # [U, d, m]
    up_bias: torch.Tensor  # [U, d]
    gain: torch.Tensor  # [U, d]
    bias: torch.Tensor  # [U, d]


class Selection(NamedTuple):
    """The tasks one call runs: its distinct task indices, and each row's position among them
    (None: every row runs ``tasks[0]``). ``cache``: weights made once per site, kept during generate."""

    tasks: torch.Tensor
    rows: torch.Tensor | None
    cache: dict[int, Generated] | None = None

    def row_index(self, batch: int) -> torch.Tensor | None:
        """Each row's task position; generate() repeats rows (beams, num_return_sequences)."""
        rows = self.rows
        if rows is None or len(rows) == batch:
            return rows
        if batch % len(rows):
            raise ValueError(f"task_ids has {len(rows)} rows but the batch has {batch}")
        return rows.repeat_interleave(batch // len(rows))


class HyperNetwork(nn.Module):
    """Task embeddings and the generator shared by every site."""

    def __init__(self, config: Any, features: int) -> None:  # a HyperAdapterConfig
        super().__init__()
        t, e, h, m, d = (
            config.task_embedding_dim,
            config.layer_embedding_dim,
            config.hypernet_hidden,
            config.bottleneck_size,
            features,
        )
        self.bottleneck, self.features = m, d
        # A list, not a dict keyed by name: task names such as "train" would clash with attributes.
        self.task_embeddings = nn.ParameterList([nn.Parameter(torch.randn(t)) for _ in config.tasks])
        self.projector = nn.Linear(t + e, h)
        self.down = nn.Linear(h, m * d + m)
        self.up = nn.Linear(h, d * m + d)
        self.norm = nn.Linear(h, 2 * d)
        self.act = ACT2FN[config.non_linearity]
        with torch.no_grad():
            # E|I|² ≈ H/6 after the ReLU, so generated entries of D start at about 1/√d.
            nn.init.normal_(self.down.weight, std=(6 / (h * d)) ** 0.5)
            nn.init.zeros_(self.down.bias)
            for head in (self.up, self.norm):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.task_names = list(config.tasks)
        self.default_task: str | None = config.default_task
        self.new_tasks = [self.task_names.index(n) for n in config.new_tasks]

    # --- which task each row runs ---------------------------------------------------------------
    def _describe(self) -> str:
        return ", ".join(f"{i}={name}" for i, name in enumerate(self.task_names))

    def _index(self, task: str | int) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; this adapter's tasks are {self._describe()}")
            return self.task_names.index(task)
        if not 0 <= int(task) < len(self.task_names):
            raise ValueError(f"task id {int(task)} is out of range; this adapter's tasks are {self._describe()}")
        return int(task)

    def default_index(self) -> int:
        if self.default_task is not None:
            return self.task_names.index(self.default_task)
        if len(self.task_names) == 1:
            return 0
        raise ValueError(
            f"this HyperFormer adapter serves several tasks ({self._describe()}): pass task_ids= to the "
            "forward or generate (a LongTensor of task indices or a list of task names, one per row; or "
            "one name for the whole batch), or set default_task in HyperAdapterConfig"
        )

    def select(self, task_ids: Any, cache: bool = False) -> Selection:
        """Resolve ``task_ids`` (None, a name or index, or one per row) for one call."""
        if task_ids is None:
            ids = torch.tensor([self.default_index()])
        elif isinstance(task_ids, (str, int)):
            ids = torch.tensor([self._index(task_ids)])
        elif torch.is_tensor(task_ids):
            if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.numel() == 0:
                raise ValueError(f"task_ids must be a non-empty integer tensor, got {task_ids.dtype} {task_ids}")
            ids = task_ids.reshape(-1).long()
            for bad in (int(ids.min()), int(ids.max())):
                self._index(bad)
        else:
            ids = torch.tensor([self._index(t) for t in task_ids])
            if ids.numel() == 0:
                raise ValueError("task_ids is empty: give one task per row")
        tasks, rows = torch.unique(ids.to(self.projector.weight.device), return_inverse=True)
        return Selection(tasks, rows if len(tasks) > 1 else None, {} if cache else None)

    # --- generating a site's adapter ----------------------------------------------------------
    def generate(self, site: torch.Tensor, selection: Selection) -> Generated:
        """The adapter of site ``site`` (its layer embedding) for each task the call runs."""
        key = id(site)
        if selection.cache is not None and key in selection.cache:
            return selection.cache[key]
        m, d = self.bottleneck, self.features
        z = torch.stack(tuple(self.task_embeddings))[selection.tasks]
        hidden = F.relu(self.projector(torch.cat([z, site.expand(len(z), -1)], dim=-1)))
        down, up = self.down(hidden), self.up(hidden)
        gain, bias = self.norm(hidden).chunk(2, dim=-1)
        out = Generated(
            down[:, : m * d].view(-1, m, d),
            down[:, m * d :],
            up[:, : d * m].view(-1, d, m),
            up[:, d * m :],
            1 + gain,
            bias,
        )
        if selection.cache is not None:
            selection.cache[key] = out
        return out

    # --- adding a task --------------------------------------------------------------------------
    def add_task(self, task: str, init: str) -> int:
        with torch.no_grad():
            old = torch.stack(tuple(self.task_embeddings))
            value = old.mean(0) if init == "mean" else torch.randn_like(old[0])
        self.task_embeddings.append(nn.Parameter(value.clone()))
        self.task_names.append(task)
        self.new_tasks.append(len(self.task_names) - 1)
        return len(self.task_names) - 1


def bottleneck(h: torch.Tensor, w: Generated, rows: torch.Tensor | None, act: nn.Module) -> torch.Tensor:
    """U·act(D·LN(h) + b_D) + b_U: plain linear maps for one task, batched matmuls for a mix."""
    d = h.shape[-1]
    if rows is None:
        x = F.layer_norm(h, (d,), w.gain[0], w.bias[0], _LN_EPS)
        return F.linear(act(F.linear(x, w.down_weight[0], w.down_bias[0])), w.up_weight[0], w.up_bias[0])
    x = F.layer_norm(h.reshape(len(rows), -1, d), (d,), eps=_LN_EPS) * w.gain[rows, None] + w.bias[rows, None]
    z = act(torch.baddbmm(w.down_bias[rows, None], x, w.down_weight[rows].transpose(1, 2)))
    return torch.baddbmm(w.up_bias[rows, None], z, w.up_weight[rows].transpose(1, 2)).reshape(h.shape)
