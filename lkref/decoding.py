"""The speculative decoding loop over a batch, and the model protocol it drives.

A model is any object with one method

    next_token_probs(tokens) -> probs
        tokens: int array [B, L];  probs: [B, L, V], probs[b, t] = P(x_{t+1} | tokens[b, :t+1])

It must be causal: probs[b, t] may depend on tokens[b, :t+1] only, because rows of
different lengths share one padded batch (padding sits after each row's end).  tokens come
as the prompt's kind of array (NumPy, CuPy, or through DLPack a PyTorch tensor, ...), and
probs may be any DLPack array (a PyTorch model's output, detached).

A draft may instead be a multi-head draft (Medusa, MLP speculator) with the method

    head_probs(tokens) -> probs [B, L, K, V], probs[b, t, j] = its guess for x_{t+j+1}

Then one call proposes all k <= K drafts at once, draft j drawn from head j's q.  Each
draft is still drawn from exactly the q that verify() is told, so the output stays exact.

One round of generate(): the draft proposes k tokens one at a time (sampling each from its
warped distribution q), the target scores all of them in one call, and verify() accepts a
prefix and emits one more token.  Temperature, top-k and top-p are applied to p and q
alike, and q handed to verify() is exactly the distribution each draft was drawn from.
At temperature 0 the draft proposes its argmax and verify_greedy() checks against the
target's argmax.  k = 0 (or draft=None) is plain autoregressive sampling from the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .backend import _back, _is_foreign, _to_kind, dlpack_interop, namespace, to_float64
from .sampler import _check_prob_rows, _check_rng, sample_rows, verify, verify_greedy
from .validation import as_array, check_probs, check_real_scalar

__all__ = ["Model", "MarkovChain", "GenerateResult", "warp", "generate"]


class Model(Protocol):
    def next_token_probs(self, tokens):  # pragma: no cover - a protocol
        """tokens [B, L] int -> [B, L, V] next-token probabilities at every position."""


class MarkovChain:
    """A first-order Markov chain as a model: P(x_{t+1} = j | x_t = i) = transition[i, j]."""

    def __init__(self, transition):
        self.transition = as_array(transition, "transition")
        shape = tuple(self.transition.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"transition must be a square [V, V] matrix, got {shape}")
        check_probs(self.transition, "transition")       # rows: probability distributions

    @property
    def vocab_size(self):
        return self.transition.shape[-1]

    def next_token_probs(self, tokens):
        return self.transition[tokens]


def _check_top(top_k, top_p):
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        check_real_scalar(top_p, "top_p", low=0, low_inclusive=False, high=1)


@dlpack_interop
def warp(probs, temperature=1.0, top_k=None, top_p=None):
    """Apply temperature, then top-k, then top-p to probability rows [..., V] (renormalised).

    temperature T > 0: p^(1/T), computed in log space.  top_k: keep the k most likely
    (ties with the k-th are kept).  top_p: keep the most likely tokens until their mass
    reaches top_p (the most likely token is always kept).  probs: floats, finite and
    non-negative, each row with some mass (unnormalised weights are fine).
    """
    check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    _check_top(top_k, top_p)
    probs = check_probs(probs, "probs", normalised=False)  # floats, a vocabulary, finite, >= 0
    xp = namespace(probs)
    if not bool(xp.all(xp.any(probs > 0, axis=-1))):
        raise ValueError("probs has a row with no mass (all zero)")
    return _warp(probs, temperature, top_k, top_p)


def _warp(probs, temperature, top_k, top_p):
    """warp() without the checks: generate() checks the rows a round uses, and leaves the rest."""
    xp = namespace(probs)
    p = to_float64(probs)                        # float32 subnormals kept on CuPy too
    if temperature != 1.0:
        with np.errstate(divide="ignore"):
            logp = xp.where(p > 0, xp.log(xp.where(p > 0, p, 1)), -xp.inf)
        top = xp.max(logp, axis=-1, keepdims=True)
        p = xp.exp((logp - top) / temperature)
    if top_k is not None and top_k < p.shape[-1]:
        kth = -xp.partition(-p, top_k - 1, axis=-1)[..., top_k - 1: top_k]
        p = xp.where(p >= kth, p, 0)
    if top_p is not None and top_p < 1:
        p = p / p.sum(axis=-1, keepdims=True)
        order = xp.argsort(-p, axis=-1, kind="stable")
        sorted_p = xp.take_along_axis(p, order, axis=-1)
        before = xp.cumsum(sorted_p, axis=-1) - sorted_p              # mass strictly before each token
        keep_sorted = before < top_p
        keep = xp.zeros_like(keep_sorted)
        xp.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = xp.where(keep, p, 0)
    return p / p.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class GenerateResult:
    """tokens [B, max_new_tokens]: the generated tokens (prompt not included).
    target_calls: rounds run (one target call over the batch each).
    accepted [rounds, B]: accepted drafts per row and round, -1 where a row had finished.
    position_accept_rate [k]: acceptances at draft position j over the rounds that reached j.
    reached, accepted_at [k]: the counts behind it.
    tau: tokens emitted per target call, averaged over the row-rounds."""

    tokens: Any
    target_calls: int
    accepted: Any
    position_accept_rate: Any
    reached: Any
    accepted_at: Any
    tau: float


def _check_model(model, name, methods):
    if not any(callable(getattr(model, m, None)) for m in methods):
        said = " or ".join(f"{m}(tokens)" for m in methods)
        raise TypeError(f"{name} must be a model: an object with {said}, got {type(model).__name__}")


def _ask(method, tokens, like):
    """method(tokens), the tokens as a copy in the prompt's kind of array where it came from
    another library (a copy: the loop writes on into its buffer)."""
    return method(tokens if like is None else _to_kind(tokens.copy(), like))


def _model_probs(probs, name, tokens, extra=()):
    """A model's output for tokens [B, L]: an array [B, L, *extra, V] on the tokens' backend."""
    probs = as_array(probs, name)                           # a view of a foreign one
    want = tuple(tokens.shape) + extra
    if probs.ndim != len(want) + 1 or tuple(probs.shape[:-1]) != want:
        raise ValueError(f"{name} returned shape {tuple(probs.shape)} for tokens of shape {tuple(tokens.shape)}; "
                         f"it must be [{', '.join(map(str, want))}, V]")
    if np.dtype(probs.dtype).kind != "f":
        raise TypeError(f"{name} returned {'integers' if np.dtype(probs.dtype).kind in 'iub' else probs.dtype}; "
                        f"it must return floating-point probabilities")
    namespace(probs, tokens)                          # a TypeError if the backends differ
    return probs


def _check_prompt_ids(prompt, V, xp):
    """The prompt's ids must lie in the models' vocabulary [0, V)."""
    if bool(xp.any(prompt >= V)):
        raise ValueError(f"prompt has token ids outside [0, {V}) (the models' vocabulary)")


def _at(probs, lengths, offsets, xp):
    """probs[b, lengths[b] - 1 + offsets] -> [B, len(offsets), V]."""
    b = xp.arange(probs.shape[0])[:, None]
    return probs[b, lengths[:, None] - 1 + offsets[None, :]]


def generate(target, draft, prompt, *, max_new_tokens, k, rng, temperature=1.0, top_k=None,
             top_p=None) -> GenerateResult:
    """Speculative decoding of max_new_tokens tokens after prompt [B, L0] (or [L0]).

    target, draft: models (see the module doc); draft may be None when k = 0.  The rows of their
    output that a round uses must be finite and non-negative with some mass (they are checked:
    O(B (k + 1) V) a round); they may be unnormalised weights, as warp() normalises them.
    rng: numpy.random.Generator (cupy.random.Generator for CuPy models); unused at temperature 0.
    A prompt of another library (a PyTorch tensor, ...) is viewed through DLPack: the models
    then get their tokens as that kind of array, and the result's arrays come back as it.
    A model may return any DLPack array (a PyTorch model's probabilities, detached).
    """
    like = prompt if _is_foreign(prompt) else None
    prompt = as_array(prompt, "prompt")                     # a view of a foreign one
    if np.dtype(prompt.dtype).kind not in "iu":
        raise TypeError(f"prompt must be an integer array of token ids, got dtype {prompt.dtype}")
    if prompt.ndim == 1:
        prompt = prompt[None, :]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape [B, L0] with L0 >= 1, got {tuple(prompt.shape)}")
    for name, val in (("max_new_tokens", max_new_tokens), ("k", k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if k > 0 and draft is None:
        raise ValueError("draft must be a model when k > 0")
    _check_model(target, "target", ("next_token_probs",))
    if k > 0:
        _check_model(draft, "draft", ("next_token_probs", "head_probs"))
    T = check_real_scalar(temperature, "temperature", low=0)
    _check_top(top_k, top_p)
    xp = namespace(prompt)
    greedy = T == 0
    if not greedy:
        _check_rng(rng, xp)
    if bool(xp.any(prompt < 0)):
        raise ValueError("prompt has token ids below 0")
    if getattr(target, "vocab_size", None) is not None:
        _check_prompt_ids(prompt, target.vocab_size, xp)
    multi_head = draft is not None and hasattr(draft, "head_probs")
    if multi_head and k > getattr(draft, "heads", k):
        raise ValueError(f"k = {k} is more drafts than the draft has heads ({draft.heads})")

    def dist(probs):
        return probs if greedy else _warp(probs, T, top_k, top_p)

    B, L0 = prompt.shape
    buf = xp.zeros((B, L0 + max_new_tokens + k + 1), dtype=xp.int64)
    buf[:, :L0] = prompt
    lengths = xp.full((B,), L0, dtype=xp.int64)
    produced = xp.zeros((B,), dtype=xp.int64)
    b = xp.arange(B)
    reached = xp.zeros(k, dtype=xp.int64)
    accepted_at = xp.zeros(k, dtype=xp.int64)
    rounds, emitted, row_rounds = [], 0, 0

    while True:
        remaining = max_new_tokens - produced
        active = remaining > 0
        if not bool(xp.any(active)):
            break
        nd = xp.where(active, xp.clip(xp.minimum(k, remaining - 1), 0, None), 0)
        # draft: k tokens, one call each (or one call for a multi-head draft)
        drafts = xp.zeros((B, k), dtype=xp.int64)
        q_rows = []
        heads = None
        if multi_head and k:
            tokens = buf[:, :int(lengths.max())]
            heads = _model_probs(_ask(draft.head_probs, tokens, like), "draft.head_probs", tokens, (draft.heads,))
            heads = heads[b, lengths - 1][:, :k]
            _check_prob_rows(heads, "draft.head_probs", active[:, None] & (xp.arange(k)[None, :] < nd[:, None]), xp)
        for j in range(k):
            if multi_head:
                q = dist(heads[:, j])
            else:
                tokens = buf[:, :int(lengths.max()) + j]
                probs = _model_probs(_ask(draft.next_token_probs, tokens, like), "draft.next_token_probs", tokens)
                rows = _at(probs, lengths + j, xp.zeros(1, dtype=xp.int64), xp)
                _check_prob_rows(rows, "draft.next_token_probs", (active & (nd > j))[:, None], xp)
                q = dist(rows[:, 0])
            x = xp.argmax(q, axis=-1) if greedy else sample_rows(q, rng.random(B, dtype=xp.float64))
            drafts[:, j] = x
            buf[b, lengths + j] = x
            q_rows.append(q)
        # target: one call scores every draft and the bonus position
        tokens = buf[:, :int(lengths.max()) + k]
        probs = _model_probs(_ask(target.next_token_probs, tokens, like), "target.next_token_probs", tokens)
        if not rounds:
            _check_prompt_ids(prompt, probs.shape[-1], xp)
        if q_rows and q_rows[0].shape[-1] != probs.shape[-1]:
            raise ValueError(f"the draft and the target disagree on the vocabulary: {q_rows[0].shape[-1]} "
                             f"and {probs.shape[-1]} tokens")
        rows = _at(probs, lengths, xp.arange(k + 1), xp)
        used = active[:, None] & (xp.arange(k + 1)[None, :] <= nd[:, None])      # positions verify() reads
        _check_prob_rows(rows, "target.next_token_probs", used, xp)
        p = dist(rows)
        if greedy:
            res = verify_greedy(drafts, p, num_draft=nd, validate=False)
        else:
            qs = xp.stack(q_rows, axis=1) if k else xp.zeros((B, 0, p.shape[-1]))
            res = verify(drafts, qs, p, rng=rng, num_draft=nd, validate=False)
        n = res.num_accepted
        buf[b, lengths + n] = res.tokens[b, n]
        step = xp.where(active, n + 1, 0)
        lengths = lengths + step
        produced = produced + step
        for j in range(k):
            reached[j] += int(xp.sum(active & (nd > j) & (n >= j)))
            accepted_at[j] += int(xp.sum(active & (nd > j) & (n > j)))
        rounds.append(xp.where(active, n, -1))
        emitted += int(step.sum())
        row_rounds += int(active.sum())

    accepted = xp.stack(rounds) if rounds else xp.zeros((0, B), dtype=xp.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = xp.where(reached > 0, accepted_at / xp.maximum(reached, 1), xp.nan)
    result = GenerateResult(
        tokens=buf[:, L0:L0 + max_new_tokens].copy(),
        target_calls=len(rounds),
        accepted=accepted,
        position_accept_rate=rate,
        reached=reached,
        accepted_at=accepted_at,
        tau=emitted / row_rounds if row_rounds else float("nan"),
    )
    return result if like is None else _back(result, like)
