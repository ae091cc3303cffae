"""
Shared plumbing for the single-file systems in this repo (camoe.py, alphagpt.py, ...):
config dataclasses as command-line flags, device selection and bf16 autocast, seeding, benchmark timing, crash-safe
file writes, checkpoint loading, the built-in corpus, the learning-rate schedule, token sampling, JSONL metrics and DDP setup.
"""

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import pickle
import random
import re
import sysconfig
import tempfile
import time
import typing
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

PathLike = str | os.PathLike
ConfigT = TypeVar("ConfigT")

# -----------------------------------------------------------------------------
# config dataclasses as flags

def config_field(default: object, help: str, choices: tuple | None = None) -> object:
    """A dataclass field whose help text (and choices) add_config_flags turns into a flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})

def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, helps: dict[str, str] | None = None,
                     choices: dict[str, list] | None = None, shown: object | None = None,
                     label: str = "default") -> None:
    """One --field-name flag per field of config_cls. The help text is helps[name], or the field's own (made
    with config_field), followed by "(label: value)" from shown (default: config_cls()). Bools get --x/--no-x,
    list fields take one or more values, choices come from choices[name] or config_field. Flags the user does
    not give are absent from the parsed namespace (see given_flags)."""
    shown = config_cls() if shown is None else shown
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(shown, f.name)
        help_text = f"{helps[f.name] if helps else f.metadata['help']} ({label}: {default})"
        kind = f.type if isinstance(f.type, type) else type(default)     # string annotations: the default's type
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif isinstance(default, list):
            args = typing.get_args(f.type) if not isinstance(f.type, str) else ()
            parser.add_argument(flag, nargs="+", type=args[0] if args else str, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)
        else:
            options = (choices or {}).get(f.name) or f.metadata.get("choices")
            parser.add_argument(flag, type=kind, choices=options, default=argparse.SUPPRESS,
                                metavar=None if options else f.name.upper(), help=help_text)

def given_flags(args: argparse.Namespace, config_cls: type) -> dict:
    """The fields of config_cls that were given on the command line, by name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}

# -----------------------------------------------------------------------------
# device

def pick_device(name: str = "auto") -> torch.device:
    """Resolve "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N" to an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # parsed here because torch.device stores the index as int8 ("cuda:256" silently becomes cuda:0)
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"unknown device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if match[1] == "cuda" and int(match[2] or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} is not available ({torch.cuda.device_count()} CUDA devices found)")
    return torch.device(name)

def bf16_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (when enabled), nothing on CPU: a context manager for the forward pass."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

# -----------------------------------------------------------------------------
# seeding

def seed_everything(seed: int) -> None:
    """Seed python's random, numpy and torch (torch.manual_seed also seeds every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# benchmark timing

def time_calls(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `repeat` calls of fn, after `warmup` untimed calls; CUDA work is waited for."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds

# -----------------------------------------------------------------------------
# crash-safe file writes

_UMASK = os.umask(0o022)
os.umask(_UMASK)                                        # read once: the umask can only be read by setting it

def atomic_write(path: PathLike, write_fn: Callable[[BinaryIO], None]) -> None:
    """Write via write_fn (it may stream) to a temp file next to path, fsync it, then rename it over path:
    a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)              # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # make the rename itself durable; not possible on every OS/filesystem, hence best effort
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass

def atomic_save(obj: object, path: PathLike) -> None:
    """torch.save obj to path so that a crash leaves either the old file or the new one, never a torn one."""
    atomic_write(path, lambda f: torch.save(obj, f))

def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write data to path with the same all-or-nothing guarantee as atomic_save."""
    atomic_write(path, lambda f: f.write(data))

# -----------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A torch checkpoint dict of plain content (dicts, lists, tensors, numbers, strings), loaded with
    weights_only=True; a missing, foreign or damaged file is one ValueError / FileNotFoundError line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message runs to several lines and advises weights_only=False, which would run the file's code
        raise ValueError(f"{path}: not a readable checkpoint (not a torch file of plain tensors and numbers)") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({str(exc).strip().splitlines()[-1]})") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    return ckpt

def load_checkpoint(path: PathLike, config_cls: type[ConfigT],
                    map_location: str | torch.device = "cpu") -> tuple[dict, ConfigT]:
    """Load a checkpoint saved as {"config": dataclasses.asdict(cfg), ...} and rebuild config_cls from it.

    Read with read_checkpoint. Config fields missing from old checkpoints take their dataclass defaults;
    stored keys the dataclass no longer has are ignored with a warning.
    """
    ckpt = read_checkpoint(path, map_location)
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: checkpoint has no 'config' dict")
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(ckpt["config"]) - known)
    if unknown:
        warnings.warn(f"{path}: ignoring config keys unknown to {config_cls.__name__}: {unknown}")
    config = config_cls(**{k: v for k, v in ckpt["config"].items() if k in known})
    return ckpt, config

# -----------------------------------------------------------------------------
# the built-in corpus

def builtin_corpus_files() -> list[str]:
    """The standard library's top-level *.py files: text every Python installation has, for training runs
    given no data."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise FileNotFoundError("the built-in corpus needs the Python standard library's source files")
    return files

# -----------------------------------------------------------------------------
# learning-rate schedule

def cosine_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to lr over warmup_steps, cosine decay to min_lr at total_steps, then constant min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)

# -----------------------------------------------------------------------------
# sampling

def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample token ids (...,) from logits (..., V); temperature 0 is greedy, top_k/top_p filter first."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shift by the max first (a new tensor: the caller's logits are never modified), so a tiny temperature
    # sends the others to -inf instead of every logit to +-inf and NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop_sorted[..., 0] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    ids = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)
    return ids.reshape(probs.shape[:-1])

# -----------------------------------------------------------------------------
# metrics

def _json_value(value: object) -> object:
    """Turn one-element tensors / numpy scalars into Python numbers and non-finite floats into None, also
    inside lists, tuples and dicts."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value

class MetricsLogger:
    """Append one JSON object per log() call to a JSONL file, fsynced per line; path=None disables it."""

    def __init__(self, path: PathLike | None):
        self._file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def log(self, **fields: object) -> None:
        """Write fields plus a "time" stamp as one line (non-finite floats become null)."""
        if self._file is None:
            return
        record = {"time": time.time(), **{k: _json_value(v) for k, v in fields.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # a killed run keeps every line logged so far

    def close(self) -> None:
        """Close the file; later log() calls are no-ops."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

# -----------------------------------------------------------------------------
# distributed data parallel

def setup_ddp() -> tuple[bool, int, int, int, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1; return (is_ddp, rank, local_rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False, 0, 0, 1, pick_device("auto")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init, so NCCL binds this rank to its own GPU
        dist.init_process_group(backend="nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return True, rank, local_rank, world_size, device

def cleanup_ddp() -> None:
    """Destroy the process group if setup_ddp created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
