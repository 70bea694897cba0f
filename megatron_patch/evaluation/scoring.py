"""Perplexity over a token stream and LAMBADA last-word accuracy, from any `logits_fn`.

`logits_fn(tokens)` takes int64 ids [b, s] and returns float logits [b, s, V] for positions
0..s-1 of each row, causally (position j sees tokens 0..j). Probabilities are the softmax over all
V logits, padded vocabulary included: the distribution the trainer's loss and Megatron-LM's
zero-shot tasks (tasks/zeroshot_gpt) use. NLLs are summed in float64, one window at a time, so the
result does not depend on how windows are batched.
"""

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    start: int  # first input token; targets are tokens[start + 1 : end + 1]
    end: int  # one past the last input token
    scored: int  # how many of the last targets count (earlier ones belong to the previous window)


def windows(num_tokens: int, seq_length: int, stride: int) -> List[Window]:
    """Windows of at most seq_length inputs over a stream of num_tokens tokens; every token but
    the first is scored exactly once. stride == seq_length: non-overlapping windows, a target sees
    only the earlier tokens of its own window. stride < seq_length: a window starts every stride
    tokens and scores only the targets the previous one did not, so every target but those of the
    first window has at least seq_length - stride tokens of context."""
    if num_tokens < 2:
        raise ValueError(f"{num_tokens} tokens: perplexity needs at least 2")
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride {stride} must be in 1..seq_length ({seq_length})")
    plan, done, start = [], 0, 0  # targets 1..done are scored
    while done < num_tokens - 1:
        end = min(start + seq_length, num_tokens - 1)
        plan.append(Window(start, end, end - done))
        done, start = end, start + stride
    return plan


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[b, s] negative log-likelihoods of targets [b, s] under logits [b, s, V], in fp32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets.to(logits.device), reduction="none")


def _same_length_batches(plan: List[Window], batch_size: int):
    """Consecutive windows of one length (all but the last few are full), batch_size at a time."""
    for _, group in groupby(plan, key=lambda w: w.end - w.start):
        group = list(group)
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def perplexity(tokens, logits_fn: Callable, seq_length: int, stride: int = None, batch_size: int = 8) -> dict:
    """{tokens: targets scored, mean_nll: nats per token, perplexity: exp(mean_nll)} over `tokens`
    (a 1-d sequence of ids) in `windows(len(tokens), seq_length, stride or seq_length)`."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    plan = windows(len(tokens), seq_length, stride or seq_length)
    total, count = 0.0, 0
    for batch in _same_length_batches(plan, batch_size):
        inputs = torch.stack([tokens[w.start:w.end] for w in batch])
        targets = torch.stack([tokens[w.start + 1:w.end + 1] for w in batch])
        with torch.no_grad():
            nll = token_nll(logits_fn(inputs), targets)
        for row, w in zip(nll, batch):
            total += row[-w.scored:].double().sum().item()
            count += w.scored
    mean = total / count
    return dict(tokens=count, mean_nll=mean, perplexity=math.exp(mean))


def lambada(examples: Sequence[Tuple[List[int], List[int]]], logits_fn: Callable, batch_size: int = 8) -> dict:
    """LAMBADA scoring of (context ids, target ids) pairs: the input is context + target[:-1], and
    an example is correct iff the greedy (argmax) prediction at each of the last len(target)
    positions is the target token (Megatron-LM's tasks/zeroshot_gpt). word_perplexity =
    exp(mean over examples of the target word's NLL), the LAMBADA perplexity
    lm-evaluation-harness reports; token_perplexity = exp(mean NLL per target token)."""
    if not examples:
        raise ValueError("no LAMBADA examples to score")
    correct, word_nll, target_tokens = 0, 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows = [list(ctx) + list(tgt[:-1]) for ctx, tgt in chunk]
        width = max(map(len, rows))
        # Right padding with id 0: under causal attention no scored position can see it.
        inputs = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.int64)
        with torch.no_grad():
            logits = logits_fn(inputs).float()
        for row, (ctx, tgt) in zip(logits, chunk):
            at = row[len(ctx) - 1:len(ctx) - 1 + len(tgt)]  # the positions that predict the target
            target = torch.tensor(tgt, dtype=torch.int64, device=at.device)
            correct += int(torch.equal(at.argmax(-1), target))
            word_nll += F.cross_entropy(at, target, reduction="sum").double().item()
            target_tokens += len(tgt)
    n = len(examples)
    return dict(examples=n, correct=correct, accuracy=correct / n, target_tokens=target_tokens,
                word_perplexity=math.exp(word_nll / n), token_perplexity=math.exp(word_nll / target_tokens))
