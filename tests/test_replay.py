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


def _prioritised(scores, alpha, capacity=None):
    """A buffer holding one window per score (window i = [i]) with those scores."""
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(capacity or len(scores), (1,), dtype=torch.float32, device="cpu", priority=alpha)
    for i in range(len(scores)):
        buf.insert(torch.tensor([float(i)]), i, g)
    buf.scores[: len(scores)] = torch.tensor(scores)
    return buf


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_prioritised_replay_draws_in_proportion_to_score_to_the_alpha(alpha):
    """Held windows are replayed with probability score^alpha / sum; a window scored 0 and the empty slots never."""
    scores = [0.02, 0.01, 0.0, 0.04, 0.005]
    buf = _prioritised(scores, alpha, capacity=8)  # 3 slots empty
    g = torch.Generator().manual_seed(1)
    drawn = buf.sample(20000, g, torch.tensor([-1.0]))[:, 0].long()
    assert torch.equal(buf.last_drawn, drawn)
    counts = torch.bincount(drawn, minlength=8).double()
    assert counts[2] == 0 and counts[5:].sum() == 0
    weight = torch.tensor(scores, dtype=torch.float64) ** alpha
    expected = 20000 * weight / weight.sum()
    keep = expected > 0
    assert stats.chisquare(counts[:5][keep].numpy(), expected[keep].numpy()).pvalue > 1e-3


def test_prioritised_replay_scores_new_windows_at_the_mean_and_smooths_losses():
    buf = _prioritised([0.02, 0.04], 1.0, capacity=4)
    g = torch.Generator().manual_seed(0)
    buf.insert(torch.tensor([2.0]), 2, g)  # enters at the mean of the windows held
    assert buf.scores[2] == pytest.approx(0.03)
    for loss in (0.5, 0.1, float("nan")):  # a non-finite loss leaves the score as it was
        buf.sample(1, g, torch.tensor([-1.0]))
        slot = int(buf.last_drawn[0])
        before = float(buf.scores[slot])
        buf.update_scores(torch.tensor([loss]))
        want = before if loss != loss else before + 0.5 * (loss - before)
        assert float(buf.scores[slot]) == pytest.approx(want)
    with pytest.raises(ValueError, match="losses for"):
        buf.update_scores(torch.ones(5))


def test_prioritised_replay_of_an_empty_buffer_gives_the_fallback():
    buf = ReplayBuffer(4, (1,), dtype=torch.float32, device="cpu", priority=1.0)
    g = torch.Generator().manual_seed(0)
    assert torch.all(buf.sample(6, g, torch.tensor([-5.0])) == -5.0)


def test_uniform_replay_ignores_scores():
    """priority 0 (the paper's ER) draws as before, whatever the scores say."""
    skewed, flat = _prioritised([1.0, 0.0, 0.0, 0.0], 0.0), _prioritised([1.0, 1.0, 1.0, 1.0], 0.0)
    a = skewed.sample(200, torch.Generator().manual_seed(3), torch.tensor([-1.0]))
    b = flat.sample(200, torch.Generator().manual_seed(3), torch.tensor([-1.0]))
    assert torch.equal(a, b) and len(set(a[:, 0].tolist())) == 4


def test_prioritised_replay_scores_survive_checkpoint_shards_and_resizes():
    from fastdiff.replay import merge_shards, resize_reservoir

    buf = _prioritised([0.1, 0.2, 0.3, 0.4], 1.0)
    state = buf.state_dict()
    other = ReplayBuffer(4, (1,), dtype=torch.float32, device="cpu", priority=1.0)
    other.load_state_dict(state)
    assert torch.equal(other.scores[:4], buf.scores[:4])
    old = {k: v for k, v in state.items() if k != "scores"}  # a checkpoint from before prioritised replay
    other.load_state_dict(old)
    assert torch.equal(other.scores[:4], torch.ones(4))
    shards = []
    for rank in range(2):
        shard = ReplayBuffer(4, (1,), dtype=torch.float32, device="cpu", priority=1.0, shard=(rank, 2),
                             insert_seed=0)
        shard.load_state_dict(state)
        assert torch.equal(shard.scores[:2], buf.scores[rank:4:2])
        shards.append(shard.state_dict())
    assert torch.equal(merge_shards(shards)["scores"], buf.scores[:4])
    smaller = resize_reservoir(state, 2, torch.Generator().manual_seed(0))
    assert torch.equal(smaller["scores"], smaller["windows"][:, 0] / 10 + 0.1)  # window i was scored 0.1 (i + 1)
