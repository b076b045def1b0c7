"""The embedded default model: a small Llama with seeded weights and a byte-level
BPE tokenizer trained on local text, so `meshserve up` works with nothing
downloaded.

It is generated into a cache folder on first use and is a complete Hugging Face
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with a chat template, generation_config.json): the worker, the tokenizer and the
`transformers` oracle all load it exactly as they would load real weights.

Generation is deterministic: the corpus is a sorted list of this Python's standard
library sources (files that are not UTF-8 are skipped), the BPE trainer is
deterministic on a fixed input order, and every tensor comes from its own seeded
generator. The folder name carries a recipe version and the Python version, since
the corpus is that Python's library.

Importing this module does not import torch: the api and the tokenizer read its
constants and its folder, and only a process that generates the folder (first
use on a machine) pays for torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECIPE_VERSION = 1
SERVED_NAME = "meshserve-tiny-llama"

VOCAB_SIZE = 2048
HIDDEN = 256
INTERMEDIATE = 688
LAYERS = 4
HEADS = 8
KV_HEADS = 4
MAX_POSITIONS = 4096
# The output head is drawn wider than an initialiser would: a random model with
# std-0.02 heads has near-tied logits, and greedy decoding is only comparable
# across implementations when the top-1 margin dwarfs float32 rounding.
LM_HEAD_STD = 0.5
WEIGHT_STD = 0.05

SPECIAL_TOKENS = ["<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS_MODULES = (
    "argparse.py", "asyncio", "collections", "concurrent", "dataclasses.py", "email",
    "enum.py", "functools.py", "http", "json", "logging", "pathlib.py", "string.py",
    "subprocess.py", "textwrap.py", "typing.py", "unittest", "urllib", "xml",
)


def default_cache_dir() -> Path:
    base = os.environ.get("MESHSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "meshserve"
    )
    return Path(base)


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return (cache_dir or default_cache_dir()) / f"{SERVED_NAME}-v{RECIPE_VERSION}-{version}"


def _corpus_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for name in _CORPUS_MODULES:
        path = stdlib / name
        candidates = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for candidate in candidates:
            if "test" in candidate.parts:
                continue
            try:
                candidate.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            files.append(str(candidate))
    if not files:
        raise RuntimeError(f"no corpus found under {stdlib}")
    return files


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(_corpus_files(), trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|end_of_text|>",
        "unk_token": None,
        "model_max_length": MAX_POSITIONS,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"}, indent=2)
    )


def _config(eos_ids: list[int], pad_id: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    import torch  # here, not at the top: see the module docstring

    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB_SIZE, HIDDEN)}
    tensors: dict[str, torch.Tensor] = {}
    for index, (name, shape) in enumerate(shapes.items()):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            std = LM_HEAD_STD if name == "lm_head.weight" else WEIGHT_STD
            tensors[name] = std * torch.randn(shape, generator=generator)
    return {name: t.contiguous() for name, t in tensors.items()}


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """The embedded model's folder, generated on first use. Safe to call from
    several processes at once: each builds in a private folder and the first
    atomic rename wins."""
    target = embedded_model_dir(cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    staging.chmod(0o755)
    try:
        _train_tokenizer(staging)
        vocab = json.loads((staging / "tokenizer.json").read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in vocab}
        eos_ids = [ids["<|im_end|>"], ids["<|end_of_text|>"]]
        pad_id = ids["<|end_of_text|>"]
        (staging / "config.json").write_text(json.dumps(_config(eos_ids, pad_id), indent=2))
        (staging / "generation_config.json").write_text(
            json.dumps({"eos_token_id": eos_ids, "pad_token_id": pad_id}, indent=2)
        )
        from safetensors.torch import save_file  # imports torch: only when generating

        save_file(_weights(), str(staging / "model.safetensors"), metadata={"format": "pt"})
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_embedded_model())
