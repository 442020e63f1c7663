"""The adapters a server can serve (on disk) and those loaded now (at most ``max_loaded``, LRU).

Only the engine's worker thread changes the model (between decoding steps), so a load happens
once however many requests ask for it, and never while a step runs. The HTTP side only reads
:attr:`Adapters.servable`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from torch import nn

from deltatune.adapter_names import RESERVED, name_problem
from deltatune.config import DeltaConfig
from deltatune.methods import method_for
from deltatune.mixed import mixable
from deltatune.model import DeltaModel
from deltatune.serving.mixes import build
from deltatune.serving.slots import SlotTable

__all__ = ["RESERVED", "Adapters", "check_mixable", "found_adapters", "locate", "name_problem"]

log = logging.getLogger("deltatune.serve")


def locate(directory: Path, relative: str) -> Path:
    """``relative`` under ``directory``, resolved (symlinks followed), the one rule every way in
    uses (the start-up scan, ``POST /v1/adapters``, a request naming an adapter added since):
    ValueError when it leaves the directory or holds no adapter."""
    if "\x00" in relative:
        raise ValueError(f"path {relative!r} contains a NUL byte")
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ValueError(f"path {relative!r} leaves the adapters directory")
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"no adapter_config.json in {relative!r}")
    return path


def found_adapters(directory: Path) -> list[tuple[str, Path]]:
    """``directory`` itself if it holds an adapter, else each sub-directory that does (resolved;
    one that leaves ``directory`` through a symlink is left out, said in the log)."""
    if (directory / "adapter_config.json").is_file():
        return [(directory.name, directory.resolve())]
    found = []
    for entry in sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file()):
        try:
            found.append((entry.name, locate(directory, entry.name)))
        except ValueError as err:
            log.warning("not serving %s: %s", entry, err)
    return found


def same_shapes(model: DeltaModel, loaded: str, config: DeltaConfig) -> bool:
    """Whether an adapter of ``config`` has the tensors' shapes of the ``loaded`` one at every module it has
    (the modules themselves are checked against the checkpoint's keys by the swap)."""
    old = model.peft_config[loaded]
    if getattr(config, "use_dora", False) or getattr(old, "use_dora", False):
        return False
    if config.modules_to_save or old.modules_to_save or not hasattr(config, "rank_and_alpha"):
        return False
    for name, layer in model.delta_layers():
        held = layer.adapter_parameters(loaded)
        if held and (len(held) != 2 or held[0].shape[0] != config.rank_and_alpha(name)[0]):
            return False
    return True


def check_mixable(path: Path | DeltaConfig) -> DeltaConfig:
    """The adapter's config (read from ``path``, or as given), if its method can share a batch with others."""
    config = path if isinstance(path, DeltaConfig) else DeltaConfig.load(path)
    if not method_for(config).mixable:
        raise ValueError(
            f"a {config.peft_type} adapter cannot share batches with others; the server takes "
            f"{', '.join(sorted(mixable()))}"
        )
    return config


class Adapters:
    """Servable adapters by name (their paths), and the loaded ones in least-recently-used order."""

    def __init__(
        self,
        base_model: nn.Module,
        base_name: str,
        directory: Path | None,
        max_loaded: int | None,
        slots: SlotTable | None = None,
    ) -> None:
        self.base_model, self.base_name, self.directory = base_model, base_name, directory
        self.max_loaded, self.slots = max_loaded, slots
        self.model = DeltaModel(base_model)  # no adapter yet; the one model for the server's life, even with none
        self.paths: dict[str, Path] = {}
        self.recent: OrderedDict[str, None] = OrderedDict()  # loaded, least recently used first
        self.deleted: set[str] = set()  # deleted through the API: not found on disk again until re-added
        self.loads = self.evictions = 0  # so far, for the metrics
        if directory is not None:
            for name, path in found_adapters(directory):
                self._add_found(name, path)

    @property
    def servable(self) -> list[str]:
        return list(self.paths)

    @property
    def loaded(self) -> list[str]:
        return list(self.recent)

    def find(self, name: str) -> bool:
        """Whether ``name`` can be served; a folder added to the directory since start counts."""
        if name in self.paths:
            return True
        if self.directory is None or name in self.deleted or name_problem(name, self.base_name) is not None:
            return False
        try:
            path = locate(self.directory, name)
        except ValueError:
            return False
        return self._add_found(name, path)

    def _add_found(self, name: str, path: Path) -> bool:
        """Serve an adapter found on disk, unless its name or method cannot be (said in the log)."""
        problem = name_problem(name, self.base_name)
        if problem is None:
            try:
                check_mixable(path)
            except Exception as err:  # an unreadable config, or a method that cannot mix
                problem = str(err)
        if problem is not None:
            log.warning("not serving %s: %s", path, problem)
            return False
        self.paths[name] = path
        return True

    def register(self, name: str, path: Path) -> None:
        check_mixable(path)
        self.paths[name] = path
        self.deleted.discard(name)

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Make ``name`` loaded (evicting the least recently used idle adapter if full); False
        when every loaded adapter is in use and none may be evicted yet."""
        if name in self.recent:
            self.recent.move_to_end(name)
            return True
        path = self.paths[name]
        config = check_mixable(path)  # the one read of its adapter_config.json for this load
        if self._full():
            victim = self._idle(busy)
            if victim is None:
                return False
            if self._swap_into(victim, name, path, config):
                return True
            self._evict(victim)
        self._load(name, path, config)
        return True

    def _full(self) -> bool:
        return self.max_loaded is not None and len(self.recent) >= self.max_loaded

    def _idle(self, busy: set[str]) -> str | None:
        """The least recently used loaded adapter no row is using."""
        return next((n for n in self.recent if n not in busy), None)

    def _evict(self, name: str) -> None:
        self.unload(name)
        self.evictions += 1

    def _swap_into(self, victim: str, name: str, path: Path, config: DeltaConfig) -> bool:
        """Load ``name`` into the tensors of ``victim``, which is evicted for it: its method's in-place swap
        (deltatune.hotswap), then a rename. Making and dropping every layer's modules is most of an ordinary
        load's time. False unless the two are LoRA adapters of the same shapes (the same modules at the same
        ranks, neither DoRA nor with modules_to_save), or when the swap fails: the caller then evicts the victim
        (its tensors may be half overwritten) and loads ``name`` afresh."""
        old = self.model.peft_config[victim]
        method = method_for(config)
        if method.hotswap is None or method_for(old) is not method or not same_shapes(self.model, victim, config):
            return False
        try:
            method.hotswap.swap(self.model, victim, path, config)
        except Exception as err:  # the checkpoint's modules differ (ConfigError), or the file is unreadable
            log.info("loading adapter %s afresh: %s", name, err)
            return False
        if self.slots is not None:
            self.slots.reset(victim)
        self.model.rename_adapter(victim, name)
        del self.recent[victim]
        self.evictions += 1
        self._write_slot(name)
        self.recent[name] = None
        self.loads += 1
        log.info("loaded adapter %s from %s into %s's tensors", name, path, victim)
        return True

    def _make_room(self, busy: set[str]) -> bool:
        """Evict the least recently used idle adapter if every slot is taken; False if none can go."""
        if not self._full():
            return True
        idle = self._idle(busy)
        if idle is None:
            return False
        self._evict(idle)
        return True

    def ensure_mix(self, name: str, spec: dict, busy: set[str]) -> bool:
        """Make the mix ``name`` loaded: its parts first, then their combination (serving/mixes.py);
        False while the slots it needs are all in use."""
        if name in self.recent:
            self.recent.move_to_end(name)
            return True
        parts = list(spec["ids"])
        if self.max_loaded is not None and len(parts) >= self.max_loaded:
            raise ValueError(
                f"a mix of {len(parts)} adapters needs {len(parts) + 1} slots; the server has "
                f"--max-loaded-adapters {self.max_loaded}"
            )
        for part in parts:
            if not self.ensure(part, busy | set(parts)):
                return False
        if not self._make_room(busy | set(parts)):
            return False
        build(self.model, name, spec)
        self._write_slot(name)
        self.recent[name] = None
        self.loads += 1
        log.info("mixed adapter %s from %s", name, spec)
        return True

    def _load(self, name: str, path: Path, config: DeltaConfig) -> None:
        self.model.load_adapter(path, name, config=config)  # a load that fails leaves the model as it was
        self._write_slot(name)
        self.recent[name] = None
        self.loads += 1
        log.info("loaded adapter %s from %s", name, path)

    def _write_slot(self, name: str) -> None:
        """Copy a loaded adapter into its slot; one the slots cannot hold is taken out again."""
        if self.slots is None:
            return
        try:
            self.slots.write(self.model, name)
        except Exception:
            self._remove(name)
            raise

    def unload(self, name: str) -> None:
        if name not in self.recent:
            return
        del self.recent[name]
        self._remove(name)

    def _remove(self, name: str) -> None:
        if self.slots is not None:
            self.slots.reset(name)
        self.model.delete_adapter(name)  # the last one gone, the model holds none and runs the plain base
        if self.slots is not None:
            self.slots.sync(self.model)  # layers unwrapped with it drop their tables
        log.info("unloaded adapter %s", name)

    def forget(self, name: str, deleted: bool = False) -> None:
        """No longer serve ``name`` (and unload it); ``deleted`` (through the API): not even when
        a request names it and its folder is still on disk, until it is added again."""
        self.paths.pop(name, None)
        if deleted:
            self.deleted.add(name)
        self.unload(name)
