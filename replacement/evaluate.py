"""Behavioural metrics of a language model: induction, two-digit addition, held-out text loss, samples."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import random_token_pool
from .models import ModelAdapter


def _token_losses(adapter: ModelAdapter, ids: torch.Tensor) -> torch.Tensor:
    """[B, n-1] next-token losses."""
    logits = adapter.run(ids).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def repeated_span_prompt(adapter: ModelAdapter, span: int = 8, seed: int = 1, prefix: int = 0) -> tuple[torch.Tensor, int]:
    """``BOS + p + r + r[:-1]`` [1, n] (p: ``prefix`` random tokens, r: a random span of ``span``) and r[-1], the
    next token, which only induction predicts (match the current token earlier, copy what followed it)."""
    g = torch.Generator().manual_seed(seed)
    pool = random_token_pool(adapter.tokenizer, adapter.vocab_size)
    p, r = (pool[torch.randint(0, len(pool), (k,), generator=g)] for k in (prefix, span))
    return torch.cat([torch.tensor([adapter.tokenizer.bos_token_id]), p, r, r[:-1]])[None], int(r[-1])


@torch.no_grad()
def induction_losses(adapter: ModelAdapter, span: int = 20, n_seqs: int = 64, seed: int = 0) -> dict:
    """Mean loss on the first and second copy of ``BOS + r + r`` with r = `span` uniform random tokens.

    Both copies are scored on their tokens 2..span (the first token of each copy cannot be predicted)."""
    g = torch.Generator().manual_seed(seed)
    pool = random_token_pool(adapter.tokenizer, adapter.vocab_size)
    r = pool[torch.randint(0, len(pool), (n_seqs, span), generator=g)]
    bos = adapter.config.bos_token_id if adapter.config.bos_token_id is not None else int(pool[0])
    ids = torch.cat([torch.full((n_seqs, 1), bos), r, r], dim=1).to(adapter.device)
    losses = _token_losses(adapter, ids)  # loss[:, i] predicts ids[:, i+1]
    first = losses[:, 1:span]  # predicts tokens 2..span of copy 1 (ids positions 2..span)
    second = losses[:, span + 1 : 2 * span]  # predicts tokens 2..span of copy 2
    return {"first_copy_loss": first.mean().item(), "second_copy_loss": second.mean().item(), "span": span,
            "n_seqs": n_seqs}


@torch.no_grad()
def addition_accuracy(adapter: ModelAdapter, pairs: list[tuple[int, int]], batch: int = 256) -> dict:
    """Greedy exact-answer accuracy on ``a + b =`` -> `` a+b`` (one token)."""
    from .tokenizer import number_token_ids

    tok = adapter.tokenizer
    bare, spaced = number_token_ids(tok)
    plus, eq = tok.encode(" +", add_special_tokens=False)[0], tok.encode(" =", add_special_tokens=False)[0]
    correct, wrong = 0, []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        ids = torch.tensor([[tok.bos_token_id, bare[a], plus, spaced[b], eq] for a, b in chunk], device=adapter.device)
        pred = adapter.run(ids).logits[:, -1].argmax(-1).tolist()
        for (a, b), p in zip(chunk, pred):
            if p == spaced[a + b]:
                correct += 1
            else:
                wrong.append((a, b, tok.decode([p])))
    return {"accuracy": correct / max(1, len(pairs)), "n": len(pairs), "examples_wrong": wrong[:5]}


@torch.no_grad()
def text_loss(adapter: ModelAdapter, tokens: torch.Tensor, seq_len: int = 128, n_seqs: int = 64) -> float:
    """Mean next-token loss over ``n_seqs`` evenly spaced windows of held-out tokens (BOS + seq_len-1);
    NaN when there are too few tokens for one window."""
    n = min(seq_len, adapter.context) - 1
    if len(tokens) < n + 2:
        return float("nan")
    starts = torch.linspace(0, len(tokens) - n - 1, n_seqs).long().tolist()
    bos = adapter.tokenizer.bos_token_id
    ids = torch.stack([torch.cat([torch.tensor([bos]), tokens[s : s + n].long()]) for s in starts]).to(adapter.device)
    total = 0.0
    for chunk in ids.split(16):
        total += _token_losses(adapter, chunk).mean().item() * len(chunk)
    return total / len(ids)


@torch.no_grad()
def sample(adapter: ModelAdapter, prompt: str, max_new_tokens: int = 30, temperature: float = 0.8,
           top_k: int = 40, seed: int = 0) -> str:
    g = torch.Generator(device=adapter.device).manual_seed(seed)
    ids = adapter.tokenize(prompt)
    for _ in range(max_new_tokens):
        if ids.shape[1] >= adapter.context:
            break
        logits = adapter.run(ids).logits[0, -1].float()
        if temperature <= 0:
            nxt = logits.argmax()
        else:
            vals, idx = logits.topk(top_k)
            nxt = idx[torch.multinomial((vals / temperature).softmax(-1), 1, generator=g)][0]
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return adapter.tokenizer.decode(ids[0, 1:])


def greedy_answer(adapter: ModelAdapter, prompt: str) -> str:
    with torch.no_grad():
        logits = adapter.run(adapter.tokenize(prompt)).logits[0, -1]
    return adapter.tokenizer.decode([int(logits.argmax())])
