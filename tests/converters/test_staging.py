"""Resume state: a work folder is reused only by the converter that can read it, with the same settings."""

from __future__ import annotations

import json

import pytest

from qe_vllm.converters.staging import WORK_FORMAT, WorkDir


def test_the_same_settings_resume(tmp_path):
    WorkDir(tmp_path / "_work", {"model": "m", "seed": 0})
    assert WorkDir(tmp_path / "_work", {"model": "m", "seed": 0}).next_block == 0


def test_other_settings_are_refused_by_name(tmp_path):
    WorkDir(tmp_path / "_work", {"model": "m", "seed": 0})
    with pytest.raises(ValueError, match=r"different settings \(seed\); pass --overwrite"):
        WorkDir(tmp_path / "_work", {"model": "m", "seed": 1})


@pytest.mark.parametrize("written_by", [None, WORK_FORMAT - 1])
def test_a_work_folder_of_another_converter_version_is_refused(tmp_path, written_by):
    """Before the format number, a work folder of an older layout (no ``block_calls.pt``) was
    resumed and failed deep inside ``torch.load`` with a bare FileNotFoundError."""
    work = tmp_path / "_work"
    work.mkdir()
    run = {"model": "m", "seed": 0} | ({} if written_by is None else {"work_format": written_by})
    (work / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="written by another version of qe-convert.*--overwrite"):
        WorkDir(work, {"model": "m", "seed": 0})
