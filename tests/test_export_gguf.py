"""deltatune export --format gguf: LoRA adapters in llama.cpp's adapter layout and merged models, read back with
gguf's own reader; the q/k row order checked against the real SmolLM2 GGUF that llama.cpp runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from test_cli_errors import block_model_loads, one_line_error

import deltatune as dt
from deltatune.cli import main

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
LAYERS, HEADS, KV_HEADS = 2, 4, 2
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of a query/key projection's rows, written out: in each head, HF's rotate-half pairs
    (i, i + d/2) become neighbours (2i, 2i + 1)."""
    out = torch.empty_like(weight)
    dim = weight.shape[0] // heads
    for h in range(heads):
        for i in range(dim // 2):
            out[h * dim + 2 * i] = weight[h * dim + i]
            out[h * dim + 2 * i + 1] = weight[h * dim + dim // 2 + i]
    return out


def save_lora(directory: Path, base_dir: Path, **options) -> Path:
    base, _ = dt.load_base(str(base_dir))
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=list(GGUF_NAMES), **options)
    model = dt.wrap(base, config)
    randomize_adapters(model, std=0.2)
    model.save_pretrained(directory)
    return directory


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def deltas(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted weight, by merging in deltatune (another computation than the export's)."""
    base, _ = dt.load_base(str(base_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = dt.DeltaModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    return {k: merged[k] - before[k] for k in before if not torch.equal(merged[k], before[k])}


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "alpha_pattern": {"v_proj": 2.0}}])
def test_lora_adapter_reads_back_in_llama_cpp_layout(options, tiny_llama_dir, tmp_path):
    adapter = save_lora(tmp_path / "lora", tiny_llama_dir, **options)
    out = tmp_path / "adapter.gguf"
    assert main(["export", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    meta = fields(reader)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    expected = {f"blk.{i}.{g}.weight.lora_{p}" for i in range(LAYERS) for g in GGUF_NAMES.values() for p in "ab"}
    assert set(tensors) == expected
    for name, delta in deltas(tiny_llama_dir, adapter).items():
        layer, module = int(name.split(".")[2]), name.split(".")[-2]
        a = tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_a"]
        b = tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_b"]
        assert list(a.shape) == [delta.shape[1], 4] and list(b.shape) == [4, delta.shape[0]]  # ggml's ne order
        # llama.cpp applies (alpha / rank) · B A to the weight with its rows in llama.cpp's order
        product = torch.from_numpy(np.array(b.data)) @ torch.from_numpy(np.array(a.data)) * (8.0 / 4)
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(module)
        wanted = llama_cpp_rows(delta, heads) if heads else delta
        torch.testing.assert_close(product, wanted, rtol=1e-5, atol=1e-6)


def template_gguf(path: Path, base_dir: Path) -> Path:
    """A GGUF of the tiny base as llama.cpp's converter would lay it out (metadata, permuted q/k), plus a
    tensor with no Hugging Face twin."""
    base, _ = dt.load_base(str(base_dir))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    for key, value in base.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name and name != "output.weight":
            heads = HEADS if "q_proj" in key else KV_HEADS if "k_proj" in key else None
            writer.add_tensor(name, (llama_cpp_rows(value, heads) if heads else value).numpy())
    writer.add_tensor("rope_freqs.weight", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-6), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_merged_model_reads_back(outtype, tolerance, tiny_llama_dir, tmp_path):
    adapter = save_lora(tmp_path / "lora", tiny_llama_dir)
    template = template_gguf(tmp_path / "base.gguf", tiny_llama_dir)
    out = tmp_path / "merged.gguf"
    argv = ["export", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--merged", "--output", str(out)]
    assert main([*argv, "--base-gguf", str(template), "--outtype", outtype]) == 0
    reader, source = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(template))
    meta = fields(reader)
    assert meta["llama.attention.head_count"] == HEADS and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert [t.name for t in reader.tensors] == [t.name for t in source.tensors]
    base, _ = dt.load_base(str(tiny_llama_dir))
    merged = dt.DeltaModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    tensors = {t.name: t for t in reader.tensors}
    for layer in range(LAYERS):
        for module, name in GGUF_NAMES.items():
            weight = merged[f"model.layers.{layer}.self_attn.{module}.weight"]
            heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(module)
            wanted = llama_cpp_rows(weight, heads) if heads else weight
            t = tensors[f"blk.{layer}.{name}.weight"]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(wanted.shape).copy())
            torch.testing.assert_close(got.float(), wanted, rtol=tolerance, atol=tolerance)
    assert np.array_equal(tensors["rope_freqs.weight"].data, np.arange(4, dtype=np.float32))


@pytest.mark.real_model
def test_query_rows_match_the_real_smollm2_gguf():
    """The dense SmolLM2 transformers dequantized from its GGUF, permuted our way, is that GGUF's tensor."""
    from safetensors.torch import load_file

    from deltatune.export.gguf import NameMap, base_config, base_gguf
    from deltatune.loading.base_models import BUILTIN_MODELS, _dense_smollm2, resolve_model_dir

    directory = _dense_smollm2(resolve_model_dir("smollm2-135m")[0], BUILTIN_MODELS["smollm2-135m"])
    dense = {}
    for file in sorted(directory.glob("*.safetensors")):
        dense |= load_file(str(file))
    names = NameMap(base_config("smollm2-135m"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(base_gguf("smollm2-135m"))).tensors}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        t = tensors[names.name(key)]
        ours = names.rows(key, dense[key].float())
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape).copy())
        torch.testing.assert_close(got, ours, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(got, dense[key].float(), atol=1e-3)  # the permutation is not the identity


def test_bad_exports_fail_before_the_model_loads(tiny_llama_dir, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    adapter = save_lora(tmp_path / "lora", tiny_llama_dir)
    dora = save_lora(tmp_path / "dora", tiny_llama_dir, use_dora=True)
    capsys.readouterr()
    loads = block_model_loads(monkeypatch)
    x, bin_file = str(tmp_path / "x.gguf"), str(tmp_path / "x.bin")
    cases = [
        (["--adapter", str(dora), "--output", x], "llama.cpp has no DoRA"),
        (["--adapter", str(adapter), "--output", bin_file], "name the file *.gguf"),
        (["--adapter", str(adapter), "--output", x, "--outtype", "q8_0"], "choose one of f32, f16"),
        (["--adapter", str(adapter), "--output", x, "--merged"], "give --base-gguf FILE"),
        (["--output", x], "--adapter is needed"),
    ]
    for extra, message in cases:
        assert main(["export", "--base", str(tiny_llama_dir), *extra]) == 2
        assert message in one_line_error(capsys)
    assert main(["export", "--base", str(tiny_bert_dir), "--adapter", str(adapter), "--output", x]) == 2
    assert "GGUF export knows the model types" in one_line_error(capsys)
    assert loads == [] and not list(tmp_path.glob("*.gguf")) and not Path(bin_file).exists()


# llama.cpp's greedy tokens and their log-probabilities, run by xllamacpp (prebuilt wheels on PyPI) or else by
# llama-cpp-python (tokens only). argv = model path, lora path ("" for none), prompt token ids (JSON), count.
# xllamacpp runs with an f32 KV cache and flash attention off, so that llama.cpp computes in f32 as torch does.
LLAMA_CPP_SCRIPT = """
import importlib.util, json, sys
model, lora, ids, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if importlib.util.find_spec("xllamacpp") is not None:
    import xllamacpp as xlc
    params = xlc.CommonParams()
    params.model.path = model
    params.n_ctx, params.n_parallel = 128, 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if lora:
        adapter = xlc.CommonAdapterLoraInfo()
        adapter.path, adapter.scale = lora, 1.0
        params.lora_adapters = [adapter]
    request = {"prompt": ids, "max_tokens": count, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
               "n_probs": 1, "cache_prompt": False}
    steps = xlc.Server(params).handle_completions(request)["choices"][0]["logprobs"]["content"]
    out = {"tokens": [s["id"] for s in steps], "logprobs": [s["logprob"] for s in steps],
           "runner": "xllamacpp " + xlc.__version__}
else:
    import llama_cpp
    options = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(model, n_ctx=128, n_threads=2, verbose=False, **options)
    tokens = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == count:
            break
    out = {"tokens": tokens, "logprobs": None, "runner": "llama-cpp-python " + llama_cpp.__version__}
print(json.dumps(out))
"""
RUNNERS = "import importlib.util as u; print(any(u.find_spec(m) for m in ('xllamacpp', 'llama_cpp')))"


def llama_cpp_python() -> str:
    """A Python that imports xllamacpp or llama_cpp: $DELTATUNE_LLAMA_CPP_PYTHON (either in a virtual environment
    of its own, e.g. /tmp/xl/bin/python), else this one if it has either; the test skips otherwise."""
    import os
    import subprocess
    import sys

    python = os.environ.get("DELTATUNE_LLAMA_CPP_PYTHON") or sys.executable
    try:
        done = subprocess.run([python, "-c", RUNNERS], capture_output=True, text=True, timeout=120)
    except OSError as error:
        pytest.skip(f"DELTATUNE_LLAMA_CPP_PYTHON={python} does not run: {error}")
    if done.returncode != 0 or done.stdout.strip() != "True":
        where = "$DELTATUNE_LLAMA_CPP_PYTHON" if os.environ.get("DELTATUNE_LLAMA_CPP_PYTHON") else "this Python"
        pytest.skip(
            f"{where} ({python}) imports neither xllamacpp nor llama_cpp: set DELTATUNE_LLAMA_CPP_PYTHON to a Python "
            "that has one (pip install xllamacpp, prebuilt CPU wheels; docs/export.md)"
        )
    return python


@pytest.mark.real_model
@pytest.mark.slow
def test_llama_cpp_runs_our_adapter_like_deltatune(tmp_path):
    """Opt-in (xllamacpp or llama-cpp-python): the base as an f32 GGUF plus our adapter GGUF, in llama.cpp, gives
    deltatune's greedy tokens, and (xllamacpp) their log-probabilities within f32 kernel noise; so does our merged
    f32 GGUF. The adapter moves the tokens from the second one on, so a wrong layout or scale cannot pass
    (results: docs/export.md)."""
    import json
    import subprocess

    from deltatune.export import export_lora, export_merged

    python, count = llama_cpp_python(), 16
    base, tokenizer = dt.load_base("smollm2-135m")
    model = dt.wrap(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_adapters(model, seed=3, std=0.1)
    model.save_pretrained(tmp_path / "lora")
    ids = tokenizer("The capital of France is a city where")["input_ids"]

    def ours(m) -> tuple[list[int], list[float]]:
        with torch.no_grad():
            greedy = {"max_new_tokens": count, "do_sample": False}
            out = m.generate(torch.tensor([ids]), output_scores=True, return_dict_in_generate=True, **greedy)
        tokens = out.sequences[0, len(ids) :].tolist()
        return tokens, [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)]

    def llama(path: Path, lora: Path | None = None) -> dict:
        argv = [python, "-c", LLAMA_CPP_SCRIPT, str(path), str(lora or ""), json.dumps(ids), str(count)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def check(run: dict, tokens: list[int], logprobs: list[float]) -> None:
        assert run["tokens"] == tokens, run["runner"]
        if run["logprobs"] is not None:
            assert run["logprobs"] == pytest.approx(logprobs, abs=1e-3), run["runner"]

    adapted = ours(model)
    with model.disable_adapter():
        plain = ours(model)
    assert adapted[0][0] == plain[0][0] and adapted[0][1] != plain[0][1]  # the adapter changes the 2nd token on
    export_merged("smollm2-135m", None, tmp_path / "base.gguf", "f32")
    export_lora("smollm2-135m", tmp_path / "lora", tmp_path / "lora.gguf")
    export_merged("smollm2-135m", tmp_path / "lora", tmp_path / "merged.gguf", "f32")
    check(llama(tmp_path / "base.gguf"), *plain)
    check(llama(tmp_path / "base.gguf", tmp_path / "lora.gguf"), *adapted)
    check(llama(tmp_path / "merged.gguf"), *adapted)
