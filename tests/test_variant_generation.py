"""The new LoRA-family methods in mixed-adapter generation (what the server runs): every row of a
batch mixing DoRA, (IA)³, LoKr and plain LoRA adapters gets the tokens it gets alone."""

import torch
from conftest import batch, randomize_adapters, tiny_llama

import deltatune as dt

CONFIGS = {
    "dora": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True),
    "ia3": dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "lokr": dt.LoKrConfig(r=2, target_modules=["o_proj", "up_proj"], decompose_both=True),
    "lora": dt.LoraConfig(r=2, target_modules=["q_proj"]),
}


def test_mixed_generation_equals_each_adapter_alone():
    model = dt.wrap(tiny_llama(), CONFIGS["dora"], "dora")
    for name, config in CONFIGS.items():
        if name != "dora":
            model.add_adapter(name, config)
    for seed, name in enumerate(CONFIGS):
        model.set_adapter(name)
        randomize_adapters(model, seed=seed, std=0.3)
        with torch.no_grad():  # IA3 scales near 1, not near 0
            for param_name, p in model.named_parameters():
                if f"ia3_l.{name}" in param_name:
                    p.add_(1.0)
    model.eval()
    names = [*CONFIGS, "__base__"]
    inputs = batch(rows=len(names), length=6)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(**inputs, adapter_names=names, **settings)
    alone = []
    for row, name in enumerate(names):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        alone.append(model.generate(**one, adapter_name=name, **settings))
        assert torch.equal(mixed[row : row + 1], alone[-1]), name
    assert len({tuple(t[0].tolist()) for t in alone}) > 2  # the adapters really differ
