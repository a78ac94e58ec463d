"""A regular (non-editable) install must ship every subpackage: setuptools' `packages = find:` skips a
directory without __init__.py, which then works from the source tree but is missing from a wheel."""
import pathlib

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_source_directory_is_a_package_the_wheel_ships():
  with_code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vit_jax_fix").rglob("*.py")
               if "__pycache__" not in p.parts}
  found = set(setuptools.find_packages(str(ROOT), include=["vit_jax_fix*"]))
  assert with_code - found == set(), f"add an __init__.py to: {sorted(with_code - found)}"
