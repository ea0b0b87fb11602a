import pytest
import torch
from scipy import stats

from fastdiff.replay import ReplayBuffer


def test_reservoir_inclusion_is_uniform():
    """Algorithm R: after n inserts every window is in the buffer with probability capacity / n."""
    capacity, n, trials = 10, 100, 400
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        buf = ReplayBuffer(capacity, (1,), dtype=torch.float32, device="cpu")
        for i in range(n):
            buf.insert(torch.tensor([float(i)]), i, g)
        kept = buf.windows[:capacity, 0].long()
        assert len(set(kept.tolist())) == capacity  # no duplicates, scratch slot never kept
        assert torch.equal(buf.starts[:capacity], kept)
        counts[kept] += 1
    expected = trials * capacity / n
    assert abs(float(counts.mean()) - expected) < 1e-6
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    # early and late windows equally likely (what separates a reservoir from a FIFO)
    assert abs(float(counts[:20].mean() - counts[-20:].mean())) < 0.25 * expected


def test_fills_in_order_then_samples_only_filled():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(8, (2,), dtype=torch.float32, device="cpu")
    fallback = torch.full((2,), -5.0)
    assert torch.all(buf.sample(4, g, fallback) == -5.0)  # empty: the live window stands in
    for i in range(3):
        buf.insert(torch.full((2,), float(i)), i, g)
    assert torch.equal(buf.windows[:3, 0], torch.tensor([0.0, 1.0, 2.0]))
    drawn = buf.sample(500, g, fallback)[:, 0]
    assert set(drawn.tolist()) == {0.0, 1.0, 2.0}


def test_full_mode_keeps_everything():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(50, (1,), dtype=torch.float32, device="cpu", mode="full")
    for i in range(50):
        buf.insert(torch.tensor([float(i)]), i, g)
    assert torch.equal(buf.windows[:50, 0], torch.arange(50.0))


def test_uint8_storage_and_state_roundtrip():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(4, (3, 2, 2, 3), dtype=torch.uint8, device="cpu")
    for i in range(9):
        buf.insert(torch.full((3, 2, 2, 3), i, dtype=torch.uint8), i, g)
    state = buf.state_dict()
    other = ReplayBuffer(4, (3, 2, 2, 3), dtype=torch.uint8, device="cpu")
    other.load_state_dict(state)
    assert torch.equal(other.windows[:4], buf.windows[:4]) and int(other.seen) == 9
    with pytest.raises(ValueError, match="expects"):
        ReplayBuffer(5, (3, 2, 2, 3), dtype=torch.uint8, device="cpu").load_state_dict(state)
