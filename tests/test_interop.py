"""DLPack interop: foreign arrays go in without a copy and come back as their own kind."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import lkref

from .strategies import make_logits, make_probs


class Foreign:
    """A minimal DLPack-capable array of another 'library' (this module), backed by NumPy memory."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def from_dlpack(x):            # this module's from_dlpack: how results come back as Foreign
    return Foreign(np.from_dlpack(x))


@pytest.mark.parametrize("name", sorted(lkref.LOSSES))
def test_losses_take_and_return_foreign_arrays(name):
    rng = np.random.default_rng(0)
    z = make_logits(rng, (5, 9), dtype=np.float32)
    p = make_probs(rng, (5, 9), dtype=np.float32)
    mask = np.array([1, 0, 1, 1, 1], bool)
    want = lkref.LOSSES[name](z, p, mask=mask)
    got = lkref.LOSSES[name](Foreign(z), Foreign(p), mask=Foreign(mask))
    assert isinstance(got.grad, Foreign) and isinstance(got.loss, Foreign) and isinstance(got.alpha, Foreign)
    np.testing.assert_array_equal(got.grad.a, want.grad)
    np.testing.assert_array_equal(got.loss.a, want.loss)


class LegacyForeign(Foreign):
    """An exporter from before DLPack 1.0: its capsule has no read-only flag."""

    def __dlpack__(self, **kw):
        kw.pop("max_version", None)
        return self.a.__dlpack__(**kw)


#: NumPy imports DLPack arrays writeable from 2.2.5 on (numpy#28599), where the exporter says so.
WRITEABLE_IMPORTS = tuple(int(x) for x in np.__version__.split(".")[:3] if x.isdigit()) >= (2, 2, 5)


def test_out_through_dlpack_is_written_in_place_without_a_copy():
    rng = np.random.default_rng(1)
    z = make_logits(rng, (4, 7), dtype=np.float32)
    p = make_probs(rng, (4, 7), dtype=np.float32)
    buf = np.zeros_like(z)
    if not WRITEABLE_IMPORTS:                           # this NumPy imports read-only: said plainly
        with pytest.raises(ValueError, match="out came through DLPack as a read-only view"):
            lkref.lk_alpha(Foreign(z), Foreign(p), out=Foreign(buf))
        assert not buf.any()
        return
    got = lkref.lk_alpha(Foreign(z), Foreign(p), out=Foreign(buf))
    np.testing.assert_array_equal(buf, lkref.lk_alpha(z, p).grad)   # the caller's memory holds the gradient
    assert np.shares_memory(got.grad.a, buf)
    zz = z.copy()
    lkref.lk_alpha(Foreign(zz), Foreign(p), out=Foreign(zz))         # and it may be the logits themselves
    np.testing.assert_array_equal(zz, buf)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_a_read_only_out_through_dlpack_is_refused_by_name(impl):
    """An exporter without DLPack 1.0's flags arrives read-only on every NumPy: the error says
    why, and nothing is written, rather than 'must be writeable' about a tensor that is."""
    rng = np.random.default_rng(2)
    z = make_logits(rng, (3, 5), dtype=np.float32)
    p = make_probs(rng, (3, 5), dtype=np.float32)
    buf = np.zeros_like(z)
    with pytest.raises(ValueError, match=r"out came through DLPack as a read-only view.*NumPy before 2\.2\.5"):
        lkref.tv(LegacyForeign(z), LegacyForeign(p), out=LegacyForeign(buf), impl=impl)
    assert not buf.any()
    r = lkref.tv(LegacyForeign(z), LegacyForeign(p), impl=impl)     # without out= it works
    np.testing.assert_array_equal(r.grad.a, lkref.tv(z, p, impl=impl).grad)


def test_inputs_are_viewed_not_copied(monkeypatch):
    z = np.zeros((2, 3))
    seen = []
    real = np.from_dlpack
    monkeypatch.setattr(np, "from_dlpack", lambda x: seen.append(real(x)) or seen[-1])
    lkref.tv(Foreign(z), Foreign(np.full((2, 3), 1 / 3)))
    assert np.shares_memory(seen[0], z)


def test_verify_takes_foreign_arrays():
    p, q = lkref.testing.sampler_problem(0, 2, 4)
    B = 6
    tok = np.zeros((B, 2), np.int64) + 2
    qq = np.ascontiguousarray(np.broadcast_to(q, (B, 2, 4)))
    pp = np.ascontiguousarray(np.broadcast_to(p, (B, 3, 4)))
    got = lkref.verify(Foreign(tok), Foreign(qq), Foreign(pp), rng=np.random.default_rng(0))
    want = lkref.verify(tok, qq, pp, rng=np.random.default_rng(0))
    assert isinstance(got.tokens, Foreign)
    np.testing.assert_array_equal(got.tokens.a, want.tokens)
    g = lkref.verify_greedy(Foreign(tok), Foreign(pp))
    np.testing.assert_array_equal(g.tokens.a, lkref.verify_greedy(tok, pp).tokens)


class Unshareable(Foreign):
    """An exporter that refuses, as PyTorch does for a tensor that requires grad."""

    def __dlpack__(self, **kw):
        raise BufferError("Can't export tensors that require gradient, use tensor.detach()")


@pytest.mark.parametrize("call, name", [
    (lambda z, p: lkref.lk_alpha(Unshareable(z), p), "draft_logits"),      # 'argument 0' before
    (lambda z, p: lkref.kl(z, Unshareable(p)), "target_probs"),
    (lambda z, p: lkref.tv(z, p, mask=Unshareable(np.ones(2))), "mask"),
    (lambda z, p: lkref.lk_lambda_forward(z, p, Unshareable(np.ones(2))), "lam"),
    (lambda z, p: lkref.tv_forward(Unshareable(z), p), "z"),
    (lambda z, p: lkref.multi_position("tv", [z, Unshareable(z)], [p, p]), r"draft_logits\[1\]"),
    (lambda z, p: lkref.warp(Unshareable(p)), "probs"),
])
def test_an_array_that_cannot_be_shared_is_named(call, name):
    z, p = np.zeros((2, 3)), np.full((2, 3), 1 / 3)
    with pytest.raises(TypeError, match=rf"^{name} cannot be shared through DLPack \(Can't export"):
        call(z, p)


class Elsewhere(Foreign):
    """An array on a DLPack device of the given type (2: CUDA, 4: OpenCL, ...), never exported."""

    def __init__(self, a, device):
        super().__init__(a)
        self.device = device

    def __dlpack__(self, **kw):
        raise AssertionError("lkref must not ask an array it cannot view for its memory")

    def __dlpack_device__(self):
        return (self.device, 0)


def test_an_array_on_a_device_lkref_cannot_reach_is_named():
    z, p = np.zeros((2, 3)), np.full((2, 3), 1 / 3)
    with pytest.raises(TypeError, match="^draft_logits lives on DLPack device type 4; lkref runs on the CPU"):
        lkref.lk_alpha(Elsewhere(z, 4), p)
    if not lkref.cupy_available():
        with pytest.raises(TypeError, match="^target_probs lives on a CUDA device, but CuPy with a device is not"):
            lkref.lk_alpha(z, Elsewhere(p, 2))


def test_warp_takes_and_returns_foreign_arrays():
    w = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    got = lkref.warp(Foreign(w), temperature=0.5, top_p=0.9)     # a TypeError from np.dtype before
    assert isinstance(got, Foreign)
    np.testing.assert_array_equal(got.a, lkref.warp(w, temperature=0.5, top_p=0.9))


class ForeignChain:
    """A model of another library: it asks for tokens of its kind and answers in it."""

    def __init__(self, transition):
        self.chain = lkref.MarkovChain(transition)
        self.seen = []

    def next_token_probs(self, tokens):
        self.seen.append(type(tokens))
        ids = tokens.a if isinstance(tokens, Foreign) else tokens   # not exported again: NumPy before
        return Foreign(np.ascontiguousarray(self.chain.next_token_probs(ids)))   # 2.2.5 imports read-only


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_generate_takes_models_and_prompts_of_another_library(temperature):
    """A Foreign prompt: the models get Foreign tokens, their Foreign output is viewed, and the
    result comes back Foreign, token for token what NumPy arrays give (same seed)."""
    rng = np.random.default_rng(6)
    target_t, draft_t = rng.dirichlet(np.ones(5), 5), rng.dirichlet(np.ones(5), 5)
    prompt = np.array([[0, 3], [1, 2], [4, 4]])
    kw = dict(max_new_tokens=7, k=3, temperature=temperature)
    want = lkref.generate(lkref.MarkovChain(target_t), lkref.MarkovChain(draft_t), prompt,
                          rng=np.random.default_rng(1), **kw)
    target, draft = ForeignChain(target_t), ForeignChain(draft_t)
    got = lkref.generate(target, draft, Foreign(prompt), rng=np.random.default_rng(1), **kw)
    assert isinstance(got.tokens, Foreign) and isinstance(got.accepted, Foreign)     # a TypeError before
    np.testing.assert_array_equal(got.tokens.a, want.tokens)
    np.testing.assert_array_equal(got.accepted.a, want.accepted)
    assert got.target_calls == want.target_calls and got.tau == want.tau
    assert set(target.seen) == set(draft.seen) == {Foreign}
    plain = lkref.generate(ForeignChain(target_t), ForeignChain(draft_t), prompt,   # a NumPy prompt:
                           rng=np.random.default_rng(1), **kw)                      # NumPy out
    assert isinstance(plain.tokens, np.ndarray)
    np.testing.assert_array_equal(plain.tokens, want.tokens)


def test_a_markov_chain_takes_a_transition_of_another_library():
    t = np.array([[0.5, 0.5], [0.1, 0.9]])
    chain = lkref.MarkovChain(Foreign(t))                 # a TypeError from np.dtype before
    assert isinstance(chain.transition, np.ndarray) and np.shares_memory(chain.transition, t)
    with pytest.raises(ValueError, match="transition rows must sum to 1"):
        lkref.MarkovChain(Foreign(t * 1.1))


def test_generate_names_a_model_output_that_cannot_be_shared():
    class Grad(ForeignChain):
        def next_token_probs(self, tokens):
            return Unshareable(self.chain.next_token_probs(tokens))
    t = np.full((3, 3), 1 / 3)
    with pytest.raises(TypeError, match=r"^target.next_token_probs cannot be shared through DLPack"):
        lkref.generate(Grad(t), None, np.array([[0]]), max_new_tokens=2, k=0, rng=np.random.default_rng(0))


def test_generate_with_torch_models():
    torch = pytest.importorskip("torch")

    class TorchChain:
        def __init__(self, transition):
            self.t = torch.tensor(transition)

        def next_token_probs(self, tokens):
            assert isinstance(tokens, torch.Tensor)
            return self.t[tokens]

    rng = np.random.default_rng(7)
    target_t, draft_t = rng.dirichlet(np.ones(6), 6), rng.dirichlet(np.ones(6), 6)
    prompt = np.array([[0], [5]])
    want = lkref.generate(lkref.MarkovChain(target_t), lkref.MarkovChain(draft_t), prompt,
                          max_new_tokens=6, k=2, rng=np.random.default_rng(3))
    got = lkref.generate(TorchChain(target_t), TorchChain(draft_t), torch.from_numpy(prompt),
                         max_new_tokens=6, k=2, rng=np.random.default_rng(3))
    assert isinstance(got.tokens, torch.Tensor)
    np.testing.assert_array_equal(got.tokens.numpy(), want.tokens)


def test_torch_cpu_tensors_round_trip():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    z = make_logits(rng, (3, 8), dtype=np.float32)
    p = make_probs(rng, (3, 8), dtype=np.float32)
    zt, pt = torch.from_numpy(z), torch.from_numpy(p)
    r = lkref.lk_lambda(zt, pt)
    assert isinstance(r.grad, torch.Tensor) and r.grad.dtype == torch.float32
    np.testing.assert_array_equal(r.grad.numpy(), lkref.lk_lambda(z, p).grad)
    with pytest.raises(TypeError, match="bfloat16"):
        lkref.tv(zt.to(torch.bfloat16), pt)


@pytest.mark.parametrize("name", ["kl", "tv", "lk_alpha", "lk_lambda"])
def test_per_position_pairs_take_and_return_foreign_arrays(name):
    """A porter's tensors through forward and backward: losses and dz come back as their kind."""
    from .test_losses import PAIRS
    forward, backward, extra = PAIRS[name]
    rng = np.random.default_rng(3)
    z = make_logits(rng, (4, 6), dtype=np.float32)
    p = make_probs(rng, (4, 6), dtype=np.float32)
    dl = rng.standard_normal(4).astype(np.float32)
    losses, cache = forward(Foreign(z), Foreign(p), temperature=0.7, **extra)
    dz = backward(Foreign(dl), cache)
    want_losses, want_cache = forward(z, p, temperature=0.7, **extra)
    assert isinstance(losses, Foreign) and isinstance(dz, Foreign)
    np.testing.assert_array_equal(losses.a, want_losses)
    np.testing.assert_array_equal(dz.a, backward(dl, want_cache))
    loss, mcache = lkref.mean_forward(Foreign(want_losses), Foreign(np.array([1.0, 0.0, 2.0, 1.0], np.float32)))
    assert isinstance(loss, Foreign)
    assert isinstance(lkref.mean_backward(1.0, mcache), np.ndarray)      # no foreign argument: NumPy


def test_per_position_pairs_with_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    z = make_logits(rng, (3, 8), dtype=np.float32)
    p = make_probs(rng, (3, 8), dtype=np.float32)
    losses, cache = lkref.lk_alpha_forward(torch.from_numpy(z), torch.from_numpy(p))
    dz = lkref.lk_alpha_backward(torch.ones(3), cache)
    assert isinstance(losses, torch.Tensor) and isinstance(dz, torch.Tensor)
    np.testing.assert_array_equal(dz.numpy(), lkref.lk_alpha_backward(np.ones(3, np.float32),
                                                                        lkref.lk_alpha_forward(z, p)[1]))
    with pytest.raises(TypeError, match=r"^z cannot be shared through DLPack \(.*\); pass it detached"):
        lkref.lk_alpha_forward(torch.from_numpy(z).requires_grad_(), torch.from_numpy(p))
    with pytest.raises(TypeError, match=r"^z cannot be shared through DLPack \(.*\); bfloat16 has no NumPy/CuPy"):
        lkref.lk_alpha_forward(torch.from_numpy(z).to(torch.bfloat16), torch.from_numpy(p))


def test_theory_multistep_and_positions_take_foreign_arrays():
    """Every public function of arrays speaks DLPack, lists of K positions included."""
    from lkref import theory
    from lkref.multistep import accept_length_loss
    rng = np.random.default_rng(5)
    zs = [make_logits(rng, (4, 6), dtype=np.float32) for _ in range(2)]
    ps = [make_probs(rng, (4, 6), dtype=np.float32) for _ in range(2)]
    alphas = np.array([0.5, 0.25])
    for fn, args in [(theory.acceptance_rate, (ps[0], ps[1])), (theory.expected_accept_length, (alphas,)),
                     (theory.accept_length_pmf, (alphas,))]:
        got = fn(*(Foreign(a) for a in args))
        assert isinstance(got, Foreign)
        np.testing.assert_array_equal(got.a, fn(*args))
    for fn in (accept_length_loss, lambda z, p: lkref.multi_position(lkref.lk_alpha, z, p)):
        got, want = fn([Foreign(z) for z in zs], [Foreign(p) for p in ps]), fn(zs, ps)
        assert isinstance(got.loss, Foreign) and all(isinstance(g, Foreign) for g in got.grads)
        for g, w in zip(got.grads, want.grads):
            np.testing.assert_array_equal(g.a, w)


def _readme_torch_block(marker="torch.autograd.Function"):
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, f"README should hold one block with {marker}"
    lines = blocks[0].splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


@pytest.mark.parametrize("name", sorted(lkref.LOSSES))
def test_readme_pytorch_loss_trains_through_autograd(name):
    """The README's LKLoss: the parameters' gradient is lkref's gradient chained through the layer."""
    torch = pytest.importorskip("torch")
    scope = {}
    exec(_readme_torch_block(), scope)
    LKLoss = scope["LKLoss"]
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32))
    W = torch.from_numpy(rng.standard_normal((4, 7)).astype(np.float32)).requires_grad_()
    p = torch.from_numpy(make_probs(rng, (5, 7), dtype=np.float32))
    mask = torch.tensor([True, True, False, True, True])
    loss = LKLoss.apply(x @ W, p, name, {"mask": mask})
    (2 * loss).backward()
    want = lkref.LOSSES[name]((x @ W).detach().numpy(), p.numpy(), mask=mask.numpy())
    np.testing.assert_allclose(float(loss.detach()), float(want.loss), rtol=1e-6)
    np.testing.assert_allclose(W.grad.numpy(), 2 * x.numpy().T @ want.grad, rtol=1e-5, atol=1e-7)


def test_readme_generate_with_pytorch_models():
    """The README's TorchLM: generate with PyTorch models gives the tokens that the same
    models' probabilities as NumPy arrays give (same seed), and tensors back."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    class Tiny(torch.nn.Module):                     # a causal LM: each position sees its own token
        def __init__(self, V, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.emb = torch.nn.Parameter(torch.randn(V, 8, generator=g))
            self.out = torch.nn.Parameter(torch.randn(8, V, generator=g))

        def forward(self, ids):
            return SimpleNamespace(logits=self.emb[ids] @ self.out)

    class NumpyLM:
        def __init__(self, model):
            self.model = model

        def next_token_probs(self, tokens):
            with torch.no_grad():
                return torch.softmax(self.model(torch.from_numpy(tokens)).logits.float(), dim=-1).numpy()

    scope = {"torch": torch, "np": np, "lkref": lkref, "target": Tiny(40, 0), "draft": Tiny(40, 1)}
    exec(_readme_torch_block("class TorchLM"), scope)
    r = scope["r"]
    want = lkref.generate(NumpyLM(scope["target"]), NumpyLM(scope["draft"]), scope["prompt"].numpy(),
                          max_new_tokens=32, k=4, rng=np.random.default_rng(0))
    assert isinstance(r.tokens, torch.Tensor) and isinstance(r.position_accept_rate, torch.Tensor)
    np.testing.assert_array_equal(r.tokens.numpy(), want.tokens)
    assert r.tau == want.tau and r.target_calls == want.target_calls


def test_results_come_back_through_the_librarys_own_from_dlpack_even_when_it_lives_elsewhere(monkeypatch):
    """JAX's arrays are jaxlib types, and jaxlib has no from_dlpack: results must still come back as
    JAX arrays (through jax.numpy.from_dlpack), not silently as NumPy.  Fake modules stand in."""
    import types
    made = []

    class JaxLikeArray(Foreign):
        pass
    JaxLikeArray.__module__ = "jaxlib._jax"
    home = types.ModuleType("jax.numpy")
    home.from_dlpack = lambda x: made.append(1) or JaxLikeArray(np.from_dlpack(x))
    monkeypatch.setitem(sys.modules, "jaxlib", types.ModuleType("jaxlib"))
    monkeypatch.setitem(sys.modules, "jaxlib._jax", types.ModuleType("jaxlib._jax"))
    monkeypatch.setitem(sys.modules, "jax.numpy", home)
    z = np.zeros((2, 3), np.float32)
    got = lkref.tv(JaxLikeArray(z), JaxLikeArray(np.full((2, 3), 1 / 3, np.float32)))
    assert isinstance(got.grad, JaxLikeArray) and isinstance(got.loss, JaxLikeArray) and made


def test_jax_arrays_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(7)
    z = make_logits(rng, (3, 8), dtype=np.float32)
    p = make_probs(rng, (3, 8), dtype=np.float32)
    r = lkref.lk_alpha(jnp.asarray(z), jnp.asarray(p))
    assert type(r.grad) is type(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(r.grad), lkref.lk_alpha(z, p).grad)
