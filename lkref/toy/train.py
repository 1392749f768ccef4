"""Train a toy draft against the toy target with any lkref loss, then measure it.

One step: draw N contexts c_t from target-generated sequences; the target gives
p_{t+k+1} = P(x_{t+k+1} | c_{t+k}) for each draft position k; the draft gives logits z_k
from c_t; lkref.multi_position combines the K losses with weights gamma^(k-1) and one
lambda per position; the gradient flows back through the draft by hand; AdamW steps.

Evaluation on held-out sequences:
  alpha_per_position       teacher-forced alpha_k = mean_t sum_v min(p_{t+k+1}, q_k)
  (alpha_per_position_train: the same on as many of the training sequences, for the gap)
  accept_length_theory     1 + sum_k prod_{j<=k} alpha_j
  accept_length_measured   tau, tokens per target call of real speculative decoding (lkref.generate)
For the AR draft there is one trained position; its alpha is reported for every position k,
since a draft accepted up to k sees a target-distributed context again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..decoding import generate, warp
from ..losses import softmax
from ..multistep import accept_length_loss
from ..positions import LOSSES, multi_position
from ..theory import expected_accept_length
from ..validation import check_real_scalar
from .lm import ARDraft, HeadsDraft, TargetLM, contexts, sample_sequences
from .optim import AdamW, clip_by_global_norm, cosine_lr

__all__ = ["TrainConfig", "train", "TRAIN_LOSSES"]

#: The per-position losses, and "accept_length": the multi-step objective K + 1 - E[tau]
#: over all positions at once (lkref.multistep), which needs no gamma and no lambda.
TRAIN_LOSSES = tuple(sorted(LOSSES)) + ("accept_length",)


@dataclass
class TrainConfig:
    loss: str = "lk_lambda"
    draft: str = "heads"          # heads | ar
    vocab: int = 256
    heads: int = 4                # K: draft positions
    hidden: int = 32              # the draft's capacity
    steps: int = 400
    seed: int = 0
    temperature: float = 1.0
    eta: float | None = None      # None: the paper's default, 10 for heads (Medusa-style), 3 otherwise
    gamma: float = 0.8
    batch: int = 256
    lr: float = 1e-2
    warmup: int = 40
    weight_decay: float = 0.01
    clip: float = 1.0
    adam_eps: float = 1e-8        # AdamW's epsilon; above a loss's gradient RMS, Adam stops rescaling it
    target_hidden: int = 128
    target_sharpness: float = 4.0
    target_seed: int = 1234       # the target is one fixed model across seeds
    train_sequences: int = 512
    seq_len: int = 34
    eval_sequences: int = 64
    eval_new_tokens: int = 32

    def check(self):
        """Every field's type and range, each error naming the field (train() calls it first)."""
        if self.eta is None:
            self.eta = 10.0 if self.draft == "heads" else 3.0
        if self.loss not in TRAIN_LOSSES:
            raise ValueError(f"loss must be one of {TRAIN_LOSSES}, got {self.loss!r}")
        if self.draft not in ("heads", "ar"):
            raise ValueError(f"draft must be 'heads' or 'ar', got {self.draft!r}")
        for name, low in (("vocab", 2), ("heads", 1), ("hidden", 1), ("steps", 1), ("seed", 0), ("batch", 1),
                          ("warmup", 0), ("target_hidden", 1), ("target_seed", 0), ("train_sequences", 1),
                          ("eval_sequences", 1), ("eval_new_tokens", 1)):
            _check_int(getattr(self, name), name, low)
        _check_int(self.seq_len, "seq_len", self.heads + 3, " (heads + 3)")
        for name, low, inclusive in (("temperature", 0, False), ("eta", 0, True), ("gamma", 0, False),
                                     ("lr", 0, False), ("weight_decay", 0, True), ("clip", 0, False),
                                     ("adam_eps", 0, False),
                                     ("target_sharpness", 0, True)):
            check_real_scalar(getattr(self, name), name, low=low, low_inclusive=inclusive)


def _check_int(value, name, low, why=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{why}, got {value}")


def make_target(cfg: TrainConfig) -> TargetLM:
    return TargetLM(cfg.vocab, hidden=cfg.target_hidden, sharpness=cfg.target_sharpness, seed=cfg.target_seed)


def make_draft(cfg: TrainConfig):
    if cfg.draft == "heads":
        return HeadsDraft(cfg.vocab, cfg.heads, cfg.hidden, seed=cfg.seed + 1)
    return ARDraft(cfg.vocab, cfg.hidden, seed=cfg.seed + 1)


class TargetTable:
    """The target's (warped) next-token distribution at every position of the training data.

    Computed once when it fits in CACHE_BYTES, else on demand for each batch."""

    CACHE_BYTES = 256 << 20

    def __init__(self, target, tokens, temperature):
        self.target, self.tokens, self.T = target, tokens, temperature
        n, L = tokens.shape
        self.table = None
        if n * L * target.vocab * 8 <= self.CACHE_BYTES:
            b, t = np.meshgrid(np.arange(n), np.arange(L), indexing="ij")
            self.table = self._probs(b.ravel(), t.ravel()).reshape(n, L, -1)

    def _probs(self, b, t):
        return warp(self.target.probs(contexts(self.tokens, (b, t))), self.T)

    def __call__(self, b, t):
        return self.table[b, t] if self.table is not None else self._probs(b, t)


def loss_and_grads(draft, table: TargetTable, b, t, cfg: TrainConfig):
    """The training objective on one batch and its gradient for every draft parameter.

    Draft position k (0-based) at context c_t is trained against the target at c_{t+k}."""
    logits, cache = draft.forward(contexts(table.tokens, (b, t)))
    K = logits.shape[1]
    ps = [table(b, t + k) for k in range(K)]
    zs = [logits[:, k] for k in range(K)]
    if cfg.loss == "accept_length":
        res = accept_length_loss(zs, ps, temperature=cfg.temperature)
        alpha_1 = res.alphas[0]
    else:
        extra = {"eta": cfg.eta} if cfg.loss == "lk_lambda" else {}
        res = multi_position(cfg.loss, zs, ps, gamma=cfg.gamma, temperature=cfg.temperature, **extra)
        alpha_1 = res.positions[0].alpha
    grads = draft.backward(np.stack(res.grads, axis=1), cache)
    return res.loss, alpha_1, grads


def teacher_forced_alphas(draft, table: TargetTable, n, cfg: TrainConfig) -> list:
    """alpha_k = mean_t sum_v min(p_{t+k+1}, q_k) over every context of the first n sequences of
    table's tokens (for the AR draft, its one position's alpha repeated for each of the K)."""
    K = cfg.heads
    b, t = np.meshgrid(np.arange(n), np.arange(1, cfg.seq_len - K + 1), indexing="ij")
    b, t = b.ravel(), t.ravel()
    logits, _ = draft.forward(contexts(table.tokens, (b, t)))
    alphas = []
    for k in range(logits.shape[1]):
        q = softmax(logits[:, k], cfg.temperature)
        alphas.append(float(np.minimum(table(b, t + k), q).sum(-1).mean()))
    return alphas * K if cfg.draft == "ar" else alphas


def evaluate(draft, target, cfg: TrainConfig, rng) -> dict:
    tokens = sample_sequences(target, cfg.eval_sequences, cfg.seq_len, rng)
    K = cfg.heads
    alphas = teacher_forced_alphas(draft, TargetTable(target, tokens, cfg.temperature), cfg.eval_sequences, cfg)
    gen = generate(target, draft, tokens[:, :2], max_new_tokens=cfg.eval_new_tokens, k=K, rng=rng,
                   temperature=cfg.temperature)
    return {
        "alpha_per_position": alphas,
        "accept_length_theory": float(expected_accept_length(np.array(alphas))),
        "accept_length_measured": float(gen.tau),
        "measured_position_accept_rate": [float(x) for x in gen.position_accept_rate],
        "target_calls": gen.target_calls,
    }


def train(cfg: TrainConfig, progress=None) -> dict:
    """Train one draft and evaluate it; returns a JSON-ready dict.  Same seed, same numbers."""
    cfg.check()
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    target = make_target(cfg)
    draft = make_draft(cfg)
    data = sample_sequences(target, cfg.train_sequences, cfg.seq_len, rng)
    table = TargetTable(target, data, cfg.temperature)
    K = draft.heads
    opt = AdamW(draft.params, betas=(0.9, 0.95), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                no_decay=("b1", "b2"))
    n_params = sum(p.size for p in draft.params.values())
    history = []
    grad_rms_first = None
    for step in range(cfg.steps):
        b = rng.integers(0, cfg.train_sequences, size=cfg.batch)
        t = rng.integers(1, cfg.seq_len - K + 1, size=cfg.batch)
        loss, alpha_1, grads = loss_and_grads(draft, table, b, t, cfg)
        norm = clip_by_global_norm(grads, cfg.clip)
        if grad_rms_first is None:                  # the scale Adam's epsilon is compared with
            grad_rms_first = norm / np.sqrt(n_params)
        opt.step(grads, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        history.append(float(loss))
        if progress is not None and (step + 1) % max(1, cfg.steps // 5) == 0:
            progress(f"  step {step + 1}/{cfg.steps}  loss {float(loss):.4f}  grad-norm {norm:.3g}  "
                     f"alpha_1 {float(alpha_1.mean()):.3f}")
    out = {"config": asdict(cfg), "loss_first": history[0], "loss_last": float(np.mean(history[-20:])),
           "grad_rms_first": float(grad_rms_first)}
    out.update(evaluate(draft, target, cfg, np.random.default_rng(cfg.seed + 10_000)))
    # the same alphas on as many training sequences as held-out ones: the gap is overfitting
    out["alpha_per_position_train"] = teacher_forced_alphas(draft, table, min(cfg.eval_sequences,
                                                                               cfg.train_sequences), cfg)
    out["seconds"] = time.perf_counter() - start
    return out


def save_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
