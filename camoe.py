"""
CaMoE: a capital-driven mixture-of-experts language model on an RWKV-7 backbone, in one file.

Each block runs RWKV-7 time mixing (plus an optional DeepEmbedAttention branch on the same input), then
routes every token to its top-2 experts through a market: experts bid for tokens, the two highest bids win,
both winners pay the third-highest bid, and experts earn back money in proportion to the value they added
to the tokens they served. Capital feeds back into the bids, so experts that help win more tokens; a tax,
a floor and a ceiling keep any expert from dying or owning the market. There is no auxiliary balance loss.

    python camoe.py --size tiny                       # CPU, trains on the standard library's source
    python camoe.py --size 0.4b --data-path data.jsonl
    torchrun --nproc_per_node 8 camoe.py --size 0.4b --data-roots a.jsonl b_text_document --mix 0.7 0.3
    python camoe.py --resume --out-dir runs/camoe     # continue exactly where the last checkpoint stopped
    python camoe.py --bench --size tiny               # tokens/s: market vs softmax top-2 vs dense RWKV-7

Layout of this file: config, building blocks (time mixing, DEA, experts, bridge), the market (critic,
router, capital), the model, data, training, CLI.
"""

import argparse
import copy
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import signal
import struct
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (MetricsLogger, add_config_flags, atomic_save, atomic_write, atomic_write_bytes, bf16_autocast,
                    builtin_corpus_files, cleanup_ddp, cosine_lr, given_flags, load_checkpoint, pick_device,
                    read_checkpoint, sample_next, seed_everything, setup_ddp)
from rwkv7_kernel import HEAD_SIZES, wkv7

# -----------------------------------------------------------------------------
# config


def cfg_field(default, help: str, range: str | None = None):
    """A config field with its help text and, for numbers, its allowed range in interval notation ("[0, 1)",
    "[1, inf)"), checked by validate_config before anything is built."""
    metadata = {"help": help + (f"; range {range}" if range else ""), "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CaMoEConfig:
    version: str = cfg_field("v18.5-test", "model version tag stored in checkpoints")
    size: str = cfg_field("0.4b", "size preset that sets the defaults of the other fields")
    # model (the defaults are the 0.4b shapes: RWKV-7 0.4B is 24 layers x 1024, vocab 65536)
    n_layer: int = cfg_field(24, "number of CaMoE blocks", "[1, inf)")
    n_embd: int = cfg_field(1024, "model width C", "[1, inf)")
    head_size: int = cfg_field(64, "RWKV-7 head size N (n_embd must be a multiple)", "[1, inf)")
    vocab_size: int = cfg_field(65536, "vocabulary size (65536 for the RWKV world tokenizer; with --compact-vocab "
                                       "it is set from the data)", "[2, 65536]")
    compact_vocab: bool = cfg_field(False, "train on the world-tokenizer ids that occur in the data only, renumbered "
                                           "(the mapping is stored in the checkpoint): a from-scratch model "
                                           "then has no rows for tokens it never sees")
    ctx_len: int = cfg_field(1024, "training context length T", "[1, inf)")
    num_rwkv_experts: int = cfg_field(6, "RWKV channel-mix experts per block", "[0, inf)")
    num_trans_experts: int = cfg_field(2, "linear-attention transformer experts per block", "[0, inf)")
    top_k: int = cfg_field(2, "experts per token, at least 2 when routed (the clearing price is the (top_k+1)-th "
                              "bid; the dense FFN is top_k experts wide)", "[1, inf)")
    ffn_mult: int = cfg_field(4, "hidden width of an RWKV expert, as a multiple of C", "[1, inf)")
    trans_heads: int = cfg_field(16, "heads of a transformer expert (n_embd must be a multiple)", "[1, inf)")
    prefix_len: int = cfg_field(48, "bridge prefix vectors per token for transformer experts", "[1, inf)")
    bridge_rank: int = cfg_field(64, "rank of the bridge's prefix vectors", "[1, inf)")
    use_deep_embed_attention: bool = cfg_field(True, "add the DeepEmbedAttention branch beside time mixing")
    use_shared_deep_embed: bool = cfg_field(True, "one DeepEmbed table for all layers (else one per layer)")
    dea_q_dim: int = cfg_field(256, "query/key width of DeepEmbedAttention", "[1, inf)")
    dea_kv_dim: int = cfg_field(32, "bottleneck width of DEA's key/value paths", "[1, inf)")
    router: str = cfg_field("market", "market (capital auction), softmax (top-k gating + balance loss), dense "
                                      "(one FFN, no experts) or base (every token to RWKV expert 0 with weight 1: "
                                      "with --init-from, exactly the base model)")
    lora_dims: list[int] = cfg_field([], "LoRA widths of time mixing: decay, in-context rate, value residual, gate "
                                         "(empty = RWKV-7's formula from n_embd; --init-from reads them from the file)")
    init_from: str = cfg_field("", "an RWKV-7 .pth in RWKV-LM's format to start from: its shapes set the model's, "
                                   "its weights the backbone, and every RWKV expert starts as its layer's FFN")
    # market
    total_capital: float = cfg_field(10000.0, "capital per layer, shared by its experts (conserved by the market)",
                                     "(0, inf)")
    trade_fraction: float = cfg_field(0.05, "fraction of a layer's capital paid by winners each optimizer step",
                                      "(0, 1]")
    floor_share: float = cfg_field(0.25, "capital floor as a fraction of the mean capital", "[0, 1)")
    tax_threshold: float = cfg_field(2.0, "capital above this multiple of the mean is taxed", "[1, inf)")
    tax_rate: float = cfg_field(0.1, "tax rate on capital above the threshold", "[0, 1]")
    capital_cap: float = cfg_field(3.0, "hard ceiling on capital as a multiple of the mean", "(1, inf)")
    wealth_weight: float = cfg_field(1.0, "weight of log relative capital in the log-bid", "[0, inf)")
    affinity_weight: float = cfg_field(0.5, "weight of the critic's affinity (long/short) in the log-bid", "[0, inf)")
    bid_noise: float = cfg_field(0.3, "std of Gaussian noise on log-bids while training (exploration)", "[0, inf)")
    critic_coef: float = cfg_field(0.1, "weight of the critic's losses (difficulty regression, affinity "
                                        "classification)", "[0, inf)")
    critic_samples: int = cfg_field(256, "settled (token, expert) outcomes kept per layer to train the critic's "
                                         "affinity", "[1, inf)")
    balance_coef: float = cfg_field(0.01, "weight of the auxiliary balance loss (softmax router only)", "[0, inf)")
    # data
    data_path: str = cfg_field("", "training data: text, .jsonl ({'text': ...} per line), or RWKV binidx "
                                   "prefix/.bin; empty = the built-in corpus (this Python's standard library source)")
    data_roots: list[str] = cfg_field([], "several data sources, sampled by --mix weights")
    mix: list[float] = cfg_field([], "sampling weights of --data-roots (default: equal)")
    cache_dir: str = cfg_field("~/.cache/camoe", "where tokenized text is cached as uint16 .bin")
    val_fraction: float = cfg_field(0.01, "fraction at the end of each source held out for validation", "(0, 1)")
    # training
    micro_bsz: int = cfg_field(6, "sequences per micro-batch (per process)", "[1, inf)")
    grad_accum: int = cfg_field(8, "micro-batches per optimizer step", "[1, inf)")
    max_steps: int = cfg_field(100000, "optimizer steps to train", "[1, inf)")
    prewarm_steps: int = cfg_field(1000, "steps of the prewarm phase (backbone and RWKV experts frozen). A model "
                                         "trained from scratch has no knowledge to protect, so it skips prewarm "
                                         "unless this flag is given", "[0, inf)")
    warmup_steps: int = cfg_field(3000, "steps of the warmup phase after prewarm (all trained, LR ramps up)",
                                  "[0, inf)")
    lr: float = cfg_field(3e-4, "peak learning rate", "(0, inf)")
    min_lr: float = cfg_field(3e-5, "final learning rate of the cosine decay (at most --lr)", "[0, inf)")
    weight_decay: float = cfg_field(0.1, "AdamW weight decay on matrices", "[0, inf)")
    grad_clip: float = cfg_field(1.0, "gradient-norm clip", "(0, inf)")
    eval_interval: int = cfg_field(500, "steps between validation evaluations (0 = none)", "[0, inf)")
    eval_iters: int = cfg_field(20, "validation batches per evaluation", "[1, inf)")
    save_interval: int = cfg_field(1000, "steps between checkpoints (one is also written at the end)", "[1, inf)")
    out_dir: str = cfg_field("runs/camoe", "directory for ckpt.pt and metrics.jsonl")
    seed: int = cfg_field(1337, "random seed")
    device: str = cfg_field("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = cfg_field(True, "bf16 autocast on CUDA")
    compile: bool = cfg_field(False, "torch.compile the model (the market's bookkeeping runs eagerly beside it)")

    @property
    def num_experts(self) -> int:
        return self.num_rwkv_experts + self.num_trans_experts


SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, head_size=16, ctx_len=128, num_rwkv_experts=3, num_trans_experts=1,
                 trans_heads=4, prefix_len=8, bridge_rank=8, dea_q_dim=32, dea_kv_dim=8, total_capital=1000.0,
                 compact_vocab=True, micro_bsz=8, grad_accum=1, max_steps=300, prewarm_steps=20, warmup_steps=50,
                 lr=2e-3, min_lr=2e-4, eval_interval=50, eval_iters=4, save_interval=100),
    "0.1b": dict(n_layer=12, n_embd=768, num_rwkv_experts=3, num_trans_experts=1, trans_heads=12, prefix_len=32,
                 bridge_rank=32, use_deep_embed_attention=False, total_capital=1000.0, micro_bsz=8),
    "0.4b": dict(),
    "1.5b": dict(n_layer=24, n_embd=2048, trans_heads=32, micro_bsz=4, grad_accum=12, lr=2e-4, min_lr=2e-5),
}
ROUTERS = ("market", "softmax", "dense", "base")
# the fields a resumed run cannot change: they fix the weights' shapes, or (total_capital) the saved capital's sum
SHAPE_FIELDS = ("n_layer", "n_embd", "head_size", "vocab_size", "compact_vocab", "num_rwkv_experts",
                "num_trans_experts", "ffn_mult", "trans_heads", "prefix_len", "bridge_rank",
                "use_deep_embed_attention", "use_shared_deep_embed", "dea_q_dim", "dea_kv_dim", "router",
                "lora_dims", "critic_samples", "total_capital")


def _in_range(value: float, interval: str) -> bool:
    """value in an interval written "[lo, hi)", "(lo, inf)", ..."""
    lo, hi = (float(b) for b in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)


def validate_config(cfg: CaMoEConfig) -> None:
    """Every setting checked before anything heavy starts; a bad one is one ValueError line naming its flag."""
    flag = lambda name: "--" + name.replace("_", "-")
    for f in dataclasses.fields(cfg):
        interval = f.metadata.get("range")
        if interval and not _in_range(getattr(cfg, f.name), interval):
            raise ValueError(f"{flag(f.name)} must be in {interval}, got {getattr(cfg, f.name)}")
    problems = [
        (cfg.router not in ROUTERS, f"--router must be one of {', '.join(ROUTERS)}, got {cfg.router!r}"),
        (cfg.head_size not in HEAD_SIZES, f"--head-size must be one of {HEAD_SIZES} (the RWKV-7 kernels'), "
                                          f"got {cfg.head_size}"),
        (cfg.n_embd % cfg.head_size, f"--n-embd {cfg.n_embd} is not a multiple of --head-size {cfg.head_size}"),
        (cfg.router != "dense" and cfg.num_trans_experts and cfg.n_embd % cfg.trans_heads,
         f"--n-embd {cfg.n_embd} is not a multiple of --trans-heads {cfg.trans_heads}"),
        (cfg.lora_dims and (len(cfg.lora_dims) != 4 or min(cfg.lora_dims) < 1),
         f"--lora-dims needs 4 positive widths (decay, in-context rate, value residual, gate), got {cfg.lora_dims}"),
        (cfg.router == "base" and cfg.num_rwkv_experts < 1, "--router base needs an RWKV expert (--num-rwkv-experts)"),
        (cfg.router in ("market", "softmax") and not 2 <= cfg.top_k <= cfg.num_experts,  # one winner: no router gradient
         f"--top-k {cfg.top_k} must be between 2 and the {cfg.num_experts} experts per block"),
        (cfg.min_lr > cfg.lr, f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}"),
        (cfg.mix and len(cfg.mix) != len(cfg.data_roots or [cfg.data_path]),
         f"--mix has {len(cfg.mix)} weights for {len(cfg.data_roots or [cfg.data_path])} data source(s)"),
        (any(m < 0 for m in cfg.mix) or (cfg.mix and sum(cfg.mix) <= 0), f"--mix weights must be >= 0 with a "
                                                                          f"positive sum, got {cfg.mix}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def token_shift(x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C) -> the previous token's x at each position: prev (B, C) at t=0 (zeros when None)."""
    if prev is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


# -----------------------------------------------------------------------------
# backbone: RWKV-7 time mixing and DeepEmbedAttention


def _lora_dim(C: int, factor: float, power: float = 0.5) -> int:
    """RWKV-7's LoRA widths: factor * C**power rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * C ** power / 32)) * 32)


def default_lora_dims(C: int) -> list[int]:
    """RWKV-LM's LoRA widths of time mixing for width C: decay, in-context rate, value residual, gate."""
    return [_lora_dim(C, 2.5), _lora_dim(C, 2.5), _lora_dim(C, 1.7), _lora_dim(C, 0.6, 0.8)]


def lora_dims_of(weights: dict[str, torch.Tensor], C: int) -> list[int] | None:
    """The LoRA widths that saved time-mixing weights have (None without them); the value-residual width is
    layer 1's (layer 0 has none), the formula's for a one-layer model."""
    keys = ["blocks.0.att.w1", "blocks.0.att.a1", "blocks.1.att.v1", "blocks.0.att.g1"]
    if not all(k in weights for k in keys[:2] + keys[3:]):
        return None
    return [weights[k].shape[1] if k in weights else default_lora_dims(C)[2] for k in keys]


class RWKV7_TimeMix(nn.Module):
    """RWKV-7 time mixing, parameter for parameter as RWKV-LM's v7 and the `rwkv` package's RWKV_x070.

    With xx = x[t-1] - x[t] and x_* = x + xx * mu_*:
        r = W_r x_r     k = W_k x_k     v = W_v x_v
        w = -softplus(-(w0 + tanh(x_w A_w) B_w)) - 0.5        (log-log decay: decay = exp(-exp(w)) in (0.545, 1))
        a = sigmoid(a0 + x_a A_a B_a)                           (in-context learning rate)
        g = sigmoid(x_g A_g) B_g                                (output gate)
        v <- v + (v_first - v) * sigmoid(v0 + x_v A_v B_v)      (layers > 0: value residual to layer 0's v)
        kk = normalize_per_head(k * k_k);  k <- k * (1 + (a - 1) * k_a)
        S_t = S_{t-1} (diag(decay_t) - kk_t^T (kk_t * a_t)) + v_t^T k_t;  y_t = S_t r_t
        out = W_o ((GroupNorm(y) + sum_head(r * k * r_k) v) * g)
    The decay is clamped once, by the softplus above; the kernel applies no second clamp.
    """

    def __init__(self, cfg: CaMoEConfig, layer_id: int):
        super().__init__()
        C, N = cfg.n_embd, cfg.head_size
        if C % N:
            raise ValueError(f"n_embd {C} is not a multiple of head_size {N}")
        self.layer_id, self.n_head, self.head_size = layer_id, C // N, N
        H = self.n_head
        ratio_0_to_1 = layer_id / max(cfg.n_layer - 1, 1)
        ratio_1_to_0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C) / C).view(1, 1, C)
        self.x_r = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))
        self.x_w = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_k = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_0))
        self.x_v = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_0))
        self.x_a = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_g = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)
        self.w0 = nn.Parameter((decay_speed + 0.5 + zigzag * 2.5).view(1, 1, C))
        dims = cfg.lora_dims or default_lora_dims(C)
        self.w1, self.w2 = self._lora(C, dims[0])
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1, self.a2 = self._lora(C, dims[1])
        if layer_id > 0:
            self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
            self.v1, self.v2 = self._lora(C, dims[2])
        self.g1, self.g2 = self._lora(C, dims[3])
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        bound = 0.5 / C ** 0.5
        nn.init.uniform_(self.receptance.weight, -bound, bound)
        nn.init.uniform_(self.key.weight, -0.1 * bound, 0.1 * bound)
        nn.init.uniform_(self.value.weight, -bound, bound)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def _lora(C: int, D: int) -> tuple[nn.Parameter, nn.Parameter]:
        """A zero down-projection and an orthogonal up-projection of gain 0.1, as RWKV-7 initialises them."""
        up = torch.empty(D, C)
        nn.init.orthogonal_(up, gain=0.1)
        return nn.Parameter(torch.zeros(C, D)), nn.Parameter(up)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, state: dict | None = None):
        """x (B, T, C) -> (out (B, T, C), v_first (B, T, C), readout (B, T, C): the normalised state readout).
        With state (RNN mode) the previous token's x and the recurrent state (B, H, N, N) are read from it and
        written back, so that a sequence fed in pieces gives what it gives whole."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        rnn, state = state is not None, state if state is not None else {}
        xx = token_shift(x, state.get("x")) - x
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda t: t.to(r.dtype).view(B, T, H, N)
        y, wkv = wkv7(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a),
                      initial_state=state.get("wkv"), output_final_state=rnn)  # (B, T, H, N)
        if rnn:
            state.update(x=x[:, -1], wkv=wkv)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((r * k * self.r_k.view(C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first, y


class SharedDeepEmbed(nn.Module):
    """Token-indexed modulation tables for DEA's keys (V, q_dim) and values (V, C), initialised to 1 (no-op).

    With use_shared_deep_embed one instance serves every layer; otherwise each DEA layer owns one.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        self.k_emb = nn.Embedding(cfg.vocab_size, cfg.dea_q_dim)
        self.v_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        nn.init.ones_(self.k_emb.weight)
        nn.init.ones_(self.v_emb.weight)


class DeepEmbedAttention(nn.Module):
    """Single-head causal softmax attention beside time mixing, on the same pre-norm input u (B, T, C).

        q = LN(shift_mix(W_q u))                                          (B, T, q_dim)
        k = LN(shift_mix(U_k D_k u * k_emb[token]))                       (B, T, q_dim), D_k: C -> kv_dim
        v = LN(shift_mix(tanh(U_v D_v u) * v_emb[token]))                 (B, T, C),     D_v: C -> kv_dim
        out = gain * softmax(q k^T / sqrt(q_dim) + causal mask) v
    shift_mix(z) = z + (z[t-1] - z[t]) * mu. The LayerNorms bound the logits (|q.k|/sqrt(q_dim) <= sqrt(q_dim)),
    and gain starts at 0, so the branch adds nothing at initialisation and grows only as it helps.
    Cost is quadratic in T, as softmax attention is; scaled_dot_product_attention keeps memory linear.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        C, Q, R = cfg.n_embd, cfg.dea_q_dim, cfg.dea_kv_dim
        self.q_proj = nn.Linear(C, Q, bias=False)
        self.k_down, self.k_up = nn.Linear(C, R, bias=False), nn.Linear(R, Q, bias=False)
        self.v_down, self.v_up = nn.Linear(C, R, bias=False), nn.Linear(R, C, bias=False)
        self.mu_q, self.mu_k = nn.Parameter(torch.full((Q,), 0.5)), nn.Parameter(torch.full((Q,), 0.5))
        self.mu_v = nn.Parameter(torch.full((C,), 0.5))
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(Q), nn.LayerNorm(Q), nn.LayerNorm(C)
        self.gain = nn.Parameter(torch.zeros(C))

    def forward(self, u: torch.Tensor, idx: torch.Tensor, deep_embed: SharedDeepEmbed,
                state: dict | None = None) -> torch.Tensor:
        """With state (RNN mode) the previous token's pre-shift q, k, v and the cache of every earlier
        token's keys and values are read from it and extended: attention over the whole context, as whole."""
        rnn, state = state is not None, state if state is not None else {}

        def shift_mix(z, name, mu):
            mixed = z + (token_shift(z, state.get(name)) - z) * mu
            if rnn:
                state[name] = z[:, -1]
            return mixed

        q = self.ln_q(shift_mix(self.q_proj(u), "q", self.mu_q))
        k = self.ln_k(shift_mix(self.k_up(self.k_down(u)) * deep_embed.k_emb(idx), "k", self.mu_k))
        v = self.ln_v(shift_mix(torch.tanh(self.v_up(self.v_down(u))) * deep_embed.v_emb(idx), "v", self.mu_v))
        mask, causal = None, True
        if rnn:
            past = state["keys"].shape[1] if "keys" in state else 0
            k = state["keys"] = torch.cat([state["keys"], k], 1) if past else k          # (B, past + T, Q)
            v = state["values"] = torch.cat([state["values"], v], 1) if past else v      # (B, past + T, C)
            if past:  # the new queries sit at positions past..past+T-1: a bottom-right causal mask
                T = q.shape[1]
                mask = torch.arange(past + T, device=q.device) <= past + torch.arange(T, device=q.device)[:, None]
                causal = False
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask,
                                           is_causal=causal)
        return y.squeeze(1) * self.gain  # (B, T, C)


# -----------------------------------------------------------------------------
# experts and the bridge


class SparseRWKVFFN(nn.Module):
    """RWKV-7 channel mixing as an expert: out = W_v relu(W_k (h + (h_prev - h) * x_k))^2.

    It sees only the rows routed to it: h and h_prev (the previous token's h, for the token shift) are
    gathered (n, C) before the call. With hidden = top_k * ffn_mult * C it is also the dense baseline's FFN.
    """

    def __init__(self, cfg: CaMoEConfig, layer_id: int, hidden: int):
        super().__init__()
        C = cfg.n_embd
        ddd = torch.arange(C) / C
        self.x_k = nn.Parameter((1.0 - ddd ** ((1.0 - layer_id / cfg.n_layer) ** 4)).view(1, 1, C))
        self.key = nn.Linear(C, hidden, bias=False)
        self.value = nn.Linear(hidden, C, bias=False)
        nn.init.uniform_(self.key.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
        nn.init.zeros_(self.value.weight)

    def forward(self, h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        k = torch.relu(self.key(h + (h_prev - h) * self.x_k.view(-1))) ** 2
        return self.value(k)


class UltimateBridge(nn.Module):
    """Maps a token's hidden state h and its RWKV state readout y to prefix vectors for transformer experts.

        z = LN(reshape(W_2 GELU(LN(W_1 [h ; y])), (P, rank)) + pos)        (n, P, rank)
    The prefix stays in rank space: experts project it to keys/values inside their attention (see
    LinearTransformerExpert), so nothing of size (n, P, C) is ever built. One bridge serves every layer, and it
    runs only for the tokens routed to a transformer expert.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        C, P, R = cfg.n_embd, cfg.prefix_len, cfg.bridge_rank
        self.P, self.R = P, R
        self.proj_in = nn.Linear(2 * C, C)
        self.ln_in = nn.LayerNorm(C)
        self.proj_out = nn.Linear(C, P * R)
        self.pos = nn.Parameter(torch.randn(P, R) * 0.02)
        self.ln_out = nn.LayerNorm(R)

    def forward(self, h: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.ln_in(self.proj_in(torch.cat([h, readout], dim=-1))))
        return self.ln_out(self.proj_out(z).view(-1, self.P, self.R) + self.pos)  # (n, P, R)


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor,
                            n_seq: int, chunk: int = 64, memory: torch.Tensor | None = None):
    """Unnormalised causal linear attention among rows of the same sequence.

    q, k (n, H, d) feature-mapped (non-negative); v (n, H, d); seq (n,) the sequence of each row, rows sorted
    by (sequence, time). Row i sees rows j <= i of its sequence: returns num_i = sum_j (q_i.k_j) v_j (n, H, d)
    and den_i = sum_j q_i.k_j (n, H). Rows are packed per sequence into (n_seq, L), then processed in chunks:
    a masked (chunk x chunk) product inside a chunk, a running (d x d) state between chunks. Cost O(n d^2).
    memory (n_seq, H, d, d + 1) holds sum_j k_j^T [v_j, 1] of rows seen before (RNN mode); the third return
    value is that sum after these rows.
    """
    n, H, d = q.shape
    counts = torch.bincount(seq, minlength=n_seq)
    pos = torch.arange(n, device=q.device) - (torch.cumsum(counts, 0) - counts)[seq]
    L = -(-int(counts.max()) // chunk) * chunk
    NC = L // chunk

    def pack(t):  # (n, H, e) -> (n_seq, H, NC, chunk, e), zeros where a sequence has no row
        out = t.new_zeros(n_seq, L, H, t.shape[-1])
        out[seq, pos] = t
        return out.view(n_seq, NC, chunk, H, -1).permute(0, 3, 1, 2, 4)

    Q, K, V = pack(q), pack(k), pack(v)
    ones = torch.ones_like(V[..., :1])
    V1 = torch.cat([V, ones], dim=-1)                                  # the extra column accumulates the denominator
    A = (Q @ K.transpose(-1, -2)).tril()                               # (S, H, NC, chunk, chunk)
    state = K.transpose(-1, -2) @ V1                                   # (S, H, NC, d, d+1) per chunk
    total = torch.cumsum(state, dim=2)
    state = total - state                                              # what the chunks before each chunk hold
    if memory is not None:
        state = state + memory.unsqueeze(2).to(state.dtype)
    out = A @ V1 + Q @ state                                           # (S, H, NC, chunk, d+1)
    out = out.permute(0, 2, 3, 1, 4).reshape(n_seq, L, H, d + 1)[seq, pos]  # (n, H, d+1)
    after = total[:, :, -1] + (memory if memory is not None else 0)    # (S, H, d, d+1)
    return out[..., :d], out[..., d], after


class LinearTransformerExpert(nn.Module):
    """A transformer expert for the tokens routed to it: causal linear attention over the earlier tokens of
    the same sequence that it also served, plus softmax attention over its token's bridge prefix.

        phi(x) = elu(x) + 1
        hist_i   = sum_{j<=i, same seq} phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)
        prefix_i = sum_p softmax_p(q_i . K_p z_ip / sqrt(d)) V_p z_ip      (z_i = bridge prefix, (P, rank))
        out_i = W_o(hist_i + prefix_i) * sigmoid(W_g h_i)
    The prefix attention is computed in rank space: q_i is projected by K_p^T to rank R per head, so its cost is
    O(H P R) per token and the (P, C) keys and values are never materialised.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        C, H, R = cfg.n_embd, cfg.trans_heads, cfg.bridge_rank
        if C % H:
            raise ValueError(f"n_embd {C} is not a multiple of trans_heads {H}")
        self.H, self.d = H, C // H
        self.query, self.key, self.value = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.prefix_key = nn.Parameter(torch.randn(H, self.d, R) / R ** 0.5)
        self.prefix_value = nn.Parameter(torch.randn(H, self.d, R) / R ** 0.5)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        nn.init.zeros_(self.output.weight)

    def forward(self, h: torch.Tensor, prefix: torch.Tensor, seq: torch.Tensor, n_seq: int,
                memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out (n, C), memory (n_seq, H, d, d + 1): the history it has served, for RNN mode)."""
        n, C = h.shape
        q = self.query(h).view(n, self.H, self.d)
        k = self.key(h).view(n, self.H, self.d)
        v = self.value(h).view(n, self.H, self.d)
        num, den, memory = causal_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, seq, n_seq, memory=memory)
        hist = num / (den.unsqueeze(-1) + 1e-6)                                    # (n, H, d)
        prefix = prefix.to(q.dtype)
        q_r = torch.einsum("nhd,hdr->nhr", q, self.prefix_key.to(q.dtype))         # (n, H, R)
        att = torch.softmax(torch.einsum("nhr,npr->nhp", q_r, prefix) / self.d ** 0.5, dim=-1)  # (n, H, P)
        z_bar = torch.einsum("nhp,npr->nhr", att, prefix)                          # (n, H, R)
        pre = torch.einsum("nhr,hdr->nhd", z_bar, self.prefix_value.to(q.dtype))  # (n, H, d)
        return self.output((hist + pre).reshape(n, C)) * torch.sigmoid(self.gate(h)), memory


class _CombineExperts(torch.autograd.Function):
    """out[token] += weight * expert_output for each (token, expert) assignment; its backward also measures
    each assignment's value added, value = -<dL/dout[token], weight * expert_output>: the first-order loss
    increase if that expert's contribution were removed. It writes value into `value_sink` (n,)."""

    @staticmethod
    def forward(ctx, weights, outputs, token, n_tokens, value_sink):
        ctx.save_for_backward(weights, outputs, token)
        ctx.value_sink = value_sink
        out = outputs.new_zeros(n_tokens, outputs.shape[1])
        return out.index_add_(0, token, outputs * weights.to(outputs.dtype).unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_out):
        weights, outputs, token = ctx.saved_tensors
        g = grad_out[token]                                                          # (n, C)
        dot = (g.float() * outputs.float()).sum(-1)                                  # (n,)
        if ctx.value_sink is not None:
            ctx.value_sink.copy_(-(weights.detach().float() * dot))
        return dot.to(weights.dtype), g * weights.to(g.dtype).unsqueeze(1), None, None, None


# -----------------------------------------------------------------------------
# the market: critic, router, capital


class CriticVC(nn.Module):
    """Predicts, from a token's hidden state (detached: the critic observes, it does not shape h):
        difficulty d = softplus(MLP(h)) + 1e-3   the token's final loss, trained with SmoothL1(d, loss.detach())
        affinity   a (E logits)                  P(expert e adds value on this token): long if a > 0, short if a < 0,
                                                 trained by BCE on settled outcomes (value > 0) of past assignments.
    Both enter the bids: difficulty scales what a token costs, affinity subsidises or penalises each expert.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        hidden = max(cfg.n_embd // 4, 16)
        self.body = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.GELU())
        self.difficulty_head = nn.Linear(hidden, 1)
        self.affinity_head = nn.Linear(hidden, cfg.num_experts)
        nn.init.zeros_(self.affinity_head.weight)
        nn.init.zeros_(self.affinity_head.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(h)
        return F.softplus(self.difficulty_head(z)).squeeze(-1).float() + 1e-3, self.affinity_head(z).float()


class SparseRouter(nn.Module):
    """Every expert bids for every token; the top_k bids win; winners pay the (top_k+1)-th bid ("third price").

    Market (router='market'):
        s_te   = confidence logit of expert e for token t (a linear map of h, trained through the weights)
        log b_te = s_te + wealth_weight * log(K_e / mean K) + affinity_weight * tanh(a_te) + noise
        bid  b_te = (1 + d_t) * exp(log b_te)        (hard tokens cost more; d_t the critic's difficulty)
        winners = top_k of b_t;  price_t = the (top_k+1)-th highest b_t (0 when every expert wins)
        weights = softmax over the winners of s_te   (differentiable in s)
    Capital, critic and noise decide who wins and what it pays, not how much a winner's output counts: an
    expert's value is measured through its weight, so weights that grew with wealth would let money buy value.
    Softmax baseline (router='softmax'): p = softmax(s), winners = top_k of p, weights = renormalised p,
    price 0, bids = p; the model adds the standard balance loss E * sum_e f_e * mean_t p_te.
    Returns (winners (N, k) long, weights (N, k), price (N,), bids (N, E)).
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.confidence = nn.Linear(cfg.n_embd, cfg.num_experts, bias=False)
        nn.init.normal_(self.confidence.weight, std=0.02)

    def forward(self, h: torch.Tensor, wealth: torch.Tensor | None = None, difficulty: torch.Tensor | None = None,
                affinity: torch.Tensor | None = None):
        cfg, k = self.cfg, self.cfg.top_k
        logits = self.confidence(h).float()                                         # (N, E)
        if cfg.router == "softmax":
            probs = torch.softmax(logits, dim=-1)
            top = probs.topk(k, dim=-1)
            weights = top.values / top.values.sum(-1, keepdim=True)
            return top.indices, weights, torch.zeros_like(probs[:, 0]), probs
        # bids select and price; they carry no gradient (the weights below do)
        log_bid = logits.detach() + cfg.wealth_weight * wealth + cfg.affinity_weight * torch.tanh(affinity.detach())
        if self.training and cfg.bid_noise > 0:
            log_bid = log_bid + cfg.bid_noise * torch.randn_like(log_bid)
        bids = (1.0 + difficulty.detach()).unsqueeze(-1) * torch.exp(log_bid.clamp(-30.0, 30.0))  # (N, E)
        top = bids.topk(min(k + 1, bids.shape[-1]), dim=-1)
        winners = top.indices[:, :k]
        price = top.values[:, k] if bids.shape[-1] > k else torch.zeros_like(bids[:, 0])
        weights = torch.softmax(logits.gather(1, winners), dim=-1)
        return winners, weights, price, bids


class CapitalManager(nn.Module):
    """Capital of one layer's experts. Money is conserved: sum(K) = total_capital at every step.

    Once per optimizer step, with pay_e the clearing prices owed by expert e for the tokens it won (scaled so that
    all winners together pay trade_fraction * total) and V_e its value added (sum over its assignments of
    -<dL/dout, w * o>, see _CombineExperts):
        payment_e  = min(pay_e, K_e)
        pool       = sum_e payment_e
        earned_e   = pool * max(V_e, 0) / sum_e max(V_e, 0)      (refund payment_e if no expert added value)
        K'         = K - payment + earned
        tax_e      = tax_rate * max(0, K'_e - tax_threshold * m) + max(0, K'_e - tax - capital_cap * m)
                     (m = total / E; the second term confiscates anything above the ceiling)
        top-up_e   = max(0, floor_share * m - (K'_e - tax_e))    (the floor: no expert goes broke)
        the tax pool pays the top-ups; a shortfall is levied on experts above the floor in proportion to their
        excess (counted as their tax); a surplus is paid out as a dividend in proportion to each expert's room
        below the ceiling, capital_cap * m - K_e (counted as revenue), so the poor gain most and none passes the cap.
    So for every expert: change = revenue - payment - tax + top-up, with revenue = earned + dividend, and the
    four sum to zero over experts. The bid uses log(K_e / m), clamped to [log floor_share, log capital_cap].
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.register_buffer("capital", torch.full((E,), cfg.total_capital / E, dtype=torch.float64))

    def wealth(self) -> torch.Tensor:
        cfg = self.cfg
        rel = self.capital / (cfg.total_capital / len(self.capital))
        return torch.log(rel.clamp(cfg.floor_share, cfg.capital_cap)).float()       # (E,)

    @torch.no_grad()
    def settle(self, owed: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply one step of the market to the capital; returns the ledger (E,) float64 tensors."""
        cfg, K = self.cfg, self.capital
        mean = cfg.total_capital / len(K)
        payment = torch.minimum(owed.double(), K)
        gain = value.double().clamp_min(0)
        earned = payment.sum() * gain / gain.sum() if gain.sum() > 0 else payment.clone()
        K1 = K - payment + earned
        tax = cfg.tax_rate * (K1 - cfg.tax_threshold * mean).clamp_min(0)
        tax = tax + (K1 - tax - cfg.capital_cap * mean).clamp_min(0)
        K2 = K1 - tax
        floor = cfg.floor_share * mean
        topup = (floor - K2).clamp_min(0)
        shortfall = topup.sum() - tax.sum()
        if shortfall > 0:
            excess = (K2 - floor).clamp_min(0)
            tax = tax + shortfall * excess / excess.sum().clamp_min(1e-30)
            dividend = torch.zeros_like(K)
        else:
            room = (cfg.capital_cap * mean - (K2 + topup)).clamp_min(0)
            dividend = -shortfall * room / room.sum()
        revenue = earned + dividend
        new = K - payment + revenue - tax + topup
        ledger = dict(revenue=revenue, payment=payment, tax=tax, topup=topup, change=new - K)
        K.copy_(new)
        return ledger


# -----------------------------------------------------------------------------
# the model


class CaMoE_Block(nn.Module):
    """x += TimeMix(LN1 x) + DEA(LN1 x);  h = LN2 x;  x += sum over the token's winners of weight * expert(h)."""

    def __init__(self, cfg: CaMoEConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.att = RWKV7_TimeMix(cfg, layer_id)
        if cfg.use_deep_embed_attention:
            self.dea = DeepEmbedAttention(cfg)
            if not cfg.use_shared_deep_embed:
                self.deep_embed = SharedDeepEmbed(cfg)
        if cfg.router == "dense":
            self.ffn = SparseRWKVFFN(cfg, layer_id, cfg.top_k * cfg.ffn_mult * C)
            return
        self.experts = nn.ModuleList(
            [SparseRWKVFFN(cfg, layer_id, cfg.ffn_mult * C) for _ in range(cfg.num_rwkv_experts)]
            + [LinearTransformerExpert(cfg) for _ in range(cfg.num_trans_experts)])
        if cfg.router == "base":
            return
        self.router = SparseRouter(cfg)
        if cfg.router == "softmax":
            return
        self.critic = CriticVC(cfg)
        self.capital = CapitalManager(cfg)
        S = cfg.critic_samples  # the last settled outcomes, kept as buffers so a resumed run trains the same critic
        self.register_buffer("critic_h", torch.zeros(S, C))
        self.register_buffer("critic_expert", torch.zeros(S, dtype=torch.long))
        self.register_buffer("critic_label", torch.zeros(S))
        self.register_buffer("critic_count", torch.zeros((), dtype=torch.long))
        self.pending: list[dict] = []

    def forward(self, x, idx, v_first, bridge, deep_embed, state: dict | None = None):
        """x (B, T, C), idx (B, T) -> (x, v_first, difficulty (B*T,) or None, info dict). With state (RNN mode,
        a dict this layer fills) every part carries what it needs from the tokens before x."""
        part = (lambda name: state.setdefault(name, {})) if state is not None else (lambda name: None)
        if self.layer_id == 0:
            x = self.ln0(x)
        u = self.ln1(x)
        att, v_first, readout = self.att(u, v_first, part("att"))
        x = x + att
        if self.cfg.use_deep_embed_attention:
            x = x + self.dea(u, idx, getattr(self, "deep_embed", deep_embed), part("dea"))
        h = self.ln2(x)
        h_prev = token_shift(h, state.get("h") if state is not None else None)
        if state is not None:
            state["h"] = h[:, -1]
        if self.cfg.router == "dense":
            return x + self.ffn(h, h_prev), v_first, None, {}
        moe, difficulty, info = self._route(h, h_prev, readout, bridge, part("memory"))
        return x + moe, v_first, difficulty, info

    def _route(self, h, h_prev, readout, bridge, memory: dict | None):
        cfg = self.cfg
        B, T, C = h.shape
        N, E, k = B * T, cfg.num_experts, cfg.top_k
        hf, h_prev, ro = h.reshape(N, C), h_prev.reshape(N, C), readout.reshape(N, C)
        if cfg.router == "base":  # the base model: RWKV expert 0 serves every token with weight 1
            counts = torch.zeros(E, dtype=torch.long, device=h.device)
            counts[0] = N
            info = {"counts": counts, "price": hf.new_zeros(N), "winners": counts.new_zeros(N, 1)}
            return self.experts[0](hf, h_prev).view(B, T, C), None, info
        if cfg.router == "market":
            difficulty, affinity = self.critic(hf.detach())                         # (N,), (N, E)
            winners, weights, price, bids = self.router(hf, self.capital.wealth(), difficulty, affinity)
        else:
            difficulty = None
            winners, weights, price, bids = self.router(hf)
        expert = winners.reshape(-1)                                                  # (N*k,)
        order = torch.argsort(expert, stable=True)                                    # grouped by expert, tokens in order
        expert, token, weight = expert[order], order // k, weights.reshape(-1)[order]
        counts = torch.bincount(expert, minlength=E)
        outputs = []
        for e, rows in enumerate(torch.split(token, counts.tolist())):
            if len(rows) == 0:
                continue
            if e < cfg.num_rwkv_experts:
                outputs.append(self.experts[e](hf[rows], h_prev[rows]))
            else:
                prefix = bridge(hf[rows], ro[rows])                                   # (n, P, R)
                out, served = self.experts[e](hf[rows], prefix, rows // T, B, memory.get(e) if memory is not None else None)
                if memory is not None:
                    memory[e] = served
                outputs.append(out)
        moe = self._combine(weight, torch.cat(outputs), token, expert, price, hf).view(B, T, C)
        info = {"counts": counts, "price": price, "winners": winners}
        if cfg.router == "softmax":
            share = counts.float() / (N * k)
            info["balance_loss"] = E * (share * bids.mean(0)).sum()
        return moe, difficulty, info

    @torch.compiler.disable
    def _combine(self, weight, outputs, token, expert, price, hf):
        """Sum each token's weighted expert outputs (N, C) and, when training the market, record what this
        micro-batch owes and where its backward pass will write each assignment's value. Always eager: under
        torch.compile a traced autograd.Function would lose the value sink written in its backward."""
        cfg = self.cfg
        market = self.training and torch.is_grad_enabled() and cfg.router == "market"
        sink = torch.zeros(len(token), device=hf.device) if market else None
        moe = _CombineExperts.apply(weight, outputs, token, len(hf), sink)
        if market:
            owed = torch.zeros(cfg.num_experts, device=hf.device).index_add_(0, expert, price[token])
            sample = torch.randperm(len(token), device=hf.device)[:cfg.critic_samples]
            self.pending.append(dict(owed=owed, total_price=price.sum() * cfg.top_k, expert=expert, sink=sink,
                                     sample=sample, sample_h=hf[token[sample]].detach()))
        return moe

    def critic_affinity_loss(self) -> torch.Tensor | None:
        """BCE of the critic's affinity on the last settled outcomes (None before the first settlement)."""
        n = int(self.critic_count)
        if self.cfg.router != "market" or n == 0:
            return None
        _, affinity = self.critic(self.critic_h[:n])
        logit = affinity.gather(1, self.critic_expert[:n, None]).squeeze(1)
        return F.binary_cross_entropy_with_logits(logit, self.critic_label[:n])

    @torch.no_grad()
    def market_totals(self, budget: float) -> torch.Tensor:
        """Sum this step's micro-batches: (3, E) = owed payments (scaled to `budget` in total), value, tokens."""
        E = self.cfg.num_experts
        totals = torch.zeros(3, E, dtype=torch.float64, device=self.capital.capital.device)
        for p in self.pending:
            scale = budget / len(self.pending) / p["total_price"].double().clamp_min(1e-30)
            totals[0] += p["owed"].double() * scale
            totals[1].index_add_(0, p["expert"], p["sink"].double())
            totals[2].index_add_(0, p["expert"], torch.ones_like(p["sink"], dtype=torch.float64))
        return totals

    @torch.no_grad()
    def settle(self, totals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update capital from the (all-reduced) totals; keep the last micro-batch's outcomes for the critic."""
        ledger = self.capital.settle(totals[0], totals[1])
        last = self.pending[-1]
        n = len(last["sample"])
        self.critic_h[:n] = last["sample_h"].float()
        self.critic_expert[:n] = last["expert"][last["sample"]]
        self.critic_label[:n] = (last["sink"][last["sample"]] > 0).float()
        self.critic_count.fill_(n)
        self.pending.clear()
        return ledger


class CaMoE_System(nn.Module):
    """Embedding -> CaMoE_Block x n_layer -> LayerNorm -> head. Owns the market state (capital, critic
    samples) as buffers of its blocks, the shared DeepEmbed table and the shared bridge.

    forward(idx (B, T), targets (B, T) or None) -> (logits (B, T, V), (total, ce) or None, per-layer infos)
    total = ce + critic_coef * (mean over layers of SmoothL1(difficulty, token loss) + affinity BCE)
            [+ balance_coef * balance loss for the softmax router]; ce is the plain next-token loss.
    """

    def __init__(self, cfg: CaMoEConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        if cfg.compact_vocab:  # model id i is world-tokenizer id vocab_ids[i]; set from the data, saved with the weights
            self.register_buffer("vocab_ids", torch.arange(cfg.vocab_size))
        if cfg.use_deep_embed_attention and cfg.use_shared_deep_embed:
            self.deep_embed = SharedDeepEmbed(cfg)
        if cfg.router not in ("dense", "base") and cfg.num_trans_experts > 0:
            self.bridge = UltimateBridge(cfg)
        self.blocks = nn.ModuleList([CaMoE_Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * (cfg.vocab_size / cfg.n_embd) ** 0.5 if
                            cfg.vocab_size > cfg.n_embd else 0.5)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: list[dict] | None = None):
        """state (RNN mode): a list that the call fills with one dict per layer on first use and carries on
        later calls, so that feeding a sequence in pieces (a prompt, then one token at a time) gives the
        logits of feeding it whole."""
        cfg = self.cfg
        x = self.emb(idx)
        if state is not None and not state:
            state.extend({} for _ in self.blocks)
        v_first, difficulties, infos = None, [], []
        for i, block in enumerate(self.blocks):
            x, v_first, difficulty, info = block(x, idx, v_first, getattr(self, "bridge", None),
                                                 getattr(self, "deep_embed", None), state[i] if state is not None else None)
            difficulties.append(difficulty)
            infos.append(info)
        logits = self.head(self.ln_out(x))
        if targets is None:
            return logits, None, infos
        token_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        loss = token_loss.mean()
        total = loss
        if cfg.router == "market":
            critic = sum(F.smooth_l1_loss(d, token_loss.detach()) for d in difficulties) / cfg.n_layer
            affinity = [a for a in (b.critic_affinity_loss() for b in self.blocks) if a is not None]
            if affinity:
                critic = critic + sum(affinity) / cfg.n_layer
            total = total + cfg.critic_coef * critic
        if cfg.router == "softmax":
            total = total + cfg.balance_coef * sum(i["balance_loss"] for i in infos) / cfg.n_layer
        return logits, (total, loss), infos

    @torch.no_grad()
    def settle_market(self, world_size: int = 1, prewarm: bool = False) -> dict[str, list]:
        """Settle every layer's market once per optimizer step; totals are all-reduced so ranks stay identical.
        In prewarm the frozen RWKV experts still serve tokens but do not trade (no payment, no earnings): an
        expert that cannot learn yet should neither pay for tokens nor be judged on them."""
        cfg = self.cfg
        blocks = [b for b in self.blocks if cfg.router == "market" and b.pending]
        if not blocks:
            return {}
        budget = cfg.trade_fraction * cfg.total_capital / world_size
        totals = torch.stack([b.market_totals(budget) for b in blocks])              # (L, 3, E)
        if prewarm:
            totals[:, :2, :cfg.num_rwkv_experts] = 0
        if world_size > 1:
            dist.all_reduce(totals)
        ledgers = [b.settle(t) for b, t in zip(blocks, totals)]
        return {"ledgers": ledgers, "tokens": totals[:, 2]}

    def prewarm_frozen(self) -> list[nn.Parameter]:
        """The parameters prewarm freezes, those a base model brings: embedding, norms, time mixing, the RWKV
        experts (or the dense FFN) and the head. Transformer experts, bridge, critic, router, DEA and DeepEmbed
        train from the start."""
        modules = [self.emb, self.ln_out, self.head]
        for block in self.blocks:
            modules += [block.ln1, block.ln2, block.att] + ([block.ln0] if block.layer_id == 0 else [])
            modules += list(block.experts[:self.cfg.num_rwkv_experts]) if hasattr(block, "experts") else [block.ffn]
        return [p for m in modules for p in m.parameters()]


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of a non-negative vector (0 = equal, 1 - 1/n = one holder)."""
    x = x.double()
    return float((x[:, None] - x[None, :]).abs().sum() / (2 * len(x) ** 2 * x.mean().clamp_min(1e-30)))


# -----------------------------------------------------------------------------
# base model: RWKV-7 weights in RWKV-LM's format (what the `rwkv` package loads)

RWKV7_REQUIRED = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
                  "blocks.0.att.g1", "blocks.0.ffn.key.weight", "ln_out.weight", "head.weight")
# tensors of RWKV-7 files that have no counterpart here, with the reason printed when a file holds them
DEEP_EMBED_GATING = "DeepEmbed FFN gating, not implemented here: the model is not this base model"
RWKV7_UNUSED = {"ffn.s_emb.weight": DEEP_EMBED_GATING, "ffn.s_emb_x.weight": DEEP_EMBED_GATING,
                "ffn.s1": DEEP_EMBED_GATING, "ffn.s2": DEEP_EMBED_GATING, "ffn.s0": DEEP_EMBED_GATING,
                "blocks.0.att.v0": "layer 0's value-residual mix, which RWKV-7 never applies",
                "blocks.0.att.v1": "layer 0's value-residual mix, which RWKV-7 never applies",
                "blocks.0.att.v2": "layer 0's value-residual mix, which RWKV-7 never applies"}


def read_rwkv7(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of an RWKV-7 .pth and the model shape they imply (n_layer, n_embd, head_size, vocab_size,
    ffn_mult, lora_dims); a file that is not RWKV-7 weights is one ValueError naming what is missing."""
    sd = read_checkpoint(path)
    if "model" in sd and "config" in sd:
        raise ValueError(f"{path}: a CaMoE training checkpoint, not RWKV-7 base weights (use --resume, or generate "
                         f"--ckpt)")
    absent = [k for k in RWKV7_REQUIRED if not isinstance(sd.get(k), torch.Tensor)]
    if absent:
        raise ValueError(f"{path}: not an RWKV-7 checkpoint in RWKV-LM's format (no {', '.join(absent[:3])})")
    vocab, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    hidden = sd["blocks.0.ffn.key.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if H * N != C or hidden % C:
        raise ValueError(f"{path}: inconsistent RWKV-7 shapes (heads {H} x {N} for width {C}, FFN {hidden})")
    shape = dict(n_layer=n_layer, n_embd=C, head_size=N, vocab_size=vocab, ffn_mult=hidden // C,
                 lora_dims=lora_dims_of(sd, C))
    return sd, shape


def base_config(cfg: CaMoEConfig, shape: dict, explicit: dict, path: str) -> CaMoEConfig:
    """cfg with the base file's shapes; a flag given explicitly that disagrees with the file is an error."""
    for name, value in shape.items():
        if name in explicit and explicit[name] != value:
            raise ValueError(f"{path} has {name.replace('_', '-')} {value}, but --{name.replace('_', '-')} "
                             f"{explicit[name]} was given")
    if explicit.get("compact_vocab"):
        raise ValueError(f"--compact-vocab renumbers the vocabulary, so it cannot start from {path}")
    if cfg.router == "dense":
        raise ValueError("--router dense is one FFN top_k experts wide, which no base file has; use --router base")
    return dataclasses.replace(cfg, compact_vocab=False, **shape)


@torch.no_grad()
def load_base_weights(model: CaMoE_System, sd: dict[str, torch.Tensor], path: str) -> list[str]:
    """Copy every tensor of an RWKV-7 file into the model: the backbone by name, each layer's FFN into every
    RWKV expert of that layer (identical copies: any mixture of them is the base FFN, so training starts
    from the base model's function). Returns report lines: what was loaded, what is new, what is unused."""
    own = model.state_dict()
    loaded, unused = set(), {}
    for name, tensor in sd.items():
        layer = name.split(".")[1] if name.startswith("blocks.") else None
        tail = name.split(".", 2)[2] if layer is not None else name
        if tail.startswith("ffn.") and tail in ("ffn.x_k", "ffn.key.weight", "ffn.value.weight"):
            targets = [f"blocks.{layer}.experts.{e}.{tail[4:]}" for e in range(model.cfg.num_rwkv_experts)]
        else:
            targets = [name] if name in own else []
        if not targets:
            unused[name] = RWKV7_UNUSED.get(tail, RWKV7_UNUSED.get(name, "no counterpart in CaMoE"))
            continue
        for target in targets:
            if own[target].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's {target} "
                                 f"{tuple(own[target].shape)}")
            own[target].copy_(tensor.to(own[target].dtype))
            loaded.add(target)
    new = sorted({n.split(".experts.")[0] + ".experts.*" if ".experts." in n else n.rsplit(".", 1)[0]
                  for n, _ in model.named_parameters() if n not in loaded})
    n_loaded = sum(t.numel() for n, t in sd.items() if n not in unused)
    lines = [f"loaded {len(sd) - len(unused)} tensors ({n_loaded / 1e6:.1f}M values) from {path}; the "
             f"{model.cfg.num_rwkv_experts} RWKV experts of each layer start as copies of its FFN"]
    if new:
        lines.append(f"new, from their initial values: {_name_summary(new)}")
    for reason in sorted(set(unused.values())):
        names = [n for n, r in unused.items() if r == reason]
        lines.append(f"not used ({reason}): {_name_summary(names)}")
    return lines


def _name_summary(names: list[str], shown: int = 6) -> str:
    """Parameter names with their layer numbers collapsed (blocks.3.x and blocks.4.x -> blocks.*.x)."""
    collapsed = sorted(set(re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in names))
    more = f" and {len(collapsed) - shown} more" if len(collapsed) > shown else ""
    return ", ".join(collapsed[:shown]) + more


# -----------------------------------------------------------------------------
# data


class WorldTokenizer:
    """The RWKV world tokenizer (vocab 65536, id 0 = end of text), from the vocab file the `rwkv` package ships."""

    def __init__(self):
        try:
            import rwkv
            from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        except ImportError as exc:
            raise ImportError("the RWKV world tokenizer needs the `rwkv` package: pip install rwkv") from exc
        self.vocab_file = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")
        self._tok = TRIE_TOKENIZER(self.vocab_file)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        # Id 0 (end of text) has no bytes; a cut through a multi-byte character gives U+FFFD for those bytes only.
        table = self._tok.idx2token
        return b"".join(table.get(i, b"") for i in ids).decode("utf-8", errors="replace")


BINIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


def read_binidx(prefix: str) -> np.ndarray:
    """Tokens of an RWKV-LM / Megatron binidx pair (prefix.bin + prefix.idx) as one flat memory-mapped array.

    .idx layout: magic b"MMIDIDX\\0\\0", version u64 (= 1), dtype code u8, sequence count u64, document count
    u64, then int32 sizes, int64 pointers, int64 document starts. Windows may cross document boundaries, as in
    RWKV-LM's own sampler.
    """
    with open(prefix + ".idx", "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
            raise ValueError(f"{prefix}.idx: not a binidx index (bad magic)")
        version, code, n_seq, _ = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in BINIDX_DTYPES:
            raise ValueError(f"{prefix}.idx: unsupported binidx version {version} or token dtype code {code}")
        sizes = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    dtype = np.dtype(BINIDX_DTYPES[code])
    n_tokens = int(sizes.astype(np.int64).sum())
    if len(sizes) != n_seq or os.path.getsize(prefix + ".bin") < n_tokens * dtype.itemsize:
        raise ValueError(f"{prefix}: .bin/.idx are truncated or do not match")
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n_tokens,))


def _iter_documents(path: str):
    """Documents of a text file (the whole file) or a JSONL file (the 'text' field of each line); a file that
    is not text is refused rather than tokenised as noise."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'text' field ({exc})") from None
                yield str(text)
    else:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8", errors="replace")
        if b"\0" in raw or text.count("\ufffd") > 0.01 * len(text):  # a stray bad byte is fine, binary is not
            raise ValueError(f"{path}: not UTF-8 text (binary content); give text, .jsonl, or a binidx prefix")
        yield text


@functools.cache
def world_tokenizer() -> WorldTokenizer:
    """The tokenizer, loaded once (its vocabulary trie takes a second or two to build)."""
    return WorldTokenizer()


def tokenize_to_cache(files: list[str], cache_dir: str, what: str) -> np.ndarray:
    """Tokenize files once into a uint16 .bin cache (documents end with token 0); later calls memory-map it.

    The cache name hashes the paths, sizes and modification times, so an edited file is tokenized again.
    The file is written atomically (common.atomic_write), so a killed run never leaves a half cache.
    """
    key = hashlib.sha1(repr([(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files])
                       .encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"{key}.bin"
    if not cache.exists():
        from tqdm import tqdm

        def write(out):
            for path in tqdm(files, desc=f"tokenizing {what}", unit="file", disable=len(files) < 2):
                for doc in _iter_documents(path):
                    out.write(np.asarray(world_tokenizer().encode(doc) + [0], dtype=np.uint16).tobytes())

        atomic_write(cache, write)
    return np.memmap(cache, dtype=np.uint16, mode="r")


def load_tokens(path: str, cache_dir: str) -> np.ndarray:
    """One data source as a flat token array: binidx prefix (or its .bin/.idx), a directory of text files,
    or a text / JSONL file; the empty path is the built-in corpus (the standard library's top-level *.py)."""
    if not path:
        return tokenize_to_cache(builtin_corpus_files(), cache_dir, "the built-in corpus (stdlib source)")
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
        return read_binidx(prefix)
    if path.endswith((".bin", ".idx")):
        raise FileNotFoundError(f"{path}: a binidx source needs both {prefix}.bin and {prefix}.idx")
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.endswith((".txt", ".md", ".jsonl", ".json")))
        if not files:
            raise FileNotFoundError(f"{path}: no .txt/.md/.jsonl files in this directory")
        return tokenize_to_cache(files, cache_dir, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    return tokenize_to_cache([path], cache_dir, path)


def compact_vocabulary(sources: list[np.ndarray], chunk: int = 1 << 24) -> np.ndarray:
    """The sorted distinct token ids of the sources (all of each, validation included, so that no held-out
    token is out of vocabulary), counted in chunks so a memory-mapped source is never loaded whole."""
    seen = np.zeros(1, dtype=bool)
    for src in sources:
        for start in range(0, len(src), chunk):
            counts = np.bincount(np.asarray(src[start:start + chunk], dtype=np.int64))
            if len(counts) > len(seen):
                seen = np.pad(seen, (0, len(counts) - len(seen)))
            seen[:len(counts)] |= counts > 0
    return np.flatnonzero(seen)


class TokenData:
    """Random windows of T+1 tokens from several sources, each chosen with probability mix[i].

    The last val_fraction of each source (at least one window) is validation; training windows never reach
    into it. Sampling uses its own numpy generator, saved in checkpoints so a resumed run sees the same batches.
    With vocab_ids (the compact vocabulary: model id i is token vocab_ids[i]) batches come renumbered.
    """

    def __init__(self, sources: list[np.ndarray], mix: list[float], ctx_len: int, val_fraction: float,
                 vocab_size: int, seed: int, names: list[str], vocab_ids: np.ndarray | None = None):
        if len(mix) != len(sources) or any(m < 0 for m in mix) or sum(mix) <= 0:
            raise ValueError(f"--mix needs one non-negative weight per data source ({len(sources)}), got {mix}")
        self.T, self.vocab_size, self.names = ctx_len, vocab_size, names
        self.splits = []
        for src, name in zip(sources, names):
            n_val = max(int(len(src) * val_fraction), ctx_len + 1)
            if len(src) - n_val < ctx_len + 1:
                raise ValueError(f"{name}: {len(src)} tokens is too little for ctx_len {ctx_len} (train + validation)")
            self.splits.append((src[:len(src) - n_val], src[len(src) - n_val:]))
        self.mix = np.asarray(mix, dtype=np.float64) / sum(mix)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.lookup, self.vocab_ids = None, vocab_ids
        if vocab_ids is not None:  # token id -> model id, -1 for a token outside the vocabulary
            self.lookup = np.full(max(int(vocab_ids.max()) + 1, 1 << 16), -1, dtype=np.int64)
            self.lookup[vocab_ids] = np.arange(len(vocab_ids))

    def batch(self, B: int, split: str = "train", rng: np.random.Generator | None = None):
        """(x, y) int64 (B, T): y is x shifted by one token."""
        rng = rng or self.rng
        which = rng.choice(len(self.splits), size=B, p=self.mix)
        rows = []
        for i in which:
            src = self.splits[i][0 if split == "train" else 1]
            start = int(rng.integers(0, len(src) - self.T))
            rows.append(np.asarray(src[start:start + self.T + 1], dtype=np.int64))
        data = np.stack(rows)
        if self.lookup is not None:
            if int(data.min()) < 0 or int(data.max()) >= len(self.lookup):
                raise ValueError(f"token id {int(data.max())} in {[self.names[i] for i in set(which.tolist())]} is "
                                 f"outside the compact vocabulary")
            mapped = self.lookup[data]
            if (mapped < 0).any():
                raise ValueError(f"token id {int(data[mapped < 0][0])} in {[self.names[i] for i in set(which.tolist())]}"
                                 f" is not in the checkpoint's compact vocabulary (the data changed since it was built)")
            data = mapped
        if int(data.max()) >= self.vocab_size or int(data.min()) < 0:
            raise ValueError(f"token id {int(data.max())} out of range for vocab_size {self.vocab_size} "
                             f"in {[self.names[i] for i in set(which.tolist())]}")
        data = torch.from_numpy(data)
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def build_data(cfg: CaMoEConfig, rank: int, is_ddp: bool,
               vocab_ids: np.ndarray | None = None) -> tuple[TokenData, CaMoEConfig]:
    """Tokenize (rank 0 first, the others wait and reuse its cache) and open every configured source. With
    compact_vocab the vocabulary is vocab_ids (a resumed run's) or built from the data, and the returned
    config's vocab_size is its size."""
    paths = cfg.data_roots or [cfg.data_path]
    mix = cfg.mix or [1.0] * len(paths)
    if is_ddp and rank != 0:
        dist.barrier()
    sources = [load_tokens(p, cfg.cache_dir) for p in paths]
    if is_ddp and rank == 0:
        dist.barrier()
    if cfg.compact_vocab:
        present = compact_vocabulary(sources)
        if vocab_ids is not None and not np.isin(present, vocab_ids).all():  # a resumed run on changed data
            raise ValueError(f"the data has {int((~np.isin(present, vocab_ids)).sum())} token ids outside the "
                             f"checkpoint's compact vocabulary (the data changed since it was built)")
        vocab_ids = present if vocab_ids is None else vocab_ids
        cfg = dataclasses.replace(cfg, vocab_size=len(vocab_ids))
    names = [p or "built-in corpus" for p in paths]
    data = TokenData(sources, mix, cfg.ctx_len, cfg.val_fraction, cfg.vocab_size, cfg.seed + rank, names,
                     vocab_ids if cfg.compact_vocab else None)
    return data, cfg


# -----------------------------------------------------------------------------
# training


def phase_and_lr(cfg: CaMoEConfig, step: int) -> tuple[str, float]:
    """prewarm: constant lr; then common.cosine_lr: a linear ramp over warmup_steps, cosine decay to min_lr."""
    if step < cfg.prewarm_steps:
        return "prewarm", cfg.lr
    step -= cfg.prewarm_steps
    lr = cosine_lr(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr,
                   total_steps=max(cfg.max_steps - cfg.prewarm_steps, cfg.warmup_steps + 1))
    return ("warmup" if step < cfg.warmup_steps else "normal"), lr


def make_optimizer(model: CaMoE_System, cfg: CaMoEConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the .weight matrices of linear layers only, as RWKV-LM does: not on embeddings,
    DeepEmbed tables, norms, biases, or the (1, 1, C) mixes, decay/bonus vectors and LoRA factors of time mixing."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_table = name.startswith("emb.") or "k_emb" in name or "v_emb" in name
        (decay if p.dim() == 2 and name.endswith(".weight") and not is_table else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, fused=device.type == "cuda")


@torch.no_grad()
def estimate_val_loss(model: CaMoE_System, data: TokenData, cfg: CaMoEConfig, device, rank: int, world: int) -> float:
    """Mean CE over eval_iters validation batches drawn from a fixed seed (the same set at every evaluation)."""
    was_training = model.training
    model.eval()
    rng = np.random.Generator(np.random.PCG64(cfg.seed + 10_000))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(cfg.eval_iters):
        x, y = data.batch(cfg.micro_bsz, "val", rng)
        if i % world != rank:
            continue
        with bf16_autocast(device, cfg.amp):
            _, (_, loss), _ = model(x.to(device), y.to(device))
        total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def train_step(model, raw, optimizer, data, cfg, device, step, is_ddp, world) -> dict:
    """One optimizer step: grad_accum micro-batches, market settlement, clip, AdamW."""
    phase, lr = phase_and_lr(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses, skipped = [], 0
    for micro in range(cfg.grad_accum):
        x, y = data.batch(cfg.micro_bsz)
        sync = micro == cfg.grad_accum - 1
        with model.no_sync() if is_ddp and not sync else nullcontext():
            with bf16_autocast(device, cfg.amp):
                _, (total, loss), infos = model(x.to(device), y.to(device))
            finite = torch.isfinite(total).float()
            if is_ddp:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:  # skip only this micro-batch, on every rank, and forget its market entries
                skipped += 1
                for b in raw.blocks:
                    if cfg.router == "market" and b.pending:
                        b.pending.pop()
                continue
            (total / cfg.grad_accum).backward()
        losses.append(loss.item())
    market = raw.settle_market(world, prewarm=phase == "prewarm")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = dict(step=step, phase=phase, lr=lr, loss=float(np.mean(losses)) if losses else float("nan"),
               grad_norm=float(grad_norm), skipped=skipped)
    if market:
        tokens = market["tokens"]
        out["expert_share"] = (tokens / tokens.sum(-1, keepdim=True).clamp_min(1)).tolist()
        out["capital_gini"] = [gini(b.capital.capital) for b in raw.blocks]
        out["capital"] = [b.capital.capital.tolist() for b in raw.blocks]
        out["price"] = [float(i["price"].mean()) for i in infos]
    elif cfg.router == "softmax":
        out["expert_share"] = [(i["counts"].float() / i["counts"].sum()).tolist() for i in infos]
    return out


class StopFlag:
    """The first Ctrl-C (SIGINT) asks training to stop after the current step, checkpointed; a second one
    interrupts at once. Under DDP every rank stops at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, is_ddp: bool, device: torch.device) -> bool:
        if not is_ddp:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def rng_state(data: TokenData) -> dict:
    """This process's random streams: data order, and torch's (bid noise, critic samples)."""
    state = dict(data=data.state_dict(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, raw, optimizer, cfg, step, data, run_id, rank: int, world: int) -> None:
    """Called on every rank (it gathers each rank's random streams, so a resumed DDP run draws what the
    uninterrupted one would); rank 0 writes."""
    rngs = [rng_state(data)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(data))
    if rank == 0:
        atomic_save(dict(model=raw.state_dict(), optimizer=optimizer.state_dict(), config=dataclasses.asdict(cfg),
                         optimizer_names=optimizer_names(raw, optimizer), step=step, run_id=run_id, rng=rngs), path)


def optimizer_names(raw: CaMoE_System, optimizer) -> list[str]:
    """The parameter names in the optimizer's order: its saved state is indexed by position."""
    names = {id(p): n for n, p in raw.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(raw: CaMoE_System, optimizer, saved: dict, saved_names: list[str] | None) -> bool:
    """Load AdamW's moments matched by parameter name (a model that gained or reordered parameters keeps the
    moments of those it had); False, with the moments left fresh, for a checkpoint without names."""
    if saved_names is None:
        return False
    index = {n: i for i, n in enumerate(saved_names)}
    current = optimizer.state_dict()
    state = {j: saved["state"][index[n]] for j, n in enumerate(optimizer_names(raw, optimizer))
             if n in index and index[n] in saved["state"]}
    optimizer.load_state_dict(dict(state=state, param_groups=current["param_groups"]))
    return True


def restore_rng(rngs: list[dict], data: TokenData, rank: int, seed: int, step: int) -> None:
    """Give this rank the random streams it had when the checkpoint was saved."""
    if rank >= len(rngs):  # more processes than the run that saved: a fresh stream, moved past the early draws
        data.rng = np.random.Generator(np.random.PCG64(seed + rank).jumped(step))
        print(f"note: rank {rank} had no saved random state (the checkpoint has {len(rngs)}); it starts a fresh one")
        return
    data.load_state_dict(rngs[rank]["data"])
    torch.set_rng_state(rngs[rank]["torch"])
    if "cuda" in rngs[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs[rank]["cuda"])


def read_camoe_checkpoint(path) -> tuple[dict, CaMoEConfig]:
    """A CaMoE checkpoint and its config. Checkpoints saved before runs recorded their LoRA widths (an
    empty lora_dims, when the gate formula was another) get the widths their own weights have."""
    ckpt, cfg = load_checkpoint(path, CaMoEConfig)
    if not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: not a CaMoE checkpoint (no model weights)")
    weights = ckpt["model"]
    if not cfg.lora_dims and lora_dims_of(weights, cfg.n_embd):
        cfg = dataclasses.replace(cfg, lora_dims=lora_dims_of(weights, cfg.n_embd))
    return ckpt, cfg


def model_weights(ckpt: dict, cfg: CaMoEConfig) -> dict:
    """The checkpoint's weights for a model of cfg: a baseline's checkpoint written before the baselines
    stopped building the market's critic and capital has those entries dropped."""
    weights = ckpt["model"]
    if cfg.router != "market":
        weights = {k: v for k, v in weights.items() if not re.search(r"\.(critic|capital)\.|\.critic_", k)}
    return weights


def resume_config(path: Path, explicit: dict) -> tuple[dict, CaMoEConfig]:
    """The checkpoint and its config with the flags given now applied; flags that would change a weight's
    shape are refused, since the saved weights could not be loaded into that model."""
    ckpt, saved = read_camoe_checkpoint(path)
    absent = {"model", "optimizer", "step", "rng"} - set(ckpt)
    if absent:
        raise ValueError(f"{path}: not a CaMoE training checkpoint (no {', '.join(sorted(absent))})")
    for name in SHAPE_FIELDS + (("top_k",) if saved.router == "dense" else ()):  # dense: top_k sets the FFN width
        if name in explicit and explicit[name] != getattr(saved, name):
            raise ValueError(f"{path} was trained with --{name.replace('_', '-')} {getattr(saved, name)}; a resumed "
                             f"run keeps the model's shape (got {explicit[name]}; use a new --out-dir to start another)")
    cfg = dataclasses.replace(saved, **explicit)
    validate_config(cfg)
    return ckpt, cfg


def available_memory(device: torch.device) -> int:
    """Bytes free for training on device: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def training_memory(cfg: CaMoEConfig) -> tuple[int, int, int]:
    """(parameters, bytes of fp32 weights + gradients + AdamW moments, rough bytes of one micro-batch's
    activations), from a model built on the meta device (no memory, a second even at 1.5b)."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in CaMoE_System(cfg).parameters())
    # kept for backward, in fp32: about 96 width-C tensors per layer per token (time mixing and its LoRAs, DEA,
    # the experts' gathers and 4C hidden) and 4 copies of the logits; calibrated on 0.1b at 4 x 512, which
    # peaked at 14.0 GiB resident against 14.1 estimated. bf16 autocast on CUDA needs less.
    activations = cfg.micro_bsz * cfg.ctx_len * (96 * cfg.n_layer * cfg.n_embd + 4 * cfg.vocab_size) * 4
    return n_params, 16 * n_params, activations


def check_memory(cfg: CaMoEConfig, device: torch.device) -> None:
    """Say what a run will cost, and refuse in one line when the device cannot hold it."""
    n_params, states, activations = training_memory(cfg)
    free = available_memory(device)
    need = states + activations
    line = (f"size {cfg.size}: {n_params / 1e6:.1f}M parameters; training needs about {need / 2**30:.1f} GiB "
            f"(weights, gradients and AdamW {states / 2**30:.1f} GiB + activations {activations / 2**30:.1f} GiB), "
            f"{device} has {free / 2**30:.1f} GiB free")
    if need > free:
        raise ValueError(line + "; choose a smaller --size or --micro-bsz")
    print(line)


def wrap_model(raw: CaMoE_System, cfg: CaMoEConfig, device: torch.device, is_ddp: bool) -> nn.Module:
    """The module the training loop calls: raw, torch.compiled if asked, in DDP under torchrun."""
    model = raw
    if cfg.compile:
        import torch._functorch.config as aot_config
        if hasattr(aot_config, "view_replay_for_aliased_outputs"):
            # torch 2.13 regenerates aliased outputs of time mixing with garbage shapes through view replay
            aot_config.view_replay_for_aliased_outputs = False
        model = torch.compile(raw)
    if is_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # market buffers stay in step through all-reduced totals; the critic's samples are per rank, so no
        # buffer is broadcast (not even when DDP is built, as it is again at the end of prewarm)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=True, broadcast_buffers=False)
    return model.train()


def load_training_state(ckpt: dict, path: Path, raw: CaMoE_System, optimizer, data: TokenData, cfg: CaMoEConfig,
                        rank: int) -> tuple[int, str]:
    """Put a checkpoint's weights, optimizer moments and random streams in place; returns (step, run id)."""
    try:
        missing, unexpected = raw.load_state_dict(model_weights(ckpt, cfg), strict=False)
    except RuntimeError as exc:  # a size mismatch: the weights are not this config's
        raise ValueError(f"{path}: its weights do not fit its config ({str(exc).splitlines()[-1].strip()})") from None
    if unexpected or any(not k.startswith(("blocks.", "deep_embed", "bridge")) for k in missing):
        raise ValueError(f"{path}: checkpoint does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if missing:
        print(f"note: {len(missing)} parameters/buffers new since this checkpoint start from their initial values")
    if not load_optimizer_state(raw, optimizer, ckpt["optimizer"], ckpt.get("optimizer_names")):
        print("note: the checkpoint does not name its optimizer's parameters (it predates that); AdamW restarts "
              "its moments")
    step = ckpt["step"]
    restore_rng(ckpt["rng"], data, rank, cfg.seed, step)
    return step, ckpt.get("run_id", uuid.uuid4().hex[:8])


def train(cfg: CaMoEConfig, resume: bool = False, explicit: dict | None = None) -> None:
    """Train (or resume) per cfg; writes out_dir/ckpt.pt and out_dir/metrics.jsonl (rank 0)."""
    is_ddp, rank, _, world, device = setup_ddp()
    try:  # the DDP wrapper lives inside train_loop, so it is gone before its process group is destroyed
        device = device if is_ddp else pick_device(cfg.device)
        cfg, data, raw, optimizer, step, run_id = prepare_run(cfg, resume, explicit or {}, is_ddp, rank, device)
        train_loop(cfg, data, raw, optimizer, step, run_id, is_ddp, rank, world, device)
    finally:
        cleanup_ddp()


def prepare_run(cfg: CaMoEConfig, resume: bool, explicit: dict, is_ddp: bool, rank: int, device: torch.device):
    """The run's final config, data, model, optimizer, first step and run id: fresh, or from out_dir/ckpt.pt."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = base = None
    if resume:
        ckpt, cfg = resume_config(ckpt_path, explicit)
    elif cfg.init_from:
        base, shape = read_rwkv7(cfg.init_from)
        cfg = base_config(cfg, shape, explicit, cfg.init_from)
        validate_config(cfg)
    seed_everything(cfg.seed + rank)
    saved_vocab = ckpt["model"].get("vocab_ids") if ckpt is not None else None
    data, cfg = build_data(cfg, rank, is_ddp, None if saved_vocab is None else saved_vocab.numpy())
    if rank == 0:
        check_memory(cfg, device)
    # recorded in the checkpoint, so the run's weights load whatever default the formula has later
    cfg = dataclasses.replace(cfg, lora_dims=cfg.lora_dims or default_lora_dims(cfg.n_embd))
    raw = CaMoE_System(cfg)
    if base is not None:
        report = load_base_weights(raw, base, cfg.init_from)
        if rank == 0:
            print("\n".join(report))
        del base
    raw = raw.to(device)
    if cfg.compact_vocab:
        raw.vocab_ids.copy_(torch.from_numpy(data.vocab_ids))
    optimizer = make_optimizer(raw, cfg, device)
    step, run_id = 0, uuid.uuid4().hex[:8]
    if ckpt is not None:
        step, run_id = load_training_state(ckpt, ckpt_path, raw, optimizer, data, cfg, rank)
    if step < cfg.prewarm_steps and len(raw.prewarm_frozen()) == len(list(raw.parameters())):
        raise ValueError(f"--prewarm-steps {cfg.prewarm_steps}: with --router {cfg.router} and no DEA nothing "
                         f"trains in prewarm")
    return cfg, data, raw, optimizer, step, run_id


def train_loop(cfg: CaMoEConfig, data: TokenData, raw: CaMoE_System, optimizer, step: int, run_id: str,
               is_ddp: bool, rank: int, world: int, device: torch.device) -> None:
    """Steps from `step` to max_steps with evaluation, metrics, checkpoints and Ctrl-C handling."""
    from tqdm import tqdm
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    frozen = raw.prewarm_frozen()
    n_params = sum(p.numel() for p in raw.parameters())
    if rank == 0:
        print(f"CaMoE {cfg.version} size {cfg.size} router {cfg.router}: {n_params / 1e6:.1f}M parameters, "
              f"{cfg.n_layer} layers x {cfg.n_embd}, {cfg.num_rwkv_experts}R+{cfg.num_trans_experts}T experts, "
              f"top-{cfg.top_k}; device {device}, {world} process(es); run {run_id}, step {step}")
    logger = MetricsLogger(out_dir / "metrics.jsonl" if rank == 0 else None)
    tokens_per_step = cfg.micro_bsz * cfg.grad_accum * cfg.ctx_len * world
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=rank != 0,
               desc="train", unit="step")
    stop = StopFlag()
    stats, model, in_prewarm = {}, None, None
    first, started = step, time.time()
    try:
        for step in bar:
            if (step < cfg.prewarm_steps) != in_prewarm:  # (re)wrap so DDP and compile see what trains now
                in_prewarm = step < cfg.prewarm_steps
                for p in frozen:  # frozen parameters get no gradient at all, not one computed and dropped
                    p.requires_grad_(not in_prewarm)
                model = wrap_model(raw, cfg, device, is_ddp)
            t0 = time.time()
            stats = train_step(model, raw, optimizer, data, cfg, device, step, is_ddp, world)
            stats["tokens_per_s"] = tokens_per_step / (time.time() - t0)
            if step == first + 2 and rank == 0:  # the cost of the run, measured on its first steps
                per_step = (time.time() - started) / 3
                bar.write(f"first 3 steps: {per_step:.2f} s/step; the {cfg.max_steps - first} steps of this run "
                          f"will take about {per_step * (cfg.max_steps - first) / 3600:.1f} h")
            last = step + 1 == cfg.max_steps
            if cfg.eval_interval and ((step + 1) % cfg.eval_interval == 0 or last):
                stats["val_loss"] = estimate_val_loss(raw, data, cfg, device, rank, world)
            logger.log(**stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", phase=stats["phase"],
                            tok_s=f"{stats['tokens_per_s']:.0f}")
            stopping = stop.agreed(is_ddp, device)
            if (step + 1) % cfg.save_interval == 0 or last or stopping:
                save_checkpoint(ckpt_path, raw, optimizer, cfg, step + 1, data, run_id, rank, world)
            if stopping:
                if rank == 0:
                    print(f"\ninterrupted: saved {ckpt_path} after step {step + 1}; continue with --resume")
                raise SystemExit(130)
    finally:
        stop.restore()
        logger.close()
    if rank == 0 and "val_loss" in stats:
        print(f"done: step {cfg.max_steps}, val loss {stats['val_loss']:.4f}, checkpoint {ckpt_path}")


# -----------------------------------------------------------------------------
# generation: RNN-mode decoding, sampling, the routing view


def load_model(ckpt: str = "", init_from: str = "", router: str = "base", device: str = "auto") -> CaMoE_System:
    """A model for inference: a CaMoE checkpoint (its own config defines the model), or an RWKV-7 base file
    (then router base builds just the plain RWKV-7 model: one RWKV expert, no DEA)."""
    dev = pick_device(device)
    if init_from:
        base, shape = read_rwkv7(init_from)
        cfg = base_config(CaMoEConfig(router=router), shape, {}, init_from)
        if router == "base":
            cfg = dataclasses.replace(cfg, num_rwkv_experts=1, num_trans_experts=0, use_deep_embed_attention=False)
        validate_config(cfg)
        model = CaMoE_System(cfg)
        print("\n".join(load_base_weights(model, base, init_from)), file=sys.stderr)
        return model.to(dev).eval()
    saved, cfg = read_camoe_checkpoint(ckpt)
    validate_config(cfg)
    model = CaMoE_System(cfg)
    try:
        model.load_state_dict(model_weights(saved, cfg))
    except RuntimeError as exc:
        raise ValueError(f"{ckpt}: its weights do not fit its config ({str(exc).strip().splitlines()[-1].strip()})") from None
    return model.to(dev).eval()


class Vocab:
    """World-tokenizer text <-> the model's ids: the same ids, or the compact vocabulary's renumbering."""

    def __init__(self, model: CaMoE_System):
        self.tok = world_tokenizer()
        ids = model.vocab_ids.tolist() if model.cfg.compact_vocab else None
        self.to_world, self.size = ids, model.cfg.vocab_size
        self.to_model = {w: i for i, w in enumerate(ids)} if ids is not None else None
        self.eot = 0 if ids is None else self.to_model.get(0)  # end of text; a compact vocabulary may lack it

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if self.to_model is None:
            if ids and max(ids) >= self.size:
                raise ValueError(f"the text has token id {max(ids)}, beyond this model's vocabulary of {self.size}")
            return ids
        unknown = [i for i in ids if i not in self.to_model]
        if unknown:
            raise ValueError(f"the text has {len(unknown)} token(s) this model's compact vocabulary lacks, such as "
                             f"{self.tok.decode(unknown[:1])!r}")
        return [self.to_model[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids if self.to_world is None else [self.to_world[i] for i in ids])


@dataclass
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    repetition_penalty: float = 1.0   # > 1 makes tokens already in the text less likely (CTRL's rule)
    stop: list[str] = field(default_factory=list)
    seed: int = 0


def penalise_repeats(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: logits of tokens already seen are divided by penalty when positive and
    multiplied by it when negative."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    chosen = logits[idx]
    return logits.index_copy(0, idx, torch.where(chosen > 0, chosen / penalty, chosen * penalty))


@torch.no_grad()
def generate(model: CaMoE_System, prompt: list[int], sampling: Sampling, decode, state: list | None = None,
             stop_id: int | None = None) -> dict:
    """Feed the prompt in one parallel pass, then decode token by token with carried state (constant work per
    token for time mixing, the experts and the bridge; DEA attends to its cache). Stops at stop_id (the
    end-of-text token) or a stop string. Returns the new ids, their text (cut at a stop string), and per
    token and layer whether a transformer expert won it."""
    device = next(model.parameters()).device
    state = [] if state is None else state
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    logits, _, _ = model(torch.tensor([prompt], device=device), state=state)
    logits = logits[0, -1]
    ids, routes, text = [], [], ""
    R = model.cfg.num_rwkv_experts
    t0 = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        logits = penalise_repeats(logits.float().cpu(), prompt + ids, sampling.repetition_penalty)
        token = int(sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, gen))
        if token == stop_id:
            break
        ids.append(token)
        logits, _, infos = model(torch.tensor([[token]], device=device), state=state)
        logits = logits[0, -1]
        routes.append([bool((info["winners"] >= R).any()) if info else False for info in infos])
        if sampling.stop:  # only stop strings need the text while decoding
            text = decode(ids)
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
    if not sampling.stop:
        text = decode(ids)
    seconds = time.perf_counter() - t0
    return dict(ids=ids, text=text, routes=routes, tokens_per_s=len(ids) / max(seconds, 1e-9))


@torch.no_grad()
def chat_turn(model: CaMoE_System, vocab: "Vocab", state: list, message: str, sampling: Sampling) -> tuple[dict, list]:
    """One exchange: the reply to message (generate's dict) and the conversation's state after it. That state
    holds the transcript as shown, "User: message\n\nAssistant:" + the reply + a blank line, rebuilt from the
    state before the turn: decoding feeds tokens past a stop string's cut (e.g. the next "User:"), and a
    reply cut at max_new_tokens has no separator, and the next turn must start from neither."""
    turn = vocab.encode(f"User: {message}\n\nAssistant:")
    before = [copy.deepcopy(layer) for layer in state]
    result = generate(model, turn, sampling, vocab.decode, state=state, stop_id=vocab.eot)
    kept = len(result["ids"])
    while kept and len(vocab.decode(result["ids"][:kept])) > len(result["text"]):  # tokens before the cut
        kept -= 1
    try:
        separator = vocab.encode("\n\n")
    except ValueError:  # a compact vocabulary without it: the reply is followed directly by the next turn
        separator = []
    transcript = turn + result["ids"][:kept] + separator
    model(torch.tensor([transcript], device=next(model.parameters()).device), state=before)
    return result, before


def routing_view(pieces: list[str], routes: list[list[bool]], color: bool) -> str:
    """Per generated token a line: the token, then one letter per layer, R (only RWKV experts won it) or T (a
    transformer expert did), T in colour on a terminal; then per layer the share of tokens sent to a
    transformer expert."""
    if not routes:
        return "no tokens generated"
    mark = (lambda t: "\033[1;33mT\033[0m" if t else "R") if color else (lambda t: "T" if t else "R")
    lines = [f"routing (R = RWKV experts only, T = a transformer expert among the winners), {len(routes[0])} layers:"]
    for piece, route in zip(pieces, routes):
        lines.append(f"  {piece!r:>14} " + "".join(mark(t) for t in route))
    shares = torch.tensor(routes, dtype=torch.float).mean(0).tolist()
    lines.append("share of tokens to transformer experts per layer: " + " ".join(f"{s:.2f}" for s in shares))
    return "\n".join(lines)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model an inference command runs: a CaMoE checkpoint or an RWKV-7 base file, and the device."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", default="", help="a CaMoE checkpoint (out_dir/ckpt.pt)")
    source.add_argument("--init-from", default="", help="an RWKV-7 .pth base model instead (RWKV-LM's format)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run_generate(argv: list[str], chat: bool) -> None:
    """python camoe.py generate|chat: see --help."""
    parser = argparse.ArgumentParser(prog=f"camoe.py {'chat' if chat else 'generate'}",
                                     description="Chat with a CaMoE model" if chat else "Generate text with a "
                                     "CaMoE model in RNN mode and show which experts served each token")
    add_model_flags(parser)
    parser.add_argument("--router", default="base", choices=["base", "market", "softmax"],
                        help="with --init-from: base (the plain RWKV-7 model) or a fresh router (default base)")
    if not chat:
        parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--no-routing", action="store_true", help="do not print the routing view")
    for f in dataclasses.fields(Sampling):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = dict(nargs="+", type=str) if isinstance(default, list) else dict(type=type(default))
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kind,
                            help=f"sampling: {f.name.replace('_', ' ')} (default {default})")
    args = parser.parse_args(argv)
    sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
    if sampling.temperature < 0 or sampling.top_k < 0 or not 0 < sampling.top_p <= 1 or sampling.max_new_tokens < 1 \
            or sampling.repetition_penalty <= 0:
        raise ValueError("sampling needs --temperature >= 0, --top-k >= 0, --top-p in (0, 1], --max-new-tokens >= 1 "
                         "and --repetition-penalty > 0")
    model = load_model(args.ckpt, args.init_from, args.router, args.device)
    vocab = Vocab(model)
    color = sys.stdout.isatty()
    if not chat:
        prompt = vocab.encode(args.prompt) or ([vocab.eot] if vocab.eot is not None else [])
        if not prompt:
            raise ValueError("--prompt is empty and this model has no end-of-text token to start from")
        result = generate(model, prompt, sampling, vocab.decode, stop_id=vocab.eot)
        print(args.prompt + result["text"])
        if not args.no_routing:
            print(routing_view([vocab.decode([i]) for i in result["ids"]], result["routes"], color))
        print(f"{len(result['ids'])} tokens, {result['tokens_per_s']:.1f} tokens/s")
        return
    state = []  # the conversation's state carries over from turn to turn
    sampling.stop = sampling.stop or ["\n\nUser:"]
    print("chat: type a message (empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            return
        try:
            result, state = chat_turn(model, vocab, state, line, sampling)
        except ValueError as exc:  # one bad message does not end the conversation
            print(f"camoe: {exc}")
            continue
        print("Assistant:" + result["text"] + f"\n[{len(result['ids'])} tokens, {result['tokens_per_s']:.1f}/s]")
        if not args.no_routing:
            print(routing_view([vocab.decode([i]) for i in result["ids"]], result["routes"], color).splitlines()[-1])


# -----------------------------------------------------------------------------
# lm-evaluation-harness


class CaMoEScorer:
    """What lm-evaluation-harness asks of a model, on a CaMoE checkpoint (its own config defines the model):
    loglikelihood, loglikelihood_rolling and generate_until over requests whose .args are the task's strings.
    Texts longer than ctx_len are fed in windows of ctx_len with carried state (RNN mode), so every token is
    scored with its whole history; an empty context is scored from the end-of-text token (id 0).
    harness_model() turns this into the registered lm_eval model class `camoe`."""

    def __init__(self, ckpt: str = "", init_from: str = "", router: str = "base", device: str = "auto",
                 **harness_args):  # lm_eval's own CLI adds batch_size and max_batch_size: one sequence at a time here
        super().__init__()
        self.model = load_model(ckpt, init_from, router, device)
        self.vocab = Vocab(self.model)
        if self.vocab.eot is None:
            raise ValueError("this model's compact vocabulary has no end-of-text token to score texts from")
        self.eot = self.vocab.eot
        self.window = self.model.cfg.ctx_len

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(ids[i] | ids[:i]) for i >= 1, and whether each was the greedy choice: (len - 1,) each."""
        device = next(self.model.parameters()).device
        state, logprobs, greedy = [], [torch.zeros(0)], [torch.zeros(0, dtype=torch.bool)]
        for start in range(0, len(ids) - 1, self.window):
            chunk = torch.tensor([ids[start:start + self.window]], device=device)
            targets = torch.tensor(ids[start + 1:start + 1 + chunk.shape[1]], device=device)
            logits = self.model(chunk, state=state)[0][0, :len(targets)].float().log_softmax(-1)  # (L, V)
            logprobs.append(logits.gather(1, targets[:, None]).squeeze(1))
            greedy.append(logits.argmax(-1) == targets)
        return torch.cat([t.cpu() for t in logprobs]), torch.cat([t.cpu() for t in greedy])

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, cut where the context's own tokens end when they agree. As in
        lm-eval's own models, the context's trailing spaces go with the continuation (" yes", not " " "yes")."""
        stripped = context.rstrip(" ")
        context, continuation = stripped, context[len(stripped):] + continuation
        whole, ctx = self.vocab.encode(context + continuation), self.vocab.encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else self.vocab.encode(continuation)
        return [self.eot] + ctx, cont  # end-of-text first: an empty context is scored from it

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            ctx, cont = self._split(*request.args)
            logprobs, greedy = self.token_logprobs(ctx + cont)
            n = len(cont)  # an empty continuation has probability 1
            out.append((float(logprobs[len(logprobs) - n:].sum()), bool(greedy[len(greedy) - n:].all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [float(self.token_logprobs([self.eot] + self.vocab.encode(r.args[0]))[0].sum()) for r in requests]

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until", [])
            sampling = Sampling(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0)),
                                stop=[until] if isinstance(until, str) else list(until))
            out.append(generate(self.model, [self.eot] + self.vocab.encode(context), sampling, self.vocab.decode,
                                stop_id=self.eot)["text"])
        return out


@functools.cache
def harness_model() -> type:
    """CaMoEScorer as an lm_eval model class, registered as `camoe` (lm_eval is imported only here)."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    return register_model("camoe")(type("CaMoELM", (CaMoEScorer, LM), {}))


def run_lm_eval(argv: list[str]) -> dict:
    """python camoe.py lm-eval: see --help."""
    parser = argparse.ArgumentParser(prog="camoe.py lm-eval", description="Score a CaMoE checkpoint with "
                                     "lm-evaluation-harness (lm_eval.simple_evaluate), as the model `camoe`")
    add_model_flags(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAML files")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError as exc:
        raise ImportError("lm-eval needs the lm-evaluation-harness: pip install lm-eval") from exc
    model = harness_model()(ckpt=args.ckpt, init_from=args.init_from, device=args.device)
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=TaskManager(include_path=args.include_path))
    print(make_table(results))
    if args.output:
        atomic_write_bytes(json.dumps(results, default=str, indent=1).encode(), args.output)
    return results


# -----------------------------------------------------------------------------
# benchmark


def bench(cfg: CaMoEConfig, steps: int, warmup: int = 2) -> list[dict]:
    """Training step (forward, backward, settlement, AdamW) of market vs softmax vs dense on one batch of the
    configured data. The routers take turns step by step (the order rotating), so a change of load on the
    machine hits all three alike; wall time and this process's CPU time are both reported, as medians."""
    device = pick_device(cfg.device)
    data, cfg = build_data(cfg, 0, False)
    x, y = (t.to(device) for t in data.batch(cfg.micro_bsz))
    runs = {}
    for router in ROUTERS:
        c = dataclasses.replace(cfg, router=router)
        torch.manual_seed(cfg.seed)
        model = CaMoE_System(c).to(device).train()
        runs[router] = dict(model=model, optimizer=make_optimizer(model, c, device), wall=[], cpu=[], amp=c.amp)

    def one_step(run):
        with bf16_autocast(device, run["amp"]):
            _, (total, _), _ = run["model"](x, y)
        total.backward()
        run["model"].settle_market()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for rep in range(warmup + steps):
        for router in ROUTERS[rep % 3:] + ROUTERS[:rep % 3]:
            wall, cpu = time.perf_counter(), time.process_time()
            one_step(runs[router])
            if rep >= warmup:
                runs[router]["wall"].append(time.perf_counter() - wall)
                runs[router]["cpu"].append(time.process_time() - cpu)
    results = []
    for router, run in runs.items():
        model = run["model"]
        active = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
        if router != "dense":
            per_expert = [sum(p.numel() for p in e.parameters()) for e in model.blocks[0].experts]
            active += cfg.n_layer * cfg.top_k * float(np.mean(per_expert))
        wall, cpu = float(np.median(run["wall"])), float(np.median(run["cpu"]))
        results.append(dict(router=router, tokens_per_s=x.numel() / wall, ms_per_step=wall * 1e3,
                            cpu_ms_per_step=cpu * 1e3, active_params=active))
    by = {r["router"]: r for r in results}
    print(f"CaMoE training step, size {cfg.size}, B={cfg.micro_bsz} T={cfg.ctx_len} vocab {cfg.vocab_size}, "
          f"device {device}, {steps} interleaved timed steps per router (medians)")
    print(f"{'router':>8} {'tokens/s':>10} {'ms/step':>9} {'CPU ms/step':>12} {'active params':>14}")
    for r in results:
        print(f"{r['router']:>8} {r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.1f} {r['cpu_ms_per_step']:>12.1f} "
              f"{r['active_params'] / 1e6:>13.2f}M")
    ratio = lambda a, b, key: by[b][key] / by[a][key]
    print(f"market / softmax = {ratio('market', 'softmax', 'ms_per_step'):.2f}x wall, "
          f"{ratio('market', 'softmax', 'cpu_ms_per_step'):.2f}x CPU (target >= 0.9); market / dense = "
          f"{ratio('market', 'dense', 'ms_per_step'):.2f}x wall, {ratio('market', 'dense', 'cpu_ms_per_step'):.2f}x CPU")
    return results


# -----------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train CaMoE (RWKV-7 backbone + market-routed experts). Every config field is a flag; "
                    "unset flags take the --size preset's value.",
)
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt (flags given now "
                        "override the checkpoint's config)")
    parser.add_argument("--bench", action="store_true", help="print training tokens/s of market vs softmax vs "
                        "dense and exit")
    parser.add_argument("--bench-steps", type=int, default=5, help="timed steps per router in --bench (default 5)")
    add_config_flags(parser, CaMoEConfig, label="0.4b", choices={"size": list(SIZES), "router": list(ROUTERS)})
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[CaMoEConfig, dict]:
    """The size preset, then every flag given explicitly; returns (config, the explicit flags)."""
    explicit = given_flags(args, CaMoEConfig)
    size = explicit.pop("size", "0.4b")
    cfg = dataclasses.replace(CaMoEConfig(size=size, **SIZES[size]), **explicit)
    return cfg, explicit


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("generate", "chat", "lm-eval"):
        try:
            if argv[0] == "lm-eval":
                run_lm_eval(argv[1:])
            else:
                run_generate(argv[1:], chat=argv[0] == "chat")
            return
        except (ValueError, OSError, ImportError) as exc:
            raise SystemExit(f"camoe: error: {exc}") from None
    args = build_parser().parse_args(argv)
    cfg, explicit = config_from_args(args)
    if not args.resume and not cfg.init_from and "prewarm_steps" not in explicit:
        # prewarm protects a base model's knowledge while the new parts catch up; from scratch there is none
        cfg = dataclasses.replace(cfg, prewarm_steps=0)
    try:
        if args.bench_steps < 1:
            raise ValueError(f"--bench-steps must be >= 1, got {args.bench_steps}")
        if not args.resume:  # a resumed run is checked once its checkpoint's config is known
            validate_config(cfg)
        if args.bench:
            bench(cfg, args.bench_steps)
        else:
            train(cfg, resume=args.resume, explicit=explicit)
    except (ValueError, OSError, ImportError) as exc:
        raise SystemExit(f"camoe: error: {exc}") from None


if __name__ == "__main__":
    main()
