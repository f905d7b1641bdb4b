"""Log-likelihood of a continuation under a LLaDA model: the Monte-Carlo ELBO of the LLaDA paper (arXiv 2502.09992,
eq. 6 and App. B.5; reference code ML-GSAI/LLaDA get_log_likelihood.py), and lm-eval's "is it the greedy decode".
Works on token ids with the model's forward only: it knows nothing about tokenizers, chat templates, lm-eval, Hydra
or the sampler's decoding loop (shared/reference/likelihood.md fixes what is computed).

Draw order (one generator per (prompt, answer) pair, seeded with `ELBO.seed` unless one is passed; the same seed for
every pair, so candidate answers of one length share their masks — common random numbers for ranking). Answer
length L, batch_size b; for each mini-batch in turn, on the generator's device:
  1. k = torch.randint(1, L + 1, (1,), generator=g): the batch's offset.
  2. mask counts l_i = ((k - 1 + floor(i·L/b + 1/2)) mod L) + 1 for rows i = 0..b-1 (exact integer arithmetic: no draw).
  3. for each row i in order: perm = torch.randperm(L, generator=g); answer position j is masked iff perm[j] < l_i.
Rounding: the reference rounds k + i·L/b with torch.round (half to even, on a float32 linspace); at exact .5 ties that
makes a row's count depend on k's parity, so its l is no longer uniform on 1..L (L=3, b=2: row 1 gets l = 1 twice as
often as 2, never 3) and the estimate is biased. Half up (floor(x + 1/2)) is a pure shift of k: every row's l is
uniform, the estimator unbiased; it equals the reference wherever no tie occurs (b odd, or i·L/b never ends in .5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llada_xp.sampler import SpecialIds


@dataclass(frozen=True)
class ELBO:
    """Settings of the Monte-Carlo ELBO (reference values: mc_num 128, batch 8; cfg per task, see likelihood.md)."""

    mc_num: int = 128  # Monte-Carlo samples per (prompt, answer); a multiple of batch_size
    batch_size: int = 8  # samples per forward (one mini-batch = one forward of batch_size rows; x2 with cfg)
    cfg_scale: float = 0.0  # classifier-free guidance (prompt masked in the unconditional copy)
    seed: int = 0  # each (prompt, answer) pair gets its own torch.Generator seeded from seed

    def __post_init__(self):
        for name in ("mc_num", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.mc_num % self.batch_size:
            raise ValueError(f"mc_num ({self.mc_num}) must be a multiple of batch_size ({self.batch_size})")
        if not self.cfg_scale >= 0:  # also refuses NaN
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale!r}")


def mask_counts(k: int, L: int, b: int) -> list[int]:
    """Stratified mask counts of one mini-batch: k, k + L/b, k + 2L/b, ... rounded half up, wrapped into 1..L."""
    return [(k - 1 + (2 * i * L + b) // (2 * b)) % L + 1 for i in range(b)]


def check_pair(model, ids: SpecialIds, prompt: list[int], answer: list[int]) -> None:
    """ValueError naming the problem with one (prompt, answer) pair."""
    if not prompt:
        raise ValueError("prompt is empty (the ELBO conditions on at least one token)")
    if not answer:
        raise ValueError("answer is empty (nothing to score)")
    if ids.mask in answer or ids.mask in prompt:
        raise ValueError(f"prompt or answer contains the mask id {ids.mask}")
    limit = getattr(model.config, "max_sequence_length", None)
    if limit and len(prompt) + len(answer) > limit:
        raise ValueError(f"prompt ({len(prompt)} tokens) + answer ({len(answer)}) = {len(prompt) + len(answer)} "
                         f"exceeds the model's max_sequence_length {limit}")


def guided_logits(model, x: torch.Tensor, P: int, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Logits of the answer columns [B, L, V] for x: [B, P + L]; cfg as in sampling (prompt masked in the copy)."""
    cols = slice(P, x.shape[1])
    if cfg_scale > 0:
        un = x.clone()
        un[:, :P] = mask_id
        cond, un = model(torch.cat([x, un]), logits_slice=cols).logits.chunk(2)
        return un + (cfg_scale + 1) * (cond - un)
    return model(x, logits_slice=cols).logits


@torch.inference_mode()
def log_likelihood(model, ids: SpecialIds, prompt: list[int], answer: list[int], settings: ELBO = ELBO(),
                   generator: Optional[torch.Generator] = None) -> float:
    """Monte-Carlo ELBO estimate of log p(answer | prompt): minus the mean over mc_num samples of
    sum over masked answer positions of CE(true token) / (l / L), l of the L answer positions masked."""
    check_pair(model, ids, prompt, answer)
    g = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
    dev = next(model.parameters()).device
    P, L, b = len(prompt), len(answer), settings.batch_size
    seq = torch.tensor(prompt + answer, device=dev)
    target = seq[P:].expand(b, L)  # [b, L]
    total = 0.0
    for _ in range(settings.mc_num // b):
        k = int(torch.randint(1, L + 1, (1,), generator=g, device=g.device))
        counts = mask_counts(k, L, b)
        masked = torch.stack([torch.randperm(L, generator=g, device=g.device) < n for n in counts]).to(dev)  # [b, L]
        x = torch.cat([seq[:P].expand(b, P), torch.where(masked, ids.mask, target)], 1)  # [b, P + L]
        logits = guided_logits(model, x, P, settings.cfg_scale, ids.mask)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # CE in >= fp32 (bf16 on GPU)
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [b, L]
        ratio = torch.tensor(counts, dtype=ce.dtype, device=dev) / L  # l / L per row
        total += float(((ce * masked).sum(-1) / ratio).sum())
    return -total / settings.mc_num


def log_likelihoods(model, ids: SpecialIds, pairs: list[tuple[list[int], list[int]]],
                    settings: ELBO = ELBO()) -> list[float]:
    """Many pairs, each with its own generator (same values as one call per pair). A plain loop: batching pairs
    would need padding, whose different float rounding breaks exact equality with the one-pair call."""
    for prompt, answer in pairs:  # fail before any forward
        check_pair(model, ids, prompt, answer)
    return [log_likelihood(model, ids, p, a, settings) for p, a in pairs]


@torch.inference_mode()
def is_greedy(model, ids: SpecialIds, prompt: list[int], answer: list[int], cfg_scale: float = 0.0) -> bool:
    """Is `answer` what decoding its canvas greedily gives: one token per step, the most confident masked column
    (float64 softmax of the argmax, ties to the leftmost), temperature 0, the mask id never predicted — the sampler's
    rule with gen_length = block_length = steps = len(answer), no cache, no threshold (LLaDA's is_check_greedy).
    Stops at the first committed token that differs (committed tokens never change). This is a yes/no check, not a
    text path: the sampler cuts answers at EOS/EoT and so cannot show the whole canvas it is compared with."""
    check_pair(model, ids, prompt, answer)
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    dev = next(model.parameters()).device
    P, L = len(prompt), len(answer)
    x = torch.tensor([prompt + [ids.mask] * L], device=dev)  # [1, P + L]
    open_ = torch.ones(L, dtype=torch.bool, device=dev)  # answer columns still masked
    for _ in range(L):
        logits = guided_logits(model, x, P, cfg_scale, ids.mask)[0]  # [L, V]
        logits[:, ids.mask] = -torch.inf
        pred = logits.argmax(-1)
        conf = torch.softmax(logits.double(), -1).gather(-1, pred[:, None]).squeeze(-1)
        j = int(torch.where(open_, conf, -torch.inf).argmax())  # first maximum: leftmost on ties
        if int(pred[j]) != answer[j]:
            return False
        x[0, P + j], open_[j] = pred[j], False
    return True
