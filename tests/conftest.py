"""Fixtures shared by the test directories: tiny random models (always), a 2-block cut of
SmolLM2 (when prepared), and the checkpoints and texts several test files start from.

Everything is session- or module-scoped and written under pytest's tmp_path_factory, so a
model is built once per test session and nothing lands in the repository. Plain helpers
(paths, ``run_script``, vLLM runs, random layers) are modules under ``tests/helpers/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers.env import DATA_DIR, OFFLINE_ENV, REPO, SMOLLM2_DIR, TESTS, run_script

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"

os.environ.update(OFFLINE_ENV)
# Without a GPU the Triton kernels run under the interpreter (tests/kernels/test_kernels.py).
# It must be on before anything imports triton: triton.language builds its own @triton.jit
# helpers (tl.sum, tl.cdiv, ...) at import, and compiled ones cannot be called from an
# interpreted kernel. Test files collected earlier import transformers, which imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _one_core_set_per_test_process() -> None:
    """Pin each pytest-xdist process, and every process it starts, to cores of its own.

    vLLM's CPU backend binds one OpenMP thread to every core the process may use, and torch
    starts as many intra-op threads. Two test processes each running a server or an engine
    on the same 2 cores oversubscribe them, and the spinning OpenMP threads slow both down
    several times over: ``serving/soak.py``'s CI soak takes about 60 s alone and took 287 s
    beside another vLLM test. Children inherit the affinity, and vLLM's automatic binding
    (``VLLM_CPU_OMP_THREADS_BIND=auto``) only picks cores the process is allowed.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cores = sorted(os.sched_getaffinity(0))
    if worker is None or count is None or len(cores) < int(count):
        return
    mine = cores[int(worker.removeprefix("gw")) :: int(count)]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


_one_core_set_per_test_process()
if torch.cpu._is_amx_tile_supported():  # vLLM's AMX attention is broken here: tests/vllm_site
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(TESTS / "vllm_site"), os.environ.get("PYTHONPATH")])
    )


def _train_tokenizer(out: Path) -> None:
    """A 512-token byte-level BPE trained on this repository's own source text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    files = sorted(str(p) for p in (REPO / "qe_vllm").rglob("*.py"))
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Random bf16 Llama with GQA (4 heads, 2 KV heads), 2 blocks, untied lm_head, + tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out)
    _train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """Random bf16 OPT (linears with biases, learned positions), 2 blocks, + tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    out = tmp_path_factory.mktemp("tiny-opt")
    cfg = OPTConfig(
        vocab_size=512,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    OPTForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    _train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2-raw-test.txt").is_file():
        pytest.fail(f"shared text data not found at {DATA_DIR} (set QE_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_2blocks(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct cut to its first 2 decoder blocks: real weight statistics, tiny runtime."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"SmolLM2 not prepared at {SMOLLM2_DIR}: run `bash serving/setup.sh` first")
    keep_blocks = 2
    out = tmp_path_factory.mktemp("smollm2-2blocks")
    tensors = {}
    for f in sorted(SMOLLM2_DIR.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if m is None or int(m.group(1)) < keep_blocks:
                    tensors[k] = sf.get_tensor(k)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((SMOLLM2_DIR / "config.json").read_text())
    config["num_hidden_layers"] = keep_blocks
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:keep_blocks]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in SMOLLM2_DIR.iterdir():
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and f.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def good(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 4-bit checkpoint of ``tiny_llama`` (RTN, groups of 64, 1.5% outliers).

    ``helpers.broken_checkpoints.broken`` corrupts copies of it (the loader tests in
    tests/converters and the vLLM ones in tests/qe_vllm).
    """
    out = tmp_path_factory.mktemp("good") / "tiny-w4"
    r = run_script(
        "qe-convert", "--model", tiny_llama, "--output", out, "--method", "rtn", "--bits", "4",
        "--group-size", "64", "--outlier-fraction", "0.015", "--device", "cpu",
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models' tokenizer was trained on this repository's source: calibrate on it too."""
    out = tmp_path_factory.mktemp("calib") / "source.txt"
    out.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "qe_vllm").rglob("*.py"))))
    return out


@pytest.fixture(scope="session")
def smollm2_w4_o1(tmp_path_factory) -> Path:
    """The whole SmolLM2 at W4 g128 + 1% outliers (RTN: no calibration), converted once.

    The serving tests (``tests/serving/``) all start from it; they test serving, not the
    solver, so the fastest method will do.
    """
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"default model missing at {SMOLLM2_DIR}: run `bash serving/setup.sh` first")
    ckpt = tmp_path_factory.mktemp("smollm2-w4-o1") / "smollm2-w4-o1"
    proc = run_script(
        "qe-convert", "--model", SMOLLM2_DIR, "--output", ckpt, "--method", "rtn", "--bits", "4",
        "--group-size", "128", "--outlier-fraction", "0.01", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits/weight" in proc.stdout
    return ckpt


# The slow modules, longest first: seconds each took in a full run on the 2-core machine
# (`pytest -p` with a per-test timeline, this session's tests/README.md).
LONGEST_FIRST = (
    "test_vllm_method",  # 384
    "test_serving_api",  # 143
    "test_serve_e2e",  # 110
    "test_eval_tasks",  # 105
    "test_export",  # 105
    "test_soak_short",  # 83
    "test_reliability_vllm",  # 47
    "test_transformers_loading",  # 42
    "test_server_harness",  # 40
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long modules first, longest first, then any other module with slow tests; each
    module's own order kept.

    pytest-xdist (``--dist loadscope``, pyproject.toml) hands whole modules to whichever
    process is free, in this order: starting with the long vLLM modules lets the short ones
    fill in at the end, instead of one process finishing a soak alone.
    """
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.module.__name__
        known = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return known, name not in slow

    items.sort(key=rank)
