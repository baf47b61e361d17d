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


def test_passes_trim_only_once_memory_has_grown(monkeypatch):
    import influence.heap as heap

    calls = []
    rss = {"now": 1000 * 2**20}
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    monkeypatch.setattr(heap, "resident_bytes", lambda: rss["now"])
    heap.release_freed_memory()  # leaves 1000 MiB: the next trim above 1756 MiB
    assert len(calls) == 1
    for now in (1100, 1500, 1750):
        rss["now"] = now * 2**20
        heap.release_if_grown()
    assert len(calls) == 1  # a steady pass pays no trims (each costs page faults later)
    rss["now"] = 1800 * 2**20
    heap.release_if_grown()
    assert len(calls) == 2
