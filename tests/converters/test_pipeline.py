"""The conversion driver (``converters/pipeline.py``): GPTQ on real weights, resume, calibration sources."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qe_vllm.converters import pipeline
from qe_vllm.converters.calibration import calibration_windows, load_text
from qe_vllm.converters.checkpoint import load_quantized_state, partial_dir
from qe_vllm.converters.pipeline import ConvertOptions, convert


@pytest.fixture(scope="module")
def gptq_opts(data_dir) -> ConvertOptions:
    return ConvertOptions(
        method="gptq",
        bits=4,
        group_size=128,
        calib_data=str(data_dir / "austen" / "northangerabbey.txt"),
        nsamples=4,
        seqlen=128,
        seed=3,
        true_sequential=False,
        propagation=0.0,
        shrink=0.0,
        mse_grid=False,
    )


@pytest.fixture(scope="module")
def gptq_cut(smollm2_2blocks, gptq_opts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "cut-gptq"
    return convert(str(smollm2_2blocks), out, gptq_opts, device="cpu")


def test_gptq_on_real_weights(gptq_cut):
    qcfg, layers = load_quantized_state(gptq_cut.output)
    prov = qcfg.provenance
    assert prov["method"] == "gptq" and prov["options"]["nsamples"] == 4 and prov["options"]["seed"] == 3
    errors = prov["relative_error"]
    assert set(errors) == set(layers) and len(layers) == 14
    assert all(0 < e < 0.05 for e in errors.values()), errors  # 4-bit g128 on real weights: small
    assert all(t["outlier_col_idx"].numel() == 0 for t in layers.values())


def test_resume_is_byte_identical(smollm2_2blocks, gptq_opts, gptq_cut, tmp_path, monkeypatch):
    out = tmp_path / "cut-gptq"
    real = pipeline.quantize_block
    calls = []

    def interrupted(block, opts, device, acts, call, label, *rest):
        if label.endswith(".1"):
            raise KeyboardInterrupt
        return real(block, opts, device, acts, call, label, *rest)

    monkeypatch.setattr(pipeline, "quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(smollm2_2blocks), out, gptq_opts, device="cpu")
    assert not out.exists()
    assert json.loads((partial_dir(out) / "_work" / "progress.json").read_text()) == {
        "next_block": 1
    }

    with pytest.raises(ValueError, match="different settings"):
        convert(str(smollm2_2blocks), out, replace(gptq_opts, seed=4), device="cpu", resume=True)

    def counting(block, opts, device, acts, call, label, *rest):
        calls.append(label)
        return real(block, opts, device, acts, call, label, *rest)

    monkeypatch.setattr(pipeline, "quantize_block", counting)
    convert(str(smollm2_2blocks), out, gptq_opts, device="cpu", resume=True)
    assert calls == ["model.layers.1"]  # block 0 came from the saved state
    assert not partial_dir(out).exists()
    reference = gptq_cut.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for f in reference.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_calibration_sources_and_seeded_windows(smollm2_2blocks, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_2blocks)
    rows = [f"Sentence number {i} of a small calibration corpus." for i in range(200)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    datasets.Dataset.from_dict({"id": list(range(200)), "text": rows}).to_parquet(
        tmp_path / "rows.parquet"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("\n\n".join(rows[100:]))
    (tmp_path / "docs" / "a.txt").write_text("\n\n".join(rows[:100]))
    joined = "\n\n".join(rows)
    for source in ("rows.jsonl", "rows.parquet", "docs"):
        assert load_text(str(tmp_path / source)) == joined, source

    a = calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=7)
    assert a.shape == (5, 32) and torch.equal(
        a, calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=7)
    )
    assert not torch.equal(a, calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=8))
    with pytest.raises(ValueError, match="too few"):
        calibration_windows(tok, str(tmp_path / "docs"), 5, 100_000, seed=7)
    with pytest.raises(ValueError, match="cannot load text source"):
        load_text("no_such_dataset_name")
