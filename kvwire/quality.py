"""Quality of a reconstructed KV cache: how much the model's behaviour after the context changes.

Three measures over a real continuation of the context: mean KL divergence of next-token
distributions (teacher forcing), perplexity change, and agreement of 32 greedily generated tokens.
The reference pass (original cache) is computed once and reused for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvwire.errors import InvalidInputError
from kvwire.model import cache_kwargs, tensor_to_cache

GREEDY_TOKENS = 32


@dataclass(frozen=True)
class Reference:
    """Outputs of the original cache, kept so that each method costs only its own passes.

    ``log_probs`` is float64 ``[continuation_tokens, vocab]``: row i is the next-token distribution after
    feeding ``continuation[: i + 1]`` on top of the context.
    """

    continuation: torch.Tensor
    log_probs: torch.Tensor
    perplexity: float
    greedy: torch.Tensor


@dataclass(frozen=True)
class Quality:
    """Quality of one reconstructed cache against a ``Reference``."""

    kl: float  # mean KL(p_ref || p_hat) in nats per continuation position
    perplexity_ref: float
    perplexity: float
    greedy_match: float  # fraction of the generated positions where both caches chose the same token
    greedy_prefix: int  # number of leading generated tokens that agree

    @property
    def perplexity_change(self) -> float:
        return self.perplexity - self.perplexity_ref


@torch.no_grad()
def _teacher_forced_log_probs(model: Any, kv: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    cache = tensor_to_cache(kv.to(dtype=model.dtype, device=model.device), model.config)
    ids = continuation.to(model.device)[None]
    logits = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def _perplexity(log_probs: torch.Tensor, continuation: torch.Tensor) -> float:
    # Row i predicts continuation[i + 1]; the last row has no target inside the continuation.
    targets = continuation[1:].to(log_probs.device)
    nll = -log_probs[:-1].gather(1, targets[:, None]).mean()
    return float(torch.exp(nll))


@torch.no_grad()
def greedy_tokens(
    model: Any, kv: torch.Tensor, first_token: int, n_tokens: int = GREEDY_TOKENS
) -> torch.Tensor:
    """Feed ``first_token`` after the cached context, then pick ``n_tokens`` argmax tokens one at a time."""
    cache = tensor_to_cache(kv.to(dtype=model.dtype, device=model.device), model.config)
    token = torch.tensor([[first_token]], device=model.device)
    chosen = []
    for _ in range(n_tokens):
        logits = model(token, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
        token = logits.argmax().reshape(1, 1)
        chosen.append(int(token))
    return torch.tensor(chosen)


def reference_pass(model: Any, kv: torch.Tensor, continuation: list[int] | torch.Tensor) -> Reference:
    """Run the original cache ``kv`` (canonical shape) over ``continuation`` (>= 2 real next tokens)."""
    ids = torch.as_tensor(continuation, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() < 2:
        raise InvalidInputError("the continuation needs at least 2 tokens")
    log_probs = _teacher_forced_log_probs(model, kv, ids)
    return Reference(
        continuation=ids,
        log_probs=log_probs,
        perplexity=_perplexity(log_probs, ids),
        greedy=greedy_tokens(model, kv, int(ids[0])),
    )


def evaluate(model: Any, reference: Reference, kv_hat: torch.Tensor) -> Quality:
    """Compare the reconstructed cache ``kv_hat`` with the reference pass of the original cache."""
    log_probs = _teacher_forced_log_probs(model, kv_hat, reference.continuation)
    kl = (reference.log_probs.exp() * (reference.log_probs - log_probs)).sum(dim=-1).mean()
    greedy = greedy_tokens(model, kv_hat, int(reference.continuation[0]), len(reference.greedy))
    same = greedy == reference.greedy
    mismatches = (~same).nonzero()
    return Quality(
        kl=float(kl),
        perplexity_ref=reference.perplexity,
        perplexity=_perplexity(log_probs, reference.continuation),
        greedy_match=float(same.double().mean()),
        greedy_prefix=int(mismatches[0, 0]) if len(mismatches) else len(same),
    )
