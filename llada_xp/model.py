"""Native LLaDA architecture: the bidirectional OLMo-style transformer of LLaDA's config.json, with its key names.

Every config option that changes the math at inference is folded in where it acts (block type, grouped KV heads,
biases, norms, activation, RoPE or learned positions, tied or padded embeddings, logit scaling); options the reference
code defines but we do not implement are refused by name in `LLaDAConfig.check`. Adds what the reference modeling code
lacks: left-padding masks with per-row RoPE positions, a KV cache the model owns (Fast-dLLM prefix and dual modes, with
n_kv_heads heads) and logits for only the columns asked for. Architecture only: it knows nothing about sampling, files
or HTTP (loading lives in loading.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

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


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "swiglu": _swiglu}


class Norm(nn.Module):
    """RMSNorm (rms; gemma_rms scales by 1 + w) or LayerNorm (default, low_precision), weight and bias optional."""

    def __init__(self, c: LLaDAConfig, dim: int, affine: bool):
        super().__init__()
        self.kind = c.layer_norm_type
        self.eps = c.rms_norm_eps if "rms" in self.kind else 1e-5  # the reference LayerNorm keeps torch's eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and c.norm_bias else None

    def forward(self, x):
        if "rms" not in self.kind:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # Normalise in at least fp32, cast back to the input dtype, then scale (reference order).
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y * (1 + self.weight if self.kind == "gemma_rms" else self.weight)
        return y if self.bias is None else y + self.bias


def rope(x, pos, theta: float):
    """Rotate-half RoPE, angles [f, f] concatenated, in at least fp32. x: [B, H, n, D], pos: [B, n]."""
    dt = torch.promote_types(x.dtype, torch.float32)
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=dt) / d)
    ang = pos.to(dt)[:, None, :, None] * inv_freq  # [B, 1, n, D/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    y = x.to(dt)
    x1, x2 = y.chunk(2, dim=-1)
    return (y * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys (rotated) and values of every canvas column: [B, n_kv_heads, L, D]. One verb: write a column range."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        # Uninitialised: a full forward writes every column before any read.
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v
        return self.k, self.v

    def update_at(self, rows, cols, k, v, keys: int):
        """Rows at their own columns: write k, v [B, H, n, D] at columns cols [B, n] of cache rows `rows` [B]
        (None = every row, in order); return the first `keys` columns of those rows."""
        r = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        self.k[r[:, None], :, cols] = k.transpose(1, 2)
        self.v[r[:, None], :, cols] = v.transpose(1, 2)
        if rows is None:
            return self.k[:, :, :keys], self.v[:, :, :keys]
        return self.k[rows, :, :keys], self.v[rows, :, :keys]


class Block(nn.Module):
    """llama: q/k/v_proj, MLP act(ff_proj) * up_proj; sequential: fused att_proj [q; k; v], MLP act(ff_proj)."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        d, kv, width, bias = c.d_model, c.kv_heads * c.head_dim, c.mlp_width, c.include_bias
        qkv_bias = c.include_bias or c.include_qkv_bias
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.theta = c.rope_theta if c.rope else None
        self.clip, self.act, self.split = c.clip_qkv, ACTIVATIONS[c.activation_type], (d, kv, kv)
        self.attn_norm, self.ff_norm = Norm(c, d, c.layer_norm_with_affine), Norm(c, d, c.layer_norm_with_affine)
        if c.attention_layer_norm:
            self.q_norm = Norm(c, d, c.attention_layer_norm_with_affine)
            self.k_norm = Norm(c, kv, c.attention_layer_norm_with_affine)
        if c.block_type == "sequential":
            self.att_proj = nn.Linear(d, d + 2 * kv, bias=qkv_bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, n, bias=qkv_bias) for n in self.split)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_proj = nn.Linear(d, width, bias=bias)  # llama: the gate
        if c.block_type == "llama":
            self.up_proj = nn.Linear(d, width, bias=bias)
        self.ff_out = nn.Linear(width // 2 if c.activation_type == "swiglu" else width, d, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(self, h, pos, start: int, key_mask, use_cache: bool, rows=None, at: bool = False):
        B, n, d = h.shape
        a = self.attn_norm(h)
        if hasattr(self, "att_proj"):
            q, k, v = self.att_proj(a).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(a)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.theta is not None:
            q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if use_cache and at:  # rows at their own positions: pos are the cache columns, key_mask the keys
            k, v = self.kv_cache.update_at(rows, pos, k, v, key_mask.shape[-1])
        elif use_cache:
            k, v = self.kv_cache.update(start, k, v)
        # Bidirectional: every query sees every (non-pad) key; key_mask: [B, 1, 1, Lk] or None.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=self.n_kv_heads != self.n_heads)
        h = h + self.attn_out(o.transpose(1, 2).reshape(B, n, d))
        f = self.ff_norm(h)
        x = self.act(self.ff_proj(f))
        if hasattr(self, "up_proj"):
            x = x * self.up_proj(f)
        return h + self.ff_out(x)


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
            ln_f=Norm(c, c.d_model, c.layer_norm_with_affine),
        ))
        if not c.rope:
            transformer["wpe"] = nn.Embedding(c.max_sequence_length, c.d_model)
        if not c.weight_tying:
            transformer["ff_out"] = nn.Linear(c.d_model, c.rows, bias=c.include_bias)
        self.model = nn.ModuleDict(dict(transformer=transformer))  # nesting = the checkpoint's key names
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Norm):
            if module.weight is not None:
                nn.init.zeros_(module.weight) if module.kind == "gemma_rms" else nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model["transformer"]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    # --- KV cache (Fast-dLLM prefix / dual modes) ---
    def setup_cache(self, batch: int, length: int):
        """Allocate per-layer K/V for `batch` rows of a `length`-column canvas (kept when the shape matches)."""
        p, c = self.transformer.wte.weight, self.config
        first = self.transformer.blocks[0].kv_cache
        if first is not None and first.k.shape[0] == batch and first.k.shape[2] == length:
            return
        for blk in self.transformer.blocks:
            blk.kv_cache = KVCache(batch, c.kv_heads, length, c.head_dim, p.dtype, p.device)

    def grow_cache(self, batch: int, length: int):
        """Room for at least `batch` rows and `length` columns; what is cached stays, new room is zeros (masked
        keys must be finite: a zero attention weight times NaN is NaN)."""
        p, c = self.transformer.wte.weight, self.config
        for blk in self.transformer.blocks:
            old = blk.kv_cache
            b0, l0 = (old.k.shape[0], old.k.shape[2]) if old is not None else (0, 0)
            if b0 >= batch and l0 >= length:
                continue
            new = KVCache(max(b0, batch), c.kv_heads, max(l0, length), c.head_dim, p.dtype, p.device)
            new.k.zero_(), new.v.zero_()
            if old is not None:
                new.k[:b0, :, :l0], new.v[:b0, :, :l0] = old.k, old.v
            blk.kv_cache = new

    def select_cache_rows(self, rows: torch.Tensor):
        """Keep only these batch rows of the cache (the batch shrank)."""
        for blk in self.transformer.blocks:
            blk.kv_cache.k, blk.kv_cache.v = blk.kv_cache.k[rows], blk.kv_cache.v[rows]

    def clear_cache(self):
        for blk in self.transformer.blocks:
            blk.kv_cache = None

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
        dev, c, t = input_ids.device, self.config, self.transformer
        at = input_pos is not None
        if at:
            pos, key_mask = input_pos.to(dev), attention_mask.to(dev).bool()[:, None, None, :]
        elif attention_mask is None:
            pos = torch.arange(start, start + n, device=dev).expand(B, n)
            key_mask = None
        else:
            am = attention_mask.to(dev).bool()
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + n]
            key_mask = (am if use_cache else am[:, start:start + n])[:, None, None, :]
        h = t.wte(input_ids)
        if c.input_emb_norm:
            h = h * c.d_model ** 0.5
        if not c.rope:
            h = h + t.wpe(pos)
        for blk in t.blocks:
            h = blk(h, pos, start, key_mask, use_cache, cache_rows, at)
        if isinstance(logits_slice, torch.Tensor):
            h = h.gather(1, logits_slice[..., None].expand(-1, -1, h.shape[-1]))
        elif logits_slice is not None:
            h = h[:, logits_slice]
        h = t.ln_f(h)
        logits = F.linear(h, t.wte.weight) if c.weight_tying else t.ff_out(h)
        if c.scale_logits:
            logits = logits * (1 / math.sqrt(c.d_model))
        return CausalLMOutputWithPast(logits=logits)
