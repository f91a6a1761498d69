"""Behavioural metrics of a language model: induction, two-digit addition, held-out text loss, samples."""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import random_token_pool
from .errors import BadInputError, CircuitsError
from .models import ModelAdapter, start_token


INDUCTION_GAP = 30  # random tokens between the copies in `circuits eval`'s second induction measure


def _token_losses(adapter: ModelAdapter, ids: torch.Tensor, hooks_fn=None) -> torch.Tensor:
    """[B, n-1] next-token losses (of the model run with ``hooks_fn()``'s hooks, if given)."""
    logits = adapter.run(ids, hooks=hooks_fn() if hooks_fn else None).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def first_token(adapter: ModelAdapter) -> int:
    """The token every row of an evaluation starts with: the one every traced prompt starts with (`start_token`:
    BOS, or circuit-tracer's stand-in), else the config's bos_token_id, else 0 (a model without a tokenizer)."""
    tok = start_token(adapter.tokenizer) if adapter.tokenizer is not None else None
    return next((i for i in (tok, adapter.config.bos_token_id) if i is not None), 0)


def repeated_span_prompt(adapter: ModelAdapter, span: int = 8, seed: int = 1, prefix: int = 0) -> tuple[torch.Tensor, int]:
    """``BOS + p + r + r[:-1]`` [1, n] (p: ``prefix`` random tokens, r: a random span of ``span``) and r[-1], the
    next token, which only induction predicts (match the current token earlier, copy what followed it)."""
    g = torch.Generator().manual_seed(seed)
    pool = random_token_pool(adapter.tokenizer, adapter.vocab_size)
    p, r = (pool[torch.randint(0, len(pool), (k,), generator=g)] for k in (prefix, span))
    return torch.cat([torch.tensor([first_token(adapter)]), p, r, r[:-1]])[None], int(r[-1])


@torch.no_grad()
def induction_losses(adapter: ModelAdapter, span: int = 20, n_seqs: int = 64, seed: int = 0, hooks_fn=None,
                     gap: int = 0) -> dict:
    """Mean loss on the first and second copy of ``BOS + r + g + r`` with r = `span` uniform random tokens and g =
    ``gap`` more (none by default: contiguous copies), and the second copy's top-1 rate and mean probability.

    Both copies are scored on their tokens 2..span (the first token of each copy cannot be predicted)."""
    g = torch.Generator().manual_seed(seed)
    pool = random_token_pool(adapter.tokenizer, adapter.vocab_size)
    r = pool[torch.randint(0, len(pool), (n_seqs, span), generator=g)]
    between = pool[torch.randint(0, len(pool), (n_seqs, gap), generator=g)]
    bos = first_token(adapter)
    ids = torch.cat([torch.full((n_seqs, 1), bos), r, between, r], dim=1).to(adapter.device)
    logits = adapter.run(ids, hooks=hooks_fn() if hooks_fn else None).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, n-1]: logp[:, i] predicts ids[:, i+1]
    s2 = span + gap  # logp[:, s2 + 1] predicts token 2 of the second copy
    first, second = -logp[:, 1:span], -logp[:, s2 + 1 : s2 + span]
    hit = logits[:, s2 + 1 : s2 + span].argmax(-1) == ids[:, s2 + 2 : s2 + span + 1]
    return {"first_copy_loss": first.mean().item(), "second_copy_loss": second.mean().item(),
            "second_copy_top1": hit.float().mean().item(), "second_copy_prob": (-second).exp().mean().item(),
            "span": span, "gap": gap, "n_seqs": n_seqs}


def induction_report(adapter: ModelAdapter, hooks_fn=None) -> dict:
    """``induction``: `induction_losses` with contiguous copies; ``induction_gap``: with `INDUCTION_GAP` random tokens
    between them, where ``BOS + span + gap + span`` fits the model's context (not on tiny test models)."""
    out = {"induction": induction_losses(adapter, hooks_fn=hooks_fn)}
    if 1 + 2 * out["induction"]["span"] + INDUCTION_GAP <= adapter.context:
        out["induction_gap"] = induction_losses(adapter, hooks_fn=hooks_fn, gap=INDUCTION_GAP)
    return out


@torch.no_grad()
def addition_accuracy(adapter: ModelAdapter, pairs: list[tuple[int, int]], batch: int = 256, hooks_fn=None) -> dict:
    """Greedy exact-answer accuracy on ``a + b =`` -> `` a+b`` (one token)."""
    from .tokenizer import number_token_ids

    tok = adapter.tokenizer
    bare, spaced = number_token_ids(tok)
    plus, eq = tok.encode(" +", add_special_tokens=False)[0], tok.encode(" =", add_special_tokens=False)[0]
    correct, wrong = 0, []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        ids = torch.tensor([[first_token(adapter), bare[a], plus, spaced[b], eq] for a, b in chunk], device=adapter.device)
        pred = adapter.run(ids, hooks=hooks_fn() if hooks_fn else None).logits[:, -1].argmax(-1).tolist()
        for (a, b), p in zip(chunk, pred):
            if p == spaced[a + b]:
                correct += 1
            else:
                wrong.append((a, b, tok.decode([p])))
    return {"accuracy": correct / max(1, len(pairs)), "n": len(pairs), "examples_wrong": wrong[:5]}


def text_windows(adapter: ModelAdapter, tokens: torch.Tensor, seq_len: int, n_seqs: int) -> torch.Tensor | None:
    """[n_seqs, n] evenly spaced windows of ``tokens``, each BOS + n-1 tokens; None when there are too few."""
    n = min(seq_len, adapter.context) - 1
    if len(tokens) < n + 2:
        return None
    starts = torch.linspace(0, len(tokens) - n - 1, n_seqs).long().tolist()
    bos = first_token(adapter)
    return torch.stack([torch.cat([torch.tensor([bos]), tokens[s : s + n].long()]) for s in starts]).to(adapter.device)


@torch.no_grad()
def text_loss(adapter: ModelAdapter, tokens: torch.Tensor, seq_len: int = 128, n_seqs: int = 64) -> float:
    """Mean next-token loss over ``n_seqs`` evenly spaced windows of held-out tokens (BOS + seq_len-1);
    NaN when there are too few tokens for one window."""
    ids = text_windows(adapter, tokens, seq_len, n_seqs)
    if ids is None:
        return float("nan")
    total = 0.0
    for chunk in ids.split(16):
        total += _token_losses(adapter, chunk).mean().item() * len(chunk)
    return total / len(ids)


def kl_per_token(real_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(real) || softmax(logits)) [...] over the last (vocabulary) axis, in nats."""
    p = F.log_softmax(real_logits.float(), -1)
    return (p.exp() * (p - F.log_softmax(logits.float(), -1))).sum(-1)


@torch.no_grad()
def agreement(adapter: ModelAdapter, tokens: torch.Tensor, hooks_fn, seq_len: int = 128, n_seqs: int = 16) -> dict:
    """How closely the model run with ``hooks_fn()`` (e.g. the pure replacement model) follows the real one on
    evenly spaced windows of held-out tokens: the share of positions whose top-1 token agrees, and the mean
    KL(real || hooked) per token, in nats (the prediction made at BOS left out)."""
    ids = text_windows(adapter, tokens, seq_len, n_seqs)
    if ids is None:
        return {}
    agree = kl = n = 0.0
    for chunk in ids.split(8):
        real = adapter.run(chunk).logits[:, 1:].float()
        hooked = adapter.run(chunk, hooks=hooks_fn()).logits[:, 1:].float()
        agree += (real.argmax(-1) == hooked.argmax(-1)).sum().item()
        kl += kl_per_token(real, hooked).sum().item()
        n += real.shape[0] * real.shape[1]
    return {"top1_agreement": agree / n, "kl": kl / n, "tokens": int(n), "windows": int(ids.shape[0]),
            "text_tokens": int(len(tokens))}  # windows overlap where the text is shorter than they are together


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


def greedy_answer(adapter: ModelAdapter, prompt: str, hooks_fn=None) -> str:
    with torch.no_grad():
        logits = adapter.run(adapter.tokenize(prompt), hooks=hooks_fn() if hooks_fn else None).logits[0, -1]
    return adapter.tokenizer.decode([int(logits.argmax())])


# ---------------------------------------------------------------------------------------------------------
# Copying in natural text
# ---------------------------------------------------------------------------------------------------------

NATURAL_KINDS = ("sentence", "name", "partial")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NAME = re.compile(r"(?<=[a-z,;] )((?:[A-Z][a-z]+\.? )*[A-Z][a-z]{2,})")


@dataclass
class CopyCase:
    """One natural-text copying prompt: ids [n] holding a passage twice, and where each copy starts."""

    kind: str
    ids: list[int]
    first: int  # position of the first copy's first token
    second: int  # position of the second copy's first token
    length: int  # tokens in the second copy (the first copy may be longer: a partial repeat copies its end)
    offset: int = 0  # the second copy starts this many tokens into the first


def natural_copy_cases(tokenizer, texts: list[str], n_per_kind: int = 200, context: int = 128,
                       seed: int = 0) -> list[CopyCase]:
    """Copying prompts built from held-out text, ``n_per_kind`` of each kind:

    * ``sentence``: a sentence S of 8-30 tokens, the text that follows it (5-40 tokens), then S again;
    * ``name``: a passage ending in a capitalised name or phrase N (2+ tokens) found mid-sentence, the text that
      follows it, then N again;
    * ``partial``: as ``sentence`` with S of 12+ tokens, but the repeat starts a third to a half into S.
    Every piece is tokenised with a leading space, so both copies are the same tokens."""
    rng = random.Random(seed)
    bos = start_token(tokenizer)
    enc = lambda s: tokenizer.encode(" " + s.strip(), add_special_tokens=False)  # noqa: E731
    sentences = [" ".join(s.split()) for t in texts for s in _SENTENCE_END.split(t)]
    sentences = [s for s in sentences if s]
    order = list(range(len(sentences) - 1))
    rng.shuffle(order)
    cases: dict[str, list[CopyCase]] = {k: [] for k in NATURAL_KINDS}
    for i in order:
        s, gap = enc(sentences[i]), enc(sentences[i + 1])[: rng.randint(5, 40)]
        if 8 <= len(s) <= 30 and len(cases["sentence"]) < n_per_kind and 1 + 2 * len(s) + len(gap) <= context:
            cases["sentence"].append(CopyCase("sentence", [bos] + s + gap + s, 1, 1 + len(s) + len(gap), len(s)))
        elif 12 <= len(s) <= 40 and len(cases["partial"]) < n_per_kind:
            m = rng.randint(len(s) // 3, len(s) // 2)
            if 1 + 2 * len(s) - m + len(gap) <= context:
                cases["partial"].append(CopyCase("partial", [bos] + s + gap + s[m:], 1, 1 + len(s) + len(gap),
                                                 len(s) - m, offset=m))
        names = [(mt.start(1), mt.group(1)) for mt in _NAME.finditer(sentences[i])]
        if names and len(cases["name"]) < n_per_kind:
            start, name = names[rng.randrange(len(names))]
            before, n_ids = enc(sentences[i][:start])[-40:], enc(name)
            if len(n_ids) >= 2 and before:
                ids = [bos] + before + n_ids + gap + n_ids
                if len(ids) <= context:
                    cases["name"].append(CopyCase("name", ids, 1 + len(before), len(ids) - len(n_ids), len(n_ids)))
        if all(len(c) >= n_per_kind for c in cases.values()):
            break
    return [c for k in NATURAL_KINDS for c in cases[k]]


@torch.no_grad()
def natural_copying(adapter: ModelAdapter, texts: list[str], n_per_kind: int = 200, seed: int = 0,
                    hooks_fn=None, batch: int = 32) -> dict:
    """Per kind of `natural_copy_cases`: the mean probability and top-1 rate of each token of the second copy
    after its first (``copy_*``), and of the same tokens in the first copy (``first_*``: not predictable from the
    context, so a rise there would mean the model knows the text itself).  ``hooks_fn()`` gives run hooks (e.g. a
    replacement model's)."""
    cases = natural_copy_cases(adapter.tokenizer, texts, n_per_kind, adapter.context, seed)
    stats = {k: {"n": 0, "tokens": 0, "copy_prob": 0.0, "copy_top1": 0.0, "first_prob": 0.0, "first_top1": 0.0}
             for k in NATURAL_KINDS}
    for i in range(0, len(cases), batch):
        chunk = cases[i : i + batch]
        n = max(len(c.ids) for c in chunk)
        ids = torch.tensor([c.ids + [c.ids[0]] * (n - len(c.ids)) for c in chunk], device=adapter.device)  # right pad
        logits = adapter.run(ids, hooks=hooks_fn() if hooks_fn else None).logits.float()
        probs = logits.softmax(-1)
        for b, c in enumerate(chunk):
            s = stats[c.kind]
            s["n"] += 1
            for where, start in (("copy", c.second), ("first", c.first + c.offset)):
                pos = torch.arange(start + 1, start + c.length, device=ids.device)  # tokens after the copy's first
                target = ids[b, pos]
                s[f"{where}_prob"] += probs[b, pos - 1].gather(-1, target[:, None]).sum().item()
                s[f"{where}_top1"] += (logits[b, pos - 1].argmax(-1) == target).sum().item()
            s["tokens"] += c.length - 1
    for s in stats.values():
        for key in ("copy_prob", "copy_top1", "first_prob", "first_top1"):
            s[key] = s[key] / s["tokens"] if s["tokens"] else None  # no case in the text: nothing measured, not 0%
    return stats


# ---------------------------------------------------------------------------------------------------------
# Reports (what `circuits eval` prints)
# ---------------------------------------------------------------------------------------------------------

SHOWCASE_PROMPT = "36 + 62 ="


def model_report(adapter: ModelAdapter, texts: list[str] | None, samples: bool = True) -> dict:
    """The real model's behaviour: random-span induction, held-out addition, held-out text loss, copying in
    held-out natural text (``texts``: held-out texts, see `replacement.corpus.heldout_texts`), samples."""
    from .data import addition_split, tokenize_texts

    out = {"model": adapter.name, **induction_report(adapter)}
    if adapter.tokenizer is None:
        return out
    if _has_number_tokens(adapter):
        train_pairs, heldout = addition_split()
        out["addition_heldout"] = addition_accuracy(adapter, heldout)
        out["addition_train_sample"] = addition_accuracy(adapter, train_pairs[::15])
        out["showcase"] = {"prompt": SHOWCASE_PROMPT, "greedy": greedy_answer(adapter, SHOWCASE_PROMPT)}
    if texts:
        loss = text_loss(adapter, tokenize_texts(adapter.tokenizer, texts))
        if not math.isnan(loss):
            out["heldout_text_loss"] = loss
        out["natural_copying"] = natural_copying(adapter, texts)
    if samples:
        out["samples"] = {p: sample(adapter, p) for p in ("The", "It is a truth", "And God said")}
    return out


def faithfulness_report(model, texts: list[str] | None) -> dict:
    """What the pure (error-free) replacement model does, against the real model: top-1 agreement and KL on
    held-out natural text, held-out addition and the showcase answer, random-span induction, copying in natural
    text, and each module's FVU, L0, dead fraction, spliced loss, and the top-1 agreement and KL of the model
    with that module alone spliced in, on held-out natural text."""
    from .data import addition_split, tokenize_texts

    adapter, hooks = model.adapter, model.sparse_hooks
    out = induction_report(adapter, hooks_fn=hooks)
    if adapter.tokenizer is not None and _has_number_tokens(adapter):
        out["addition_heldout"] = addition_accuracy(adapter, addition_split()[1], hooks_fn=hooks)
        out["showcase"] = {"prompt": SHOWCASE_PROMPT, "greedy": greedy_answer(adapter, SHOWCASE_PROMPT, hooks)}
    if adapter.tokenizer is not None and texts:
        tokens = tokenize_texts(adapter.tokenizer, texts)
        out["natural_text"] = agreement(adapter, tokens, hooks)
        out["natural_copying"] = natural_copying(adapter, texts, hooks_fn=hooks)
        out["modules_natural_text"] = modules_on_text(model, tokens)
    return out


def modules_on_text(model, tokens: torch.Tensor) -> dict[str, dict]:
    """Per module of the replacement model (``layer<L>.<kind>``), on held-out text ``tokens`` [N]: FVU, L0, dead
    fraction and spliced loss (`train.evaluate_modules`), and the top-1 agreement and KL of the model with that
    module alone spliced in, every other block real."""
    from .activations import TextSource
    from .store import module_key
    from .train import evaluate_modules

    adapter = model.adapter
    modules = {("lorsa", L): m for L, m in model.lorsas.items()}
    if not model.cross_layer:  # a CLT layer alone replaces no MLP (each output sums every earlier layer's decoder)
        modules |= {("transcoder", L): m for L, m in model.transcoders.items()}
    source = TextSource(adapter.tokenizer, tokens, min(128, adapter.context), seed=1)
    out = evaluate_modules(adapter, modules, source, n_batches=4, batch_size=16)
    for (kind, L) in modules:
        alone = agreement(adapter, tokens, lambda key=(kind, L): model.sparse_hooks(only={key}))
        if alone:  # {} when the text is shorter than one window
            out[module_key(kind, L)] |= {"top1_agreement_alone": alone["top1_agreement"], "kl_alone": alone["kl"]}
    return out


def report(adapter: ModelAdapter, texts: list[str] | None = None, samples: bool = True,
           replacements: str | Path | list | None = None, faithfulness: bool = True) -> dict:
    """Everything `circuits eval` shows: `model_report` on held-out text (the last 2% of ``texts`` files, by
    default the shipped held-out sample), then, if the replacements (a folder, default beside the model, or
    folders to mix: `foreign.load_specs`) hold trained modules, their saved metrics (``"replacements"``) and,
    with ``faithfulness``, the pure replacement model's `faithfulness_report` (``{"skipped": why}`` when the set is incomplete)."""
    from .assemble import ReplacementModel
    from .corpus import heldout_texts
    from .foreign import load_specs, specs_metrics
    from .store import default_folder

    # folders given: one without trained modules is an error, not "none trained yet" (loaded once, used below)
    given = load_specs(replacements, adapter) if replacements is not None else None
    if texts and adapter.tokenizer is None:  # they would be skipped in silence
        from .models import NO_TOKENIZER

        raise BadInputError(f"text files cannot be read: {NO_TOKENIZER}")
    held = heldout_texts(list(texts) if texts else None) if adapter.tokenizer is not None else None
    if texts and held is not None:  # a file too short to score would be skipped in silence
        n = 0
        for t in held:  # counted until one window is reached: model_report tokenises it all again
            n += len(adapter.tokenizer.encode(t))
            if n > adapter.context:
                break
        if n <= adapter.context:
            raise BadInputError(f"the held-out part of the text given (the last 2% of each file) is {n} tokens, "
                                f"too short for one window of {adapter.context}; pass more text")
    out = model_report(adapter, held, samples)
    metrics = specs_metrics(replacements, default_folder(adapter))
    if metrics is None:
        return out
    out["replacements"] = metrics
    if faithfulness:
        try:
            model = (ReplacementModel(adapter, given, "lorsa") if given is not None
                     else ReplacementModel.load(adapter, None, "lorsa"))
        except CircuitsError as e:  # an incomplete set: no pure replacement model to measure
            out["pure_replacement"] = {"skipped": str(e)}
        else:
            out["pure_replacement"] = faithfulness_report(model, held)
    return out


@torch.no_grad()
def pure_model_disagrees(model, ids: torch.Tensor, real_probs: torch.Tensor) -> int | None:
    """The pure replacement model's top next token (no error terms, Lorsa attention) when it differs from the
    real model's (``real_probs`` [V]), else None; None too for a model with frozen attention (no pure model)."""
    if model.attention != "lorsa":
        return None
    pure = int(model.run_sparse(ids)[-1].argmax())
    return pure if pure != int(real_probs.argmax()) else None


def _has_number_tokens(adapter: ModelAdapter) -> bool:
    from .tokenizer import number_token_ids

    try:
        number_token_ids(adapter.tokenizer)
        return True
    except ValueError:
        return False


def natural_copy_prompt(adapter: ModelAdapter, seed: int = 1, kind: str = "sentence") -> tuple[torch.Tensor, int, int]:
    """A held-out natural-text copying prompt (case ``seed`` of that kind, see `natural_copy_cases`), cut near the
    middle of the second copy, after a token that occurs once before it (`unambiguous_cut`): (ids [1, n], the next
    token, the position of that token in the first copy).
    Only copying predicts it: match the current token earlier, read what followed it."""
    from .corpus import heldout_texts

    cases = [c for c in natural_copy_cases(adapter.tokenizer, heldout_texts(), seed + 1, adapter.context)
             if c.kind == kind]
    if len(cases) <= seed:
        raise ValueError(f"only {len(cases)} held-out {kind} cases")
    c = cases[seed]
    j = unambiguous_cut(c)  # tokens of the second copy kept in the prompt
    cut = c.second + j
    return torch.tensor([c.ids[:cut]]), c.ids[cut], c.first + c.offset + j


def unambiguous_cut(c: CopyCase) -> int:
    """How many tokens of the second copy a prompt keeps: the count nearest half the copy (the middle first) at
    which the current token occurs once before, in the first copy, so that matching it finds one earlier
    position to copy from.  Where a token recurs (a comma, ' the'), an induction head may rightly read the token
    after any of its occurrences, and the copy cannot say which one the model should follow; of seeds 1-20,
    6 cut at the middle were such.  Ties go to the shorter prompt; the middle where no count qualifies."""
    mid = max(1, c.length // 2)
    for j in sorted(range(1, c.length), key=lambda j: (abs(j - mid), j)):
        cut = c.second + j
        if c.ids[: cut - 1].count(c.ids[cut - 1]) == 1:
            return j
    return mid
