"""Calibration statistics (``converters/statistics.py``).

The full-precision stream read once per block; oracle: the partial pass per stage, which :class:`FullPrecisionInputs` replaces when the
inputs fit in memory. Both must give the same tensors bit for bit, and so the same
checkpoint bytes. OPT with ``do_layer_norm_before=False`` feeds a block's input straight
into q/k/v, so a cached input that is a view of the activations being advanced shows.

:func:`model_sigmas` (the tests' and benchmarks' real Σ); oracle: float64 Gram matrices of
inputs read by plain hooks over whole forward passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qe_vllm.converters import block as block_step
from qe_vllm.converters import walking
from qe_vllm.converters.pipeline import ConvertOptions, convert
from qe_vllm.converters.statistics import FullPrecisionInputs, model_sigmas


@pytest.fixture(scope="module")
def post_norm_opt(tiny_opt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("post-norm-opt")
    shutil.copytree(tiny_opt, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "do_layer_norm_before": False}))
    return out


@pytest.mark.parametrize("model", ["tiny_llama", "post_norm_opt"])
def test_cached_inputs_equal_the_per_stage_partial_passes(model, request) -> None:
    path = request.getfixturevalue(model)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lay = walking.layout(net)
    windows = torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    with torch.no_grad():
        hidden, calls = walking.capture_block_inputs(net, lay.blocks, windows, cpu)
        block = net.get_submodule(lay.blocks)[0]
        names = [g[0] for g in walking.linear_groups(block, hidden[:1], calls[0])]
        cached_acts, per_stage_acts = hidden.clone(), hidden.clone()
        cached = FullPrecisionInputs(block, cached_acts, calls[0], cpu, names, cache=True)
        per_stage = FullPrecisionInputs(block, per_stage_acts, calls[0], cpu, names, cache=False)
        for j in range(hidden.shape[0]):
            for name in names:
                a, b = cached(j, [name])[name], per_stage(j, [name])[name]
                assert torch.equal(a, b), (j, name)
        per_stage.finish()
        cached.finish()
    assert torch.equal(cached_acts, per_stage_acts) and not torch.equal(cached_acts, hidden)


@pytest.mark.parametrize("model", ["tiny_llama", "post_norm_opt"])
def test_caching_does_not_change_the_checkpoint(model, request, data_dir, tmp_path, monkeypatch) -> None:
    path = request.getfixturevalue(model)
    opts = ConvertOptions(method="quantease", bits=3, group_size=32, iters=2, propagation=0.5,
                          calib_data=str(data_dir / "austen" / "northangerabbey.txt"), nsamples=4, seqlen=48)
    written = {}
    for cache in (True, False):
        monkeypatch.setattr(block_step, "fits_in_memory", lambda nbytes, cache=cache: cache)
        report = convert(str(path), tmp_path / str(cache), opts, device="cpu")
        written[cache] = (report.output / "model.safetensors").read_bytes()
    assert written[True] == written[False]


def test_model_sigmas_is_the_gram_matrix_of_each_input(tiny_llama) -> None:
    """Oracle: every token's input recorded by a plain hook, its Gram matrix formed in float64."""
    net = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    windows = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        net.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0][0].double()))
        for n in names
    ]
    with torch.no_grad():
        for w in windows:
            net(w[None])
    for h in handles:
        h.remove()
    sigmas = model_sigmas(net, names, windows)
    for n in names:
        x = torch.cat(seen[n])
        assert x.shape[0] == windows.numel()
        exact = x.T @ x
        assert float((sigmas[n] - exact).norm() / exact.norm()) < 1e-6, n  # float32 products


def test_model_sigmas_names_a_module_the_model_never_runs(tiny_llama) -> None:
    net = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    net.model.unused = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match=r"never called \['model.unused'\]"):
        model_sigmas(net, ["model.layers.0.mlp.down_proj", "model.unused"], torch.zeros(1, 8, dtype=torch.long))
