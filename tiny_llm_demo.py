"""
TinyGPT: a character-level language model that learns online from what you type.

    python tiny_llm_demo.py                          # interactive REPL, state kept in ./training_data/
    python tiny_llm_demo.py --load-txt book.txt      # learn a file line by line, save, exit
    printf 'hello\\n/gen he\\n' | python tiny_llm_demo.py   # commands from a pipe: no prompt, EOF saves
    python tiny_llm_demo.py --bench                  # step time, KV-cache speedup, replay sampling cost

Every line you type is appended to <data-dir>/training_data.bin (fsynced before any training on it)
and triggers a training pulse: 14 AdamW steps (about 3 s on 2 CPU cores at the default size, with a
progress line on a terminal) on batches of 4 windows replayed from the whole history. The
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
  characters cut at the edges. Row 0 of every batch of a pulse is the window that ends with the line
  being learned (lines typed ahead of it may already follow in the file); of the other rows about 20%
  come from an in-memory cache of the last 500 KB, the rest from the whole file, so memory use does not
  depend on the history size. Windows are always real text; padding only appears while the whole history
  is shorter than a window, and PAD targets are ignored.
- The learning rate follows a cosine with warmup over cycles of --lr-cycle-steps steps that restart
  (an online learner never finishes); the global step is the scheduler state kept in checkpoints.
- Generation uses the EMA weights and a KV cache: the prompt is prefilled, then each token costs one
  single-position forward. When the cache holds `context` positions, a fresh cache is prefilled with
  the last context/2 tokens at positions 0.. (a window that starts from scratch, like a training
  window); this costs about one extra token's work per generated token, so the cost per token does
  not grow with the prefix. (Sliding a ring buffer instead would not equal the model on a cropped
  window: in layers above the first, cached keys were computed with context older than the window.)
- Ctrl-C during training ends the pulse after its current step, saves, and returns to the prompt; Ctrl-C at
  the prompt (or twice), SIGTERM, /quit and EOF save and exit. Training also autosaves every --autosave-every
  steps, and each autosave keeps the one before it (model_checkpoint.prev.pt), so a kill at any moment leaves
  a whole checkpoint; a damaged one is set aside (*.corrupt-*) and the previous one loads. With neither, a new
  model is trained on the history (at most --recover-steps steps). A lock on DATA_DIR/.lock keeps a second
  session out of the same directory, and temp files of saves a killed session never finished are removed.
- Input is read on a thread: a line typed (or piped) while a pulse runs is appended to the history at once and
  learned in its turn, so after a SIGKILL every line that reached the program is on disk. The restart loads the
  last checkpoint (at most --autosave-every steps old), grows it with the characters recorded since, and
  replays the whole history.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import io
import queue
import random
import signal
import statistics
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

from common import (add_config_flags, atomic_save, atomic_write, atomic_write_bytes, bf16_autocast, cosine_lr,
                    given_flags, load_checkpoint, pick_device, sample_next, time_calls)

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
    steps: int = field(default=14, metadata={
        "help": "optimizer steps per training pulse (REPL: /steps=N); 14 x batch 4 is about 3 s on 2 CPU cores"})
    batch_size: int = field(default=4, metadata={"help": "windows per training batch"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of each cosine cycle"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of each cosine cycle"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps at the start of each cycle"})
    lr_cycle_steps: int = field(default=1000, metadata={"help": "length of a cosine cycle; cycles restart"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "maximum gradient norm"})
    autosave_every: int = field(default=200, metadata={
        "help": "also autosave every N training steps, so a crash or SIGKILL loses at most N (0: on exit only)"})
    recover_steps: int = field(default=300, metadata={
        "help": "with a history but no readable checkpoint, train a new model on it for at most N steps at start"})
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
                     "sample_every", "recover_steps"):
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


# -----------------------------------------------------------------------------
# data: the persistent replay memory

RECENT_CACHE_BYTES = 500_000  # in-memory cache of the newest history
RECENT_FRACTION = 0.2  # share of batch rows drawn from that cache


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))


class PersistentReplayText:
    """Append-only UTF-8 history on disk, of unlimited size, plus a cache of its last ~500 KB.

    append() writes, flushes and fsyncs before returning, so text is on disk before any training on it; it
    may run on another thread than sampling (the REPL's line reader), hence the lock. Batches read windows
    by random access, so memory use is bounded by the cache and one batch."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = RECENT_CACHE_BYTES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self.lock = threading.Lock()
        self.writer = open(self.path, "ab")
        self.reader = open(self.path, "rb")
        self.size = os.path.getsize(self.path)
        self.recent = self._read_file(max(0, self.size - cache_bytes), cache_bytes)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()

    def append(self, text: str) -> int:
        """Store text durably; returns the history's size after it, i.e. where text ends."""
        data = text.encode("utf-8")
        with self.lock:
            self.writer.write(data)
            self.writer.flush()
            os.fsync(self.writer.fileno())
            self.recent = (self.recent + data)[-self.cache_bytes:]
            self.size += len(data)
            return self.size

    def recent_text(self) -> str:
        return self.recent.decode("utf-8", errors="ignore")

    def iter_text(self, chunk_bytes: int = 1 << 20) -> Iterable[str]:
        """The whole history as text, streamed in chunks (for rebuilding a lost vocabulary)."""
        with open(self.path, encoding="utf-8", errors="ignore") as f:
            yield from iter(lambda: f.read(chunk_bytes), "")

    def _read_file(self, start: int, n: int) -> bytes:
        self.reader.seek(start)
        return self.reader.read(n)

    @staticmethod
    def sample_window(read: Callable[[int, int], bytes], size: int, n_chars: int, generator: torch.Generator,
                      end: int | None = None) -> str:
        """n_chars consecutive characters of a source of `size` bytes read by read(start, n) (fewer only if
        it is shorter). The window's end byte is drawn uniformly and clamped at the end of the source, so
        every byte, the newest included, is covered about equally often; `end` fixes it instead."""
        span = 4 * n_chars + 6  # enough bytes for n_chars characters plus the cut ones at both edges
        end = min(size, n_chars + _randint(max(1, size), generator)) if end is None else end
        start = max(0, end - span)
        text = read(start, end - start).decode("utf-8", errors="ignore")  # drops partial characters at the edges
        if len(text) < n_chars:  # a window ending near the start of the file: the first n_chars instead
            return read(0, span).decode("utf-8", errors="ignore")[:n_chars]
        return text[-n_chars:]

    def sample_batch(self, tokenizer: DynamicTokenizer, batch_size: int, n_tokens: int,
                     generator: torch.Generator, first_end: int | None = None) -> torch.Tensor:
        """Token ids (batch_size, n_tokens), PAD-filled only where the history is shorter than a window.
        Row 0 is the window ending at byte first_end (default: the newest), so the line just typed is learned
        at once; each other row comes from the recent cache with probability RECENT_FRACTION, else from
        anywhere in the history."""
        with self.lock:  # a consistent view while the line reader may append
            size, recent = self.size, self.recent
        sources = {False: (self._read_file, size), True: (lambda start, n: recent[start:start + n], len(recent))}
        rows = torch.full((batch_size, n_tokens), PAD, dtype=torch.long)
        from_recent = torch.rand(batch_size, generator=generator) < RECENT_FRACTION
        for b in range(batch_size):
            read, n_bytes = sources[bool(from_recent[b]) and b > 0]
            end = (size if first_end is None else first_end) if b == 0 else None
            ids = tokenizer.encode(self.sample_window(read, n_bytes, n_tokens, generator, end))
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
# training state and checkpoints


@dataclass
class TrainingState:
    """What a checkpoint holds: everything needed to continue exactly where a session stopped."""
    config: TinyConfig
    tokenizer: DynamicTokenizer
    model: TinyGPT
    ema: EMA
    optimizer: torch.optim.Optimizer
    data_rng: torch.Generator  # batches and new embedding rows
    gen_rng: torch.Generator  # generation only
    step: int = 0  # optimizer steps so far, also the learning-rate schedule's state

    @classmethod
    def fresh(cls, config: TinyConfig, tokenizer: DynamicTokenizer, device: torch.device) -> "TrainingState":
        """A new model; AdamW with weight decay on matrices only (embedding/head and linear weights)."""
        torch.manual_seed(config.seed)
        model = TinyGPT(config, len(tokenizer)).to(device)
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                       {"params": vectors, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
        return cls(config, tokenizer, model, EMA(model), optimizer,
                   torch.Generator().manual_seed(config.seed), torch.Generator().manual_seed(config.seed + 1))

    def add_chars(self, text: Iterable[str]) -> list[str]:
        """Grow the vocabulary, model, EMA and Adam state with the new characters of text; return them."""
        new = self.tokenizer.add(text)
        if new:
            rows = self.model.new_token_rows(len(new), self.data_rng)
            self.model.append_token_rows(rows)
            self.ema.model.append_token_rows(rows)
            grow_adam_state(self.optimizer, self.model.tok_emb.weight)
        return new

    def to_checkpoint(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "vocab": self.tokenizer.chars,
                "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "data_rng": self.data_rng.get_state(), "gen_rng": self.gen_rng.get_state()}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device) -> "TrainingState":
        """Read a checkpoint written from to_checkpoint; ValueError (one line) if it is damaged or foreign,
        FileNotFoundError if it is missing."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # foreign configs: the checks below give the message
            ckpt, config = load_checkpoint(path, TinyConfig)
        try:
            config.check()
            state = cls.fresh(config, DynamicTokenizer(ckpt["vocab"]), device)
            state.model.load_state_dict(ckpt["model"])
            state.ema.model.load_state_dict(ckpt["ema"])
            state.optimizer.load_state_dict(ckpt["optimizer"])
            for p in state.model.parameters():
                moments = state.optimizer.state.get(p, {})
                if "exp_avg" in moments and moments["exp_avg"].shape != p.shape:
                    raise ValueError("optimizer state does not match the model")
            state.step = int(ckpt["step"])
            state.data_rng.set_state(ckpt["data_rng"])
            state.gen_rng.set_state(ckpt["gen_rng"])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ValueError(f"{path}: not a usable TinyGPT checkpoint ({type(exc).__name__}: {detail})") from exc
        return state


def set_aside(path: Path, problem: str) -> str:
    """Rename a damaged file to NAME.corrupt-TIMESTAMP (kept for the user, never deleted); the line saying so."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return f"error: {problem}; kept it as {aside.name}"


class CheckpointStore:
    """The files of a data directory besides the history: model_checkpoint.pt, the one before it, the vocabulary.

    Each autosave first renames the current checkpoint to model_checkpoint.prev.pt, then writes the new one
    atomically (temp file + rename), so a kill at any moment leaves at least one whole checkpoint."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.checkpoint_path = self.data_dir / "model_checkpoint.pt"
        self.previous_path = self.data_dir / "model_checkpoint.prev.pt"
        self.vocab_path = self.data_dir / "dynamic_vocab.json"

    def save(self, state: TrainingState, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.checkpoint_path)
        if path == self.checkpoint_path and path.exists():
            os.replace(path, self.previous_path)
        atomic_save(state.to_checkpoint(), path)
        self.write_vocab(state.tokenizer)
        return path

    def write_vocab(self, tokenizer: DynamicTokenizer) -> None:
        atomic_write_bytes(tokenizer.to_json(), self.vocab_path)

    def read_vocab(self) -> tuple[DynamicTokenizer | None, list[str]]:
        """dynamic_vocab.json's vocabulary (None if missing or damaged; a damaged one is set aside), messages."""
        if not self.vocab_path.exists():
            return None, []
        try:
            return DynamicTokenizer.from_json(self.vocab_path.read_bytes()), []
        except ValueError as exc:
            return None, [set_aside(self.vocab_path, f"{self.vocab_path}: {exc}") + "; rebuilding the vocabulary "
                          "from the checkpoint and the history"]

    def newest_readable(self, device: torch.device) -> tuple[TrainingState | None, Path | None, list[str]]:
        """The state of the autosave, or of the one before it when the autosave is damaged; damaged files are
        set aside. Returns (state or None, its path, messages)."""
        messages = []
        for path in (self.checkpoint_path, self.previous_path):
            if path.exists():
                try:
                    return TrainingState.from_checkpoint(path, device), path, messages
                except ValueError as exc:
                    messages.append(set_aside(path, str(exc)))
        return None, None, messages

    def remove_stale_temp_files(self) -> str | None:
        """Delete the temp files of saves a killed process never finished (.NAME.*.tmp, from atomic writes).
        Only safe under the data directory's lock: then no save of ours is in flight. A line for the user, or None."""
        stale = [p for p in self.data_dir.glob(".*.tmp") if p.is_file()]
        size = sum(p.stat().st_size for p in stale)
        for p in stale:
            p.unlink()
        if not stale:
            return None
        return f"removed {len(stale)} temp file(s) ({size / 2**20:.1f} MB) left by an interrupted save"

# -----------------------------------------------------------------------------
# training


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM, once install()ed by main. Inside a `deferred()` block a signal is only
    recorded, and training checks between steps, so no step or save is cut in half; outside, both raise
    KeyboardInterrupt as usual. Without install() (as a library) Python's own Ctrl-C handling stays."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: list[int] = []
        self.depth = 0

    def install(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if not self.depth:
            raise KeyboardInterrupt
        self.received.append(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def take(self) -> list[int]:
        """The signals recorded since the last take(), then forgotten."""
        received, self.received = self.received, []
        return received


STOPS = StopSignals()


@dataclass
class PulseResult:
    """What a training pulse did."""
    steps: int  # steps taken
    planned: int  # steps asked for
    loss: float | None  # mean finite loss of those steps; None if nothing was trained
    seconds: float
    stopped: bool = False  # Ctrl-C ended it early (the state was saved)


def current_lr(state: TrainingState) -> float:
    """Cosine with warmup over cycles of lr_cycle_steps that restart (an online learner never finishes)."""
    cfg = state.config
    return cosine_lr(state.step % cfg.lr_cycle_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     total_steps=cfg.lr_cycle_steps, min_lr=cfg.min_lr)


def train_step(state: TrainingState, replay: PersistentReplayText, first_end: int | None = None) -> float:
    """One AdamW step on a replay batch whose row 0 ends at byte first_end (default: the newest text);
    returns the loss. A non-finite loss or gradient skips the update."""
    cfg, device = state.config, state.model.inv_freq.device
    for group in state.optimizer.param_groups:
        group["lr"] = current_lr(state)
    state.optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    batch = replay.sample_batch(state.tokenizer, cfg.batch_size, cfg.context + 1, state.data_rng, first_end)
    batch = batch.to(device)
    with bf16_autocast(device):
        _, loss = state.model(batch[:, :-1], batch[:, 1:])  # (B, T) inputs predict the next characters
    state.optimizer.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    if not torch.isfinite(grad_norm):  # an overflowed gradient would turn every weight into NaN
        state.optimizer.zero_grad(set_to_none=True)
        return float("nan")
    state.optimizer.step()
    state.step += 1
    state.ema.update(state.model, state.step, cfg.ema_decay)
    return loss_value


def train_pulse(state: TrainingState, replay: PersistentReplayText, steps: int, first_end: int | None = None,
                on_step: Callable[[], None] = lambda: None) -> PulseResult:
    """Up to `steps` training steps with a progress line (steps, loss, elapsed time; on terminals only),
    ending early when a stop signal is recorded. on_step runs after each step (the autosave)."""
    start, losses, taken = time.perf_counter(), [], 0
    if replay.size and steps:
        with tqdm(total=steps, desc="training", unit="step", disable=None, leave=False) as bar:
            while taken < steps and not STOPS.received:
                loss = train_step(state, replay, first_end)
                taken += 1
                if math.isfinite(loss):
                    losses.append(loss)
                on_step()
                bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
                bar.update()
    mean = sum(losses) / len(losses) if losses else (float("nan") if taken else None)
    return PulseResult(taken, steps, mean, time.perf_counter() - start)

# -----------------------------------------------------------------------------
# the online learner


class OnlineLearner:
    """One data directory's history, checkpoints and training state, and what the REPL does with them."""

    def __init__(self, config: TinyConfig, data_dir: str | os.PathLike, device: torch.device | str = "cpu"):
        config.check()
        self.device = torch.device(device)
        self.store = CheckpointStore(data_dir)
        self.replay = PersistentReplayText(self.store.data_dir / "training_data.bin")
        self.state = TrainingState.fresh(config, DynamicTokenizer(), self.device)
        self.saved_step = 0  # step of the last autosave (or load); autosave_every counts from it

    @property
    def config(self) -> TinyConfig:
        return self.state.config

    def add_text(self, text: Iterable[str]) -> list[str]:
        """Grow the vocabulary (and the model with it) by the new characters of text; the file follows."""
        new = self.state.add_chars(text)
        if new:
            self.store.write_vocab(self.state.tokenizer)
        return new

    # --- resuming -------------------------------------------------------------------

    def resume(self, overrides: dict | None = None, say: Callable[[str], None] = print) -> None:
        """Pick up where this data directory stopped, telling the user through say().

        The autosave (or, if it is damaged, the one before it) brings model, optimizer, EMA, step, RNGs and
        vocabulary; characters that dynamic_vocab.json or the recent history recorded after it (e.g. before a
        SIGKILL) are added. With no readable checkpoint but a history, a new model is trained on the history
        for at most --recover-steps steps. overrides are command-line settings, applied after the checkpoint's
        (model shape excepted)."""
        vocab, messages = self.store.read_vocab()  # read before a load rewrites it
        state, path, damaged = self.store.newest_readable(self.device)
        for message in messages + damaged:
            say(message)
        if state is not None:
            self._adopt(state)
        if vocab is not None:
            self.add_text(vocab.chars)
            self.add_text(self.replay.recent_text())
        else:
            for chunk in self.replay.iter_text():
                self.add_text(chunk)
        self.store.write_vocab(self.state.tokenizer)
        if path is not None:  # counted after the characters recorded since it
            say(f"resumed {path} (step {self.state.step}, {len(self.state.tokenizer)} tokens)")
        for name, value in (overrides or {}).items():
            if name in ARCH_FIELDS and value != getattr(self.config, name):
                say(f"note: the saved model has {name}={getattr(self.config, name)}; "
                    f"--{name.replace('_', '-')} {value} ignored")
        self.set_config(**{k: v for k, v in (overrides or {}).items() if k not in ARCH_FIELDS})
        if path is None and self.replay.size:
            self._retrain(say, damaged)

    def _retrain(self, say: Callable[[str], None], damaged: list[str]) -> None:
        """No checkpoint to resume but a history: train a new model on it as its lines were learned, a pulse
        per line, for at most recover_steps steps."""
        cfg = self.config
        steps = min(cfg.recover_steps, cfg.steps * max(1, sum(chunk.count("\n") for chunk in self.replay.iter_text())))
        say(f"no {'readable ' if damaged else ''}checkpoint: training a new model on the "
            f"{self.replay.size:,}-byte history for {steps} steps (--recover-steps {cfg.recover_steps})")
        result = self.pulse(steps)
        loss = float("nan") if result.loss is None else result.loss
        say(f"{'stopped' if result.stopped else 'done'}: step {self.state.step}, loss {loss:.3f}, "
            f"{result.seconds:.1f} s")

    def set_config(self, **changes) -> None:
        """Change settings (validated first; on ValueError nothing changes). Model shape cannot change."""
        config = dataclasses.replace(self.config, **changes)
        config.check()
        self.state.config = config

    # --- training -------------------------------------------------------------------

    def pulse(self, steps: int, first_end: int | None = None) -> PulseResult:
        """A training pulse that autosaves every autosave_every steps. A Ctrl-C during it ends it early and
        saves; a SIGTERM or a second Ctrl-C also raise KeyboardInterrupt (the caller saves and exits)."""
        def autosave():
            if self.config.autosave_every and self.state.step - self.saved_step >= self.config.autosave_every:
                self.save()
        with STOPS.deferred():
            result = train_pulse(self.state, self.replay, steps, first_end, on_step=autosave)
            if STOPS.received:
                self.save()
            received = STOPS.take()  # a Ctrl-C during that save counts as the second
        if signal.SIGTERM in received or len(received) > 1:
            raise KeyboardInterrupt
        result.stopped = bool(received)
        return result

    def learn_line(self, text: str, stored_end: int | None = None) -> PulseResult:
        """Learn one line of user text: stored on disk first (unless the line reader did, ending at byte
        stored_end), then a pulse whose every batch holds it."""
        with STOPS.deferred():  # a Ctrl-C here must not lose the line: store it first
            if stored_end is None:
                stored_end = self.replay.append(text + "\n")
            self.add_text(text + "\n")
            return self.pulse(self.config.steps, stored_end)

    def learn_file(self, path: str | os.PathLike) -> PulseResult:
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
        return self.pulse(max(cfg.steps, math.ceil(n_chars / (cfg.batch_size * cfg.context))))

    # --- generation -----------------------------------------------------------------

    def generate(self, prefix: str = "", use_cache: bool = True, **settings) -> str:
        """A line starting with prefix, from the EMA weights; settings override temperature/top_k/top_p/gen_tokens.
        The prompt starts with a newline, which is what precedes every line of the history."""
        cfg, tokenizer = dataclasses.replace(self.config, **settings), self.state.tokenizer
        sample = lambda logits: sample_token(logits, cfg.temperature, cfg.top_k, cfg.top_p, self.state.gen_rng)
        with bf16_autocast(self.device):
            ids = self.state.ema.model.generate(tokenizer.encode("\n" + prefix), cfg.gen_tokens, sample,
                                                stop_id=tokenizer.stoi.get("\n"), use_cache=use_cache)
        return prefix + tokenizer.decode(ids)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write everything (atomically; the autosave keeps the one before it); also dynamic_vocab.json."""
        path = self.store.save(self.state, path)
        if path == self.store.checkpoint_path:  # a copy elsewhere (/save FILE) does not reset the autosave count
            self.saved_step = self.state.step
        return path

    def load(self, path: str | os.PathLike | None = None) -> None:
        """Replace the whole state by a checkpoint's, whose vocabulary may differ from the current one;
        characters known now but not to the checkpoint are then added so the history stays learnable.
        On a missing, corrupt or foreign file: FileNotFoundError / ValueError and nothing changes."""
        self._adopt(TrainingState.from_checkpoint(Path(path or self.store.checkpoint_path), self.device))
        self.store.write_vocab(self.state.tokenizer)

    def _adopt(self, state: TrainingState) -> None:
        previous_chars = self.state.tokenizer.chars
        self.state, self.saved_step = state, state.step
        self.state.add_chars(previous_chars)

    def stats(self) -> str:
        cfg, state = self.config, self.state
        n_params = sum(p.numel() for p in state.model.parameters())
        return "\n".join([
            f"history: {self.replay.size:,} bytes in {self.replay.path} ({len(self.replay.recent):,} cached)",
            f"vocabulary: {len(state.tokenizer)} tokens ({len(state.tokenizer) - N_SPECIAL} characters + PAD, UNK)",
            f"model: {n_params:,} parameters, context {cfg.context}, d_model {cfg.d_model}, "
            f"{cfg.n_head} heads, {cfg.n_layer} layers, on {self.device}",
            f"training: {state.step} steps, learning rate now {current_lr(state):.2e}",
            f"settings: temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, steps {cfg.steps}, "
            f"batch {cfg.batch_size}",
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
  /quit              save and exit (EOF saves too)
Ctrl-C during training ends the pulse and saves; at the prompt (or a second time) it saves and exits."""

SETTINGS = {"/temp": ("temperature", float), "/topp": ("top_p", float), "/topk": ("top_k", int),
            "/steps": ("steps", int)}


def is_text_line(line: str) -> bool:
    """A line to learn, as opposed to a command or a blank line."""
    return bool(line.strip()) and not line.startswith("/")


def error_line(exc: BaseException) -> str:
    """One line for the user: bad input (ValueError, OSError) by its message, anything else with its type."""
    return f"error: {exc}" if isinstance(exc, (ValueError, OSError)) else f"error: {type(exc).__name__}: {exc}"


def pulse_summary_and_sample(learner: OnlineLearner, result: PulseResult) -> str:
    """The line after a pulse: step, loss, steps taken and seconds, then a freshly generated sample line."""
    step = f"step {learner.state.step}"
    if result.stopped:
        return (f"{step} | stopped by Ctrl-C after {result.steps} of {result.planned} steps "
                f"({result.seconds:.1f} s), saved")
    if result.loss is None:
        return "stored (no training: " + ("the history is empty)" if learner.replay.size == 0 else "steps is 0)")
    return (f"{step} | loss {result.loss:.3f} | {result.steps} steps in {result.seconds:.1f} s "
            f"| sample: {learner.generate()}")


def load_txt(learner: OnlineLearner, path: str) -> None:
    """Learn a text file line by line with a progress bar, printing a sample every sample_every lines.
    A Ctrl-C ends it after the line in training (what was learned is saved)."""
    n_lines, _ = scan_text_file(path)
    every = learner.config.sample_every
    with open(path, encoding="utf-8") as f, tqdm(total=n_lines, unit="line", disable=None) as bar:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                result = learner.learn_line(line)
                if result.stopped or (every and i % every == 0):
                    bar.write(f"[{i}/{n_lines}] {pulse_summary_and_sample(learner, result)}")
                if result.stopped:
                    print(f"stopped {path} after line {i} of {n_lines}")
                    return
            bar.update()                                # after the line has trained: 100% means done
    print(f"learned {path}: {n_lines} lines, step {learner.state.step}, {len(learner.state.tokenizer)} tokens")


def handle_line(learner: OnlineLearner, line: str, stored_end: int | None = None) -> bool:
    """Run one REPL line; False means quit. Bad input raises ValueError/OSError with the message.
    stored_end: where the line reader already stored this text line in the history."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return True
    if is_text_line(line):
        print(pulse_summary_and_sample(learner, learner.learn_line(line, stored_end)))
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
            print(pulse_summary_and_sample(learner, learner.learn_file(arg)))
    elif command == "/gen":
        # the prefix is kept as typed: trailing spaces matter to a character model
        print(learner.generate(raw_arg) if len(learner.state.tokenizer) > N_SPECIAL else "(nothing learned yet)")
    elif command == "/save":
        print(f"saved {learner.save(arg or None)} (step {learner.state.step})")
    elif command == "/load":
        learner.load(arg or None)
        print(f"loaded {arg or learner.store.checkpoint_path} (step {learner.state.step}, "
              f"{len(learner.state.tokenizer)} tokens)")
    elif command == "/stats":
        print(learner.stats())
    elif command == "/help":
        print(HELP)
    elif command == "/quit":
        return False
    else:
        raise ValueError(f"unknown command {command!r} (type /help)")
    return True


class LineReader:
    """Reads input lines on a thread, so that lines typed (or piped) while a pulse runs reach the disk at once:
    each text line is appended to the history as it arrives, then queued with the byte where it ends for the
    REPL to learn in turn. A SIGKILL mid-pulse thus loses no line that reached the program."""

    def __init__(self, stream, replay: PersistentReplayText):
        self.stream, self.replay = stream, replay
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="line-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in iter(self.stream.readline, ""):
                line = line.rstrip("\r\n")
                self.queue.put((line, self.replay.append(line + "\n") if is_text_line(line) else None, None))
        except Exception as exc:  # e.g. the disk is full: the REPL reports it and ends the session
            self.queue.put(("", None, exc))
        self.queue.put(None)  # end of input

    def get(self, prompt: str = "") -> tuple[str, int | None]:
        """The next (line, stored_end), printing prompt first if no line is waiting; EOFError at the end."""
        if prompt and self.queue.empty():
            print(prompt, end="", flush=True)
        item = self.queue.get()
        if item is None:
            self.queue.put(None)  # stays at the end for any later get
            raise EOFError
        line, stored_end, exc = item
        if exc is not None:
            raise exc
        return line, stored_end


def run_repl(learner: OnlineLearner, reader: LineReader, interactive: bool) -> None:
    """Run input lines until /quit or EOF (Ctrl-C at the prompt raises KeyboardInterrupt). Without a terminal
    there is no prompt. Errors are reported in one line and the session goes on."""
    if interactive:
        print("TinyGPT learns from every line you type. /help lists the commands.")
    while True:
        try:
            line, stored_end = reader.get("> " if interactive else "")
        except EOFError:
            return
        try:
            if not handle_line(learner, line, stored_end):
                return
        except Exception as exc:  # bad input, or e.g. out of memory: report it, keep the session
            print(error_line(exc))


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

# -----------------------------------------------------------------------------
# benchmark

BENCH_HISTORY_MB = 200  # the large history of the replay benchmark


def bench_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiny_llm_demo"


def cached_history(text: str, megabytes: int) -> Path:
    """A history file of about `megabytes` MB of text repeated, written once into the cache folder, then reused."""
    path = bench_cache_dir() / f"bench_history_{megabytes}mb.bin"
    block = text.encode()
    if not path.is_file() or path.stat().st_size < megabytes * 2**20:
        def write(f):
            for _ in range(megabytes * 2**20 // len(block) + 1):
                f.write(block)
        atomic_write(path, write)
    return path


def run_bench(config: TinyConfig, device: torch.device, history_mb: int = BENCH_HISTORY_MB, repeat: int = 5) -> None:
    """Measure, in one run: training step time, generation speed with and without the KV cache (medians of
    `repeat` calls), and replay sampling time on a 1 MB versus a history_mb MB history."""
    def median_seconds(fn, n):
        return statistics.median(time_calls(fn, device, n))

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + " .,;:!?'-()" + "你好世界"
    lines = ["".join(rng.choices(alphabet, k=rng.randint(20, 120))) for _ in range(14_000)]
    text = "\n".join(lines) + "\n"  # ~1 MB
    print(f"benchmark on {device} ({torch.get_num_threads()} CPU threads): context {config.context}, "
          f"d_model {config.d_model}, {config.n_head} heads, {config.n_layer} layers, batch {config.batch_size}; "
          f"medians of {repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        learner = OnlineLearner(config, Path(tmp) / "small", device)
        learner.add_text(text)
        learner.replay.append(text)
        state = learner.state
        step_s = median_seconds(lambda: train_step(state, learner.replay), repeat)
        print(f"training step:                 {1000 * step_s:9.1f} ms   (pulse of {config.steps} steps: "
              f"{config.steps * step_s:.2f} s)")

        # prompt + output exactly fill the context, so both ways must give the same tokens
        prompt = state.tokenizer.encode(text[:min(64, config.context // 2)])
        n_new = config.context - len(prompt)
        greedy = lambda logits: sample_token(logits, 0.0, 0, 1.0, None)
        outputs, speed = {}, {}
        for use_cache in (True, False):
            def run():
                with bf16_autocast(device):
                    outputs[use_cache] = state.ema.model.generate(prompt, n_new, greedy, use_cache=use_cache)
            speed[use_cache] = n_new / median_seconds(run, repeat)
        print(f"generation with KV cache:      {speed[True]:9.1f} tokens/s")
        print(f"generation without KV cache:   {speed[False]:9.1f} tokens/s   "
              f"(speedup {speed[True] / speed[False]:.1f}x, {n_new} tokens after a {len(prompt)}-token prompt, "
              f"same tokens: {outputs[True] == outputs[False]})")

        timings = {}
        large = PersistentReplayText(cached_history(text, history_mb))
        for name, replay in (("small", learner.replay), ("large", large)):
            sample = lambda: replay.sample_batch(state.tokenizer, config.batch_size, config.context + 1, state.data_rng)
            timings[name] = (replay.size, median_seconds(sample, 200))
        large.close()
        for name, (size, seconds) in timings.items():
            print(f"replay batch, {size / 2**20:6.1f} MB history: {1000 * seconds:9.2f} ms")
        print(f"replay large / small:          {timings['large'][1] / timings['small'][1]:9.2f}x   "
              f"(large history cached in {bench_cache_dir()})")

# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="TinyGPT: a character-level language model that learns online from a REPL. "
                    "Reads commands from stdin (no prompt when it is not a terminal); EOF and /quit save; "
                    "Ctrl-C ends a training pulse, and at the prompt saves and exits.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="training_data",
                        help="where the history, vocabulary and autosaved checkpoint live (default: training_data)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 keeps torch's default (use 1 on a busy machine)")
    parser.add_argument("--load-txt", metavar="FILE", help="learn FILE line by line, save, and exit")
    parser.add_argument("--bench", action="store_true",
                        help="print timings of training, generation and replay, then exit (the replay test's "
                             f"{BENCH_HISTORY_MB} MB history is written once to ~/.cache/tiny_llm_demo)")
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
    STOPS.install()
    try:
        lock = lock_data_dir(args.data_dir)
    except OSError as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    try:
        return run_session(config, args, overrides, device, clean_temps=lock is not None)
    finally:
        if lock is not None:
            lock.close()


def run_session(config: TinyConfig, args: argparse.Namespace, overrides: dict, device: torch.device,
                clean_temps: bool) -> int:
    """Resume the data directory, then the REPL or --load-txt; autosaves at the end. Returns the exit status.
    clean_temps: remove temp files of interrupted saves (only under the lock)."""
    try:
        learner = OnlineLearner(config, args.data_dir, device)
        if clean_temps and (note := learner.store.remove_stale_temp_files()):
            print(note)
        learner.resume(overrides)
    except KeyboardInterrupt:  # during the recovery training, which saved what it did
        print("\ninterrupted")
        return 0
    except (OSError, ValueError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    status = 0
    try:
        if args.load_txt is None:
            stdin = sys.stdin or io.StringIO()
            run_repl(learner, LineReader(stdin, learner.replay), interactive=stdin.isatty())
        else:
            load_txt(learner, args.load_txt)
    except KeyboardInterrupt:
        print("\ninterrupted")
    except Exception as exc:  # e.g. a bad --load-txt file, out of memory: one line, and what was learned is saved
        print(error_line(exc), file=sys.stderr)
        status = 1
    finally:
        print(f"saved {learner.save()} (step {learner.state.step})")
    return status


if __name__ == "__main__":
    sys.exit(main())
