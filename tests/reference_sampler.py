"""A deliberately slow, single-row reference of LLaDA's generate() and Fast-dLLM's three samplers.

Written from shared/reference/sampling.md in the shape of the public reference code (full-canvas confidence arrays,
per-position loops, F.softmax in float64), not from llada_xp/sampler.py. Where the references leave something open,
it follows the rules llada_xp documents: the random stream (per step: Gumbel uniforms for the block's masked columns
in column order, then `random` remasking uniforms), ties to the leftmost column, the mask id never predicted, and the
step spread over blocks when the reference preconditions do not hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = float("-inf")


def steps_per_block(steps: int, gen: int, bl: int) -> list[int]:
    blocks = []
    start = 0
    while start < gen:
        end = min(start + bl, gen)
        share = (steps * end) // gen - (steps * start) // gen
        blocks.append(max(1, min(share, end - start)))
        start = end
    return blocks


def num_transfer_tokens(masks: int, steps: int) -> list[int]:
    out = [masks // steps] * steps
    for i in range(masks % steps):
        out[i] += 1
    return out


def topk_leftmost(conf: list[float], k: int) -> list[int]:
    order = sorted(range(len(conf)), key=lambda j: (-conf[j], j))
    return order[:k]


def pick(logits, x, lo, hi, mask_index, st, ids, gen, quota_k):
    """One selection over the canvas (Fast-dLLM get_transfer_index / _dynamic). logits: [L', V] for x[lo:]."""
    logits = logits.clone().double()
    logits[:, ids.mask] = NEG
    if st.logits_eos_inf:
        logits[:, ids.eos] = NEG
    n = logits.shape[0]
    x0 = logits.argmax(-1)
    masked_cols = [j for j in range(n) if mask_index[j]]
    if st.temperature > 0:
        u = torch.rand((len(masked_cols), logits.shape[1]), dtype=torch.float64, generator=gen)
        for r, j in enumerate(masked_cols):
            x0[j] = (logits[j].exp() / (-torch.log(u[r])) ** st.temperature).argmax()
    lc = logits.clone()
    if st.confidence_eos_eot_inf:
        lc[:, [ids.eos, ids.eot]] = NEG
    p = F.softmax(lc, dim=-1)
    conf = [NEG] * n
    for j in masked_cols:
        conf[j] = float(p[j, x0[j]])
    if st.remasking == "random":
        u = torch.rand(len(masked_cols), dtype=torch.float64, generator=gen)
        for r, j in enumerate(masked_cols):
            conf[j] = float(u[r])
    m = len(masked_cols)
    if st.factor is not None:
        srt = sorted((conf[j] for j in masked_cols), reverse=True)
        threshs = [1 - st.factor / (i + 1) for i in range(1, m + 1)]
        threshs[0] = -1
        top_i = 0
        for top_i in range(m):
            if srt[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == m - 1:
            top_i += 1
        chosen = topk_leftmost(conf, top_i)
    elif st.threshold is not None:
        order = topk_leftmost(conf, m)
        chosen = [order[0]] + [j for j in order[1:] if conf[j] >= st.threshold]
    else:
        chosen = topk_leftmost(conf, min(quota_k, m))
    for j in chosen:
        x[0, lo + j] = x0[j]


@torch.no_grad()
def generate(model, prompt: list[int], st, ids, mode: str = "fast_dllm"):
    """Returns (answer canvas ids, nfe). mode 'llada' = LLaDA generate (runs every quota step);
    'fast_dllm' = Fast-dLLM generate / prefix / dual by st.cache (block loop until no masks)."""
    gen = torch.Generator().manual_seed(st.seed if st.seed is not None else 0)
    Lp, G = len(prompt), st.gen_length
    x = torch.full((1, Lp + G), ids.mask, dtype=torch.long)
    x[0, :Lp] = torch.tensor(prompt)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[0, :Lp] = True
    nfe = 0

    def fwd(inp, **kw):
        if st.cfg_scale > 0:
            un = x.clone()
            un[prompt_index] = ids.mask
            start = kw.get("start", 0)
            un = un[:, start:start + inp.shape[1]]
            out = model(torch.cat([inp, un]), **kw).logits
            c, u = out.chunk(2)
            return u + (st.cfg_scale + 1) * (c - u)
        return model(inp, **kw).logits

    sched = steps_per_block(st.steps, G, st.block_length)
    for b, s_b in enumerate(sched):
        s, e = Lp + b * st.block_length, min(Lp + (b + 1) * st.block_length, Lp + G)
        quota = num_transfer_tokens(int((x[0, s:e] == ids.mask).sum()), s_b)
        i = 0
        if st.cache != "none":
            rows = 2 if st.cfg_scale > 0 else 1
            model.setup_cache(rows, x.shape[1])
        while True:
            if mode == "llada":
                if i == s_b:
                    break
            elif (x[0, s:e] == ids.mask).sum() == 0:
                break
            if st.cache == "none" or i == 0:
                kw = dict(use_cache=True) if st.cache != "none" else {}
                logits = fwd(x, **kw)[0]
                lo = 0
            elif st.cache == "prefix":
                logits = fwd(x[:, s:], start=s, use_cache=True)[0]
                lo = s
            else:
                logits = fwd(x[:, s:e], start=s, use_cache=True)[0]
                lo = s
            nfe += 1
            mask_index = (x[0, lo:lo + logits.shape[0]] == ids.mask).tolist()
            for j in range(len(mask_index)):  # nothing right of (or left of) the current block
                if not s <= lo + j < e:
                    mask_index[j] = False
            # the reference scores only the block: restrict logits to it (same values, block-only random draws)
            bl_logits = logits[s - lo:e - lo]
            pick(bl_logits, x, s, e, mask_index[s - lo:e - lo], st, ids, gen, quota[i] if i < len(quota) else 0)
            i += 1
        if st.cache != "none":
            model.clear_cache()
    return x[0, Lp:].tolist(), nfe


def cut(answer: list[int], stops) -> list[int]:
    for j, t in enumerate(answer):
        if t in stops:
            return answer[:j]
    return answer
