"""Property tests of the checkpoint format: packing, layer round trips, and the validators.

Bounded sizes and example counts keep this CI-fast; shapes deliberately include
widths that are not multiples of 8, 32 or the group size.
"""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from qe_vllm.converters.checkpoint import read_headers, validate_checkpoint, write_model_dir
from qe_vllm.converters.result import QuantResult
from qe_vllm.format import (
    QWEIGHT,
    QZEROS,
    ROW_PTR,
    SCALES,
    SUPPORTED_BITS,
    CheckpointFormatError,
    QuantEaseConfig,
    dense_weight,
    num_groups,
    pack_codes,
    packed_width,
    unpack_codes,
    validate_csr,
    validate_linear,
)

FAST = settings(max_examples=60, deadline=None)
GROUPS = st.sampled_from([-1, 8, 16, 32])


def bitstream_words(codes: list[int], bits: int) -> list[int]:
    """Independent oracle of the packing: one Python integer per row, cut into signed 32-bit words."""
    stream = sum(c << (k * bits) for k, c in enumerate(codes))
    words = []
    for w in range(packed_width(bits, len(codes))):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - 2**32 if u >= 2**31 else u)
    return words


@st.composite
def code_matrices(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    out_f, in_f = draw(st.integers(1, 5)), draw(st.integers(1, 70))
    flat = draw(st.lists(st.integers(0, 2**bits - 1), min_size=out_f * in_f, max_size=out_f * in_f))
    return torch.tensor(flat, dtype=torch.int32).view(out_f, in_f), bits


@FAST
@given(code_matrices())
def test_pack_matches_bitstream_oracle_and_unpacks(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (codes.shape[0], packed_width(bits, codes.shape[1]))
    for row, words in zip(codes.tolist(), packed.tolist()):
        assert words == bitstream_words(row, bits)
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes)


@st.composite
def layers(draw: st.DrawFn) -> tuple[QuantResult, QuantEaseConfig]:
    """A random solved layer with fp16-representable scales and outliers (what a solver stores)."""
    bits, group, sym = draw(st.sampled_from(SUPPORTED_BITS)), draw(GROUPS), draw(st.booleans())
    out_f, in_f = draw(st.integers(1, 6)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    n_groups = num_groups(group, in_f)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    scales = (torch.rand(out_f, n_groups, generator=g) * 2 + 1e-3).half().float()
    zeros = (
        torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32)
        if sym
        else torch.randint(0, 2**bits, (out_f, n_groups), generator=g, dtype=torch.int32)
    )
    density = draw(st.sampled_from([0.0, 0.05, 0.5]))
    mask = torch.rand(out_f, in_f, generator=g) < density
    outliers = torch.where(mask, torch.randn(out_f, in_f, generator=g).half().float(), 0.0)
    cfg = QuantEaseConfig(bits=bits, group_size=group, sym=sym)
    return QuantResult(codes, scales, zeros, outliers), cfg


@FAST
@given(layers())
def test_layer_round_trip_is_exact_and_valid(case: tuple[QuantResult, QuantEaseConfig]) -> None:
    """What a solver produced is exactly what the stored tensors mean, and the validator accepts it."""
    res, cfg = case
    out_f, in_f = res.codes.shape
    tensors = res.to_tensors(cfg)
    validate_linear("fuzz", tensors, cfg, out_f, in_f)
    assert torch.equal(dense_weight(tensors, cfg, in_f), res.weight(cfg.group_size))


def csr_is_valid(row_ptr: list[int], cols: list[int], vals: list[float], in_f: int) -> bool:
    """Independent statement of the CSR rules of docs/FORMAT.md."""
    nnz = len(cols)
    if len(vals) != nnz or not row_ptr or row_ptr[0] != 0 or row_ptr[-1] != nnz:
        return False
    if any(b < a for a, b in zip(row_ptr, row_ptr[1:])):
        return False
    for a, b in zip(row_ptr, row_ptr[1:]):
        row = cols[a:b]
        if any(not 0 <= c < in_f for c in row) or any(y <= x for x, y in zip(row, row[1:])):
            return False
    return all(v == v and abs(v) != float("inf") for v in vals)


@st.composite
def csr_triples(draw: st.DrawFn) -> tuple[list[int], list[int], list[float], int]:
    """Mostly-valid CSR triples with a random defect now and then."""
    out_f, in_f = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    rows = [sorted(draw(st.sets(st.integers(0, in_f - 1), max_size=min(in_f, 4)))) for _ in range(out_f)]
    row_ptr = [0]
    for r in rows:
        row_ptr.append(row_ptr[-1] + len(r))
    cols = [c for r in rows for c in r]
    vals = [draw(st.floats(-4, 4, width=16)) for _ in cols]
    defect = draw(st.sampled_from(["none", "ptr", "col", "val", "length"]))
    if defect == "ptr":
        i = draw(st.integers(0, len(row_ptr) - 1))
        row_ptr[i] += draw(st.integers(-3, 3))
    elif defect == "col" and cols:
        i = draw(st.integers(0, len(cols) - 1))
        cols[i] = draw(st.integers(-2, in_f + 2))
    elif defect == "val" and vals:
        vals[draw(st.integers(0, len(vals) - 1))] = draw(st.sampled_from([float("nan"), float("inf"), 1.0]))
    elif defect == "length":
        vals = vals + [0.5]
    return row_ptr, cols, vals, in_f


@settings(max_examples=200, deadline=None)
@given(csr_triples())
def test_csr_validator_agrees_with_the_rules(case: tuple[list[int], list[int], list[float], int]) -> None:
    row_ptr, cols, vals, in_f = case
    args = (torch.tensor(row_ptr, dtype=torch.int32), torch.tensor(cols, dtype=torch.int32),
            torch.tensor(vals, dtype=torch.float16), in_f)
    try:
        validate_csr("fuzz", *args)
        accepted = True
    except CheckpointFormatError as e:
        assert "layer 'fuzz'" in str(e)
        accepted = False
    assert accepted == csr_is_valid(row_ptr, cols, [float(v) for v in args[2]], in_f)


MUTATIONS = {
    "drop": lambda t, k: t.pop(k),
    "dtype": lambda t, k: t.update({k: t[k].to(torch.float32 if t[k].dtype != torch.float32 else torch.int32)}),
    "shape": lambda t, k: t.update({k: torch.cat([t[k], t[k][-1:]])}),
}


@FAST
@given(layers(), st.sampled_from(sorted(MUTATIONS)), st.sampled_from([QWEIGHT, SCALES, QZEROS, ROW_PTR]))
def test_layer_validator_rejects_structural_damage(
    case: tuple[QuantResult, QuantEaseConfig], mutation: str, name: str
) -> None:
    res, cfg = case
    tensors = res.to_tensors(cfg)
    if name not in tensors:  # symmetric grids store no zero points
        name = SCALES
    MUTATIONS[mutation](tensors, name)
    try:
        validate_linear("fuzz", tensors, cfg, *res.codes.shape)
    except CheckpointFormatError as e:
        assert str(e).startswith("layer 'fuzz': ") and name in str(e)
    else:
        raise AssertionError(f"{mutation} of {name} was accepted")


def tiny_checkpoint(out: Path) -> Path:
    """A 1-block Llama checkpoint written through the real writer (no conversion needed)."""
    from transformers import LlamaConfig

    from qe_vllm.converters.checkpoint import linear_shapes, quantized_config

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1).to_dict()
    cfg = QuantEaseConfig(bits=3, group_size=16)
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16(),
               "model.norm.weight": torch.ones(32).bfloat16(),
               "lm_head.weight": torch.randn(64, 32, generator=g).bfloat16()}
    for name, (out_f, in_f) in linear_shapes(config).items():
        if not cfg.is_skipped(name):
            n_groups = num_groups(cfg.group_size, in_f)
            res = QuantResult(
                torch.randint(0, 8, (out_f, in_f), generator=g, dtype=torch.int32),
                torch.rand(out_f, n_groups, generator=g).half().float() + 0.01,
                torch.randint(0, 8, (out_f, n_groups), generator=g, dtype=torch.int32),
                torch.where(torch.rand(out_f, in_f, generator=g) < 0.05, 1.5, 0.0),
            )
            tensors.update({f"{name}.{k}": v for k, v in res.to_tensors(cfg).items()})
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.0.{norm}.weight"] = torch.ones(32).bfloat16()
    out.mkdir(parents=True)
    write_model_dir(out, tensors, quantized_config(config, cfg), out)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255), st.booleans()), min_size=1, max_size=4))
def test_checkpoint_validator_on_flipped_bytes(flips: list[tuple[float, int, bool]], tmp_path_factory) -> None:
    """Random byte flips, half of them in the safetensors header: a clear error, or a usable layer.

    Either ``validate_checkpoint`` raises its own error type, or every layer
    dequantizes to finite weights — never another exception, never NaN.
    """
    base = tmp_path_factory.getbasetemp() / "fuzz-base"
    if not base.exists():
        tiny_checkpoint(base)
    ckpt = Path(tmp_path_factory.mktemp("flipped"))
    (ckpt / "config.json").write_bytes((base / "config.json").read_bytes())
    data = bytearray((base / "model.safetensors").read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for where, mask, in_header in flips:
        pos = int(where * (header_end if in_header else len(data) - 1))
        data[min(pos, len(data) - 1)] ^= mask
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    try:
        geometry = validate_checkpoint(ckpt)
    except (CheckpointFormatError, FileNotFoundError):
        return
    stored = read_headers(ckpt, load=lambda k: True)
    for name, (_, in_f) in geometry.shapes.items():
        layer = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == name}
        w = dense_weight(layer, geometry.qcfg, in_f)
        assert bool(torch.isfinite(w).all()), name
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"] == 3
