"""Fourier amplitude prompts against numpy / torch.fft references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import fourier

RNG = np.random.default_rng(0)
# Odd width 15 and even width 16, non-square, 3 channels with different statistics.
IMAGES = {w: (RNG.normal(size=(2, 12, w, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -2.0]).astype(
    np.float32) for w in (15, 16)}


def _random_params(h, w, c, seed=1):
    log_mask = np.random.default_rng(seed).normal(size=(h, w // 2 + 1, c)).astype(np.float32)
    return {"log_mask": jnp.asarray(log_mask)}


def _numpy_symmetric(mask, width):
    """The mask a real output can carry: columns 0 (and W/2) averaged over (k, -k)."""
    m = mask.copy()
    h = mask.shape[0]
    for col in {0, width // 2} if width % 2 == 0 else {0}:
        for k in range(h):
            m[k, col] = 0.5 * (mask[k, col] + mask[(-k) % h, col])
    return m


prompt = jax.jit(fourier.apply_prompt, static_argnames="renormalize_output")


@pytest.mark.parametrize("width", [15, 16])
def test_decomposition_matches_numpy_and_torch(width):
    torch = pytest.importorskip("torch")
    x = IMAGES[width]
    amp, ph = jax.jit(fourier.amplitude_phase)(x)
    ref = np.fft.rfft2(x, axes=(1, 2))
    np.testing.assert_allclose(amp, np.abs(ref), rtol=1e-4, atol=1e-4)
    t = torch.fft.rfft2(torch.from_numpy(x), dim=(1, 2)).numpy()
    np.testing.assert_allclose(amp, np.abs(t), rtol=1e-4, atol=1e-4)
    big = np.abs(ref) > 1e-2  # the phase of a near-zero bin is noise
    np.testing.assert_allclose(np.exp(1j * np.asarray(ph))[big], np.exp(1j * np.angle(ref))[big],
                               atol=1e-4)
    back = fourier.reconstruct(amp, ph, 12, width)
    np.testing.assert_allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("width", [15, 16])
def test_mask_of_ones_is_identity(width):
    x = IMAGES[width]
    params = fourier.init_prompt(12, width, 3)
    np.testing.assert_allclose(prompt(params, x), x, atol=1e-5)
    np.testing.assert_allclose(prompt(params, x, renormalize_output=False), x, atol=1e-5)


@pytest.mark.parametrize("width", [15, 16])
def test_masked_output_matches_numpy_reference(width):
    """irfft2(A * m * exp(iP)) with a random mask, then re-normalisation, written in numpy."""
    x = IMAGES[width]
    params = _random_params(12, width, 3)
    m = _numpy_symmetric(np.exp(np.asarray(params["log_mask"], np.float64)), width)
    f = np.fft.rfft2(x.astype(np.float64), axes=(1, 2))
    raw = np.fft.irfft2(np.abs(f) * m * np.exp(1j * np.angle(f)), s=(12, width), axes=(1, 2))
    np.testing.assert_allclose(prompt(params, x, renormalize_output=False), raw, atol=1e-4)
    mu, sd = raw.mean((1, 2), keepdims=True), raw.std((1, 2), keepdims=True)
    want = (raw - mu) / sd * x.std((1, 2), keepdims=True) + x.mean((1, 2), keepdims=True)
    np.testing.assert_allclose(prompt(params, x), want, atol=1e-4)


@pytest.mark.parametrize("width", [15, 16])
def test_phase_is_unchanged_and_amplitude_scaled_by_mask(width):
    x = IMAGES[width]
    params = _random_params(12, width, 3, seed=2)
    out = np.asarray(prompt(params, x))  # re-normalised: an affine map per channel
    f_in, f_out = np.fft.rfft2(x, axes=(1, 2)), np.fft.rfft2(out, axes=(1, 2))
    big = (np.abs(f_in) > 1e-1)
    big[:, 0, 0] = False  # re-normalisation moves the mean (the DC bin), nothing else
    np.testing.assert_allclose(np.exp(1j * np.angle(f_out))[big],
                               np.exp(1j * np.angle(f_in))[big], atol=1e-3)
    # Before re-normalisation the amplitude ratio is the (symmetrised) mask itself.
    raw = np.asarray(prompt(params, x, renormalize_output=False))
    ratio = np.abs(np.fft.rfft2(raw, axes=(1, 2)))[big] / np.abs(f_in)[big]
    m = _numpy_symmetric(np.exp(np.asarray(params["log_mask"])), width)
    np.testing.assert_allclose(ratio, np.broadcast_to(m, f_in.shape)[big], rtol=1e-3)


def test_window_is_centred_low_frequency_box():
    w = fourier.low_frequency_window(12, 16, 0.5)  # |ky| <= 3, kx <= 4
    assert w.shape == (12, 9)
    ky = np.abs(np.fft.fftfreq(12) * 12)
    expected = (ky[:, None] <= 3) & (np.arange(9)[None] <= 4)
    np.testing.assert_array_equal(w, expected)
    assert w[0, 0] and w[-3, 4] and not w[-4, 0] and not w[0, 5]
    assert fourier.low_frequency_window(12, 16, 1.0).all()
    assert fourier.low_frequency_window(12, 16, 0.0).sum() == 1
    with pytest.raises(ValueError, match="beta"):
        fourier.low_frequency_window(12, 16, 1.5)


@pytest.mark.parametrize("width", [15, 16])
def test_window_leaves_outside_amplitudes_untouched(width):
    x = IMAGES[width]
    window = fourier.low_frequency_window(12, width, 0.4)
    params = _random_params(12, width, 3, seed=3)
    out = np.asarray(prompt(params, x, window, renormalize_output=False))
    a_in = np.abs(np.fft.rfft2(x, axes=(1, 2)))
    a_out = np.abs(np.fft.rfft2(out, axes=(1, 2)))
    outside = np.broadcast_to(~window[None, :, :, None], a_in.shape)
    np.testing.assert_allclose(a_out[outside], a_in[outside], rtol=1e-4, atol=1e-4)
    inside = ~outside & (a_in > 1e-1)
    assert np.abs(a_out[inside] / a_in[inside] - 1).max() > 0.5  # the mask acted inside


def test_gradient_reaches_only_the_mask_inside_the_window():
    x = jnp.asarray(IMAGES[16])
    window = fourier.low_frequency_window(12, 16, 0.4)
    target = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)

    def loss(params, images):
        return jnp.sum(fourier.apply_prompt(params, images, window) * target)

    g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(_random_params(12, 16, 3), x)
    g = np.asarray(g_params["log_mask"])
    assert np.all(g[~window] == 0.0)
    assert np.abs(g[window]).min(initial=np.inf) >= 0 and np.abs(g[window]).max() > 1e-3
    assert np.all(np.asarray(g_images) == 0.0)  # the image is data, never optimised


def test_penalty_is_zero_at_identity_and_counts_only_the_window():
    window = fourier.low_frequency_window(12, 16, 0.4)
    params = fourier.init_prompt(12, 16, 3)
    assert float(fourier.mask_penalty(params, window)) == 0.0
    log_mask = np.zeros((12, 9, 3), np.float32)
    log_mask[~window] = 5.0  # outside the window: ignored
    log_mask[0, 0, 0] = np.log(3.0)  # inside: (3 - 1)^2 = 4 over window.sum() * 3 entries
    got = fourier.mask_penalty({"log_mask": jnp.asarray(log_mask)}, window)
    np.testing.assert_allclose(got, 4.0 / (window.sum() * 3), rtol=1e-5)


def test_bfloat16_images_are_processed_in_float32():
    """bf16 in, bf16 out, but the FFTs run in float32: same result as the float32 path."""
    x = jnp.asarray(IMAGES[16], jnp.bfloat16)
    params = _random_params(12, 16, 3, seed=4)
    out = prompt(params, x)
    assert out.dtype == jnp.bfloat16
    want = prompt(params, x.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="log_mask"):
        fourier.apply_prompt(fourier.init_prompt(12, 15, 3), IMAGES[16])
