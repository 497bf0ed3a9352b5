"""Fourier amplitude prompts (FoPro-KD's Fourier Prompt Generator, FPG).

Pretrained teachers prefer some frequencies; the FPG learns a non-negative mask on the
amplitude spectrum of the teacher's input and never touches the phase (the phase carries the
content). Images are NHWC; spectra are `jnp.fft.rfft2` over (H, W) per channel, shape
(B, H, W//2 + 1, C). Everything runs in float32, whatever the model's compute dtype.

Decisions (the paper leaves them open):
- the mask is `exp(log_mask)`: non-negative by construction, exactly 1 (identity) at init, and
  a plain gradient step never has to be projected back;
- the "centred low-frequency window" of relative size beta is the set of frequencies with
  |k_y| <= floor(beta * H / 2) and |k_x| <= floor(beta * W / 2) (a centred box once the
  spectrum is fftshift-ed); outside it the amplitude is left as it is;
- the rfft columns k_x = 0 (and W/2 for even W) hold both k_y and -k_y of a real image;
  irfft2 keeps the Hermitian part there, so on those columns the mask acts as the average of
  its (k_y, -k_y) pair (the output stays real, the phase unchanged);
- the prompted image is re-normalised to the input's per-image, per-channel mean and std, so the
  prompt can only re-weight frequencies, not shift the teacher's input statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def amplitude_phase(images):
    """(B, H, W, C) real images -> amplitude, phase, each (B, H, W//2+1, C) float32."""
    spectrum = jnp.fft.rfft2(jnp.asarray(images, jnp.float32), axes=(1, 2))
    return jnp.abs(spectrum), jnp.angle(spectrum)


def reconstruct(amplitude, phase, height: int, width: int):
    """Inverse of `amplitude_phase`: irfft2(A exp(iP)) -> (B, H, W, C) float32."""
    spectrum = amplitude.astype(jnp.float32) * jnp.exp(1j * phase.astype(jnp.float32))
    return jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2)).astype(jnp.float32)


def low_frequency_window(height: int, width: int, beta: float) -> np.ndarray:
    """Bool (H, W//2+1) window of the rfft2 layout: frequencies within beta/2 of each axis'
    range around DC (beta = 1: every frequency, beta = 0: DC only)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"Fourier window size beta must be in [0, 1], got {beta}")
    ky = np.abs(np.fft.fftfreq(height) * height)
    kx = np.arange(width // 2 + 1)
    return ((ky[:, None] <= np.floor(beta * height / 2))
            & (kx[None, :] <= np.floor(beta * width / 2)))


def init_prompt(height: int, width: int, channels: int) -> dict:
    """Prompt params: a log-mask of zeros (mask of ones, the identity)."""
    return {"log_mask": jnp.zeros((height, width // 2 + 1, channels), jnp.float32)}


def amplitude_mask(params, window=None):
    """The effective (H, W//2+1, C) mask: exp(log_mask) inside `window`, 1 outside."""
    mask = jnp.exp(params["log_mask"].astype(jnp.float32))
    if window is not None:
        mask = jnp.where(jnp.asarray(window)[:, :, None], mask, 1.0)
    return mask


def renormalize(images, reference, eps: float = 1e-6):
    """Give `images` the per-image, per-channel mean and std (over H, W) of `reference`."""
    mu, sd = jnp.mean(images, (1, 2), keepdims=True), jnp.std(images, (1, 2), keepdims=True)
    ref_mu, ref_sd = (jnp.mean(reference, (1, 2), keepdims=True),
                      jnp.std(reference, (1, 2), keepdims=True))
    return (images - mu) * (ref_sd / jnp.maximum(sd, eps)) + ref_mu


def apply_prompt(params, images, window=None, renormalize_output: bool = True):
    """x' = irfft2(A * m * exp(iP)), re-normalised; the image is data, so the gradient reaches
    only the prompt params (the input is stop-gradiented). Returns x' in the images' dtype."""
    if images.ndim != 4:
        raise ValueError(f"apply_prompt expects NHWC images, got shape {images.shape}")
    _, height, width, channels = images.shape
    expected = (height, width // 2 + 1, channels)
    if params["log_mask"].shape != expected:
        raise ValueError(f"prompt log_mask has shape {params['log_mask'].shape}, images "
                         f"{images.shape} need {expected}")
    x = jax.lax.stop_gradient(jnp.asarray(images, jnp.float32))
    amplitude, phase = amplitude_phase(x)
    out = reconstruct(amplitude * amplitude_mask(params, window)[None], phase,
                      height, width)
    if renormalize_output:
        out = renormalize(out, x)
    return out.astype(images.dtype)


def mask_penalty(params, window=None):
    """mean((m - 1)^2) over the learnable (windowed) entries: keeps an adversarial prompt near
    the identity."""
    dev = (jnp.exp(params["log_mask"].astype(jnp.float32)) - 1.0) ** 2
    if window is None:
        return jnp.mean(dev)
    w = jnp.broadcast_to(jnp.asarray(window)[:, :, None], dev.shape)
    return jnp.sum(jnp.where(w, dev, 0.0)) / jnp.maximum(jnp.sum(w), 1)


def radial_filter(images, cutoff: float, keep: str = "low"):
    """Low- or high-pass filtered images (B, H, W, C), float32: the frequencies with normalised
    radius r = |f| / 0.5 (f in cycles per pixel; r = 1 at the Nyquist frequency of an axis)
    r <= cutoff are kept ('low') or removed ('high'); phase and kept amplitudes are untouched.
    The teacher's frequency preference is its response to both (FoPro-KD's observation)."""
    if keep not in ("low", "high"):
        raise ValueError(f"radial_filter keep={keep!r}: use 'low' or 'high'")
    _, height, width, _ = images.shape
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    low = jnp.asarray(np.hypot(fy, fx) / 0.5) <= cutoff  # cutoff may be traced
    m = jnp.where(low if keep == "low" else ~low, 1.0, 0.0)[None, :, :, None]
    spectrum = jnp.fft.rfft2(jnp.asarray(images, jnp.float32), axes=(1, 2))
    return jnp.fft.irfft2(spectrum * m, s=(height, width), axes=(1, 2)).astype(jnp.float32)
