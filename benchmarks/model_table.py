"""The README's model table: parameters, GMACs at the registered resolution, paper top-1, parity status.

    python benchmarks/model_table.py --out benchmarks/results/model_table.md

Parameters are counted on an abstract model (nnx.eval_shape) and GMACs come from XLA's cost analysis of
the lowered (not compiled) forward at batch 1, flops / 2. XLA counts every multiply-add of the program
(softmax, norms and GELU included), so it is a little above the papers' counts (DeiT-S: 4.74 vs 4.6).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from flax import nnx

import vit_jax_fix
from vit_jax_fix.models.cost import xla_flops
from vit_jax_fix.models.registry import count_params, get_spec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests import golden  # noqa: E402  (the golden cases ship in tests/data/golden)


def golden_families() -> dict[str, list[str]]:
  """Registered name -> golden cases that check it (from the cases' `equivalent_registered`)."""
  out: dict[str, list[str]] = {}
  for case in golden.cases():
    out.setdefault(golden.registered_name(golden.metadata(case)), []).append(case)
  return out


def weights_label(spec) -> str:
  """Where the authors' weights come from: the download host, 'manual (host)' for links that need a browser
  (`create_model(name, pretrained=True)` then says where to save the file), '-' when none were released."""
  if spec.weights is None:
    return "-"
  from urllib.parse import urlparse
  host = urlparse(spec.weights.url).hostname
  return f"manual ({host})" if spec.weights.needs_browser else host


def gmacs(model) -> float:
  size = getattr(model, "img_size", 224)
  h, w = (size, size) if isinstance(size, int) else size
  model.eval()
  return xla_flops(model, (1, h, w, 3)) / 2e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/model_table.md")
  args = parser.parse_args()
  checked = golden_families()
  rows = []
  for name in vit_jax_fix.list_models():
    spec = get_spec(name)
    model = nnx.eval_shape(lambda: vit_jax_fix.create_model(name))
    params = count_params(model)
    cases = checked.get(name, [])
    family_cases = sorted({c for n, cs in checked.items() for c in cs if get_spec(n).family == spec.family})
    parity = (", ".join(cases) if cases else
              (f"family: {', '.join(family_cases)}" if family_cases else "-"))
    rows.append(dict(name=name, family=spec.family, params=params, gmacs=round(gmacs(model), 2),
                     paper_top1=spec.paper_top1, weights=weights_label(spec), golden=parity))
    print(f"{name}: {params:,} params", flush=True)
  lines = ["| model | family | params | GMACs (XLA) | paper top-1 | weights | golden parity cases |",
           "|---|---|---:|---:|---:|---|---|"]
  for r in rows:
    top1 = f"{r['paper_top1']:.1f}" if r["paper_top1"] else "-"
    lines.append(f"| `{r['name']}` | {r['family']} | {r['params']:,} | {r['gmacs']:.2f} | {top1} | {r['weights']} "
                 f"| {r['golden']} |")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
