"""Multiple-choice scoring that runs each item's shared context once.

lm-evaluation-harness scores a multiple-choice item as one ``(context, continuation)`` request per choice and runs
the model on ``context + continuation`` for each, so an item of four choices computes its context four times
(lm-eval reuses logits only for one-token continuations). :class:`SharedContextLM` is lm-eval's own ``HFLM`` with
``_loglikelihood_tokens`` replaced: the requests of one context run the context once (its key/value cache kept),
then all their continuations together on that cache. Tokenisation, request order, the result format, metrics and
caching hooks stay lm-eval's; the log-likelihoods are lm-eval's up to floating-point rounding (``tests/test_evaluate.py``
checks them against ``HFLM`` on the pipeline's tasks: to 1e-9 in float64, and in float32 within a few times lm-eval's
own change when only its batch size changes).

A request whose context and continuation do not fit in the model's length goes to lm-eval's own path (it truncates
from the left, which a shared context cannot), and so do the requests of a context not worth sharing
(:func:`worth_sharing`: PIQA's two choices after a short question measured no faster shared), and for a model
with sliding-window layers a batch whose padded length reaches the window (the cache of a padded context keeps the
last ``window`` keys by position, so a shorter context would lose real keys to padding).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F


def shared_context_lm(**hflm_kwargs):
    """An lm-eval ``HFLM`` (same arguments) that scores the requests of one context with one pass over it."""
    from lm_eval.models.huggingface import HFLM

    class SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            from tqdm import tqdm

            res: list[Any] = [None] * len(requests)
            groups: dict[tuple, list[int]] = defaultdict(list)
            long = []
            for i, (_, ctx, cont) in enumerate(requests):
                if len(ctx) + len(cont) > self.max_length + 1 or not ctx:
                    long.append(i)
                else:
                    groups[tuple(ctx)].append(i)
            for ctx in [c for c, members in groups.items() if not worth_sharing(c, [requests[i][2] for i in members])]:
                long += groups.pop(ctx)
            width = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 16
            order = sorted(groups, key=len)  # similar context lengths share a batch (little padding)
            batches = [order[start:start + width] for start in range(0, len(order), width)]  # contexts per pass
            window = sliding_window(self.model.config)
            if window is not None:  # padded, a batch must fit in the window: its cache keeps the last `window` keys
                for batch in [b for b in batches if padded_length(b, groups, requests) >= window]:
                    batches.remove(batch)
                    long += [i for ctx in batch for i in groups.pop(ctx)]
            if long:  # lm-eval's own path: too long for the model (it truncates from the left), not worth sharing,
                # or beyond a sliding window once padded
                for i, answer in zip(long, super()._loglikelihood_tokens([requests[i] for i in long], True,
                                                                          override_bs)):
                    res[i] = answer
            with tqdm(total=len(requests) - len(long), disable=disable_tqdm or self.rank != 0,
                      desc="Running loglikelihood requests (shared contexts)") as bar:
                for contexts in batches:
                    batch = [(list(ctx), [requests[i][2] for i in groups[ctx]]) for ctx in contexts]
                    for ctx, answers in zip(contexts, score_groups(self, batch)):
                        for i, answer in zip(groups[ctx], answers):
                            res[i] = answer
                            if requests[i][0] is not None:
                                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        bar.update(len(groups[ctx]))
            return res

    return SharedContextLM(**hflm_kwargs)


def sliding_window(config) -> int | None:
    """The attention window of a model with sliding-window layers (Mistral, Gemma-2/3, Qwen2 with it on), else None."""
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def padded_length(contexts: list[tuple], groups: dict, requests) -> int:
    """The cache length of one batch of contexts: the longest context, then the longest continuation input."""
    return max(len(c) for c in contexts) + max(len(requests[i][2]) - 1 for c in contexts for i in groups[c])


def worth_sharing(ctx: tuple, conts: list[list[int]]) -> bool:
    """Whether one pass over the context, then one over the continuations, computes fewer tokens than lm-eval's one
    pass per choice by more than the continuations themselves: the context repeated ``n - 1`` times at least as
    long as all the continuations (4-choice items with long contexts, as the in-domain tasks: yes; PIQA's 2 choices
    after a short question: no, measured slower)."""
    return (len(conts) - 1) * len(ctx) >= sum(len(c) for c in conts)


def _forward(lm, input_ids: torch.Tensor, **kwargs):
    with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                                         enabled=lm.mixed_precision_dtype is not None):
        return lm.model(input_ids, **kwargs)


def score_groups(lm, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
    """``(log-likelihood, is greedy)`` of each continuation after its context, for several ``(context,
    continuations)`` groups at once: the contexts run once, right-padded into one batch (each context's last logits
    score its continuations' first tokens, its key/value cache the rest); then every continuation of every group,
    right-padded, on a copy of its context's cache (the padding of both masked out)."""
    device = lm.device
    lengths = [len(ctx) for ctx, _ in groups]
    lmax = max(lengths)
    ids = torch.zeros(len(groups), lmax, dtype=torch.long, device=device)
    for g, (ctx, _) in enumerate(groups):
        ids[g, :len(ctx)] = torch.tensor(ctx, dtype=torch.long)
    # right padding needs no mask here: a causal model's real tokens never attend to the pads after them
    last = sorted(set(n - 1 for n in lengths))
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:  # the output head only where one ends
        out = _forward(lm, ids, use_cache=True, logits_to_keep=torch.tensor(last, device=device))
        where = [last.index(n - 1) for n in lengths]
    else:
        out = _forward(lm, ids, use_cache=True)
        where = [n - 1 for n in lengths]
    firsts = F.log_softmax(out.logits[torch.arange(len(groups)), torch.tensor(where)], dim=-1,
                           dtype=lm.softmax_dtype)  # [groups, vocab]: each predicts its continuations' first token
    owner = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [c for _, cs in groups for c in cs]
    width = max(len(c) - 1 for c in conts)
    logits = None
    if width:
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor(owner, device=device))  # one copy of its context per continuation
        cont_ids = torch.zeros(len(conts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(conts), lmax + width, dtype=torch.long, device=device)
        positions = torch.zeros(len(conts), width, dtype=torch.long, device=device)
        for k, (g, c) in enumerate(zip(owner, conts)):
            cont_ids[k, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            mask[k, :lengths[g]] = 1  # the context, not its padding
            mask[k, lmax:lmax + len(c) - 1] = 1
            positions[k] = torch.arange(lengths[g], lengths[g] + width)
        logits = F.log_softmax(_forward(lm, cont_ids, past_key_values=cache, attention_mask=mask,
                                        position_ids=positions, use_cache=True).logits,
                               dim=-1, dtype=lm.softmax_dtype)
    answers: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for k, (g, c) in enumerate(zip(owner, conts)):
        # the continuation's log-probabilities in order, summed as lm-eval sums them (one tensor)
        rows = firsts[g].unsqueeze(0)
        if len(c) > 1:
            rows = torch.cat([rows, logits[k, :len(c) - 1]])
        targets = torch.tensor(c, dtype=torch.long, device=device)
        picked = rows.gather(1, targets.unsqueeze(1)).squeeze(1)
        answers[g].append((float(picked.sum()), bool((rows.argmax(-1) == targets).all())))
    return answers


def loglik_differences(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> tuple[int, float, float, int]:
    """How far two runs' logged samples (lm-eval's ``samples``, the same tasks and items) are apart: (requests, max
    |difference| of a log-likelihood, max relative difference, greedy flags that differ).

    Raises:
        ValueError: when the two did not score the same items.
    """
    n, worst, rel, greedy = 0, 0.0, 0.0, 0
    for task in a:
        if [x["doc_id"] for x in a[task]] != [x["doc_id"] for x in b.get(task, [])]:
            raise ValueError(f"{task}: the two runs scored different items")
        for sa, sb in zip(a[task], b[task]):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                (la, ga), (lb, gb) = ra[0], rb[0]
                n, worst = n + 1, max(worst, abs(la - lb))
                rel, greedy = max(rel, abs(la - lb) / max(abs(la), 1e-12)), greedy + (ga != gb)
    return n, worst, rel, greedy
