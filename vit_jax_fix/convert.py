"""Convert weights between this project's checkpoints and PyTorch (timm / official repositories) or Google npz.

    # trainer checkpoint (latest step of a workdir, or WORKDIR/checkpoints/STEP) -> PyTorch
    python -m vit_jax_fix.convert to-torch --checkpoint WORKDIR[/checkpoints/STEP] --out model.safetensors [--ema]
    # PyTorch (.pth/.safetensors) or Google ViT (.npz) -> a trainer checkpoint in DIR (init_from / evaluation)
    python -m vit_jax_fix.convert from-torch --name deit_small_patch16_224 --weights deit.pth --out DIR
    # without --weights: the authors' released file of --name (registry table; downloaded once into the cache)
    python -m vit_jax_fix.convert from-torch --name deit_small_patch16_224 --out DIR

to-torch writes timm's layout for models timm has (ViT/DeiT/DeiT III/CaiT without extra fixes; load with
`timm.create_model(<timm_model>, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N),
**timm_kwargs)`, both stored in the file's metadata) and the official repository's layout for the others;
`--layout` forces one. from-torch writes `DIR/checkpoints/0/{state,meta}` (see
`vit_jax_fix.train.checkpoint.save_model`), which `config.init_from.path=DIR` and
`vit_jax_fix.train.checkpoint.load_model(DIR)` read.
"""
from __future__ import annotations

import argparse
import json
import sys

from vit_jax_fix import errors


def _parse_overrides(items) -> dict:
  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep:
      raise errors.ArgumentError(f"--override {item!r}: use KEY=VALUE (VALUE as JSON, e.g. num_classes=10 "
                                 f"img_size=384)")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def export_model(model, out: str, *, name: str, overrides: dict | None = None, layout: str | None = None,
                 ema: bool = False) -> dict:
  """In-memory model -> PyTorch file (what `to-torch` does after loading the checkpoint)."""
  from vit_jax_fix.interop.checkpoint_io import save_torch
  return save_torch(model, out, name=name, overrides=overrides, layout=layout, weights="ema" if ema else "raw")


def export_checkpoint(checkpoint: str, out: str, *, ema: bool = False, layout: str | None = None,
                      name: str | None = None) -> dict:
  """Trainer checkpoint -> PyTorch file. Needs `vit_jax_fix.train.checkpoint.load_state_dicts(path, ema=)`
  returning (meta with 'model_name' and 'model_kwargs', model_def, params, batch_stats)."""
  from vit_jax_fix.train.checkpoint import load_state_dicts
  meta, model_def, params, stats = load_state_dicts(checkpoint, ema=ema)
  if name is not None and name != meta["model_name"]:
    raise errors.BadFileError(f"checkpoint {checkpoint!r} holds {meta['model_name']!r}, not {name!r}")
  model = model_def.model(params, stats, train=False)
  return export_model(model, out, name=meta["model_name"], overrides=meta.get("model_kwargs") or {},
                      layout=layout, ema=ema)


def import_weights(weights: str | None, out: str, *, name: str | None = None, overrides: dict | None = None,
                   layout: str = "auto", ema: bool | None = None, allow_pickle: bool = False,
                   resize: str = "bilinear") -> dict:
  """PyTorch / npz file -> trainer checkpoint in `out`. Returns a summary dict. `weights=None`: the registry's
  released file of `name` (`interop.weights.resolve`: cache, mirror or download), read with the table's layout
  unless `layout` names one."""
  from vit_jax_fix.interop.checkpoint_io import load_torch
  from vit_jax_fix.train.checkpoint import save_model
  if weights is None:
    if not name:
      raise errors.ArgumentError("from-torch needs --weights FILE, or --name NAME of a model whose authors released "
                                 "weights (downloaded once into the cache).")
    from vit_jax_fix.interop.weights import released
    weights, table_layout = released(name)
    layout = table_layout if layout == "auto" else layout
  if weights.endswith(".npz"):
    from vit_jax_fix.interop.npz import load_npz
    if name is None:
      raise errors.ArgumentError("--name is required for .npz checkpoints (e.g. deit_base_patch16_224 with overrides)")
    model, info = load_npz(weights, name, overrides, resize=resize)
  else:
    model, info = load_torch(weights, name, overrides, layout=layout, ema=ema, allow_pickle=allow_pickle)
  path = save_model(model, out, name=info["name"], overrides=info["overrides"], source=weights)
  return {"checkpoint": path, **{k: v for k, v in info.items() if k != "metadata"}}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vit_jax_fix.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("to-torch", help="trainer checkpoint -> .safetensors / .pth")
  t.add_argument("--checkpoint", required=True, help="workdir (latest step) or WORKDIR/checkpoints/STEP")
  t.add_argument("--out", required=True, help="output file: .safetensors or .pth")
  t.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
  t.add_argument("--layout", choices=("auto", "timm", "official"), default="auto",
                 help="key layout (auto: timm's when timm has the model, else the official repository's)")
  t.add_argument("--name", help="expected model name (checked against the checkpoint)")
  f = sub.add_parser("from-torch", help=".pth / .safetensors / Google .npz -> trainer checkpoint")
  f.add_argument("--weights", help=".pth/.pt/.bin, .safetensors or .npz file (default: the released weights "
                                  "of --name, downloaded once)")
  f.add_argument("--out", required=True, help="output directory (gets checkpoints/0/{state,meta})")
  f.add_argument("--name", help="registered model name (default: from the file's metadata)")
  f.add_argument("--override", action="append", metavar="KEY=VALUE",
                 help="constructor override, VALUE as JSON (repeatable), e.g. --override depth=24")
  f.add_argument("--layout", choices=("auto", "timm", "official"), default="auto")
  g = f.add_mutually_exclusive_group()
  g.add_argument("--ema", dest="ema", action="store_true", default=None,
                 help="take 'state_dict_ema'/'model_ema' from the file")
  g.add_argument("--raw", dest="ema", action="store_false", help="never take EMA weights")
  f.add_argument("--allow-pickle", action="store_true",
                 help="torch.load(weights_only=False): runs code stored in the file; trusted files only")
  f.add_argument("--resize", choices=("bilinear", "bicubic"), default="bilinear",
                 help="npz: position-embedding interpolation when the grid differs")
  return p


@errors.exit_on_user_error(prog="convert")
def main(argv=None) -> int:
  """User errors (a missing or foreign file, an unknown name) exit with their message: 2 for usage, else 1."""
  args = build_parser().parse_args(argv)
  if args.command == "to-torch":
    meta = export_checkpoint(args.checkpoint, args.out, ema=args.ema,
                             layout=None if args.layout == "auto" else args.layout, name=args.name)
    print(f"wrote {args.out}: {meta['model_name']} ({meta['layout']} layout, {meta['weights']} weights)")
    if "timm_create" in meta:
      print("load with:", meta["timm_create"].replace("PATH", repr(args.out)))
  else:
    summary = import_weights(args.weights, args.out, name=args.name,
                             overrides=_parse_overrides(args.override) if args.override else None,
                             layout=args.layout, ema=args.ema, allow_pickle=args.allow_pickle,
                             resize=args.resize)
    print(json.dumps(summary, indent=2, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
