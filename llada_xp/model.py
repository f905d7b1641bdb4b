"""Native LLaDA architecture: bidirectional Llama-style transformer with the checkpoint's exact key names.

Adds what the reference modeling code lacks: left-padding masks with per-row RoPE positions, a KV cache the model
owns (Fast-dLLM prefix and dual modes), and logits for only the columns asked for. Architecture only: it knows
nothing about sampling, files or HTTP (loading lives in loading.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LLaDAConfig(PretrainedConfig):
    """The fields of LLaDA's config.json (defaults: LLaDA-8B-Instruct). Unknown fields are kept as attributes."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        max_sequence_length: int = 4096,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, embedding_size
        self.rope_theta, self.rms_norm_eps, self.max_sequence_length = rope_theta, rms_norm_eps, max_sequence_length
        self.mask_token_id = mask_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} != n_heads={self.n_heads}: grouped-query attention "
                             "is not part of the LLaDA architecture")

    @property
    def rows(self) -> int:
        """Rows of the embedding and the LM head (embedding_size pads the vocabulary when set)."""
        return self.embedding_size or self.vocab_size


# Size presets (config.json values); "llada-8b" is LLaDA-8B-Instruct / LLaDA-1.5.
PRESETS: dict[str, dict] = {
    "llada-8b": dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                     embedding_size=126464, rope_theta=500000.0, max_sequence_length=4096),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in at least fp32, cast back to the input dtype, then scale (reference order).
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


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
    """Keys (rotated) and values of every canvas column: [B, H, L, D]. One verb: write a column range, read all."""

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
    def __init__(self, c: LLaDAConfig):
        super().__init__()
        d, self.n_heads, self.theta = c.d_model, c.n_heads, c.rope_theta
        self.attn_norm, self.ff_norm = RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)  # the SiLU gate
        self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, h, pos, start: int, key_mask, use_cache: bool, rows=None, at: bool = False):
        B, n, d = h.shape
        a = self.attn_norm(h)
        q, k, v = (p(a).view(B, n, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if use_cache and at:  # rows at their own positions: pos are the cache columns, key_mask the keys
            k, v = self.kv_cache.update_at(rows, pos, k, v, key_mask.shape[-1])
        elif use_cache:
            k, v = self.kv_cache.update(start, k, v)
        # Bidirectional: every query sees every (non-pad) key; key_mask: [B, 1, 1, Lk] or None.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        h = h + self.attn_out(o.transpose(1, 2).reshape(B, n, d))
        f = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(f)) * self.up_proj(f))


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as in the checkpoint: `model.transformer.{wte, blocks.i.*, ln_f, ff_out}`."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.rows, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.rows, bias=False),
        ))
        self.model = nn.ModuleDict(dict(transformer=transformer))  # nesting = the checkpoint's key names
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model["transformer"]

    # --- KV cache (Fast-dLLM prefix / dual modes) ---
    def setup_cache(self, batch: int, length: int):
        """Allocate per-layer K/V for `batch` rows of a `length`-column canvas (kept when the shape matches)."""
        p, c = self.transformer.wte.weight, self.config
        first = self.transformer.blocks[0].kv_cache
        if first is not None and first.k.shape[0] == batch and first.k.shape[2] == length:
            return
        for blk in self.transformer.blocks:
            blk.kv_cache = KVCache(batch, c.n_heads, length, c.d_model // c.n_heads, p.dtype, p.device)

    def grow_cache(self, batch: int, length: int):
        """Room for at least `batch` rows and `length` columns; what is cached stays, new room is zeros (masked
        keys must be finite: a zero attention weight times NaN is NaN)."""
        p, c = self.transformer.wte.weight, self.config
        for blk in self.transformer.blocks:
            old = blk.kv_cache
            b0, l0 = (old.k.shape[0], old.k.shape[2]) if old is not None else (0, 0)
            if b0 >= batch and l0 >= length:
                continue
            new = KVCache(max(b0, batch), c.n_heads, max(l0, length), c.d_model // c.n_heads, p.dtype, p.device)
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
        dev = input_ids.device
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
        h = self.transformer.wte(input_ids)
        for blk in self.transformer.blocks:
            h = blk(h, pos, start, key_mask, use_cache, cache_rows, at)
        if isinstance(logits_slice, torch.Tensor):
            h = h.gather(1, logits_slice[..., None].expand(-1, -1, h.shape[-1]))
        elif logits_slice is not None:
            h = h[:, logits_slice]
        logits = self.transformer.ff_out(self.transformer.ln_f(h))
        return CausalLMOutputWithPast(logits=logits)
