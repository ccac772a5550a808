"""Load models into transformers: originals by path or cached hub id, QuantEase checkpoints packed.

A QuantEase checkpoint is evaluated from its bytes on disk: the model is built
from its config and every quantized linear becomes a :class:`QuantEaseLinear`
holding the *packed* tensors and dequantizing them with the exact torch path vLLM
also uses (``kernels/torch_linear.py``, tested against the format's reference
meaning). That makes the perplexity of a converted checkpoint a check of the file,
not of the converter's in-memory state.

Two ways to run those layers (``dequantize=``), same numbers bit for bit:

* ``"per-call"`` (the default of :func:`load_quantease_model`): no dense weight is ever
  resident; each call rebuilds the weight and drops it. Lean, and slow (a full
  dequantization of every linear per forward pass).
* ``"once"``: each layer's weight is dequantized once at load, in the same float32 pass,
  cast once to the model's dtype and kept (a dense copy per linear, the memory of an
  unquantized model); every call is then a plain ``F.linear``. What ``qe-eval`` uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qe_vllm.converters.checkpoint import read_config, read_headers, read_quantized
from qe_vllm.format import (
    COL_IDX,
    QWEIGHT,
    QZEROS,
    ROW_PTR,
    SCALES,
    VALUES,
    QuantEaseConfig,
    csr_rows,
)
from qe_vllm.kernels.torch_linear import (
    dequantize_weight,
    flat_outlier_index,
    quantease_linear_torch,
)

DEQUANTIZE_MODES = ("per-call", "once")

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model(name: str | Path) -> Path:
    """A local model directory, or the snapshot of a hub id (cache only when ``HF_HUB_OFFLINE=1``)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model directory {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all mean "not available"
        raise FileNotFoundError(
            f"{text!r} is not a local model directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); without network access pass a local checkpoint directory"
        ) from None


def is_quantease_checkpoint(model_dir: Path) -> bool:
    config = read_config(Path(model_dir))
    return (config.get("quantization_config") or {}).get("quant_method") == "quantease"


def holds_packed_tensors(model_dir: Path) -> bool:
    """True when the weights include QuantEase ``qweight`` tensors (read from headers only).

    Such a directory must go through the validating QuantEase loader even when its
    config.json lost the quantization_config: ``from_pretrained`` would silently
    initialise every quantized linear at random and evaluate garbage.
    """
    return any(k.endswith("." + QWEIGHT) for k in read_headers(Path(model_dir)))


class QuantEaseLinear(torch.nn.Module):
    """A linear layer that keeps the packed QuantEase tensors and dequantizes them.

    It holds the checkpoint's codes, scales and zero points as stored, outliers as flat
    ``row * in + col`` indices plus values, and runs the same exact torch path as vLLM's
    ``QE_VLLM_KERNEL=torch`` (``kernels/torch_linear.quantease_linear_torch``): by default
    no dense weight is ever kept, one is rebuilt per call and dropped.

    After :meth:`cache_dense` the layer keeps the dense weight instead: the float32
    dequantization cast once to a dtype, exactly the tensor the per-call path builds and
    hands to ``F.linear``, so the outputs are identical. It is a plain attribute, not a
    buffer (never in ``state_dict``); a call in another dtype or on another device rebuilds
    it there (for ``x``'s dtype, as the per-call path would).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        qcfg: QuantEaseConfig,
        out_features: int,
        in_features: int,
        bias_dtype: torch.dtype | None,
    ) -> None:
        """``bias_dtype`` None: no bias; otherwise an uninitialised bias that ``load_state_dict`` fills."""
        super().__init__()
        self.qcfg, self.out_features, self.in_features = qcfg, out_features, in_features
        self.register_buffer(QWEIGHT, tensors[QWEIGHT])
        self.register_buffer(SCALES, tensors[SCALES])
        self.register_buffer(QZEROS, tensors.get(QZEROS))
        rows = csr_rows(tensors[ROW_PTR])
        self.register_buffer(
            "outlier_index", flat_outlier_index(rows, tensors[COL_IDX], out_features, in_features)
        )
        self.register_buffer(VALUES, tensors[VALUES])
        self.bias = None
        if bias_dtype is not None:
            self.bias = torch.nn.Parameter(
                torch.empty(out_features, dtype=bias_dtype), requires_grad=False
            )
        self.dense: torch.Tensor | None = None  # set by cache_dense()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` the per-call path multiplies by: the float32
        dequantization plus outliers, cast to ``dtype``."""
        with torch.no_grad():
            return dequantize_weight(
                self.qweight, self.scales, self.qzeros, self.outlier_index, self.outlier_val,
                bits=self.qcfg.bits, group_size=self.qcfg.group_size, in_features=self.in_features,
            ).to(dtype)

    def cache_dense(self, dtype: torch.dtype) -> None:
        """Dequantize now and keep the dense weight in ``dtype`` for every later call."""
        self.dense = self.dequantized(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            if self.dense.dtype != x.dtype or self.dense.device != self.qweight.device:
                self.cache_dense(x.dtype)
            return torch.nn.functional.linear(x, self.dense, self.bias)
        return quantease_linear_torch(
            x, self.qweight, self.scales, self.qzeros, self.outlier_index, self.outlier_val,
            bits=self.qcfg.bits, group_size=self.qcfg.group_size, in_features=self.in_features,
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        q = self.qcfg
        mode = "once" if self.dense is not None else "per-call"
        return (
            f"in={self.in_features}, out={self.out_features}, bits={q.bits}, "
            f"group_size={q.group_size}, sym={q.sym}, dequantize={mode}"
        )


def renamed(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under the model's names, after transformers' renamings of checkpoint keys.

    Some architectures keep legacy tensor names on disk that ``from_pretrained`` renames
    (GPT-NeoX stores its ``lm_head`` as ``embed_out``); the tensors this loader sets
    itself must be renamed the same way.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renames = [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
    out = {}
    for key, tensor in tensors.items():
        for rename in renames:
            key, _ = rename.rename_source_key(key)
        out[key] = tensor
    return out


def load_quantease_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    dequantize: str = "per-call",
):
    """A transformers causal LM whose quantized linears run from the checkpoint's packed tensors.

    The packed tensors keep their stored dtypes (int32 codes, float16 scales and
    outliers): the model is only moved to ``device``, never cast after loading.
    ``dequantize``: ``"per-call"`` keeps no dense weight (each call rebuilds it);
    ``"once"`` dequantizes every quantized linear once, on ``device``, into a dense
    weight in ``dtype`` kept for all calls (same outputs, one dense copy per linear).
    """
    if dequantize not in DEQUANTIZE_MODES:
        raise ValueError(f"dequantize={dequantize!r}: expected one of {DEQUANTIZE_MODES}")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    ckpt = read_quantized(Path(model_dir))
    config = AutoConfig.for_model(
        **{k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    )
    with no_init_weights():  # also skips tying, done explicitly below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    for name, tensors in ckpt.layers.items():
        parent, _, child = name.rpartition(".")
        bias = model.get_submodule(name).bias
        out_f, in_f = ckpt.shapes[name]
        layer = QuantEaseLinear(
            tensors, ckpt.qcfg, out_f, in_f, None if bias is None else bias.dtype
        )
        setattr(model.get_submodule(parent), child, layer)
    others = renamed(model, ckpt.others)
    missing, unexpected = model.load_state_dict(others, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in others if k in params}
    untouched = [k for k in missing if k in params and id(params[k]) not in loaded]
    if unexpected or untouched:
        raise ValueError(
            f"{model_dir}: checkpoint does not match its config (unexpected {unexpected}, missing {untouched})"
        )
    model = model.to(device).eval()
    if dequantize == "once":
        for m in model.modules():
            if isinstance(m, QuantEaseLinear):
                m.cache_dense(dtype)
    return model


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    dequantize: str = "per-call",
):
    """Original checkpoints through ``from_pretrained``; QuantEase checkpoints from their packed
    tensors (``dequantize``: see :func:`load_quantease_model`; unused for originals)."""
    path = resolve_model(model_dir)
    if is_quantease_checkpoint(path) or holds_packed_tensors(path):
        return load_quantease_model(path, dtype, device, dequantize=dequantize)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
