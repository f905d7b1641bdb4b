"""The native LLaDA model against a deliberately simple reference forward (float64), its cache and its masks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llada_xp  # noqa: F401
from llada_xp.config import ModelConfig
from llada_xp.loading import ModelLoadError, load_model
from llada_xp.model import PRESETS, LLaDAConfig, LLaDAModelLM
from tests import tiny


def reference_forward(sd: dict, c: LLaDAConfig, ids: torch.Tensor) -> torch.Tensor:
    """reference/model.md, written out plainly for one unpadded row: ids [L] → logits [L, V] (float64)."""
    w = {k.removeprefix("model.transformer."): v.double() for k, v in sd.items()}
    L, d, H = ids.shape[0], c.d_model, c.n_heads
    hd = d // H

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * g

    inv = torch.tensor([c.rope_theta ** (-2 * j / hd) for j in range(hd // 2)], dtype=torch.float64)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(x):  # x: [L, hd]
        x1, x2 = x[:, : hd // 2], x[:, hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = w["wte.weight"][ids]
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        a = rms(h, w[p + "attn_norm.weight"])
        q, k, v = (a @ w[p + n + ".weight"].T for n in ("q_proj", "k_proj", "v_proj"))
        heads = []
        for j in range(H):
            sl = slice(j * hd, (j + 1) * hd)
            qj, kj = rot(q[:, sl]), rot(k[:, sl])
            att = torch.softmax(qj @ kj.T / hd ** 0.5, -1)  # bidirectional: no causal mask
            heads.append(att @ v[:, sl])
        h = h + torch.cat(heads, -1) @ w[p + "attn_out.weight"].T
        f = rms(h, w[p + "ff_norm.weight"])
        gate = f @ w[p + "ff_proj.weight"].T
        h = h + ((gate * torch.sigmoid(gate)) * (f @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
    return rms(h, w["ln_f.weight"]) @ w["ff_out.weight"].T


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    m = tiny.model(seed=1, dtype=torch.float32)
    return tiny.write_hub_folder(tmp_path_factory.mktemp("hub"), m), m


def test_hub_layout_loads_through_loader_and_automodel_and_matches_reference(hub_folder):
    from transformers import AutoConfig, AutoModel

    folder, src = hub_folder
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    loaded = load_model(ModelConfig(source="hf", path=str(folder), dtype="float64"))
    auto = AutoModel.from_pretrained(folder, dtype=torch.float64)
    assert isinstance(AutoConfig.from_pretrained(folder), LLaDAConfig) and isinstance(auto, LLaDAModelLM)
    ids = torch.randint(0, 50, (11,))
    ref = reference_forward(src.state_dict(), src.config, ids)
    for m in (loaded.model, auto):
        got = m(ids[None]).logits[0]
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert loaded.info.ids.mask == src.config.mask_token_id and loaded.info.ids.eot is not None
    assert loaded.info.dtype == "float64" and loaded.info.device == "cpu"


def test_default_dtype_is_float32_on_cpu(hub_folder):
    loaded = load_model(ModelConfig(source="hf", path=str(hub_folder[0])))
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_pytorch_bin_layout_loads(tmp_path, hub_folder):
    src = hub_folder[1]
    src.config.save_pretrained(tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    m = load_model(ModelConfig(source="hf", path=str(tmp_path))).model
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(m(ids).logits, src(ids).logits, rtol=0, atol=0)


def test_block_forward_against_prefix_and_dual_cache_reproduces_full_forward():
    m = tiny.model(seed=2)
    x = torch.randint(0, 50, (2, 20))
    full = m(x).logits
    s, e = 8, 12
    m.setup_cache(2, 20)
    m(x, use_cache=True)
    prefix = m(x[:, s:], start=s, use_cache=True, logits_slice=slice(0, e - s)).logits  # prefix mode
    torch.testing.assert_close(prefix, full[:, s:e], rtol=1e-10, atol=1e-10)
    m.setup_cache(2, 20)
    m(x, use_cache=True)
    dual = m(x[:, s:e], start=s, use_cache=True).logits  # dual mode
    torch.testing.assert_close(dual, full[:, s:e], rtol=1e-10, atol=1e-10)
    m.clear_cache()


def test_dual_overwrite_changes_only_its_column_range():
    m = tiny.model(seed=3)
    x = torch.randint(0, 50, (1, 16))
    m.setup_cache(1, 16)
    m(x, use_cache=True)
    before = [(b.kv_cache.k.clone(), b.kv_cache.v.clone()) for b in m.transformer.blocks]
    y = x.clone()
    y[:, 4:8] = torch.randint(0, 50, (1, 4))
    m(y[:, 4:8], start=4, use_cache=True)
    for (k0, v0), b in zip(before, m.transformer.blocks):
        for old, new in ((k0, b.kv_cache.k), (v0, b.kv_cache.v)):
            assert torch.equal(old[:, :, :4], new[:, :, :4]) and torch.equal(old[:, :, 8:], new[:, :, 8:])
            assert not torch.equal(old[:, :, 4:8], new[:, :, 4:8])


def test_left_padded_row_gives_same_logits_as_alone():
    m = tiny.model(seed=4)
    short, long = torch.randint(0, 50, (5,)), torch.randint(0, 50, (9,))
    pad = m.config.pad_token_id
    batch = torch.stack([torch.cat([torch.full((4,), pad), short]), long])
    am = torch.ones_like(batch)
    am[0, :4] = 0
    got = m(batch, attention_mask=am).logits
    torch.testing.assert_close(got[0, 4:], m(short[None]).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], m(long[None]).logits[0], rtol=1e-10, atol=1e-10)


def test_padded_cache_forward_matches_full_padded_forward():
    m = tiny.model(seed=5)
    x = torch.randint(0, 50, (2, 14))
    am = torch.ones_like(x)
    am[0, :3] = 0
    am[1, 12:] = 0  # right padding too (a shorter canvas in a batch)
    full = m(x, attention_mask=am).logits
    m.setup_cache(2, 14)
    m(x, attention_mask=am, use_cache=True)
    got = m(x[:, 6:10], attention_mask=am, start=6, use_cache=True).logits
    torch.testing.assert_close(got, full[:, 6:10], rtol=1e-10, atol=1e-10)


def test_llada_8b_preset_has_reference_names_shapes_and_parameter_count():
    with torch.device("meta"):
        m = LLaDAModelLM(LLaDAConfig(**PRESETS["llada-8b"]))
    sd = m.state_dict()
    assert len(sd) == 291
    assert sum(p.numel() for p in m.parameters()) == 8_015_581_184
    d, mlp, V = 4096, 12288, 126464
    assert sd["model.transformer.wte.weight"].shape == (V, d)
    assert sd["model.transformer.ff_out.weight"].shape == (V, d)
    assert sd["model.transformer.ln_f.weight"].shape == (d,)
    for i in range(32):
        p = f"model.transformer.blocks.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "attn_out"):
            assert sd[p + n + ".weight"].shape == (d, d)
        assert sd[p + "ff_proj.weight"].shape == sd[p + "up_proj.weight"].shape == (mlp, d)
        assert sd[p + "ff_out.weight"].shape == (d, mlp)
        assert sd[p + "attn_norm.weight"].shape == sd[p + "ff_norm.weight"].shape == (d,)


def _shard_with(folder, key):
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / idx["weight_map"][key]


def test_weights_not_matching_config_name_the_tensors(tmp_path):
    folder = tiny.write_hub_folder(tmp_path, tiny.model(dtype=torch.float32))
    f = _shard_with(folder, "model.transformer.blocks.1.q_proj.weight")
    sd = load_file(f)
    sd.pop("model.transformer.blocks.1.q_proj.weight")
    sd["model.transformer.blocks.1.extra.weight"] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.transformer.blocks.1.extra.weight"] = f.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(source="hf", path=str(folder)))
    assert "blocks.1.q_proj.weight" in str(e.value) and "blocks.1.extra.weight" in str(e.value)


def test_mis_shaped_tensor_is_named(tmp_path):
    folder = tiny.write_hub_folder(tmp_path, tiny.model(dtype=torch.float32))
    key = "model.transformer.blocks.0.up_proj.weight"
    f = _shard_with(folder, key)
    sd = load_file(f)
    sd[key] = torch.zeros(7, 32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(source="hf", path=str(folder)))
    assert "blocks.0.up_proj.weight" in str(e.value)


def test_missing_folder_and_unreachable_hub_id_say_which_and_why(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(ModelConfig(source="hf", path=str(tmp_path / "nope")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="Hub id 'nobody/no-such-llada'"):
        load_model(ModelConfig(source="hf", path="nobody/no-such-llada"))


def test_hf_source_without_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="model.path is required"):
        load_model(ModelConfig(source="hf"))


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2, weight_tying=True, include_bias=True)])
def test_fused_projections_give_the_unfused_logits_and_tokens(kw):
    import copy

    from llada_xp.config import SamplerConfig
    from llada_xp.sampler import Request, Sampler

    parts = tiny.model(seed=6, sharpen=30.0, **kw)
    fused = copy.deepcopy(parts).fuse()
    blk = fused.transformer.blocks[0]
    assert not hasattr(blk, "q_proj") and blk.att_proj.out_features == 32 + 2 * 8 * (kw.get("n_kv_heads") or 4)
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused(x).logits, parts(x).logits, rtol=1e-10, atol=1e-10)
    for cache in ("none", "prefix", "dual"):
        st = SamplerConfig(gen_length=16, block_length=4, steps=16, cache=cache, threshold=0.9)
        reqs = [Request([1, 2, 3], st), Request([4, 5], st)]
        got = [r.tokens for r in Sampler(fused, tiny.ids_of(fused)).generate(reqs)]
        assert got == [r.tokens for r in Sampler(parts, tiny.ids_of(parts)).generate(reqs)], cache


def test_a_fused_model_saves_and_loads_under_the_checkpoint_names(tmp_path):
    parts = tiny.model(seed=7, include_qkv_bias=True)
    want = parts.state_dict()
    fused = tiny.model(seed=7, include_qkv_bias=True).fuse()
    got = fused.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = tiny.model(seed=8, include_qkv_bias=True).fuse()
    other.load_state_dict(want)  # checkpoint names into a fused model
    x = torch.randint(0, 50, (1, 9))
    torch.testing.assert_close(other(x).logits, parts(x).logits, rtol=1e-10, atol=1e-10)
    fused.save_pretrained(tmp_path)
    again = LLaDAModelLM.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(again(x).logits, parts(x).logits, rtol=1e-10, atol=1e-10)
    assert hasattr(fused.unfuse().transformer.blocks[1], "up_proj")
    torch.testing.assert_close(fused(x).logits, parts(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_block_steps_decode_the_eager_tokens(caplog):
    """model.compile on CPU (inductor's default mode): the dual-cache block steps compiled, the same tokens and NFE."""
    from llada_xp.config import SamplerConfig
    from llada_xp.sampler import Request, Sampler

    m = tiny.model(seed=9, sharpen=30.0, n_kv_heads=2).fuse()
    st = SamplerConfig(gen_length=12, block_length=4, steps=12, cache="dual", threshold=None, early_stop=False)
    reqs = [Request([1, 2, 3], st), Request([4, 5], st)]  # left padding: a key mask
    want = [(r.tokens, r.stats.nfe) for r in Sampler(m, tiny.ids_of(m)).generate(reqs)]
    calls = []
    assert m.compile_block_step()
    compiled = m._cached_step
    m._cached_step = lambda *a: calls.append(1) or compiled(*a)
    got = [(r.tokens, r.stats.nfe) for r in Sampler(m, tiny.ids_of(m)).generate(reqs)]
    assert got == want and len(calls) == 3 * 3  # 3 blocks of 4 steps: the block-start forward, then 3 block steps
    assert m._cached_step is not None and "model.compile" not in caplog.text  # no fallback to eager


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_block_steps_see_bucketed_shapes_as_rows_join_and_leave(dtype, caplog):
    """Rows of two block lengths finish and join mid-way (the dual group's batch goes 4, 3, 2, 1 and back up, its key
    width changes): compiled = eager tokens and NFE, and the compiled step only sees bucketed batches (1, 2, 4) and
    the cache's full key width, so dynamo compiles once per (bucket, block length, all-rows-in-order)."""
    from torch._dynamo.utils import counters

    from llada_xp.config import SamplerConfig
    from llada_xp.sampler import Request, Sampler

    m = tiny.model(seed=9, dtype=dtype, sharpen=30.0, n_kv_heads=2).fuse()

    def st(gen, block):
        return SamplerConfig(gen_length=gen, block_length=block, steps=gen, cache="dual", threshold=None,
                             early_stop=False)

    first = [([1, 2, 3], st(12, 6)), ([4, 5, 6, 7, 8], st(8, 4)), ([9, 10], st(12, 4)), ([11, 12, 13, 14], st(4, 4))]
    late = {5: ([15, 16, 17], st(8, 4)), 9: ([18, 19], st(4, 4))}  # into freed slots: the cache keeps its shape

    def run():
        out, rs, step = {}, Sampler(m, tiny.ids_of(m)).running(
            lambda e: out.__setitem__(e.index, (e.result.tokens, e.result.stats.nfe)) if hasattr(e, "result")
            else None), 0
        for k, (p, s) in enumerate(first):
            rs.add(Request(p, s), k)
        while rs or step < 10:
            if step in late:
                p, s = late[step]
                rs.add(Request(p, s), len(out) + len(rs))
            if rs:
                rs.step()
            step += 1
        return [out[k] for k in range(len(first) + len(late))]

    want = run()
    torch._dynamo.reset()
    counters.clear()
    assert m.compile_block_step()
    compiled, seen = m._cached_step, set()

    def counting(ids, pos, key_mask, write, cols, rows, logits_slice):
        kv = m.transformer.blocks[0].kv_cache.kv
        seen.add((ids.shape, key_mask.shape[-1], rows is None, kv.shape))
        return compiled(ids, pos, key_mask, write, cols, rows, logits_slice)

    m._cached_step = counting
    got = run()
    assert got == want
    assert m._cached_step is not None and "model.compile" not in caplog.text  # no fallback to eager
    (R, _, L, _), = {s[3] for s in seen}  # one cache shape throughout
    assert R == 4 and {s[0][0] for s in seen} <= {1, 2, 4} and {s[1] for s in seen} == {L}
    assert {s[0][1] for s in seen} == {4, 6}
    assert counters["stats"]["unique_graphs"] == len(seen) <= 3 * 2 * 2  # one compile per shape seen
