"""An LLM-like toy: a fixed neural target LM and two kinds of trainable drafts.

Letters: V vocabulary, D embedding width, H hidden width (the draft's capacity knob),
K draft positions, N positions in a batch.  Every model reads a context of the last two
tokens c_t = (x_t, x_{t-1}) (with x_{-1} = x_0), embeds and concatenates them
(e_t, 2D wide), and applies one tanh layer:

    h_t = tanh(e_t W1 + b1)                                      (N, H)

* TargetLM: fixed random weights, logits = sharpness * (h_t W2 + b2) / sqrt(H).  The
  sharpness sets the target's entropy.  Its samples are the training data, as real
  drafts are trained on target-generated responses.
* HeadsDraft (Medusa / MLP speculator): K output layers on one trunk; head k predicts
  x_{t+k} from c_t alone, without seeing x_{t+1..t+k-1}.  W2 is [H, K, V] so that all
  heads are one matrix product: logits = h @ W2.reshape(H, K V) + b2.
* ARDraft: one output layer, the same shape as the target; applied K times when decoding.

forward(tokens, positions) -> (logits, cache); backward(dlogits, cache) -> grads
(a dict with the parameters' names), written by hand like the losses.
"""

from __future__ import annotations

import numpy as np

from ..losses import softmax

__all__ = ["TargetLM", "HeadsDraft", "ARDraft", "contexts", "sample_sequences"]


def contexts(tokens, positions):
    """(x_t, x_{t-1}) for each (row, t) in positions: tokens [B, L], positions ([n], [n]) -> [n, 2]."""
    b, t = positions
    prev = np.maximum(t - 1, 0)
    return np.stack([tokens[b, t], tokens[b, prev]], axis=-1)


class _Trunk:
    """The shared part: embeddings, one tanh layer; parameters E [V, D], W1 [2D, H], b1 [H]."""

    def _trunk_forward(self, ctx):
        e = self.params["E"][ctx].reshape(len(ctx), -1)              # [N, 2D]
        h = np.tanh(e @ self.params["W1"] + self.params["b1"])
        return h, (ctx, e, h)

    def _trunk_backward(self, dh, tcache, grads):
        ctx, e, h = tcache
        dpre = dh * (1 - h * h)                                      # tanh' = 1 - tanh^2
        grads["W1"] = e.T @ dpre
        grads["b1"] = dpre.sum(0)
        de = (dpre @ self.params["W1"].T).reshape(len(ctx), 2, -1)
        dE = np.zeros_like(self.params["E"])
        np.add.at(dE, ctx[:, 0], de[:, 0])
        np.add.at(dE, ctx[:, 1], de[:, 1])
        grads["E"] = dE


def _init_trunk(rng, V, D, H, dtype):
    return {
        "E": rng.standard_normal((V, D)).astype(dtype),
        "W1": (rng.standard_normal((2 * D, H)) / np.sqrt(2 * D)).astype(dtype),
        "b1": np.zeros(H, dtype=dtype),
    }


class TargetLM(_Trunk):
    """A fixed random LM.  next_token_probs makes it a model for lkref.generate."""

    def __init__(self, vocab=256, embed=32, hidden=256, sharpness=4.0, seed=0):
        rng = np.random.default_rng(seed)
        self.params = _init_trunk(rng, vocab, embed, hidden, np.float64)
        self.params["W2"] = rng.standard_normal((hidden, vocab))
        self.params["b2"] = rng.standard_normal(vocab) * 0.5
        self.sharpness = sharpness
        self.vocab = vocab

    def logits(self, ctx):
        h, _ = self._trunk_forward(ctx)
        H = h.shape[-1]
        return self.sharpness * (h @ self.params["W2"] + self.params["b2"]) / np.sqrt(H)

    def probs(self, ctx):
        return softmax(self.logits(ctx))

    def next_token_probs(self, tokens):
        B, L = tokens.shape
        b, t = np.meshgrid(np.arange(B), np.arange(L), indexing="ij")
        return self.probs(contexts(tokens, (b.ravel(), t.ravel()))).reshape(B, L, -1)


def sample_sequences(target: TargetLM, n_seq: int, length: int, rng) -> np.ndarray:
    """Ancestral samples [n_seq, length] from the target, starting from two uniform tokens."""
    tokens = np.zeros((n_seq, length), dtype=np.int64)
    tokens[:, :2] = rng.integers(0, target.vocab, size=(n_seq, 2))
    rows = np.arange(n_seq)
    for t in range(1, length - 1):
        p = target.probs(contexts(tokens, (rows, np.full(n_seq, t))))
        cdf = np.cumsum(p, -1)
        u = rng.random(n_seq)[:, None] * cdf[:, -1:]
        tokens[:, t + 1] = np.minimum((cdf <= u).sum(-1), target.vocab - 1)
    return tokens


class HeadsDraft(_Trunk):
    """K heads on one trunk; logits [N, K, V]; head k (0-based) predicts x_{t+k+1} from c_t."""

    def __init__(self, vocab, heads, hidden, embed=32, seed=0):
        rng = np.random.default_rng(seed)
        self.params = _init_trunk(rng, vocab, embed, hidden, np.float64)
        self.params["W2"] = rng.standard_normal((hidden, heads, vocab)) * 0.01
        self.params["b2"] = np.zeros((heads, vocab))
        self.heads, self.vocab = heads, vocab

    def forward(self, ctx):
        h, tcache = self._trunk_forward(ctx)
        W2 = self.params["W2"]
        logits = (h @ W2.reshape(W2.shape[0], -1)).reshape(len(h), *W2.shape[1:]) + self.params["b2"]
        return logits, (h, tcache)

    def backward(self, dlogits, cache):
        h, tcache = cache
        W2 = self.params["W2"]
        d2 = dlogits.reshape(len(h), -1)                              # [N, K V]
        grads = {"W2": (h.T @ d2).reshape(W2.shape), "b2": dlogits.sum(0)}
        dh = d2 @ W2.reshape(W2.shape[0], -1).T
        self._trunk_backward(dh, tcache, grads)
        return grads

    def head_probs(self, tokens):
        """[B, L, K, V]: the K heads' distributions at every position (for lkref.generate)."""
        B, L = tokens.shape
        b, t = np.meshgrid(np.arange(B), np.arange(L), indexing="ij")
        logits, _ = self.forward(contexts(tokens, (b.ravel(), t.ravel())))
        return softmax(logits).reshape(B, L, self.heads, -1)


class ARDraft(_Trunk):
    """One next-token head: logits [N, 1, V]; a model for lkref.generate."""

    def __init__(self, vocab, hidden, embed=32, seed=0):
        rng = np.random.default_rng(seed)
        self.params = _init_trunk(rng, vocab, embed, hidden, np.float64)
        self.params["W2"] = rng.standard_normal((hidden, 1, vocab)) * 0.01
        self.params["b2"] = np.zeros((1, vocab))
        self.heads, self.vocab = 1, vocab

    forward = HeadsDraft.forward
    backward = HeadsDraft.backward

    def next_token_probs(self, tokens):
        B, L = tokens.shape
        b, t = np.meshgrid(np.arange(B), np.arange(L), indexing="ij")
        logits, _ = self.forward(contexts(tokens, (b.ravel(), t.ravel())))
        return softmax(logits[:, 0]).reshape(B, L, -1)
