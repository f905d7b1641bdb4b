"""Native LLaDA architecture: the bidirectional OLMo-style transformer of LLaDA's config.json, with its key names.

Every config option that changes the math at inference is folded in where it acts (block type, grouped KV heads,
biases, norms, activation, RoPE or learned positions, tied or padded embeddings, logit scaling); options the reference
code defines but we do not implement are refused by name in `LLaDAConfig.check`. Adds what the reference modeling code
lacks: left-padding masks with per-row RoPE positions, a KV cache the model owns (Fast-dLLM prefix and dual modes, with
n_kv_heads heads) and logits for only the columns asked for. Lean on launches (issue 17): RoPE tables are made once per
forward and shared by every layer, and `fuse()` (load_model calls it) turns q/k/v and gate/up into one matmul each;
the per-option choices are made at build/fuse time, not in the layer's forward. Architecture only: it knows nothing
about sampling, files or HTTP (loading lives in loading.py).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

# What the reference code can build and we implement; any other value is refused by name (LLaDAConfig.check).
CHOICES = {
    "block_type": ("llama", "sequential"),  # "parallel" is declared by the reference code, never built
    "activation_type": ("silu", "swiglu", "gelu", "relu"),
    "layer_norm_type": ("rms", "gemma_rms", "default", "low_precision"),  # low_precision: same math outside autocast
    "alibi": (False,),
    "yarn": (False,),
    "block_group_size": (1,),  # > 1 nests the blocks as block_groups.g.j (training-time FSDP wrapping)
}
# Fields written to config.json even at their default: the reference code's defaults (GPT-2-like) are not ours.
ARCH_FIELDS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "vocab_size",
               "embedding_size", "block_type", "activation_type", "rope", "rope_theta", "max_sequence_length",
               "layer_norm_type", "layer_norm_with_affine", "bias_for_layer_norm", "rms_norm_eps",
               "attention_layer_norm", "attention_layer_norm_with_affine", "include_bias", "include_qkv_bias",
               "weight_tying", "multi_query_attention", "clip_qkv", "scale_logits", "input_emb_norm", "alibi",
               "block_group_size")


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config.json (OLMo's model options). A field missing from the file takes LLaDA-8B-Instruct's value, not
    the reference code's GPT-2-like default; real checkpoints list every field. Unknown fields are kept as attributes;
    dropouts, init_* and other training-only fields are accepted and ignored."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,  # None = n_heads (or 1 with multi_query_attention)
        n_layers: int = 32,
        mlp_ratio: int = 4,  # MLP width = mlp_ratio * d_model, unless mlp_hidden_size is set
        mlp_hidden_size: int | None = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,  # rows of wte and the LM head (>= vocab_size; None = vocab_size)
        block_type: str = "llama",  # llama: q/k/v_proj + gated MLP (ff_proj, up_proj); sequential: fused att_proj
        activation_type: str = "silu",  # silu | gelu | relu | swiglu (chunks ff_proj's output into x, gate)
        rope: bool = True,  # False (and no alibi): learned absolute positions transformer.wpe
        rope_theta: float = 500000.0,
        max_sequence_length: int = 4096,
        layer_norm_type: str = "rms",  # rms | gemma_rms (scale 1 + w) | default / low_precision (LayerNorm, eps 1e-5)
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = None,  # None = include_bias
        rms_norm_eps: float = 1e-5,
        attention_layer_norm: bool = False,  # q_norm over all query heads, k_norm over all KV heads
        attention_layer_norm_with_affine: bool = True,
        include_bias: bool = False,  # every linear layer, and the norms unless bias_for_layer_norm says otherwise
        include_qkv_bias: bool = False,
        weight_tying: bool = False,  # LM head = wte (no transformer.ff_out)
        multi_query_attention: bool | None = None,  # True = one KV head
        clip_qkv: float | None = None,  # clamp q, k, v to [-clip_qkv, clip_qkv] after the projection (OLMo)
        scale_logits: bool = False,  # logits / sqrt(d_model)
        input_emb_norm: bool = False,  # embeddings * sqrt(d_model)
        alibi: bool = False,
        block_group_size: int = 1,
        mask_token_id: int | None = None,  # special ids: None = ask generation_config.json / the tokenizer
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_ratio, self.mlp_hidden_size = mlp_ratio, mlp_hidden_size
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.block_type, self.activation_type = block_type, activation_type
        self.rope, self.rope_theta, self.max_sequence_length = rope, rope_theta, max_sequence_length
        self.layer_norm_type, self.layer_norm_with_affine = layer_norm_type, layer_norm_with_affine
        self.bias_for_layer_norm, self.rms_norm_eps = bias_for_layer_norm, rms_norm_eps
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.include_bias, self.include_qkv_bias, self.weight_tying = include_bias, include_qkv_bias, weight_tying
        self.multi_query_attention, self.clip_qkv = multi_query_attention, clip_qkv
        self.scale_logits, self.input_emb_norm = scale_logits, input_emb_norm
        self.alibi, self.block_group_size = alibi, block_group_size
        self.mask_token_id = mask_token_id
        kwargs["tie_word_embeddings"] = False  # weight_tying is done by the model itself, not by transformers
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def to_diff_dict(self) -> dict:
        return {**super().to_diff_dict(), **{k: getattr(self, k) for k in ARCH_FIELDS}}

    def check(self) -> None:
        """Raise ValueError naming an option (and the value found) this code does not implement or cannot build."""
        for name, ok in CHOICES.items():
            value = getattr(self, name, ok[0])
            if value not in ok:
                raise ValueError(f"unsupported LLaDA config option {name}={value!r} (supported: "
                                 f"{', '.join(map(repr, ok))})")
        if self.block_type == "llama" and self.activation_type == "swiglu":
            raise ValueError("block_type='llama' with activation_type='swiglu' cannot be built (the llama block gates "
                             "with up_proj; swiglu halves ff_proj's output)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        mqa, kv = self.multi_query_attention, self.n_kv_heads
        if mqa is not None and kv is not None and kv != (1 if mqa else self.n_heads):
            raise ValueError(f"multi_query_attention={mqa} contradicts n_kv_heads={kv}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.rows < self.vocab_size:
            raise ValueError(f"embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}")

    @property
    def rows(self) -> int:
        """Rows of the embedding and the LM head (embedding_size pads the vocabulary when set)."""
        return self.embedding_size or self.vocab_size

    @property
    def kv_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def norm_bias(self) -> bool:
        return self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm


# Size presets (config.json values); "llada-8b" is LLaDA-8B-Base / -Instruct / LLaDA-1.5.
PRESETS: dict[str, dict] = {
    "llada-8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                     embedding_size=126464, rope_theta=500000.0, max_sequence_length=4096, mask_token_id=126336,
                     eos_token_id=126081, pad_token_id=126081),
}


def _gated(act):
    """The gated MLP on one fused projection x = [value; gate]: act(gate) * value. llama's ff_proj is the gate and
    up_proj the value (fused as [up_proj; ff_proj]); swiglu halves ff_proj's own output the same way."""
    def gated(x):
        x, gate = x.chunk(2, dim=-1)
        return act(gate) * x
    return gated


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # RoPE and RMSNorm run in at least fp32


class RMSNorm(nn.Module):
    """rms (x * weight) or gemma_rms (x * (1 + weight)), weight and bias optional."""

    def __init__(self, c: LLaDAConfig, dim: int, affine: bool):
        super().__init__()
        self.shape, self.eps, self.gemma = (dim,), c.rms_norm_eps, c.layer_norm_type == "gemma_rms"
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and c.norm_bias else None

    def forward(self, x):
        # Normalised in at least fp32 and cast back to the input dtype, then scaled (reference order): F.rms_norm
        # without a weight is exactly that.
        y = F.rms_norm(x, self.shape, eps=self.eps)
        if self.weight is not None:
            y = y * (1 + self.weight if self.gemma else self.weight)
        return y if self.bias is None else y + self.bias


def norm(c: LLaDAConfig, dim: int, affine: bool) -> nn.Module:
    """The config's layer norm: RMSNorm, or LayerNorm (default, low_precision) with torch's eps as the reference."""
    if "rms" in c.layer_norm_type:
        return RMSNorm(c, dim, affine)
    return nn.LayerNorm(dim, eps=1e-5, elementwise_affine=affine, bias=affine and c.norm_bias)


class Rope:
    """Rotate-half RoPE (angles [f, f] concatenated, in at least fp32) for one forward's positions, computed once and
    applied by every layer to its fused q/k/v projection viewed as [B, n, groups, n_kv_heads, D]: `groups` =
    n_heads / n_kv_heads query groups, then keys, then values, which the tables leave as they are (cos 1, sin 0).
    rotate_half(x) * sin = roll(x, D/2) * [-sin, sin]: the same products, bit for bit, in 4 ops."""

    def __init__(self, pos, inv_freq, groups: int, dtype):
        ang = pos.to(inv_freq.dtype)[..., None] * inv_freq  # [B, n, D/2]
        cos, sin = ang.cos(), ang.sin()
        cos, sin = torch.cat([cos, cos], -1)[:, :, None], torch.cat([-sin, sin], -1)[:, :, None]  # [B, n, 1, D]
        rest = (*cos.shape[:2], groups - 1, cos.shape[-1])
        self.cos = torch.cat([cos.expand(rest), torch.ones_like(cos)], 2)[:, :, :, None]  # [B, n, groups, 1, D]
        self.sin = torch.cat([sin.expand(rest), torch.zeros_like(sin)], 2)[:, :, :, None]
        self.half, self.cast = inv_freq.shape[0], dtype != inv_freq.dtype

    def __call__(self, x):
        y = x.to(self.cos.dtype) if self.cast else x
        y = y * self.cos + y.roll(self.half, -1) * self.sin
        return y.to(x.dtype) if self.cast else y


def _same(x):
    return x


class KVCache(nn.Module):
    """Keys (rotated) and values of every canvas column in one buffer kv: [B, 2 * n_kv_heads, L, D], keys first; k
    and v are views of it (one write per layer). One verb: write a column range."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        # Uninitialised: a full forward writes every column before any read.
        self.register_buffer("kv", torch.empty((batch, 2 * heads, length, head_dim), dtype=dtype, device=device),
                             persistent=False)
        self._views()

    def _views(self):  # slices, not chunk(): the views are written through in place
        h = self.kv.shape[1] // 2
        self.k, self.v = self.kv[:, :h], self.kv[:, h:]

    def _apply(self, fn, recurse=True):  # .to() / .cuda() replace the buffer: renew the views
        super()._apply(fn, recurse)
        self._views()
        return self

    def update(self, cols, kv):
        """kv: [B, 2 * n_kv_heads, n, D] → columns cols [n] (a tensor: one op, static shapes); returns (k, v) of all
        columns."""
        self.kv.index_copy_(2, cols, kv)
        return self.k, self.v

    def update_at(self, rows, cols, kv, keys: int):
        """Rows at their own columns: write kv [B, 2 * n_kv_heads, n, D] at columns cols [B, n] of cache rows `rows`
        [B] (None = every row, in order); return (k, v) of the first `keys` columns of those rows."""
        r = torch.arange(kv.shape[0], device=kv.device) if rows is None else rows
        self.kv[r[:, None], :, cols] = kv.transpose(1, 2)
        if rows is None:
            return self.k[:, :, :keys], self.v[:, :, :keys]
        sel = self.kv[rows, :, :keys]
        h = sel.shape[1] // 2
        return sel[:, :h], sel[:, h:]

    def keep(self, rows: torch.Tensor):
        self.kv = self.kv[rows]
        self._views()


class Step:
    """What every layer of one forward shares, decided once per forward: the RoPE tables (or no rotation), the key
    mask [B, 1, 1, Lk] (or None) and how a layer gets the keys and values it attends to from its fresh ones
    kv [B, 2 * n_kv_heads, n, D] (write them into its cache and read the cache, or use them as they are)."""

    def __init__(self, rotate, key_mask, keys):
        self.rotate, self.key_mask, self.keys = rotate, key_mask, keys


class Block(nn.Module):
    """llama: q/k/v_proj, MLP act(ff_proj) * up_proj; sequential: fused att_proj [q; k; v], MLP act(ff_proj).

    Built under the checkpoint's names (what loading, PEFT and saving see); `fuse()` folds a llama block into the
    sequential layout (att_proj = [q; k; v], ff_proj = [up_proj; ff_proj] gated): one matmul each. The choice is
    made there, not per forward (`qkv`, `ff_in`). state_dict() of a fused block still gives the checkpoint's names
    (split views), and load_state_dict takes them."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        d, kv, width, bias = c.d_model, c.kv_heads * c.head_dim, c.mlp_width, c.include_bias
        qkv_bias = c.include_bias or c.include_qkv_bias
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.groups, self.gqa = c.n_heads // c.kv_heads + 2, c.kv_heads != c.n_heads  # query groups, keys, values
        self.llama, self.clip, self.split = c.block_type == "llama", c.clip_qkv, (d, kv, kv)
        act = ACTIVATIONS.get(c.activation_type, F.silu)  # swiglu: silu, gated
        self.mlp_act = _gated(act) if self.llama or c.activation_type == "swiglu" else act
        self.attn_norm, self.ff_norm = norm(c, d, c.layer_norm_with_affine), norm(c, d, c.layer_norm_with_affine)
        self.adjust = _same  # on the fused q/k/v projection: OLMo's clip_qkv, then the q/k layer norms
        if c.attention_layer_norm:
            self.q_norm = norm(c, d, c.attention_layer_norm_with_affine)
            self.k_norm = norm(c, kv, c.attention_layer_norm_with_affine)
        if c.attention_layer_norm or c.clip_qkv is not None:
            self.adjust = self._adjust
        # Registration order = the reference's (random init draws in this order).
        if self.llama:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, n, bias=qkv_bias) for n in self.split)
        else:
            self.att_proj = nn.Linear(d, d + 2 * kv, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_proj = nn.Linear(d, width, bias=bias)  # llama: the gate
        if self.llama:
            self.up_proj = nn.Linear(d, width, bias=bias)
        self.qkv, self.ff_in = (self._qkv_parts, self._ff_parts) if self.llama else (self._qkv_fused, self._ff_fused)
        self.ff_out = nn.Linear(width // 2 if c.activation_type == "swiglu" else width, d, bias=bias)
        self.kv_cache: KVCache | None = None
        self._register_state_dict_hook(_checkpoint_names)
        self._register_load_state_dict_pre_hook(_fused_names, with_module=True)

    @property
    def fused(self) -> bool:
        return not self.llama or not hasattr(self, "q_proj")

    @torch.no_grad()
    def fuse(self) -> None:
        if self.fused:
            return
        with torch.inference_mode(False):  # fused weights must stay usable outside inference mode
            self.att_proj = _cat_linear(self.q_proj, self.k_proj, self.v_proj)
            self.ff_proj = _cat_linear(self.up_proj, self.ff_proj)
        del self.q_proj, self.k_proj, self.v_proj, self.up_proj
        self.qkv, self.ff_in = self._qkv_fused, self._ff_fused

    @torch.no_grad()
    def unfuse(self) -> None:
        """Back to the checkpoint's modules (PEFT adapters target them; saving writes no shared tensors)."""
        if not self.llama or not self.fused:
            return
        with torch.inference_mode(False):
            self.q_proj, self.k_proj, self.v_proj = _split_linear(self.att_proj, self.split)
            self.up_proj, self.ff_proj = _split_linear(self.ff_proj, (self.ff_proj.out_features // 2,) * 2)
        del self.att_proj
        self.qkv, self.ff_in = self._qkv_parts, self._ff_parts

    # The input projections, fused (one matmul) or as the checkpoint's parts (PEFT may wrap them): same outputs.
    def _qkv_fused(self, a):
        return self.att_proj(a)

    def _qkv_parts(self, a):
        return torch.cat([self.q_proj(a), self.k_proj(a), self.v_proj(a)], -1)

    def _ff_fused(self, f):
        return self.ff_proj(f)

    def _ff_parts(self, f):
        return torch.cat([self.up_proj(f), self.ff_proj(f)], -1)

    def _adjust(self, x):
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        if hasattr(self, "q_norm"):
            q, k, v = x.split(self.split, dim=-1)
            x = torch.cat([self.q_norm(q), self.k_norm(k), v], -1)
        return x

    def forward(self, h, step: Step):
        B, n, d = h.shape
        x = self.adjust(self.qkv(self.attn_norm(h)))  # [B, n, d + 2 kv]: q, k, v
        x = step.rotate(x.view(B, n, self.groups, self.n_kv_heads, self.head_dim)).view(B, n, -1, self.head_dim)
        q, kv = x.split((self.n_heads, 2 * self.n_kv_heads), dim=2)
        k, v = step.keys(self.kv_cache, kv.transpose(1, 2))
        # Bidirectional: every query sees every (non-pad) key.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=step.key_mask, enable_gqa=self.gqa)
        h = h + self.attn_out(o.transpose(1, 2).reshape(B, n, d))
        return h + self.ff_out(self.mlp_act(self.ff_in(self.ff_norm(h))))


def _cat_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs concatenated (weights copied once; the parts can go)."""
    w = parts[0].weight
    out = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None, device="meta")
    out.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=w.requires_grad)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=w.requires_grad)
    return out


def _split_linear(fused: nn.Linear, sizes) -> list[nn.Linear]:
    w, b = fused.weight.split(sizes), fused.bias.split(sizes) if fused.bias is not None else [None] * len(sizes)
    out = []
    for wi, bi in zip(w, b):
        m = nn.Linear(wi.shape[1], wi.shape[0], bias=bi is not None, device="meta")
        m.weight = nn.Parameter(wi.clone(), requires_grad=fused.weight.requires_grad)
        if bi is not None:
            m.bias = nn.Parameter(bi.clone(), requires_grad=fused.weight.requires_grad)
        out.append(m)
    return out


def _checkpoint_names(block: Block, sd: dict, prefix: str, _meta) -> None:
    """state_dict hook: a fused llama block's att_proj / ff_proj as the checkpoint's q/k/v_proj, ff_proj, up_proj."""
    if not block.llama or not block.fused:
        return
    for kind in ("weight", "bias"):
        if f"{prefix}att_proj.{kind}" in sd:
            for name, t in zip(("q_proj", "k_proj", "v_proj"), sd.pop(f"{prefix}att_proj.{kind}").split(block.split)):
                sd[f"{prefix}{name}.{kind}"] = t
        if f"{prefix}ff_proj.{kind}" in sd:
            sd[f"{prefix}up_proj.{kind}"], sd[f"{prefix}ff_proj.{kind}"] = sd.pop(f"{prefix}ff_proj.{kind}").chunk(2)


def _fused_names(block: Block, sd: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: checkpoint names into a fused llama block."""
    if not block.llama or not block.fused:
        return
    for kind in ("weight", "bias"):
        names = [f"{prefix}{n}.{kind}" for n in ("q_proj", "k_proj", "v_proj")]
        if all(n in sd for n in names):
            sd[f"{prefix}att_proj.{kind}"] = torch.cat([sd.pop(n) for n in names])
        names = [f"{prefix}up_proj.{kind}", f"{prefix}ff_proj.{kind}"]
        if all(n in sd for n in names):
            sd[names[1]] = torch.cat([sd.pop(n) for n in names])


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as in the checkpoint: `model.transformer.{wte, [wpe], blocks.i.*, ln_f, [ff_out]}`."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        config.check()
        super().__init__(config)
        c = config
        transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.rows, c.d_model),
            blocks=nn.ModuleList(Block(c) for _ in range(c.n_layers)),
            ln_f=norm(c, c.d_model, c.layer_norm_with_affine),
        ))
        if not c.rope:
            transformer["wpe"] = nn.Embedding(c.max_sequence_length, c.d_model)
        if not c.weight_tying:
            transformer["ff_out"] = nn.Linear(c.d_model, c.rows, bias=c.include_bias)
        self.model = nn.ModuleDict(dict(transformer=transformer))  # nesting = the checkpoint's key names
        self._inv_freq: dict = {}  # RoPE inverse frequencies by (device, dtype)
        self._cached_step: Callable | None = None  # the compiled dual-cache block forward (compile_block_step)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.zeros_(module.weight) if getattr(module, "gemma", False) else nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model["transformer"]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    # --- fused projections ---
    def fuse(self) -> "LLaDAModelLM":
        """Fold each llama block's q/k/v_proj and ff_proj/up_proj into one matmul each (in place; idempotent;
        load_model does it). Merge adapters before: PEFT targets the checkpoint's modules. state_dict() and
        save_pretrained still write the checkpoint's names. An unfused model computes the same logits."""
        for blk in self.transformer.blocks:
            blk.fuse()
        return self

    def unfuse(self) -> "LLaDAModelLM":
        """Back to the checkpoint's modules (before a PEFT merge, or to save without split copies)."""
        for blk in self.transformer.blocks:
            blk.unfuse()
        return self

    # --- KV cache (Fast-dLLM prefix / dual modes) ---
    def setup_cache(self, batch: int, length: int):
        """Allocate per-layer K/V for `batch` rows of a `length`-column canvas (kept when the shape matches)."""
        p, c = self.transformer.wte.weight, self.config
        first = self.transformer.blocks[0].kv_cache
        if first is not None and first.kv.shape[0] == batch and first.kv.shape[2] == length:
            return
        for blk in self.transformer.blocks:
            blk.kv_cache = KVCache(batch, c.kv_heads, length, c.head_dim, p.dtype, p.device)

    def grow_cache(self, batch: int, length: int):
        """Room for at least `batch` rows and `length` columns; what is cached stays, new room is zeros (masked
        keys must be finite: a zero attention weight times NaN is NaN)."""
        p, c = self.transformer.wte.weight, self.config
        for blk in self.transformer.blocks:
            old = blk.kv_cache
            b0, l0 = (old.kv.shape[0], old.kv.shape[2]) if old is not None else (0, 0)
            if b0 >= batch and l0 >= length:
                continue
            new = KVCache(max(b0, batch), c.kv_heads, max(l0, length), c.head_dim, p.dtype, p.device)
            new.kv.zero_()
            if old is not None:
                new.kv[:b0, :, :l0] = old.kv
            blk.kv_cache = new

    def select_cache_rows(self, rows: torch.Tensor):
        """Keep only these batch rows of the cache (the batch shrank)."""
        for blk in self.transformer.blocks:
            blk.kv_cache.keep(rows)

    def clear_cache(self):
        for blk in self.transformer.blocks:
            blk.kv_cache = None

    def rope(self, pos, dtype) -> Callable:
        """The rotation every layer applies for positions pos [B, n] (identity without RoPE)."""
        c = self.config
        if not c.rope:
            return _same
        acc = ACC.get(dtype, dtype)
        key = (pos.device, acc)
        if key not in self._inv_freq:
            d = c.head_dim
            self._inv_freq[key] = 1.0 / c.rope_theta ** (torch.arange(0, d, 2, device=pos.device, dtype=acc) / d)
        return Rope(pos, self._inv_freq[key], c.n_heads // c.kv_heads + 2, dtype)

    def compile_block_step(self, mode: str | None = None) -> bool:
        """Run the cached forwards without a logits slice (Fast-dLLM's dual-cache block steps) through torch.compile
        (dynamic=False) at few shapes. Tensors only (columns and positions are tensors). Rows at their own positions
        (the "at" write, the running set) are bucketed: the batch is padded to the next power of two, capped at the
        cache's rows (cache rows 6: buckets 1, 2, 4, 6), with copies of row 0 (same ids and positions, row 0's cache
        row, writing only its last column, which no real row reads), and the key mask to the cache's allocated length (False beyond the real
        keys; the cache there is finite); the padding rows' logits are dropped. So a cache shape and block length
        compile once per bucket, whatever the batch size and key width; a "range" write (every cache row, the whole
        canvas as keys) has one shape per block length already. mode None = "reduce-overhead" (CUDA graphs) on
        CUDA, the default elsewhere. Falls back to eager, logging why, when torch.compile is unavailable or the first
        compiled call fails. Returns whether it compiles (so far)."""
        dev = self.transformer.wte.weight.device
        mode = mode or ("reduce-overhead" if dev.type == "cuda" else "default")
        try:
            self._cached_step = torch.compile(self._body, mode=mode, dynamic=False)
        except (RuntimeError, ImportError, AssertionError) as e:  # e.g. an unsupported Python or platform
            log.warning("model.compile: torch.compile unavailable (%s); the block steps run eager", e)
            self._cached_step = None
        return self._cached_step is not None

    def forward(self, input_ids, attention_mask=None, start: int = 0, use_cache: bool = False,
                logits_slice: slice | torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, **kwargs):
        """Logits for canvas columns [start, start + n) given as input_ids [B, n].

        attention_mask: [B, L] over the whole canvas (1 = real token, 0 = padding). Positions count real tokens,
          so a left-padded row gets the same RoPE positions as when it runs alone. None = no padding.
        use_cache: write this range's K/V into the cache and attend to all cached columns (setup_cache first).
          Prefix mode forwards [s, L) after a full forward; dual mode forwards [s, e) of a full cache.
        logits_slice: columns (relative to start) to compute logits for: a slice, or per-row indices [B, m];
          None = all n.
        input_pos: [B, n] rows at their own positions (the sampler's running set): each input column's RoPE position
          and, with use_cache, its cache column in cache row `cache_rows` [B] (None = every cache row, in order).
          attention_mask [B, Lk] (required) is then the key mask: over the n input columns without use_cache, over
          the first Lk cached columns with it. `start` is unused.
        """
        if kwargs.get("past_key_values") is not None:
            raise ValueError("past_key_values is not supported: use setup_cache() and use_cache=True")
        B, n = input_ids.shape
        dev = input_ids.device
        cols = torch.arange(start, start + n, device=dev)
        if input_pos is not None:  # rows at their own positions: the positions are the cache columns
            pos, key_mask = input_pos.to(dev), attention_mask.to(dev).bool()[:, None, None, :]
            cols, write = pos, "at"
        elif attention_mask is None:
            pos, key_mask = cols.expand(B, n), None
        else:
            am = attention_mask.to(dev).bool()
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + n]
            key_mask = (am if use_cache else am[:, start:start + n])[:, None, None, :]
        if input_pos is None:
            write = "range" if use_cache else None
        elif not use_cache:
            write = None
        if write and logits_slice is None and self._cached_step is not None:
            try:
                return CausalLMOutputWithPast(logits=self._bucketed(input_ids, pos, key_mask, write, cols,
                                                                    cache_rows))
            except Exception as e:  # noqa: BLE001 — whatever the compiler raised: say why, then run eager
                log.warning("model.compile: the compiled block step failed (%s: %s); running eager from now on",
                            type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
                self._cached_step = None
        return CausalLMOutputWithPast(logits=self._body(input_ids, pos, key_mask, write, cols, cache_rows,
                                                        logits_slice))

    def _bucketed(self, input_ids, pos, key_mask, write: str, cols, rows):
        """The compiled block step at a bucketed shape (compile_block_step): an "at" write's batch padded with copies
        of row 0 to a bucket, its key mask to the cache length; returns the real rows' logits."""
        if write != "at":
            return self._cached_step(input_ids, pos, key_mask, write, cols, rows, None)
        kv = self.transformer.blocks[0].kv_cache.kv
        R, L = kv.shape[0], kv.shape[2]
        B, dev = input_ids.shape[0], input_ids.device
        pad = min(1 << (B - 1).bit_length(), max(R, B)) - B
        if pad:  # padding rows need a cache row (row 0's: "range"-like rows=None would write every row) ...
            rows = torch.arange(B, device=dev) if rows is None else rows.to(dev)
            i = torch.cat([torch.arange(B, device=dev), torch.zeros(pad, dtype=torch.long, device=dev)])
            input_ids, pos, rows, key_mask = input_ids[i], pos[i], rows[i], key_mask[i]
            # ... and write only the cache's last column, which no key mask lets a real row read (it lies past every
            # canvas: the set's width is its longest canvas + 1), so row 0's cache never depends on their values
            cols = torch.cat([cols, cols.new_full((pad, cols.shape[1]), L - 1)])
        if key_mask.shape[-1] < L:  # masked keys past the real ones: [B, 1, 1, L]
            key_mask = torch.cat([key_mask, key_mask.new_zeros(*key_mask.shape[:-1], L - key_mask.shape[-1])], -1)
        return self._cached_step(input_ids, pos, key_mask, write, cols, rows, None)[:B]

    def _body(self, input_ids, pos, key_mask, write: str | None, cols, rows, logits_slice):
        """From token ids to logits. pos [B, n]: RoPE positions; write: None (no cache), "range" (cache columns
        cols [n] of every cache row) or "at" (columns cols [B, n] of cache rows `rows`, keys = key_mask's width)."""
        c, t = self.config, self.transformer
        h = t.wte(input_ids)
        if c.input_emb_norm:
            h = h * c.d_model ** 0.5
        if not c.rope:
            h = h + t.wpe(pos)
        if write == "range":
            def keys(cache, kv):
                return cache.update(cols, kv)
        elif write == "at":
            def keys(cache, kv):
                return cache.update_at(rows, cols, kv, key_mask.shape[-1])
        else:
            def keys(cache, kv):
                return kv.chunk(2, dim=1)
        step = Step(self.rope(pos, h.dtype), key_mask, keys)
        for blk in t.blocks:
            h = blk(h, step)
        if isinstance(logits_slice, torch.Tensor):
            h = h.gather(1, logits_slice[..., None].expand(-1, -1, h.shape[-1]))
        elif logits_slice is not None:
            h = h[:, logits_slice]
        h = t.ln_f(h)
        logits = F.linear(h, t.wte.weight) if c.weight_tying else t.ff_out(h)
        if c.scale_logits:
            logits = logits * (1 / math.sqrt(c.d_model))
        return logits
