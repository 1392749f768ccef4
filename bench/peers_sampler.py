"""A peer's speculative sampler against lkref's calibrated statistical test, and one probe.

    python bench/peers_sampler.py [--trials N] [--seed S]

Hugging Face transformers' `_speculative_sampling` (the sampler of its assisted generation,
one sequence at a time) is wrapped into lkref.verify's signature, the drafts' and the
target's probabilities given to it as logits (log p, whose softmax is p, in float32, as
its assisted generation casts them), and run through `lkref.testing.check_sampler`:
per-position acceptance against Binomial(reached, alpha_j), the accepted-count histogram and
each emitted position's marginal against the target (chi-square).  lkref.verify runs beside
it on the same problem.

The wrapper takes `uniforms=` as lkref.verify does (it hands them to transformers through
torch.rand_like), so check_sampler also runs its probe on it: a draft token the target gives
p = 0 (outside its top-k or top-p, say) has the ratio p / q = 0, and transformers up to
5.24.0 accepts a draft where the uniform r <= p / q, so it accepts that token when r = 0.0
exactly, which torch.rand draws with probability 2^-24 in float32 (measured here too);
5.25.0 accepts where r < p / q and passes.  lkref.verify accepts where u q < p, never with
p = 0.

Needs torch and transformers (4.x or 5.x).  Prints the two reports and torch.rand's zeros;
exit status 0 (it reports, it does not judge), 2 when a package is missing.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np                            # noqa: E402

import lkref                                  # noqa: E402
from lkref.benchmark import git_sha, machine_name   # noqa: E402
from lkref.testing import check_sampler       # noqa: E402


def transformers_verify(speculative_sampling, torch):
    """lkref.verify's signature around transformers' `_speculative_sampling`, a row at a time."""
    extra = ({"is_done_candidate": False}
             if "is_done_candidate" in inspect.signature(speculative_sampling).parameters else {})

    def verify(draft_tokens, draft_probs, target_probs, *, rng, uniforms=None):
        torch.manual_seed(int(rng.integers(2**62)))
        B, K = draft_tokens.shape
        with np.errstate(divide="ignore"):
            draft_logits = torch.from_numpy(np.log(np.asarray(draft_probs, np.float32)))
            target_logits = torch.from_numpy(np.log(np.asarray(target_probs, np.float32)))
        drafts = torch.from_numpy(np.asarray(draft_tokens, np.int64))
        tokens = np.full((B, K + 1), -1, np.int64)
        accepted = np.zeros(B, np.int64)
        real = torch.rand_like
        try:
            for b in range(B):
                if uniforms is not None:                     # its acceptance uniforms r, row b's
                    row = torch.from_numpy(np.asarray(uniforms[b], np.float32))
                    torch.rand_like = lambda x, *a, row=row, **k: row.reshape(x.shape).to(x.dtype)
                valid, n = speculative_sampling(drafts[b:b + 1], draft_logits[b:b + 1], K, target_logits[b:b + 1],
                                                **extra)
                n = int(n)
                tokens[b, :n + 1] = valid[0].numpy()
                accepted[b] = n
        finally:
            torch.rand_like = real
        return SimpleNamespace(num_accepted=accepted, tokens=tokens)
    return verify


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers
        from transformers.generation.utils import _speculative_sampling
    except ImportError as exc:
        print(f"needs torch and transformers: {exc}", file=sys.stderr)
        return 2
    print(f"lkref {git_sha()} on {machine_name('numpy')}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; check_sampler(trials={args.trials}, seed={args.seed})")
    for label, fn in (("transformers _speculative_sampling", transformers_verify(_speculative_sampling, torch)),
                      ("lkref.verify", lkref.verify)):
        print(f"\n## {label}")
        print(check_sampler(fn, seed=args.seed, trials=args.trials))
    torch.manual_seed(args.seed)
    n = 1 << 27
    zeros = int((torch.rand(n) == 0).sum())
    print(f"\ntorch.rand (float32) drew 0.0 {zeros} times in 2^27 draws (2^-24 would give {n / 2**24:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
