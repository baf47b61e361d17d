"""Tied (shared) parameters: refused by name, never scored as a part of their gradient.

A parameter held by two modules gets the sum of both uses' gradients, but the library sees
only the tracked layers' inputs and output gradients: two `nn.Linear` sharing a weight, or
GPT-2's `lm_head` (tied to the input embedding `transformer.wte`) tracked, gave scores off the
true parameter-gradient products without a word (on the models below, gradient dot products
6% and 24% off, measured before the check). Untied, the same layers score exactly (against
explicit per-example autograd gradients).
"""

from __future__ import annotations

import pytest
import torch
from brute_force import VOCAB, brute_gradients, flat, lm_data, tiny_gpt2
from torch import nn

import influence as inf

transformers = pytest.importorskip("transformers")


class TwoHeads(nn.Module):
    """Two linear layers; `second` may share `first`'s weight (same Parameter or storage)."""

    def __init__(self, share: str | None):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.double()  # before tying: a conversion gives each parameter its own memory
        if share == "parameter":
            self.second.weight = self.first.weight
        elif share == "storage":
            self.second.weight = nn.Parameter(self.first.weight.data)  # same memory
        elif share == "alias":
            self.alias = self.first  # one module under two names: nothing is shared

    def forward(self, x):
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, generator=g).double(), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("share", ["parameter", "storage"])
def test_two_linear_layers_sharing_a_weight_are_refused_by_name(share):
    model, task, data = TwoHeads(share), inf.ClassificationTask(), _data()
    match = r"'first' and 'second' share their weight.*modules="
    with pytest.raises(ValueError, match=match):
        inf.EKFAC().fit(model, task, data, progress=False)
    with pytest.raises(ValueError, match=match):
        inf.per_example_gradients(model, task, data)
    # Tracking only one of them is refused too: its gradient would miss the other's use.
    one = inf.ClassificationTask(modules=["first", "out"])
    with pytest.raises(ValueError, match=r"'first' shares its weight with 'second\.weight'"):
        inf.Identity().fit(model, one, data, progress=False)
    # Leaving both out scores the rest exactly.
    rest = inf.ClassificationTask(modules=["out"])
    est = inf.Identity().fit(model, rest, data, progress=False)
    got = inf.pairwise_scores(model, rest, est, data, data, progress=False)
    g = flat(brute_gradients(model, rest, data), {"out": None})
    assert torch.allclose(got, g @ g.T, rtol=1e-10, atol=0)


def test_gpt2_tied_lm_head_is_refused_and_untied_lm_head_scores_exactly():
    task = inf.LanguageModelingTask(modules=["lm_head", "transformer.h.0.mlp.c_fc"])
    data = lm_data(4, min_len=3)
    tied = tiny_gpt2()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with 'transformer\.wte"):
        inf.EKFAC().fit(tied, task, data, progress=False)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=32, tie_word_embeddings=False
    )
    untied = GPT2LMHeadModel(cfg).double().eval()
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    est = inf.Identity().fit(untied, task, data, progress=False)
    got = inf.pairwise_scores(untied, task, est, data, data, progress=False)
    infos = dict.fromkeys(task.tracked_modules(untied))
    g = flat(brute_gradients(untied, task, data), infos)
    assert (got - g @ g.T).abs().max() <= 1e-10 * (g @ g.T).abs().max()


def test_one_module_under_two_names_is_not_sharing():
    model, task, data = TwoHeads("alias"), inf.ClassificationTask(), _data()
    assert list(task.tracked_modules(model)) == ["first", "second", "out"]
    est = inf.Identity().fit(model, task, data, progress=False)
    got = inf.pairwise_scores(model, task, est, data, data, progress=False)
    g = flat(brute_gradients(model, task, data), dict.fromkeys(["first", "second", "out"]))
    assert torch.allclose(got, g @ g.T, rtol=1e-10, atol=0)
