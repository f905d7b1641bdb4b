"""Train the bundled demo model: a tiny LLaDAModelLM on the demo task with LLaDA's SFT objective, on CPU.

    python -m llada_xp.demo.train [--seed 0] [--out llada_xp/demo/model] [--steps N] [--minutes 20]

LLaDA SFT (paper §2.3 and its GUIDELINES): per example t = (1 - eps) u + eps, u ~ U(0, 1); each answer-canvas token
(answer, <|eot_id|>, then <|endoftext|> to the batch's canvas length) is masked with probability t, the prompt never;
cross-entropy on masked tokens weighted by 1/t, divided by the canvas length. Writes weights, tokenizer and
training.json to --out. Deterministic for a given seed and step count (--minutes only caps a run that would take
too long; it says so). About 15 minutes on 2 CPU cores (the held-out checks at the end: 1 more).

What made a sub-1M-parameter model learn within the budget (each found by experiment, each kept as a flag):
a low peak learning rate (3e-4; 1e-3 and above never learn to look things up in the prompt), eps = 0.1 instead of
LLaDA's 1e-3 (caps the 1/t weight at 10: a batch of 32 otherwise follows one nearly unmasked example), RoPE theta 100
(more rotary frequencies useful at these lengths), and canvases padded to each batch's longest answer (fewer masks
diluting attention) with a quarter padded to a random length up to --gen-length, so the model fills any EOS tail the
server may ask for (trained on 64 columns only, it fell to 48% at 128).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llada_xp.config import SamplerConfig
from llada_xp.demo.check import accuracy
from llada_xp.demo.task import examples, held_out_prompts
from llada_xp.demo.tokenizer import EOT, build_tokenizer, save_tokenizer
from llada_xp.model import LLaDAConfig, LLaDAModelLM

log = logging.getLogger("llada_xp.demo.train")

DEFAULT_OUT = Path(__file__).parent / "model"


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llada_xp.demo.train", description=__doc__, formatter_class=_Help)
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, data, masks)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (HF layout)")
    p.add_argument("--steps", type=int, default=8000, help="optimizer steps (the schedule's length)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap; stops early (and says so)")
    p.add_argument("--eps", type=float, default=0.1, help="t = (1 - eps) u + eps: the smallest masking ratio "
                                                          "(LLaDA: 1e-3); larger caps the 1/t weight")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps, then cosine to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--d-model", type=int, default=128, help="hidden size")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads")
    p.add_argument("--n-layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--mlp", type=int, default=384, help="mlp_hidden_size")
    p.add_argument("--rope-theta", type=float, default=100.0, help="RoPE base")
    p.add_argument("--gen-length", type=int, default=192, help="longest answer canvas (answer + EoT + EOS padding)")
    p.add_argument("--long-canvas-prob", type=float, default=0.25, help="share of batches padded to a random length "
                                                                        "up to --gen-length")
    p.add_argument("--slack", type=int, default=8, help="other batches: at most this many EOS beyond the longest "
                                                        "answer")
    p.add_argument("--pool", type=int, default=8, help="batches drawn together and grouped by answer length")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100, help="log the loss every N steps")
    p.add_argument("--eval-every", type=int, default=1000, help="held-out check (dual cache, threshold 0.9) every N "
                                                               "steps; 0 = never")
    p.add_argument("--eval-n", type=int, default=100, help="held-out examples in each periodic check")
    p.add_argument("--final-n", type=int, default=500, help="held-out examples decoded by the Sampler at the end "
                                                           "(0 = skip)")
    return p.parse_args(argv)


class Encoder:
    """Example → (prompt ids, answer canvas ids): the chat template, then answer + EoT + EOS to the canvas length."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos, self.eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)

    def prompt(self, text: str) -> list[int]:
        return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)

    def answer(self, text: str) -> list[int]:
        return self.tok.encode(text) + [self.eot]

    def batch(self, exs, G: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x0: [B, P + G] (prompts left-padded with EOS, answers right-padded with EOS), attention mask, P."""
        prompts, answers = [self.prompt(e.prompt) for e in exs], [self.answer(e.answer) for e in exs]
        if max(map(len, answers)) > G:
            raise ValueError(f"an answer of {max(map(len, answers))} tokens (with EoT) does not fit {G} columns")
        P = max(map(len, prompts))
        x = torch.full((len(exs), P + G), self.eos, dtype=torch.long)
        am = torch.ones_like(x)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            x[i, P - len(p):P] = torch.tensor(p)
            x[i, P:P + len(a)] = torch.tensor(a)
            am[i, :P - len(p)] = 0
        return x, am, P


def batches(args, enc: Encoder, exclude: frozenset[str]):
    """Training batches, forever, deterministic from args.seed.

    Examples are drawn in pools of `pool` batches and grouped by answer length, so a batch's canvas is short when its
    answers are (LLaDA SFT pads each mini-batch with EOS to its longest answer). The canvas gets a random EOS tail:
    with probability long_canvas_prob any length up to gen_length, else up to `slack` extra columns — the model sees
    every tail length up to gen_length, and retrieval from the prompt is learnt faster when few masks dilute attention.
    """
    rng = random.Random(args.seed)
    while True:
        pool = examples(args.batch_size * args.pool, rng.getrandbits(62), exclude)
        pool.sort(key=lambda e: len(enc.answer(e.answer)))
        chunks = [pool[i:i + args.batch_size] for i in range(0, len(pool), args.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            need = max(len(enc.answer(e.answer)) for e in chunk)
            long = rng.random() < args.long_canvas_prob
            G = rng.randint(need, args.gen_length) if long else min(args.gen_length, need + rng.randint(0, args.slack))
            yield enc.batch(chunk, G)


def sft_loss(model, x0, am, P: int, mask_id: int, gen: torch.Generator, eps: float) -> torch.Tensor:
    """LLaDA SFT loss on one batch. x0: [B, P + G]; only the G canvas columns are noised and scored."""
    B, G = x0.shape[0], x0.shape[1] - P
    u = (torch.randperm(B, generator=gen) + torch.rand(B, generator=gen)) / B  # stratified U(0,1): lower variance
    t = ((1 - eps) * u + eps)[:, None]  # [B, 1]
    masked = torch.rand(B, G, generator=gen) < t  # [B, G]
    xt = x0.clone()
    xt[:, P:][masked] = mask_id
    logits = model(xt, attention_mask=am, logits_slice=slice(P, P + G)).logits  # [B, G, V]
    ce = F.cross_entropy(logits[masked], x0[:, P:][masked], reduction="none")
    return (ce / t.expand(B, G)[masked]).sum() / (G * B)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    enc = Encoder(tok)
    rows = -(-len(tok) // 64) * 64
    config = LLaDAConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, mlp_hidden_size=args.mlp,
        vocab_size=rows, embedding_size=rows, rope_theta=args.rope_theta, max_sequence_length=256,
        mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, architectures=["LLaDAModelLM"],
    )
    model = LLaDAModelLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, d_model %d, %d layers, mlp %d, vocab %d (tokenizer %d)",
             n_params / 1e6, args.d_model, args.n_layers, args.mlp, rows, len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(args, enc, held_out_prompts())
    model.train()
    t0 = time.perf_counter()
    tokens, ema, step = 0, None, 0
    for step in range(args.steps):
        if time.perf_counter() - t0 > args.minutes * 60:
            log.warning("stopping at step %d: --minutes %.1f reached (the run is not the full schedule)",
                        step, args.minutes)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x0, am, P = next(data)
        loss = sft_loss(model, x0, am, P, tok.mask_token_id, gen, args.eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(am.sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0:
            dt = time.perf_counter() - t0
            log.info("step %d/%d loss %.4f (ema %.4f) lr %.2e %.0f tok/s %.1f min", step + 1, args.steps,
                     loss.item(), ema, lr_at(step, args), tokens / dt, dt / 60)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            res = accuracy(model, tok, final_settings()["dual_threshold_0_9"], n=args.eval_n)
            model.train()
            log.info("held-out check (dual cache, threshold 0.9, %d examples): %.3f %s", args.eval_n,
                     res["accuracy"], res["per_skill"])
    else:
        step = args.steps
    minutes = (time.perf_counter() - t0) / 60
    summary = dict(seed=args.seed, steps=step, minutes=round(minutes, 2), final_loss_ema=round(ema, 4),
                   parameters=n_params, vocab_size=rows, tokenizer_size=len(tok),
                   args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    log.info("trained %d steps in %.1f min, loss ema %.4f", step, minutes, ema)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tok, args.out)
    if args.final_n:
        for name, settings in final_settings().items():
            t = time.perf_counter()
            res = accuracy(model, tok, settings, n=args.final_n)
            res["seconds"] = round(time.perf_counter() - t, 1)
            summary[f"held_out_{name}"] = res
            log.info("held-out %s: %s", name, res)
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def final_settings() -> dict[str, SamplerConfig]:
    """The held-out checks: issue #4's two (LLaDA reference, one token per step; Fast-dLLM dual cache + threshold 0.9)
    on 64 columns, and the dual cache on the 128 columns that serve.py and eval.py use by default (sampler=fast)."""
    def cfg(gen: int, **kw) -> SamplerConfig:
        return SamplerConfig(gen_length=gen, block_length=32, steps=gen, **kw)

    return dict(reference=cfg(64, cache="none", threshold=None), dual_threshold_0_9=cfg(64, cache="dual", threshold=0.9),
                dual_threshold_0_9_gen128=cfg(128, cache="dual", threshold=0.9))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
