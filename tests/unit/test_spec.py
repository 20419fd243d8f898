"""The spec's own rules, in-process: every key documented, errors with file and line, overrides, paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from job import spec as spec_lib
from job.errors import SpecError

MINIMAL = "name: x\noutput_dir: out\ndata:\n  database: a.db\n  table: t\nmodel:\n  path: ./m\n"


def test_every_key_has_a_description():
    undocumented = [k for k, v in spec_lib.field_docs().items() if not v]
    assert not undocumented


def test_errors_name_the_key_and_the_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(MINIMAL + "train:\n  lr: fast\n")
    with pytest.raises(SpecError, match=r"s.yaml:9: train.lr: must be a number, got 'fast'"):
        spec_lib.load(p)
    p.write_text(MINIMAL + "train:\n  micro_bacth: 4\n")
    with pytest.raises(SpecError, match=r"s.yaml:9: train.micro_bacth: unknown key; did you mean 'micro_batch'\?"):
        spec_lib.load(p)
    p.write_text(MINIMAL.replace("  table: t\n", "  table: t\n  valid_fraction: 1.5\n"))
    with pytest.raises(SpecError, match=r"s.yaml:6: data.valid_fraction: must be at most 0.9, got 1.5"):
        spec_lib.load(p)


def test_yaml_floats_overrides_relative_paths_and_round_trip(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(MINIMAL + "train:\n  lr: 2e-4\n")  # YAML 1.1 reads 2e-4 as a string
    spec = spec_lib.load(p, ["train.max_steps=5", "generation.prompts=[a, b]", "train.seed=7"])
    assert (spec.train.lr, spec.train.max_steps, spec.generation.prompts, spec.train.seed) == (2e-4, 5, ["a", "b"], 7)
    assert spec.data.database == str(tmp_path / "a.db") and spec.model.path == str(tmp_path / "m")
    assert spec.output_dir == str(tmp_path / "out")
    again = tmp_path / "again.yaml"
    again.write_text(spec_lib.dump(spec))
    assert spec_lib.load(again) == spec  # spec.yaml as the job writes it reads back the same


def test_empty_sections_mean_defaults(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(MINIMAL + "train:\nreport:\n")
    spec = spec_lib.load(p)
    assert spec.train == spec_lib.TrainSpec() and spec.report.log_interval_s == 30.0


def test_the_readme_documents_every_key():
    """README's spec reference is spec.reference_rows(), row for row: every key, its default and the
    description job/spec.py gives it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8").splitlines()
    missing = [row for row in spec_lib.reference_rows() if row not in readme]
    assert not missing, f"README.md's spec reference differs from job/spec.py in {missing}"
