"""FoPro-KD costs: the Fourier prompt's forward + backward against the student's training step,
and jnp FFT prompts against torch.fft on the same device.

    python benchmarks/fopro_kd.py [--size 224 --batch 32 --student resnet18]   # GPU: the paper
    python benchmarks/fopro_kd.py --size 64 --batch 16 --student resnet18     # CPU, small

Rows: (1) the prompt alone (rfft2 -> mask -> irfft2 -> re-normalise), forward + backward to the
mask; (2) the student's EKD-free training step (balanced softmax; forward + backward + Adam);
(3) the ratio; (4) the same prompt forward in torch.fft (torch on the same device: CPU here,
CUDA where the device lends one). Writes benchmarks/results/<device>/fopro_kd.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from jaxmed import fourier, losses  # noqa: E402
from jaxmed.models import create_model  # noqa: E402


def prompt_loss(params, x):
    return jnp.mean(fourier.apply_prompt(params, x) ** 2)


def torch_prompt(x, mask):
    """torch.fft twin of fourier.apply_prompt's forward (x NHWC)."""
    import torch

    spec = torch.fft.rfft2(x, dim=(1, 2))
    out = torch.fft.irfft2(torch.polar(spec.abs() * mask, spec.angle()), s=x.shape[1:3],
                           dim=(1, 2))
    mu, sd = out.mean((1, 2), keepdim=True), out.std((1, 2), keepdim=True, unbiased=False)
    rmu, rsd = x.mean((1, 2), keepdim=True), x.std((1, 2), keepdim=True, unbiased=False)
    return (out - mu) * (rsd / sd.clamp_min(1e-6)) + rmu


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch, a.size, a.size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 8, a.batch))
    params = fourier.init_prompt(a.size, a.size, 3)
    params = {"log_mask": params["log_mask"] + 0.1 * jnp.asarray(
        rng.normal(size=params["log_mask"].shape), jnp.float32)}
    sync = jax.block_until_ready

    fwd = jax.jit(fourier.apply_prompt)
    fwd_bwd = jax.jit(jax.value_and_grad(prompt_loss))
    rows = [{"what": "prompt forward (jnp.fft)", **time_call(lambda: fwd(params, x),
                                                             repeats=a.repeats, sync=sync)},
            {"what": "prompt forward + backward", **time_call(lambda: fwd_bwd(params, x),
                                                              repeats=a.repeats, sync=sync)}]

    model = create_model(a.student, 8, stem="imagenet")
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    tx = optax.adam(3e-4)
    counts = np.array([500, 200, 100, 50, 20, 10, 5, 2])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def student_step(v, opt, images, y):
        def loss_fn(prm):
            out, new = model.apply({"params": prm, "batch_stats": v["batch_stats"]}, images,
                                   train=True, mutable=["batch_stats"])
            return jnp.mean(losses.balanced_softmax(out, y, counts)), new
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        upd, opt = tx.update(g, opt, v["params"])
        return {"params": optax.apply_updates(v["params"], upd), **new}, opt, loss

    state = [variables, tx.init(variables["params"])]

    def run_student():
        state[0], state[1], loss = student_step(state[0], state[1], x, labels)
        return loss

    rows.append({"what": f"student step ({a.student}, BSM + Adam)",
                 **time_call(run_student, repeats=a.repeats, sync=sync)})
    ratio = rows[1]["median_s"] / rows[2]["median_s"]
    try:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tx_ = torch.as_tensor(np.array(x), device=dev)
        tm = torch.as_tensor(np.exp(np.asarray(params["log_mask"])), device=dev)
        tsync = (lambda r: torch.cuda.synchronize()) if dev == "cuda" else (lambda r: r)
        rows.append({"what": f"prompt forward (torch.fft, {dev})",
                     **time_call(lambda: torch_prompt(tx_, tm), repeats=a.repeats,
                                 sync=tsync)})
        ref = torch_prompt(tx_, tm).cpu().numpy()
        err = float(np.abs(ref - np.asarray(fwd(params, x))).max())
    except ImportError:
        err = float("nan")
    for r in rows:
        r["median_ms"] = 1e3 * r["median_s"]
    print(f"device: {device_name()}; batch {a.batch} x {a.size}px")
    print_table(rows, ["what", "median_ms", "repeats"])
    print(f"prompt fwd+bwd / student step = {ratio:.3f}; jnp vs torch max |diff| = {err:.2e}")
    kind = "cpu" if jax.devices()[0].platform == "cpu" else jax.devices()[0].platform
    write_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", kind,
                            "fopro_kd.json"),
               {"device": device_name(), "batch": a.batch, "size": a.size,
                "student": a.student, "rows": rows, "prompt_over_student": ratio,
                "jnp_vs_torch_max_abs_diff": err})


if __name__ == "__main__":
    main()
