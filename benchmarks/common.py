"""Shared helpers for benchmark scripts: timing, device description, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{d.platform}: {kind} x{jax.device_count()}"


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
              sync: Callable[[object], object] = lambda x: x) -> dict:
    """Median and spread of wall time of fn() after warm-up (sync() blocks on its result)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
