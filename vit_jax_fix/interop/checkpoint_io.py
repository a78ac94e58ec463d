"""PyTorch weight files in and out: `.safetensors` / `.pth` with metadata, wrappers, prefixes, safe loading.

Reading (`read_state_dict`):
- `.safetensors` (no code can run), `.pth` / `.pt` / `.bin` through `torch.load(weights_only=True)`: a file that
  pickles Python objects (EViT's checkpoints pickle an `argparse.Namespace`) is refused with the reason,
  unless `allow_pickle=True` (trusted files only: unpickling can run arbitrary code).
- Wrappers real checkpoints come in: `{'model': sd}` (DeiT/CaiT/official repos), `{'state_dict': sd}`
  (timm/Lightning and our own .pth), `{'state_dict_ema': sd}` / `{'model_ema': sd}` (EMA weights; chosen with
  `ema=True`, and used when they are the only weights); then a common `module.` (DataParallel/DDP) or
  `_orig_mod.` (torch.compile) prefix is stripped. Other entries (optimizer, epoch, args) are ignored.
- Tensors come back as numpy arrays (bf16/fp16 widened to float32).

Writing (`write_state_dict`): `.safetensors` with metadata `format='pt'` plus the keys of `export_metadata`,
each a string (JSON for structured values); `.pth` as `{'state_dict': {key: tensor}, 'metadata': {...}}` with
the same metadata as plain Python values, loadable with `torch.load(weights_only=True)` and by timm's
`load_state_dict` (which unwraps 'state_dict').

Metadata (`export_metadata`): `model_name`, `model_kwargs` (our registered name and constructor overrides),
`layout`, `weights` ('raw' | 'ema'), `img_size`, `input_size` [3, H, W], `interpolation`, `crop_pct`,
`mean`, `std`, and for timm layouts `timm_model`, `timm_kwargs` and a ready `timm_create` call.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any

import numpy as np

from vit_jax_fix import errors
from vit_jax_fix import paths

PTH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
_RAW_KEYS = ("model", "state_dict", "module", "params")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpoint(errors.UserError, RuntimeError):
  """A .pth file that needs unpickling arbitrary Python objects; see the message for what to do."""


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    import torch
    t = value.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()
    return t.numpy()
  return np.asarray(value)


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and (hasattr(v, "shape") or hasattr(v, "detach")) for k, v in obj.items())


def unwrap_state_dict(obj: Any, *, ema: bool | None = None) -> tuple[dict, str]:
  """(flat state_dict, name of the wrapper used or '') from a loaded checkpoint object.
  ema=True takes EMA weights (error if absent); ema=False never does, unless they are the only weights and
  ema is None (the default: raw weights when present, else EMA)."""
  if not isinstance(obj, dict):
    raise errors.BadFileError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors; save "
                     f"model.state_dict() rather than the model object")
  if _is_state_dict(obj) and not any(k in obj for k in _RAW_KEYS + _EMA_KEYS):
    if ema:
      raise errors.BadFileError("ema=True but the checkpoint is a bare state_dict with no EMA weights")
    return obj, ""
  raw = [k for k in _RAW_KEYS if _is_state_dict(obj.get(k))]
  emas = [k for k in _EMA_KEYS if _is_state_dict(obj.get(k))]
  if ema and not emas:
    raise errors.BadFileError(f"ema=True but the checkpoint has no EMA weights (entries: {sorted(obj)}; EMA is looked "
                     f"for under {list(_EMA_KEYS)})")
  if ema or (ema is None and not raw and emas):
    return obj[emas[0]], emas[0]
  if raw:
    return obj[raw[0]], raw[0]
  raise errors.BadFileError(f"no state_dict found in the checkpoint: its entries are {sorted(obj)}; expected a flat "
                   f"dict of tensors or one under {list(_RAW_KEYS + _EMA_KEYS)}")


def strip_prefix(sd: dict) -> tuple[dict, str]:
  """Remove a `module.` / `_orig_mod.` prefix shared by every key (repeatedly: DDP of a compiled model)."""
  stripped = ""
  changed = True
  while changed and sd:
    changed = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        stripped += prefix
        changed = True
  return sd, stripped


def _torch_load(path: str, allow_pickle: bool):
  import torch
  if allow_pickle:
    return torch.load(path, map_location="cpu", weights_only=False)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()
    detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
    raise UnsafeCheckpoint(
        f"{path}: refused to unpickle it. It stores Python objects besides tensors ({detail.strip()}), and "
        f"loading those runs code from the file (torch.load(weights_only=False)). If you trust its source, "
        f"pass allow_pickle=True (CLI: --allow-pickle); otherwise re-save just the tensors, e.g. "
        f"torch.save({{'model': ckpt['model']}}, 'clean.pth') in a trusted environment.") from e


def read_state_dict(path: str, *, ema: bool | None = None, allow_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict]:
  """({torch key: numpy array}, info) from a .safetensors / .pth file. info: 'wrapper', 'prefix' (what was
  unwrapped / stripped) and 'metadata' (the file's metadata, JSON values decoded; {} if none)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"no such weights file: {path}")
  meta: dict = {}
  if path.endswith(SAFETENSORS_SUFFIXES):
    from safetensors import safe_open
    try:
      import torch  # noqa: F401  (bf16 needs the torch framework; numpy has no bfloat16)
      framework = "pt"
    except ImportError:
      framework = "numpy"
    with safe_open(path, framework=framework) as f:
      meta = decode_metadata(f.metadata() or {})
      obj = {k: f.get_tensor(k) for k in f.keys()}
  elif path.endswith(PTH_SUFFIXES):
    obj = _torch_load(path, allow_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
      meta = dict(obj["metadata"])
  else:
    raise errors.ArgumentError(f"{path}: unknown weights format; expected one of {SAFETENSORS_SUFFIXES + PTH_SUFFIXES}")
  sd, wrapper = unwrap_state_dict(obj, ema=ema)
  sd, prefix = strip_prefix(sd)
  sd = {k: _to_numpy(v) for k, v in sd.items()}
  return sd, {"wrapper": wrapper, "prefix": prefix, "metadata": meta}


# ---------------------------------------------------------------------------------------------- writing

def _jsonable(v):
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (np.integer, np.floating, np.bool_)):
    return v.item()
  if v is None or isinstance(v, (str, int, float, bool)):
    return v
  return str(v)


def export_metadata(name: str, overrides: dict | None = None, *, layout: str = "official",
                    weights: str = "raw") -> dict:
  """What a PyTorch user needs to rebuild and feed the model (see the module docstring)."""
  from vit_jax_fix.interop.timm_models import full_kwargs, timm_config
  from vit_jax_fix.models.registry import get_spec
  overrides = dict(overrides or {})
  spec = get_spec(name)
  kw = full_kwargs(name, **overrides)
  img = kw.get("img_size", 224)
  img = list(img) if isinstance(img, (list, tuple)) else [int(img), int(img)]
  pre = spec.preprocessing()
  meta = {"producer": "vit_jax_fix", "model_name": name, "family": spec.family,
          "model_kwargs": _jsonable(overrides), "layout": layout, "weights": weights,
          "img_size": img, "input_size": [int(kw.get("in_chans", 3))] + img,
          "interpolation": pre["interpolation"], "crop_pct": float(pre["crop_pct"]),
          "mean": list(pre["mean"]), "std": list(pre["std"]), "num_classes": int(kw.get("num_classes", 0))}
  if layout == "timm":
    timm_name, timm_kwargs = timm_config(name, **overrides)
    timm_kwargs = _jsonable(timm_kwargs)
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items())
    meta.update(timm_model=timm_name, timm_kwargs=timm_kwargs,
                timm_create=(f"timm.create_model({timm_name!r}, pretrained=True, pretrained_cfg_overlay=dict("
                             f"file=PATH, num_classes={timm_kwargs['num_classes']}), {args})"))
  else:
    meta["official_source"] = spec.source
  return meta


def encode_metadata(meta: dict) -> dict[str, str]:
  """safetensors metadata: str -> str; strings as is, everything else JSON."""
  out = {"format": "pt"}
  for k, v in meta.items():
    out[k] = v if isinstance(v, str) else json.dumps(_jsonable(v))
  return out


def decode_metadata(meta: dict[str, str]) -> dict:
  out = {}
  for k, v in meta.items():
    try:
      out[k] = json.loads(v) if v[:1] in "[{0123456789-tfn" else v
    except (json.JSONDecodeError, TypeError):
      out[k] = v
  return out


def write_state_dict(path: str, state_dict: dict[str, np.ndarray], metadata: dict | None = None) -> str:
  """Write {key: array} as .safetensors or .pth (by suffix) with metadata; returns the path."""
  path = os.fspath(path)
  metadata = dict(metadata or {})
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  if not path.endswith(SAFETENSORS_SUFFIXES + PTH_SUFFIXES):
    raise errors.ArgumentError(f"{path}: choose a .safetensors or .pth file name")
  if path.endswith(SAFETENSORS_SUFFIXES):
    from safetensors.numpy import save
    data = save(arrays, metadata=encode_metadata(metadata))
  else:
    import io

    import torch
    buf = io.BytesIO()
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                "metadata": _jsonable(metadata)}, buf)
    data = buf.getvalue()
  out = paths.as_path(path)             # local or gs://: the bytes are written through epath
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(data)
  return path


# ------------------------------------------------------------------------------------- model <-> file

def detect_layout(state_dict: dict, metadata: dict | None = None) -> str:
  """'timm' or 'official': the file's own metadata first, else timm's LayerScale names (`ls1.gamma`)."""
  if metadata and metadata.get("layout") in ("official", "timm"):
    return metadata["layout"]
  return "timm" if any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in state_dict) else "official"


def infer_overrides(name: str, state_dict: dict, overrides: dict | None = None) -> dict:
  """Fill `num_classes` (from head.weight) and `img_size` (from a square pos_embed grid) when not given."""
  from vit_jax_fix.interop.timm_models import full_kwargs
  out = dict(overrides or {})
  if "num_classes" not in out and "head.weight" in state_dict:
    out["num_classes"] = int(np.shape(state_dict["head.weight"])[0])
  if "img_size" not in out and "pos_embed" in state_dict:
    try:
      kw = full_kwargs(name, **out)
    except Exception:  # noqa: BLE001  (let create_model report bad overrides)
      return out
    if "pos_embed" in kw and "patch_size" in kw and kw.get("stem", "patch") == "patch":
      n = int(np.shape(state_dict["pos_embed"])[1]) - (1 if kw["pos_embed"] == "cls" else 0)
      g = int(round(n ** 0.5))
      default = kw["img_size"] if isinstance(kw["img_size"], int) else None
      if g * g == n and default is not None and g * int(kw["patch_size"]) != default:
        out["img_size"] = g * int(kw["patch_size"])
  return out


def save_torch(model, path: str, *, name: str | None = None, overrides: dict | None = None,
               layout: str | None = None, weights: str = "raw") -> dict:
  """Export `model` (built as `create_model(name, **overrides)`) to .safetensors/.pth with metadata.
  layout=None picks timm's layout for models timm has, else the official one. Returns the metadata."""
  from vit_jax_fix.interop.state_dict import to_torch_state_dict
  from vit_jax_fix.interop.timm_models import default_layout
  name = name or getattr(model, "spec_name", None)
  if name is None:
    raise errors.ArgumentError("save_torch: give name= (the registered model name) for the metadata")
  overrides = dict(overrides or {})
  layout = layout or default_layout(name, **overrides)
  meta = export_metadata(name, overrides, layout=layout, weights=weights)
  write_state_dict(path, to_torch_state_dict(model, layout=layout), meta)
  return meta


def load_torch(path: str, name: str | None = None, overrides: dict | None = None, *, layout: str = "auto",
               ema: bool | None = None, allow_pickle: bool = False, strict: bool = True):
  """(model, info) from a PyTorch weights file. `name`/`overrides` default to the file's metadata (files
  written by `save_torch`); num_classes and img_size are inferred from the weights when not given. A
  state_dict that does not fit raises `StateDictMismatch` listing every offending key."""
  from vit_jax_fix.interop.state_dict import from_torch_state_dict
  sd, info = read_state_dict(path, ema=ema, allow_pickle=allow_pickle)
  meta = info["metadata"]
  if name is None:
    name = meta.get("model_name")
    if name is None:
      raise errors.ArgumentError(f"{path} carries no model name in its metadata: give the registered name "
                       f"(--name / name=...)")
    if overrides is None:
      overrides = dict(meta.get("model_kwargs") or {})
  overrides = infer_overrides(name, sd, overrides)
  layout = detect_layout(sd, meta) if layout == "auto" else layout
  if strict:
    # Every parameter is overwritten (strict), so skip running the initialisers (slow on CPU).
    from vit_jax_fix.interop.skeleton import skeleton
    model = skeleton(name, **overrides)
  else:
    from vit_jax_fix.models.registry import create_model
    model = create_model(name, **overrides)
  from_torch_state_dict(model, sd, layout=layout, strict=strict)
  info.update(name=name, overrides=overrides, layout=layout)
  return model, info

