"""ICAE checkpoints: only what was trained, as safetensors, plus a JSON manifest.

A checkpoint directory holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA adapter exactly as ``peft``
  writes it, so ``PeftModel.from_pretrained(base, directory)`` loads it without icmem;
- ``icae_embeddings.safetensors``: the memory-token and special-token embeddings, and the slot
  head's tensors when the config has one;
- ``icae_config.json`` (written last, so a half-written directory is never mistaken for a
  checkpoint): the ``ICAEConfig``, the base model's fingerprint and a SHA-256 of every file,
  so truncation or bit rot is caught before any tensor is used.

Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.hardware import resolve_dtype
from icmem.icae.config import ICAEConfig
from icmem.icae.errors import (
    BaseModelMismatchError,
    CheckpointError,
    CorruptCheckpointError,
    ICAEConfigError,
    NoDefaultCheckpointError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from icmem.icae.model import ICAE, ModelSource

FORMAT_VERSION = 1
MANIFEST = "icae_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EMBEDDINGS = "icae_embeddings.safetensors"
DECODER_WEIGHTS = "decoder_adapter.safetensors"
DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parent.parent / "checkpoints" / ("smollm2-135m-instruct-k128")
)


def load_base_model(
    source: ModelSource, revision: str | None, dtype: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """``(model, tokenizer, fingerprint)`` from a name/path or an already loaded pair, cast to
    ``dtype``. The fingerprint is taken before any adapter is injected."""
    import torch

    from icmem.models import load_model, model_fingerprint

    if isinstance(source, tuple):
        model, tokenizer = source
    else:
        model, tokenizer = load_model(source, revision=revision)
    model = model.to(getattr(torch, resolve_dtype(dtype))).eval()
    return model, tokenizer, model_fingerprint(model, tokenizer)


def save_checkpoint(icae: ICAE, directory: str | os.PathLike[str]) -> Path:
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST).unlink(missing_ok=True)  # the directory is not a checkpoint until done
    # adapter_config.json + adapter_model.safetensors: the encoder's adapter, as peft writes it
    icae.model.save_pretrained(str(target), selected_adapters=["default"])
    # peft also writes a model card naming the local path the base model was loaded from: a
    # checkpoint is its tensors and manifest, nothing that says where it was made.
    (target / "README.md").unlink(missing_ok=True)
    names = [ADAPTER_WEIGHTS, EMBEDDINGS]
    if icae.config.decoder_lora_rank:
        from peft import get_peft_model_state_dict

        decoder = get_peft_model_state_dict(icae.model, adapter_name="decoder")
        save_file({k: v.contiguous() for k, v in decoder.items()}, target / DECODER_WEIGHTS)
        names.append(DECODER_WEIGHTS)
    save_file(
        {name: t.detach().contiguous() for name, t in icae.own_tensors().items()},
        target / EMBEDDINGS,
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": icae.config.to_dict(),
        "base_model_fingerprint": icae.fingerprint,
        "files": {name: _sha256(target / name) for name in names},
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def load_checkpoint(
    cls: type[ICAE],
    directory: str | os.PathLike[str] | None,
    base_model: ModelSource | None,
    dtype: str | None = None,
) -> ICAE:
    if directory is None:
        if not (DEFAULT_CHECKPOINT / MANIFEST).is_file():
            raise NoDefaultCheckpointError(
                f"no default ICAE checkpoint is shipped yet (looked in {DEFAULT_CHECKPOINT}); "
                "pass the directory of one written by ICAE.save_pretrained, or build an "
                "untrained one with ICAE.from_base()"
            )
        directory = DEFAULT_CHECKPOINT
    root = Path(directory)
    manifest = _read_manifest(root)
    try:
        config = ICAEConfig.from_dict(manifest["config"])
    except (ICAEConfigError, TypeError) as exc:
        raise CorruptCheckpointError(f"{root / MANIFEST} holds an invalid config: {exc}") from exc
    if dtype is not None:
        config = replace(config, dtype=dtype)  # validated again by __post_init__
    _check_listed_files(root, manifest["files"], config)
    for name, digest in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint file {path} is missing; re-save it")
        if _sha256(path) != digest:
            raise CorruptCheckpointError(
                f"checkpoint file {path} does not match its recorded SHA-256; it is truncated "
                "or damaged, so copy or save the checkpoint again"
            )
    source = config.base_model if base_model is None else base_model
    model, tokenizer, fingerprint = load_base_model(source, config.base_revision, config.dtype)
    expected = manifest["base_model_fingerprint"]
    if fingerprint != expected:
        given = source if isinstance(source, str | os.PathLike) else model.config.name_or_path
        raise BaseModelMismatchError(
            f"the checkpoint in {root} was trained on base model {config.base_model!r} "
            f"(fingerprint {expected}) but was given {str(given)!r} (fingerprint "
            f"{fingerprint}); load it onto {config.base_model!r}"
        )
    icae = cls(model, tokenizer, config, fingerprint)
    _load_adapter(icae, root / ADAPTER_WEIGHTS, "default")
    if config.decoder_lora_rank:
        _load_adapter(icae, root / DECODER_WEIGHTS, "decoder")
    _load_embeddings(icae, root / EMBEDDINGS)
    return icae.eval()


def _check_listed_files(root: Path, files: Any, config: ICAEConfig) -> None:
    """Every file the loader reads must carry a SHA-256 in the manifest, under a plain file
    name: leaving a file out would otherwise switch its integrity check off."""
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"{root / MANIFEST}: 'files' must map file names to SHA-256")
    for name in files:
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or Path(name).name != name
            or ("\\" in name)
        ):
            raise CorruptCheckpointError(
                f"{root / MANIFEST} lists {name!r}; checkpoint files are plain file names in the "
                "checkpoint directory, so re-save it"
            )
    needed = [ADAPTER_WEIGHTS, EMBEDDINGS] + ([DECODER_WEIGHTS] if config.decoder_lora_rank else [])
    unlisted = [name for name in needed if name not in files]
    if unlisted:
        raise CorruptCheckpointError(
            f"{root / MANIFEST} lists no SHA-256 for {unlisted}, which the loader reads; the "
            "manifest was edited or damaged, so re-save the checkpoint"
        )


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{root} is not an ICAE checkpoint (no {MANIFEST}); pass a directory written by "
            "ICAE.save_pretrained"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({exc}); re-save it") from exc
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(
            f"{path} holds a JSON {type(manifest).__name__}, not the object ICAE.save_pretrained "
            "writes; the manifest was overwritten or damaged, so re-save the checkpoint"
        )
    missing = {"format_version", "config", "base_model_fingerprint", "files"} - set(manifest)
    if missing:
        raise CorruptCheckpointError(f"{path} lacks {sorted(missing)}; re-save the checkpoint")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest['format_version']}; this icmem reads "
            f"version {FORMAT_VERSION}, so upgrade icmem"
        )
    return manifest


def _load_tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read {path} ({exc}); re-save it") from exc


def _load_adapter(icae: ICAE, path: Path, adapter: str) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    tensors = _load_tensors(path)
    expected = get_peft_model_state_dict(icae.model, adapter_name=adapter)
    _check_shapes(path, tensors, {k: tuple(v.shape) for k, v in expected.items()})
    set_peft_model_state_dict(icae.model, tensors, adapter_name=adapter)


def _load_embeddings(icae: ICAE, path: Path) -> None:
    import torch

    tensors = _load_tensors(path)
    params = icae.own_tensors()
    _check_shapes(path, tensors, {k: tuple(v.shape) for k, v in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _check_shapes(
    path: Path, tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]
) -> None:
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        unexpected = sorted(set(found) - set(expected))[:3]
        resized = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])[:3]
        raise CorruptCheckpointError(
            f"{path} does not fit this ICAE (missing {missing}, unexpected {unexpected}, "
            f"wrong shape {resized}); its config and tensors disagree, re-save it"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
