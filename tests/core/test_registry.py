"""The registry, the packaged catalogue, the README table and the command line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

import fastattn
from fastattn.docs import update_readme
from fastattn.registry import catalogue

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "catalogue.tsv"


def test_methods_lists_exact_family_with_metadata():
    names = [s.name for s in fastattn.methods(family="exact")]
    assert names == ["softmax", "memory_efficient", "flash"]
    spec = fastattn.get_method("memory_efficient")
    assert spec.arxiv == "2112.05682" and spec.year == 2021 and spec.exact and spec.functional
    assert spec.options == {"query_chunk": 1024, "key_chunk": 4096}


def test_every_registered_id_agrees_with_the_catalogue():
    cat = catalogue()
    for spec in fastattn.methods():
        row = cat[spec.name]
        assert (spec.family, spec.kind, spec.arxiv, spec.year) == (row["family"], row["kind"], row["arxiv"], int(row["year"]))
        assert spec.causal == (row["causal"] == "yes"), f"{spec.name}: causal flag disagrees with the catalogue"


@pytest.mark.skipif(not SHARED.exists(), reason="project catalogue not beside the checkout")
def test_packaged_catalogue_is_the_project_catalogue():
    packaged = (ROOT / "fastattn" / "catalogue.tsv").read_text()
    assert packaged == SHARED.read_text(), "copy ../shared/catalogue.tsv to fastattn/catalogue.tsv"
    assert len(list(csv.DictReader(packaged.splitlines(), delimiter="\t"))) == len(catalogue())


def test_readme_table_is_current():
    assert update_readme(ROOT / "README.md", check=True), (
        "README mechanism table or deviations section is stale: run `fastattn readme`"
    )


def test_cli_list_runs():
    out = subprocess.run([sys.executable, "-m", "fastattn", "list"], capture_output=True, text=True, check=True)
    assert "memory_efficient" in out.stdout and "mechanisms" in out.stdout
