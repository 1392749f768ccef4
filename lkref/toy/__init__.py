"""Toy problems that reproduce the paper's findings with lkref's own gradients.

gaussian.py   the motivating toy (paper Fig. 2): one Gaussian fitted to a mixture
lm.py         a fixed neural target LM and two trainable drafts (heads, AR), by hand
optim.py      AdamW with beta = (0.9, 0.95), cosine schedule with warm-up, clipping
train.py      train a draft with any lkref loss; measure alpha per position and tau
demo.py       python -m lkref demo: all of the above in one table
"""
