"""
CTM self-play: a Continuous Thought Machine whose thinking is trained as a two-tick state improver.

    python ctm_master.py                               # the self-improvement loop (a small maze run, ~10 min)
    python ctm_master.py --pretrain --task parity      # standard CTM training: backbone + first weight pool
    python ctm_master.py --generate                    # one data-generation phase into the replay buffers
    python ctm_master.py --train-onm-offline           # milestone 7: the optic nerve model on stored pairs
    python ctm_master.py --experiment filter           # also onm, cohort, loss: two arms of the loop, a table
    python ctm_master.py --debug-step                  # milestone 1: state package round trip + one step
    python ctm_master.py --bench                       # threaded pipeline vs serial; streaming vs whole

The model is the published CTM (Sakana AI, 2025): a backbone turns the input into static kv; every tick a
synapse network mixes (attention output, post-activations) into pre-activations, each neuron's private MLP
(neuron-level model, NLM) reads its last M pre-activations, and the synchronisation of fixed neuron pairs,
kept recursively as (alpha, beta), is the query for attention and the input of the readout.
The seed's thinking unit f(State_t, kv) -> State_{t+2} is two of those ticks with one set of weights.
Long forward passes from a weight pool give trajectories; a streaming filter keeps the (State_t, State_{t+2})
pairs in which loss falls and certainty rises, and a disk replay buffer stores them with their provenance.

The state package and what training does with each part (the unit reads z, A, alpha, beta; o, y, C are
outputs). In the reference's in-tick order the attention of tick t+1 is computed from z_t and the action
synchronisation, so the stored o_t is never read again: it is kept as a target, not as an input.
- z (B, D), A (B, D, M): inputs and learned targets. The first M-2 columns of A_{t+2} are the last M-2
  columns of A_t, so their error is zero for any weights; only the two new pre-activations carry signal.
- alpha (B, S_action + S_out): input and learned target (it trains the NLM/synapse outputs through the
  pairwise products and the decays through r).
- beta (B, S_action + S_out): input and target, but beta_{t+2} = r^2 beta_t + r + 1 depends only on the
  decays r and the tick count, never on the data. It is carried (not rebuilt from a tick counter, which the
  state does not hold), so its error only pulls the decays toward those of the weights that made the pair.
- o (B, d_input): a learned target only: o_{t+2} = attention(q_proj(S_action), kv) is recomputed inside the
  unit. Its error reaches q_proj and the attention directly, the reason the seed gives for two ticks.
- y (B, out_dims), C (B,): recomputed from the out synchronisation by the readout; used to filter and to
  evaluate, not trained by the state loss. kv is not part of the state: it is recomputed from the pair's
  data ID with the pool's shared backbone, which is frozen after pretraining (a stored pair's kv would
  otherwise depend on when it is recomputed).

Trajectories start from generate_initial_state(): the optic nerve model's guess with --onm, else zeros (the
seed's milestone 1) or the CTM's learned start state; their tick-0 prediction is the backbone's first
impression (y_base, C_base).

The loop (MasterTrainer) repeats: generate pairs with the pool (best_model.pth with probability p, else an
expert_pool/ member) -> train the optic nerve model (--onm) and a cohort of challengers from best_model.pth
on the mixing sampler (a share q of each batch from the expert buffer) -> score best and challengers by
StateImprovementScore on held-out pairs, promote the highest. p rises and q falls over the cycles.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (MetricsLogger, add_config_flags, atomic_save, atomic_write, atomic_write_bytes,
                    config_field, cosine_lr,
                    given_flags, load_checkpoint, pick_device, seed_everything, time_calls)

# -----------------------------------------------------------------------------
# configuration


def require_at_least(config: object, names: tuple[str, ...], low: float) -> None:
    """One error line for the first field below `low` (written so that NaN fails too)."""
    for name in names:
        if not getattr(config, name) >= low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(config, name)}")


@dataclass
class CTMConfig:
    """The task and the model's shape: stored with every weight file, equal across a weight pool."""
    task: str = config_field("maze", "task: maze routes, or the cumulative parity of a +-1 sequence",
                             choices=("maze", "parity"))
    data_seed: int = config_field(0, "seed of the task generator: a data ID maps to the same sample under it")
    parity_len: int = config_field(16, "parity: sequence length")
    maze_size: int = config_field(4, "maze: cells per side (the image is 2*size+1 pixels wide)")
    maze_route_len: int = config_field(12, "maze: route length in moves (longer routes are not generated; "
                                       "shorter ones are padded with 'stay')")
    maze_width: int = config_field(64, "maze: channels of the convolutional backbone")
    d_model: int = config_field(256, "neurons D")
    d_input: int = config_field(64, "width of kv and of the attention output")
    heads: int = config_field(4, "attention heads")
    n_synch_out: int = config_field(32, "neurons in the output synchronisation")
    n_synch_action: int = config_field(32, "neurons in the action (attention query) synchronisation")
    neuron_select: str = config_field("random", "neuron pairing: 'random' pairs every selected left neuron "
                                      "with every selected right one (upper triangle, n(n+1)/2 features); "
                                      "'random-pairing' uses n fixed pairs", choices=("random", "random-pairing"))
    pairing_seed: int = config_field(0, "seed of the neuron pairs, shared by every model of a pool")
    synapse_depth: int = config_field(1, "synapse depth: 1 is Linear+GLU+LayerNorm, more is a U-Net")
    memory_length: int = config_field(10, "pre-activation history M that each NLM reads")
    nlm_hidden: int = config_field(16, "hidden width of the deep NLMs (0: one linear layer per neuron)")
    dropout: float = config_field(0.0, "dropout in synapses, NLMs and attention")
    ticks: int = config_field(25, "internal ticks in standard CTM training (--pretrain)")

    def check(self) -> None:
        positive = ("parity_len", "maze_size", "maze_route_len", "maze_width", "d_model", "d_input", "heads",
                    "n_synch_out", "n_synch_action", "synapse_depth", "memory_length", "ticks")
        require_at_least(self, positive, 1)
        if self.d_input % self.heads:
            raise ValueError(f"--d-input ({self.d_input}) must be a multiple of --heads ({self.heads})")
        if self.nlm_hidden < 0 or not 0 <= self.dropout < 1:
            raise ValueError("--nlm-hidden must be >= 0 and --dropout in [0, 1)")
        if self.maze_size < 2:
            raise ValueError(f"--maze-size must be >= 2 (a route needs two cells), got {self.maze_size}")
        if self.maze_route_len < 2:
            raise ValueError(f"--maze-route-len must be >= 2 (one cell is 2 moves), got {self.maze_route_len}")

    @property
    def out_shape(self) -> tuple[int, int]:
        """(positions, classes) of one prediction."""
        return (self.parity_len, 2) if self.task == "parity" else (self.maze_route_len, 5)

    @property
    def out_dims(self) -> int:
        return self.out_shape[0] * self.out_shape[1]

    @property
    def n_kv(self) -> int:
        return self.parity_len if self.task == "parity" else (2 * self.maze_size + 1) ** 2

    def synch_size(self, n: int) -> int:
        return n * (n + 1) // 2 if self.neuron_select == "random" else n


@dataclass
class RunConfig:
    """Everything about a run that is not the model's shape; each field is a flag."""
    out_dir: str = config_field("", "root of backbone.pth, best_model.pth, challenger_cohort/, expert_pool/ "
                                "and the two replay buffers ('': runs/ctm-TASK)")
    device: str = config_field("auto", "auto, cpu, cuda or cuda:N")
    threads: int = config_field(0, "torch CPU threads (0: torch's default)")
    seed: int = config_field(0, "seed of weights, data order and sampling")
    # pretraining (standard CTM training)
    batch_size: int = config_field(32, "pretraining batch size")
    lr: float = config_field(1e-3, "peak learning rate (AdamW)")
    warmup: int = config_field(500, "linear warm-up iterations")
    iters: int = config_field(0, "pretraining iterations, where the cosine ends (0: 4000 for parity, the "
                              "reference's setting, 1200 for mazes)")
    clip_quantile: float = config_field(0.9, "clip each gradient at this quantile of its last 1000 norms "
                                        "(1 disables)")
    weight_decay: float = config_field(0.0, "AdamW weight decay")
    eval_every: int = config_field(500, "evaluate every N pretraining iterations")
    eval_samples: int = config_field(2048, "held-out samples per evaluation")
    pool_every: int = config_field(1000, "copy the pretraining weights into expert_pool/ every N iterations")
    pool_random: int = config_field(2, "random initialisations put into expert_pool/")
    save_every: int = config_field(250, "write the resumable pretraining checkpoint every N iterations")
    # data generation
    gen_batches: int = config_field(4, "batches per data-generation phase")
    gen_batch_size: int = config_field(32, "samples per generation batch")
    gen_ticks: int = config_field(250, "ticks of each long forward pass")
    chunk_ticks: int = config_field(10, "ticks the device computes before handing a chunk to the workers")
    filter: str = config_field("lenient", "strict: loss falls and certainty rises at both steps; "
                               "lenient: only t+2 against t", choices=("strict", "lenient"))
    p_best: float = config_field(0.5, "probability that a generation batch uses best_model.pth (else a random "
                                 "expert_pool/ member)")
    init_state: str = config_field("zeros", "start of each trajectory: zeros (seed milestone 1) or the "
                                   "CTM's learned start state", choices=("zeros", "learned"))
    weight_noise: float = config_field(0.0, "per batch, add N(0, (s * std of each weight tensor)^2) to the weights")
    act_noise: float = config_field(0.0, "per tick, add N(0, s^2) to the post-activations z")
    workers: int = config_field(1, "CPU filter workers (each owns a slice of the batch)")
    io_threads: int = config_field(1, "threads writing pairs to the replay buffers")
    queue_size: int = config_field(2, "chunks (per worker) and pair batches (I/O) that may wait in a queue")
    buffer_capacity: int = config_field(200_000, "pairs kept per replay buffer (oldest files dropped first)")
    val_fraction: float = config_field(0.1, "fraction of data IDs whose pairs are held out for the tournament")
    # the self-improvement loop (MasterTrainer)
    cycles: int = config_field(5, "cycles of generation -> training -> evaluation")
    cohort: int = config_field(3, "challengers trained from best_model.pth per cycle, each with its own seed")
    train_steps: int = config_field(150, "training steps of each challenger per cycle")
    train_batch: int = config_field(64, "pairs per training batch")
    unit_lr: float = config_field(1e-4, "learning rate of the thinking unit on pairs (AdamW)")
    state_loss: str = config_field("sum", "sum: the seed's sum of the parts' MSEs; normalised: each MSE divided "
                                   "by its target's variance in the batch (beta, in the hundreds, dominates the sum)",
                                   choices=("sum", "normalised"))
    p_end: float = config_field(0.8, "--p-best anneals linearly to this by the last cycle")
    q_start: float = config_field(0.8, "share of each training batch from expert_replay_buffer/ in the first cycle")
    q_end: float = config_field(0.2, "... and in the last cycle (the rest comes from self_play_replay_buffer/)")
    val_pairs: int = config_field(1024, "held-out pairs of the tournament's validation set")
    task_every: int = config_field(2, "measure the best model on the task every N cycles (and after the last)")
    task_samples: int = config_field(512, "held-out samples of each task measurement")
    task_budget: int = config_field(50, "ticks of the fixed-budget task measurement")
    confidence: float = config_field(0.8, "iterate-until-confident decoding stops a sample at this certainty")
    tick_cap: int = config_field(100, "... or after this many ticks")
    onm: bool = config_field(False, "use and train the optic nerve model for the start states")
    onm_steps: int = config_field(300, "optic nerve model training steps per cycle (and in --train-onm-offline)")
    onm_lr: float = config_field(1e-3, "learning rate of the optic nerve model (AdamW)")

    def check(self) -> None:
        positive = ("batch_size", "eval_every", "eval_samples", "pool_every", "save_every",
                    "gen_batches", "gen_batch_size", "gen_ticks", "chunk_ticks", "workers", "io_threads",
                    "queue_size", "buffer_capacity", "cycles", "cohort", "train_steps", "train_batch", "val_pairs",
                    "task_every", "task_samples", "task_budget", "tick_cap", "onm_steps")
        require_at_least(self, positive, 1)
        require_at_least(self, ("threads", "iters", "warmup", "pool_random", "weight_noise", "act_noise",
                                 "weight_decay"), 0)
        if not self.lr > 0 or not 0 < self.clip_quantile <= 1 or not 0 <= self.p_best <= 1:
            raise ValueError("--lr must be > 0, --clip-quantile in (0, 1] and --p-best in [0, 1]")
        if not 0.001 <= self.val_fraction < 1:             # held out by data ID modulo 1000
            raise ValueError(f"--val-fraction must be in [0.001, 1), got {self.val_fraction}")
        if self.tick_cap % 2:
            raise ValueError(f"--tick-cap must be even (the unit thinks two ticks at a time), got {self.tick_cap}")
        for name in ("p_end", "q_start", "q_end", "confidence"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not self.unit_lr > 0 or not self.onm_lr > 0:
            raise ValueError("--unit-lr and --onm-lr must be > 0")
        if self.gen_ticks < 2:
            raise ValueError(f"--gen-ticks must be >= 2 (a pair spans two ticks), got {self.gen_ticks}")
        if self.workers > self.gen_batch_size:
            raise ValueError(f"--workers ({self.workers}) cannot exceed --gen-batch-size ({self.gen_batch_size}): "
                             "workers split the batch")


DEFAULT_THREADS = torch.get_num_threads()             # torch's intra-op threads before any --threads


class CTMError(ValueError):
    """A problem with the user's input (a file, a flag, an out-dir): reported as one line."""

# -----------------------------------------------------------------------------
# tasks: every sample is a pure function of (data_seed, data ID), so kv can be rebuilt from the ID

DEFAULT_ITERS = {"parity": 4000, "maze": 1200}     # --iters 0
TEST_ID_BASE = 1 << 60          # held-out samples use IDs from here; training IDs are drawn below it
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))      # classes 0 up, 1 down, 2 left, 3 right; 4 is "stay"


def sample_rng(cfg: CTMConfig, data_id: int) -> np.random.Generator:
    return np.random.default_rng([cfg.data_seed, int(data_id)])


def parity_sample(cfg: CTMConfig, data_id: int) -> tuple[np.ndarray, np.ndarray]:
    """x: +-1 (L,); target: cumulative parity of the -1s (L,) in {0, 1}."""
    x = sample_rng(cfg, data_id).integers(0, 2, cfg.parity_len) * 2 - 1
    return x.astype(np.float32), np.cumsum(x == -1) % 2


def make_maze(rng: np.random.Generator, n: int) -> np.ndarray:
    """A perfect maze of n x n cells by randomised depth-first search: (2n+1, 2n+1) bool, True = open."""
    open_ = np.zeros((2 * n + 1, 2 * n + 1), dtype=bool)
    visited = np.zeros((n, n), dtype=bool)
    stack = [(int(rng.integers(n)), int(rng.integers(n)))]
    visited[stack[0]] = True
    open_[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = True
    while stack:
        r, c = stack[-1]
        nexts = [(r + dr, c + dc) for dr, dc in MOVES
                 if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr, c + dc]]
        if not nexts:
            stack.pop()
            continue
        nr, nc = nexts[int(rng.integers(len(nexts)))]
        visited[nr, nc] = True
        open_[r + nr + 1, c + nc + 1] = True            # the wall between the two cells
        open_[2 * nr + 1, 2 * nc + 1] = True
        stack.append((nr, nc))
    return open_


def maze_bfs(open_: np.ndarray, start: tuple[int, int]) -> dict[tuple[int, int], tuple[int, int] | None]:
    """Parent of every open pixel on its shortest route from start (start's parent is None)."""
    parent = {start: None}
    frontier = deque([start])
    while frontier:
        r, c = frontier.popleft()
        for dr, dc in MOVES:
            nxt = (r + dr, c + dc)
            if open_[nxt] and nxt not in parent:
                parent[nxt] = (r, c)
                frontier.append(nxt)
    return parent


def maze_sample(cfg: CTMConfig, data_id: int) -> tuple[np.ndarray, np.ndarray]:
    """x: (3, H, W) channels open / start / goal; target: the route's moves (route_len,), padded with 4.
    The goal is drawn among the cells whose route from the start fits in route_len moves."""
    rng = sample_rng(cfg, data_id)
    n = cfg.maze_size
    open_ = make_maze(rng, n)
    start = (2 * int(rng.integers(n)) + 1, 2 * int(rng.integers(n)) + 1)
    parent = maze_bfs(open_, start)
    depth = {start: 0}
    for pixel in parent:                                # BFS order: a parent's depth is known first
        if parent[pixel] is not None:
            depth[pixel] = depth[parent[pixel]] + 1
    goals = sorted(p for p in parent if p[0] % 2 and p[1] % 2 and 0 < depth[p] <= cfg.maze_route_len)
    goal = goals[int(rng.integers(len(goals)))]
    route = []
    pixel = goal
    while parent[pixel] is not None:
        prev = parent[pixel]
        route.append(MOVES.index((pixel[0] - prev[0], pixel[1] - prev[1])))
        pixel = prev
    target = np.full(cfg.maze_route_len, 4)
    target[:len(route)] = route[::-1]
    x = np.zeros((3,) + open_.shape, dtype=np.float32)
    x[0], x[1][start], x[2][goal] = open_, 1.0, 1.0
    return x, target


def task_batch(cfg: CTMConfig, ids: torch.Tensor | list[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, positions) of the given data IDs, on device."""
    make = parity_sample if cfg.task == "parity" else maze_sample
    xs, targets = zip(*(make(cfg, int(i)) for i in ids))
    return (torch.from_numpy(np.stack(xs)).to(device),
            torch.from_numpy(np.stack(targets)).long().to(device))


def train_ids(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, TEST_ID_BASE, n, dtype=np.int64))


def test_ids(n: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(TEST_ID_BASE + offset, TEST_ID_BASE + offset + n, dtype=torch.int64)

# -----------------------------------------------------------------------------
# losses and certainty


def certainty(y: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """1 - entropy / log(classes), averaged over positions: (B, out_dims) -> (B,)."""
    logp = F.log_softmax(y.view(y.size(0), *out_shape).float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1.0 - entropy.mean(-1) / math.log(out_shape[1])


def tick_losses(y: torch.Tensor, targets: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy per position (..., B, out_dims) -> (..., B, positions); targets (B, positions)."""
    logits = y.view(*y.shape[:-1], *out_shape).float()
    return -torch.gather(F.log_softmax(logits, -1), -1,
                         targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def ctm_loss(cfg: CTMConfig, ys: torch.Tensor, cs: torch.Tensor, targets: torch.Tensor,
             curriculum: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The CTM loss: mean of the cross-entropy at the min-loss tick and at the most-certain tick.
    ys (T, B, out_dims), cs (T, B), targets (B, positions). Mazes count route steps up to the first wrong one
    plus `curriculum` (the reference's auto-curriculum). Returns (loss, most-certain tick per sample)."""
    losses = tick_losses(ys, targets, cfg.out_shape)                        # (T, B, P)
    if cfg.task == "maze":
        wrong = ys.view(*ys.shape[:2], *cfg.out_shape).argmax(-1) != targets   # (T, B, P)
        first_wrong = torch.where(wrong.any(-1), wrong.float().argmax(-1), wrong.size(-1))
        upto = (first_wrong.max(0).values + curriculum).clamp(max=targets.size(-1))  # (B,)
        mask = (torch.arange(targets.size(-1), device=ys.device) < upto[:, None]).float()  # (B, P)
        per_tick = (losses * mask).sum(-1) / mask.sum(-1)
    else:
        per_tick = losses.mean(-1)                                          # (T, B)
    batch = torch.arange(ys.size(1), device=ys.device)
    most_certain = cs.argmax(0)
    loss = (per_tick[per_tick.argmin(0), batch] + per_tick[most_certain, batch]).mean() / 2
    return loss, most_certain

# -----------------------------------------------------------------------------
# building blocks


class Backbone(nn.Module):
    """Input -> static kv (B, N_kv, d_input) and a first impression y_base (B, out_dims).

    parity: an embedding of +-1 plus the reference's rotational 1-D position code; maze: a stride-1 residual
    conv net over the image with two coordinate channels (position is explicit: our mazes are small, there
    is no compute to spare for finding it). y_base is a low-rank linear readout of kv, trained on kv detached
    so that it never shapes the CTM's features.
    """

    def __init__(self, cfg: CTMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.task == "parity":
            self.embed = nn.Embedding(2, cfg.d_input)
            self.pos = nn.Linear(2, cfg.d_input)
            d_backbone = cfg.d_input
        else:
            w = cfg.maze_width
            self.stem = nn.Sequential(nn.Conv2d(5, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
            self.blocks = nn.ModuleList(nn.Sequential(
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)) for _ in range(2))
            d_backbone = w
        self.kv_proj = nn.Sequential(nn.Linear(d_backbone, cfg.d_input), nn.LayerNorm(cfg.d_input))
        self.base_head = nn.Sequential(nn.Linear(cfg.d_input, 8), nn.Flatten(),
                                       nn.Linear(cfg.n_kv * 8, cfg.out_dims))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "parity":                                   # x (B, L) of +-1
            angle = torch.linspace(0, math.pi, x.size(1), device=x.device)
            position = self.pos(torch.stack((-torch.sin(angle), torch.cos(angle)), -1))   # (L, d)
            return self.embed((x == 1).long()) + position               # (B, L, d)
        B, _, H, W = x.shape                                             # x (B, 3, H, W)
        coords = torch.stack(torch.meshgrid(torch.linspace(-1, 1, H, device=x.device),
                                            torch.linspace(-1, 1, W, device=x.device), indexing="ij"))
        h = self.stem(torch.cat((x, coords.expand(B, -1, -1, -1)), 1))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return h.flatten(2).transpose(1, 2)                             # (B, H*W, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv_proj(self.features(x))                             # (B, N_kv, d_input)
        return kv, self.base_head(kv.detach())


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's computation for a single query token, with the key/value projections split
    out: kv is static across ticks, so they are computed once per input instead of once per tick."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_in, self.kv_in, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        bound = math.sqrt(6 / (4 * d))                  # xavier_uniform over MHA's (3d, d) in_proj_weight
        for lin in (self.q_in, self.kv_in):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out.bias)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> keys (B, h, d/h, N) pre-scaled by 1/sqrt(d/h), values (B, h, N, d/h)."""
        B, N, d = kv.shape
        k, v = self.kv_in(kv).view(B, N, 2, self.heads, d // self.heads).unbind(2)
        return k.permute(0, 2, 3, 1) / math.sqrt(d // self.heads), v.transpose(1, 2)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, d = q.shape
        q = self.q_in(q).view(B, self.heads, 1, d // self.heads)
        weights = torch.softmax(q @ keys, dim=-1)                       # (B, h, 1, N)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.out((weights @ values).view(B, d))                  # (B, d)


class NeuronLevelModels(nn.Module):
    """A private MLP per neuron over its pre-activation history: (B, D, M) -> (B, D).

    The reference's einsum('BDM,MHD->BDH') runs as thousands of small copies and matmuls, and its GLU splits
    the last dimension into strided halves. Here each layer's weights are stored neuron-major (D, in, out),
    with the GLU's value and gate halves as separate tensors: a layer is two batched matmuls over neurons on
    a transposed view and a contiguous value * sigmoid(gate). Same function, same initialisation."""

    def __init__(self, d_model: int, memory: int, hidden: int, dropout: float):
        super().__init__()
        widths = [memory, hidden, 1] if hidden else [memory, 1]
        self.layers = nn.ModuleList()
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            bound = 1 / math.sqrt(d_in + 2 * d_out)     # the reference's SuperLinear(d_in, 2 d_out) init
            layer = nn.Module()
            for half in ("value", "gate"):
                layer.register_parameter(f"w_{half}", nn.Parameter(
                    torch.empty(d_model, d_in, d_out).uniform_(-bound, bound)))
                layer.register_parameter(f"b_{half}", nn.Parameter(torch.zeros(d_model, 1, d_out)))
            layer.temperature = nn.Parameter(torch.ones(1))
            self.layers.append(layer)
        self.dropout = dropout

    def scaled(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (w_value, b_value, w_gate, b_gate) divided by the learned temperature, once per pass:
        (h w + b) / t = h (w / t) + b / t, and the weights are smaller than the activations."""
        return [tuple(getattr(layer, name) / layer.temperature for name in ("w_value", "b_value", "w_gate", "b_gate"))
                for layer in self.layers]

    def forward(self, A: torch.Tensor, scaled: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        h = A.transpose(0, 1)                                            # (D, B, M)
        for w_value, b_value, w_gate, b_gate in scaled:
            h = F.dropout(h, self.dropout, self.training)
            h = torch.baddbmm(b_value, h, w_value) * torch.sigmoid(torch.baddbmm(b_gate, h, w_gate))  # (D, B, out)
        return h.squeeze(-1).t().contiguous()                            # (B, D)


class SynapseUNet(nn.Module):
    """The reference's deep synapses: widths linspace(D, 16, depth), Linear-LN-SiLU down and up, skips merged
    as LayerNorm(up + skip)."""

    def __init__(self, d_in: int, d_model: int, depth: int, dropout: float):
        super().__init__()
        widths = [int(w) for w in np.linspace(d_model, 16, depth)]
        self.first = nn.Sequential(nn.Linear(d_in, widths[0]), nn.LayerNorm(widths[0]), nn.SiLU())
        def block(a: int, b: int) -> nn.Module:
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU())
        self.down = nn.ModuleList(block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(block(b, a) for a, b in zip(widths[:-1], widths[1:]))
        self.skip_norms = nn.ModuleList(nn.LayerNorm(w) for w in widths[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.first(x)]
        for layer in self.down:
            outs.append(layer(outs[-1]))
        h = outs[-1]
        for i in reversed(range(len(self.up))):
            h = self.skip_norms[i](self.up[i](h) + outs[i])
        return h


def synapses(cfg: CTMConfig) -> nn.Module:
    d_in = cfg.d_input + cfg.d_model
    if cfg.synapse_depth == 1:
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d_in, 2 * cfg.d_model), nn.GLU(),
                             nn.LayerNorm(cfg.d_model))
    return SynapseUNet(d_in, cfg.d_model, cfg.synapse_depth, cfg.dropout)


def neuron_pairs(cfg: CTMConfig) -> dict[str, torch.Tensor]:
    """The fixed neuron pairs (2, S) of the action and the out synchronisation, drawn from pairing_seed alone
    so that every model of a pool pairs the same neurons. 'random' draws n left and n right neurons (with
    replacement, as the reference) and pairs left i with right j for i <= j."""
    gen = torch.Generator().manual_seed(cfg.pairing_seed)
    pairs = {}
    for kind, n in (("action", cfg.n_synch_action), ("out", cfg.n_synch_out)):
        left, right = torch.randint(cfg.d_model, (2, n), generator=gen)
        if cfg.neuron_select == "random":
            i, j = torch.triu_indices(n, n)
            left, right = left[i], right[j]
        pairs[kind] = torch.stack((left, right))
    return pairs

# -----------------------------------------------------------------------------
# the state package and the thinking unit


@dataclass
class State:
    """Everything the CTM carries from one tick to the next (see the module docstring for each part)."""
    z: torch.Tensor                   # (B, D) post-activations
    A: torch.Tensor                   # (B, D, M) pre-activation history, newest last
    alpha: torch.Tensor               # (B, S_action + S_out) synchronisation numerators
    beta: torch.Tensor                # (B, S_action + S_out) synchronisation denominators
    o: torch.Tensor                   # (B, d_input) attention output of the last tick
    y: torch.Tensor | None = None     # (B, out_dims) logits
    C: torch.Tensor | None = None     # (B,) certainty
    PARTS: ClassVar[tuple[str, ...]] = ("z", "A", "alpha", "beta", "o")     # the learned targets
    FIELDS: ClassVar[tuple[str, ...]] = PARTS + ("y", "C")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FIELDS if getattr(self, name) is not None}

    def map(self, fn) -> "State":
        return State(**{name: fn(t) for name, t in self.tensors().items()})

    def mse(self, target: "State") -> dict[str, torch.Tensor]:
        """MSE of each learned part against target: the seed's loss is their sum."""
        return {name: F.mse_loss(getattr(self, name), getattr(target, name)) for name in self.PARTS}

    @staticmethod
    def cat(states: list["State"]) -> "State":
        return State(**{name: torch.cat([s.tensors()[name] for s in states]) for name in states[0].tensors()})


class PassConstants(NamedTuple):
    keys: torch.Tensor            # (B, heads, d/heads, N_kv), scaled
    values: torch.Tensor          # (B, heads, N_kv, d/heads)
    r_action: torch.Tensor        # (S_action,) per-pair decay factors exp(-decay)
    r_out: torch.Tensor           # (S_out,)
    nlm: list                     # NeuronLevelModels.scaled()


class ThinkingUnit(nn.Module):
    """The CTM's recurrent core: synapses, NLMs, synchronisation, attention and readout.

    tick() is one reference tick; forward(state, kv) is the seed's two-tick unit f(State_t, kv) -> State_{t+2}.
    """

    def __init__(self, cfg: CTMConfig):
        super().__init__()
        self.cfg = cfg
        D, M = cfg.d_model, cfg.memory_length
        self.s_action, self.s_out = cfg.synch_size(cfg.n_synch_action), cfg.synch_size(cfg.n_synch_out)
        for kind, pairs in neuron_pairs(cfg).items():
            self.register_buffer(f"pairs_{kind}", pairs)
        self.decay_action = nn.Parameter(torch.zeros(self.s_action))
        self.decay_out = nn.Parameter(torch.zeros(self.s_out))
        self.q_proj = nn.Linear(self.s_action, cfg.d_input)
        self.attention = CrossAttention(cfg.d_input, cfg.heads, cfg.dropout)
        self.synapses = synapses(cfg)
        self.nlm = NeuronLevelModels(D, M, cfg.nlm_hidden, cfg.dropout)
        self.readout = nn.Linear(self.s_out, cfg.out_dims)
        self.start_z = nn.Parameter(torch.empty(D).uniform_(-math.sqrt(1 / D), math.sqrt(1 / D)))
        self.start_A = nn.Parameter(torch.empty(D, M).uniform_(-math.sqrt(1 / (D + M)), math.sqrt(1 / (D + M))))

    def decays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """r = exp(-decay) per synchronised pair; decays are clamped to [0, 15] in place, as the reference."""
        with torch.no_grad():
            self.decay_action.clamp_(0, 15)
            self.decay_out.clamp_(0, 15)
        return torch.exp(-self.decay_action), torch.exp(-self.decay_out)

    def pair_products(self, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """z_left * z_right for every pair: (B, D) -> (B, S)."""
        return torch.index_select(z, 1, pairs.view(-1)).view(z.size(0), 2, -1).prod(1)

    def start_state(self, batch: int, learned: bool) -> State:
        """The reference's start (learned z0 and A0, out sync seeded with z0's pair products, action sync
        empty), or all zeros. Either is continued exactly by tick()."""
        cfg = self.cfg
        z = self.start_z.expand(batch, -1) if learned else self.start_z.new_zeros(batch, cfg.d_model)
        A = (self.start_A.expand(batch, -1, -1) if learned
             else self.start_A.new_zeros(batch, cfg.d_model, cfg.memory_length))
        alpha = torch.cat((z.new_zeros(batch, self.s_action), self.pair_products(z, self.pairs_out)), 1)
        beta = torch.cat((z.new_zeros(batch, self.s_action), z.new_full((batch, self.s_out), float(learned))), 1)
        return State(z=z, A=A, alpha=alpha, beta=beta, o=z.new_zeros(batch, cfg.d_input))

    def constants(self, kv: torch.Tensor) -> PassConstants:
        """What every tick of one pass shares: kv's keys and values, the decays, the scaled NLM weights."""
        return PassConstants(*self.attention.project_kv(kv), *self.decays(), self.nlm.scaled())

    def tick(self, s: State, c: PassConstants) -> State:
        """One tick in the reference's order: action sync from z -> attention -> synapses -> history -> NLMs
        -> out sync -> logits and certainty."""
        S = self.s_action
        alpha_a = c.r_action * s.alpha[:, :S] + self.pair_products(s.z, self.pairs_action)
        beta_a = c.r_action * s.beta[:, :S] + 1
        o = self.attention(self.q_proj(alpha_a * torch.rsqrt(beta_a)), c.keys, c.values)   # (B, d_input)
        a = self.synapses(torch.cat((o, s.z), dim=-1))                  # (B, D)
        A = torch.cat((s.A[:, :, 1:], a.unsqueeze(-1)), dim=-1)          # (B, D, M)
        z = self.nlm(A, c.nlm)
        alpha_o = c.r_out * s.alpha[:, S:] + self.pair_products(z, self.pairs_out)
        beta_o = c.r_out * s.beta[:, S:] + 1
        y = self.readout(alpha_o * torch.rsqrt(beta_o))
        return State(z=z, A=A, alpha=torch.cat((alpha_a, alpha_o), 1), beta=torch.cat((beta_a, beta_o), 1),
                     o=o, y=y, C=certainty(y, self.cfg.out_shape))

    def run(self, s: State, kv: torch.Tensor, ticks: int) -> Iterator[State]:
        """The states after each of `ticks` ticks from s."""
        c = self.constants(kv)
        for _ in range(ticks):
            s = self.tick(s, c)
            yield s

    def forward(self, s: State, kv: torch.Tensor) -> State:
        """The two-tick thinking unit: State_t -> State_{t+2}."""
        *_, last = self.run(s, kv, 2)
        return last

    def dynamics_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the state loss trains: all but the readout (y is not a target) and the learned
        start state (the unit starts from a given state)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith(("readout.", "start_"))}


class CTM(nn.Module):
    """Backbone + thinking unit: the standard CTM forward over cfg.ticks ticks from the learned start."""

    def __init__(self, cfg: CTMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.unit = ThinkingUnit(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> logits (T, B, out_dims), certainties (T, B), first impression y_base (B, out_dims)."""
        kv, y_base = self.backbone(x)
        states = list(self.unit.run(self.unit.start_state(x.size(0), learned=True), kv, self.cfg.ticks))
        return torch.stack([s.y for s in states]), torch.stack([s.C for s in states]), y_base

# -----------------------------------------------------------------------------
# the optic nerve model: where to start thinking


def theta_code(unit: ThinkingUnit, dim: int) -> torch.Tensor:
    """The unit's weights for the optic nerve model, as a count sketch: every dynamics weight is added, with a
    fixed random sign, to one of `dim` fixed random slots (seed 0, so every model is encoded alike). It is a
    random projection (inner products of codes estimate those of the weights) that needs no stored matrix."""
    flat = torch.cat([p.detach().flatten() for p in unit.dynamics_parameters().values()]).float().cpu()
    gen = torch.Generator().manual_seed(0)
    slot = torch.randint(dim, (flat.numel(),), generator=gen)
    sign = torch.randint(0, 2, (flat.numel(),), generator=gen).float() * 2 - 1
    return torch.zeros(dim).index_add_(0, slot, flat * sign) / math.sqrt(flat.numel() / dim)


class OpticNerveModel(nn.Module):
    """(y, C, kv, theta_unit) -> a full State (seed section 5). kv stands for the seed's (k, v): this CTM's
    keys and values are two projections of the one kv. kv enters as 8 features per token, flattened; the
    unit's weights as their count sketch. Each part is predicted as mean + scale * head(h), with mean and
    scale per state element taken from the first training batch (beta runs to the hundreds, z stays near
    zero), and beta is kept positive, as the ticks need it."""

    def __init__(self, cfg: CTMConfig, theta_dim: int = 64, hidden: int = 512):
        super().__init__()
        self.cfg, self.theta_dim = cfg, theta_dim
        self.kv_in = nn.Linear(cfg.d_input, 8)
        d_in = cfg.n_kv * 8 + cfg.out_dims + 1 + theta_dim
        self.body = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.shapes = {k: v for k, v in state_shapes(cfg).items() if k in State.PARTS}
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, math.prod(v)) for k, v in self.shapes.items()})
        for k, shape in self.shapes.items():
            self.register_buffer(f"mean_{k}", torch.zeros(shape))
            self.register_buffer(f"scale_{k}", torch.ones(shape))
        self.register_buffer("fitted", torch.tensor(False))

    def fit_scales(self, target: State) -> None:
        """Set each element's mean and scale from a batch of target states (once, before training)."""
        for k in self.shapes:
            v = getattr(target, k).float()
            getattr(self, f"mean_{k}").copy_(v.mean(0))
            getattr(self, f"scale_{k}").copy_(v.std(0).nan_to_num(0).clamp(min=1e-3))
        self.fitted.fill_(True)

    def parts(self, y: torch.Tensor, C: torch.Tensor, kv: torch.Tensor, theta: torch.Tensor) -> dict:
        h = self.body(torch.cat((self.kv_in(kv).flatten(1), y, C[:, None], theta.expand(y.size(0), -1)), 1))
        parts = {k: getattr(self, f"mean_{k}") + getattr(self, f"scale_{k}") * head(h).view(-1, *self.shapes[k])
                 for k, head in self.heads.items()}
        parts["beta"] = parts["beta"].clamp(min=0)
        return parts

    def forward(self, y: torch.Tensor, C: torch.Tensor, kv: torch.Tensor, theta: torch.Tensor) -> State:
        return State(**self.parts(y, C, kv, theta), y=y, C=C)


# -----------------------------------------------------------------------------
# standard CTM training (--pretrain): the backbone and the first weights of the pool


class QuantileClip:
    """autoclip's QuantileClip, the reference's setting: each parameter's gradient norm is clipped at the
    q-quantile of that parameter's own last `history` norms (recorded before clipping). Vectorised over
    parameters instead of one quantile and one clip_grad_norm_ per tensor."""

    def __init__(self, params: list[nn.Parameter], quantile: float, history: int = 1000):
        self.params, self.quantile, self.history = params, quantile, history
        self.norms = torch.empty(0, len(params))                       # (steps, params), NaN = no gradient

    def __call__(self) -> None:
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in present]
        norms = torch.full((len(self.params),), float("nan"))
        norms[present] = torch.stack(torch._foreach_norm(grads)).float().cpu()
        if self.quantile < 1 and len(self.norms):
            limit = torch.nanquantile(self.norms, self.quantile, dim=0)[present]
            scale = (limit / (norms[present] + 1e-6)).clamp(max=1.0).nan_to_num(1.0)
            torch._foreach_mul_(grads, scale.tolist())
        self.norms = torch.cat((self.norms, norms[None]))[-self.history:]


@torch.no_grad()
def evaluate(ctm: CTM, n: int, device: torch.device, batch: int = 256) -> dict:
    """Held-out accuracy per tick and at the most-certain tick (per position and whole sample = maze solved),
    mean certainty per tick, and the backbone's first-impression accuracy."""
    cfg, was_training = ctm.cfg, ctm.training
    ctm.eval()
    per_tick, certain, whole, cert, base = [], [], [], [], []
    for lo in range(0, n, batch):
        x, targets = task_batch(cfg, test_ids(min(batch, n - lo), lo), device)
        ys, cs, y_base = ctm(x)
        right = ys.view(*ys.shape[:2], *cfg.out_shape).argmax(-1) == targets         # (T, B, P)
        at_certain = right[cs.argmax(0), torch.arange(x.size(0), device=device)]     # (B, P)
        per_tick.append(right.float().mean(-1).sum(1))
        certain.append(at_certain.float().mean(-1).sum())
        whole.append(at_certain.all(-1).float().sum())
        cert.append(cs.sum(1))
        base.append((y_base.view(-1, *cfg.out_shape).argmax(-1) == targets).float().mean(-1).sum())
    ctm.train(was_training)
    return {"acc_most_certain": (sum(certain) / n).item(), "whole_most_certain": (sum(whole) / n).item(),
            "acc_per_tick": (sum(per_tick) / n).tolist(), "certainty_per_tick": (sum(cert) / n).tolist(),
            "acc_base": (sum(base) / n).item()}


def make_optimizer(ctm: CTM, run: RunConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(ctm.parameters(), lr=run.lr, eps=1e-8, weight_decay=run.weight_decay)


def pretrain_step(ctm: CTM, opt: torch.optim.Optimizer, clip: QuantileClip, x: torch.Tensor,
                  targets: torch.Tensor, lr: float) -> dict:
    """One iteration: the CTM loss plus the first impression's cross-entropy (on detached kv)."""
    cfg = ctm.cfg
    ys, cs, y_base = ctm(x)
    loss, most_certain = ctm_loss(cfg, ys, cs, targets)
    base_loss = tick_losses(y_base, targets, cfg.out_shape).mean()
    opt.zero_grad(set_to_none=True)
    (loss + base_loss).backward()
    clip()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    with torch.no_grad():
        pred = ys.view(*ys.shape[:2], *cfg.out_shape).argmax(-1)[most_certain, torch.arange(x.size(0))]
        acc = (pred == targets).float().mean()
    return {"loss": loss.item(), "base_loss": base_loss.item(), "acc": acc.item(),
            "tick_most_certain": most_certain.float().mean().item()}


def pretrain(cfg: CTMConfig, run: RunConfig, device: torch.device, resume: bool) -> dict:
    """Standard CTM training. Writes the frozen backbone, expert_pool/ (random inits and checkpoints every
    --pool-every iterations) and best_model.pth (the final weights); resumable from pretrain_ckpt.pt."""
    root = Path(run.out_dir)
    ckpt_path = root / "pretrain_ckpt.pt"
    weights = WeightManager(root, cfg)
    seed_everything(run.seed)
    ctm = CTM(cfg).to(device)
    opt = make_optimizer(ctm, run)
    clip = QuantileClip(list(ctm.parameters()), run.clip_quantile)
    rng = np.random.default_rng(run.seed)
    start, last_eval = 0, None
    if resume:
        ckpt = weights.checked(ckpt_path, "model", "optimizer", "clip_norms", "data_rng", "torch_rng", "iteration")
        load_weights(ctm, ckpt["model"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        clip.norms = ckpt["clip_norms"]
        rng.bit_generator.state = ckpt["data_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start, last_eval = ckpt["iteration"], ckpt["last_eval"]
        log_path = root / "pretrain_log.jsonl"              # drop the rows logged after the checkpoint
        if log_path.exists():
            rows = [line for line in log_path.read_text().splitlines(keepends=True)
                    if json.loads(line)["iteration"] <= start]
            atomic_write_bytes("".join(rows).encode(), log_path)
        print(f"resumed pretraining at iteration {start} from {ckpt_path}")
    elif ckpt_path.exists():
        raise CTMError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    else:
        for i in range(run.pool_random):
            torch.manual_seed(run.seed + 1 + i)
            weights.save_pool(ThinkingUnit(cfg), f"random-{i}")
        torch.manual_seed(run.seed)
    n_params = sum(p.numel() for p in ctm.parameters())
    print(f"pretraining a {cfg.task} CTM: {n_params:,} parameters, {cfg.ticks} ticks, device {device}")
    log = MetricsLogger(root / "pretrain_log.jsonl")
    bar = tqdm(range(start, run.iters), initial=start, total=run.iters, desc="pretrain", dynamic_ncols=True)
    for it in bar:
        x, targets = task_batch(cfg, train_ids(rng, run.batch_size), device)
        lr = cosine_lr(it, lr=run.lr, warmup_steps=run.warmup, total_steps=run.iters, min_lr=1e-7)
        stats = pretrain_step(ctm, opt, clip, x, targets, lr)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}")
        done = it + 1
        record = {"iteration": done, "lr": lr, **stats}
        if done % run.eval_every == 0 or done == run.iters:
            last_eval = evaluate(ctm, run.eval_samples, device)
            record.update(last_eval)
            tqdm.write(f"it {done}: held-out acc at most-certain tick {last_eval['acc_most_certain']:.3f}, "
                       f"whole {last_eval['whole_most_certain']:.3f}, first impression {last_eval['acc_base']:.3f}")
        log.log(**record)
        if done % run.pool_every == 0 and done < run.iters:
            weights.save_pool(ctm.unit, f"pretrain-it{done}")
        if done % run.save_every == 0 or done == run.iters:
            atomic_save({"config": dataclasses.asdict(cfg), "run": dataclasses.asdict(run), "model": ctm.state_dict(),
                         "optimizer": opt.state_dict(), "clip_norms": clip.norms,
                         "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                         **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                         "iteration": done, "last_eval": last_eval}, ckpt_path)
    log.close()
    weights.save_backbone(ctm.backbone)
    weights.save_best(ctm.unit, f"pretrain-it{run.iters}")
    print(f"wrote {weights.backbone_path}, {weights.best_path} and {len(weights.pool_ids())} pool weights")
    return last_eval or {}

# -----------------------------------------------------------------------------
# weight files: the shared backbone, best_model.pth, challenger_cohort/, expert_pool/

WEIGHT_ID = re.compile(r"[A-Za-z0-9_.-]+")


def load_weights(module: nn.Module, state: dict, source: object) -> None:
    """load_state_dict, with a mismatch reported in one line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise CTMError(f"{source}: the weights do not fit this model ({str(exc).splitlines()[0]})") from None


class WeightManager:
    """The weight files under one root. Each unit file stores the config and a weight_id; any file is
    found again by its weight_id (the provenance stored with every replay pair)."""

    def __init__(self, root: Path, cfg: CTMConfig):
        self.root, self.cfg = Path(root), cfg
        self.backbone_path = self.root / "backbone.pth"
        self.best_path = self.root / "best_model.pth"
        self.cohort_dir = self.root / "challenger_cohort"
        self.pool_dir = self.root / "expert_pool"
        self._cache: dict[str, dict] = {}

    def checked(self, path: Path, *keys: str) -> dict:
        """Load a file written by this script, refusing in one line one of another config or without `keys`."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt, stored = load_checkpoint(path, CTMConfig)
        except (FileNotFoundError, ValueError) as exc:
            raise CTMError(str(exc)) from None
        if stored != self.cfg:
            diff = {k: v for k, v in dataclasses.asdict(stored).items() if getattr(self.cfg, k) != v}
            raise CTMError(f"{path}: weights of another config (differs in {diff})")
        missing = [k for k in keys if k not in ckpt]
        if missing:
            raise CTMError(f"{path}: not the file expected here (no {', '.join(missing)})")
        return ckpt

    def _save(self, unit: ThinkingUnit, weight_id: str, path: Path) -> None:
        if not WEIGHT_ID.fullmatch(weight_id):
            raise CTMError(f"weight id {weight_id!r} must match {WEIGHT_ID.pattern}")
        state = {k: v.detach().cpu() for k, v in unit.state_dict().items()}
        atomic_save({"config": dataclasses.asdict(self.cfg), "weight_id": weight_id, "unit": state}, path)
        self._cache.pop(weight_id, None)

    def save_pool(self, unit: ThinkingUnit, weight_id: str) -> None:
        self._save(unit, weight_id, self.pool_dir / f"{weight_id}.pth")

    def save_best(self, unit: ThinkingUnit, weight_id: str) -> None:
        self._save(unit, weight_id, self.best_path)

    def save_challenger(self, unit: ThinkingUnit, i: int, weight_id: str) -> None:
        self._save(unit, weight_id, self.cohort_dir / f"challenger_{i}.pth")

    def save_backbone(self, backbone: Backbone) -> None:
        atomic_save({"config": dataclasses.asdict(self.cfg), "backbone": backbone.state_dict()},
                    self.backbone_path)

    def load_backbone(self, backbone: Backbone) -> None:
        load_weights(backbone, self.checked(self.backbone_path, "backbone")["backbone"], self.backbone_path)

    def pool_ids(self) -> list[str]:
        return sorted(p.stem for p in self.pool_dir.glob("*.pth")) if self.pool_dir.is_dir() else []

    def best_id(self) -> str | None:
        return self.checked(self.best_path, "weight_id", "unit")["weight_id"] if self.best_path.exists() else None

    def pick(self, rng: np.random.Generator, p: float, best_id: str | None, pool: list[str]) -> tuple[str, str]:
        """(weight_id, buffer kind): best_model.pth with probability p, else a random expert_pool/ member."""
        if best_id is not None and (not pool or rng.random() < p):
            return best_id, "self_play"
        if not pool:
            raise CTMError(f"{self.root}: no best_model.pth and an empty expert_pool/ (run --pretrain first)")
        return pool[int(rng.integers(len(pool)))], "expert"

    def load(self, weight_id: str) -> dict[str, torch.Tensor]:
        """The unit state dict of weight_id, from best_model.pth, expert_pool/ or challenger_cohort/."""
        if weight_id not in self._cache:
            candidates = [self.pool_dir / f"{weight_id}.pth", self.best_path, *sorted(self.cohort_dir.glob("*.pth"))]
            for path in candidates:
                if path.is_file():
                    ckpt = self.checked(path, "weight_id", "unit")
                    if ckpt["weight_id"] == weight_id:
                        if len(self._cache) >= 16:           # challengers come and go: keep the newest
                            self._cache.pop(next(iter(self._cache)))
                        self._cache[weight_id] = ckpt["unit"]
                        break
            else:
                raise CTMError(f"weight id {weight_id!r} not found under {self.root}")
        return self._cache[weight_id]

    def load_into(self, unit: ThinkingUnit, weight_id: str) -> None:
        state = self.load(weight_id)
        for kind in ("action", "out"):
            if not torch.equal(state.get(f"pairs_{kind}", torch.empty(0)), getattr(unit, f"pairs_{kind}").cpu()):
                raise CTMError(f"{weight_id}: neuron pairs differ from this pool's (pairing seed)")
        load_weights(unit, state, weight_id)

# -----------------------------------------------------------------------------
# the disk replay buffer


@dataclass
class PairBatch:
    """Stacked (State_t, State_{t+2}) pairs with their provenance: the weights that made them and the data
    ID that regenerates their input (and so kv)."""
    before: State                 # State_t, every tensor (n, ...)
    after: State                  # State_{t+2}
    weight_ids: list[str]         # (n,)
    data_ids: torch.Tensor        # (n,) int64
    ticks: torch.Tensor           # (n,) int64: t

    def __len__(self) -> int:
        return len(self.weight_ids)

    def take(self, rows: torch.Tensor) -> "PairBatch":
        """The pairs at rows (indices or a mask)."""
        keep = rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows
        return PairBatch(self.before.map(lambda v: v[keep]), self.after.map(lambda v: v[keep]),
                         [self.weight_ids[i] for i in keep.tolist()], self.data_ids[keep], self.ticks[keep])

    @staticmethod
    def cat(batches: list["PairBatch"]) -> "PairBatch":
        return PairBatch(State.cat([b.before for b in batches]), State.cat([b.after for b in batches]),
                         [w for b in batches for w in b.weight_ids], torch.cat([b.data_ids for b in batches]),
                         torch.cat([b.ticks for b in batches]))


def state_shapes(cfg: CTMConfig) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every State tensor."""
    s = cfg.synch_size(cfg.n_synch_action) + cfg.synch_size(cfg.n_synch_out)
    return {"z": (cfg.d_model,), "A": (cfg.d_model, cfg.memory_length), "alpha": (s,), "beta": (s,),
            "o": (cfg.d_input,), "y": (cfg.out_dims,), "C": ()}


PAIR_MAGIC = b"CTMPAIR1"


def pair_layout(shapes: dict[str, tuple[int, ...]], count: int) -> tuple[dict, int]:
    """Where each array of a pair file of `count` pairs lies: {name: {dtype, shape, offset}}, total bytes.
    States are float32, data IDs and ticks int64; each array starts 64-byte aligned."""
    arrays = {"data_ids": ("<i8", ()), "ticks": ("<i8", ())}
    arrays.update({f"{side}.{k}": ("<f4", shape) for side in ("before", "after") for k, shape in shapes.items()})
    layout, offset = {}, 0
    for name, (dtype, shape) in arrays.items():
        layout[name] = {"dtype": dtype, "shape": list(shape), "offset": offset}
        offset += -(-count * math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64
    return layout, offset


def pair_column(pairs: PairBatch, name: str) -> torch.Tensor:
    """One array of a pair file ("data_ids", "ticks" or "before.z" ...) from a batch of pairs."""
    if "." not in name:
        return getattr(pairs, name)
    side, field = name.split(".")
    return getattr(getattr(pairs, side), field)


def write_pair_file(f: io.BufferedIOBase, parts: list[PairBatch]) -> None:
    """MAGIC | header length (8 bytes) | JSON header | arrays, each 64-byte aligned. Rows are written straight
    from the parts (no concatenated copy), and a reader can check every byte of the layout."""
    count = sum(map(len, parts))
    shapes = {k: tuple(v.shape[1:]) for k, v in parts[0].before.tensors().items()}
    layout, total = pair_layout(shapes, count)
    header = json.dumps({"weight_id": parts[0].weight_ids[0], "count": count, "arrays": layout,
                         "bytes": total}).encode()
    head = PAIR_MAGIC + len(header).to_bytes(8, "little") + header
    f.write(head + bytes(-len(head) % 64))
    for name, spec in layout.items():
        size = 0
        for p in parts:
            dtype = torch.int64 if spec["dtype"] == "<i8" else torch.float32
            chunk = pair_column(p, name).to(dtype).contiguous().numpy()
            f.write(memoryview(chunk).cast("B"))
            size += chunk.nbytes
        f.write(bytes(-size % 64))


def read_pair_file(path: Path, shapes: dict[str, tuple[int, ...]], count: int, weight_id: str) -> dict:
    """A pair file's header plus a read-only memory-mapped array per entry. ValueError unless the file is
    exactly what write_pair_file writes for these shapes, this count and this weight_id."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        length = int.from_bytes(head[8:16], "little")
        if len(head) < 16 or head[:8] != PAIR_MAGIC or length > size - 16:
            raise ValueError("not a pair file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"unreadable header ({exc})") from None
    layout, total = pair_layout(shapes, count)
    if header != {"weight_id": weight_id, "count": count, "arrays": layout, "bytes": total}:
        raise ValueError("header does not match its name or this config's shapes")
    start = -(-(16 + length) // 64) * 64
    if size != start + total:
        raise ValueError(f"{size} bytes, expected {start + total} (cut short?)")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    header["data"] = {name: np.ndarray((count, *a["shape"]), np.dtype(a["dtype"]), data, a["offset"])
                      for name, a in layout.items()}
    return header


class ReplayFolder:
    """A FIFO of pair files in one folder. A file holds the pairs of one write, all from one weight_id and one
    split (train or val), and is named SEQ-COUNT-SPLIT-WEIGHTID.pairs, so the index needs no reads. Files are
    memory-mapped, so a batch reads only its rows. A file that is cut short, unreadable or of other shapes
    than this config's is renamed *.corrupt and skipped with a warning."""

    NAME = re.compile(r"(\d{9})-(\d+)-(train|val)-([A-Za-z0-9_.-]+)\.pairs")

    def __init__(self, path: Path, capacity: int, shapes: dict[str, tuple[int, ...]]):
        self.path, self.capacity = Path(path), capacity
        self.shapes = shapes
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.open_files: dict[Path, dict] = {}
        for stale in self.path.glob(".*.tmp"):          # a write killed before its rename
            stale.unlink()
        self.files: dict[str, list[tuple[int, int, Path]]] = {"train": [], "val": []}   # (seq, count, path)
        for p in self.path.iterdir():
            m = self.NAME.fullmatch(p.name)
            if m:
                self.files[m[3]].append((int(m[1]), int(m[2]), p))
        for files in self.files.values():
            files.sort()
        self.next_seq = max((f[-1][0] + 1 for f in self.files.values() if f), default=0)

    def count(self, split: str) -> int:
        return sum(count for _, count, _ in self.files[split])

    def __len__(self) -> int:
        return self.count("train") + self.count("val")

    def write(self, parts: list[PairBatch], split: str) -> None:
        weight_id, count = parts[0].weight_ids[0], sum(map(len, parts))
        if any(w != weight_id for p in parts for w in p.weight_ids):
            raise ValueError("a pair file holds the pairs of one weight_id")
        with self.lock:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        path = self.path / f"{seq:09d}-{count}-{split}-{weight_id}.pairs"
        atomic_write(path, lambda f: write_pair_file(f, parts))
        with self.lock:
            self.files[split].append((seq, count, path))
            self.files[split].sort()
            while len(self) > self.capacity and sum(map(len, self.files.values())) > 1:
                oldest = min((f for f in self.files.values() if f), key=lambda f: f[0][0])
                _, _, path = oldest.pop(0)
                self.open_files.pop(path, None)
                path.unlink(missing_ok=True)

    def _open(self, path: Path, count: int) -> dict | None:
        """The file's record, or None (with a warning) if it cannot be used: a malformed file is renamed
        *.corrupt, one that cannot be opened now (say, out of file descriptors) is only skipped."""
        if path not in self.open_files:
            try:
                record = read_pair_file(path, self.shapes, count, self.NAME.fullmatch(path.name)[4])
            except ValueError as exc:
                warnings.warn(f"{path}: malformed pair file skipped and renamed *.corrupt ({exc})")
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
                return None
            except OSError as exc:
                warnings.warn(f"{path}: pair file skipped, cannot be read now ({exc})")
                return None
            if len(self.open_files) >= 64:              # each map holds a file descriptor
                self.open_files.pop(next(iter(self.open_files)))
            self.open_files[path] = record
        return self.open_files[path]

    def sample(self, n: int, rng: np.random.Generator, split: str) -> list[PairBatch]:
        """n pairs of a split drawn uniformly without replacement (fewer if it holds fewer). A draw that meets
        a bad file drops it and draws again."""
        files = self.files[split]
        while files:
            counts = np.array([c for _, c, _ in files])
            ends = np.cumsum(counts)
            picks = rng.choice(ends[-1], size=min(n, ends[-1]), replace=False)
            file_of = np.searchsorted(ends, picks, side="right")
            touched = {int(f): self._open(files[f][2], files[f][1]) for f in np.unique(file_of)}
            bad = [f for f, record in touched.items() if record is None]
            if bad:
                with self.lock:
                    for f in sorted(bad, reverse=True):
                        files.pop(f)
                continue
            out = []
            for f, record in touched.items():
                rows = np.sort(picks[file_of == f] - (ends[f] - counts[f]))
                data = {k: torch.from_numpy(v[rows]) for k, v in record["data"].items()}
                side = lambda name: State(**{k: data[f"{name}.{k}"] for k in State.FIELDS})
                out.append(PairBatch(side("before"), side("after"), [record["weight_id"]] * len(rows),
                                     data["data_ids"], data["ticks"]))
            return out
        return []


class DiskReplayBuffer:
    """The two replay buffers: expert_replay_buffer/ (pairs made by expert_pool/ weights) and
    self_play_replay_buffer/ (pairs made by best_model.pth). Writes are atomic; a killed write leaves no
    readable half file. A fixed fraction of data IDs is held out: their pairs form the validation split
    that the tournament scores on, so no challenger has trained on them (and no sample's trajectory is in
    both splits)."""

    KINDS = ("expert", "self_play")

    def __init__(self, root: Path, cfg: CTMConfig, capacity: int, val_fraction: float = 0.1):
        shapes = state_shapes(cfg)
        self.val_fraction = val_fraction
        self.folders = {kind: ReplayFolder(Path(root) / f"{kind}_replay_buffer", capacity, shapes)
                        for kind in self.KINDS}

    def is_validation(self, data_ids: torch.Tensor) -> torch.Tensor:
        return data_ids % 1000 < round(1000 * self.val_fraction)

    def save_pair(self, pairs: PairBatch | list[PairBatch], kind: str) -> None:
        """Store one pair, a batch of pairs or a list of batches (one weight_id) in the `kind` buffer: one
        file per split that receives pairs."""
        parts = pairs if isinstance(pairs, list) else [pairs]
        for split in ("train", "val"):
            masks = [self.is_validation(p.data_ids) == (split == "val") for p in parts]
            chosen = [p if mask.all() else p.take(mask) for p, mask in zip(parts, masks) if mask.any()]
            if chosen:
                self.folders[kind].write(chosen, split)

    def load_batch(self, n: int, q: float = 0.5, rng: np.random.Generator | None = None,
                   split: str = "train") -> PairBatch:
        """n random pairs of a split, a fraction q from the expert buffer and the rest from the self-play
        buffer (from the other when one runs short)."""
        rng = rng or np.random.default_rng()
        while True:                      # a draw that met a bad file (now dropped from the index) is redone
            have = self.counts(split)
            n_self = min(n - min(int(round(q * n)), have["expert"]), have["self_play"])
            n_expert = min(n - n_self, have["expert"])
            parts = self.folders["expert"].sample(n_expert, rng, split)
            parts += self.folders["self_play"].sample(n_self, rng, split)
            if sum(map(len, parts)) == n_expert + n_self:
                break
        if not parts:
            raise CTMError(f"the replay buffers under {self.folders['expert'].path.parent} hold no {split} pairs")
        return PairBatch.cat(parts)

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Pairs per buffer, in one split or in both."""
        return {kind: folder.count(split) if split else len(folder) for kind, folder in self.folders.items()}


# -----------------------------------------------------------------------------
# self-play data: long forward passes, the streaming filter, the three-level pipeline


def generate_initial_state(y_base: torch.Tensor, C_base: torch.Tensor, kv: torch.Tensor, unit: ThinkingUnit,
                           how: str, onm: OpticNerveModel | None = None) -> State:
    """The start State^0 of a trajectory, with the first impression as its prediction: the optic nerve
    model's guess from (y_base, C_base, kv, theta_unit) when there is one, else zeros (the seed's milestone 1)
    or the unit's learned start state."""
    if onm is not None:
        return onm(y_base, C_base, kv, theta_code(unit, onm.theta_dim).to(kv.device))
    s = unit.start_state(kv.size(0), learned=how == "learned")
    s.y, s.C = y_base, C_base
    return s


class ChunkPool:
    """Reusable host buffers for tick chunks, pinned on CUDA so that the device-to-host copies are
    asynchronous. The device thread fills one buffer while the workers read others; a buffer is reused once
    every worker has released its slice, and at most `size` exist, which bounds the chunks in flight."""

    def __init__(self, cfg: CTMConfig, ticks: int, batch: int, size: int, pin: bool):
        self.shapes = {**state_shapes(cfg), "loss": ()}
        self.ticks, self.batch, self.size, self.pin = ticks, batch, size, pin
        self.free: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.made = 0
        self.users: dict[int, int] = {}

    def acquire(self, wait, users: int) -> dict[str, torch.Tensor]:
        """A free buffer (made while fewer than `size` exist), to be released `users` times."""
        with self.lock:
            fresh = self.free.empty() and self.made < self.size
            self.made += fresh
        buf = ({k: torch.empty((self.ticks, self.batch, *shape), pin_memory=self.pin)
                for k, shape in self.shapes.items()} if fresh else wait(self.free))
        self.users[id(buf)] = users
        return buf

    def release(self, buf: dict[str, torch.Tensor]) -> None:
        with self.lock:
            self.users[id(buf)] -= 1
            done = self.users[id(buf)] == 0
        if done:
            self.free.put(buf)


@dataclass
class Chunk:
    """Ticks [first, first + n) of one generation batch: every State tensor (n, B, ...) and the loss (n, B),
    views of a ChunkPool buffer. Tick 0 is the start state. On CUDA the rows are on the host once `ready`
    has fired; a reader calls release() when done with them."""
    batch: int
    first: int
    last: bool                    # the batch's final chunk
    tensors: dict[str, torch.Tensor]
    weight_id: str
    kind: str                     # the buffer its pairs go to
    data_ids: torch.Tensor        # (B,)
    release: object               # () -> None
    ready: object = None          # torch.cuda.Event or None

    def rows(self, lo: int, hi: int) -> "Chunk":
        """The samples lo:hi of every tick (a worker's slice: split by batch, never by tick)."""
        return dataclasses.replace(self, tensors={k: v[:, lo:hi] for k, v in self.tensors.items()},
                                   data_ids=self.data_ids[lo:hi])


@dataclass
class YieldStats:
    """Candidates and kept pairs of both filter rules, and the trajectory tick t of every kept pair."""
    ticks: int
    candidates: int = 0
    kept: dict[str, int] = dataclasses.field(default_factory=lambda: {"strict": 0, "lenient": 0})
    where: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    produced: int = 0             # pairs handed to the writers
    written: int = 0              # pairs in files

    def __post_init__(self) -> None:
        self.where = self.where or {rule: np.zeros(self.ticks + 1, dtype=np.int64) for rule in self.kept}

    def merge(self, other: "YieldStats") -> None:
        self.candidates += other.candidates
        self.produced += other.produced
        self.written += other.written
        for rule in self.kept:
            self.kept[rule] += other.kept[rule]
            self.where[rule] += other.where[rule]

    def report(self, rule: str, bins: int = 10) -> str:
        lines = [f"{'filter':8s} {'kept':>9s} / {'candidates':<10s} yield"]
        for name, kept in self.kept.items():
            mark = "  <- stored" if name == rule else ""
            lines.append(f"{name:8s} {kept:9d} / {self.candidates:<10d} {kept / max(self.candidates, 1):6.2%}{mark}")
        starts = self.ticks - 1                             # t runs over 0 .. ticks - 2
        edges = [*range(0, starts, -(-starts // bins)), starts]
        counts = [int(self.where[rule][lo:hi].sum()) for lo, hi in zip(edges[:-1], edges[1:])]
        lines.append(f"where the {rule} pairs start (tick t of State_t):")
        for lo, hi, count in zip(edges[:-1], edges[1:], counts):
            bar = "#" * round(40 * count / max(max(counts), 1))
            lines.append(f"  t {lo:4d}-{hi - 1:<4d} {count:8d} {bar}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"candidates": self.candidates, "kept": dict(self.kept), "produced": self.produced,
                "written": self.written, "where": {k: v.tolist() for k, v in self.where.items()}}


class SlidingFilter:
    """The streaming sliding-window filter for one slice of a batch. Fed the chunks of a trajectory in order,
    it compares every tick with the two before it, vectorised over ticks and samples, and keeps only the
    last two ticks between chunks. strict: L_{t+1} < L_t, C_{t+1} > C_t, L_{t+2} < L_{t+1}, C_{t+2} >
    C_{t+1}; lenient: L_{t+2} < L_t and C_{t+2} > C_t. Both are counted; `rule` decides what is kept."""

    def __init__(self, rule: str, stats: YieldStats):
        self.rule, self.stats = rule, stats
        self.window: dict[str, torch.Tensor] = {}      # the last two ticks, (<= 2, b, ...)
        self.batch = -1

    def feed(self, chunk: Chunk) -> PairBatch | None:
        """The kept pairs that end in this chunk (None if none)."""
        if chunk.batch != self.batch:
            self.window, self.batch = {}, chunk.batch
        old, new = self.window, chunk.tensors
        w = len(old["loss"]) if old else 0
        full = {k: torch.cat((old[k], new[k])) if w else new[k] for k in ("loss", "C")}    # (w + n, b)
        L, C = full["loss"], full["C"]
        end = torch.arange(min(max(2, w), len(L)), len(L))  # rows holding State_{t+2}
        masks = {"strict": (L[end - 1] < L[end - 2]) & (C[end - 1] > C[end - 2])
                           & (L[end] < L[end - 1]) & (C[end] > C[end - 1]),
                 "lenient": (L[end] < L[end - 2]) & (C[end] > C[end - 2])}       # (len(end), b)
        first_t = chunk.first - w                           # trajectory tick of row 0 of `full`
        self.stats.candidates += masks["lenient"].numel()
        for rule, mask in masks.items():
            self.stats.kept[rule] += int(mask.sum())
            starts = end[:, None].expand_as(mask)[mask] - 2 + first_t
            np.add.at(self.stats.where[rule], starts.numpy(), 1)
        # keep only the last two ticks, copied so that the chunk itself can be freed
        self.window = {k: (v[-2:] if len(v) >= 2 or not w else torch.cat((old[k][-1:], v))).clone()
                       for k, v in new.items()}
        rows, samples = masks[self.rule].nonzero(as_tuple=True)
        if not len(rows):
            return None
        after_row, before_row = end[rows] - w, end[rows] - 2 - w        # rows of `new`; < 0 is in `old`
        in_old = before_row < 0
        before, after = {}, {}
        for k in State.FIELDS:
            after[k] = new[k][after_row, samples]
            b = new[k][before_row.clamp(min=0), samples]
            if in_old.any():
                b[in_old] = old[k][before_row[in_old] + w, samples[in_old]]
            before[k] = b
        return PairBatch(State(**before), State(**after), [chunk.weight_id] * len(rows),
                         chunk.data_ids[samples], before_row + w + first_t)


class _Stopped(Exception):
    """Raised inside a pipeline thread when another thread has failed."""


class DataGenerator:
    """One data-generation phase: per batch, weights picked by the WeightManager, a long forward pass from
    generate_initial_state(), filtered pairs written to the buffer the weights came from.

    Threaded (the seed's three levels): the calling thread owns the device and hands every tick chunk over
    without waiting; --workers filter threads each own a fixed slice of the batch; --io-threads write pair
    files. Queues are bounded (--queue-size), so memory stays a few chunks whatever --gen-ticks is. The
    first exception in any thread stops them all and is raised here."""

    FLUSH_PAIRS = 256             # a worker writes a file once it holds this many pairs (or at a batch's end)

    def __init__(self, cfg: CTMConfig, run: RunConfig, device: torch.device, weights: WeightManager,
                 buffer: DiskReplayBuffer, onm: OpticNerveModel | None = None, seed: int | None = None):
        self.cfg, self.run, self.device, self.weights, self.buffer = cfg, run, device, weights, buffer
        self.onm = onm.to(device).eval() if onm is not None else None
        self.ctm = CTM(cfg).to(device).eval()
        weights.load_backbone(self.ctm.backbone)
        self.rng = np.random.default_rng(run.seed if seed is None else seed)

    # level 1: the device
    @torch.inference_mode()
    def chunks(self, n_batches: int, chunk_ticks: int, pool: ChunkPool, users: int, wait) -> Iterator[Chunk]:
        """The chunks of n_batches long forward passes, written into pool buffers (each released `users`
        times); `wait` takes a buffer from the pool's queue when all are in use."""
        run, unit, cuda = self.run, self.ctm.unit, self.device.type == "cuda"
        best_id, pool_ids = self.weights.best_id(), self.weights.pool_ids()
        for b in range(n_batches):
            weight_id, kind = self.weights.pick(self.rng, run.p_best, best_id, pool_ids)
            self.weights.load_into(unit, weight_id)
            noise = torch.Generator(self.device).manual_seed(int(self.rng.integers(2**62)))
            if run.weight_noise:             # the pairs keep the clean weights' id: the noise is exploration
                for p in unit.parameters():
                    if p.numel() > 1:
                        p.add_(torch.randn(p.shape, generator=noise, device=p.device) * p.std() * run.weight_noise)
            ids = train_ids(self.rng, run.gen_batch_size)
            x, targets = task_batch(self.cfg, ids, self.device)
            kv, y_base = self.ctm.backbone(x)
            s = generate_initial_state(y_base, certainty(y_base, self.cfg.out_shape), kv, unit, run.init_state,
                                       self.onm)
            states = itertools.chain([s], unit.run(s, kv, run.gen_ticks))
            buf, row, first = None, 0, 0
            for t, s in enumerate(states):
                if run.act_noise and t:
                    s.z = s.z + run.act_noise * torch.randn(s.z.shape, generator=noise, device=s.z.device)
                buf = buf or pool.acquire(wait, users)
                for k, v in s.tensors().items():
                    buf[k][row].copy_(v, non_blocking=cuda)
                buf["loss"][row].copy_(tick_losses(s.y, targets, self.cfg.out_shape).mean(-1), non_blocking=cuda)
                row += 1
                if row == chunk_ticks or t == run.gen_ticks:
                    ready = torch.cuda.Event() if cuda else None
                    if ready is not None:
                        ready.record()
                    yield Chunk(b, first, t == run.gen_ticks, {k: v[:row] for k, v in buf.items()}, weight_id,
                                kind, ids, functools.partial(pool.release, buf), ready)
                    buf, row, first = None, 0, t + 1

    def pool(self, chunk_ticks: int, size: int) -> ChunkPool:
        return ChunkPool(self.cfg, chunk_ticks, self.run.gen_batch_size, size, self.device.type == "cuda")

    def threads(self, threaded: bool) -> int:
        """torch's intra-op threads for a phase: --threads when given; else torch's default, except that on a
        CPU device the threaded pipeline leaves a core to each filter worker and writer (their work would
        otherwise stall the device thread's parallel regions)."""
        if self.run.threads:
            return self.run.threads
        if threaded and self.device.type == "cpu":
            return max(1, (os.cpu_count() or 1) - self.run.workers - self.run.io_threads)
        return DEFAULT_THREADS

    @contextlib.contextmanager
    def _threads(self, threaded: bool) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads(threaded))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # levels 2 and 3 as plain calls
    def run_serial(self, n_batches: int, chunk_ticks: int | None = None, progress: bool = True) -> YieldStats:
        """The same work in one thread: each chunk is computed, filtered and written before the next."""
        chunk_ticks = chunk_ticks or self.run.chunk_ticks
        stats = YieldStats(self.run.gen_ticks)
        filt, pending = SlidingFilter(self.run.filter, stats), []
        chunks = self.chunks(n_batches, chunk_ticks, self.pool(chunk_ticks, 1), 1, queue.Queue.get)
        with self._threads(threaded=False):
            for chunk in self._progress(chunks, n_batches, chunk_ticks, progress):
                self._filter(filt, chunk, pending, lambda item: self._write(item, stats))
        return stats

    def _filter(self, filt: SlidingFilter, chunk: Chunk, pending: list[PairBatch], emit) -> None:
        """Feed a chunk to the filter, release it, and emit (kind, pairs) once enough pairs are pending."""
        if chunk.ready is not None:
            chunk.ready.synchronize()
        pairs = filt.feed(chunk)
        chunk.release()
        if pairs is not None:
            pending.append(pairs)
        if pending and (chunk.last or sum(map(len, pending)) >= self.FLUSH_PAIRS):
            filt.stats.produced += sum(map(len, pending))
            emit((chunk.kind, pending[:]))
            pending.clear()

    def _write(self, item: tuple[str, list[PairBatch]], stats: YieldStats) -> None:
        kind, parts = item
        self.buffer.save_pair(parts, kind)
        stats.written += sum(map(len, parts))

    def _progress(self, chunks: Iterator[Chunk], n_batches: int, chunk_ticks: int, progress: bool
                  ) -> Iterator[Chunk]:
        per_batch = math.ceil((self.run.gen_ticks + 1) / chunk_ticks)
        return tqdm(chunks, total=n_batches * per_batch, desc="generate", unit="chunk", disable=not progress,
                    dynamic_ncols=True, leave=False)

    # the threaded pipeline
    def run_threaded(self, n_batches: int, chunk_ticks: int | None = None, progress: bool = True) -> YieldStats:
        """The three levels at once: this thread computes, --workers threads filter their slices of the
        batch, --io-threads threads write. Bounded queues; the first error in any thread is raised here."""
        run = self.run
        chunk_ticks = chunk_ticks or run.chunk_ticks
        stop, errors = threading.Event(), []
        to_workers = [queue.Queue(run.queue_size) for _ in range(run.workers)]
        to_io = queue.Queue(run.queue_size * run.workers)
        bounds = np.linspace(0, run.gen_batch_size, run.workers + 1).round().astype(int)
        stats = [YieldStats(run.gen_ticks) for _ in range(run.workers + run.io_threads)]

        def put(q: queue.Queue, item: object) -> None:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    return q.put(item, timeout=0.05)
            raise _Stopped

        def get(q: queue.Queue) -> object:
            while not stop.is_set():
                with contextlib.suppress(queue.Empty):
                    return q.get(timeout=0.05)
            raise _Stopped

        def guarded(body):
            def target(*args):
                try:
                    body(*args)
                except _Stopped:
                    pass
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()
            return target

        def worker(w: int) -> None:
            filt, pending = SlidingFilter(run.filter, stats[w]), []
            while (chunk := get(to_workers[w])) is not None:
                self._filter(filt, chunk, pending, lambda item: put(to_io, item))

        def writer(i: int) -> None:
            while (item := get(to_io)) is not None:
                self._write(item, stats[run.workers + i])

        workers = [threading.Thread(target=guarded(worker), args=(w,), name=f"filter-{w}", daemon=True)
                   for w in range(run.workers)]
        writers = [threading.Thread(target=guarded(writer), args=(i,), name=f"writer-{i}", daemon=True)
                   for i in range(run.io_threads)]
        chunks = self.chunks(n_batches, chunk_ticks, self.pool(chunk_ticks, run.queue_size + 2), run.workers, get)
        with self._threads(threaded=True):
            for t in workers + writers:
                t.start()
            try:
                for chunk in self._progress(chunks, n_batches, chunk_ticks, progress):
                    for w, q in enumerate(to_workers):
                        put(q, chunk.rows(bounds[w], bounds[w + 1]))
                for q in to_workers:
                    put(q, None)
                for t in workers:
                    t.join()
                for _ in writers:
                    put(to_io, None)
            except BaseException as exc:
                if not isinstance(exc, _Stopped):
                    errors.insert(0, exc)
                stop.set()
            finally:
                for t in workers + writers:
                    t.join()
        if errors:
            raise errors[0]
        total = YieldStats(run.gen_ticks)
        for s in stats:
            total.merge(s)
        return total


def ensure_weights(weights: WeightManager, run: RunConfig) -> None:
    """A root without pretrained weights gets a random backbone and --pool-random random units (at least one),
    so that data can be generated by random models (the seed's milestone 3)."""
    if weights.backbone_path.exists():
        return
    if (weights.root / "pretrain_ckpt.pt").exists():
        raise CTMError(f"{weights.root}: its pretraining was interrupted (no backbone.pth yet): finish it with "
                       "--pretrain --resume first")
    seed_everything(run.seed)
    weights.save_backbone(Backbone(weights.cfg))
    for i in range(max(run.pool_random, 1)):
        torch.manual_seed(run.seed + 1 + i)
        weights.save_pool(ThinkingUnit(weights.cfg), f"random-{i}")
    print(f"no pretrained weights in {weights.root}: wrote a random backbone and {max(run.pool_random, 1)} "
          "random units to generate with")


def ensure_base(weights: WeightManager, run: RunConfig, device: torch.device) -> None:
    """The loop starts from a pretrained CTM: pretrain (or finish pretraining) when the root has none. A root
    with a backbone but no best_model.pth holds --generate's random weights, and its pairs' kv depends on
    that backbone: it is refused rather than overwritten."""
    if weights.best_path.exists():
        return
    if weights.backbone_path.exists() and not (weights.root / "pretrain_ckpt.pt").exists():
        raise CTMError(f"{weights.root} holds random weights from --generate and no best_model.pth: run the loop "
                       "in another --out-dir")
    print(f"no best_model.pth in {weights.root}: pretraining the base CTM first")
    pretrain(weights.cfg, run, device, resume=(weights.root / "pretrain_ckpt.pt").exists())


def generate(cfg: CTMConfig, run: RunConfig, device: torch.device) -> YieldStats:
    """One data-generation phase into OUT_DIR's replay buffers, with the yield report."""
    root = Path(run.out_dir)
    weights = WeightManager(root, cfg)
    ensure_weights(weights, run)
    buffer = DiskReplayBuffer(root, cfg, run.buffer_capacity, run.val_fraction)
    # seeded by what the buffers already hold, so that a second call draws new data
    generator = DataGenerator(cfg, run, device, weights, buffer,
                              seed=run.seed * 1_000_003 + sum(f.next_seq for f in buffer.folders.values()))
    t0 = time.perf_counter()
    stats = generator.run_threaded(run.gen_batches)
    seconds = time.perf_counter() - t0
    print(f"{run.gen_batches} batches x {run.gen_batch_size} samples x {run.gen_ticks} ticks in {seconds:.1f} s: "
          f"{stats.written} pairs written ({stats.written / seconds:.0f}/s); buffers now {buffer.counts()}")
    print(stats.report(run.filter))
    with MetricsLogger(root / "generate_log.jsonl") as log:
        log.log(phase="generate", seconds=seconds, filter=run.filter, **stats.to_json())
    return stats

# -----------------------------------------------------------------------------
# phase two: training on pairs (the thinking unit, the optic nerve model)


def rebuild_inputs(backbone: Backbone, cfg: CTMConfig, data_ids: torch.Tensor, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """kv and the task targets of stored pairs, regenerated from their data IDs (the backbone is frozen)."""
    x, targets = task_batch(cfg, data_ids, device)
    with torch.no_grad():
        kv, _ = backbone(x)
    return kv, targets


def on_device(pairs: PairBatch, device: torch.device) -> tuple[State, State]:
    return pairs.before.map(lambda v: v.to(device)), pairs.after.map(lambda v: v.to(device))


def train_unit(unit: ThinkingUnit, backbone: Backbone, buffer: DiskReplayBuffer, run: RunConfig, q: float,
               seed: int, device: torch.device, desc: str) -> dict:
    """--train-steps AdamW steps of the state loss (the sum of the MSEs of z, A, alpha, beta, o) on batches
    from the mixing sampler: a share q from the expert buffer, the rest from the self-play buffer. The seed
    sets the data order and everything random in the step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = list(unit.dynamics_parameters().values())
    opt = torch.optim.AdamW(params, lr=run.unit_lr, weight_decay=0.0)
    unit.train()
    losses, parts = [], {}
    for _ in tqdm(range(run.train_steps), desc=desc, leave=False, dynamic_ncols=True):
        pairs = buffer.load_batch(run.train_batch, q, rng)
        before, after = on_device(pairs, device)
        kv, _ = rebuild_inputs(backbone, unit.cfg, pairs.data_ids, device)
        parts = unit(before, kv).mse(after)
        scale = ({k: 1 / getattr(after, k).var().clamp(min=1e-8) for k in parts} if run.state_loss == "normalised"
                 else dict.fromkeys(parts, 1.0))
        loss = sum(v * scale[k] for k, v in parts.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unit.eval()
    head = max(1, len(losses) // 10)
    return {"loss_first": float(np.mean(losses[:head])), "loss_last": float(np.mean(losses[-head:])),
            **{f"loss_{k}": v.item() for k, v in parts.items()}}


def onm_loss(onm: OpticNerveModel, backbone: Backbone, pairs: PairBatch, thetas: dict[str, torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """The seed's ONM objective: from (y_{t+2}, C_{t+2}, kv, theta of the weights that made the pair), the
    full State_{t+2}; the sum of the parts' MSEs."""
    _, after = on_device(pairs, device)
    kv, _ = rebuild_inputs(backbone, onm.cfg, pairs.data_ids, device)
    theta = torch.stack([thetas[w] for w in pairs.weight_ids]).to(device)       # (n, theta_dim)
    guess = onm.parts(after.y, after.C, kv, theta)
    return sum(F.mse_loss(v, getattr(after, k)) for k, v in guess.items())


def train_onm(onm: OpticNerveModel, backbone: Backbone, weights: WeightManager, buffer: DiskReplayBuffer,
              run: RunConfig, device: torch.device, seed: int, val_pairs: int = 512) -> dict:
    """--onm-steps AdamW steps of the optic nerve model on the train split, with its loss on a fixed sample
    of the held-out split before and after (and every tenth of the way)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scratch, thetas = ThinkingUnit(weights.cfg), {}

    def theta_of(ids: list[str]) -> dict[str, torch.Tensor]:
        for w in set(ids) - set(thetas):
            weights.load_into(scratch, w)
            thetas[w] = theta_code(scratch, onm.theta_dim)
        return thetas

    val = (buffer.load_batch(val_pairs, 0.5, np.random.default_rng(seed + 1), split="val")
           if sum(buffer.counts("val").values()) else None)

    def val_loss() -> float | None:
        if val is None:                                     # too few pairs so far to hold any out
            return None
        onm.eval()
        with torch.no_grad():
            loss = onm_loss(onm, backbone, val, theta_of(val.weight_ids), device).item()
        onm.train()
        return loss

    if not onm.fitted:
        onm.fit_scales(on_device(buffer.load_batch(4 * run.train_batch, 0.5, rng), device)[1])
    opt = torch.optim.AdamW(onm.parameters(), lr=run.onm_lr)
    curve = [val_loss()]
    onm.train()
    for step in tqdm(range(run.onm_steps), desc="optic nerve model", leave=False, dynamic_ncols=True):
        pairs = buffer.load_batch(run.train_batch, 0.5, rng)
        loss = onm_loss(onm, backbone, pairs, theta_of(pairs.weight_ids), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(onm.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, run.onm_steps // 10) == 0:
            curve.append(val_loss())
    onm.eval()
    return {"onm_val_before": curve[0], "onm_val_after": curve[-1], "onm_val_curve": curve}

# -----------------------------------------------------------------------------
# phase three: the tournament and the task


@torch.no_grad()
def improvement_score(unit: ThinkingUnit, backbone: Backbone, pairs: PairBatch, device: torch.device,
                      batch: int = 256) -> dict:
    """StateImprovementScore = sum(C_{t+2} - C_t) + sum(Loss_t - Loss_{t+2}) over the pairs, with State_{t+2}
    the unit's own continuation of each stored State_t (the stored State_{t+2} is not used)."""
    cfg, gain, drop = unit.cfg, 0.0, 0.0
    for lo in range(0, len(pairs), batch):
        part = pairs.take(torch.arange(lo, min(lo + batch, len(pairs))))
        before, _ = on_device(part, device)
        kv, targets = rebuild_inputs(backbone, cfg, part.data_ids, device)
        after = unit(before, kv)
        gain += (after.C - before.C).sum().item()
        drop += (tick_losses(before.y, targets, cfg.out_shape).mean(-1)
                 - tick_losses(after.y, targets, cfg.out_shape).mean(-1)).sum().item()
    return {"score": gain + drop, "certainty_gain": gain, "loss_drop": drop}


@torch.no_grad()
def task_performance(unit: ThinkingUnit, backbone: Backbone, run: RunConfig, device: torch.device,
                     onm: OpticNerveModel | None = None, batch: int = 256) -> dict:
    """Held-out samples from generate_initial_state(): solve rate (every position right) and accuracy after
    a fixed --task-budget ticks, and with iterate-until-confident decoding (State_{n+2} = f(State_n) until the
    certainty reaches --confidence or --tick-cap ticks; a finished sample keeps its answer), with the mean
    ticks it used."""
    cfg, n = unit.cfg, run.task_samples
    totals = dict.fromkeys(("solve_budget", "acc_budget", "solve_confident", "acc_confident", "ticks_confident",
                            "confident"), 0.0)
    for lo in range(0, n, batch):
        x, targets = task_batch(cfg, test_ids(min(batch, n - lo), lo), device)
        kv, y_base = backbone(x)
        start = generate_initial_state(y_base, certainty(y_base, cfg.out_shape), kv, unit, run.init_state, onm)
        *_, last = unit.run(start, kv, run.task_budget)
        s, answer = start, start.y.clone()
        done = torch.zeros(x.size(0), dtype=torch.bool, device=device)
        ticks = torch.full((x.size(0),), run.tick_cap, device=device)
        for used in range(2, run.tick_cap + 1, 2):
            s = unit(s, kv)
            now = ~done & (s.C >= run.confidence)
            answer[now], ticks[now] = s.y[now], used
            done |= now
            if done.all():
                break
        answer[~done] = s.y[~done]
        for name, y in (("budget", last.y), ("confident", answer)):
            right = y.view(-1, *cfg.out_shape).argmax(-1) == targets
            totals[f"solve_{name}"] += right.all(-1).sum().item()
            totals[f"acc_{name}"] += right.float().mean(-1).sum().item()
        totals["ticks_confident"] += ticks.float().sum().item()
        totals["confident"] += done.sum().item()
    return {k: v / n for k, v in totals.items()}

# -----------------------------------------------------------------------------
# MasterTrainer: the self-improvement loop


def anneal(start: float, end: float, cycle: int, cycles: int) -> float:
    return start + (end - start) * cycle / max(cycles - 1, 1)


class MasterTrainer:
    """Cycles of data generation -> training (optic nerve model, then a challenger cohort) -> evaluation
    (a tournament on held-out pairs), with p and q annealed over the cycles.

    Resumable after a kill at any point: master_state.json (written atomically) records the cycle and the
    phase in progress. An interrupted phase restarts: generation draws new data (a new attempt seed, so no
    pair is stored twice), training keeps the challengers already saved, evaluation is repeated (the
    dethroned best is archived in expert_pool/ before best_model.pth is replaced). Pair files and weights are
    written atomically, so nothing half-written is ever read."""

    PHASES = ("generate", "train", "evaluate")         # methods phase_<name>

    def __init__(self, cfg: CTMConfig, run: RunConfig, device: torch.device):
        self.cfg, self.run, self.device = cfg, run, device
        self.root = Path(run.out_dir)
        self.weights = WeightManager(self.root, cfg)
        self.buffer = DiskReplayBuffer(self.root, cfg, run.buffer_capacity, run.val_fraction)
        self.state_path = self.root / "master_state.json"
        self.state = {"cycle": 0, "phase": "generate", "attempt": 0, "history": [], "base": None}
        if self.state_path.exists():
            try:
                self.state = json.loads(self.state_path.read_text())
                if not (set(self.state) >= {"cycle", "phase", "attempt", "history", "base"}
                        and self.state["phase"] in (*self.PHASES, "done")):
                    raise ValueError("fields missing or an unknown phase")
            except (ValueError, UnicodeDecodeError, TypeError) as exc:
                raise CTMError(f"{self.state_path}: not a loop state file ({exc})") from None
        for stale in [*self.root.glob(".*.tmp"), *self.weights.pool_dir.glob(".*.tmp")]:
            stale.unlink()                                     # writes killed before their rename
        self.backbone = Backbone(cfg).to(device).eval()
        self.onm = None
        self.tensorboard = None

    def save_state(self, **changes: object) -> None:
        self.state.update(changes)
        atomic_write_bytes(json.dumps(self.state, indent=1).encode(), self.state_path)

    def unit(self, weight_id: str) -> ThinkingUnit:
        unit = ThinkingUnit(self.cfg)
        self.weights.load_into(unit, weight_id)
        return unit.to(self.device).eval()

    def loop(self) -> list[dict]:
        """Run (or continue) the loop; returns the per-cycle records."""
        run = self.run
        ensure_base(self.weights, run, self.device)
        self.weights.load_backbone(self.backbone)
        self.open_onm()
        self.open_tensorboard()
        if self.state["base"] is None:          # the pretrained CTM as it is, measured as the loop's bests will be
            base_id = self.weights.best_id()
            self.save_state(base={"weight_id": base_id, **task_performance(
                self.unit(base_id), self.backbone, run, self.device)})
        print(self.describe_base())
        while self.state["cycle"] < run.cycles:
            cycle = self.state["cycle"]
            record = self.state.get("record") or {"cycle": cycle + 1}
            todo = self.PHASES[self.PHASES.index(self.state["phase"]):] if self.state["phase"] != "done" else ()
            for phase in todo:
                record.update(getattr(self, f"phase_{phase}")(cycle))
                following = self.PHASES.index(phase) + 1
                self.save_state(phase=self.PHASES[following] if following < len(self.PHASES) else "done",
                                record=record)
            self.log_cycle(record)
            self.save_state(cycle=cycle + 1, phase="generate", attempt=0, record=None,
                            history=[*self.state["history"], record])
        report = self.report()
        print(report)
        return self.state["history"]

    # the phases: each returns its part of the cycle's record
    def phase_generate(self, cycle: int) -> dict:
        run = self.run
        p = anneal(run.p_best, run.p_end, cycle, run.cycles)
        attempt = self.state["attempt"]
        self.save_state(attempt=attempt + 1)
        gen = DataGenerator(self.cfg, dataclasses.replace(run, p_best=p), self.device, self.weights, self.buffer,
                            self.onm, seed=run.seed * 1_000_003 + cycle * 1009 + attempt)
        stats = gen.run_threaded(run.gen_batches)
        tqdm.write(f"cycle {cycle + 1}: generated {stats.written} pairs (lenient {stats.kept['lenient']}, strict "
                   f"{stats.kept['strict']} of {stats.candidates}); buffers {self.buffer.counts()}")
        return {"p": p, "pairs": stats.written, "candidates": stats.candidates,
                "yield_strict": stats.kept["strict"] / max(stats.candidates, 1),
                "yield_lenient": stats.kept["lenient"] / max(stats.candidates, 1)}

    def phase_train(self, cycle: int) -> dict:
        """The optic nerve model (with --onm), then the challenger cohort: each starts from best_model.pth and
        trains with its own seed; a challenger already saved in this cycle is kept."""
        run, record = self.run, {}
        q = anneal(run.q_start, run.q_end, cycle, run.cycles)
        best_id = self.weights.best_id()
        if self.onm is not None:
            done = self.state.get("onm_done")                 # trained in this cycle before a restart
            if done is None or done["cycle"] != cycle + 1:
                done = {"cycle": cycle + 1, **train_onm(self.onm, self.backbone, self.weights, self.buffer, run,
                                                        self.device, seed=run.seed + cycle)}
                atomic_save({"config": dataclasses.asdict(self.cfg), "onm": self.onm.state_dict()}, self.onm_path)
                self.save_state(onm_done=done)
            record.update({k: v for k, v in done.items() if k != "cycle"})
        if not sum(self.buffer.counts("train").values()):
            tqdm.write(f"cycle {cycle + 1}: no training pairs yet, so no challengers this cycle")
            return {"q": q, **record}
        trained = self.state.get("cohort_stats")                # challengers saved before a restart
        trained = trained if trained and trained["cycle"] == cycle + 1 else {"cycle": cycle + 1, "stats": {}}
        for i in range(run.cohort):
            weight_id = f"cycle{cycle + 1}-challenger{i}"
            path = self.weights.cohort_dir / f"challenger_{i}.pth"
            if (str(i) in trained["stats"] and path.exists()
                    and self.weights.checked(path, "weight_id", "unit")["weight_id"] == weight_id):
                continue
            unit = self.unit(best_id)
            stats = train_unit(unit, self.backbone, self.buffer, run, q, run.seed * 7919 + cycle * 101 + i,
                               self.device, f"cycle {cycle + 1} challenger {i}")
            self.weights.save_challenger(unit, i, weight_id)
            trained["stats"][str(i)] = stats
            self.save_state(cohort_stats=trained)
        losses = list(trained["stats"].values())
        record.update({k: float(np.mean([l[k] for l in losses])) for k in losses[0]})
        return {"q": q, **record}

    def phase_evaluate(self, cycle: int) -> dict:
        """Score best_model.pth and this cycle's challengers on the same held-out pairs; promote the highest
        (the dethroned best is archived in expert_pool/ first), clear the cohort; every --task-every cycles,
        measure the best on the task. The verdict is saved before it is carried out, so a restart finishes
        the same promotion instead of judging again."""
        run = self.run
        verdict = self.state.get("verdict")
        if verdict is None or verdict["cycle"] != cycle + 1:
            verdict = {"cycle": cycle + 1, **self.judge(cycle)}
            self.save_state(verdict=verdict)
        winner, dethroned = verdict["best"], verdict["dethroned"]
        if winner != dethroned:
            if dethroned not in self.weights.pool_ids():
                self.weights.save_pool(self.unit(dethroned), dethroned)
            if self.weights.best_id() != winner:
                self.weights.save_best(self.unit(winner), winner)
        shutil.rmtree(self.weights.cohort_dir, ignore_errors=True)
        record = {k: v for k, v in verdict.items() if k not in ("cycle", "dethroned")}
        if (cycle + 1) % run.task_every == 0 or cycle + 1 == run.cycles:
            record.update(task_performance(self.unit(winner), self.backbone, run, self.device, self.onm))
            tqdm.write(f"cycle {cycle + 1}: solve rate {record['solve_budget']:.3f} at {run.task_budget} ticks, "
                       f"{record['solve_confident']:.3f} until confident ({record['ticks_confident']:.1f} ticks)")
        return record

    def judge(self, cycle: int) -> dict:
        """The tournament: StateImprovementScore of the best and of each of this cycle's challengers on the
        same held-out pairs (drawn with a seed of the cycle); the highest wins, a tie keeps the best."""
        run = self.run
        best_id = self.weights.best_id()
        entrants = [best_id] + [w for p in sorted(self.weights.cohort_dir.glob("challenger_*.pth"))
                                if (w := self.weights.checked(p, "weight_id", "unit")["weight_id"]).startswith(
                                    f"cycle{cycle + 1}-")]
        if not sum(self.buffer.counts("val").values()):        # too few pairs so far to hold any out
            tqdm.write(f"cycle {cycle + 1}: no held-out pairs yet, so no tournament: the best is kept")
            return {"val_pairs": 0, "score_best": None, "score_challengers": [], "promoted": False,
                    "best": best_id, "dethroned": best_id, "score_per_pair": None}
        val = self.buffer.load_batch(run.val_pairs, 0.5, np.random.default_rng(run.seed + cycle), split="val")
        scores = {w: improvement_score(self.unit(w), self.backbone, val, self.device)["score"] for w in entrants}
        winner = max(entrants, key=lambda w: (scores[w], w == best_id))
        tqdm.write(f"cycle {cycle + 1}: StateImprovementScore best {scores[best_id]:.2f}, challengers "
                   f"{', '.join(f'{scores[w]:.2f}' for w in entrants[1:])} -> "
                   f"{'promoted ' + winner if winner != best_id else 'best kept'}")
        return {"val_pairs": len(val), "score_best": scores[best_id], "score_challengers": [scores[w] for w in entrants[1:]],
                "promoted": winner != best_id, "best": winner, "dethroned": best_id,
                "score_per_pair": scores[best_id] / len(val)}

    # the optic nerve model, logs, the report
    @property
    def onm_path(self) -> Path:
        return self.root / "optic_nerve_model.pth"

    def open_onm(self) -> None:
        if not self.run.onm:
            return
        self.onm = OpticNerveModel(self.cfg).to(self.device)
        if self.onm_path.exists():
            load_weights(self.onm, self.weights.checked(self.onm_path, "onm")["onm"], self.onm_path)
        self.onm.eval()

    def open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:                                  # optional: JSONL is the record
            return
        self.tensorboard = SummaryWriter(str(self.root / "tensorboard"))

    def log_cycle(self, record: dict) -> None:
        path = self.root / "cycles.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[-1]).get("cycle") == record["cycle"]:
            return                                           # logged before a kill, just before the state save
        with MetricsLogger(path) as log:
            log.log(**record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["cycle"])
            self.tensorboard.flush()

    def describe_base(self) -> str:
        b, run = self.state["base"], self.run
        return (f"base CTM {b['weight_id']}: solve rate {b['solve_budget']:.3f} at {run.task_budget} ticks, "
                f"{b['solve_confident']:.3f} until confident ({b['ticks_confident']:.1f} ticks)")

    def report(self) -> str:
        """The per-cycle table; also writes cycles.svg."""
        rows, base = self.state["history"], self.state["base"]
        lines = [self.describe_base(), "score: StateImprovementScore on the cycle's held-out pairs (per pair, "
                 "best model and best challenger); yield: pairs stored / candidates",
                 f"{'cycle':>5s} {'pairs':>7s} {'yield':>6s} {'loss':>8s} {'score best':>10s} {'best chall.':>11s} "
                 f"{'promoted':>8s} {'solve@budget':>12s} {'solve@conf':>10s} {'ticks':>6s}"]
        for r in rows:
            task = (f"{r['solve_budget']:12.3f} {r['solve_confident']:10.3f} {r['ticks_confident']:6.1f}"
                    if "solve_budget" in r else f"{'':12s} {'':10s} {'':6s}")
            score = (f"{r['score_best'] / r['val_pairs']:10.4f} "
                     f"{max(r['score_challengers'], default=float('nan')) / r['val_pairs']:11.4f}"
                     if r["score_best"] is not None else f"{'no tournament':>22s}")
            lines.append(f"{r['cycle']:5d} {r['pairs']:7d} {r['pairs'] / max(r['candidates'], 1):6.1%} "
                         f"{r.get('loss_last', float('nan')):8.4f} {score} {'yes' if r['promoted'] else 'no':>8s} {task}")
        promoted = sum(r["promoted"] for r in rows)
        lines.append(f"promotions: {promoted} of {len(rows)} cycles")
        write_cycles_plot(self.root / "cycles.svg", rows, base, self.run)
        return "\n".join(lines)


def write_cycles_plot(path: Path, rows: list[dict], base: dict, run: RunConfig) -> None:
    """A two-panel SVG (no plotting package needed): the StateImprovementScore of the best model entering each
    cycle and of its best challenger; the solve rates with the pretrained base CTM's as dashed lines."""
    cycles = [r["cycle"] for r in rows]
    tasked = [r for r in rows if "solve_budget" in r]
    scored = [r for r in rows if r["score_best"] is not None]
    panels = [("StateImprovementScore per held-out pair",
               [("best", "#1f77b4", [(r["cycle"], r["score_best"] / r["val_pairs"]) for r in scored], None),
                ("best challenger", "#d62728", [(r["cycle"], max(r["score_challengers"]) / r["val_pairs"])
                                                for r in scored if r["score_challengers"]], None)]),
              ("solve rate", [(f"{run.task_budget} ticks", "#1f77b4", [(r["cycle"], r["solve_budget"]) for r in tasked],
                               base["solve_budget"]),
                              ("until confident", "#2ca02c", [(r["cycle"], r["solve_confident"]) for r in tasked],
                               base["solve_confident"])])]
    width, height, pad = 420, 260, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height}" font-family="sans-serif" '
           'font-size="11">']
    for k, (title, series) in enumerate(panels):
        x0 = k * width
        values = [v for _, _, pts, ref in series for v in [y for _, y in pts] + ([ref] if ref is not None else [])]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        cx = lambda c: x0 + pad + (c - 1) / max(max(cycles, default=1) - 1, 1) * (width - 2 * pad)
        cy = lambda v: height - pad - (v - lo) / (hi - lo) * (height - 2 * pad)
        out.append(f'<text x="{x0 + width / 2}" y="16" text-anchor="middle">{title}</text>')
        out.append(f'<rect x="{x0 + pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
                   'fill="none" stroke="#999"/>')
        out.append(f'<text x="{x0 + pad - 4}" y="{pad + 4}" text-anchor="end">{hi:.3g}</text>')
        out.append(f'<text x="{x0 + pad - 4}" y="{height - pad}" text-anchor="end">{lo:.3g}</text>')
        out.append(f'<text x="{x0 + width / 2}" y="{height - 8}" text-anchor="middle">cycle</text>')
        for j, (name, color, pts, ref) in enumerate(series):
            if ref is not None:
                out.append(f'<line x1="{x0 + pad}" x2="{x0 + width - pad}" y1="{cy(ref):.1f}" y2="{cy(ref):.1f}" '
                           f'stroke="{color}" stroke-dasharray="4 3"/>')
            if pts:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                           + " ".join(f"{cx(c):.1f},{cy(v):.1f}" for c, v in pts) + '"/>')
            out.append(f'<text x="{x0 + pad + 6}" y="{pad + 14 + 13 * j}" fill="{color}">{name}'
                       f'{" (dashed: base CTM)" if ref is not None else ""}</text>')
    out.append("</svg>")
    atomic_write_bytes("\n".join(out).encode(), path)
# -----------------------------------------------------------------------------
# experiments (milestones 5A, 8 and 9) and the optic nerve model offline (milestone 7)


def experiment_arms(name: str, run: RunConfig) -> list[tuple[str, dict]]:
    return {"filter": [("lenient", {"filter": "lenient"}), ("strict", {"filter": "strict"})],
            "onm": [("onm-off", {"onm": False}), ("onm-on", {"onm": True})],
            "cohort": [("cohort-1", {"cohort": 1}), (f"cohort-{run.cohort}", {"cohort": run.cohort})],
            "loss": [("loss-sum", {"state_loss": "sum"}), ("loss-normalised", {"state_loss": "normalised"})]}[name]


def experiment(name: str, cfg: CTMConfig, run: RunConfig, device: torch.device) -> dict:
    """Two arms of the loop from the same pretrained base and empty buffers, each in
    OUT_DIR/experiments/NAME/ARM (resumable like any loop); prints a table of the two."""
    if name == "cohort" and run.cohort < 2:
        raise CTMError("--experiment cohort compares a cohort of 1 with --cohort: give --cohort 2 or more")
    root = Path(run.out_dir)
    weights = WeightManager(root, cfg)
    ensure_base(weights, run, device)
    results = {}
    for arm, changes in experiment_arms(name, run):
        arm_root = root / "experiments" / name / arm
        if not arm_root.exists():                        # set up in a side folder, then renamed: all or nothing
            setup = arm_root.with_name(f".{arm}.setup")
            shutil.rmtree(setup, ignore_errors=True)
            (setup / "expert_pool").mkdir(parents=True)
            for path in [weights.backbone_path, weights.best_path, *sorted(weights.pool_dir.glob("*.pth"))]:
                shutil.copyfile(path, setup / path.relative_to(root))
            os.replace(setup, arm_root)
        print(f"experiment {name}, arm {arm}: {arm_root}")
        results[arm] = MasterTrainer(cfg, dataclasses.replace(run, out_dir=str(arm_root), **changes), device).loop()
    print(f"experiment {name}: {run.cycles} cycles per arm")
    print(f"{'arm':16s} {'pairs/cycle':>11s} {'yield':>6s} {'score/pair best, first -> last':>30s} "
          f"{'promoted':>8s} {'solve@budget':>12s} {'solve@conf':>10s} {'ticks':>6s}")
    for arm, rows in results.items():
        last = next((r for r in reversed(rows) if "solve_budget" in r), {})
        scores = [r["score_best"] / r["val_pairs"] for r in rows if r["score_best"] is not None] or [float("nan")]
        stored = sum(r["pairs"] for r in rows) / max(sum(r["candidates"] for r in rows), 1)
        print(f"{arm:16s} {np.mean([r['pairs'] for r in rows]):11.0f} {stored:6.1%} "
              f"{scores[0]:14.4f} -> {scores[-1]:12.4f} "
              f"{sum(r['promoted'] for r in rows):4d}/{len(rows):<3d} {last.get('solve_budget', float('nan')):12.3f} "
              f"{last.get('solve_confident', float('nan')):10.3f} {last.get('ticks_confident', float('nan')):6.1f}")
    atomic_write_bytes(json.dumps(results, indent=1).encode(), root / "experiments" / name / "results.json")
    return results


def train_onm_offline(cfg: CTMConfig, run: RunConfig, device: torch.device) -> dict:
    """Milestone 7: a fresh optic nerve model trained on OUT_DIR's stored pairs, with its held-out loss."""
    root = Path(run.out_dir)
    weights = WeightManager(root, cfg)
    backbone = Backbone(cfg).to(device).eval()
    weights.load_backbone(backbone)
    buffer = DiskReplayBuffer(root, cfg, run.buffer_capacity, run.val_fraction)
    print(f"optic nerve model on {buffer.counts('train')} train and {buffer.counts('val')} held-out pairs")
    if not sum(buffer.counts("val").values()) or not sum(buffer.counts("train").values()):
        raise CTMError(f"{root}: needs both train and held-out pairs (generate more data)")
    torch.manual_seed(run.seed)
    onm = OpticNerveModel(cfg).to(device)
    result = train_onm(onm, backbone, weights, buffer, run, device, seed=run.seed)
    atomic_save({"config": dataclasses.asdict(cfg), "onm": onm.state_dict()}, root / "optic_nerve_model.pth")
    print("held-out loss every tenth of training: " + " ".join(f"{v:.4f}" for v in result["onm_val_curve"]))
    print(f"held-out loss {result['onm_val_before']:.4f} -> {result['onm_val_after']:.4f}; "
          f"wrote {root / 'optic_nerve_model.pth'}")
    return result


# -----------------------------------------------------------------------------
# --debug-step: the seed's milestone 1


def debug_step(cfg: CTMConfig, run: RunConfig, device: torch.device) -> bool:
    """A random model, one long forward pass, one pair saved and reloaded, one training step; prints each
    check and returns whether all passed. Works in OUT_DIR/debug_step/, cleared first."""
    root = Path(run.out_dir) / "debug_step"
    shutil.rmtree(root, ignore_errors=True)
    results = []

    def check(what: str, ok: bool, detail: str = "") -> None:
        results.append(ok)
        print(f"  [{'ok' if ok else 'FAILED'}] {what}{': ' + detail if detail else ''}")

    seed_everything(run.seed)
    ctm = CTM(cfg).to(device).eval()
    weights = WeightManager(root, cfg)
    weights.save_backbone(ctm.backbone)
    weights.save_pool(ctm.unit, "random-0")
    buffer = DiskReplayBuffer(root, cfg, run.buffer_capacity, run.val_fraction)
    ids = train_ids(np.random.default_rng(run.seed), 2)
    x, _ = task_batch(cfg, ids, device)
    with torch.no_grad():
        kv, y_base = ctm.backbone(x)
        s0 = generate_initial_state(y_base, certainty(y_base, cfg.out_shape), kv, ctm.unit, run.init_state)
        states = [s0] + list(ctm.unit.run(s0, kv, run.gen_ticks))
    t = run.gen_ticks // 2
    print(f"random {cfg.task} CTM, one forward pass of {run.gen_ticks} ticks; pair (State_{t}, State_{t + 2}) "
          f"of sample 0 saved to {root}")
    first = lambda s: s.map(lambda v: v[:1].cpu())
    pair = PairBatch(first(states[t]), first(states[t + 2]), ["random-0"], ids[:1], torch.tensor([t]))
    buffer.save_pair(pair, "expert")
    loaded = buffer.load_batch(1, q=1.0, split="val" if buffer.is_validation(ids[:1]) else "train")
    same = all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
               for side in ("before", "after")
               for a, b in zip(getattr(pair, side).tensors().values(), getattr(loaded, side).tensors().values()))
    check("pair reloaded with identical shapes, dtypes and values", same,
          ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in loaded.before.tensors().items()))
    check("provenance kept (weight_id, data ID, tick)", loaded.weight_ids == ["random-0"]
          and torch.equal(loaded.data_ids, ids[:1]) and loaded.ticks.tolist() == [t])
    found = weights.load(loaded.weight_ids[0])
    check("weights found again by weight_id", all(torch.equal(found[k], v.cpu()) for k, v in ctm.unit.state_dict().items()))
    before, after = on_device(loaded, device)
    kv_again, _ = rebuild_inputs(ctm.backbone, cfg, loaded.data_ids, device)
    with torch.no_grad():
        again = ctm.unit(before, kv_again)
    kv_gap = (kv_again - kv[:1]).abs().max().item()         # a batch of one runs other conv kernels: not bitwise
    check("kv recomputed from the data ID", kv_gap < 1e-5, f"largest difference {kv_gap:.1e}")
    gap = max((getattr(again, k) - getattr(after, k)).abs().max().item() for k in State.FIELDS)
    check("the two-tick unit continues the long forward pass from the stored State_t", gap < 1e-5,
          f"largest difference {gap:.1e}")
    torch.manual_seed(run.seed + 1)
    student = ThinkingUnit(cfg).to(device)
    params = student.dynamics_parameters()
    opt = torch.optim.AdamW(params.values(), lr=run.lr)
    parts = student(before, kv_again).mse(after)
    loss = sum(parts.values())
    loss.backward()
    print(f"one training step of a second random unit on the pair: state loss {loss.item():.4f} = "
          + " + ".join(f"{k} {v.item():.4f}" for k, v in parts.items()))
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.isfinite().all() or not p.grad.any()]
    check(f"all {len(params)} parameters of the state transition have a finite, nonzero gradient", not missing,
          f"missing: {missing}" if missing else "")
    untrained = [n for n in dict(student.named_parameters()) if n not in params]
    print(f"  (not trained by the state loss, by design: {', '.join(untrained)}; the backbone is frozen)")
    opt.step()
    with torch.no_grad():
        loss_after = sum(student(before, kv_again).mse(after).values()).item()
    check("the step lowers the state loss on the pair", loss_after < loss.item(),
          f"{loss.item():.4f} -> {loss_after:.4f}")
    print("debug step: all checks passed" if all(results) else "debug step: SOME CHECKS FAILED")
    return all(results)

# -----------------------------------------------------------------------------
# --bench: the pipeline against a serial loop, streaming against holding the whole trajectory


def peak_memory_probe(cfg: CTMConfig, run: RunConfig, root: str, how: str, chunk_ticks: int,
                      result: "multiprocessing.Queue") -> None:
    """Run one generation phase in this (fresh) process and put its peak memory above the level before it:
    CUDA's allocator peak, or the resident-set high-water mark (Linux). A fresh process per mode keeps one
    mode's freed memory from hiding the next one's."""
    torch.set_num_threads(run.threads or torch.get_num_threads())
    device = pick_device(run.device)
    with tempfile.TemporaryDirectory(prefix="ctm_probe_") as tmp:
        gen = DataGenerator(cfg, run, device, WeightManager(Path(root), cfg),
                            DiskReplayBuffer(Path(tmp), cfg, run.buffer_capacity, run.val_fraction))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            getattr(gen, f"run_{how}")(run.gen_batches, chunk_ticks, progress=False)
            result.put(torch.cuda.max_memory_allocated(device) - base)
            return

        def status(field: str) -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                          # 5: reset the high-water mark to the current RSS
            base = status("VmRSS:")
        except OSError:
            result.put(None)
            return
        getattr(gen, f"run_{how}")(run.gen_batches, chunk_ticks, progress=False)
        result.put(status("VmHWM:") - base)


def bench(cfg: CTMConfig, run: RunConfig, device: torch.device, repeat: int) -> dict:
    """Pairs/s of the threaded pipeline against the serial loop (at one torch thread and at --threads), the
    best of `repeat` alternating runs in this process; then wall time and peak memory of streaming tick
    chunks against computing the whole trajectory before filtering, one fresh process per mode. Uses
    OUT_DIR's weights when it holds some, else random ones; pairs go to temporary folders."""
    threads = run.threads or DEFAULT_THREADS
    whole = run.gen_ticks + 1
    # (mode, --threads): the serial loop at torch's default and at one thread, the pipeline at its own setting
    speed_modes = list(dict.fromkeys([("serial", threads), ("serial", 1), ("threaded", run.threads)]))
    results: dict = {"speed": {}, "memory": {}}
    with tempfile.TemporaryDirectory(prefix="ctm_bench_") as tmp:
        weights = WeightManager(Path(run.out_dir), cfg)
        if not weights.backbone_path.exists():
            weights = WeightManager(Path(tmp), cfg)
            ensure_weights(weights, dataclasses.replace(run, pool_random=1))
        print(f"weights from {weights.root}; {run.gen_batches} batches x {run.gen_batch_size} samples x "
              f"{run.gen_ticks} ticks, chunks of {run.chunk_ticks} ticks, {run.workers} worker(s), "
              f"{run.io_threads} writer(s), {cfg.task} D={cfg.d_model}, device {device}")
        for k in range(repeat):
            for how, n in speed_modes:
                buffer = DiskReplayBuffer(Path(tmp) / f"{how}-{n}-{k}", cfg, run.buffer_capacity, run.val_fraction)
                gen = DataGenerator(cfg, dataclasses.replace(run, threads=n), device, weights, buffer)
                t0 = time.perf_counter()
                stats = getattr(gen, f"run_{how}")(run.gen_batches, progress=False)
                seconds = time.perf_counter() - t0
                shutil.rmtree(buffer.folders["expert"].path.parent)
                best = results["speed"].get((how, n))
                if best is None or seconds < best["seconds"]:
                    results["speed"][(how, n)] = {"pairs": stats.written, "seconds": seconds,
                                                  "threads": gen.threads(how == "threaded")}
        context = multiprocessing.get_context("spawn")
        for how in ("serial", "threaded"):
            for ticks in (run.chunk_ticks, whole):
                queue_ = context.Queue()
                t0 = time.perf_counter()
                probe = context.Process(target=peak_memory_probe, args=(cfg, dataclasses.replace(run, threads=threads),
                                                                        str(weights.root), how, ticks, queue_))
                probe.start()
                peak = queue_.get()
                probe.join()
                results["memory"][(how, ticks)] = {"peak": peak, "seconds": time.perf_counter() - t0}
    print(f"{'pairs/s':10s} {'threads':>7s} {'pairs':>8s} {'seconds':>8s} {'pairs/s':>8s}")
    for (how, n), r in results["speed"].items():
        print(f"{how:10s} {r['threads']:7d} {r['pairs']:8d} {r['seconds']:8.2f} {r['pairs'] / r['seconds']:8.0f}")
    speed = results["speed"]
    threaded = speed[("threaded", run.threads)]["seconds"]
    same = len({r["pairs"] for r in speed.values()}) == 1
    print("threaded / serial pairs per second: "
          + ", ".join(f"{speed[(how, n)]['seconds'] / threaded:.2f}x against the serial loop at "
                      f"{speed[(how, n)]['threads']} thread(s)" for how, n in speed_modes if how == "serial")
          + f"; same pairs: {same}")
    print(f"{'memory':10s} {'chunk':>7s} {'peak MB':>8s} {'seconds':>8s}  (one fresh process each, with start-up)")
    for (how, ticks), r in results["memory"].items():
        peak = f"{r['peak'] / 2**20:8.1f}" if r["peak"] is not None else "     n/a"
        print(f"{how:10s} {ticks:7d} {peak} {r['seconds']:8.2f}")
    for how in ("serial", "threaded"):
        streamed, held = results["memory"][(how, run.chunk_ticks)]["peak"], results["memory"][(how, whole)]["peak"]
        if streamed is not None and held:
            print(f"{how}: streaming / whole trajectory peak memory {streamed / held:.2f}x")
    return results


def copy_reference_weights(ref: nn.Module, ctm: CTM) -> None:
    """Load a reference ContinuousThoughtMachine's (parity) weights into ours: the same function, laid out
    differently (NLM weights neuron-major, attention in-projection split, neuron pairs as explicit lists)."""
    u, b, d = ctm.unit, ctm.backbone, ctm.cfg.d_input
    with torch.no_grad():
        b.embed.weight.copy_(ref.backbone.embedding.weight)
        b.pos.load_state_dict(ref.positional_embedding.projection.state_dict())
        b.kv_proj.load_state_dict(ref.kv_proj.state_dict())
        u.q_proj.load_state_dict(ref.q_proj.state_dict())
        for lin, rows in ((u.attention.q_in, slice(0, d)), (u.attention.kv_in, slice(d, 3 * d))):
            lin.weight.copy_(ref.attention.in_proj_weight[rows])
            lin.bias.copy_(ref.attention.in_proj_bias[rows])
        u.attention.out.load_state_dict(ref.attention.out_proj.state_dict())
        u.synapses.load_state_dict(ref.synapses.state_dict())
        ref_layers = [m for m in ref.trace_processor.modules() if hasattr(m, "w1")]
        for layer, ref_layer in zip(u.nlm.layers, ref_layers):
            w, bias = ref_layer.w1.permute(2, 0, 1), ref_layer.b1.permute(1, 0, 2)   # (D, in, 2 out), (D, 1, 2 out)
            half = w.size(-1) // 2
            layer.w_value.copy_(w[..., :half])
            layer.w_gate.copy_(w[..., half:])
            layer.b_value.copy_(bias[..., :half])
            layer.b_gate.copy_(bias[..., half:])
            layer.temperature.copy_(ref_layer.T)
        u.start_z.copy_(ref.start_activated_state)
        u.start_A.copy_(ref.start_trace)
        for kind, n in (("action", ctm.cfg.n_synch_action), ("out", ctm.cfg.n_synch_out)):
            getattr(u, f"decay_{kind}").copy_(getattr(ref, f"decay_params_{kind}"))
            left, right = getattr(ref, f"{kind}_neuron_indices_left"), getattr(ref, f"{kind}_neuron_indices_right")
            i, j = torch.triu_indices(n, n) if ctm.cfg.neuron_select == "random" else (torch.arange(n),) * 2
            getattr(u, f"pairs_{kind}").copy_(torch.stack((left[i], right[j])))
        u.readout.load_state_dict(ref.output_projector[0].state_dict())


def bench_reference(cfg: CTMConfig, run: RunConfig, device: torch.device, ref_dir: Path, iters: int) -> dict:
    """Training iterations per second (forward, loss, backward, quantile clip, AdamW) of this CTM and of the
    reference code imported from ref_dir, alternating in one process on the same batches. Also checks that
    both compute the same logits from the same weights."""
    if cfg.task != "parity":
        raise CTMError("--bench-reference compares the parity CTM (the reference has no maze generator)")
    sys.path.insert(0, str(ref_dir))
    try:
        from models.ctm import ContinuousThoughtMachine
        from utils.losses import parity_loss
    except ImportError as exc:
        raise CTMError(f"{ref_dir}: not a checkout of SakanaAI/continuous-thought-machines ({exc})") from None
    try:
        from autoclip.torch import QuantileClip as ReferenceClip
    except ImportError:
        ReferenceClip = None
    seed_everything(run.seed)
    with contextlib.redirect_stdout(io.StringIO()):                # it prints its synch sizes
        ref = ContinuousThoughtMachine(
            iterations=cfg.ticks, d_model=cfg.d_model, d_input=cfg.d_input, heads=cfg.heads,
            n_synch_out=cfg.n_synch_out, n_synch_action=cfg.n_synch_action, synapse_depth=cfg.synapse_depth,
            memory_length=cfg.memory_length, deep_nlms=cfg.nlm_hidden > 0, memory_hidden_dims=cfg.nlm_hidden,
            do_layernorm_nlm=False, backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d",
            out_dims=cfg.out_dims, prediction_reshaper=[cfg.parity_len, 2], dropout=cfg.dropout,
            neuron_select_type=cfg.neuron_select).to(device)
    rng = np.random.default_rng(run.seed)
    batches = [task_batch(cfg, train_ids(rng, run.batch_size), device) for _ in range(iters)]
    ref(batches[0][0])                                             # materialise its lazy layers
    ctm = CTM(cfg).to(device)
    copy_reference_weights(ref, ctm)
    with torch.no_grad():
        ours_y = ctm(batches[0][0])[0]
        ref_y = ref(batches[0][0])[0].permute(2, 0, 1)
    print(f"same weights, same logits: largest difference {(ours_y - ref_y).abs().max().item():.1e} "
          f"(logits up to {ref_y.abs().max().item():.2f}); parameters: ours {sum(p.numel() for p in ctm.parameters()):,} "
          f"(with the first-impression head), reference {sum(p.numel() for p in ref.parameters()):,}")
    opt = make_optimizer(ctm, run)
    clip = QuantileClip(list(ctm.parameters()), run.clip_quantile)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=run.lr, eps=1e-8, weight_decay=run.weight_decay)
    if ReferenceClip is not None:
        ref_opt = ReferenceClip.as_optimizer(optimizer=ref_opt, quantile=run.clip_quantile, history_length=1000)
        ref_clip = lambda: None
    else:
        ref_clip = QuantileClip(list(ref.parameters()), run.clip_quantile)

    def ref_step(x: torch.Tensor, targets: torch.Tensor) -> None:
        predictions, certainties, _ = ref(x)
        loss, _ = parity_loss(predictions.reshape(x.size(0), -1, 2, cfg.ticks), certainties, targets)
        loss.backward()
        ref_clip()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    steps = {"ours": lambda x, t: pretrain_step(ctm, opt, clip, x, t, run.lr), "reference": ref_step}
    seconds = {name: 0.0 for name in steps}
    for lo in range(0, iters, 5):                                  # alternate blocks of 5 iterations
        for name, step in steps.items():
            block = batches[lo:lo + 5]
            seconds[name] += sum(time_calls(lambda: [step(x, t) for x, t in block], device, 1, warmup=0))
    rates = {name: iters / s for name, s in seconds.items()}
    clip_note = "autoclip's QuantileClip" if ReferenceClip else "our QuantileClip (autoclip not installed)"
    print(f"{iters} training iterations each, batch {run.batch_size}, {cfg.ticks} ticks, "
          f"{torch.get_num_threads()} threads; reference clipped by {clip_note}")
    print(f"ours {rates['ours']:.2f} it/s, reference {rates['reference']:.2f} it/s: "
          f"{rates['ours'] / rates['reference']:.2f}x")
    return rates

# -----------------------------------------------------------------------------
# command line

EPILOG = """
output folder (--out-dir):
  backbone.pth                 the backbone shared by every model of the pool (frozen after --pretrain)
  best_model.pth               the current best thinking unit
  expert_pool/                 random initialisations and pretraining checkpoints
  challenger_cohort/           challengers of the current cycle
  expert_replay_buffer/        pairs made by expert_pool/ weights
  self_play_replay_buffer/     pairs made by best_model.pth
  pretrain_ckpt.pt, *_log.jsonl  resumable pretraining state and JSONL logs
The model flags are fixed once an out-dir holds weights: later runs read them from there.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CTM self-play: a Continuous Thought Machine trained as a two-tick state improver. With no "
                    "mode flag, runs the self-improvement loop (pretraining the base CTM first if OUT_DIR has "
                    "none): by default a small maze experiment, about 10 minutes on a CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_argument_group("modes (default: the loop)").add_mutually_exclusive_group()
    modes.add_argument("--pretrain", action="store_true", help="standard CTM training: writes the backbone, "
                       "expert_pool/ and best_model.pth")
    modes.add_argument("--generate", action="store_true", help="one data-generation phase into the replay "
                       "buffers, with yield statistics")
    modes.add_argument("--train-onm-offline", action="store_true", help="milestone 7: train a fresh optic nerve "
                       "model on the stored pairs and report its held-out loss")
    modes.add_argument("--experiment", choices=("filter", "onm", "cohort", "loss"), help="two arms of the loop "
                       "from the same base: strict vs lenient filter, optic nerve model off vs on, cohort 1 vs "
                       "--cohort, sum vs normalised state loss; prints a table")
    modes.add_argument("--debug-step", action="store_true", help="milestone 1: a random model's pair saved, "
                       "reloaded and trained on, each check printed")
    modes.add_argument("--bench", action="store_true", help="pipeline vs serial loop, streaming vs whole "
                       "trajectory (time and peak memory)")
    modes.add_argument("--bench-reference", metavar="DIR", help="training iterations/s of this CTM against the "
                       "reference CTM imported from DIR (a checkout of SakanaAI/continuous-thought-machines)")
    parser.add_argument("--resume", action="store_true", help="with --pretrain: continue OUT_DIR/pretrain_ckpt.pt "
                        "(the loop always continues where it stopped)")
    parser.add_argument("--bench-iters", type=int, default=30, help="timed iterations per model in "
                        "--bench-reference (default: 30)")
    parser.add_argument("--bench-repeat", type=int, default=2, help="runs of each --bench mode; the best "
                        "counts (default: 2)")
    add_config_flags(parser.add_argument_group("task and model (stored with the weights)"), CTMConfig)
    add_config_flags(parser.add_argument_group("run"), RunConfig)
    return parser


def resolve_model_config(explicit: dict, root: Path) -> CTMConfig:
    """The config stored in root (flags may not contradict it), else the defaults with the given flags."""
    for path in (root / "backbone.pth", root / "pretrain_ckpt.pt"):
        if path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    _, stored = load_checkpoint(path, CTMConfig)
                except ValueError as exc:
                    raise CTMError(str(exc)) from None
            clash = {k: (v, getattr(stored, k)) for k, v in explicit.items() if getattr(stored, k) != v}
            if clash:
                raise CTMError(f"{root} holds a run of another config ({', '.join(f'--{k} {new} vs stored {old}' for k, (new, old) in clash.items())}): "
                               "drop those flags or choose another --out-dir")
            return stored
    return CTMConfig(**explicit)


def writable_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise CTMError(f"--out-dir {root}: not writable ({exc.strerror or exc})") from None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.pretrain:
        parser.error("--resume goes with --pretrain")
    if args.bench_iters < 1 or args.bench_repeat < 1:
        parser.error("--bench-iters and --bench-repeat must be >= 1")
    try:
        explicit = given_flags(args, CTMConfig)
        task = explicit.get("task", CTMConfig.task)
        run = RunConfig(**given_flags(args, RunConfig))
        root = Path(run.out_dir or f"runs/ctm-{task}")
        cfg = CTMConfig(**explicit) if args.bench_reference else resolve_model_config(explicit, root)
        cfg.check()
        if args.resume:                                # the checkpoint's settings, then the flags given now
            saved = WeightManager(root, cfg).checked(root / "pretrain_ckpt.pt").get("run", {})
            known = {f.name for f in dataclasses.fields(RunConfig)}
            run = RunConfig(**{**{k: v for k, v in saved.items() if k in known}, **given_flags(args, RunConfig)})
        run = dataclasses.replace(run, out_dir=str(root), iters=run.iters or DEFAULT_ITERS[cfg.task])
        run.check()
        device = pick_device(run.device)
        if run.threads:
            torch.set_num_threads(run.threads)
        if args.bench:
            bench(cfg, run, device, args.bench_repeat)
        elif args.bench_reference:
            bench_reference(cfg, run, device, Path(args.bench_reference), args.bench_iters)
        else:
            writable_dir(root)
            if args.pretrain:
                if not args.resume and (root / "backbone.pth").exists():
                    raise CTMError(f"{root} already holds pretrained weights: choose another --out-dir")
                pretrain(cfg, run, device, args.resume)
            elif args.generate:
                generate(cfg, run, device)
            elif args.train_onm_offline:
                train_onm_offline(cfg, run, device)
            elif args.experiment:
                experiment(args.experiment, cfg, run, device)
            elif args.debug_step:
                if not debug_step(cfg, run, device):
                    raise SystemExit(1)
            else:
                MasterTrainer(cfg, run, device).loop()
    except (CTMError, ValueError, OSError) as exc:
        raise SystemExit(f"ctm_master: error: {exc}") from None


if __name__ == "__main__":
    main()
