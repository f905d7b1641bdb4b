"""Every LLaDA config option that changes the math, against a reference forward written here from the config's
semantics (configuration_llada.py / modeling_llada.py, OLMo's clip_qkv), on tiny random float64 checkpoints in the Hub
layout (a full reference-style config.json + safetensors). Nothing here calls the model code but through load_model."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import llada_xp  # noqa: F401
from llada_xp.config import ModelConfig
from llada_xp.loading import ModelLoadError, load_model
from tests import tiny

P = "model.transformer."
# A config.json as the reference code writes it (every field); the options under test are changed per case.
REFERENCE = dict(
    activation_type="silu", alibi=False, alibi_bias_max=8.0, architectures=["LLaDAModelLM"], attention_dropout=0.0,
    attention_layer_norm=False, attention_layer_norm_with_affine=True, bias_for_layer_norm=False, block_group_size=1,
    block_type="llama", d_model=32, embedding_dropout=0.0, embedding_size=None, flash_attention=False,
    include_bias=False, include_qkv_bias=False, init_cutoff_factor=None, init_device="meta", init_fn="mitchell",
    init_std=0.02, input_emb_norm=False, layer_norm_type="rms", layer_norm_with_affine=True, max_sequence_length=64,
    mlp_hidden_size=48, mlp_ratio=4, model_type="llada", multi_query_attention=None, n_heads=4, n_kv_heads=4,
    n_layers=2, precision="amp_bf16", residual_dropout=0.0, rms_norm_eps=1e-5, rope=True, rope_full_precision=True,
    rope_theta=10000.0, scale_logits=False, use_cache=False, weight_tying=False)

CASES = {
    "llada_8b_like": {},
    "gqa_2_per_kv": dict(n_heads=4, n_kv_heads=2),
    "gqa_4_per_kv": dict(n_heads=8, n_kv_heads=2),
    "multi_query": dict(n_kv_heads=None, multi_query_attention=True),
    "tied_embeddings": dict(weight_tying=True),
    "qkv_bias": dict(include_qkv_bias=True),
    "full_bias": dict(include_bias=True, bias_for_layer_norm=None),
    "sequential_swiglu": dict(block_type="sequential", activation_type="swiglu", mlp_hidden_size=None, mlp_ratio=2),
    "sequential_gelu_layernorm": dict(block_type="sequential", activation_type="gelu", layer_norm_type="default",
                                      bias_for_layer_norm=True),
    "llama_relu_gemma_rms": dict(activation_type="relu", layer_norm_type="gemma_rms"),
    "norms_without_affine": dict(layer_norm_with_affine=False, attention_layer_norm=True,
                                 attention_layer_norm_with_affine=False),
    "embedding_padding": dict(embedding_size=64),
    "scale_logits_input_emb_norm": dict(scale_logits=True, input_emb_norm=True),
    "qk_norm_clip_qkv_gqa": dict(attention_layer_norm=True, clip_qkv=0.6, n_kv_heads=2, layer_norm_type="default"),
    "rope_theta_mlp_ratio": dict(rope_theta=500000.0, mlp_hidden_size=None, mlp_ratio=3),
    "learned_positions": dict(rope=False),
    # iLLaDA-like: GQA + tied embeddings + padded embedding, and the fused sequential block with every bias
    "gqa_tied_padded": dict(n_heads=8, n_kv_heads=2, weight_tying=True, embedding_size=64),
    "sequential_gqa_tied_full_bias": dict(block_type="sequential", activation_type="swiglu", n_kv_heads=2,
                                          weight_tying=True, include_bias=True, bias_for_layer_norm=None,
                                          embedding_size=64, scale_logits=True),
}


def kv_heads(c):
    return c["n_kv_heads"] if c["n_kv_heads"] is not None else 1 if c["multi_query_attention"] else c["n_heads"]


def random_weights(c: dict, seed: int) -> dict:
    """The checkpoint's tensors by reference key name, random (norm weights around 1, biases small)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = c["d_model"], c["d_model"] // c["n_heads"]
    kv = kv_heads(c) * hd
    width = c["mlp_hidden_size"] or c["mlp_ratio"] * d
    rows = c["embedding_size"] or c["vocab_size"]
    bias, qkv_bias = c["include_bias"], c["include_bias"] or c["include_qkv_bias"]
    norm_bias = bias if c["bias_for_layer_norm"] is None else c["bias_for_layer_norm"]
    sd = {}

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def linear(name, out, inp, with_bias):
        sd[name + ".weight"] = rnd(out, inp, scale=inp ** -0.5)
        if with_bias:
            sd[name + ".bias"] = rnd(out, scale=0.1)

    def norm(name, n, affine):
        if affine:
            sd[name + ".weight"] = 1 + rnd(n, scale=0.2)
            if norm_bias:
                sd[name + ".bias"] = rnd(n, scale=0.1)

    sd[P + "wte.weight"] = rnd(rows, d)
    if not c["rope"]:
        sd[P + "wpe.weight"] = rnd(c["max_sequence_length"], d, scale=0.5)
    for i in range(c["n_layers"]):
        b = f"{P}blocks.{i}."
        norm(b + "attn_norm", d, c["layer_norm_with_affine"])
        norm(b + "ff_norm", d, c["layer_norm_with_affine"])
        if c["attention_layer_norm"]:
            norm(b + "q_norm", d, c["attention_layer_norm_with_affine"])
            norm(b + "k_norm", kv, c["attention_layer_norm_with_affine"])
        if c["block_type"] == "sequential":
            linear(b + "att_proj", d + 2 * kv, d, qkv_bias)
        else:
            linear(b + "q_proj", d, d, qkv_bias)
            linear(b + "k_proj", kv, d, qkv_bias)
            linear(b + "v_proj", kv, d, qkv_bias)
            linear(b + "up_proj", width, d, bias)
        linear(b + "attn_out", d, d, bias)
        linear(b + "ff_proj", width, d, bias)
        linear(b + "ff_out", d, width // 2 if c["activation_type"] == "swiglu" else width, bias)
    norm(P + "ln_f", d, c["layer_norm_with_affine"])
    if not c["weight_tying"]:
        linear(P + "ff_out", rows, d, bias)
    return sd


def reference_logits(c: dict, w: dict, ids: list[int]) -> torch.Tensor:
    """One unpadded row, float64, written out plainly from the config's meaning: ids [L] → logits [L, rows]."""
    L, d, H = len(ids), c["d_model"], c["n_heads"]
    hd, KV = d // H, kv_heads(c)

    def norm(x, name, affine):
        if c["layer_norm_type"] in ("rms", "gemma_rms"):
            y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["rms_norm_eps"])
        else:  # LayerNorm with torch's default eps
            mu = x.mean(-1, keepdim=True)
            y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        if affine:
            g = w[name + ".weight"]
            y = y * (1 + g) if c["layer_norm_type"] == "gemma_rms" else y * g
            if name + ".bias" in w:
                y = y + w[name + ".bias"]
        return y

    def lin(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    def act(x):
        kind = c["activation_type"]
        if kind == "swiglu":
            a, gate = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return gate * torch.sigmoid(gate) * a
        if kind == "silu":
            return x * torch.sigmoid(x)
        if kind == "gelu":
            return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        return x.clamp(min=0)

    pos = torch.arange(L, dtype=torch.float64)
    inv = torch.tensor([c["rope_theta"] ** (-2 * j / hd) for j in range(hd // 2)], dtype=torch.float64)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(x):  # [L, hd]
        if not c["rope"]:
            return x
        x1, x2 = x[:, : hd // 2], x[:, hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = w[P + "wte.weight"][torch.tensor(ids)]
    if c["input_emb_norm"]:
        h = h * math.sqrt(d)
    if not c["rope"]:
        h = h + w[P + "wpe.weight"][:L]
    for i in range(c["n_layers"]):
        b = f"{P}blocks.{i}."
        a = norm(h, b + "attn_norm", c["layer_norm_with_affine"])
        if c["block_type"] == "sequential":
            qkv = lin(a, b + "att_proj")
            q, k, v = qkv[:, :d], qkv[:, d:d + KV * hd], qkv[:, d + KV * hd:]
        else:
            q, k, v = lin(a, b + "q_proj"), lin(a, b + "k_proj"), lin(a, b + "v_proj")
        if c.get("clip_qkv") is not None:
            q, k, v = (t.clamp(-c["clip_qkv"], c["clip_qkv"]) for t in (q, k, v))
        if c["attention_layer_norm"]:
            q = norm(q, b + "q_norm", c["attention_layer_norm_with_affine"])
            k = norm(k, b + "k_norm", c["attention_layer_norm_with_affine"])
        heads = []
        for j in range(H):
            g = j // (H // KV)  # query head j reads KV head g (consecutive query heads share one)
            qj, kj, vj = q[:, j * hd:(j + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
            att = torch.softmax(rot(qj) @ rot(kj).T / math.sqrt(hd), -1)  # bidirectional
            heads.append(att @ vj)
        h = h + lin(torch.cat(heads, -1), b + "attn_out")
        f = norm(h, b + "ff_norm", c["layer_norm_with_affine"])
        x = act(lin(f, b + "ff_proj"))
        if c["block_type"] == "llama":
            x = x * lin(f, b + "up_proj")
        h = h + lin(x, b + "ff_out")
    h = norm(h, P + "ln_f", c["layer_norm_with_affine"])
    logits = h @ w[P + "wte.weight"].T if c["weight_tying"] else lin(h, P + "ff_out")
    return logits / math.sqrt(d) if c["scale_logits"] else logits


def write_checkpoint(folder, changes: dict, seed: int = 0):
    """A Hub-layout folder (config.json, model.safetensors, tokenizer) of random weights; (config, weights)."""
    tok = tiny.tokenizer()
    v = tok.get_vocab()
    c = dict(REFERENCE, vocab_size=len(v) + 4, mask_token_id=v["<|mdm_mask|>"], eos_token_id=v["<|endoftext|>"],
             pad_token_id=v["<|endoftext|>"], **changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    w = random_weights(c, seed)
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(folder)
    return c, w


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_reference_forward_for_each_option(tmp_path, case):
    c, w = write_checkpoint(tmp_path / case, CASES[case], seed=len(case))
    loaded = load_model(ModelConfig(source="hf", path=str(tmp_path / case), dtype="float64"))
    ids = torch.randint(0, c["vocab_size"], (13,), generator=torch.Generator().manual_seed(1)).tolist()
    got = loaded.model(torch.tensor([ids])).logits[0]
    want = reference_logits(c, w, ids)
    assert got.shape == want.shape == (13, c["embedding_size"] or c["vocab_size"])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["gqa_4_per_kv", "multi_query", "gqa_tied_padded"])
def test_kv_cache_holds_n_kv_heads_and_cached_forwards_equal_the_full_one(tmp_path, case):
    c, _ = write_checkpoint(tmp_path, CASES[case])
    m = load_model(ModelConfig(source="hf", path=str(tmp_path), dtype="float64")).model
    x = torch.randint(0, c["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(x)
    am[0, :3] = 0  # a left-padded row
    full = m(x, attention_mask=am).logits
    m.setup_cache(2, 20)
    assert m.transformer.blocks[0].kv_cache.k.shape == (2, kv_heads(c), 20, c["d_model"] // c["n_heads"])
    m(x, attention_mask=am, use_cache=True)
    prefix = m(x[:, 8:], attention_mask=am, start=8, use_cache=True, logits_slice=slice(0, 4)).logits
    dual = m(x[:, 8:12], attention_mask=am, start=8, use_cache=True).logits
    m.clear_cache()
    torch.testing.assert_close(prefix, full[:, 8:12], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dual, full[:, 8:12], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("option,value", [("alibi", True), ("block_type", "parallel"), ("block_group_size", 2),
                                          ("layer_norm_type", "amd_compatible"), ("activation_type", "tanh"),
                                          ("yarn", True)])
def test_an_unsupported_option_fails_to_load_naming_option_and_value(tmp_path, option, value):
    write_checkpoint(tmp_path, {})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[option] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"{option}={value!r}"):
        load_model(ModelConfig(source="hf", path=str(tmp_path)))


def test_options_that_do_not_change_inference_are_accepted(tmp_path):
    c, w = write_checkpoint(tmp_path, dict(attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1,
                                           init_fn="normal", init_std=0.5, flash_attention=True,
                                           rope_full_precision=False, precision="fp32", init_device="cpu"))
    m = load_model(ModelConfig(source="hf", path=str(tmp_path), dtype="float64")).model
    torch.testing.assert_close(m(torch.tensor([[1, 2, 3]])).logits[0], reference_logits(c, w, [1, 2, 3]),
                               rtol=1e-10, atol=1e-10)


def test_contradicting_head_counts_are_refused(tmp_path):
    write_checkpoint(tmp_path, dict(n_kv_heads=2, multi_query_attention=True))
    with pytest.raises(ModelLoadError, match="multi_query_attention=True contradicts n_kv_heads=2"):
        load_model(ModelConfig(source="hf", path=str(tmp_path)))


def test_config_json_we_write_lists_every_architecture_field(tmp_path):
    """A folder we save must read the same with the reference code, whose defaults are GPT-2's, not LLaDA-8B's."""
    m = tiny.model(dtype=torch.float32)
    tiny.write_hub_folder(tmp_path, m)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for field in ("block_type", "weight_tying", "rope", "layer_norm_type", "activation_type", "include_bias",
                  "n_kv_heads", "mlp_hidden_size", "scale_logits"):
        assert field in cfg, field
    assert cfg["block_type"] == "llama" and cfg["weight_tying"] is False and cfg["rope"] is True


def test_special_ids_come_from_config_then_generation_config_then_tokenizer_and_overrides_win(tmp_path):
    tok = tiny.tokenizer()
    v = tok.get_vocab()
    write_checkpoint(tmp_path, {})
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("mask_token_id", "eos_token_id", "pad_token_id"):
        del cfg[k]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = load_model(ModelConfig(source="hf", path=str(tmp_path))).info.ids  # from the tokenizer
    assert (ids.mask, ids.eos, ids.eot, ids.pad) == (v["<|mdm_mask|>"], v["<|endoftext|>"], v["<|eot_id|>"],
                                                     v["<|endoftext|>"])
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(mask_token_id=7, eos_token_id=[9, 10],
                                                                     pad_token_id=11)))
    ids = load_model(ModelConfig(source="hf", path=str(tmp_path))).info.ids
    assert (ids.mask, ids.eos, ids.pad) == (7, 9, 11)
    cfg.update(mask_token_id=12, eos_token_id=13)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = load_model(ModelConfig(source="hf", path=str(tmp_path))).info.ids
    assert (ids.mask, ids.eos, ids.pad) == (12, 13, 11)
    over = ModelConfig(source="hf", path=str(tmp_path), mask_token_id=20, eos_token_id=21, eot_token_id=22,
                       pad_token_id=23)
    ids = load_model(over).info.ids
    assert (ids.mask, ids.eos, ids.eot, ids.pad) == (20, 21, 22, 23)


def test_a_mask_id_outside_the_embedding_or_equal_to_eos_is_refused(tmp_path):
    c, _ = write_checkpoint(tmp_path, {})
    with pytest.raises(ModelLoadError, match=r"mask id 999 is outside the model's \d+ embedding rows"):
        load_model(ModelConfig(source="hf", path=str(tmp_path), mask_token_id=999))
    with pytest.raises(ModelLoadError, match="set model.mask_token_id"):
        load_model(ModelConfig(source="hf", path=str(tmp_path), mask_token_id=c["eos_token_id"]))


@pytest.mark.parametrize("keys", ["head_only", "both"])
def test_a_tied_checkpoint_saved_with_the_lm_head_name_loads(tmp_path, keys):
    """The reference code ties ff_out to wte; saving keeps either name or both."""
    c, w = write_checkpoint(tmp_path, dict(weight_tying=True))
    saved = dict(w)
    saved[P + "ff_out.weight"] = w[P + "wte.weight"].clone()
    if keys == "head_only":
        del saved[P + "wte.weight"]
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    m = load_model(ModelConfig(source="hf", path=str(tmp_path), dtype="float64")).model
    torch.testing.assert_close(m(torch.tensor([[4, 5, 6]])).logits[0], reference_logits(c, w, [4, 5, 6]),
                               rtol=1e-10, atol=1e-10)
    saved[P + "wte.weight"] = w[P + "wte.weight"] + 1
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="LM head model.transformer.ff_out.weight differs from its embedding"):
        load_model(ModelConfig(source="hf", path=str(tmp_path)))
