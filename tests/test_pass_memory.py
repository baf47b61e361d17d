"""Passes over data whose batches change shape hold no memory per shape seen."""

import torch

from influence.heap import release_freed_memory
from influence.kfac import Workspace, eigenbasis_gradients


def test_workspace_keeps_only_the_last_batchs_buffers():
    ws = Workspace()
    torch.manual_seed(0)
    qa, qs = torch.linalg.qr(torch.randn(6, 6))[0], torch.linalg.qr(torch.randn(4, 4))[0]
    for t in range(3, 40):  # every batch a new sequence length, as packed batches are
        ws.next_batch()
        a, g = torch.randn(2, t, 6), torch.randn(2, t, 4)
        got = eigenbasis_gradients(a, g, qa, qs, ws, "layer")
        want = qs.T @ torch.bmm(g.transpose(1, 2), a) @ qa
        assert torch.allclose(got, want, atol=1e-5)
    # Before the fix a buffer per shape ever seen stayed: 3 kinds x 37 lengths.
    assert len(ws._buffers) <= 3


def test_release_freed_memory_is_safe_to_call():
    release_freed_memory()
    release_freed_memory()
