"""Load models into transformers: originals by path or cached hub id, QuantEase checkpoints packed.

A QuantEase checkpoint is evaluated from its bytes on disk: the model is built
from its config and every quantized linear becomes a :class:`QuantEaseLinear`
holding the *packed* tensors and dequantizing them on each call with the exact
torch path vLLM also uses (``kernels/torch_linear.py``, tested against the
format's reference meaning). That makes the perplexity of a converted checkpoint
a check of the file, not of the converter's in-memory state.
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
from qe_vllm.kernels.torch_linear import flat_outlier_index, quantease_linear_torch

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
    """A linear layer that keeps the packed QuantEase tensors and dequantizes on the fly.

    It holds the checkpoint's codes, scales and zero points as stored, outliers as flat
    ``row * in + col`` indices plus values, and runs the same exact torch path as vLLM's
    ``QE_VLLM_KERNEL=torch`` (``kernels/torch_linear.quantease_linear_torch``): no dense
    weight is ever kept, one is rebuilt per call and dropped.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantease_linear_torch(
            x, self.qweight, self.scales, self.qzeros, self.outlier_index, self.outlier_val,
            bits=self.qcfg.bits, group_size=self.qcfg.group_size, in_features=self.in_features,
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        q = self.qcfg
        return f"in={self.in_features}, out={self.out_features}, bits={q.bits}, group_size={q.group_size}, sym={q.sym}"


def load_quantease_model(
    model_dir: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"
):
    """A transformers causal LM whose quantized linears run from the checkpoint's packed tensors.

    The packed tensors keep their stored dtypes (int32 codes, float16 scales and
    outliers): the model is only moved to ``device``, never cast after loading.
    """
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
    missing, unexpected = model.load_state_dict(ckpt.others, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in ckpt.others if k in params}
    untouched = [k for k in missing if k in params and id(params[k]) not in loaded]
    if unexpected or untouched:
        raise ValueError(
            f"{model_dir}: checkpoint does not match its config (unexpected {unexpected}, missing {untouched})"
        )
    return model.to(device).eval()


def load_model(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """Original checkpoints through ``from_pretrained``; QuantEase checkpoints from their packed tensors."""
    path = resolve_model(model_dir)
    if is_quantease_checkpoint(path) or holds_packed_tensors(path):
        return load_quantease_model(path, dtype, device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
