"""`deltatune analyze` and `deltatune sweep`: φ against definitions computed another way, the amplification
factor against a hand result, deltas of LoRA/BitFit/partial/merged adapters, refusals, CLI round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.analysis import analyze_delta, analyze_subspace, delta_stats, phi_matrix
from deltatune.cli import main
from deltatune.config import ConfigError


def lora_adapter(path: Path, r: int, seed: int, model=None, **config) -> Path:
    """A LoRA adapter with random (non-zero) factors on tiny Llama, saved to ``path``."""
    model = dt.wrap(model or tiny_llama(), dt.LoraConfig(r=r, target_modules=["q_proj", "v_proj"], **config))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(path)
    return path


def reference_phi(a1: np.ndarray, a2: np.ndarray, i: int, j: int) -> float:
    """φ by principal angles: top right-singular subspaces from eigh(AᵀA), cos θ = singular values of Q1ᵀQ2."""

    def top(a: np.ndarray, k: int) -> np.ndarray:
        values, vectors = np.linalg.eigh(a.T @ a)
        return vectors[:, np.argsort(values)[::-1][:k]]

    cosines = np.linalg.svd(top(a1, i).T @ top(a2, j), compute_uv=False)
    return float((cosines**2).sum() / min(i, j))


def test_phi_matches_principal_angles_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(4, 20, generator=g), torch.randn(7, 20, generator=g)
    phi, flipped = phi_matrix(a1, a2), phi_matrix(a2, a1)
    assert phi.shape == (4, 7)
    for i in range(1, 5):
        for j in range(1, 8):
            assert phi[i - 1, j - 1].item() == pytest.approx(
                reference_phi(a1.double().numpy(), a2.double().numpy(), i, j), abs=1e-9
            )
            assert phi[i - 1, j - 1].item() == pytest.approx(flipped[j - 1, i - 1].item(), abs=1e-12)
    assert ((phi >= -1e-12) & (phi <= 1 + 1e-12)).all()


def test_phi_of_complementary_orthogonal_subspaces_is_zero_and_of_nested_ones_one():
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q  # an orthonormal basis
    mix1, mix2 = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(12, 12, generator=g, dtype=torch.float64),
    )
    a1, a2 = mix1 @ q[:, :4].T, mix2 @ q[:, 4:].T  # span(a2) is span(a1)'s orthogonal complement
    assert phi_matrix(a1, a2).abs().max().item() < 1e-12
    inside = torch.randn(2, 4, generator=g, dtype=torch.float64) @ a1  # a subspace of span(a1)
    assert phi_matrix(a1, inside)[3, :].tolist() == pytest.approx([1.0, 1.0])


def test_adapter_with_itself_is_one_on_the_diagonal_and_random_baseline_is_lower(tmp_path):
    adapter = lora_adapter(tmp_path / "a", r=4, seed=0)
    result = analyze_subspace(adapter, adapter)
    assert len(result["modules"]) == 4  # q_proj and v_proj in 2 layers
    for phi in result["modules"].values():
        assert [phi[k][k] for k in range(4)] == pytest.approx([1.0] * 4)
    for kind in ("q_proj", "v_proj"):
        summary = result["types"][kind]
        assert summary["layers"] == 2 and summary["phi_1_1"] == pytest.approx(1.0)
        assert summary["random_phi_1_1"] < 0.9


def test_two_adapters_from_files_match_the_tensors_and_are_symmetric(tmp_path):
    a = lora_adapter(tmp_path / "a", r=2, seed=0)
    b = lora_adapter(tmp_path / "b", r=5, seed=1)
    ab, ba = analyze_subspace(a, b), analyze_subspace(b, a)
    tensors_a, tensors_b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    for module, phi in ab["modules"].items():
        key = f"base_model.model.{module}.lora_A.weight"
        expected = phi_matrix(tensors_a[key], tensors_b[key])
        assert np.allclose(phi, expected.numpy(), atol=1e-9)
        assert np.allclose(np.array(phi), np.array(ba["modules"][module]).T, atol=1e-9)


def test_adapters_of_different_bases_are_refused(tmp_path):
    a = lora_adapter(tmp_path / "a", r=2, seed=0)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    b = lora_adapter(tmp_path / "b", r=2, seed=1, model=wider)
    with pytest.raises(ConfigError, match="different base models"):
        analyze_subspace(a, b)
    named1 = lora_adapter(tmp_path / "n1", r=2, seed=0, base_model_name_or_path="/models/llama-a")
    named2 = lora_adapter(tmp_path / "n2", r=2, seed=1, base_model_name_or_path="/elsewhere/llama-b")
    with pytest.raises(ConfigError, match="different base models"):
        analyze_subspace(named1, named2)
    assert analyze_subspace(named1, named2, same_base=True)["modules"]  # the caller vouches: shapes still checked
    with pytest.raises(ConfigError, match="different base models"):
        analyze_subspace(a, b, same_base=True)
    moved = lora_adapter(tmp_path / "n3", r=2, seed=1, base_model_name_or_path="/elsewhere/llama-a/")
    assert analyze_subspace(named1, moved)["modules"]  # one model under two cache roots is the same base


def test_amplification_of_a_delta_along_the_weights_own_top_directions_is_its_scale():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 12, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r, c = 3, 0.25
    delta = c * (u[:, :r] * s[:r]) @ vh[:r]
    stats = delta_stats(delta, w, r, torch.Generator().manual_seed(0))
    top = s[:r].square().sum().sqrt().item()  # ‖Uᵀ W V‖_F: W's own top-r singular values
    assert stats["proj_norm_delta_dirs"] == pytest.approx(top)
    assert stats["proj_norm_weight_dirs"] == pytest.approx(top)
    assert stats["delta_norm"] == pytest.approx(c * top)
    assert stats["amplification"] == pytest.approx(c)
    assert stats["random_amplification"] > stats["amplification"]  # W's top directions maximise the projection
    assert stats["rank"] == r
    p = (s[:r] / s[:r].sum()).numpy()
    assert stats["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_delta_of_a_lora_adapter_and_of_its_merged_model(tiny_llama_dir, tmp_path):
    """ΔW = c·(W's top-2 part) in every adapted module: amplification c, read from the saved adapter;
    the merged model folder gives the same deltas up to float32 rounding."""
    base, _ = dt.load_base(str(tiny_llama_dir))
    model = dt.wrap(base, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    c = 0.5
    with torch.no_grad():
        for _, layer in model.delta_layers():
            u, s, vh = torch.linalg.svd(layer.base_layer.weight, full_matrices=False)
            layer.lora_A["default"].weight.copy_(vh[:2])
            layer.lora_B["default"].weight.copy_(c * u[:, :2] * s[:2] / layer.scaling["default"])
    model.save_pretrained(tmp_path / "lora")
    result = analyze_delta(tmp_path / "lora", str(tiny_llama_dir))
    assert result["r"] == 2 and len(result["modules"]) == 4
    for entry in result["modules"].values():
        assert entry["weight"]["amplification"] == pytest.approx(c, rel=1e-5)
        assert entry["weight"]["rank"] == 2
    assert (
        main(
            [
                "merge",
                "--base",
                str(tiny_llama_dir),
                "--adapter",
                str(tmp_path / "lora"),
                "--output",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = analyze_delta(tmp_path / "merged", str(tiny_llama_dir), rank=2)
    assert set(merged["modules"]) == set(result["modules"])
    for name, entry in merged["modules"].items():
        assert entry["weight"]["delta_norm"] == pytest.approx(result["modules"][name]["weight"]["delta_norm"], rel=1e-4)


def test_delta_of_bitfit_and_partial_adapters(tiny_llama_dir, tmp_path):
    base, _ = dt.load_base(str(tiny_llama_dir))
    model = dt.wrap(base, dt.BitFitConfig(bias="attention", add_missing=True))
    randomize_adapters(model, seed=3)
    saved = {n: t.norm().item() for n, t in model.adapter_state_dict().items()}
    model.save_pretrained(tmp_path / "bitfit")
    result = analyze_delta(tmp_path / "bitfit", str(tiny_llama_dir))
    norms = {f"base_model.model.{m}": e["bias"]["delta_norm"] for m, e in result["modules"].items()}
    assert sorted(norms) == sorted(k.rsplit(".", 1)[0] for k in saved)
    for key, norm in saved.items():
        assert norms[key.rsplit(".", 1)[0]] == pytest.approx(norm, rel=1e-5)
    base, _ = dt.load_base(str(tiny_llama_dir))
    partial = dt.wrap(base, dt.PartialConfig(freeze_bottom_layers=1))
    randomize_adapters(partial, seed=4, std=0.01)
    partial.save_pretrained(tmp_path / "partial")
    out = tmp_path / "plots"
    assert (
        main(["analyze", "delta", str(tmp_path / "partial"), "--base", str(tiny_llama_dir), "--output", str(out)]) == 0
    )
    result = json.loads((out / "delta.json").read_text())
    assert {e["layer"] for e in result["modules"].values()} == {1}  # layer 0 was frozen
    assert "q_proj" in result["types"] and (out / "delta_norms.png").stat().st_size > 1000


def test_delta_refuses_another_base_and_non_weight_methods(tiny_llama_dir, tmp_path):
    base, _ = dt.load_base(str(tiny_llama_dir))
    model = dt.wrap(base, dt.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path="/x/other-model"))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="was made for base model"):
        analyze_delta(tmp_path / "lora", str(tiny_llama_dir))
    base, _ = dt.load_base(str(tiny_llama_dir))
    dt.wrap(base, dt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "prompt")
    with pytest.raises(ConfigError, match="not a weight change"):
        analyze_delta(tmp_path / "prompt", str(tiny_llama_dir))


def test_cli_subspace_json_round_trip_and_plots(tmp_path, capsys):
    a = lora_adapter(tmp_path / "a", r=3, seed=0)
    b = lora_adapter(tmp_path / "b", r=6, seed=1)
    out = tmp_path / "plots"
    assert main(["analyze", "subspace", str(a), str(b), "--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = analyze_subspace(a, b)
    assert (
        set(printed["modules"])
        == set(direct["modules"])
        == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    )
    for module, rows in printed["modules"].items():
        assert len(rows) == 3 and all(len(row) == 6 for row in rows)  # row i-1: φ(i, j), j = 1..r2
        assert np.allclose(rows, direct["modules"][module])
    assert json.loads((out / "subspace.json").read_text())["modules"] == printed["modules"]
    assert (out / "subspace_q_proj.png").stat().st_size > 1000
    assert main(["analyze", "subspace", str(a), str(b)]) == 0
    assert "φ(1,1)" in capsys.readouterr().out
    assert main(["analyze", "subspace", str(a), str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_sweep_trains_ranks_side_by_side(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(16)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "sweep"
    train = [
        "--base",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-eval-generate",
        "--threads",
        "1",
        "--target-modules",
        "q_proj",
        "v_proj",
    ]
    assert main(["sweep", "--ranks", "1", "3", "--seeds", "0", "--output-dir", str(out), "--", *train]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [(run["r"], run["seed"], run["steps"]) for run in summary["runs"]] == [(1, 0, 2), (3, 0, 2)]
    for r in (1, 3):
        config = json.loads((out / f"r{r}-seed0" / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == r
    result = analyze_subspace(out / "r1-seed0" / "adapter", out / "r3-seed0" / "adapter")
    assert {len(rows[0]) for rows in result["modules"].values()} == {3}
    assert "r3-seed0" in capsys.readouterr().out
    assert main(["sweep", "--ranks", "2", "--output-dir", str(out / "b"), "--", "--method", "bitfit", *train[:4]]) == 2
    assert "needs a method with a rank" in capsys.readouterr().err
