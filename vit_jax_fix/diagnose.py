"""Collapse diagnostics CLI: per-block feature diversity, token similarity, cross-layer attention similarity,
frequency content and attention high-pass response, for one or several models/checkpoints side by side.

    python -m vit_jax_fix.diagnose --model deit_small_patch16_224 --model featscale_small_12 --out out/
    python -m vit_jax_fix.diagnose --model 'deit_tiny_patch16_224:img_size=32,patch_size=4,depth=24' \\
        --model 'deit_tiny_patch16_224:img_size=32,patch_size=4,depth=24,attn_scale=True' --out out/
    python -m vit_jax_fix.diagnose --model deit_small_patch16_224 --checkpoint runs/a --checkpoint runs/b --out out/

--model NAME[:key=value,...]   a registered name with optional overrides (repeatable); --set key=value applies
                               an override to every model. Without --checkpoint a model is measured at init.
--checkpoint DIR               repeatable; pairs with the models in order (one model with several checkpoints
                               measures each checkpoint of that model).
--data demo|random|<tfds name> images (default: the embedded demo dataset; 'random' = Gaussian images).

Writes OUT/diagnostics.json ({label: measures}, see vit_jax_fix/diagnostics/collect.py for every key) and
OUT/measures_vs_depth.png, OUT/attn_similarity.png, OUT/hf_bands.png.

--probe                        also a closed-form linear probe of every block (vit_jax_fix/diagnostics/probe.py):
                               ridge regression on the frozen class token and mean patch token of the first
                               --probe-train images of the dataset's train split, scored on --probe-test
                               images of its eval split (l2 chosen on a held-out 20%); --probe-shots 1,5,10
                               adds few-shot accuracies. Writes OUT/probe.json and OUT/probe_vs_depth.png.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from vit_jax_fix import errors  # noqa: E402
from vit_jax_fix import paths  # noqa: E402


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_model_spec(spec: str) -> tuple[str, dict]:
  """'name:key=value,key=value' -> (name, overrides). Values are Python literals (else strings)."""
  name, _, rest = spec.partition(":")
  overrides = {}
  for item in filter(None, (s.strip() for s in _split_top_level(rest))):
    if "=" not in item:
      raise errors.ArgumentError(f"model override {item!r} in {spec!r} is not key=value")
    k, _, v = item.partition("=")
    overrides[k.strip()] = parse_value(v.strip())
  return name.strip(), overrides


def _split_top_level(text: str):
  """Split on commas outside brackets/quotes, so tuples like keep_rate_blocks=(3,6) survive."""
  parts, depth, quote, cur = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  return parts


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vit_jax_fix.diagnose", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", required=True, help="NAME[:key=value,...] (repeatable)")
  p.add_argument("--checkpoint", action="append", default=[], help="checkpoint dir (repeatable)")
  p.add_argument("--label", action="append", default=[], help="label per model/checkpoint (repeatable)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every model")
  p.add_argument("--data", default="demo", help="'demo' (default), 'random', or a tfds dataset name")
  p.add_argument("--out", required=True)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--num-batches", type=int, default=4)
  p.add_argument("--threshold", type=float, default=0.9, help="'#similar blocks' threshold")
  p.add_argument("--offset", type=int, default=1, help="compare block p with block p + offset")
  p.add_argument("--bands", type=int, default=4, help="radial frequency bands besides DC")
  p.add_argument("--exclude-cls", action="store_true", help="leave prefix tokens out of feature diversity")
  p.add_argument("--seed", type=int, default=0, help="init seed, and the seed of --data random")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--probe", action="store_true", help="linear-probe accuracy of every block (labelled --data)")
  p.add_argument("--probe-train", type=int, default=2000, help="train-split images for the probes")
  p.add_argument("--probe-test", type=int, default=1000, help="eval-split images the probes are scored on")
  p.add_argument("--probe-shots", default="", help="few-shot probes, e.g. '1,5,10' examples per class")
  return p


def load_checkpoint_model(path: str, model_name: str, **overrides):
  """The eval-mode model of a trainer checkpoint (a workdir, meaning its latest step, or one step dir). The
  checkpoint stores its own model definition: `model_name` must match it, and overrides are ignored (with a
  warning)."""
  from vit_jax_fix.train.checkpoint import load_model
  if overrides:
    import warnings
    warnings.warn(f"model overrides {sorted(overrides)} are ignored for checkpoint {path!r}: the checkpoint "
                  "stores its own model definition")
  return load_model(path, name=model_name)


def build_models(args) -> dict:
  from vit_jax_fix.models.registry import create_model

  common = dict(parse_model_spec("x:" + ",".join(args.set))[1]) if args.set else {}
  specs = [(s, *parse_model_spec(s)) for s in args.model]
  ckpts = list(args.checkpoint)
  if ckpts and len(specs) == 1:
    specs = specs * len(ckpts)
  elif ckpts and len(ckpts) != len(specs):
    raise errors.ArgumentError(f"--checkpoint: give one per --model ({len(specs)}) or use one --model "
                     f"(got {len(ckpts)} checkpoints)")
  entries = []
  for i, (spec, name, overrides) in enumerate(specs):
    kw = {**common, **overrides}
    ckpt = ckpts[i] if ckpts else None
    label = spec if ckpt is None else f"{spec}@{paths.as_path(ckpt).name}"
    model = (load_checkpoint_model(ckpt, name, **kw) if ckpt
             else create_model(name, seed=args.seed, **kw))
    entries.append((label, name, model))
  labels = list(args.label) if args.label else [e[0] for e in entries]
  if len(labels) != len(entries):
    raise errors.ArgumentError(f"--label: give one per model/checkpoint ({len(entries)}), got {len(labels)}")
  if len(set(labels)) != len(labels):
    labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
  return {lab: (name, model) for lab, (_, name, model) in zip(labels, entries)}


@errors.exit_on_user_error(prog="diagnose")
def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  from vit_jax_fix import diagnostics as D

  cfg = D.DiagnosticsConfig(threshold=args.threshold, offset=args.offset, num_bands=args.bands,
                            diversity_include_prefix=not args.exclude_cls)
  out = paths.as_path(args.out)         # a local folder or gs://bucket/...
  out.mkdir(parents=True, exist_ok=True)
  models = build_models(args)
  results = {}
  for label, (name, model) in models.items():
    batches = D.make_batches(model, args.data, batch_size=args.batch_size, num_batches=args.num_batches,
                             model_name=name, seed=args.seed)
    res = D.collect(model, batches, cfg, num_batches=args.num_batches, progress=not args.no_progress,
                    desc=label)
    res["model"] = name
    res["data"] = args.data
    results[label] = res
  (out / "diagnostics.json").write_text(json.dumps(results, indent=1))
  plots = D.plot_all(results, out)
  print(f"wrote {out / 'diagnostics.json'} and {', '.join(p.name for p in plots.values())}", file=sys.stderr)
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
  for label, res in results.items():
    print(f"{label}: feature_diversity_rel last={fmt(res['feature_diversity_rel'][-1])} "
          f"token_similarity last={fmt(res['token_similarity'][-1])} similar_blocks={res['similar_blocks']}"
          + (f"  notes: {res['notes']}" if res["notes"] else ""), file=sys.stderr)
  if args.probe:
    _probe(args, models, out)
  return results


def _probe(args, models: dict, out) -> dict:
  """--probe: linear-probe accuracy per block of every model, OUT/probe.json and OUT/probe_vs_depth.png."""
  from vit_jax_fix import diagnostics as D
  try:
    shots = tuple(int(s) for s in args.probe_shots.split(",") if s.strip())
  except ValueError:
    raise errors.ArgumentError(f"--probe-shots={args.probe_shots!r}: give examples per class, e.g. 1,5,10") from None
  probes = {}
  for label, (name, model) in models.items():
    try:
      probes[label] = D.probe.dataset_probe(model, args.data, model_name=name, batch_size=args.batch_size,
                                            max_train=args.probe_train, max_test=args.probe_test, shots=shots,
                                            seed=args.seed)
    except ValueError as e:
      raise errors.ArgumentError(f"--probe: {e}") from None
    probes[label]["model"] = name
    acc = probes[label]["accuracy"]
    best = {pool: max(zip(v, probes[label]["depth"][pool])) for pool, v in acc.items()}
    print(f"{label}: linear probe " + ", ".join(f"{pool} best {a:.4f} at block {d}" for pool, (a, d) in
                                               best.items())
          + f", pre-logits {probes[label]['pre_logits']['accuracy']:.4f}", file=sys.stderr)
  (out / "probe.json").write_text(json.dumps(probes, indent=1))
  D.plot_probe_vs_depth(probes, out / "probe_vs_depth.png")
  print(f"wrote {out / 'probe.json'} and probe_vs_depth.png", file=sys.stderr)
  return probes


if __name__ == "__main__":
  main()
