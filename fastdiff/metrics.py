"""The paper's evaluation metrics (Yoo et al. 2024, section 5 and appendix B), from pixels.

Balls: one detector, template matching (:func:`ball_score_map`), read two ways: :func:`find_balls` counts the
balls a frame shows (peaks above half an isolated ball's response), :func:`ball_centres` takes exactly the
stream's number of balls with sub-pixel centres. On top of them:

- ADE of one video: mean over generated frames of the mean distance (pixels) between the detected
  ball centres and the true ones, balls matched by the cheapest permutation per frame.
  **minADE** = the best of S sampled continuations, averaged over clips.
- **ColorKL**: colour changes of each tracked ball give counts of (old colour -> new colour); with
  p_model(new | old) their normalised rows and p* the stream's rule seen through a 10-frame window
  (red -> yellow / green 50/50, yellow -> red, green -> red),
  ``ColorKL = mean_old KL(p*(. | old) || p_model(. | old))`` over the old colours the samples changed
  from at least once (a tiny pseudo-count keeps the KL finite when a rule is broken outright).
- **colour accuracy**: share of (frame, ball) whose detected colour is the true one (best of S).
- **ball count**: share of generated frames that show exactly the stream's number of balls.
- **ball speed**: mean distance a ball moves per generated frame (:func:`ball_steps`), beside the truth's: a
  model whose balls slow down keeps two balls more easily.

Any stream, with a user-supplied I3D (TorchScript; nothing is downloaded):

- **FVD** = Frechet distance between Gaussians fitted to I3D features of real and generated videos,
  ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})``, the matrix square root's trace taken from the
  eigenvalues of ``S_r^{1/2} S_g S_r^{1/2}`` (symmetric, so float64 ``eigh`` is exact and stable).
- **KVD** = unbiased MMD^2 with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (as KID).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

RED, YELLOW, GREEN = 0, 1, 2
COLOUR_RG = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # (red, green) channels; blue drifts in balls-c
# p*(new | old): the rule as a window of 10 frames sees it (the colour before red is usually out of view).
TRUE_TRANSITIONS = np.array([
    [0.0, 0.5, 0.5],  # red -> yellow or green
    [1.0, 0.0, 0.0],  # yellow -> red
    [1.0, 0.0, 0.0],  # green -> red
])
FIRST_ORDER_OK = {(YELLOW, RED), (GREEN, RED), (RED, YELLOW), (RED, GREEN)}
PSEUDO_COUNT = 1e-3
# Centres closer than this share of the frame side (1.3 ball radii, 5 px at 32 px) mix their colours.
MIXING_DISTANCE = 1.3 * 1.2 / 10.0
MIN_PEAK = 0.1  # ball_centres: a local maximum can be a ball above this share of an isolated ball's score
COUNT_PEAK = 0.5  # find_balls: a local maximum counts as a ball above this share (99.5% of real frames show 2)


# --------------------------------------------------------------------------------------------------
# Balls: the detector
# --------------------------------------------------------------------------------------------------


def ball_score_map(frames: np.ndarray, radius_box: float = 1.2, box: float = 10.0):
    """Template matching of the balls stream's ball profile exp(-(d^2/r^2)^4) against the brightness of
    the red/green channels (blue drifts in balls-c). Returns the score (N, H, W), its local maxima (N, H, W)
    bool, the score of an isolated ball, and the mean (r, g) over each pixel's 3x3 neighbourhood (N, H, W, 2)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255.0)  # (N, H, W, 3)
    h = x.shape[1]
    r_px = radius_box * h / box
    half = int(np.ceil(1.3 * r_px))
    d = torch.arange(-half, half + 1, dtype=torch.float32)
    bump = torch.exp(-(((d[:, None] ** 2 + d[None, :] ** 2) / r_px**2) ** 4))
    template = bump / bump.sum()
    bright = x[..., :2].amax(-1)[:, None]  # (N, 1, H, W)
    score = F.conv2d(bright, template[None, None], padding=half)[:, 0]
    isolated = float((bump * template).sum())
    local_max = score == F.max_pool2d(score[:, None], 2 * half + 1, 1, half)[:, 0]
    rg = F.avg_pool2d(x[..., :2].permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    return score, local_max, isolated, rg


def find_balls(frames: np.ndarray, threshold: float = COUNT_PEAK) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame: every ball the frame shows, centres (m, 2) as (x, y) pixels and colours (m,) (0 red, 1 yellow,
    2 green): the score's local maxima above `threshold` times an isolated ball's response. A ball's colour is
    the nearest of red/yellow/green to its mean (r, g) over the central 3x3."""
    score, local_max, isolated, rg = ball_score_map(frames)
    peaks = local_max & (score > threshold * isolated)
    found = []
    for i in range(len(frames)):
        ys, xs = torch.nonzero(peaks[i], as_tuple=True)
        colours = torch.cdist(rg[i, ys, xs], COLOUR_RG).argmin(-1)
        found.append((torch.stack([xs, ys], -1).float().numpy(), colours.numpy()))
    return found


def count_balls(frames: np.ndarray) -> np.ndarray:
    """How many balls each frame shows (N,), as :func:`find_balls` counts them."""
    score, local_max, isolated, _ = ball_score_map(frames)
    return (local_max & (score > COUNT_PEAK * isolated)).flatten(1).sum(1).numpy()


# --------------------------------------------------------------------------------------------------
# Balls: centres, ADE, colour statistics
# --------------------------------------------------------------------------------------------------


def ball_centres(frames: np.ndarray, balls: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly `balls` centres per frame, (N, balls, 2) as (x = column, y = row) pixels refined to sub-pixel
    by the score's 3x3 centroid, and their colours (N, balls) (0 red, 1 yellow, 2 green): the strongest local
    maxima of the template score. Where balls overlap and fewer maxima exist, the strongest is repeated."""
    score, local_max, isolated, rg = ball_score_map(frames)
    n, h, w = score.shape
    peak = local_max & (score > MIN_PEAK * isolated)
    masked = torch.where(peak, score, torch.full_like(score, -1.0)).flatten(1)
    values, idx = masked.topk(balls, dim=1)
    idx = torch.where(values < 0, idx[:, :1], idx)  # fewer maxima than balls: repeat the best
    ys, xs = idx // w, idx % w
    padded = F.pad(score, (1, 1, 1, 1), mode="replicate")
    frame = torch.arange(n)[:, None]

    def vertex(before, at, after):  # the peak of the parabola through three samples, in [-0.5, 0.5]
        curvature = before - 2 * at + after
        return torch.where(curvature < 0, 0.5 * (before - after) / curvature.clamp(max=-1e-12), 0.0).clamp(-0.5, 0.5)

    at = padded[frame, ys + 1, xs + 1]
    cx = vertex(padded[frame, ys + 1, xs], at, padded[frame, ys + 1, xs + 2])
    cy = vertex(padded[frame, ys, xs + 1], at, padded[frame, ys + 2, xs + 1])
    centres = torch.stack([xs + cx, ys + cy], dim=-1)
    colours = torch.cdist(rg[frame, ys, xs], COLOUR_RG).argmin(-1)
    return centres.numpy(), colours.numpy()


def _best_permutations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per frame, the permutation p of b's balls minimising sum |a_i - b_p(i)|: (N, balls) indices."""
    balls = a.shape[1]
    perms = np.array(list(itertools.permutations(range(balls))))  # (P, balls)
    cost = np.linalg.norm(a[:, None, :, :] - b[:, perms, :], axis=-1).sum(-1)  # (N, P)
    return perms[cost.argmin(1)]


def frame_displacements(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per frame, the mean distance (pixels) between predicted and true centres (..., balls, 2), balls matched
    per frame by the cheapest permutation: (...,)."""
    lead = truth.shape[:-2]
    flat_pred, flat_truth = pred.reshape(-1, *pred.shape[-2:]), truth.reshape(-1, *truth.shape[-2:])
    perm = _best_permutations(flat_truth, flat_pred)
    matched = np.take_along_axis(flat_pred, perm[..., None], axis=1)
    return np.linalg.norm(matched - flat_truth, axis=-1).mean(-1).reshape(lead)


def ade(pred: np.ndarray, truth: np.ndarray) -> float:
    """Average displacement (pixels) between centres (T, balls, 2), balls matched per frame."""
    return float(frame_displacements(pred, truth).mean())


def ball_steps(centres: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """How far (pixels) each ball moved from one frame to the next, (pairs * balls,), over the consecutive frames
    of centres (T, balls, 2) that both show exactly the stream's number of balls (`counted` (T,) bool; elsewhere
    ball_centres repeats a ball, so a step means nothing), balls matched by the cheapest permutation.

    Why: the share of two-ball frames alone would reward a model whose balls slow down, since balls that move less
    meet less, and a merge at a meeting is how samples lose a ball; their speed beside the truth's says so."""
    pairs = counted[1:] & counted[:-1]
    before, after = centres[:-1][pairs], centres[1:][pairs]
    if not len(before):
        return np.zeros(0)
    matched = np.take_along_axis(after, _best_permutations(before, after)[..., None], axis=1)
    return np.linalg.norm(matched - before, axis=-1).ravel()


def colour_accuracy(pred_centres, pred_colours, truth_centres, truth_colours) -> float:
    perm = _best_permutations(truth_centres, pred_centres)
    matched = np.take_along_axis(pred_colours, perm, axis=1)
    return float((matched == truth_colours).mean())


def tracks(centres: np.ndarray, colours: np.ndarray, frame_size: int = 32) -> np.ndarray:
    """Link detections frame to frame (cheapest permutation): colours per track, (balls, T). Where two balls
    are close enough for their colours to mix (red + green renders yellow) the colour is unknown, -1."""
    order = np.zeros(centres.shape[:2], dtype=np.int64)
    order[0] = np.arange(centres.shape[1])
    for t in range(1, len(centres)):
        prev = np.take_along_axis(centres[t - 1], order[t - 1][:, None], axis=0)
        if t > 1:  # constant velocity: crossing balls keep their identities
            prev = 2 * prev - np.take_along_axis(centres[t - 2], order[t - 2][:, None], axis=0)
        order[t] = _best_permutations(prev[None], centres[t][None])[0]
    colours = colours.astype(np.int64).copy()
    if centres.shape[1] > 1:
        gap = np.linalg.norm(centres[:, :, None] - centres[:, None, :], axis=-1)
        gap[:, np.arange(centres.shape[1]), np.arange(centres.shape[1])] = np.inf
        colours[gap.min(-1) < MIXING_DISTANCE * frame_size] = -1
    return np.take_along_axis(colours, order, axis=1).T


def transition_counts(colour_tracks: np.ndarray, first_frame: int = 0, hold: int = 1) -> np.ndarray:
    """(3, 3) counts of colour changes old -> new whose new colour starts at frame >= first_frame;
    runs shorter than `hold` frames are flickers, not changes (1: none are; a bounce in a corner shows red for
    one frame), and unknown (-1) frames keep the colour before."""
    counts = np.zeros((3, 3), dtype=np.int64)
    for track in colour_tracks:
        known = [int(c) for c in track]
        for i in range(1, len(known)):
            if known[i] < 0:
                known[i] = known[i - 1]
        runs = colour_runs(known, hold)
        start = 0
        for (old, length), (new, _) in zip(runs, runs[1:]):
            start += length
            if start >= first_frame and old >= 0 and old != new:
                counts[old, new] += 1
    return counts


def colour_kl(counts: np.ndarray) -> tuple[float, int]:
    """ColorKL from transition counts (old colour, new colour), and how many old colours the samples left.

    The mean over all three old colours, as the paper defines it. An old colour that the samples never left
    scores as a model that knows nothing of its rule (the uniform prior of the pseudo-counts): leaving it out
    would let a model that rarely changes colour average over the one rule it shows, and score near 0."""
    kls = []
    for old in (RED, YELLOW, GREEN):
        row = counts[old].astype(np.float64)
        p_model = (row + PSEUDO_COUNT) / (row.sum() + 3 * PSEUDO_COUNT)
        p_true = TRUE_TRANSITIONS[old]
        support = p_true > 0
        kls.append(float((p_true[support] * np.log(p_true[support] / p_model[support])).sum()))
    return float(np.mean(kls)), int((counts.sum(axis=1) > 0).sum())


def rescore_colour_kl(scores: dict) -> dict:
    """Recompute a score dict's ColorKL in place from its stored transition counts (when it has them), so that
    results scored before colour_kl's definition changed read the same as new ones. Returns the dict."""
    if "transitions" in scores:
        scores["ColorKL"], scores["ColorKL_colours"] = colour_kl(np.array(scores["transitions"]))
    return scores


def colour_runs(colours: list[int], hold: int) -> list[tuple[int, int]]:
    """(colour, length) runs of a track, ignoring flickers shorter than `hold` frames."""
    runs: list[list[int]] = []
    for c in colours:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    stable: list[list[int]] = []
    for c, length in runs:
        if length < hold and stable:
            stable[-1][1] += length  # a flicker: count it as the colour it interrupted
        elif stable and stable[-1][0] == c:
            stable[-1][1] += length
        else:
            stable.append([c, length])
    return [(c, length) for c, length in stable]


def balls_metrics(frames: np.ndarray, window: int, balls: int | None = None, hold: int = 2) -> dict:
    """Ball-count stability and colour-rule accuracy of a video of the balls stream.

    count_ok: share of frames with the expected number of balls (that of the first frame unless given);
    count_changes_per_100: how often the detected count changes. Balls are tracked while the count
    holds (nearest-centre matching); every colour change of a track is checked against the rule:
    first_order_acc: share of changes that are red->yellow/green or yellow/green->red;
    second_order_acc: after red, the ball must take the colour it did not have before red (chance 0.5);
    second_order_acc_long: the same, only where the red phase outlasted the model's window, so the
    colour before red had left the context (the long-range memory test)."""
    found = find_balls(frames)
    counts = np.array([len(c) for c, _ in found])
    expected = counts[0] if balls is None else balls
    tracks: list[list[int]] = []
    open_tracks: list[int] = []  # index into tracks, per ball slot
    prev = None
    for centres, colours in found:
        if len(centres) != expected:
            prev, open_tracks = None, []
            continue
        if prev is None:
            open_tracks = [len(tracks) + i for i in range(expected)]
            tracks.extend([] for _ in range(expected))
            order = list(range(expected))
        else:
            order = min(itertools.permutations(range(expected)),
                        key=lambda p: sum(np.sum((centres[j] - prev[i]) ** 2) for i, j in enumerate(p)))
        for slot, j in enumerate(order):
            tracks[open_tracks[slot]].append(int(colours[j]))
        prev = centres[list(order)]
    first = [0, 0]
    second = [0, 0]
    second_long = [0, 0]
    for track in tracks:
        runs = colour_runs(track, hold)
        for (a, _), (b, _) in zip(runs, runs[1:]):
            first[0] += (a, b) in FIRST_ORDER_OK
            first[1] += 1
        for (a, _), (b, red_len), (c, _) in zip(runs, runs[1:], runs[2:]):
            if b != RED or a == RED or c == RED:
                continue
            ok = c != a  # red -> the colour it did not come from
            second[0] += ok
            second[1] += 1
            if red_len > window:
                second_long[0] += ok
                second_long[1] += 1
    ratio = lambda hits: hits[0] / hits[1] if hits[1] else float("nan")
    return {
        "frames": len(found), "balls": int(expected),
        "count_ok": float(np.mean(counts == expected)),
        "count_changes_per_100": float(np.count_nonzero(np.diff(counts)) * 100 / max(len(counts) - 1, 1)),
        "colour_changes": first[1], "first_order_acc": ratio(first),
        "second_order_checks": second[1], "second_order_acc": ratio(second),
        "second_order_long_checks": second_long[1], "second_order_acc_long": ratio(second_long),
    }


# --------------------------------------------------------------------------------------------------
# FVD / KVD from a user-supplied I3D
# --------------------------------------------------------------------------------------------------


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows (N, D) of real and generated videos."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    vals, vecs = np.linalg.eigh(cov_r)
    root_r = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = root_r @ cov_f @ root_r
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * trace_sqrt)


def kernel_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (KVD, as KID for images)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = real.shape[1]
    k_rr = (real @ real.T / d + 1) ** 3
    k_ff = (fake @ fake.T / d + 1) ** 3
    k_rf = (real @ fake.T / d + 1) ** 3
    m, n = len(real), len(fake)
    if m < 2 or n < 2:
        raise ValueError("KVD needs at least 2 real and 2 generated videos")
    within_r = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    within_f = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
    return float(within_r + within_f - 2 * k_rf.mean())


class I3DFeatures:
    """Video features from a TorchScript I3D the user supplies (e.g. the one StyleGAN-V's FVD uses).

    Videos (N, T, H, W, 3) uint8 are scaled to [-1, 1], laid out (N, 3, T, 224, 224) and passed as
    ``model(x, rescale=False, resize=False, return_features=True)``, or ``model(x)`` when the module does
    not take those arguments. The output's first tensor, flattened per video, is the feature."""

    def __init__(self, path, device, batch: int = 16):
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"--i3d {path}: no such file (a TorchScript I3D; fastdiff downloads nothing)")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as err:
            raise ValueError(f"--i3d {path}: not a TorchScript module ({err})") from None
        self.device, self.batch = device, batch

    @torch.no_grad()
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(videos), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(videos[i:i + self.batch])).to(self.device)
            x = x.float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W)
            n, c, t, h, w = x.shape
            x = F.interpolate(x.transpose(1, 2).reshape(n * t, c, h, w), size=(224, 224), mode="bilinear",
                              align_corners=False).view(n, t, c, 224, 224).transpose(1, 2).contiguous()
            try:
                feats = self.model(x, rescale=False, resize=False, return_features=True)
            except (RuntimeError, TypeError):
                feats = self.model(x)
            if isinstance(feats, (tuple, list)):
                feats = feats[0]
            elif isinstance(feats, dict):
                feats = next(iter(feats.values()))
            out.append(feats.float().flatten(1).cpu().numpy())
        return np.concatenate(out)
