"""
TinyGPT: a character-level language model that learns online from what you type.

    python tiny_llm_demo.py                          # interactive REPL, state kept in ./training_data/
    python tiny_llm_demo.py --load-txt book.txt      # learn a file line by line, save, exit
    printf 'hello\\n/gen he\\n' | python tiny_llm_demo.py   # commands from a pipe: no prompt, EOF saves
    python tiny_llm_demo.py --bench                  # step time, KV-cache speedup, replay sampling cost

Every line you type is appended to <data-dir>/training_data.bin (fsynced before any training on it)
and triggers a training pulse: a few AdamW steps on batches replayed from the whole history. The
vocabulary starts with PAD and UNK and grows whenever a new character (any Unicode code point) appears.
Type /help in the REPL for the commands.

Design choices:
- Vocabulary growth is in place: the tied embedding/head Parameter keeps its identity (only its .data
  becomes a larger tensor), so the optimizer keeps training it. Its Adam moments get zero rows for the
  new tokens; new rows are the mean of the known characters' rows plus small noise, and the EMA copy
  gets the same new rows. Old rows are untouched, so logits of known tokens do not move at a growth.
- training_data.bin is append-only UTF-8 text. A training window is read by random access: draw the
  byte where it ends (clamped at the end of the file, so the newest text is covered as often as the
  rest), read 4 bytes per character of window before it (UTF-8's maximum), decode dropping the
  characters cut at the edges. Row 0 of every batch is the newest window, so the line just typed is
  learned in its own pulse; of the other rows about 20% come from an in-memory cache of the last
  500 KB, the rest from the whole file, so memory use does not depend on the history size. Windows
  are always real text; padding only appears while the whole history is shorter than a window, and
  PAD targets are ignored.
- The learning rate follows a cosine with warmup over cycles of --lr-cycle-steps steps that restart
  (an online learner never finishes); the global step is the scheduler state kept in checkpoints.
- Generation uses the EMA weights and a KV cache: the prompt is prefilled, then each token costs one
  single-position forward. When the cache holds `context` positions, a fresh cache is prefilled with
  the last context/2 tokens at positions 0.. (a window that starts from scratch, like a training
  window); this costs about one extra token's work per generated token, so the cost per token does
  not grow with the prefix. (Sliding a ring buffer instead would not equal the model on a cropped
  window: in layers above the first, cached keys were computed with context older than the window.)
- Ctrl-C (or SIGTERM) finishes the current training step, then the program autosaves and exits, as on
  /quit and EOF; training also autosaves every --autosave-every steps. A lock on DATA_DIR/.lock keeps a
  second session out of the same directory. After a SIGKILL every line entered is already on disk: the
  restart loads the last checkpoint (at most --autosave-every steps old), grows it with the characters
  recorded in dynamic_vocab.json since, and replays the whole history.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import string
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (add_config_flags, atomic_save, atomic_write_bytes, bf16_autocast, cosine_lr, given_flags,
                    load_checkpoint, pick_device, sample_next, time_calls)

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TinyConfig:
    """Model shape, online training and generation settings; each field is also a command-line flag."""
    # model shape: fixed once a model exists (a checkpoint brings its own)
    context: int = field(default=256, metadata={"help": "context length in characters"})
    d_model: int = field(default=256, metadata={"help": "embedding width"})
    n_head: int = field(default=8, metadata={"help": "attention heads (d_model / n_head must be even, for RoPE)"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    # online training
    steps: int = field(default=20, metadata={"help": "optimizer steps per training pulse (REPL: /steps=N)"})
    batch_size: int = field(default=16, metadata={"help": "windows per training batch"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of each cosine cycle"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of each cosine cycle"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps at the start of each cycle"})
    lr_cycle_steps: int = field(default=1000, metadata={"help": "length of a cosine cycle; cycles restart"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "maximum gradient norm"})
    autosave_every: int = field(default=200, metadata={
        "help": "also autosave every N training steps, so a crash or SIGKILL loses at most N (0: on exit only)"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the generation weights (0: raw weights)"})
    # generation
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature, 0 = greedy (REPL: /temp=X)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely characters, 0 = all (/topk=N)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling probability mass (REPL: /topp=X)"})
    gen_tokens: int = field(default=200, metadata={"help": "most characters per generation (stops at a newline)"})
    sample_every: int = field(default=1, metadata={"help": "/load_txt prints a sample every N lines (0: never)"})
    seed: int = field(default=1337, metadata={"help": "seed of initialisation, batch sampling and generation"})

    def check(self) -> None:
        """Raise ValueError with a one-line message if a field has the wrong type or is out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = type(f.default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (wanted is int and not isinstance(value, int)):
                raise ValueError(f"{f.name} must be {'an integer' if wanted is int else 'a number'}, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
        for name in ("context", "d_model", "n_head", "n_layer", "batch_size", "lr_cycle_steps", "gen_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "min_lr", "weight_decay", "autosave_every", "temperature", "top_k",
                     "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be > 0, got {self.lr} and {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model / n_head must be an even integer, got {self.d_model} / {self.n_head}")
        if self.warmup_steps >= self.lr_cycle_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < lr_cycle_steps ({self.lr_cycle_steps})")


ARCH_FIELDS = ("context", "d_model", "n_head", "n_layer")  # cannot change once a model exists

# -----------------------------------------------------------------------------
# tokenizer

PAD, UNK = 0, 1
SPECIAL_TOKENS = ["<pad>", "<unk>"]
N_SPECIAL = len(SPECIAL_TOKENS)


class DynamicTokenizer:
    """Character-level tokenizer whose vocabulary grows: ids 0 and 1 are PAD and UNK, then one id per
    character (Unicode code point, so Chinese, emoji parts and combining marks alike) in order of first sight."""

    def __init__(self, chars: Iterable[str] = ()):
        self.itos: list[str] = list(SPECIAL_TOKENS)
        self.stoi: dict[str, int] = {}
        self.add(chars)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def chars(self) -> list[str]:
        return self.itos[N_SPECIAL:]

    def add(self, text: Iterable[str]) -> list[str]:
        """Add the characters of text not known yet; return them in order of first appearance."""
        new = [ch for ch in dict.fromkeys(text) if ch not in self.stoi]
        for ch in new:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {ch!r}")
            self.stoi[ch] = len(self.itos)
            self.itos.append(ch)
        return new

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, UNK) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] if i >= N_SPECIAL else "\ufffd" if i == UNK else "" for i in ids)

    def to_json(self) -> bytes:
        """The dynamic_vocab.json content: {"stoi": {token: id}} including the special tokens."""
        return json.dumps({"stoi": {tok: i for i, tok in enumerate(self.itos)}}, ensure_ascii=False, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "DynamicTokenizer":
        """Parse to_json's output; ValueError (one line) if it is truncated or not a vocabulary."""
        try:
            stoi = json.loads(data.decode("utf-8"))["stoi"]
            itos = sorted(stoi, key=stoi.get)
            ok = [stoi[tok] for tok in itos] == list(range(len(itos))) and itos[:N_SPECIAL] == SPECIAL_TOKENS
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a vocabulary file ({type(exc).__name__}: {exc})") from exc
        if not ok:
            raise ValueError("not a vocabulary file (ids are not 0..n-1 with <pad>, <unk> first)")
        return cls(itos[N_SPECIAL:])

# -----------------------------------------------------------------------------
# model


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x (B, H, T, hd) by the angles of cos/sin (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of positions 0..context-1 of every layer, (B, H, context, hd) per layer.
    A prefill writes positions 0..T-1; a one-token decode step writes one position and attends over all
    positions written so far."""

    def __init__(self, n_layer: int, context: int):
        self.context = context
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> None:
        B, H, T, hd = k.shape
        if (T > 1 and start_pos != 0) or start_pos + T > self.context:
            raise ValueError(f"KV cache: cannot write {T} positions at {start_pos} (prefill at 0, then one at a time)")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(B, H, self.context, hd)
            self.values[layer] = v.new_zeros(B, H, self.context, hd)
        self.keys[layer][:, :, start_pos:start_pos + T] = k
        self.values[layer][:, :, start_pos:start_pos + T] = v

    def read(self, layer: int, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :n_positions], self.values[layer][:, :, :n_positions]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings and an optional KV cache."""

    def __init__(self, config: TinyConfig, layer: int):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(self.layer, k, v, start_pos)
            if T == 1:  # decode: attend over everything cached, the new token included
                k, v = cache.read(self.layer, start_pos + 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TinyConfig, layer: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, 4 * config.d_model), nn.GELU(),
                                 nn.Linear(4 * config.d_model, config.d_model))

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, start_pos)
        return x + self.mlp(self.norm2(x))


NEW_ROW_NOISE = 0.01  # std of the noise added to the mean row for a new token


class TinyGPT(nn.Module):
    """Decoder-only transformer over a growing vocabulary, with the output head tied to the embedding."""

    def __init__(self, config: TinyConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one Parameter, (V, C)
        head_dim = config.d_model // config.n_head
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2 init; residual output projections scaled down by depth
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.weight.shape[0]

    def forward(self, idx, targets=None, cache: KVCache | None = None, start_pos: int = 0):
        """idx (B, T) at positions start_pos.. -> logits (B, T, V), and the loss if targets (B, T) are given."""
        T = idx.shape[1]
        angles = torch.arange(start_pos, start_pos + T, device=idx.device).float()[:, None] * self.inv_freq  # (T, hd/2)
        cos, sin = angles.cos(), angles.sin()
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, cache, start_pos)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        # PAD targets are ignored: the model never learns to emit padding
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)
        return logits, loss

    @torch.no_grad()
    def new_token_rows(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Rows (n, C) for new tokens: the mean row of the known characters plus small noise."""
        weight = self.tok_emb.weight
        known = weight[N_SPECIAL:].float()
        center = known.mean(0).cpu() if len(known) else torch.zeros(weight.shape[1])
        return center + NEW_ROW_NOISE * torch.randn(n, weight.shape[1], generator=generator)

    @torch.no_grad()
    def append_token_rows(self, rows: torch.Tensor) -> None:
        """Grow the tied embedding/head in place: the same Parameter object gets a larger .data, so
        optimizers holding it keep training it and the head stays tied."""
        weight = self.tok_emb.weight
        weight.data = torch.cat([weight.data, rows.to(weight)])  # (V + n, C)
        self.tok_emb.num_embeddings = self.lm_head.out_features = weight.shape[0]

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, sample: Callable[[torch.Tensor], int | None],
                 stop_id: int | None = None, use_cache: bool = True) -> list[int]:
        """Continue prompt by up to max_new_tokens ids drawn by sample(logits (V,)), stopping at stop_id
        or when sample returns None. With use_cache=False each token re-runs the last `context` tokens;
        with the cache both agree exactly until prompt and output fill the context (see the module notes)."""
        if not prompt:
            raise ValueError("generate needs a non-empty prompt")
        context, device = self.config.context, self.inv_freq.device
        tokens, out = prompt[-context:], []
        cache = KVCache(self.config.n_layer, context) if use_cache else None
        logits, _ = self(torch.tensor([tokens], device=device), cache=cache)  # prefill
        while len(out) < max_new_tokens:
            next_id = sample(logits[0, -1])
            if next_id is None or next_id == stop_id:
                break
            out.append(next_id)
            pos = len(tokens)  # position of next_id in the current cache
            tokens = (tokens + [next_id])[-context:]
            if not use_cache:
                logits, _ = self(torch.tensor([tokens], device=device))
            elif pos < context:
                logits, _ = self(torch.tensor([[next_id]], device=device), cache=cache, start_pos=pos)
            else:  # cache full: restart it from the last half of the window
                tokens = tokens[-(context // 2 or 1):]
                cache = KVCache(self.config.n_layer, context)
                logits, _ = self(torch.tensor([tokens], device=device), cache=cache)
        return out


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> int | None:
    """Draw a character id from logits (V,); PAD and UNK are never drawn.

    Safe fallback: NaN logits count as impossible, +inf ones as certain, and if no finite logit is left
    a character is drawn uniformly. None only when the vocabulary has no characters yet."""
    logits = logits.detach().float().cpu().clone()
    logits[:N_SPECIAL] = float("-inf")
    logits[logits.isnan()] = float("-inf")
    if logits.isposinf().any():
        logits = torch.where(logits.isposinf(), 0.0, float("-inf"))
    if not logits.isfinite().any():
        if len(logits) <= N_SPECIAL:
            return None
        return int(torch.randint(N_SPECIAL, len(logits), (1,), generator=generator))
    return int(sample_next(logits, temperature, top_k, top_p, generator=generator))


class EMA:
    """Exponential moving average of the weights, kept as a second TinyGPT that generation uses.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so the first steps are not drowned
    by the random initialisation."""

    def __init__(self, model: TinyGPT):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: TinyGPT, step: int, decay: float) -> None:
        decay = min(decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)


def grow_adam_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """After param grew along dim 0, give its Adam moments zero rows for the new entries."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state and state[key].shape[0] < param.shape[0]:
            old = state[key]
            state[key] = torch.cat([old, old.new_zeros(param.shape[0] - old.shape[0], *old.shape[1:])])


def build_training_state(config: TinyConfig, vocab_size: int, device: torch.device):
    """A fresh (model, EMA, AdamW); weight decay on matrices only (embedding/head and linear weights)."""
    torch.manual_seed(config.seed)
    model = TinyGPT(config, vocab_size).to(device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    return model, EMA(model), optimizer

# -----------------------------------------------------------------------------
# data: the persistent replay memory

RECENT_CACHE_BYTES = 500_000  # in-memory cache of the newest history
RECENT_FRACTION = 0.2  # share of batch rows drawn from that cache


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))


class PersistentReplayText:
    """Append-only UTF-8 history on disk, of unlimited size, plus a cache of its last ~500 KB.

    append() writes, flushes and fsyncs before returning, so text is on disk before any training on it.
    Batches read windows by random access, so memory use is bounded by the cache and one batch."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = RECENT_CACHE_BYTES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self.writer = open(self.path, "ab")
        self.reader = open(self.path, "rb")
        self.size = os.path.getsize(self.path)
        self.recent = self._read_file(max(0, self.size - cache_bytes), cache_bytes)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        self.writer.write(data)
        self.writer.flush()
        os.fsync(self.writer.fileno())
        self.size += len(data)
        self.recent = (self.recent + data)[-self.cache_bytes:]

    def recent_text(self) -> str:
        return self.recent.decode("utf-8", errors="ignore")

    def iter_text(self, chunk_bytes: int = 1 << 20) -> Iterable[str]:
        """The whole history as text, streamed in chunks (for rebuilding a lost vocabulary)."""
        with open(self.path, encoding="utf-8", errors="ignore") as f:
            yield from iter(lambda: f.read(chunk_bytes), "")

    def _read_file(self, start: int, n: int) -> bytes:
        self.reader.seek(start)
        return self.reader.read(n)

    def _read_recent(self, start: int, n: int) -> bytes:
        return self.recent[start:start + n]

    def sample_window(self, n_chars: int, recent: bool, generator: torch.Generator, newest: bool = False) -> str:
        """n_chars consecutive characters from the cache or the whole file (fewer only if that source is
        shorter). The window's end byte is drawn uniformly and clamped at the end of the source, so every
        byte, the newest included, is covered about equally often; newest=True takes the last window."""
        read, size = (self._read_recent, len(self.recent)) if recent else (self._read_file, self.size)
        span = 4 * n_chars + 6  # enough bytes for n_chars characters plus the cut ones at both edges
        end = size if newest else min(size, n_chars + _randint(max(1, size), generator))
        start = max(0, end - span)
        text = read(start, end - start).decode("utf-8", errors="ignore")  # drops partial characters at the edges
        if len(text) < n_chars:  # a window ending near the start of the file: the first n_chars instead
            return read(0, span).decode("utf-8", errors="ignore")[:n_chars]
        return text[-n_chars:]

    def sample_batch(self, tokenizer: DynamicTokenizer, batch_size: int, n_tokens: int,
                     generator: torch.Generator) -> torch.Tensor:
        """Token ids (batch_size, n_tokens), PAD-filled only where the history is shorter than a window.
        Row 0 is the newest window (the line just typed is learned at once); each other row comes from the
        recent cache with probability RECENT_FRACTION, else from anywhere in the history."""
        rows = torch.full((batch_size, n_tokens), PAD, dtype=torch.long)
        from_recent = torch.rand(batch_size, generator=generator) < RECENT_FRACTION
        for b in range(batch_size):
            ids = tokenizer.encode(self.sample_window(n_tokens, bool(from_recent[b]), generator, newest=b == 0))
            rows[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows


def scan_text_file(path: str | os.PathLike) -> tuple[int, int]:
    """(lines, characters) of a UTF-8 text file, read in chunks; ValueError if it looks binary."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = chars = 0
    last = "\n"
    with open(path, encoding="utf-8") as f:
        try:
            for chunk in iter(lambda: f.read(1 << 20), ""):
                if "\x00" in chunk:
                    raise ValueError(f"{path}: contains NUL bytes, looks like a binary file")
                lines, chars, last = lines + chunk.count("\n"), chars + len(chunk), chunk[-1]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (binary file?): {exc.reason}") from exc
    return lines + (last != "\n"), chars

# -----------------------------------------------------------------------------
# online training


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a polite kill (e.g. a shutdown): both autosave


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_sigint():
    """While the block runs, Ctrl-C (or SIGTERM) only sets a flag, checked between steps, so no step is cut in
    half; outside such blocks both raise KeyboardInterrupt (see main)."""
    hits = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = [signal.signal(s, lambda *_: hits.append(1)) for s in STOP_SIGNALS]
    try:
        yield lambda: bool(hits)
    finally:
        for s, handler in zip(STOP_SIGNALS, previous):
            signal.signal(s, handler)


class OnlineLearner:
    """Tokenizer, model, EMA, optimizer and replay memory of one data directory, and what the REPL does with them."""

    def __init__(self, config: TinyConfig, data_dir: str | os.PathLike, device: torch.device | str = "cpu"):
        config.check()
        self.config, self.device = config, torch.device(device)
        self.data_dir = Path(data_dir)
        self.checkpoint_path = self.data_dir / "model_checkpoint.pt"
        self.previous_path = self.data_dir / "model_checkpoint.prev.pt"   # the autosave before the last
        self.vocab_path = self.data_dir / "dynamic_vocab.json"
        self.replay = PersistentReplayText(self.data_dir / "training_data.bin")
        self.tokenizer = DynamicTokenizer()
        self.model, self.ema, self.optimizer = build_training_state(config, len(self.tokenizer), self.device)
        self.step = 0
        self.saved_step = 0  # step of the last save (or load); autosave_every counts from it
        self.data_rng = torch.Generator().manual_seed(config.seed)  # batches and new embedding rows
        self.gen_rng = torch.Generator().manual_seed(config.seed + 1)  # generation only

    # --- vocabulary -----------------------------------------------------------------

    def add_text(self, text: Iterable[str]) -> list[str]:
        """Grow the vocabulary, model, EMA and Adam state with the new characters of text."""
        new = self.tokenizer.add(text)
        if new:
            rows = self.model.new_token_rows(len(new), self.data_rng)
            self.model.append_token_rows(rows)
            self.ema.model.append_token_rows(rows)
            grow_adam_state(self.optimizer, self.model.tok_emb.weight)
            atomic_write_bytes(self.tokenizer.to_json(), self.vocab_path)
        return new

    def resume(self, overrides: dict | None = None) -> list[str]:
        """Pick up where this data directory stopped; return messages for the user.

        The autosaved checkpoint (or, if it is unreadable, the one before it, model_checkpoint.prev.pt) brings
        model, optimizer, EMA, step, RNGs and vocabulary; characters
        that dynamic_vocab.json recorded after it (e.g. before a SIGKILL) are added. If the vocabulary
        file is unreadable it is kept aside and the characters are recovered from the history itself.
        overrides are command-line settings, applied after the checkpoint's (model shape excepted)."""
        messages, vocab = [], None
        if self.vocab_path.exists():  # read before load() rewrites it
            try:
                vocab = DynamicTokenizer.from_json(self.vocab_path.read_bytes())
            except ValueError as exc:
                aside = self.vocab_path.with_name(f"{self.vocab_path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.vocab_path, aside)
                messages.append(f"error: {self.vocab_path}: {exc}; kept it as {aside.name}, "
                                "rebuilding the vocabulary from the checkpoint and the history")
        resumed = None
        for path in (self.checkpoint_path, self.previous_path):   # the newest readable one
            if not path.exists():
                continue
            try:
                self.load(path)
                resumed = path
                break
            except ValueError as exc:
                aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(path, aside)
                messages.append(f"error: {exc}; moved it to {aside.name}")
        else:
            if messages and messages[-1].startswith("error: ") and "moved it to" in messages[-1]:
                messages.append("no readable checkpoint left: started a new model")
        if vocab is not None:
            self.add_text(vocab.chars)
            self.add_text(self.replay.recent_text())
        else:
            for chunk in self.replay.iter_text():
                self.add_text(chunk)
        atomic_write_bytes(self.tokenizer.to_json(), self.vocab_path)
        if resumed is not None:                         # counted after the characters recorded since it
            messages.append(f"resumed {resumed} (step {self.step}, {len(self.tokenizer)} tokens)")
        for name, value in (overrides or {}).items():
            if name in ARCH_FIELDS and value != getattr(self.config, name):
                messages.append(f"note: the saved model has {name}={getattr(self.config, name)}; "
                                f"--{name.replace('_', '-')} {value} ignored")
        runtime = {k: v for k, v in (overrides or {}).items() if k not in ARCH_FIELDS}
        self.set_config(**runtime)
        return messages

    def set_config(self, **changes) -> None:
        """Change settings (validated first; on ValueError nothing changes). Model shape cannot change."""
        config = dataclasses.replace(self.config, **changes)
        config.check()
        self.config = config

    # --- training -------------------------------------------------------------------

    def current_lr(self) -> float:
        """Cosine with warmup over cycles of lr_cycle_steps that restart (an online learner never finishes)."""
        cfg = self.config
        return cosine_lr(self.step % cfg.lr_cycle_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         total_steps=cfg.lr_cycle_steps, min_lr=cfg.min_lr)

    def train_step(self) -> float:
        """One AdamW step on a replay batch; returns the loss (a non-finite loss skips the update)."""
        cfg = self.config
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
        batch = self.replay.sample_batch(self.tokenizer, cfg.batch_size, cfg.context + 1, self.data_rng)
        batch = batch.to(self.device)
        with bf16_autocast(self.device):
            _, loss = self.model(batch[:, :-1], batch[:, 1:])  # (B, T) inputs predict the next characters
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return loss_value
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # an overflowed gradient would turn every weight into NaN
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.model, self.step, cfg.ema_decay)
        return loss_value

    def train_pulse(self, steps: int, progress: bool = False) -> float | None:
        """steps training steps; mean loss, or None if there is nothing to train on.
        Ctrl-C stops after the current step and is passed on as KeyboardInterrupt."""
        if self.replay.size == 0 or steps == 0:
            return None
        losses = []
        with deferred_sigint() as interrupted:
            for _ in tqdm(range(steps), desc="training", unit="step", disable=None if progress else True, leave=False):
                if interrupted():
                    break
                loss = self.train_step()
                if math.isfinite(loss):
                    losses.append(loss)
                if self.config.autosave_every and self.step - self.saved_step >= self.config.autosave_every:
                    self.save()
        if interrupted():
            raise KeyboardInterrupt
        return sum(losses) / len(losses) if losses else float("nan")

    def learn_line(self, text: str) -> float | None:
        """Store one line of user text (on disk before training), then run a training pulse."""
        with deferred_sigint() as interrupted:  # Ctrl-C here must not lose the line: store it first
            self.add_text(text + "\n")
            self.replay.append(text + "\n")
        if interrupted():
            raise KeyboardInterrupt
        return self.train_pulse(self.config.steps)

    def learn_file(self, path: str | os.PathLike) -> float | None:
        """/train: append all of a text file to the history, then train about one pass over it in one pulse."""
        _, n_chars = scan_text_file(path)
        last = "\n"
        with open(path, encoding="utf-8") as f:
            for chunk in iter(lambda: f.read(1 << 20), ""):
                self.add_text(chunk)
                self.replay.append(chunk)
                last = chunk[-1]
        if last != "\n":
            self.add_text("\n")
            self.replay.append("\n")
        cfg = self.config
        return self.train_pulse(max(cfg.steps, math.ceil(n_chars / (cfg.batch_size * cfg.context))), progress=True)

    # --- generation -----------------------------------------------------------------

    def generate(self, prefix: str = "", use_cache: bool = True, **settings) -> str:
        """A line starting with prefix, from the EMA weights; settings override temperature/top_k/top_p/gen_tokens.
        The prompt starts with a newline, which is what precedes every line of the history."""
        cfg = dataclasses.replace(self.config, **settings)
        sample = lambda logits: sample_token(logits, cfg.temperature, cfg.top_k, cfg.top_p, self.gen_rng)
        with bf16_autocast(self.device):
            ids = self.ema.model.generate(self.tokenizer.encode("\n" + prefix), cfg.gen_tokens, sample,
                                          stop_id=self.tokenizer.stoi.get("\n"), use_cache=use_cache)
        return prefix + self.tokenizer.decode(ids)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write model, EMA, optimizer, step (the LR schedule's state), RNGs, settings and
        vocabulary; also rewrite dynamic_vocab.json."""
        path = Path(path or self.checkpoint_path)
        if path == self.checkpoint_path and path.exists():
            # keep the last good one: a kill between the two renames leaves the previous file, never none
            os.replace(path, self.previous_path)
        atomic_save({"config": dataclasses.asdict(self.config), "vocab": self.tokenizer.chars,
                     "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "step": self.step,
                     "data_rng": self.data_rng.get_state(), "gen_rng": self.gen_rng.get_state()}, path)
        atomic_write_bytes(self.tokenizer.to_json(), self.vocab_path)
        if path == self.checkpoint_path:  # a copy elsewhere (/save FILE) does not reset the autosave count
            self.saved_step = self.step
        return path

    def load(self, path: str | os.PathLike | None = None) -> None:
        """Replace the whole state by a checkpoint's, whose vocabulary may differ from the current one;
        characters known now but not to the checkpoint are then added so the history stays learnable.
        On a missing, corrupt or foreign file: ValueError / FileNotFoundError and nothing changes."""
        path = Path(path or self.checkpoint_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # foreign configs: the checks below give the message
            ckpt, config = load_checkpoint(path, TinyConfig)
        try:
            config.check()
            tokenizer = DynamicTokenizer(ckpt["vocab"])
            model, ema, optimizer = build_training_state(config, len(tokenizer), self.device)
            model.load_state_dict(ckpt["model"])
            ema.model.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            for p in model.parameters():
                if "exp_avg" in optimizer.state.get(p, {}) and optimizer.state[p]["exp_avg"].shape != p.shape:
                    raise ValueError("optimizer state does not match the model")
            step = int(ckpt["step"])
            data_rng, gen_rng = torch.Generator(), torch.Generator()
            data_rng.set_state(ckpt["data_rng"])
            gen_rng.set_state(ckpt["gen_rng"])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ValueError(f"{path}: not a usable TinyGPT checkpoint ({type(exc).__name__}: {detail})") from exc
        previous_chars = self.tokenizer.chars
        self.config, self.tokenizer, self.step, self.saved_step = config, tokenizer, step, step
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.data_rng, self.gen_rng = data_rng, gen_rng
        self.add_text(previous_chars)
        atomic_write_bytes(self.tokenizer.to_json(), self.vocab_path)

    def stats(self) -> str:
        cfg = self.config
        n_params = sum(p.numel() for p in self.model.parameters())
        lr = self.current_lr()
        return "\n".join([
            f"history: {self.replay.size:,} bytes in {self.replay.path} ({len(self.replay.recent):,} cached)",
            f"vocabulary: {len(self.tokenizer)} tokens ({len(self.tokenizer) - N_SPECIAL} characters + PAD, UNK)",
            f"model: {n_params:,} parameters, context {cfg.context}, d_model {cfg.d_model}, "
            f"{cfg.n_head} heads, {cfg.n_layer} layers, on {self.device}",
            f"training: {self.step} steps, learning rate now {lr:.2e}",
            f"settings: temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, steps {cfg.steps}",
        ])

# -----------------------------------------------------------------------------
# the REPL

HELP = """\
commands:
  TEXT               learn a line: stored on disk, then a training pulse and a sample
  /load_txt FILE     learn FILE line by line (a pulse per line, a sample every --sample-every lines)
  /train FILE        append all of FILE to the history, then train about one pass over it
  /gen [PREFIX]      generate a line starting with PREFIX
  /temp=X /topk=N /topp=X /steps=N   temperature (0 = greedy), top-k, top-p, steps per pulse
  /save [FILE]       save a checkpoint (default DATA_DIR/model_checkpoint.pt)
  /load [FILE]       load a checkpoint (its vocabulary and settings come with it)
  /stats             history, vocabulary, model and settings
  /help              this text
  /quit              save and exit (EOF and Ctrl-C save too)"""

SETTINGS = {"/temp": ("temperature", float), "/topp": ("top_p", float), "/topk": ("top_k", int), "/steps": ("steps", int)}


def pulse_report(learner: OnlineLearner, loss: float | None) -> str:
    if loss is None:
        return "stored (no training: " + ("the history is empty)" if learner.replay.size == 0 else "--steps is 0)")
    return f"step {learner.step} | loss {loss:.3f} | sample: {learner.generate()}"


def load_txt(learner: OnlineLearner, path: str) -> None:
    """Learn a text file line by line with a progress bar, printing a sample every sample_every lines."""
    n_lines, _ = scan_text_file(path)
    every = learner.config.sample_every
    with open(path, encoding="utf-8") as f, tqdm(total=n_lines, unit="line", disable=None) as bar:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                loss = learner.learn_line(line)
                if every and i % every == 0:
                    bar.write(f"[{i}/{n_lines}] {pulse_report(learner, loss)}")
            bar.update()                                # after the line has trained: 100% means done
    print(f"learned {path}: {n_lines} lines, step {learner.step}, {len(learner.tokenizer)} tokens")


def handle_line(learner: OnlineLearner, line: str) -> bool:
    """Run one REPL line; False means quit. Bad input raises ValueError/OSError with the message."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return True
    if not line.startswith("/"):
        print(pulse_report(learner, learner.learn_line(line)))
        return True
    command, _, raw_arg = line.partition(" ")
    command, equals, value = command.partition("=")
    arg = raw_arg.strip()
    if equals and command not in SETTINGS:
        command += "="
    if command in SETTINGS:
        name, kind = SETTINGS[command]
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{command}= needs {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        learner.set_config(**{name: number})
        print(f"{name} = {number}")
    elif command in ("/load_txt", "/train"):
        if not arg:
            raise ValueError(f"usage: {command} FILE")
        if command == "/load_txt":
            load_txt(learner, arg)
        else:
            print(pulse_report(learner, learner.learn_file(arg)))
    elif command == "/gen":
        # the prefix is kept as typed: trailing spaces matter to a character model
        print(learner.generate(raw_arg) if len(learner.tokenizer) > N_SPECIAL else "(nothing learned yet)")
    elif command == "/save":
        print(f"saved {learner.save(arg or None)} (step {learner.step})")
    elif command == "/load":
        learner.load(arg or None)
        print(f"loaded {arg or learner.checkpoint_path} (step {learner.step}, {len(learner.tokenizer)} tokens)")
    elif command == "/stats":
        print(learner.stats())
    elif command == "/help":
        print(HELP)
    elif command == "/quit":
        return False
    else:
        raise ValueError(f"unknown command {command!r} (type /help)")
    return True


def run_repl(learner: OnlineLearner, interactive: bool) -> None:
    """Read lines until /quit, EOF or Ctrl-C, then autosave. Without a terminal there is no prompt."""
    if interactive:
        print("TinyGPT learns from every line you type. /help lists the commands.")
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            try:
                if not handle_line(learner, line):
                    break
            except (ValueError, OSError) as exc:
                print(f"error: {exc}")
            except Exception as exc:  # anything else (e.g. out of memory): report it, keep the session
                print(f"error: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        print(f"saved {learner.save()} (step {learner.step})")

def lock_data_dir(data_dir: str | os.PathLike):
    """Hold an exclusive lock on DATA_DIR/.lock while this process lives, so two sessions cannot interleave
    the history or overwrite each other's checkpoint. Returns the open lock file (None where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:
        return None
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    lock = open(Path(data_dir) / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OSError(f"{data_dir}: another tiny_llm_demo.py is using this data directory") from None
    return lock


def remove_stale_temp_files(data_dir: str | os.PathLike) -> str | None:
    """Delete the temp files of saves a killed process never finished (.NAME.*.tmp, from atomic writes).
    Only safe under the lock: then no save of ours is in flight. Returns a line for the user, or None."""
    stale = [p for p in Path(data_dir).glob(".*.tmp") if p.is_file()]
    size = sum(p.stat().st_size for p in stale)
    for p in stale:
        p.unlink()
    return f"removed {len(stale)} temp file(s) ({size / 2**20:.1f} MB) left by an interrupted save" if stale else None

# -----------------------------------------------------------------------------
# benchmark


def run_bench(config: TinyConfig, device: torch.device) -> None:
    """Measure, in one run: training step time, generation speed with and without KV cache, and replay
    sampling time on a 1 MB versus a 200 MB history."""
    def seconds_per_call(fn, n):
        return sum(time_calls(fn, device, n)) / n

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + " .,;:!?'-()" + "你好世界"
    lines = ["".join(rng.choices(alphabet, k=rng.randint(20, 120))) for _ in range(14_000)]
    text = "\n".join(lines) + "\n"  # ~1 MB
    print(f"benchmark on {device} ({torch.get_num_threads()} CPU threads): context {config.context}, d_model {config.d_model}, {config.n_head} heads, "
          f"{config.n_layer} layers, batch {config.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        learner = OnlineLearner(config, Path(tmp) / "small", device)
        learner.add_text(text)
        learner.replay.append(text)
        step_s = seconds_per_call(learner.train_step, 5)
        print(f"training step:                 {1000 * step_s:9.1f} ms")

        # prompt + output exactly fill the context, so both ways must give the same tokens
        prompt = learner.tokenizer.encode(text[:min(64, config.context // 2)])
        n_new = config.context - len(prompt)
        greedy = lambda logits: sample_token(logits, 0.0, 0, 1.0, None)
        outputs, speed = {}, {}
        for use_cache in (True, False):
            def run():
                with learner.autocast():
                    outputs[use_cache] = learner.ema.model.generate(prompt, n_new, greedy, use_cache=use_cache)
            speed[use_cache] = n_new / seconds_per_call(run, 1)
        print(f"generation with KV cache:      {speed[True]:9.1f} tokens/s")
        print(f"generation without KV cache:   {speed[False]:9.1f} tokens/s   (speedup {speed[True] / speed[False]:.1f}x,"
              f" {n_new} tokens after a {len(prompt)}-token prompt, same tokens: {outputs[True] == outputs[False]})")

        big_path = Path(tmp) / "big" / "training_data.bin"
        big_path.parent.mkdir()
        block = text.encode()
        with open(big_path, "wb") as f:
            for _ in range(200 * 2**20 // len(block) + 1):
                f.write(block)
        timings = {}
        for name, replay in (("small", learner.replay), ("large", PersistentReplayText(big_path))):
            sample = lambda: replay.sample_batch(learner.tokenizer, config.batch_size, config.context + 1, learner.data_rng)
            timings[name] = (replay.size, seconds_per_call(sample, 200))
        for name, (size, seconds) in timings.items():
            print(f"replay batch, {size / 2**20:6.1f} MB history: {1000 * seconds:9.2f} ms")
        print(f"replay large / small:          {timings['large'][1] / timings['small'][1]:9.2f}x")

# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="TinyGPT: a character-level language model that learns online from a REPL. "
                    "Reads commands from stdin (no prompt when it is not a terminal); EOF, /quit and Ctrl-C save.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="training_data",
                        help="where the history, vocabulary and autosaved checkpoint live (default: training_data)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 keeps torch's default (use 1 on a busy machine)")
    parser.add_argument("--load-txt", metavar="FILE", help="learn FILE line by line, save, and exit")
    parser.add_argument("--bench", action="store_true", help="print timings of training, generation and replay, then exit")
    add_config_flags(parser, TinyConfig)            # only flags actually given override a resumed checkpoint
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = given_flags(args, TinyConfig)
    try:
        config = TinyConfig(**overrides)
        config.check()
        device = pick_device(args.device)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench:
        run_bench(config, device)
        return 0
    for stream in (sys.stdin, sys.stdout):
        if stream is not None:  # undecodable bytes in input or a narrow terminal must not crash the REPL
            stream.reconfigure(encoding="utf-8", errors="replace")
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # a polite kill autosaves, like Ctrl-C
    try:
        lock = lock_data_dir(args.data_dir)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if lock is not None and (note := remove_stale_temp_files(args.data_dir)):
        print(note)
    try:
        return run_session(config, args, overrides, device)
    finally:
        if lock is not None:
            lock.close()


def run_session(config: TinyConfig, args: argparse.Namespace, overrides: dict, device: torch.device) -> int:
    """Resume the data directory, then the REPL or --load-txt; always autosaves. Returns the exit status."""
    try:
        learner = OnlineLearner(config, args.data_dir, device)
        for message in learner.resume(overrides):
            print(message)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.load_txt is None:
        run_repl(learner, interactive=sys.stdin is not None and sys.stdin.isatty())
        return 0
    status = 0
    try:
        load_txt(learner, args.load_txt)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\ninterrupted")
    except Exception as exc:  # e.g. out of memory: one line, and what was learned is still saved
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        print(f"saved {learner.save()} (step {learner.step})")
    return status


if __name__ == "__main__":
    sys.exit(main())
