"""deltatune generate over a file of prompts: batches equal one-at-a-time greedy decoding, sampling repeats
with a seed, stop strings cut completions, the chat template unless --raw, and the output written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import block_model_loads, one_line_error

import deltatune as dt
from deltatune.cli import main
from deltatune.data import Example
from deltatune.generation import Decoding, _cut, generate_batches

PROMPTS = ["Repeat 3.", "Say hello to the world, please.", "Count: one two", "x"]


@pytest.fixture
def llama(tiny_llama_dir):
    """The tiny Llama with its projections scaled up, so that its outputs depend on the whole context (padding
    seen by mistake changes them)."""
    model, tokenizer = dt.load_base(str(tiny_llama_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name:
                parameter.mul_(8)
    return model, tokenizer


def examples(prompts=PROMPTS):
    return [Example(prompt=p, target=None) for p in prompts]


def test_batched_greedy_equals_one_at_a_time(llama):
    model, tokenizer = llama
    decoding = Decoding(max_new_tokens=8)
    batched = generate_batches(model, tokenizer, examples(), decoding, batch_size=4).texts
    alone = [generate_batches(model, tokenizer, examples([p]), decoding).texts[0] for p in PROMPTS]
    assert batched == alone
    # and one at a time is transformers' own greedy decoding of the chat-templated prompt
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert alone[1] == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def test_sampling_repeats_with_a_seed(llama):
    model, tokenizer = llama
    sample = Decoding(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generate_batches(model, tokenizer, examples(), sample, batch_size=2)
    again = generate_batches(model, tokenizer, examples(), sample, batch_size=2)
    other = generate_batches(model, tokenizer, examples(), Decoding(10, temperature=1.5, seed=8), batch_size=2)
    assert first.texts == again.texts and first.texts != other.texts
    greedy = generate_batches(model, tokenizer, examples(), Decoding(max_new_tokens=10), batch_size=2)
    assert first.texts != greedy.texts
    assert 0 < first.new_tokens <= 10 * len(PROMPTS)


def test_stop_strings_cut_at_the_first():
    assert _cut("a b STOP c END", ("END", "STOP")) == "a b "
    assert _cut("nothing", ("END",)) == "nothing"


def test_cli_generates_a_file_in_batches(tiny_llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": i, "prompt": p}) for i, p in enumerate(PROMPTS[:3])]
    lines.append(json.dumps({"id": 3, "messages": [{"role": "user", "content": PROMPTS[3]}]}))
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    base = ["generate", "--base", str(tiny_llama_dir), "--max-new-tokens", "6"]
    assert main([*base, "--input", str(prompts), "--output", str(out), "--batch-size", "3"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    model, tokenizer = dt.load_base(str(tiny_llama_dir))
    expected = generate_batches(model, tokenizer, examples(), Decoding(max_new_tokens=6)).texts
    assert [r["completion"] for r in written] == expected
    # --raw: the prompt text as it is, without the chat template
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    assert main([*base, "--input", str(txt), "--output", str(out), "--raw"]) == 0
    raw = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert raw[0] == tokenizer.decode(greedy[0, len(ids) :], skip_special_tokens=True).strip()
    assert len(raw) == 2 and raw[0] != expected[0]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("", [], "holds no prompts"),
        ('{"text": "x"}\n', [], "give a 'prompt' string or a 'messages' list"),
        ("not json\n", [], "not JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["--raw"], "--raw takes text prompts"),
        ('"ok"\n', ["--temperature", "1", "--num-beams", "2"], "do not mix"),
        ('"ok"\n', ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ],
)
def test_bad_input_fails_before_the_model_loads(content, extra, message, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    loads = block_model_loads(monkeypatch)
    argv = ["generate", "--base", str(tmp_path), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, *extra]) == 2
    assert message in one_line_error(capsys) and loads == []
    assert not (tmp_path / "o.jsonl").exists()
