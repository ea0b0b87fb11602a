"""Symmetry augmentation of training windows (`run.augment`).

A stream whose world has no preferred direction looks the same mirrored: the balls box is square, has no
gravity, and its renderer samples pixel centres symmetrically, so a balls window flipped left-right, upside
down, or transposed is exactly the window the simulator gives for the mirrored start, colours and all (the
colour rule follows bounces, which mirror with the motion). Each training window is then one of 4 ("flips") or
8 ("d4", the square's dihedral group) windows, drawn afresh every step: more ways to see each contact for the same
stream frames. A maze, a game or a camera video has a floor and a sky, and is not augmented ("none").
"""

from __future__ import annotations

import torch

from fastdiff.config import AUGMENTS


def symmetry_augment(clips: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Each window of clips (B, K, C, H, W) flipped left-right, upside down and (d4) transposed, each with
    probability 1/2, drawn per window and the same for all its frames. Device ops only (no host sync), so the
    captured step draws new symmetries on every replay. flips and d4 both draw three numbers per window, so
    that they leave the same random stream to the rest of the step; none draws nothing (a run without
    augmentation is the run it was before this option)."""
    if kind not in AUGMENTS:
        raise ValueError(f"run.augment {kind!r} is not one of {', '.join(AUGMENTS)}")
    if kind == "none":
        return clips
    if kind == "d4" and clips.shape[-1] != clips.shape[-2]:
        raise ValueError(f"run.augment=d4 on {clips.shape[-2]}x{clips.shape[-1]} frames not supported because a "
                         "transpose changes a non-square frame's shape; use flips")
    b = clips.shape[0]
    draws = torch.rand(b, 3, generator=generator, device=clips.device) < 0.5
    per_window = (b,) + (1,) * (clips.dim() - 1)
    out = torch.where(draws[:, 0].view(per_window), clips.flip(-1), clips)
    out = torch.where(draws[:, 1].view(per_window), out.flip(-2), out)
    if kind == "d4":
        out = torch.where(draws[:, 2].view(per_window), out.transpose(-1, -2), out)
    return out
