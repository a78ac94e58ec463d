"""The test data in tests/data is complete and intact: the golden cases and state-dict listings present are
exactly those their READMEs list, each golden tensor file has the SHA-256 its JSON records, and listing an empty
folder is an error (so a test parametrised over the files cannot pass by running zero cases)."""
import hashlib
import re

import pytest

from tests import golden
from tests.testdata import GOLDEN, STATE_DICTS, data_files


def readme_table(folder, section):
  """The first-column names (`name`) of the table under `## <section>` in the folder's README.md."""
  text = (folder / "README.md").read_text()
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  return sorted(re.findall(r"^\| `([^`]+)` \|", body, flags=re.M))


def test_golden_cases_are_those_the_readme_lists():
  listed = readme_table(GOLDEN, "Cases")
  assert len(listed) == 16
  assert golden.cases() == listed
  assert sorted(p.stem for p in GOLDEN.glob("*.safetensors")) == listed


@pytest.mark.parametrize("case", golden.cases())
def test_golden_file_matches_its_recorded_checksum(case):
  """A truncated file, a Git LFS pointer or a newline conversion changes the bytes the JSON recorded."""
  meta = golden.metadata(case)
  data = (GOLDEN / f"{case}.safetensors").read_bytes()
  assert meta["case"] == case and meta["file"]["name"] == f"{case}.safetensors"
  assert len(data) == meta["file"]["bytes"]
  assert hashlib.sha256(data).hexdigest() == meta["file"]["sha256"]
  assert re.fullmatch(r"[0-9a-f]{40}", meta["constructor"]["commit"]), "official commit recorded in full"


def test_state_dict_listings_are_those_the_readme_lists():
  listed = readme_table(STATE_DICTS, "Files")
  assert len(listed) == 30
  assert [p.name for p in data_files(STATE_DICTS, ".tsv")] == listed
  for path in data_files(STATE_DICTS, ".tsv"):
    text = path.read_text()
    assert re.search(r"^# params\t\d+$", text, flags=re.M) and re.search(r"^# buffers\t\d+$", text, flags=re.M), path


def test_listing_an_empty_folder_is_an_error(tmp_path):
  (tmp_path / "README.md").write_text("# no data\n")
  with pytest.raises(FileNotFoundError, match=r"no \*\.json files in .*tests/data"):
    data_files(tmp_path, ".json")
