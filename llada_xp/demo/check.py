"""Held-out accuracy of a model on the demo task, decoded by the project's Sampler (the only decoding loop).

Knows the task and the chat template; knows nothing about training.
"""

from __future__ import annotations

from collections import defaultdict

from llada_xp.config import SamplerConfig
from llada_xp.demo.task import HELD_OUT_SEED, examples, score
from llada_xp.sampler import Request, Sampler, SpecialIds


def special_ids(tokenizer) -> SpecialIds:
    """The sampler's ids, read from the tokenizer."""
    return SpecialIds(mask=tokenizer.mask_token_id, eos=tokenizer.eos_token_id,
                      eot=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad=tokenizer.pad_token_id)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


def accuracy(model, tokenizer, settings: SamplerConfig, n: int = 500, seed: int = HELD_OUT_SEED,
             batch_size: int = 50) -> dict:
    """Exact-match accuracy on `n` examples of `seed`, overall and per skill, with mean forwards per answer and
    canvas columns committed per forward (sampler Stats)."""
    sampler = Sampler(model, special_ids(tokenizer), decode=tokenizer.decode)
    exs = examples(n, seed)
    hits, per_skill = [], defaultdict(list)
    nfe = committed = 0
    for i in range(0, n, batch_size):
        chunk = exs[i:i + batch_size]
        results = sampler.generate([Request(prompt_ids(tokenizer, e.prompt), settings) for e in chunk])
        for e, r in zip(chunk, results):
            ok = score(tokenizer.decode(r.tokens, skip_special_tokens=True), e.answer)
            hits.append(ok)
            per_skill[e.skill].append(ok)
            nfe += r.stats.nfe
            committed += r.stats.committed
    return dict(accuracy=sum(hits) / n, n=n,
                per_skill={k: sum(v) / len(v) for k, v in sorted(per_skill.items())},
                nfe_per_answer=nfe / n, tokens_per_forward=committed / nfe if nfe else 0.0)
