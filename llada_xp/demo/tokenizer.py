"""The demo model's tokenizer: byte-level characters, with a leading space fused into the next character.

Built in code (no training, no download) so it is deterministic: the 256 byte symbols of GPT-2's byte-level
alphabet; one merge per printable ASCII character for "space + character" (so "d a c b" is four tokens); the chat
roles as whole-word tokens; LLaDA's special tokens under LLaDA's names and roles (model.md). Decoding returns the
exact text. It knows nothing about the task or the model.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, EOT, MASK = "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]
ROLES = ["user", "assistant", "system"]  # one token each as whole words (shorter prompts); decode unchanged

# LLaDA-8B-Instruct's template, verbatim (model.md): BOS once, each message "<sh>ROLE<eh>\n\n" + trimmed content +
# "<|eot_id|>", then the assistant header + "\n\n" — always, as in LLaDA's (add_generation_prompt is not consulted).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (the one tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer, ready to `save_pretrained`."""
    byte = _byte_alphabet()
    space = byte[ord(" ")]
    vocab = {sym: i for i, sym in enumerate(byte[b] for b in range(256))}
    merges = [(space, byte[ord(c)]) for c in string.digits + string.ascii_letters + string.punctuation]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids in SPECIAL_TOKENS order, right after the merges
    tok.add_tokens([AddedToken(r, single_word=True, normalized=False) for r in ROLES])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT], model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.add_bos_token = fast.add_eos_token = False
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """save_pretrained, with a tokenizer_config.json that every transformers version pyproject admits can read:
    transformers 5 writes its own class name (TokenizersBackend) and `extra_special_tokens`, which 4.x refuses."""
    tok.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
