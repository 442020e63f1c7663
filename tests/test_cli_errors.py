"""Bad input to the CLI is one line on stderr and exit code 2, found before the (slow) model load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from conftest import randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.cli import main
from deltatune.data import read_examples


class ModelLoaded(Exception):
    """Raised by the patched loaders: the command loaded model weights before reporting the error."""


def block_model_loads(monkeypatch) -> list[str]:
    """Make every transformers model load fail, and record it: errors must come without one."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(str(args[0]) if args else "")
        raise ModelLoaded("the model weights were loaded before the error was reported")

    for auto in ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", refuse)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def save_adapter(directory: Path) -> Path:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(directory)
    return directory


def prompt_data(path: Path, count: int = 6) -> Path:
    records = [{"instruction": f"Repeat the number {i} three times.", "output": f"{i} {i} {i}"} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def command_line(command: str, base: Path, adapter: Path, tmp_path: Path) -> list[str]:
    common = ["--base", str(base), "--adapter", str(adapter)]
    extra = {
        "eval": ["--data", str(prompt_data(tmp_path / "dev.jsonl"))],
        "generate": ["--prompt", "Repeat 3."],
        "merge": ["--output", str(tmp_path / "merged")],
    }
    return [command, *common, *extra[command]]


def _truncate(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])


def _garble_header(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 40)


def _bad_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')


def _no_weights(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()


def _no_folder(adapter: Path) -> None:
    for item in adapter.iterdir():
        item.unlink()
    adapter.rmdir()


DAMAGE = {
    "truncated weights": (_truncate, "adapter_model.safetensors"),
    "garbled header": (_garble_header, "adapter_model.safetensors"),
    "bad config json": (_bad_config, "adapter_config.json"),
    "no weights file": (_no_weights, "adapter_model.safetensors"),
    "no folder": (_no_folder, "no such directory"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_damaged_adapter_is_one_line_error_before_the_model_loads(
    command, damage, tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    adapter = save_adapter(tmp_path / "adapter")
    spoil, named = DAMAGE[damage]
    spoil(adapter)
    loads = block_model_loads(monkeypatch)
    assert main(command_line(command, tiny_llama_dir, adapter, tmp_path)) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"deltatune {command}: error: ") and named in err and str(adapter) in err
    assert loads == []
    assert not (tmp_path / "merged").exists()


def test_library_load_of_truncated_adapter_names_the_file(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    _truncate(adapter)
    with pytest.raises(dt.ConfigError, match=r"adapter_model\.safetensors") as err:
        dt.DeltaModel.from_pretrained(tiny_llama(), adapter)
    assert str(adapter) in str(err.value) and "save" in str(err.value)


# --- data files that are not UTF-8 text -----------------------------------------------------------
TEXTS = {
    ".jsonl": '{"prompt": "café", "completion": "b"}\n',
    ".json": '[{"prompt": "café", "completion": "b"}]',
    ".csv": "sentence,label\ncafé,1\nbar,0\n",
    ".tsv": "sentence\tlabel\ncafé\t1\nbar\t0\n",
    ".txt": "some café text\n\nmore text\n",
}
ENCODINGS = {
    "utf-16": lambda text: text.encode("utf-16"),  # with a byte-order mark
    "utf-16-le": lambda text: text.encode("utf-16-le"),  # without one: NULs between ASCII letters
    "latin-1": lambda text: text.encode("latin-1"),
    "binary": lambda text: bytes(range(256)) * 4,
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("suffix", sorted(TEXTS))
def test_data_that_is_not_utf8_text_is_a_clear_error(suffix, encoding, tmp_path):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(ENCODINGS[encoding](TEXTS[suffix]))
    task = "classification" if suffix in (".csv", ".tsv") else "causal-lm"
    with pytest.raises(dt.ConfigError, match="is not UTF-8 text") as err:
        read_examples(path, task)
    message = str(err.value)
    assert str(path) in message and "UTF-8" in message and "\n" not in message


def test_utf8_with_byte_order_mark_still_reads(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes("\ufeffsome café text\n".encode())
    assert read_examples(path, "causal-lm")[0].text == "some café text"


def test_train_on_binary_data_is_one_line_error_before_the_model_loads(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_bytes(bytes(range(256)) * 4)
    loads = block_model_loads(monkeypatch)
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert "is not UTF-8 text" in one_line_error(capsys) and loads == []


# --- option and data errors that need no model ----------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-length", "8"], "its prompt alone is"),
        (["--r", "0"], "LoRA rank r must be a positive integer"),
        (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
        (["--method", "bitfit", "--bias", "nope"], "BitFit bias must be one of"),
    ],
)
def test_train_errors_come_before_the_model_loads(options, message, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = prompt_data(tmp_path / "train.jsonl", count=12)
    loads = block_model_loads(monkeypatch)
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "run")]
    assert main([*args, *options]) == 2
    assert message in one_line_error(capsys)
    assert loads == []
    assert not (tmp_path / "run").exists()


def test_eval_prompt_longer_than_max_length_comes_before_the_model_loads(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    adapter = save_adapter(tmp_path / "adapter")
    loads = block_model_loads(monkeypatch)
    args = command_line("eval", tiny_llama_dir, adapter, tmp_path)
    assert main([*args, "--max-length", "8"]) == 2
    assert "its prompt alone is" in one_line_error(capsys) and loads == []


def test_inspect_bad_option_comes_before_the_model_loads(tiny_llama_dir, capsys, monkeypatch):
    loads = block_model_loads(monkeypatch)
    assert main(["inspect", "--base", str(tiny_llama_dir), "--r", "0"]) == 2
    assert "LoRA rank r must be a positive integer" in one_line_error(capsys) and loads == []


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_bad_attention_options_fail_before_the_model_loads(command, tmp_path, monkeypatch, capsys):
    calls = block_model_loads(monkeypatch)
    argv = command_line(command, tmp_path / "base", save_adapter(tmp_path / "adapter"), tmp_path)
    assert main([*argv, "--attention", "sliding_window", "--window", "-3"]) == 2
    assert "--window must be a positive whole number" in one_line_error(capsys) and not calls
