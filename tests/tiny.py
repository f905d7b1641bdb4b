"""Tiny LLaDA models and a tokenizer in the exact Hub layout, made in-process (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from llada_xp.model import LLaDAConfig, LLaDAModelLM
from llada_xp.sampler import SpecialIds

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|mdm_mask|>"]
WORDS = ["hello", "world", "the", "a", "cat", "sat", "on", "mat", "user", "assistant", "system", "\n"] + \
    [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[2:])
    t.chat_template = CHAT_TEMPLATE
    return t


def config(tok=None, **kw) -> LLaDAConfig:
    tok = tok or tokenizer()
    v = tok.get_vocab()
    base = dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=len(v) + 4,
                embedding_size=len(v) + 4, rope_theta=10000.0, max_sequence_length=256,
                mask_token_id=v["<|mdm_mask|>"], eos_token_id=v["<|endoftext|>"], pad_token_id=v["<|endoftext|>"])
    base.update(kw)
    return LLaDAConfig(**base)


def model(seed: int = 0, dtype=torch.float64, sharpen: float = 1.0, eos_boost: float = 1.0, **kw) -> LLaDAModelLM:
    """A random tiny LLaDA; sharpen > 1 scales the LM head so confidences spread out (threshold paths fire);
    eos_boost > 1 scales the EOS row so answers end early (early stop has something to save)."""
    torch.manual_seed(seed)
    m = LLaDAModelLM(config(**kw)).to(dtype).eval()
    t = m.transformer
    with torch.no_grad():  # tied embeddings: sharpen through ln_f, which feeds only the LM head
        (t.ln_f if m.config.weight_tying else t.ff_out).weight.mul_(sharpen)
        (t.wte if m.config.weight_tying else t.ff_out).weight[m.config.eos_token_id].mul_(eos_boost)
    return m


def write_hub_folder(path: Path, m: LLaDAModelLM, tok=None, shard_size: str = "20KB") -> Path:
    """Write m in the LLaDA Hub layout: config.json (with auto_map), sharded safetensors + index, tokenizer."""
    m.save_pretrained(path, max_shard_size=shard_size)
    (tok or tokenizer()).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                       "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def ids_of(m: LLaDAModelLM) -> SpecialIds:
    """The sampler's special ids of a tiny model (EoT from the tiny tokenizer)."""
    return SpecialIds(mask=m.config.mask_token_id, eos=m.config.eos_token_id,
                      eot=tokenizer().get_vocab()["<|eot_id|>"], pad=m.config.pad_token_id)
