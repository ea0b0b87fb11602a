"""Convolutional frame autoencoder: fitted on a warm-up prefix of the stream, then frozen.

Pixels uint8 (.., H, W, 3) <-> latents (.., C, H/f, W/f). Latents are normalised per channel with
statistics measured on the warm-up frames, so the diffusion model sees roughly unit-variance inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def pixels_to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def unit_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3)."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)


class FrameAutoencoder(nn.Module):
    """`pooled_colour` (autoencoder.colour=pooled): the encoder sees each pixel's brightest channel only, and the
    latent appends three channels of each factor x factor block's mean RGB (fixed, linear), from which the decoder
    must take colour. The latent then has channels + 3 channels; `colour_gain` (autoencoder.colour_gain) divides
    their shared scale, so that colour weighs more in the latent's squared distances."""

    def __init__(self, channels: int = 4, factor: int = 4, hidden: int = 32, pooled_colour: bool = False,
                 colour_gain: float = 1.0):
        super().__init__()
        if colour_gain != 1.0 and not pooled_colour:
            raise ValueError("colour_gain needs pooled_colour: the learned code has no colour channels to weigh")
        self.pooled_colour, self.colour_gain = pooled_colour, colour_gain
        self.factor = factor
        self.channels = channels + (3 if self.pooled_colour else 0)
        downs = int(math.log2(factor))
        enc: list[nn.Module] = [nn.Conv2d(1 if self.pooled_colour else 3, hidden, 3, padding=1), nn.SiLU()]
        width = hidden
        for _ in range(downs):
            enc += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.SiLU(),
                    nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.SiLU()]
            width *= 2
        enc.append(nn.Conv2d(width, channels, 1))
        dec: list[nn.Module] = [nn.Conv2d(self.channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(downs):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, padding=1),
                    nn.SiLU(), nn.Conv2d(width // 2, width // 2, 3, padding=1), nn.SiLU()]
            width //= 2
        dec.append(nn.Conv2d(width, 3, 3, padding=1))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("shift", torch.zeros(self.channels))
        self.register_buffer("scale", torch.ones(self.channels))

    def _raw_encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pooled_colour:
            return self.encoder(x)
        return torch.cat([self.encoder(x.amax(dim=1, keepdim=True)), F.avg_pool2d(x, self.factor)], dim=1)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised latents (N, C, h, w)."""
        z = self._raw_encode(pixels_to_unit(frames))
        return (z - self.shift[:, None, None]) / self.scale[:, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (N, C, h, w) -> uint8 (N, H, W, 3)."""
        z = latents * self.scale[:, None, None] + self.shift[:, None, None]
        return unit_to_pixels(self.decoder(z).clamp(-1, 1))

    def fit(self, frames: np.ndarray, *, steps: int, batch: int, lr: float, generator: torch.Generator,
            device: torch.device, progress=None, autocast: torch.dtype | None = None) -> float:
        """Fit on uint8 frames (N, H, W, 3); returns the final reconstruction MSE in [-1,1] units. `autocast`: the
        dtype the fit's forward runs in (None: fp32); the latents' statistics and the returned MSE are fp32's."""
        self.train()
        data = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        # Short warm-up then cosine decay: at full lr from step 0 the fit can jump into the "predict the
        # mean colour" basin (frames are ~90% black) and never leave it.
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
        loss_value = float("nan")
        for step in range(steps):
            idx = torch.randint(0, len(data), (min(batch, len(data)),), generator=generator).to(device)
            x = pixels_to_unit(data[idx])
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                recon = self.decoder(self._raw_encode(x)).float()
            # Balls are small bright blobs on black: weight error on lit pixels so they are not averaged away.
            weight = 1.0 + 4.0 * (x.amax(dim=1, keepdim=True) > -0.9).float()
            loss = (weight * (recon - x).pow(2)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress is not None and (step % 20 == 0 or step == steps - 1):
                loss_value = loss.item()
                progress(step, loss_value)
        self.eval()
        with torch.no_grad():
            z = torch.cat([self._raw_encode(pixels_to_unit(chunk)) for chunk in data.split(256)])
            self.shift.copy_(z.mean(dim=(0, 2, 3)))
            self.scale.copy_(z.std(dim=(0, 2, 3)).clamp_min(1e-3))
            if self.pooled_colour:
                # One scale for the three colour channels, so that colour distances stay pixel distances (a
                # channel that barely varies in the warm-up, as blue in balls, is not blown up).
                self.scale[-3:] = z[:, -3:].var(dim=(0, 2, 3)).mean().sqrt().clamp_min(1e-3) / self.colour_gain
            recon = torch.cat([self.decoder(self._raw_encode(pixels_to_unit(c))) for c in data[:512].split(256)])
            loss_value = F.mse_loss(recon, pixels_to_unit(data[:512])).item()
        for p in self.parameters():
            p.requires_grad_(False)
        return loss_value


class PixelSpace(nn.Module):
    """`--latent none`: the identity 'autoencoder', so the diffusion model runs on pixels in [-1, 1]."""

    channels, factor = 3, 1

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return pixels_to_unit(frames)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return unit_to_pixels(latents.clamp(-1, 1))


def reencoder(ae, enabled: bool = True):
    """The autoencoder's round trip for a rollout's observed frames (diffusion.sample_reencode), or None when not
    `enabled`: latents (B, n, C, h, w) are decoded to uint8 frames and encoded again, so that a later window observes
    the frames the video shows, encoded as a real frame is, not the sampler's latents."""
    if not enabled:
        return None

    @torch.no_grad()
    def observe(latents: torch.Tensor) -> torch.Tensor:
        flat = latents.flatten(0, 1)
        return ae.encode(ae.decode(flat)).view_as(latents)

    return observe


def rollout_space(ae, reencode: bool) -> dict:
    """The keywords a rollout in `ae`'s space takes (diffusion.rollout, rollout_chunks): `clip_x0`, the bound of a
    clean sample (pixels lie in [-1, 1]; a learned latent has none), and `observe`, the round trip of
    :func:`reencoder` when `reencode` (diffusion.sample_reencode)."""
    return {"clip_x0": 1.0 if isinstance(ae, PixelSpace) else None, "observe": reencoder(ae, reencode)}


ENCODE_BATCH = 256  # frames per encoder call; fixed from each chunk's start, so a resumed chunk is bit-identical


@torch.no_grad()
def encode_frames(ae, frames, device=None) -> torch.Tensor:
    """uint8 frames (..., H, W, 3), numpy or tensor, -> float32 latents (..., C, h, w) on `device` (default: where
    the frames are), encoded ENCODE_BATCH frames at a time."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if device is not None:
        pixels = pixels.to(device)
    lead = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    starts = range(0, max(len(flat), 1), ENCODE_BATCH)
    latents = torch.cat([ae.encode(flat[i:i + ENCODE_BATCH]).float() for i in starts])
    return latents.view(*lead, *latents.shape[1:])
