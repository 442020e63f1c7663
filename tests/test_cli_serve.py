"""``deltatune serve``'s flags and checks come from ServeConfig; bad values fail before any model loads, naming
the flag and the fix."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune.cli import main
from deltatune.cli.serve import serve_config, serve_parser
from deltatune.config import ConfigError
from deltatune.serving.config import ServeConfig


def test_every_serve_config_field_is_a_flag_and_back():
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    flags = {a.dest for a in serve_parser()._actions if a.dest != "help"}
    assert flags == fields
    config = serve_config(["--max-batch", "3", "--prefill-chunk", "64", "--max-loaded-adapters", "2"])
    assert (config.max_batch, config.prefill_chunk, config.max_loaded_adapters) == (3, 64, 2)
    defaults = serve_config([])
    assert config.max_queue == 256 and config.port == 8000 and defaults.prefill_chunk == 512  # unset: the defaults


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("DELTATUNE_API_KEY", "from-env")
    assert serve_config([]).api_key == "from-env"
    assert serve_config(["--api-key", "given"]).api_key == "given"
    monkeypatch.delenv("DELTATUNE_API_KEY")
    assert serve_config([]).api_key is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--prefill-chunk", "-4"], "--prefill-chunk must be at least 1, got -4"),
        (["--max-streams-per-key", "0"], "--max-streams-per-key must be at least 1"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--drain-timeout", "-1"], "--drain-timeout must be 0 or more"),
        (["--quantize", "int4"], "--quantize must be one of int8, nf4, gguf"),
        (["--max-lora-rank", "8"], "--max-lora-rank sizes the adapter slots: give --max-loaded-adapters"),
        (["--adapters", "/no/such/folder"], "--adapters /no/such/folder is not a directory"),
    ],
)
def test_bad_values_name_the_flag_before_a_model_loads(argv, message, capsys):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**vars(serve_parser().parse_args(argv)))
    assert main(["serve", *argv]) == 2  # a model load would take seconds and print nothing of this
    assert f"deltatune serve: error: {message}" in capsys.readouterr().err
