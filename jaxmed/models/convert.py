"""PyTorch state_dict (torchvision / DINOv2 key layout) -> flax `{'params', 'batch_stats'}`.

Supports ResNet-18/34/50, DenseNet-121, AlexNet and DINOv2 ViT-S/14, ViT-B/14 (arch
'dinov2_vits14' / 'dinov2_vitb14', or 'vit_*'); DataParallel (`module.`) prefixes are stripped.
A MoCo checkpoint (`module.encoder_q.*`, `module.encoder_k.*`, `module.queue`) keeps only the
query encoder without its MLP head (`fc.0` / `fc.2`), as MoCo's own linear-probe loader does.
DINOv2's `mask_token` (used only in its masked-image training) is dropped; register variants
(`register_tokens`) are refused. torch is imported only by `load_torch_checkpoint`, so converted
params need no torch at run time.

Layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear (O, I) -> (I, O);
BatchNorm / LayerNorm weight, bias -> params scale, bias; running_mean/var -> batch_stats
mean/var; LayerScale `gamma`, `cls_token` and `pos_embed` are copied as they are.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

PREFIXES = ("module.encoder_q.", "module.", "encoder_q.", "backbone.")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def _family(arch: str) -> str:
    if arch.startswith("resnet"):
        return "resnet"
    if arch.startswith(("vit", "dinov2")):
        return "vit"
    return arch


def _module_path(key: str, arch: str) -> list[str]:
    """torch module path (without the leaf name) -> flax module path."""
    parts = key.split(".")
    if _family(arch) in ("resnet", "vit"):
        # layer1.0.conv1 -> layer1_0/conv1 ; layer1.0.downsample.0 -> layer1_0/downsample_0 ;
        # blocks.3.attn.qkv -> blocks_3/attn/qkv
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                out.append(f"{parts[i]}_{parts[i + 1]}")
                i += 2
            else:
                out.append(parts[i])
                i += 1
        return out
    if arch == "densenet121":
        if parts[0] == "features":
            parts = parts[1:]
        if parts[0].startswith("denseblock"):
            return [f"{parts[0]}_{parts[1]}", *parts[2:]]
        if parts[0].startswith("transition"):
            return [f"{parts[0]}_{parts[1]}"]
        return parts
    if arch == "alexnet":
        return [f"{parts[0]}_{parts[1]}"]
    raise ValueError(f"no PyTorch conversion for architecture {arch!r}")


def _fix_legacy_densenet(key: str) -> str:
    # Old torchvision DenseNet checkpoints: 'denselayer1.norm.1.weight' -> '...norm1.weight'.
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean"
                  r"|running_var))$", lambda m: m.group(1) + m.group(2), key)


MOCO_QUERY = ("module.encoder_q.", "encoder_q.")


def moco_query_encoder(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """From a MoCo checkpoint keep the query encoder (prefix removed) without its MLP head
    (`fc.0`, `fc.2`: the teacher target is the pooled feature); other dicts pass through."""
    for prefix in MOCO_QUERY:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()
                    if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}
    return dict(state_dict)


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DataParallel / MoCo prefixes (the longest that every key matching it has)."""
    out = {}
    for k, v in state_dict.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


# The classifier head of each architecture (MoCo v2's MLP head is fc.0 / fc.2).
HEADS = {"resnet": r"fc(_\d+)?", "densenet121": r"classifier", "alexnet": r"classifier_6",
         "vit": r"head"}
# DINOv2 top-level parameters that are not in a module.
VIT_TOKENS = ("cls_token", "pos_embed")


def _is_head(flax_key: str, arch: str) -> bool:
    pattern = HEADS[_family(arch)]
    return re.fullmatch(pattern, flax_key.split("/")[0]) is not None


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, *,
                       target: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert a torchvision-layout state_dict.

    target: the flax variables of the model to load into (from `model.init`). When given, every
    converted array must exist there with the same shape (else a ValueError lists the keys), and
    target entries the checkpoint lacks are kept (e.g. a new classifier head); a head whose shape
    differs from the target's (other number of classes, MoCo's MLP) is replaced by the target's.
    """
    params: dict = {}
    stats: dict = {}
    for key, value in strip_prefixes(moco_query_encoder(state_dict)).items():
        if key.endswith("num_batches_tracked") or key == "mask_token":
            continue
        if key == "register_tokens":
            raise ValueError("DINOv2 checkpoints with register tokens are not supported "
                             "(key 'register_tokens'); use the register-free dinov2_vit*14")
        if arch == "densenet121":
            key = _fix_legacy_densenet(key)
        v = _as_numpy(value).astype(np.float32)
        if _family(arch) == "vit" and key in VIT_TOKENS:
            params[key] = v
            continue
        if "." not in key:
            raise ValueError(f"cannot convert state_dict key {key!r} with shape {v.shape}")
        module, leaf = key.rsplit(".", 1)
        path = _module_path(module, arch)
        if leaf in _BN_STATS:
            stats["/".join(path + [_BN_STATS[leaf]])] = v
        elif leaf == "weight" and v.ndim == 4:
            params["/".join(path + ["kernel"])] = v.transpose(2, 3, 1, 0)
        elif leaf == "weight" and v.ndim == 2:
            params["/".join(path + ["kernel"])] = v.T
        elif leaf == "weight" and v.ndim == 1:
            params["/".join(path + ["scale"])] = v
        elif leaf == "bias":
            params["/".join(path + ["bias"])] = v
        elif leaf == "gamma" and v.ndim == 1:  # DINOv2 LayerScale
            params["/".join(path + ["gamma"])] = v
        else:
            raise ValueError(f"cannot convert state_dict key {key!r} with shape {v.shape}")
    if target is None:
        return {"params": _unflatten(params), "batch_stats": _unflatten(stats)}
    return _merge_into(target, params, stats, arch)


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _merge_into(target, params, stats, arch):
    out = {}
    for col, flat in (("params", params), ("batch_stats", stats)):
        tgt = {"/".join(k): v for k, v in
               flax.traverse_util.flatten_dict(dict(target.get(col, {}))).items()}
        unexpected, mismatched = [], []
        merged = dict(tgt)
        for k, v in flat.items():
            head = _is_head(k, arch)
            if k not in tgt:
                if not head:
                    unexpected.append(k)
            elif tuple(tgt[k].shape) != v.shape:
                if not head:
                    mismatched.append(f"{k}: checkpoint {v.shape} vs model {tuple(tgt[k].shape)}")
            else:
                merged[k] = v
        missing = [k for k in tgt if k not in flat and not _is_head(k, arch)]
        if unexpected or mismatched or missing:
            raise ValueError(
                f"checkpoint does not fit the model ({col}): unexpected {unexpected[:8]}, "
                f"shape mismatches {mismatched[:8]}, missing {missing[:8]}")
        out[col] = _unflatten(merged)
    return out


def load_torch_checkpoint(path: str, arch: str, *, target: Mapping[str, Any] | None = None):
    """Read a `.pth` / `.pt` file (needs torch) and convert it; accepts a bare state_dict or a
    dict holding one under 'state_dict' / 'model' / 'model_state_dict'."""
    import torch  # only at conversion time

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    try:
        return convert_state_dict(ckpt, arch, target=target)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
