"""
AlphaGPT: search for trading formulas with a transformer policy, a stack VM, a meme-coin backtest and
REINFORCE, on OHLCV data from Postgres (or a built-in synthetic market), in one file.

A small looped transformer writes formulas token by token in postfix (reverse Polish) form over a
vocabulary of market features (RET, LIQ, PRESSURE, ...) and operators (ADD, GATE, DECAY, ...). A grammar
mask keeps every sampled formula executable. The stack VM evaluates a whole batch of formulas at once into
factor values [formula x token x time]; the backtest turns each factor into positions and scores it after
fees, price impact and a drawdown penalty; REINFORCE pushes the policy towards high-scoring formulas.

    python alphagpt.py                                   # no DB configured: synthetic market, CPU, ~minutes
    python alphagpt.py --db postgresql://u@host/db --init-db --seed-synthetic   # create schema, fill it
    python alphagpt.py --db postgresql://u@host/db --ingest candles.csv         # COPY-load OHLCV (idempotent)
    python alphagpt.py --db postgresql://u@host/db --ingest fixed.csv --upsert  # replace stored rows it corrects
    python alphagpt.py --db postgresql://u@host/db --liquidity dollar_volume    # a market without liquidity data
    python alphagpt.py --db postgresql://u@host/db --limit-tokens 200           # train on the database
    python alphagpt.py --eval-formula out_alphagpt/best_meme_strategy.json       # score a saved formula
    python alphagpt.py --bench                           # formulas/s batched vs one by one; COPY vs fetchall

Without --db the DSN is built from DB_USER / DB_PASSWORD / DB_HOST / DB_NAME (and DB_PORT) when DB_HOST or
DB_NAME is set; otherwise the synthetic market is used. Passwords are never printed.

Layout: config, database helpers, operators, factors, the stack VM, the model (LoopedTransformer, MTPHead,
LoRD, stable rank), data (synthetic market, bar lengths, cleaning, Postgres schema / ingest / load), the
backtest, the engine (sampling, REINFORCE, the per-split report), the report table and equity plot, benchmark, CLI.

Held-out honesty: the tokens are chosen by their liquidity before the split time; features and formula values
are computed on the whole series and then split (the held-out part starts warm); a token is masked before its
first bar; instruments of different bar lengths are refused or resampled (--mixed-frequency).
"""

import argparse
import dataclasses
import io
import json
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (add_config_flags, atomic_save, atomic_write_bytes, given_flags, load_checkpoint, pick_device,
                    seed_everything, time_calls)

# -----------------------------------------------------------------------------
# config


class AlphaError(ValueError):
    """A user-facing error: printed as one line, without traceback."""


@dataclass
class AlphaConfig:
    # data
    db: str = ""                      # Postgres DSN; empty: DB_* environment variables, else the synthetic market
    db_schema: str = "public"
    limit_tokens: int = 500
    factors: str = "basic"            # "basic" (FeatureEngineer, 6) or "advanced" (AdvancedFactorEngineer, 12)
    synthetic_tokens: int = 48
    synthetic_bars: int = 1200
    test_frac: float = 0.3            # last fraction of time held out for out-of-sample scoring
    mixed_frequency: str = "refuse"   # instruments with different bar lengths: "refuse" or "resample"
    # market (backtest cost assumptions)
    trade_size_usd: float = 1000.0
    min_liquidity: float = 5000.0
    base_fee: float = 0.005
    liquidity: str = "column"         # the liquidity traded against: column, unlimited, dollar_volume or a USD number
    # search
    batch_size: int = 256
    train_steps: int = 200
    max_formula_len: int = 12
    eval_chunk: int = 256             # formulas compiled and scored together (shared sub-expressions)
    score_cache: int = 4096           # formula -> score entries kept across training steps (LRU); 0: off
    lr: float = 1e-3
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    risk_quantile: float = 0.9        # > 0: risk-seeking policy gradient on the top (1 - q) of each batch
    baseline_formulas: int = 200      # random formulas scored per split for the report's baseline
    # model
    d_model: int = 64
    n_layers: int = 2
    n_loops: int = 3
    n_heads: int = 4
    ffn_dim: int = 128
    mtp_heads: int = 3
    dropout: float = 0.0
    use_lord: bool = True
    lord_decay_rate: float = 1e-3
    lord_num_iterations: int = 5
    use_rank_monitor: bool = True
    rank_every: int = 100
    # run
    seed: int = 0
    device: str = "auto"
    threads: int = 1                  # CPU threads; 0 keeps PyTorch's default
    out_dir: str = "out_alphagpt"
    ckpt_every: int = 50

    def __post_init__(self):
        """Reject settings that would crash later or silently do nothing, with one clear message."""
        checks = [
            (min(self.limit_tokens, self.synthetic_tokens) >= 1, "--limit-tokens, --synthetic-tokens must be >= 1"),
            (self.synthetic_bars >= 3, "--synthetic-bars must be >= 3"),
            (0 < self.test_frac < 1, "--test-frac must be in (0, 1)"),
            (self.mixed_frequency in MIXED_FREQUENCY, f"--mixed-frequency must be one of {', '.join(MIXED_FREQUENCY)}"),
            (self.trade_size_usd > 0 and self.min_liquidity >= 0 and self.base_fee >= 0,
             "--trade-size-usd must be > 0, --min-liquidity and --base-fee >= 0"),
            (self.liquidity in LIQUIDITY_MODELS or liquidity_constant(self.liquidity) is not None,
             f"--liquidity must be one of {', '.join(LIQUIDITY_MODELS)} or a number of USD >= 0"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (advantages are normalised over the batch)"),
            (self.train_steps >= 0 and self.max_formula_len >= 1 and self.eval_chunk >= 1,
             "--train-steps must be >= 0, --max-formula-len and --eval-chunk >= 1"),
            (self.score_cache >= 0, "--score-cache must be >= 0"),
            (self.baseline_formulas >= 20, "--baseline-formulas must be >= 20 (its 95th percentile is reported)"),
            (self.lr > 0 and self.entropy_coef >= 0 and self.value_coef >= 0,
             "--lr must be > 0, --entropy-coef and --value-coef >= 0"),
            (0 <= self.risk_quantile < 1, "--risk-quantile must be in [0, 1)"),
            (min(self.d_model, self.n_layers, self.n_loops, self.n_heads, self.ffn_dim, self.mtp_heads) >= 1
             and self.d_model % self.n_heads == 0, "model sizes must be >= 1 and --d-model divisible by --n-heads"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.lord_decay_rate >= 0 and self.lord_num_iterations >= 1, "--lord-decay-rate must be >= 0, "
             "--lord-num-iterations >= 1"),
            (self.rank_every >= 1 and self.ckpt_every >= 1 and self.threads >= 0,
             "--rank-every and --ckpt-every must be >= 1, --threads >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise AlphaError("bad settings: " + "; ".join(problems))


FIELD_HELP = {
    "db": "Postgres DSN (postgresql://user:pass@host:port/db); empty: build it from DB_USER/DB_PASSWORD/DB_HOST/"
          "DB_NAME/DB_PORT when DB_HOST or DB_NAME is set, else use the built-in synthetic market",
    "db_schema": "Postgres schema holding the tokens and ohlcv tables",
    "limit_tokens": "load the top N tokens by mean liquidity over the training period (the held-out part is "
                    "never looked at to choose them)",
    "factors": "feature set: basic (6 features, FeatureEngineer) or advanced (12, AdvancedFactorEngineer)",
    "synthetic_tokens": "tokens in the synthetic market",
    "synthetic_bars": "bars (minutes) per token in the synthetic market",
    "test_frac": "fraction of the time axis (the end) held out to score the best formula out of sample",
    "mixed_frequency": "instruments whose bar lengths differ: refuse (one line naming them) or resample (every "
                       "instrument to the longest bar length: open first, high max, low min, close last, volumes "
                       "summed, liquidity and fdv last)",
    "trade_size_usd": "trade size in USD; price impact = trade size / liquidity, capped at 5%%",
    "min_liquidity": "no position while a token's liquidity is at or below this (USD)",
    "base_fee": "fee per side as a fraction of the trade",
    "liquidity": "the liquidity (USD) the backtest trades against, for its gate and price impact: column (the "
                 "data's liquidity column, as on a DEX), unlimited (no gate, no impact: fees only), dollar_volume "
                 "(the trailing 60-bar mean of close x volume, for markets without a liquidity column) or a number "
                 "(that many USD on every bar); the LIQ / LIQ_CHG features always read the column",
    "batch_size": "formulas sampled per training step",
    "train_steps": "policy-gradient steps",
    "max_formula_len": "maximum tokens per formula",
    "eval_chunk": "formulas compiled and scored together, sharing their common sub-expressions; memory on CPU "
                  "holds only the values still needed, on CUDA ~6 x chunk x tokens x time floats",
    "score_cache": "formula -> (score, usable) entries kept across training steps, least recently used dropped "
                   "first; a converging policy samples the same formulas again (0: no cache)",
    "lr": "AdamW learning rate",
    "entropy_coef": "weight of the policy entropy bonus",
    "baseline_formulas": "uniformly random valid formulas scored on each split for the report's baseline (its "
                         "95th percentile is what the best formula must beat)",
    "risk_quantile": "0: plain REINFORCE with advantage (r - mean) / std; q in (0, 1): risk-seeking variant, "
                     "advantage max(r - quantile_q(r), 0) / std, so only the batch's best formulas are reinforced",
    "value_coef": "weight of the value-head regression loss (the value head predicts a formula's reward)",
    "d_model": "model width",
    "n_layers": "distinct transformer layers",
    "n_loops": "times each layer is applied (weights shared across loops)",
    "n_heads": "attention heads",
    "ffn_dim": "SwiGLU hidden width",
    "mtp_heads": "vocabulary heads mixed by the MTPHead router",
    "dropout": "dropout (0 keeps sampling and the loss on the same policy)",
    "use_lord": "apply Newton-Schulz low-rank decay (LoRD) to the attention weights after every step",
    "lord_decay_rate": "LoRD step size",
    "lord_num_iterations": "Newton-Schulz iterations per LoRD step",
    "use_rank_monitor": "log the stable rank of the attention weights",
    "rank_every": "steps between stable-rank measurements",
    "seed": "random seed (synthetic market, sampling, init)",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "torch CPU threads; 0 = PyTorch's default, which honours OMP_NUM_THREADS (the search runs many "
               "small ops: one thread is fastest on a busy or small machine; more help on large data)",
    "out_dir": "where best_meme_strategy.json, training_history.json and ckpt.pt are written",
    "ckpt_every": "steps between checkpoints (also written at the end)",
}


# -----------------------------------------------------------------------------
# database connection helpers (imported lazily: psycopg2 is only needed for Postgres)


def resolve_dsn(cfg: AlphaConfig) -> str:
    """--db, else a DSN built from the seed's DB_* variables, else "" (synthetic market)."""
    if cfg.db:
        return cfg.db
    env = os.environ
    if not (env.get("DB_HOST") or env.get("DB_NAME")):
        return ""
    try:
        from psycopg2.extensions import make_dsn
    except ImportError:
        raise AlphaError("DB_HOST / DB_NAME are set but psycopg2 is not installed (pip install psycopg2-binary)") \
            from None
    parts = {"user": env.get("DB_USER"), "password": env.get("DB_PASSWORD"), "host": env.get("DB_HOST"),
             "port": env.get("DB_PORT"), "dbname": env.get("DB_NAME")}
    return make_dsn(**{k: v for k, v in parts.items() if v})


def escape_uri_password(dsn: str) -> str:
    """A URI whose password holds a raw '@' (postgresql://u:p@ss@host/db) with those escaped as %40: the last
    '@' before the host ends the password, where libpq stops at the first one and takes 'ss@host' as the host."""
    match = re.match(r"(postgres(?:ql)?://)([^/?#\s]*)@", dsn)       # greedy: up to the authority's last '@'
    return dsn if match is None else match[1] + match[2].replace("@", "%40") + dsn[match.end() - 1:]


def _parse_dsn(dsn: str) -> dict:
    """The DSN's keywords, or {} when it does not parse (or psycopg2 is missing)."""
    try:
        from psycopg2.extensions import parse_dsn
        return parse_dsn(escape_uri_password(dsn))
    except Exception:
        return {}


def mask_secret(text: str, dsn: str = "") -> str:
    """text with passwords replaced by ***: the URI spelling (user:password@ up to the last '@' before the
    host), the key=value spelling, the DSN's password verbatim and the DB_PASSWORD variable's value."""
    text = re.sub(r"(://[^:/@\s]*:)[^/?#\s]*@", r"\1***@", text)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    for password in (_parse_dsn(dsn).get("password"), os.environ.get("DB_PASSWORD")):
        if password:
            text = text.replace(password, "***")
    return text


def strip_password(dsn: str) -> str:
    """The DSN without its password (for what is written to disk); unparsable DSNs become ""."""
    parts = {k: v for k, v in _parse_dsn(dsn).items() if k != "password"}
    if not parts:
        return ""
    from psycopg2.extensions import make_dsn
    return make_dsn(**parts)


def connect(dsn: str):
    """A psycopg2 connection in UTC, or AlphaError with a one-line, password-free reason."""
    try:
        import psycopg2
    except ImportError as exc:
        raise AlphaError("psycopg2 is not installed (pip install psycopg2-binary)") from exc
    try:
        conn = psycopg2.connect(escape_uri_password(dsn), connect_timeout=10)
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split())
        raise AlphaError(f"cannot connect to Postgres at {mask_secret(dsn, dsn)}: {mask_secret(reason, dsn)}") \
            from None
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    return conn


# -----------------------------------------------------------------------------
# operators: vectorised over any leading dims, time is the last dim; every lag looks back only


VALUE_CLIP = 1e4  # factor values are clipped here after every op (nan -> 0, +-inf -> +-clip)


def ts_delay(x: torch.Tensor, d: int) -> torch.Tensor:
    """x[t - d], zeros for the first d bars (no wrap-around, unlike torch.roll)."""
    out = x.new_empty(x.shape)
    out[..., :d] = 0
    out[..., d:] = x[..., : x.shape[-1] - d]
    return out


_WINDOW_MEANS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _window_means(window: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For blocks of `window` bars: M (2 window, window) so that [block b, block b-1] @ M is, at bar j of block b,
    the mean of block b's bars 0..j and block b-1's bars j+1..: the window that ends there; and the rescaling
    window / (j + 1) of block 0's means, which have no block before them."""
    key = (window, x.dtype, x.device)
    if key not in _WINDOW_MEANS:
        i, j = torch.arange(window)[:, None], torch.arange(window)[None, :]
        M, first = torch.cat([i <= j, i > j]).double() / window, window / (j[0] + 1.0).double()
        _WINDOW_MEANS[key] = M.to(x.dtype).to(x.device), first.to(x.dtype).to(x.device)
    return _WINDOW_MEANS[key]


def rolling_moments(x: torch.Tensor, window: int) -> tuple[torch.Tensor, ...]:
    """Moments of x[t-window+1 .. t] (fewer bars at the start) about an anchor c_t: the first bar of t's block of
    `window` bars, which lies inside every window that ends in that block, at or before t.
    x: (..., T) -> anchor (..., nb, 1), x - c, mean - c and the variance (..., nb, window), in blocks: bar t is
    [..., t // window, t % window], bars past T are padding (unblock() drops them).
    The window sums are direct sums of the window's own deviations (one small matmul per block pair), not
    differences of running sums, so nothing earlier in the series swamps them; and |mean - c| is at most the
    window's range, so E[dev^2] - (mean - c)^2 loses little to cancellation, even in float32."""
    *lead, T = x.shape
    nb = -(-T // window)
    xb = (F.pad(x, (0, nb * window - T)) if T % window else x).reshape(*lead, nb, window)
    anchor = xb[..., :1]
    z = x.new_empty((2, *lead, nb, 2 * window))                 # [block b, block b-1] - c_b, and its square
    torch.sub(xb, anchor, out=z[0, ..., :window])
    z[0, ..., 0, window:] = 0
    torch.sub(xb[..., :-1, :], anchor[..., 1:, :], out=z[0, ..., 1:, window:])
    torch.mul(z[0], z[0], out=z[1])
    M, first = _window_means(window, x)
    means = torch.matmul(z, M)                                  # (2, ..., nb, W): E[dev], E[dev^2]
    means[..., 0, :] *= first
    mean, var = means
    return anchor, z[0, ..., :window], mean, var.addcmul_(mean, mean, value=-1).clamp_(min=0)


def unblock(x: torch.Tensor, T: int) -> torch.Tensor:
    """(..., nb, window) blocks (see rolling_moments) -> (..., T), contiguous."""
    flat = x.reshape(*x.shape[:-2], -1)
    return flat if flat.shape[-1] == T else flat[..., :T].contiguous()


def rolling_mean_std(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x[t-window+1 .. t] (fewer bars at the start), in x's dtype (see rolling_moments)."""
    anchor, _, mean, var = rolling_moments(x, window)
    return unblock(mean + anchor, x.shape[-1]), unblock(var.sqrt_(), x.shape[-1])


# The ops below write their results without temporaries where they can: on CPU each pass over a formula's
# (N, T) values costs about as much as the arithmetic, and ops into bool tensors are several times slower.


def _op_gate(cond, x, y):
    # lerp with a 0/1 weight returns y or x exactly (torch.lerp computes y + w (x - y) for w < 0.5, else
    # x - (1 - w) (x - y)): torch.where(cond > 0, x, y) at a fraction of its cost
    return torch.lerp(y, x, torch.gt(cond, 0, out=torch.empty_like(x)))


def _op_jump(x):
    _, dev, mean, var = rolling_moments(x, 20)
    return unblock((dev - mean).div_(var.sqrt_().add_(1e-6)).sub_(3.0).relu_(), x.shape[-1])


def _op_decay(x):
    out = torch.empty_like(x)
    out[..., :1] = x[..., :1]
    torch.add(x[..., 1:], x[..., :-1], alpha=0.8, out=out[..., 1:])     # fused multiply-adds: within an ulp
    out[..., 2:].add_(x[..., :-2], alpha=0.6)                            # of x + 0.8 x[t-1] + 0.6 x[t-2]
    return out


def _op_max3(x):
    out = x.clone()
    out[..., :2].clamp_(min=0)                                   # the zeros before the first bar
    torch.maximum(out[..., 1:], x[..., :-1], out=out[..., 1:])
    torch.maximum(out[..., 2:], x[..., :-2], out=out[..., 2:])
    return out


# (name, function, arity). GATE pops (cond, x, y) with cond deepest: cond > 0 ? x : y.
# JUMP is relu(z - 3) of x's z-score over the last 20 bars; DECAY is x + 0.8 x[t-1] + 0.6 x[t-2].
OPS_CONFIG = [
    ("ADD", torch.add, 2),
    ("SUB", torch.sub, 2),
    ("MUL", torch.mul, 2),
    ("DIV", lambda x, y: x / (y + 1e-6), 2),
    ("NEG", torch.neg, 1),
    ("ABS", torch.abs, 1),
    ("SIGN", torch.sign, 1),
    ("GATE", _op_gate, 3),
    ("JUMP", _op_jump, 1),
    ("DECAY", _op_decay, 1),
    ("DELAY1", lambda x: ts_delay(x, 1), 1),
    ("MAX3", _op_max3, 1),
]


_OP = {name: i for i, (name, _, _) in enumerate(OPS_CONFIG)}       # operator name -> index

# Given clean inputs (finite, within +-VALUE_CLIP) these return clean values, so the VM skips cleaning them,
# and these return finite values (at most 1e8 for MUL, 2e10 for JUMP's z over std + 1e-6): clipping is enough.
CLOSED_OPS = {"NEG", "ABS", "SIGN", "GATE", "DELAY1", "MAX3"}
FINITE_OPS = {"ADD", "SUB", "MUL", "DECAY", "JUMP"}


def _clip_(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(-VALUE_CLIP, VALUE_CLIP)


def _clean_(x: torch.Tensor) -> torch.Tensor:
    return _clip_(x.nan_to_num_(0.0))


def clean_values(x: torch.Tensor) -> torch.Tensor:
    return _clip_(torch.nan_to_num(x, nan=0.0))


# -----------------------------------------------------------------------------
# factors: every feature at bar t uses bars <= t only


def robust_norm(x: torch.Tensor, window: int = 60) -> torch.Tensor:
    """(x - median) / (MAD + 1e-6) over the trailing window (fewer bars at the start), clipped to +-5.
    x: (N, T); rows are processed in chunks so the (rows, T, window) windows stay ~64M values."""
    rows = max(1, (1 << 26) // (x.shape[-1] * window))
    out = []
    for xc in x.split(rows):
        padded = F.pad(xc, (window - 1, 0), value=float("nan"))
        win = padded.unfold(-1, window, 1)                              # (rows, T, window)
        med = win.nanmedian(-1).values
        mad = (win - med.unsqueeze(-1)).abs().nanmedian(-1).values
        out.append(((xc - med) / (mad + 1e-6)).clamp(-5.0, 5.0))
    return torch.cat(out)


RAW_REQUIRED = ("open", "high", "low", "close", "volume")


def complete_raw(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raw with each absent optional field (liquidity, fdv, buy_volume, sell_volume) as zeros, which is what a
    cleaned frame holds where the column was NULL; one clear error when a price or the volume is absent."""
    missing = [f for f in RAW_REQUIRED if f not in raw]
    if missing:
        raise AlphaError(f"compute_features needs (N, T) tensors {', '.join(RAW_REQUIRED)}; missing {missing}")
    zeros = torch.zeros_like(raw["close"])
    return {f: raw.get(f, zeros) for f in FIELDS}


def _log_ret(c: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([c[:, :1], c[:, :-1]], dim=1)
    return torch.log(c / prev)


class FeatureEngineer:
    """The seed's 6 features: return, liquidity score, buy/sell pressure, FOMO, deviation, log volume."""
    NAMES = ["RET", "LIQ", "PRESSURE", "FOMO", "DEV", "VOL"]
    INPUT_DIM = len(NAMES)

    @staticmethod
    def compute_features(raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """raw: (N, T) tensors -> (6, N, T).
        RET = rn(log c_t/c_{t-1}); LIQ = clamp(4 liq/fdv, 0, 1); PRESSURE = tanh(3 (c-o)/(h-l));
        FOMO = rn(clamp(dchg, +-5)) with chg = v_t/(v_{t-1}+1) - 1 and dchg its change;
        DEV = rn((c - MA20)/MA20); VOL = rn(log1p v).  rn = causal robust_norm. Without liquidity / fdv LIQ is 0."""
        raw = complete_raw(raw)
        o, h, l, c, v = raw["open"], raw["high"], raw["low"], raw["close"], raw["volume"]
        ret = robust_norm(_log_ret(c))
        liq = torch.where(raw["fdv"] > 0, 4 * raw["liquidity"] / raw["fdv"].clamp(min=1e-9),
                          torch.zeros_like(c)).clamp(0, 1)
        pressure = torch.tanh(3 * (c - o) / (h - l + 1e-9))
        chg = v / (ts_delay(v, 1) + 1) - 1
        fomo = robust_norm((chg - ts_delay(chg, 1)).clamp(-5, 5))
        ma20, _ = rolling_mean_std(c, 20)
        dev = robust_norm((c - ma20) / ma20)
        vol = robust_norm(torch.log1p(v))
        return torch.stack([ret, liq, pressure, fomo, dev, vol])


class AdvancedFactorEngineer:
    """12 features: the basic 6 plus 10-bar momentum, 20-bar realised volatility, order-flow imbalance,
    liquidity change, bar range and close position within the bar."""
    NAMES = FeatureEngineer.NAMES + ["MOM10", "RVOL20", "FLOW", "LIQ_CHG", "RANGE", "CLOSE_POS"]
    INPUT_DIM = len(NAMES)

    @staticmethod
    def compute_features(raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """raw: (N, T) tensors -> (12, N, T).  MOM10 = rn(log c_t/c_{t-10}); RVOL20 = rn(std of log returns,
        20 bars); FLOW = (buy - sell)/(buy + sell), and on bars without a buy/sell split (columns absent or both
        0) the bulk-volume estimate 2 Phi(r / sigma) - 1 of the log return r over its 20-bar std sigma;
        LIQ_CHG = rn(log liq_t/liq_{t-1}) (0 without liquidity); RANGE = rn(log h/l);
        CLOSE_POS = 2 (c - l)/(h - l) - 1."""
        raw = complete_raw(raw)
        base = FeatureEngineer.compute_features(raw)
        h, l, c = raw["high"], raw["low"], raw["close"]
        c10 = torch.cat([c[:, :1].expand(-1, 10), c], dim=1)[:, : c.shape[1]]
        mom = robust_norm(torch.log(c / c10))
        ret = _log_ret(c)
        _, rv = rolling_mean_std(ret, 20)
        buy, sell = raw["buy_volume"], raw["sell_volume"]
        bulk = torch.erf(ret / (rv * math.sqrt(2) + 1e-12))             # 2 Phi(r / sigma) - 1
        flow = torch.where(buy + sell > 0, (buy - sell) / (buy + sell + 1e-9), bulk)
        liq = raw["liquidity"].clamp(min=1.0)
        liq_chg = robust_norm(_log_ret(liq))
        rng = robust_norm(torch.log(h / l.clamp(min=1e-12)))
        close_pos = 2 * (c - l) / (h - l + 1e-9) - 1
        extra = torch.stack([mom, robust_norm(rv), flow, liq_chg, rng, close_pos])
        return torch.cat([base, torch.nan_to_num(extra)])


FACTOR_SETS = {"basic": FeatureEngineer, "advanced": AdvancedFactorEngineer}


# -----------------------------------------------------------------------------
# formula vocabulary, grammar and the stack VM


class FormulaVocab:
    """Token ids: features 0..K-1, operators K..K+len(OPS)-1, END (stops a formula), then BOS (input only,
    never sampled: the start token is not the id of a feature)."""

    def __init__(self, feature_names: list[str]):
        self.features = list(feature_names)
        self.n_feat = len(self.features)
        self.names = self.features + [name for name, _, _ in OPS_CONFIG] + ["END"]
        self.end = len(self.names) - 1
        self.bos = self.end + 1
        self.size_out, self.size_in = self.end + 1, self.bos + 1
        self.arity = torch.tensor([0] * self.n_feat + [a for _, _, a in OPS_CONFIG] + [0])
        self.delta = torch.tensor([1] * self.n_feat + [1 - a for _, _, a in OPS_CONFIG] + [0])
        self.max_arity = max(a for _, _, a in OPS_CONFIG)

    def legal_mask(self, depth: torch.Tensor, pos: int, done: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, V) tokens that keep a formula completable: an op needs `arity` operands, and after the token
        the remaining max_len - pos - 1 slots must suffice to reduce the stack to one value. END needs depth 1;
        finished formulas may only repeat END."""
        left = max_len - pos - 1
        arity, delta = self.arity.to(depth.device), self.delta.to(depth.device)
        new_depth = depth[:, None] + delta[None, :]                           # (B, V)
        need = torch.div(new_depth - 1 + self.max_arity - 2, self.max_arity - 1, rounding_mode="floor")
        ok = (depth[:, None] >= arity[None, :]) & (new_depth >= 1) & (need <= left)
        ok[:, self.end] = depth == 1
        ok[done] = False
        ok[done, self.end] = True
        return ok

    def grammar_masks(self, tokens: torch.Tensor, max_len: int) -> torch.Tensor:
        """Legal-token masks for every position of sampled formulas.  tokens: (B, L) -> (B, L, V)"""
        B, L = tokens.shape
        depth = torch.zeros(B, dtype=torch.long, device=tokens.device)
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        masks = []
        delta = self.delta.to(tokens.device)
        for p in range(L):
            masks.append(self.legal_mask(depth, p, done, max_len))
            depth = depth + torch.where(done, 0, delta[tokens[:, p]])
            done = done | (tokens[:, p] == self.end)
        return torch.stack(masks, dim=1)

    def encode(self, names: list[str]) -> list[int]:
        unknown = [n for n in names if n not in self.names or n == "END"]
        if unknown:
            raise AlphaError(f"formula uses {unknown}, not in this vocabulary ({', '.join(self.names[:-1])})")
        return [self.names.index(n) for n in names]

    def decode(self, ids: list[int]) -> list[str]:
        """Token names up to the first END (the VM stops there too)."""
        ids = list(ids)
        return [self.names[i] for i in (ids[: ids.index(self.end)] if self.end in ids else ids)]

    def infix(self, ids: list[int]) -> str:
        """Readable infix text of a postfix formula, e.g. [RET, VOL, MUL, ABS] -> abs((RET * VOL))."""
        symbols = {"ADD": "+", "SUB": "-", "MUL": "*", "DIV": "/"}
        stack: list[str] = []
        for name in self.decode(ids):
            if name in self.features:
                stack.append(name)
                continue
            arity = dict((n, a) for n, _, a in OPS_CONFIG)[name]
            if len(stack) < arity:
                return "<invalid>"
            args = stack[len(stack) - arity:]
            del stack[len(stack) - arity:]
            stack.append(f"({args[0]} {symbols[name]} {args[1]})" if name in symbols
                         else f"{name.lower()}({', '.join(args)})")
        return stack[0] if len(stack) == 1 else "<invalid>"


class StackVM:
    """Executes postfix formulas: a feature token pushes its (N, T) slice, an operator pops `arity` values and
    pushes its result (nan -> 0, clipped to +-VALUE_CLIP). Unbalanced stacks and illegal tokens give None."""

    def __init__(self, vocab: FormulaVocab | None = None):
        """vocab None: the seed's VM over the basic features, feature tokens 0..FeatureEngineer.INPUT_DIM - 1,
        then one token per operator in OPS_CONFIG order."""
        self.vocab = vocab = FormulaVocab(FeatureEngineer.NAMES) if vocab is None else vocab
        self.feat_offset = vocab.n_feat
        # (fn, arity, in-place cleaning of its fresh result or None)
        self.ops = [(fn, arity, None if name in CLOSED_OPS else _clip_ if name in FINITE_OPS else _clean_)
                    for name, fn, arity in OPS_CONFIG]

    def execute(self, formula_tokens: list[int], feat_tensor: torch.Tensor) -> torch.Tensor | None:
        """One formula.  feat_tensor: (K, N, T) -> (N, T) or None."""
        stack: list[torch.Tensor] = []
        for tok in formula_tokens:
            tok = int(tok)
            if tok == self.vocab.end:
                break
            if 0 <= tok < self.feat_offset:
                stack.append(clean_values(feat_tensor[tok]))
            elif self.feat_offset <= tok < self.vocab.end:
                fn, arity, clean = self.ops[tok - self.feat_offset]
                if len(stack) < arity:
                    return None
                args = stack[len(stack) - arity:]
                del stack[len(stack) - arity:]
                out = fn(*args)
                stack.append(out if clean is None else clean(out))
            else:
                return None
        return stack[0] if len(stack) == 1 else None

    def compile(self, formulas: list[list[int]]) -> tuple[list[tuple[int, ...]], list[int], list[int]]:
        """Run the stack symbolically over a batch, sharing identical sub-expressions. Node ids 0..K-1 are the
        features; node K + i is nodes[i] = (op index, child ids...). Returns (nodes, their heights, the root
        node of each formula, -1 where the formula is invalid).
        Identities that give bit-for-bit the same values (up to the sign of a zero) are applied as nodes are made,
        so that more of them are shared: sign(sign(a)) = sign(a), abs(abs(a)) = abs(neg(a)) = abs(a),
        neg(neg(a)) = a, gate(c, x, x) = x, and ADD, MUL with their operands in one order."""
        K, end = self.feat_offset, self.vocab.end
        node_ids: dict[tuple[int, ...], int] = {}
        nodes: list[tuple[int, ...]] = []
        heights: list[int] = []

        def node(op: int, *args: int) -> int:
            first = nodes[args[0] - K] if args[0] >= K else (None,)
            if op in (_OP["SIGN"], _OP["ABS"]) and first[0] == op:
                return args[0]
            if op == _OP["NEG"] and first[0] == op:
                return first[1]
            if op == _OP["ABS"] and first[0] == _OP["NEG"]:
                return node(op, first[1])
            if op == _OP["GATE"] and args[1] == args[2]:
                return args[1]
            key = (op, *(sorted(args) if op in (_OP["ADD"], _OP["MUL"]) else args))
            if key not in node_ids:
                node_ids[key] = K + len(nodes)
                nodes.append(key)
                heights.append(1 + max(heights[c - K] if c >= K else 0 for c in key[1:]))
            return node_ids[key]

        roots = []
        for formula in formulas:
            stack: list[int] = []
            ok = True
            for tok in formula:
                if tok == end:
                    break
                if 0 <= tok < K:
                    stack.append(tok)
                    continue
                if not K <= tok < end or len(stack) < self.ops[tok - K][1]:
                    ok = False
                    break
                arity = self.ops[tok - K][1]
                args = stack[len(stack) - arity:]
                del stack[len(stack) - arity:]
                stack.append(node(tok - K, *args))
            roots.append(stack[0] if ok and len(stack) == 1 else -1)
        return nodes, heights, roots

    def evaluate_unique(self, formulas: torch.Tensor, feat_tensor: torch.Tensor):
        """Batched execution: compile the batch, then evaluate its distinct nodes level by level, one call per
        (height, operator) group, so the work is one call per group instead of one per formula and token.
        formulas: (F, L) -> values of the distinct roots (U, N, T), index into them (F,) (-1: invalid)."""
        K = self.feat_offset
        nodes, heights, roots = self.compile(formulas.tolist())
        dev = feat_tensor.device
        order = sorted(range(len(nodes)), key=lambda i: (heights[i], nodes[i][0]))    # each group contiguous
        slot = torch.empty(K + len(nodes), dtype=torch.long)
        slot[:K] = torch.arange(K)
        slot[torch.tensor(order, dtype=torch.long) + K] = torch.arange(K, K + len(nodes))
        vals = feat_tensor.new_empty((K + len(nodes),) + feat_tensor.shape[1:])      # (K + nodes, N, T)
        vals[:K] = clean_values(feat_tensor)
        start = 0
        while start < len(order):
            h, op = heights[order[start]], nodes[order[start]][0]
            stop = start
            while stop < len(order) and (heights[order[stop]], nodes[order[stop]][0]) == (h, op):
                stop += 1
            fn, arity, clean = self.ops[op]
            children = slot[torch.tensor([nodes[i][1:] for i in order[start:stop]])]          # (g, arity)
            out = vals[K + start: K + stop]                                                   # (g, N, T)
            out.copy_(fn(*(self._rows(vals, children[:, j]) for j in range(arity))))
            if clean is not None:
                clean(out)
            start = stop
        root_t = torch.tensor(roots, dtype=torch.long)
        unique_roots, index = torch.unique(root_t.clamp(min=0), return_inverse=True)
        index = torch.where(root_t >= 0, index, -1).to(dev)
        return self._rows(vals, slot[unique_roots]), index

    def evaluate_memo(self, formulas: torch.Tensor | list[list[int]], feat_tensor: torch.Tensor):
        """Memoised execution (stream_memo), same result as evaluate_unique: the distinct roots' values stacked."""
        roots, stream = self.stream_memo(formulas, feat_tensor)
        vals = dict(stream)
        unique_roots = sorted(vals)
        pos = {r: j for j, r in enumerate(unique_roots)}
        index = torch.tensor([pos[r] if r >= 0 else -1 for r in roots], dtype=torch.long, device=feat_tensor.device)
        if not unique_roots:
            return feat_tensor.new_empty((0,) + feat_tensor.shape[1:]), index
        return torch.stack([vals[r] for r in unique_roots]), index

    def stream_memo(self, formulas: torch.Tensor | list[list[int]], feat_tensor: torch.Tensor):
        """Memoised execution: compile the batch, then compute each distinct node that a valid root needs once, in
        creation order (children are created before their parents), with direct calls on whole (N, T) tensors: no
        index gathers, no group copies. Features are cleaned once, when first read; closed ops (CLOSED_OPS) are
        not cleaned at all. Equal to execute() formula by formula (the same calls on the same values).
        Returns (the root node of each formula, -1 where invalid; an iterator of (root, value (N, T)) over the
        distinct valid roots, each as soon as it is computed). A value is dropped after its last use, so memory
        holds only the values later nodes still need, however large the batch."""
        K = self.feat_offset
        nodes, _, roots = self.compile(formulas.tolist() if isinstance(formulas, torch.Tensor) else formulas)
        is_root = [False] * (K + len(nodes))
        for r in roots:
            if r >= 0:
                is_root[r] = True
        needed = list(is_root)
        for i in range(len(nodes) - 1, -1, -1):                  # parents come after their children
            if needed[K + i]:
                for c in nodes[i][1:]:
                    needed[c] = True
        last_use = [-1] * len(needed)
        for i, node in enumerate(nodes):
            if needed[K + i]:
                for c in node[1:]:
                    last_use[c] = K + i
        return roots, self._walk(nodes, needed, is_root, last_use, feat_tensor)

    def _walk(self, nodes, needed, is_root, last_use, feat_tensor):
        """stream_memo's generator: the needed nodes in creation order, yielding each root once."""
        K = self.feat_offset
        vals: dict[int, torch.Tensor] = {}
        for c in range(K):
            if is_root[c]:                                        # a formula that is one feature
                value = clean_values(feat_tensor[c])
                if last_use[c] >= 0:
                    vals[c] = value
                yield c, value
        for i, node in enumerate(nodes):
            me = K + i
            if not needed[me]:
                continue
            args = []
            for c in node[1:]:
                if c < K and c not in vals:
                    vals[c] = clean_values(feat_tensor[c])
                args.append(vals[c])                              # a freed value here is a bug: KeyError
            fn, _, clean = self.ops[node[0]]
            out = fn(*args)                                       # every unclosed op returns a fresh tensor
            vals[me] = out if clean is None else clean(out)
            for c in set(node[1:]):
                if last_use[c] == me:
                    del vals[c]
            if is_root[me]:
                yield me, vals[me] if last_use[me] > me else vals.pop(me)

    def evaluate(self, formulas: torch.Tensor | list[list[int]], feat_tensor: torch.Tensor):
        """The fastest batched path for the device (values of the distinct roots, index; see evaluate_unique).
        CPU: evaluate_memo. Measured on 2 CPU cores (issue 16): the level-by-level groups are 0.93x of a plain
        one-by-one loop there (their gathers and group copies cost more than the calls they save), the memoised
        walk 2.6x. CUDA: evaluate_unique, kept because there the cost is one kernel launch per call and the
        groups make one launch per (height, operator) instead of one per node; a GPU was not measured here."""
        if feat_tensor.is_cuda:
            if not isinstance(formulas, torch.Tensor):
                formulas = torch.tensor(formulas, dtype=torch.long)
            return self.evaluate_unique(formulas, feat_tensor)
        return self.evaluate_memo(formulas, feat_tensor)

    @staticmethod
    def _rows(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """vals[idx] for a CPU index: a view when the rows are consecutive (no copy), else a gather."""
        first = int(idx[0])
        if torch.equal(idx, torch.arange(first, first + len(idx))):
            return vals[first: first + len(idx)]
        return vals.index_select(0, idx.to(vals.device))

    def execute_batch(self, formulas: torch.Tensor, feat_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All formulas at once (see evaluate).  formulas: (F, L) -> values (F, N, T) (zeros where
        invalid), valid (F,) bool; equal to execute() formula by formula."""
        unique_values, index = self.evaluate(formulas, feat_tensor)
        if len(unique_values) == 0:
            return feat_tensor.new_zeros((len(index),) + feat_tensor.shape[1:]), index >= 0
        valid = index >= 0
        values = torch.where(valid[:, None, None], unique_values[index.clamp(min=0)], 0.0)
        return values, valid


# -----------------------------------------------------------------------------
# the model: AlphaGPT = embeddings + LoopedTransformer + MTPHead


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class QKNormAttention(nn.Module):
    """Causal self-attention with RMSNorm applied to queries and keys per head (QK-norm)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.dropout = dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))


class LoopedBlock(nn.Module):
    """Pre-norm block: x + attn(norm x), then x + ffn(norm x)."""

    def __init__(self, cfg: AlphaConfig):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = QKNormAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim, cfg.dropout)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class LoopedTransformer(nn.Module):
    """n_layers distinct blocks, each applied n_loops times in a row (weights shared across loops)."""

    def __init__(self, cfg: AlphaConfig):
        super().__init__()
        self.layers = nn.ModuleList(LoopedBlock(cfg) for _ in range(cfg.n_layers))
        self.n_loops = cfg.n_loops

    def forward(self, x):
        for layer in self.layers:
            for _ in range(self.n_loops):
                x = layer(x)
        return x


class MTPHead(nn.Module):
    """mtp_heads vocabulary heads mixed by a softmax router, p(tok) = sum_h router_h * softmax(head_h)[tok],
    each head masked to the legal tokens; plus a value head predicting the formula's reward."""

    def __init__(self, d_model: int, vocab_size: int, n_heads: int):
        super().__init__()
        self.heads = nn.Linear(d_model, n_heads * vocab_size)
        self.router = nn.Linear(d_model, n_heads)
        self.value = nn.Linear(d_model, 1)
        self.n_heads, self.vocab_size = n_heads, vocab_size

    def forward(self, h, legal):
        """h: (B, T, C), legal: (B, T, V) bool -> log-probs (B, T, V) (~-1e9 where illegal), values (B, T)."""
        logits = self.heads(h).unflatten(-1, (self.n_heads, self.vocab_size))        # (B, T, H, V)
        logits = logits.masked_fill(~legal.unsqueeze(-2), -1e9)  # finite: logsumexp over heads stays differentiable
        mix = F.log_softmax(self.router(h), dim=-1).unsqueeze(-1)                    # (B, T, H, 1)
        logp = torch.logsumexp(mix + F.log_softmax(logits, dim=-1), dim=-2)        # (B, T, V)
        return logp, self.value(h).squeeze(-1)


class AlphaGPT(nn.Module):
    def __init__(self, cfg: AlphaConfig, vocab: FormulaVocab):
        super().__init__()
        self.vocab = vocab
        self.token_emb = nn.Embedding(vocab.size_in, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_formula_len + 1, cfg.d_model)
        self.blocks = LoopedTransformer(cfg)
        self.norm = RMSNorm(cfg.d_model)
        self.head = MTPHead(cfg.d_model, vocab.size_out, cfg.mtp_heads)

    def forward(self, idx, legal):
        """idx: (B, T) input ids (BOS first), legal: (B, T, V) -> log-probs (B, T, V), values (B, T)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.token_emb(idx) + self.pos_emb(pos)                                  # (B, T, C)
        return self.head(self.norm(self.blocks(x)), legal)


def newton_schulz_orth(W: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate polar factor U V^T of W: Y = W / ||W||_F, then Y <- 0.5 Y (3I - Y^T Y) `steps` times."""
    Y = W / (W.norm() + 1e-7)
    eye = torch.eye(W.shape[1], device=W.device, dtype=W.dtype)
    for _ in range(steps):
        Y = 0.5 * Y @ (3 * eye - Y.T @ Y)
    return Y


class NewtonSchulzLowRankDecay:
    """LoRD: after each optimiser step, W <- W - rate * NS(W) for the targeted 2-D weights. NS(W) ~ U V^T has
    every singular value near 1, so the step shrinks small singular directions relatively the most."""

    def __init__(self, named_parameters, decay_rate: float = 1e-3, num_iterations: int = 5,
                 target_keywords: tuple[str, ...] = ("attn.qkv", "attn.proj")):
        self.params = [p for name, p in named_parameters
                       if p.ndim == 2 and any(name.endswith(k + ".weight") for k in target_keywords)]
        if not self.params:
            raise AlphaError(f"LoRD found no 2-D weights named *{target_keywords}.weight")
        self.decay_rate, self.num_iterations = decay_rate, num_iterations

    @torch.no_grad()
    def step(self):
        for W in self.params:
            W.sub_(self.decay_rate * newton_schulz_orth(W.float(), self.num_iterations).to(W.dtype))


class StableRankMonitor:
    """Mean stable rank ||W||_F^2 / ||W||_2^2 of the targeted weights (the same ones LoRD decays)."""

    def __init__(self, named_parameters, target_keywords: tuple[str, ...] = ("attn.qkv", "attn.proj")):
        self.params = [p for name, p in named_parameters
                       if p.ndim == 2 and any(name.endswith(k + ".weight") for k in target_keywords)]

    @torch.no_grad()
    def compute(self) -> float:
        ranks = [(W.float().norm() ** 2 / torch.linalg.matrix_norm(W.float(), ord=2) ** 2).item()
                 for W in self.params]
        return float(np.mean(ranks)) if ranks else float("nan")


# -----------------------------------------------------------------------------
# data: the market frame, the synthetic market, cleaning


FIELDS = ("open", "high", "low", "close", "volume", "liquidity", "fdv", "buy_volume", "sell_volume")
PRICE_FIELDS = ("open", "high", "low", "close")
FLOW_FIELDS = ("volume", "buy_volume", "sell_volume")   # a missing bar traded nothing: 0, not forward-filled


@dataclass
class MarketFrame:
    addresses: list[str]
    symbols: list[str]
    times: np.ndarray       # (T,) int64 unix seconds, increasing
    values: np.ndarray      # (len(FIELDS), N, T) float32
    first_bar: np.ndarray | None = None   # (N,) set by cleaning: the first bar whose prices all come from the
                                          # past; before it a token is untradable and its features are 0
    split_time: int | None = None         # the first held-out time, when the loader chose the tokens before it

    def field(self, name: str) -> np.ndarray:
        return self.values[FIELDS.index(name)]


def split_time_of(times: np.ndarray, test_frac: float) -> int:
    """The first held-out time: the last test_frac of the time axis is held out."""
    return int(times[min(int(round(len(times) * (1 - test_frac))), len(times) - 1)])


def bar_seconds(times: np.ndarray) -> int | None:
    """The bar length of an increasing time axis (its median step); None with fewer than 2 bars."""
    return int(np.median(np.diff(times))) if len(times) > 1 else None


def format_bar(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def synthetic_market(n_tokens: int, n_bars: int, seed: int, signal_strength: float = 1.5) -> MarketFrame:
    """A reproducible meme-coin market of 1-minute bars: Student-t (df 3) returns, per-token volatility,
    pumps (a few bars of strong rises on heavy volume) followed by dumps, liquidity that follows price with
    its own random walk (a few tokens dip below the default 5000 USD gate), and a weak planted signal:
    the next bar's expected return is signal_strength x volatility x the bar's buy/sell pressure
    tanh(3 (c - o) / (h - l)) (the PRESSURE feature), so strong bars are slightly more likely to continue."""
    rng = np.random.default_rng(seed)
    N, T = n_tokens, n_bars
    sigma = rng.lognormal(math.log(0.012), 0.35, N)
    liq_level = rng.lognormal(math.log(1.5e5), 1.2, N)
    supply = rng.lognormal(math.log(1e9), 0.5, N)
    shocks = rng.standard_t(3, (T, N)) / math.sqrt(3.0)            # unit variance, heavy tails
    pump_left = np.zeros(N, dtype=int)
    dump_left = np.zeros(N, dtype=int)
    log_liq_walk = np.zeros(N)
    pressure = np.zeros(N)
    o, h, l, c, v, liq = (np.empty((T, N)) for _ in range(6))
    price = rng.lognormal(math.log(1e-3), 1.0, N)
    for t in range(T):
        start = (pump_left == 0) & (dump_left == 0) & (rng.random(N) < 1 / 1500)
        pump_left[start] = rng.integers(3, 8, start.sum())
        pumping, dumping = pump_left > 0, dump_left > 0
        r = sigma * (shocks[t] + signal_strength * pressure) + pumping * 0.04 - dumping * 0.12
        dump_left = np.where(dumping, dump_left - 1, np.where(pump_left == 1, 3, 0))
        pump_left = np.maximum(pump_left - 1, 0)
        o[t] = price
        price = price * np.exp(r)
        c[t] = price
        h[t] = np.maximum(o[t], c[t]) * np.exp(np.abs(rng.normal(0, 0.5, N)) * sigma)
        l[t] = np.minimum(o[t], c[t]) * np.exp(-np.abs(rng.normal(0, 0.5, N)) * sigma)
        pressure = np.tanh(3 * (c[t] - o[t]) / (h[t] - l[t]))
        v[t] = liq_level * 0.02 * rng.lognormal(0, 0.6, N) * (1 + 3 * np.abs(r) / sigma + 10 * pumping)
        log_liq_walk = 0.995 * log_liq_walk + rng.normal(0, 0.03, N)
        liq[t] = liq_level * np.exp(log_liq_walk) * np.sqrt(c[t] / c[0]) * np.where(dumping, 0.7, 1.0)
    buy_frac = 1 / (1 + np.exp(-(np.log(c / o) / sigma + rng.normal(0, 1, (T, N)))))
    fdv = c * supply
    values = np.stack([o, h, l, c, v, liq, fdv, v * buy_frac, v * (1 - buy_frac)]).transpose(0, 2, 1)
    alphabet = np.array(list("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"))
    addresses = ["".join(rng.choice(alphabet, 44)) for _ in range(N)]
    order = np.argsort(-liq.mean(axis=0), kind="stable")               # the loader's order: liquidity desc
    times = 1704067200 + 60 * np.arange(T, dtype=np.int64)             # 2024-01-01 00:00 UTC, 1-minute bars
    return MarketFrame([addresses[i] for i in order], [f"SYN{i:03d}" for i in order], times,
                       values[:, order].astype(np.float32))


def pivot_rows(token_idx: np.ndarray, times: np.ndarray, rows: np.ndarray, addresses: list[str],
               symbols: list[str]) -> tuple[MarketFrame, int]:
    """Long rows (token index, unix time, FIELDS...) -> a [field x token x time] frame, NaN where a token has
    no bar. Duplicate (token, time) rows keep the last one; returns (frame, duplicates dropped)."""
    uniq_times, t_idx = np.unique(times, return_inverse=True)
    values = np.full((len(FIELDS), len(addresses), len(uniq_times)), np.nan, dtype=np.float32)
    values[:, token_idx, t_idx] = rows.T.astype(np.float32)          # later rows overwrite earlier ones
    n_dupes = len(token_idx) - len(np.unique(token_idx.astype(np.int64) * len(uniq_times) + t_idx))
    return MarketFrame(list(addresses), list(symbols), uniq_times.astype(np.int64), values), n_dupes


def _ffill(x: np.ndarray) -> np.ndarray:
    """Forward-fill NaN along the last axis (vectorised)."""
    idx = np.where(np.isnan(x), 0, np.arange(x.shape[-1]))
    np.maximum.accumulate(idx, axis=-1, out=idx)
    return np.take_along_axis(x, idx, axis=-1)


MIXED_FREQUENCY = ("refuse", "resample")
# how resampling combines the bars of a bucket, per field
RESAMPLE_RULES = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum",
                  "liquidity": "last", "fdv": "last", "buy_volume": "sum", "sell_volume": "sum"}


def resample(frame: MarketFrame, seconds: int) -> MarketFrame:
    """Bars of `seconds` (labelled by their start, on multiples of it), by RESAMPLE_RULES; NaN where a token has
    no value in a bucket. The frame's times must be increasing."""
    buckets = frame.times // seconds * seconds
    times, starts = np.unique(buckets, return_index=True)
    ends = np.append(starts[1:], len(buckets)) - 1
    values = np.empty(frame.values.shape[:2] + (len(times),), dtype=np.float32)
    for i, name in enumerate(FIELDS):
        x = frame.values[i]
        rule = RESAMPLE_RULES[name]
        if rule == "max":
            v = np.fmax.reduceat(x, starts, axis=-1)                  # fmax / fmin skip NaN
        elif rule == "min":
            v = np.fmin.reduceat(x, starts, axis=-1)
        elif rule == "sum":
            v = np.add.reduceat(np.nan_to_num(x), starts, axis=-1)
        elif rule == "last":
            v = _ffill(x)[:, ends]
        else:
            v = _ffill(x[:, ::-1])[:, ::-1][:, starts]
        seen = np.add.reduceat(~np.isnan(x), starts, axis=-1) > 0    # the value came from inside the bucket
        values[i] = np.where(seen, v, np.nan)
    return dataclasses.replace(frame, times=times.astype(np.int64), values=values)


def align_frequencies(frame: MarketFrame, mode: str) -> tuple[MarketFrame, str]:
    """Tokens on one time axis must share a bar length: a 5-minute token on a 1-minute axis would be forward-
    filled flat on 4 bars in 5. mode "refuse": one AlphaError naming them; "resample": every token to the longest
    bar length. Returns (frame, a note for the report, "" when nothing was done)."""
    present = ~np.isnan(frame.values).all(axis=0)                     # (N, T)
    lengths = [bar_seconds(frame.times[row]) for row in present]
    groups: dict[int, list[str]] = {}
    for i, length in enumerate(lengths):
        if length is not None:
            groups.setdefault(length, []).append(frame.symbols[i] or frame.addresses[i])
    if len(groups) <= 1:
        return frame, ""
    listing = "; ".join(f"{format_bar(s)} bars: {len(names)} tokens ({', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''})" for s, names in sorted(groups.items()))
    target = max(groups)
    if mode == "refuse":
        raise AlphaError(f"tokens with different bar lengths on one time axis ({listing}): load one frequency, or "
                         f"pass --mixed-frequency resample to resample all to {format_bar(target)} bars")
    return resample(frame, target), f"resampled to {format_bar(target)} bars ({listing}) | "


def clean_market(frame: MarketFrame, n_dupes: int = 0) -> tuple[MarketFrame, str]:
    """Make a frame safe for the factors and say what was fixed, in one report line:
    - non-finite values, non-positive prices and negative volumes / liquidity / FDV become missing (NaN/Inf
      are counted for prices only: the optional fields may legitimately be NULL);
    - missing prices, liquidity and FDV are forward-filled (the seed's rule); before a token's first bar (the
      first from which every price can be filled from the past: first_bar) its prices take the first known
      value only to keep the arithmetic finite: build_market_data zeroes its features and liquidity there;
    - missing volumes are 0 (no trades in a gap); tokens without any price are dropped;
    - zero liquidity is kept and blocks trading."""
    vals = frame.values.astype(np.float32, copy=True)
    present = ~np.isnan(vals).all(axis=0)                     # (N, T): the token has a row at this time
    nonfinite = ~np.isfinite(vals)
    price_rows = [FIELDS.index(f) for f in PRICE_FIELDS]
    n_nonfinite = int((nonfinite[price_rows] & present).sum())    # optional fields may be NULL: not counted
    vals[nonfinite] = np.nan
    prices = vals[price_rows]
    bad_price = prices <= 0
    n_bad_price = int(bad_price.sum())
    prices[bad_price] = np.nan
    vals[price_rows] = prices
    other_rows = [i for i, f in enumerate(FIELDS) if f not in PRICE_FIELDS]
    negative = vals[other_rows] < 0                           # volumes, liquidity, FDV: missing, not negative
    n_negative = int(negative.sum())
    vals[other_rows] = np.where(negative, np.nan, vals[other_rows])
    has_price = np.isfinite(vals[FIELDS.index("close")]).any(axis=1)
    known = np.isfinite(vals[price_rows])                     # (4, N, T)
    first_bar = np.where(known.any(-1), known.argmax(-1), len(frame.times)).max(0)[has_price]
    n_dropped = int((~has_price).sum())
    vals = vals[:, has_price]
    n_gaps = int((~present[has_price]).sum())
    for i, name in enumerate(FIELDS):
        if name in FLOW_FIELDS:
            vals[i] = np.nan_to_num(vals[i], nan=0.0)
            continue
        vals[i] = _ffill(vals[i])
        if name in PRICE_FIELDS:          # leading gap: the first known value, read backwards
            vals[i] = _ffill(vals[i][:, ::-1])[:, ::-1]
        vals[i] = np.nan_to_num(vals[i], nan=0.0)
    n_bad_liq = int((vals[FIELDS.index("liquidity")] <= 0).sum())
    vals[FIELDS.index("high")] = np.maximum(vals[FIELDS.index("high")], vals[[0, 3]].max(axis=0))
    vals[FIELDS.index("low")] = np.minimum(vals[FIELDS.index("low")], vals[[0, 3]].min(axis=0))
    keep = np.flatnonzero(has_price)
    cleaned = MarketFrame([frame.addresses[i] for i in keep], [frame.symbols[i] for i in keep], frame.times, vals,
                          first_bar, frame.split_time)
    report = (f"data: {len(keep)} tokens x {len(frame.times)} bars | fixed: {n_nonfinite} NaN/Inf prices, "
              f"{n_bad_price} non-positive prices, {n_negative} negative volume/liquidity/FDV values, "
              f"{n_gaps} missing bars filled, {n_bad_liq} bars with zero/missing liquidity (no trading there with "
              f"--liquidity column), {n_dupes} duplicate (token, time) rows dropped, "
              f"{n_dropped} tokens without prices dropped, {int((first_bar > 0).sum())} tokens untradable before "
              "their first bar")
    if len(keep) == 0 or len(frame.times) < 3:
        raise AlphaError(f"no usable market data ({report})")
    return cleaned, report


LIQUIDITY_MODELS = ("column", "unlimited", "dollar_volume")


def liquidity_constant(spec: str) -> float | None:
    """The USD value of --liquidity NUMBER; None for a model name or a bad value."""
    try:
        value = float(spec)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def model_liquidity(raw: dict[str, torch.Tensor], spec: str) -> torch.Tensor:
    """(N, T) liquidity the backtest trades against, by --liquidity (see FIELD_HELP); causal like the features."""
    if spec == "column":
        return raw["liquidity"]
    if spec == "dollar_volume":
        return rolling_mean_std(raw["close"] * raw["volume"], 60)[0]
    return torch.full_like(raw["close"], math.inf if spec == "unlimited" else liquidity_constant(spec))


@dataclass
class MarketData:
    """What the search needs, on the device: features, liquidity and the target return of the scored bars,
    with the features of `start` bars of history before them (formula values are computed over the history,
    then sliced, so lags and rolling windows start warm, as they would live)."""
    feat: torch.Tensor        # (K, N, start + T)
    liquidity: torch.Tensor   # (N, T)
    target: torch.Tensor      # (N, T) log(open[t+2] / open[t+1]); the last two bars 0
    feature_names: list[str]
    symbols: list[str]
    start: int = 0

    def split(self, start: int, end: int) -> "MarketData":
        """Scored bars [start, end), with the history before them. The target's last two bars are zeroed: they
        would look past the slice."""
        target = self.target[:, start:end].clone()
        target[:, -2:] = 0
        # contiguous copies: every op on a strided slice of the full series runs markedly slower
        return MarketData(self.feat[:, :, :end].contiguous(), self.liquidity[:, start:end].contiguous(),
                          target, self.feature_names, self.symbols, start)

    def without(self, names: list[str]) -> "MarketData":
        """The same data without the features named."""
        keep = [i for i, name in enumerate(self.feature_names) if name not in names]
        if len(keep) == len(self.feature_names):
            return self
        return dataclasses.replace(self, feat=self.feat[keep], feature_names=[self.feature_names[i] for i in keep])

    def scored(self, values: torch.Tensor) -> torch.Tensor:
        """Formula values over the history -> the scored bars."""
        return values[..., self.start:]


def build_market_data(frame: MarketFrame, factors: str, device: torch.device, liquidity: str = "column") -> MarketData:
    """Features, liquidity and target on the device. Before a token's first_bar its features and liquidity are 0:
    the prices there were filled from its future, so nothing may read them (and nothing trades there)."""
    engineer = FACTOR_SETS[factors]
    raw = {name: torch.from_numpy(frame.values[i]).to(device) for i, name in enumerate(FIELDS)}
    first_bar = np.zeros(len(frame.addresses), dtype=np.int64) if frame.first_bar is None else frame.first_bar
    listed = torch.arange(len(frame.times), device=device) >= torch.from_numpy(first_bar).to(device)[:, None]
    feat = clean_values(engineer.compute_features(raw)).masked_fill_(~listed, 0.0)
    o = raw["open"].double()
    target = torch.zeros_like(raw["open"])
    target[:, :-2] = torch.log(o[:, 2:] / o[:, 1:-1]).float()
    liq = torch.where(listed, model_liquidity(raw, liquidity), 0.0)
    return MarketData(feat, liq, torch.nan_to_num(target), list(engineer.NAMES), frame.symbols)


def constant_features(data: MarketData) -> list[str]:
    """The features whose value is the same on every token and bar."""
    flat = data.feat.flatten(1)
    return [name for name, lo, hi in zip(data.feature_names, flat.amin(1).tolist(), flat.amax(1).tolist()) if lo == hi]


def refuse_unlearnable(frame: MarketFrame, data: MarketData, split: int, cfg: AlphaConfig) -> None:
    """One AlphaError, before any training, for data on which formulas cannot be told apart: no tradable bar in
    the training part (the bars before split), or features constant over the whole market because a column they
    read is (close, volume, and with --liquidity column also liquidity and fdv: e.g. the public version's
    liquidity and fdv written as 0),
    or every feature constant. A feature constant for other reasons (LIQ without liquidity data under another
    --liquidity model, LIQ clamped at 1 on a small market) is not an error: AlphaEngine leaves it out."""
    features = constant_features(data)
    read = ["close", "volume"] + (["liquidity", "fdv"] if cfg.liquidity == "column" else [])
    columns = [f"{c} = {frame.field(c).min():g}" for c in read if frame.field(c).min() == frame.field(c).max()]
    problems = []
    if features and columns:
        problems.append(f"columns constant over the whole market ({', '.join(columns)}) make features constant "
                        f"({', '.join(features)}): fill them in the data")
    if len(features) == len(data.feature_names):
        problems.append(f"every feature is constant over the whole market ({', '.join(features)})")
    train_liquidity = data.liquidity[:, :split]                  # the bars before the split
    if not (train_liquidity > cfg.min_liquidity).any():
        problems.append(f"no bar of the training part is tradable: liquidity <= --min-liquidity "
                        f"{cfg.min_liquidity:g} everywhere (max {train_liquidity.max().item():g})")
    hint = (" (for a market without liquidity data choose --liquidity unlimited, dollar_volume or a USD number)"
            if cfg.liquidity == "column" else "")
    if problems:
        raise AlphaError("cannot learn on this data: " + "; ".join(problems) + hint)


# -----------------------------------------------------------------------------
# Postgres: schema, COPY ingest (idempotent), COPY load


OHLCV_COLUMNS = ("address", "time") + FIELDS
CSV_REQUIRED = ("address", "time", "open", "high", "low", "close")


def _sql(template: str, schema: str):
    from psycopg2 import sql
    return sql.SQL(template).format(s=sql.Identifier(schema))


def init_schema(conn, schema: str) -> None:
    """Create the schema, tokens and ohlcv tables and their indexes (idempotent)."""
    value_cols = ", ".join(f"{f} DOUBLE PRECISION" for f in FIELDS)
    statements = [
        "CREATE SCHEMA IF NOT EXISTS {s}",
        "CREATE TABLE IF NOT EXISTS {s}.tokens (address TEXT PRIMARY KEY, symbol TEXT, name TEXT, decimals INT, "
        "chain TEXT, liquidity DOUBLE PRECISION, last_updated TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS {s}.ohlcv (address TEXT NOT NULL REFERENCES {s}.tokens (address), "
        "time TIMESTAMPTZ NOT NULL, " + value_cols + ", PRIMARY KEY (address, time))",
        "CREATE INDEX IF NOT EXISTS ohlcv_time_idx ON {s}.ohlcv (time)",
        "CREATE INDEX IF NOT EXISTS tokens_liquidity_idx ON {s}.tokens (liquidity DESC NULLS LAST, address)",
    ]
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(_sql(statement, schema))
    conn.commit()


# --ingest time spellings: ISO 8601 only (01/02/2024 is 2 January or 1 February depending on the locale), or
# unix epochs with an explicit unit. name: (pattern of the text, SQL turning it into timestamptz, what is expected)
ISO_TIME = (r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
            r"([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d+)?)?(Z|[+-]([01]\d|2[0-3])(:?[0-5]\d)?)?)?$")
EPOCH = r"^-?\d+(\.\d+)?$"
TIME_FORMATS = {
    "iso": (ISO_TIME, "time::timestamptz", "an ISO 8601 time like 2024-01-31T09:30:00Z (UTC unless it gives an "
                                           "offset); for unix epochs pass --time-format unix_s or unix_ms"),
    "unix_s": (EPOCH, "to_timestamp(time::float8)", "unix seconds (--time-format unix_s)"),
    "unix_ms": (EPOCH, "to_timestamp(time::float8 / 1000)", "unix milliseconds (--time-format unix_ms)"),
}
EPOCH_RANGE = ("1971-01-01", "2200-01-01")   # an epoch outside this is almost surely in the other unit


def _csv_header(source, label: str) -> list[str]:
    header_line = source.readline()
    header = [h.strip().lower() for h in header_line.lstrip("\ufeff").strip().split(",")]
    allowed = set(OHLCV_COLUMNS) | {"symbol"}
    unknown = [h for h in header if h not in allowed]
    missing = [h for h in CSV_REQUIRED if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise AlphaError(f"{label}: bad header {header_line.strip()!r}: needs {', '.join(CSV_REQUIRED)}; may add "
                         f"{', '.join(sorted(allowed - set(CSV_REQUIRED)))}"
                         + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else ""))
    return header


def _stage_csv(cur, source, label: str, header: list[str], time_format: str) -> None:
    """COPY the rows into temp table alphagpt_stage (column line: the row's line in the file), then check and
    convert the time column (text until then, so that only the chosen spelling is accepted)."""
    import psycopg2
    from psycopg2 import sql
    pattern, to_time, expected = TIME_FORMATS[time_format]
    value_cols = ", ".join(f"{f} DOUBLE PRECISION" + (" NOT NULL" if f in PRICE_FIELDS else "") for f in FIELDS)
    cur.execute("CREATE TEMP TABLE alphagpt_stage (line BIGINT GENERATED ALWAYS AS IDENTITY (START 2), address "
                "TEXT NOT NULL, time TEXT NOT NULL, " + value_cols + ", symbol TEXT) ON COMMIT DROP")
    cols = sql.SQL(", ").join(map(sql.Identifier, header))
    try:
        cur.copy_expert(sql.SQL("COPY alphagpt_stage ({}) FROM STDIN WITH (FORMAT csv)").format(cols), source)
    except psycopg2.Error as exc:
        where = re.search(r"line (\d+)(?:, column (\w+))?", exc.diag.context or "")
        at = f"line {int(where[1]) + 1}" + (f", column {where[2]}" if where[2] else "") if where else "COPY"
        raise AlphaError(f"{label}: bad row at {at}: {exc.diag.message_primary}; nothing was loaded") from None
    cur.execute("SELECT line, time FROM alphagpt_stage WHERE time !~ %s ORDER BY line LIMIT 1", (pattern,))
    bad = cur.fetchone()
    if bad:
        raise AlphaError(f"{label}: bad row at line {bad[0]}, column time: {bad[1]!r} is not {expected}; "
                         "nothing was loaded")
    try:
        cur.execute(f"ALTER TABLE alphagpt_stage ALTER COLUMN time TYPE TIMESTAMPTZ USING {to_time}")
    except psycopg2.DataError as exc:
        raise AlphaError(f"{label}: bad time: {exc.diag.message_primary}; nothing was loaded") from None
    if time_format != "iso":
        cur.execute("SELECT line FROM alphagpt_stage WHERE time NOT BETWEEN %s AND %s ORDER BY line LIMIT 1",
                    EPOCH_RANGE)
        bad = cur.fetchone()
        if bad:
            raise AlphaError(f"{label}: line {bad[0]}: the time as {time_format} falls outside {EPOCH_RANGE[0]} .. "
                             f"{EPOCH_RANGE[1]}: wrong --time-format?; nothing was loaded")


def _check_staged(cur, schema: str, label: str, fields: list[str], upsert: bool) -> None:
    """Refuse the staged file (nothing is loaded) when prices break the OHLC rules, when it gives one
    (address, time) different values, or, unless upsert, when it differs from rows already stored."""
    finite = " AND ".join(f"abs({f}) < 'Infinity'" for f in PRICE_FIELDS)   # NaN / Inf: cleaned (and counted) later
    rules = {"a price <= 0": " OR ".join(f"{f} <= 0" for f in PRICE_FIELDS),
             "high < max(open, close)": f"high < greatest(open, close) AND {finite}",
             "low > min(open, close)": f"low > least(open, close) AND {finite}"}
    any_rule = " OR ".join(f"({r})" for r in rules.values())
    cur.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {r})" for r in rules.values())
                + f", count(*) FILTER (WHERE {any_rule}), min(line) FILTER (WHERE {any_rule}) FROM alphagpt_stage")
    *counts, n_bad, first = cur.fetchone()
    if n_bad:
        per_rule = ", ".join(f"{n} with {rule}" for rule, n in zip(rules, counts))
        raise AlphaError(f"{label}: {n_bad} rows break the OHLC rules (first at line {first}): {per_rule}; "
                         "nothing was loaded")
    def differ(a: str, b: str) -> str:       # SQL: rows a and b differ in the file's value columns (NULL-safe)
        return f"({', '.join(a + '.' + f for f in fields)}) IS DISTINCT FROM ({', '.join(b + '.' + f for f in fields)})"

    cur.execute(f"WITH c AS (SELECT a.line AS first, b.line AS second, a.address, a.time FROM alphagpt_stage a "
                f"JOIN alphagpt_stage b ON a.address = b.address AND a.time = b.time AND a.line < b.line "
                f"WHERE {differ('a', 'b')}) SELECT (SELECT count(DISTINCT (address, time)) FROM c), * FROM c "
                "ORDER BY second, first LIMIT 1")
    clash = cur.fetchone()
    if clash:
        raise AlphaError(f"{label}: {clash[0]} (address, time) pairs have rows with different values (first: "
                         f"{clash[3]} at {clash[4].isoformat()}, lines {clash[1]} and {clash[2]}); keep one row per "
                         "pair; nothing was loaded")
    if upsert:
        return
    cur.execute(_sql(f"SELECT count(*) OVER (), s.line, s.address, s.time FROM alphagpt_stage s JOIN {{s}}.ohlcv o "
                     f"USING (address, time) WHERE {differ('s', 'o')} ORDER BY s.line LIMIT 1", schema))
    clash = cur.fetchone()
    if clash:
        raise AlphaError(f"{label}: {clash[0]} rows differ from the stored row of their (address, time) (first: "
                         f"line {clash[1]}, {clash[2]} at {clash[3].isoformat()}); nothing was loaded; pass "
                         "--upsert to replace the stored values with the file's")


def ingest_csv(conn, schema: str, source, label: str, upsert: bool = False,
               time_format: str = "iso") -> tuple[int, int]:
    """COPY a CSV (header: address,time,open,high,low,close[,volume,liquidity,fdv,buy_volume,sell_volume,symbol];
    time as in TIME_FORMATS) into a temp staging table, check it (_check_staged), then INSERT ... ON CONFLICT
    (address, time) into ohlcv: rows already stored with the same values are skipped, so re-running adds no
    duplicates; with upsert, stored rows are overwritten in the file's columns. New tokens are added to `tokens`
    with the file's mean liquidity. A bad row or a failed check loads nothing and is one message naming a line.
    Returns (rows in the file, rows inserted or, with upsert, inserted or updated)."""
    import psycopg2
    header = _csv_header(source, label)
    fields = [f for f in FIELDS if f in header]
    try:
        with conn.cursor() as cur:
            _stage_csv(cur, source, label, header, time_format)
            _check_staged(cur, schema, label, fields, upsert)
            cur.execute("SELECT count(*) FROM alphagpt_stage")
            n_rows = cur.fetchone()[0]
            cur.execute(_sql("INSERT INTO {s}.tokens (address, symbol, liquidity) SELECT address, max(symbol), "
                             "avg(liquidity) FROM alphagpt_stage GROUP BY address ON CONFLICT (address) DO UPDATE "
                             "SET symbol = COALESCE(EXCLUDED.symbol, tokens.symbol), "
                             "liquidity = COALESCE(EXCLUDED.liquidity, tokens.liquidity), last_updated = now()",
                             schema))
            columns = ", ".join(["address", "time"] + fields)
            excluded = ", ".join("EXCLUDED." + f for f in fields)
            on_conflict = "DO NOTHING" if not upsert else (
                f"DO UPDATE SET ({', '.join(fields)}) = ROW({excluded}) WHERE "
                f"({', '.join('ohlcv.' + f for f in fields)}) IS DISTINCT FROM ({excluded})")
            cur.execute(_sql(f"INSERT INTO {{s}}.ohlcv ({columns}) SELECT DISTINCT ON (address, time) {columns} "
                             f"FROM alphagpt_stage ORDER BY address, time ON CONFLICT (address, time) {on_conflict}",
                             schema))
            n_written = cur.rowcount
    except (AlphaError, psycopg2.Error):
        conn.rollback()
        raise
    conn.commit()
    return n_rows, n_written


def frame_to_csv(frame: MarketFrame) -> io.StringIO:
    """The frame as ingest_csv's CSV (with symbols), floats at 9 significant digits (exact for float32)."""
    N, T = len(frame.addresses), len(frame.times)
    numbers = io.StringIO()
    np.savetxt(numbers, frame.values.reshape(len(FIELDS), N * T).T, fmt="%.9g", delimiter=",")
    stamps = np.datetime_as_string(frame.times.astype("datetime64[s]")) + "Z"
    quoted = ['"' + s.replace('"', '""') + '"' for s in frame.symbols]
    prefixes = [f'"{frame.addresses[i]}",{stamps[t]},{quoted[i]},' for i in range(N) for t in range(T)]
    lines = numbers.getvalue().splitlines()
    out = io.StringIO()
    out.write("address,time,symbol," + ",".join(FIELDS) + "\n")
    out.writelines(p + line + "\n" for p, line in zip(prefixes, lines))
    out.seek(0)
    return out


def select_tokens(conn, schema: str, limit_tokens: int, test_frac: float) -> tuple[list[str], list[str], int | None]:
    """The top limit_tokens tokens by mean liquidity (then mean close x volume) over the training period only,
    kept server-side in temp table alphagpt_sel(idx, address): the held-out part of the table's time axis
    (its last test_frac) never decides the universe. Returns (addresses, symbols, the split time)."""
    with conn.cursor() as cur:
        quoted = '"' + schema.replace('"', '""') + '"'
        cur.execute("SELECT to_regclass(%s), to_regclass(%s)", (quoted + ".tokens", quoted + ".ohlcv"))
        if None in cur.fetchone():
            raise AlphaError(f"no tokens / ohlcv tables in schema {schema}: create them with --init-db, then load "
                             "data (--ingest FILE.csv or --seed-synthetic)")
        cur.execute(_sql("SELECT DISTINCT extract(epoch FROM time)::bigint AS t FROM {s}.ohlcv ORDER BY t", schema))
        times = np.array([r[0] for r in cur.fetchall()], dtype=np.int64)
        split_time = split_time_of(times, test_frac) if len(times) else None
        cur.execute("DROP TABLE IF EXISTS alphagpt_sel")
        cur.execute(_sql("CREATE TEMP TABLE alphagpt_sel AS SELECT (row_number() OVER w - 1)::int AS idx, address, "
                         "COALESCE(symbol, '') AS symbol FROM {s}.tokens LEFT JOIN (SELECT address, avg(liquidity) "
                         "AS liq, avg(close * volume) AS dollars FROM {s}.ohlcv WHERE time < to_timestamp(%s) "
                         "GROUP BY address) train USING (address) WINDOW w AS (ORDER BY liq DESC NULLS LAST, dollars "
                         "DESC NULLS LAST, address) ORDER BY idx LIMIT %s", schema), (split_time, limit_tokens))
        cur.execute("SELECT address, symbol FROM alphagpt_sel ORDER BY idx")
        rows = cur.fetchall()
    if not rows:
        raise AlphaError(f"No tokens found in {schema}.tokens: load data first (--ingest FILE.csv or --seed-synthetic)")
    return [r[0] for r in rows], [r[1] for r in rows], split_time


# every column NOT NULL and fixed-width (NULL -> NaN), so each binary COPY row has the same layout
LOAD_QUERY = ("SELECT s.idx, extract(epoch FROM o.time)::bigint, "
              + ", ".join(f"COALESCE(o.{f}, 'NaN')::float8" for f in FIELDS)
              + " FROM {s}.ohlcv o JOIN alphagpt_sel s USING (address)")
# a binary COPY row: int16 field count, then per field int32 byte length + big-endian value
COPY_ROW = np.dtype([("n", ">i2"), ("idx_len", ">i4"), ("idx", ">i4"), ("time_len", ">i4"), ("time", ">i8")]
                    + [x for f in FIELDS for x in ((f + "_len", ">i4"), (f, ">f8"))])
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00"


def parse_binary_copy(data: bytes) -> np.ndarray:
    """Rows of COPY (LOAD_QUERY) TO STDOUT (FORMAT binary) -> (rows, 2 + len(FIELDS)) float64, no Python loop."""
    if not data.startswith(COPY_HEADER):
        raise AlphaError("unexpected COPY BINARY stream from Postgres")
    start = 19 + int.from_bytes(data[15:19], "big")                  # signature, flags, header extension
    body = data[start:-2]                                            # the trailer is int16 -1
    if len(body) % COPY_ROW.itemsize:
        raise AlphaError("unexpected COPY BINARY row layout from Postgres")
    rec = np.frombuffer(body, dtype=COPY_ROW)
    return np.column_stack([rec["idx"], rec["time"]] + [rec[f] for f in FIELDS]).astype(np.float64)


def load_frame(conn, schema: str, limit_tokens: int, use_copy: bool = True,
               test_frac: float = AlphaConfig.test_frac) -> tuple[MarketFrame, int]:
    """Top tokens' candles (select_tokens) pivoted to [field x token x time] (NaN where a token has no bar), with
    the split time they were chosen by. The rows come through COPY TO STDOUT in binary format (one byte stream
    read by numpy as fixed-width records), or with use_copy=False through a plain SELECT + fetchall (kept for
    --bench). Returns (frame, duplicate rows)."""
    addresses, symbols, split_time = select_tokens(conn, schema, limit_tokens, test_frac)
    with conn.cursor() as cur:
        if use_copy:
            buf = io.BytesIO()
            cur.copy_expert(_sql("COPY (" + LOAD_QUERY + ") TO STDOUT WITH (FORMAT binary)", schema), buf)
            rows = parse_binary_copy(buf.getvalue())
            rows = rows if len(rows) else None
        else:
            cur.execute(_sql(LOAD_QUERY, schema))
            fetched = cur.fetchall()
            rows = np.array(fetched, dtype=np.float64).reshape(len(fetched), -1) if fetched else None
    conn.commit()
    if rows is None:
        raise AlphaError(f"{schema}.ohlcv has no candles for the selected tokens")
    frame, n_dupes = pivot_rows(rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2:], addresses,
                                symbols)
    return dataclasses.replace(frame, split_time=split_time), n_dupes


def load_market(cfg: AlphaConfig, seed: int | None = None) -> tuple[MarketFrame, str]:
    """Postgres when a DSN is configured, else the synthetic market; one bar length (align_frequencies), cleaned,
    with a report line."""
    dsn = resolve_dsn(cfg)
    if not dsn:
        seed = cfg.seed if seed is None else seed
        frame, n_dupes = synthetic_market(cfg.synthetic_tokens, cfg.synthetic_bars, seed), 0
        source = f"synthetic market (seed {seed})"
    else:
        conn = connect(dsn)
        try:
            frame, n_dupes = load_frame(conn, cfg.db_schema, cfg.limit_tokens, test_frac=cfg.test_frac)
        finally:
            conn.close()
        source = f"postgres {mask_secret(dsn, dsn)} schema {cfg.db_schema}"
    frame, note = align_frequencies(frame, cfg.mixed_frequency)
    cleaned, report = clean_market(frame, n_dupes)
    return cleaned, f"{source} | {note}{report}"


# -----------------------------------------------------------------------------
# backtest


class MemeBacktest:
    """The seed's meme-coin scorer, vectorised over (formulas, tokens, time). For factor f of one formula:

        pos_t    = 1[sigmoid(f_t) > 0.85] * 1[liq_t > min_liquidity]      (decided at bar t's close;
                                                                      computed as f_t > logit(0.85))
        impact_t = min(trade_size_usd / liq_t, 0.05)
        cost_t   = |pos_t - pos_{t-1}| * (base_fee + impact_t)             (pos_{-1} = 0)
        pnl_t    = pos_t * ret_t - cost_t,   ret_t = log(open[t+2] / open[t+1])
        score    = sum_t pnl_t - 2 * #{t : pnl_t < -0.05}                  (drawdown penalty)
        score    = -10 if the token has fewer than 5 trades (entries, pos 0 -> 1)
        fitness  = median of score over tokens;  also returned: mean over tokens of sum_t pnl_t."""

    def __init__(self, trade_size_usd: float, min_liquidity: float, base_fee: float, entry: float = 0.85,
                 drawdown_threshold: float = 0.05, drawdown_penalty: float = 2.0, min_trades: int = 5,
                 inactive_score: float = -10.0):
        self.trade_size_usd, self.min_liquidity, self.base_fee = trade_size_usd, min_liquidity, base_fee
        self.entry, self.drawdown_threshold, self.drawdown_penalty = entry, drawdown_threshold, drawdown_penalty
        self.min_trades, self.inactive_score = min_trades, inactive_score
        self.entry_logit = math.log(entry / (1 - entry))      # sigmoid(f) > entry  <=>  f > logit(entry)
        self._market: tuple | None = None                      # (liquidity, target_ret, their bar masks)

    def bar_masks(self, liquidity: torch.Tensor, target_ret: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What depends on the market only, (N, T) each: tradable (bool), the cost of a position change, the
        entry threshold (logit(entry) where tradable, +inf elsewhere) and the per-bar weights that turn
        positions into scores (see token_scores). Kept for the last market seen, so scoring formula after
        formula on the same data computes them once."""
        if self._market is None or self._market[0] is not liquidity or self._market[1] is not target_ret:
            tradable = liquidity > self.min_liquidity
            cost = self.base_fee + (self.trade_size_usd / liquidity).clamp(max=0.05)  # liq 0 -> impact 0.05
            threshold = torch.where(tradable, self.entry_logit, math.inf)
            limit = -self.drawdown_threshold
            # a bar loses more than the threshold when held (pnl = ret), entered (ret - cost) or left (-cost)
            loss_held, loss_entered, loss_left = ((target_ret < limit).float(), (target_ret - cost < limit).float(),
                                                  (-cost < limit).float())
            # with p_t the position and q_t = p_t p_{t-1}: entered = p - q, held = q, left = p_{t-1} - q and
            # changed = p + p_{t-1} - 2q, so the cumulative pnl, the count of losing bars and the entries are
            # p . w_pos + q . w_pair per token (the weight of p_{t-1} moved to p_t); the counts' weights are small
            # integers, summed exactly, so that score = pnl - k * count is as precise as the pnl alone
            def next_bar(w):
                return F.pad(w, (0, 1))[..., 1:]
            w_pos = torch.stack([target_ret - cost - next_bar(cost), loss_entered + next_bar(loss_left),
                                 torch.ones_like(cost)], -1)                   # (N, T, 3): pnl, losing bars, entries
            w_pair = torch.stack([2 * cost, loss_held - loss_entered - loss_left,
                                  -torch.ones_like(cost)], -1)[..., 1:, :].contiguous()   # (N, T-1, 3)
            self._market = (liquidity, target_ret, (tradable, cost, threshold, w_pos, w_pair))
        return self._market[2]

    def token_scores(self, factors: torch.Tensor, liquidity: torch.Tensor, target_ret: torch.Tensor):
        """factors: (F, N, T) or F tensors (N, T), liquidity / target_ret: (N, T) -> scores (F, N), cumulative pnl
        (F, N).
        Positions as 0/1 floats, then two batched dot products per token with the market's weights (bar_masks):
        no bool tensors, whose ops (comparisons into bool, where, bool sums) are many times slower on CPU."""
        *_, threshold, w_pos, w_pair = self.bar_masks(liquidity, target_ret)
        pos = threshold.new_empty((len(factors),) + threshold.shape)                  # (F, N, T) 0/1
        if isinstance(factors, torch.Tensor):
            torch.gt(factors, threshold, out=pos)
        else:                                                    # formula by formula: no stacked copy of the values
            for f, values in enumerate(factors):
                torch.gt(values, threshold, out=pos[f])
        pair = pos[..., 1:] * pos[..., :-1]                                          # (F, N, T-1): held bars
        sums = torch.bmm(pos.transpose(0, 1), w_pos) + torch.bmm(pair.transpose(0, 1), w_pair)   # (N, F, 3)
        cum, losing, trades = sums.transpose(0, 1).unbind(-1)                        # (F, N) each
        score = torch.where(trades < self.min_trades - 0.5, self.inactive_score, cum - self.drawdown_penalty * losing)
        return score, cum

    def never_enters(self, max_factor: float) -> bool:
        """Whether factors whose maximum is max_factor score inactive_score on every token (hence as fitness):
        no bar passes the entry threshold, so no token makes min_trades >= 1 trades."""
        return max_factor <= self.entry_logit and self.min_trades >= 1

    def positions(self, factors: torch.Tensor, tradable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (..., N, T) bool and where they change (pos_t != pos_{t-1}, pos_{-1} = 0)."""
        pos = (factors > self.entry_logit) & tradable
        change = pos.clone()
        change[..., 1:] ^= pos[..., :-1]
        return pos, change

    def bar_pnl(self, factors: torch.Tensor, liquidity: torch.Tensor, target_ret: torch.Tensor):
        """One formula's factors (N, T) -> positions (N, T) bool, entries (N, T) bool and pnl_t per bar (N, T)."""
        tradable, cost, *_ = self.bar_masks(liquidity, target_ret)
        pos, change = self.positions(factors, tradable)
        return pos, change & pos, pos * target_ret - change * cost

    def evaluate(self, factors: torch.Tensor, liquidity: torch.Tensor, target_ret: torch.Tensor):
        """factors: (N, T), or (F, N, T) or F tensors (N, T) -> (fitness, mean cumulative pnl), floats or (F,)
        tensors."""
        single = isinstance(factors, torch.Tensor) and factors.dim() == 2
        score, cum = self.token_scores(factors.unsqueeze(0) if single else factors, liquidity, target_ret)
        fitness, mean_ret = score.median(dim=-1).values, cum.mean(-1)
        return (fitness.item(), mean_ret.item()) if single else (fitness, mean_ret)


# -----------------------------------------------------------------------------
# the engine: sample formulas, score them, REINFORCE


INVALID_REWARD, DEGENERATE_REWARD = -5.0, -2.0
DEGENERATE_STD = 1e-4           # a formula whose values' std is below this is degenerate
CPU_BACKTEST_GROUP = 8          # formulas backtested together on CPU (see AlphaEngine.score_batch)


def _batched(items, n: int):
    """Lists of up to n consecutive items of an iterator."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def is_degenerate(values: torch.Tensor, lo: float | None = None, hi: float | None = None) -> bool:
    """values.std() < DEGENERATE_STD, skipping the std where the range settles it: with n values spanning a range R,
    the (n - 1)-normalised std is at least R / sqrt(2 (n - 1)) (two values at the ends, the rest at the mean).
    lo, hi: the values' min and max when the caller has them."""
    lo, hi = (values.amin().item(), values.amax().item()) if lo is None or hi is None else (lo, hi)
    if hi - lo > 2 * DEGENERATE_STD * math.sqrt(2 * max(values.numel() - 1, 1)):
        return False
    return values.std().item() < DEGENERATE_STD


@torch.no_grad()
def sample_formulas(vocab: FormulaVocab, max_len: int, n: int, device, model: AlphaGPT | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """n formulas under the grammar mask, from the policy, or uniformly over legal tokens when model is None.
    Returns (n, max_len) token ids, END-padded; every formula is executable."""
    idx = torch.full((n, 1), vocab.bos, dtype=torch.long, device=device)
    depth = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    delta = vocab.delta.to(device)
    legal_all = []
    for p in range(max_len):
        legal = vocab.legal_mask(depth, p, done, max_len)                        # (n, V)
        legal_all.append(legal)
        if model is None:
            probs = legal.float()
        else:
            logp, _ = model(idx, torch.stack(legal_all, dim=1))
            probs = logp[:, -1].exp() * legal
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        depth = depth + torch.where(done, 0, delta[tok])
        done = done | (tok == vocab.end)
        idx = torch.cat([idx, tok[:, None]], dim=1)
    return idx[:, 1:]


def random_valid_scores(engine: "AlphaEngine", n: int, seed: int, data: MarketData) -> np.ndarray:
    """Out-of-sample style baseline: fitness of n uniformly sampled grammar-valid, non-degenerate formulas."""
    gen = torch.Generator(device=engine.device).manual_seed(seed)
    tokens = sample_formulas(engine.vocab, engine.cfg.max_formula_len, n, engine.device, generator=gen)
    rewards, ok = engine.score_batch(tokens, data)        # not through the training cache: another split's data
    return rewards[ok].cpu().numpy()


class AlphaEngine:
    """Loads nothing itself: give it a cleaned MarketFrame. Splits time into train / held-out test, builds the
    policy, optimiser, LoRD, stable-rank monitor, VM and backtest, and trains with REINFORCE:
    reward = -5 for an invalid formula, -2 for a degenerate one (factor std < DEGENERATE_STD), else the backtest
    fitness; advantage normalised over the batch (see advantages());
    loss = mean_f[-adv_f * sum_t log p(tok_t)] - entropy_coef * entropy + value_coef * huber(value, r)."""

    def __init__(self, cfg: AlphaConfig, frame: MarketFrame):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if cfg.factors not in FACTOR_SETS:
            raise AlphaError(f"unknown --factors {cfg.factors!r}: expected one of {sorted(FACTOR_SETS)}")
        data = build_market_data(frame, cfg.factors, self.device, cfg.liquidity)
        T = data.feat.shape[-1]
        split_time = split_time_of(frame.times, cfg.test_frac) if frame.split_time is None else frame.split_time
        split = int(np.searchsorted(frame.times, split_time))
        if split < 20 or T - split < 20:
            raise AlphaError(f"cannot split {T} bars with --test-frac {cfg.test_frac}: each part needs >= 20 bars")
        refuse_unlearnable(frame, data, split, cfg)
        # a feature constant over the whole market carries nothing, and a formula dividing by it (LIQ is 0 without
        # liquidity and fdv data) would live on the value clip: it is left out of the formulas
        self.constant_features = constant_features(data)
        data = data.without(self.constant_features)
        self.data, self.train_data, self.test_data = data, data.split(0, split), data.split(split, T)
        self.times, self.split = frame.times, split
        self.vocab = FormulaVocab(data.feature_names)
        self.vm = StackVM(self.vocab)
        self.backtest = MemeBacktest(cfg.trade_size_usd, cfg.min_liquidity, cfg.base_fee)
        self.model = AlphaGPT(cfg, self.vocab).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.lord = (NewtonSchulzLowRankDecay(self.model.named_parameters(), cfg.lord_decay_rate,
                                              cfg.lord_num_iterations) if cfg.use_lord else None)
        self.rank_monitor = StableRankMonitor(self.model.named_parameters()) if cfg.use_rank_monitor else None
        self.step = 0
        self.best = {"score": -math.inf, "tokens": [], "step": -1}
        self.history: list[dict] = []
        self.baselines: dict[str, float] = {}      # split name -> 95th percentile of random formulas' scores
        # cross-step cache: canonical formula (tokens up to END) -> (reward, usable), for the data it was scored on
        self.score_cache: OrderedDict[tuple[int, ...], tuple[float, bool]] = OrderedDict()
        self._cache_data: tuple | None = None
        self.cache_hits = self.cache_lookups = 0

    def canonical(self, formula: list[int]) -> tuple[int, ...]:
        """The tokens that define a formula: those before the first END (the padding after it is irrelevant)."""
        end = self.vocab.end
        return tuple(formula[: formula.index(end)] if end in formula else formula)

    @staticmethod
    def data_fingerprint(data: MarketData) -> list:
        """What a saved score cache must match to be reused: the training data's shape and sums."""
        return [list(data.feat.shape), *(float(t.double().sum()) for t in (data.feat, data.liquidity, data.target))]

    def cache_stats(self) -> dict:
        rate = self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0
        return {"hits": self.cache_hits, "lookups": self.cache_lookups, "hit_rate": rate,
                "entries": len(self.score_cache), "capacity": self.cfg.score_cache}

    def score_formulas(self, tokens: torch.Tensor, data: MarketData) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (F,) and a mask of valid, non-degenerate formulas: score_batch, through the cross-step LRU
        cache of score_cache entries (cleared when the data changes). Each distinct formula not in the cache is
        scored once; the cached values are the ones score_batch gave, so hits equal recomputation."""
        if self.cfg.score_cache == 0:
            return self.score_batch(tokens, data)
        market = (data.feat, data.liquidity, data.target)
        if self._cache_data is None or any(a is not b for a, b in zip(market, self._cache_data)):
            self.score_cache.clear()
            self._cache_data = market
        keys = [self.canonical(row) for row in tokens.tolist()]
        cache = self.score_cache
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        self.cache_lookups += len(keys)
        self.cache_hits += len(keys) - len(missing)
        found = {k: cache[k] for k in dict.fromkeys(keys) if k in cache}
        for k in found:
            cache.move_to_end(k)
        if missing:
            width = max(1, max(len(k) for k in missing))
            padded = torch.tensor([list(k) + [self.vocab.end] * (width - len(k)) for k in missing], dtype=torch.long)
            rewards, usable = self.score_batch(padded, data)
            for k, r, u in zip(missing, rewards.tolist(), usable.tolist()):
                found[k] = cache[k] = (r, u)
            while len(cache) > self.cfg.score_cache:
                cache.popitem(last=False)
        rewards = torch.tensor([found[k][0] for k in keys], dtype=torch.float32, device=self.device)
        usable = torch.tensor([found[k][1] for k in keys], dtype=torch.bool, device=self.device)
        return rewards, usable

    def score_batch(self, tokens: torch.Tensor, data: MarketData) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (F,) and a mask of valid, non-degenerate formulas, no cache; each distinct formula of a chunk of
        eval_chunk is scored once. CPU: the memoised walk (StackVM.stream_memo), its roots backtested in groups of
        CPU_BACKTEST_GROUP as they come, so that a group's (g, N, T) temporaries stay in the cache and memory holds
        only values still needed. CUDA: the batched groups (StackVM.evaluate), backtested as one tensor."""
        rewards, usable = [], []
        for chunk in tokens.split(self.cfg.eval_chunk):
            if data.feat.is_cuda:
                values, roots = self.vm.evaluate(chunk, data.feat)
                groups = [(range(len(values)), values)] if len(values) else []
                roots = roots.tolist()
            else:
                roots, stream = self.vm.stream_memo(chunk, data.feat)
                groups = (zip(*g) for g in _batched(stream, CPU_BACKTEST_GROUP))
            scored = {}
            for ids, values in groups:
                reward, ok = self.group_rewards(values, data)
                scored.update(zip(ids, zip(reward.tolist(), ok.tolist())))
            rewards += [scored[r][0] if r >= 0 else INVALID_REWARD for r in roots]
            usable += [r >= 0 and scored[r][1] for r in roots]
        return (torch.tensor(rewards, dtype=torch.float32, device=self.device),
                torch.tensor(usable, dtype=torch.bool, device=self.device))

    def group_rewards(self, values, data: MarketData) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid formulas' values over the history, (g, N, T) or a sequence of (N, T) -> rewards (g,) and
        non-degenerate (g,): the fitness, or DEGENERATE_REWARD where the values' std is below DEGENERATE_STD."""
        if isinstance(values, torch.Tensor):                     # one std call for the group: one launch on a GPU
            values = data.scored(values)
            degenerate = values.flatten(1).std(1) < DEGENERATE_STD
            fitness = self.backtest.evaluate(values, data.liquidity, data.target)[0]
            return torch.where(degenerate, DEGENERATE_REWARD, fitness), ~degenerate
        values = [data.scored(v) for v in values]
        ranges = [(v.amin().item(), v.amax().item()) for v in values]
        degenerate = [is_degenerate(v, lo, hi) for v, (lo, hi) in zip(values, ranges)]
        # values that never rise above the entry threshold open no position: the backtest's inactive score,
        # without running it (a quarter of the formulas, random or from the policy)
        run = [i for i, (d, (_, hi)) in enumerate(zip(degenerate, ranges)) if not (d or self.backtest.never_enters(hi))]
        reward = torch.tensor([DEGENERATE_REWARD if d else self.backtest.inactive_score for d in degenerate])
        if run:
            reward[run] = self.backtest.evaluate([values[i] for i in run], data.liquidity, data.target)[0]
        return reward.to(self.device), ~torch.tensor(degenerate, device=self.device)

    def formula_values(self, tokens: list[int], data: MarketData) -> torch.Tensor | None:
        """One formula's values (N, T) on data's scored bars (computed over its history too), None if invalid."""
        values = self.vm.execute(tokens, data.feat)
        return None if values is None else data.scored(values)

    def score_one(self, tokens: list[int], data: MarketData) -> dict:
        """Score one formula the seed's way (VM, then backtest)."""
        return self.score_values(self.formula_values(tokens, data), data)

    def score_values(self, factors: torch.Tensor | None, data: MarketData) -> dict:
        if factors is None:
            return {"score": INVALID_REWARD, "mean_return": 0.0, "valid": False}
        if factors.std() < DEGENERATE_STD:
            return {"score": DEGENERATE_REWARD, "mean_return": 0.0, "valid": True}
        fitness, mean_ret = self.backtest.evaluate(factors, data.liquidity, data.target)
        return {"score": fitness, "mean_return": mean_ret, "valid": True}

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(F,) -> (F,). risk_quantile 0: the seed's (r - mean) / (std + 1e-5). risk_quantile q > 0 (default):
        risk-seeking REINFORCE, max(r - quantile_q(r), 0) / (std + 1e-5): the search keeps the best formula,
        so the policy is pushed towards the batch's top tail instead of its average."""
        if self.cfg.risk_quantile > 0:
            return (rewards - torch.quantile(rewards, self.cfg.risk_quantile)).clamp(min=0) / (rewards.std() + 1e-5)
        return (rewards - rewards.mean()) / (rewards.std() + 1e-5)

    def policy_loss(self, tokens: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, L = tokens.shape
        inputs = torch.cat([torch.full((B, 1), self.vocab.bos, device=tokens.device), tokens[:, :-1]], dim=1)
        logp, values = self.model(inputs, self.vocab.grammar_masks(tokens, L))        # (B, L, V), (B, L)
        ended = (tokens == self.vocab.end).long().cumsum(1)
        live = ((ended == 0) | ((ended == 1) & (tokens == self.vocab.end))).float()   # up to and incl. END
        tok_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)                 # (B, L)
        adv = self.advantages(rewards)
        pg = -((tok_logp * live).sum(1) * adv).mean()
        entropy = ((-(logp.exp() * logp).sum(-1)) * live).sum() / live.sum()
        value_loss = (F.smooth_l1_loss(values, rewards[:, None].expand_as(values), reduction="none") * live).sum() \
            / live.sum()
        loss = pg - self.cfg.entropy_coef * entropy + self.cfg.value_coef * value_loss
        return loss, {"entropy": entropy.item(), "value_loss": value_loss.item()}

    def train_step(self) -> dict:
        self.model.train()
        tokens = sample_formulas(self.vocab, self.cfg.max_formula_len, self.cfg.batch_size, self.device, self.model)
        rewards, usable = self.score_formulas(tokens, self.train_data)
        if usable.any():
            i = int(torch.where(usable, rewards, -math.inf).argmax())
            if rewards[i].item() > self.best["score"]:
                self.best = {"score": rewards[i].item(), "tokens": tokens[i].tolist(), "step": self.step}
        loss, stats = self.policy_loss(tokens, rewards)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if self.lord is not None:
            self.lord.step()
        record = {"step": self.step, "loss": loss.item(), "mean_reward": rewards.mean().item(),
                  "usable_frac": usable.float().mean().item(),
                  "cache_hit_rate": self.cache_stats()["hit_rate"],
                  "best_score": self.best["score"] if self.best["tokens"] else None, **stats}
        if self.rank_monitor is not None and self.step % self.cfg.rank_every == 0:
            record["stable_rank"] = self.rank_monitor.compute()
        self.step += 1
        self.history.append(record)
        return record

    # ---- the report: the best formula against random formulas and buy-and-hold, per split

    def split_info(self) -> dict:
        def iso(t):
            return np.datetime_as_string(np.datetime64(int(t), "s")) + "Z"
        return {"test_frac": self.cfg.test_frac, "split_time": iso(self.times[self.split]), "train_bars": self.split,
                "test_bars": len(self.times) - self.split, "bar_seconds": bar_seconds(self.times),
                "first_time": iso(self.times[0]), "last_time": iso(self.times[-1]), "tokens": len(self.data.symbols)}

    def portfolio(self, factors: torch.Tensor, data: MarketData):
        """Positions (N, T), entries (N, T) and the per-bar return (T,) of equal sleeves per token: r_t = mean
        over tokens of pnl_t."""
        pos, entries, pnl = self.backtest.bar_pnl(factors, data.liquidity, data.target)
        return pos, entries, pnl.double().mean(0)

    def split_report(self, tokens: list[int], data: MarketData) -> dict:
        """score_one plus what the formula's positions did (curve_stats); an invalid formula holds nothing."""
        factors = self.formula_values(tokens, data)
        held = torch.zeros_like(data.target) if factors is None else factors
        return {**self.score_values(factors, data),
                **curve_stats(*self.portfolio(held, data), bar_seconds(self.times))}

    def buy_and_hold(self, data: MarketData) -> dict:
        """Long every token on every tradable bar, through the same backtest (fees and impact included)."""
        return curve_stats(*self.portfolio(torch.full_like(data.target, VALUE_CLIP), data), bar_seconds(self.times))

    def random_p95(self, name: str, data: MarketData) -> float | None:
        """95th percentile of baseline_formulas random valid formulas' scores on a split (computed once)."""
        if name not in self.baselines:
            scores = random_valid_scores(self, self.cfg.baseline_formulas, self.cfg.seed, data)
            self.baselines[name] = float(np.percentile(scores, 95)) if len(scores) else None
        return self.baselines[name]

    def report(self, tokens: list[int]) -> dict:
        """train and test: split_report, random_p95_score and buy_and_hold on the same bars; whether the formula
        beats random formulas out of sample (held-out score above their 95th percentile) and buy and hold (held-out
        return per bar above its), and that as a line."""
        out = {name: {**self.split_report(tokens, data), "random_p95_score": self.random_p95(name, data),
                      "buy_and_hold": self.buy_and_hold(data)}
               for name, data in (("train", self.train_data), ("test", self.test_data))}
        score, p95 = out["test"]["score"], out["test"]["random_p95_score"]
        beats = p95 is not None and score > p95
        versus = "no random formula was valid" if p95 is None else f"their 95th percentile {p95:.4f}"
        ret, hold = out["test"]["return_per_bar"], out["test"]["buy_and_hold"]["return_per_bar"]
        out["beats_random_out_of_sample"] = beats
        out["beats_buy_and_hold_out_of_sample"] = ret > hold
        out["verdict"] = (f"held-out: the formula {'BEATS' if beats else 'does NOT beat'} random formulas (score "
                          f"{score:.4f}; {versus}, of {self.cfg.baseline_formulas} random formulas); return per bar "
                          f"{ret:.3g}, {'above' if ret > hold else 'not above'} buy and hold's {hold:.3g}")
        return out

    def best_strategy(self) -> dict:
        tokens = self.best["tokens"]
        head = {"tokens": self.vocab.decode(tokens), "formula": self.vocab.infix(tokens) if tokens else None,
                "factors": self.cfg.factors, "train_score": self.best["score"] if tokens else None,
                "found_at_step": self.best["step"] if tokens else None, "split": self.split_info(),
                "definitions": REPORT_DEFINITIONS}
        if not tokens:
            return {**head, "train": None, "test": None, "beats_random_out_of_sample": None}
        return {**head, **self.report(tokens)}

    def state(self) -> dict:
        config = dataclasses.asdict(dataclasses.replace(self.cfg, db=strip_password(self.cfg.db)))
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []   # GPU sampling draws here
        return {"config": config, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "best": self.best,
                "history": self.history, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                "score_cache": {"data": self.data_fingerprint(self.train_data), "hits": self.cache_hits,
                                "lookups": self.cache_lookups,
                                "entries": [[list(k), r, u] for k, (r, u) in self.score_cache.items()]}}

    def load_state(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step, self.best, self.history = ckpt["step"], ckpt["best"], ckpt["history"]
            torch.set_rng_state(ckpt["rng"])
            if ckpt.get("cuda_rng") and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            saved = ckpt.get("score_cache")
            if saved and saved["data"] == self.data_fingerprint(self.train_data):   # a resumed run continues as
                self.score_cache = OrderedDict((tuple(k), (r, u)) for k, r, u in saved["entries"])  # uninterrupted
                self._cache_data = (self.train_data.feat, self.train_data.liquidity, self.train_data.target)
                self.cache_hits, self.cache_lookups = saved["hits"], saved["lookups"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise AlphaError(f"checkpoint does not fit this model (changed --d-model, --factors, ...?): "
                             f"{' '.join(str(exc).split())[:300]}") from None

    def save_outputs(self, out_dir: Path) -> None:
        atomic_save(self.state(), out_dir / "ckpt.pt")
        atomic_write_bytes(json.dumps(self.best_strategy(), indent=2).encode(), out_dir / "best_meme_strategy.json")
        atomic_write_bytes(json.dumps(self.history).encode(), out_dir / "training_history.json")

    def train(self, out_dir: Path) -> dict:
        """Run the remaining steps with a progress bar; checkpoint and outputs every ckpt_every steps."""
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(range(self.step, self.cfg.train_steps), desc="alphagpt", initial=self.step,
                   total=self.cfg.train_steps, dynamic_ncols=True)
        for _ in bar:
            rec = self.train_step()
            bar.set_postfix(reward=f"{rec['mean_reward']:.2f}", best=f"{self.best['score']:.3f}",
                            ok=f"{rec['usable_frac']:.2f}")
            if "stable_rank" in rec:
                tqdm.write(f"step {rec['step']}: stable rank {rec['stable_rank']:.2f}")
            if self.step % self.cfg.ckpt_every == 0:
                self.save_outputs(out_dir)
        self.save_outputs(out_dir)
        stats = self.cache_stats()
        if stats["lookups"]:
            tqdm.write(f"score cache: {stats['hits']} of {stats['lookups']} formulas scored from the cache "
                       f"({100 * stats['hit_rate']:.1f}%), {stats['entries']} entries of {stats['capacity']}")
        return self.best_strategy()


# -----------------------------------------------------------------------------
# report: the numbers a quant reads, as JSON fields and as a table

SECONDS_PER_YEAR = 365.25 * 86400          # crypto trades around the clock
REPORT_DEFINITIONS = {
    "score": "the fitness the search maximises: median over tokens of (sum of pnl - 2 x bars losing more than 5%), "
             "-10 for a token with fewer than 5 trades",
    "mean_return": "mean over tokens of the summed pnl (no penalties)",
    "return_per_bar": "mean over tokens and bars of pnl: the per-bar return of equal sleeves per token",
    "sharpe": "mean / std of the per-bar return; sharpe_annual scales it by sqrt(bars per year, 365.25 days)",
    "max_drawdown": "largest fall of the cumulative per-bar return from its running peak (start 0), same units",
    "exposure": "share of (token, bar) pairs holding a position; trades: entries (position 0 -> 1)",
    "buy_and_hold": "long every token on every tradable bar, through the same backtest (fees, impact); no score: "
                    "its one trade per token would get the -10 of fewer than 5 trades",
    "random_p95_score": "95th percentile of the scores of uniformly random valid formulas on the same bars",
}


def curve_stats(pos: torch.Tensor, entries: torch.Tensor, returns: torch.Tensor, bar_s: int | None) -> dict:
    """Positions and entries (N, T) and per-bar returns (T,) -> REPORT_DEFINITIONS' figures."""
    curve = returns.cumsum(0)
    peak = torch.cummax(curve, 0).values.clamp(min=0)
    std = returns.std().item() if len(returns) > 1 else 0.0
    sharpe = returns.mean().item() / std if std > 0 else None
    annual = sharpe * math.sqrt(SECONDS_PER_YEAR / bar_s) if sharpe is not None and bar_s else None
    return {"return_per_bar": returns.mean().item(), "sharpe": sharpe, "sharpe_annual": annual,
            "max_drawdown": (peak - curve).max().item(), "trades": int(entries.sum()),
            "exposure": pos.float().mean().item(), "bars": pos.shape[-1]}


REPORT_ROWS = [  # (label, keys into a split's report, format)
    ("score (median over tokens, penalised)", ("score",), "{:.4f}"),
    ("mean return (over tokens, summed)", ("mean_return",), "{:.4f}"),
    ("return per bar (over tokens and bars)", ("return_per_bar",), "{:.3e}"),
    ("Sharpe per bar", ("sharpe",), "{:.4f}"),
    ("Sharpe annualised", ("sharpe_annual",), "{:.2f}"),
    ("max drawdown", ("max_drawdown",), "{:.4f}"),
    ("trades", ("trades",), "{}"),
    ("exposure", ("exposure",), "{:.2%}"),
    ("bars", ("bars",), "{}"),
    ("random formulas: 95th percentile score", ("random_p95_score",), "{:.4f}"),
    ("buy and hold: return per bar", ("buy_and_hold", "return_per_bar"), "{:.3e}"),
    ("buy and hold: Sharpe annualised", ("buy_and_hold", "sharpe_annual"), "{:.2f}"),
    ("buy and hold: max drawdown", ("buy_and_hold", "max_drawdown"), "{:.4f}"),
]


def report_table(result: dict) -> str:
    """best_strategy() / eval_formula's result as a table, train beside held-out, with what score means and the
    verdict against random formulas."""
    def cell(part, keys, fmt):
        value = result[part]
        for key in keys:
            value = value[key]
        return "n/a" if value is None else fmt.format(value)

    split = result["split"]
    bar = "unknown" if split["bar_seconds"] is None else format_bar(split["bar_seconds"])
    lines = [f"{'':40} {'train':>12} {'held-out':>12}   (split at {split['split_time']}, --test-frac "
             f"{split['test_frac']}, {bar} bars, {split['tokens']} tokens)"]
    lines += [f"{label:40} {cell('train', keys, fmt):>12} {cell('test', keys, fmt):>12}"
              for label, keys, fmt in REPORT_ROWS]
    lines += [f"score: {REPORT_DEFINITIONS['score']}; return per bar and mean return are plain means",
              result["verdict"]]
    return "\n".join(lines)


def plot_equity(engine: AlphaEngine, ids: list[int], path: Path) -> str:
    """The formula's cumulative per-bar return against buy-and-hold over the whole period, a line at the split,
    as a PNG at path; returns the line to print (matplotlib missing: only the plot is skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "equity plot skipped: matplotlib is not installed (pip install matplotlib)"
    data, when = engine.data, engine.times.astype("datetime64[s]")
    factors = engine.formula_values(ids, data)
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, held in (("formula", torch.zeros_like(data.target) if factors is None else factors),
                        ("buy and hold", torch.full_like(data.target, VALUE_CLIP))):
        ax.plot(when, engine.portfolio(held, data)[2].cumsum(0).cpu().numpy(), label=label)
    ax.axvline(when[engine.split], color="grey", linestyle="--", label="held-out starts")
    ax.set(title=engine.vocab.infix(ids), ylabel="cumulative return per token")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"equity curve written to {path}"


# -----------------------------------------------------------------------------
# benchmark


BENCH_MARKET = {"synthetic_tokens": 100, "synthetic_bars": 2000}   # --bench's market unless the flags are given


def _public_delay(x: torch.Tensor, d: int) -> torch.Tensor:
    """The public version's lag with its torch.roll (which wraps the end to the start) made a causal shift."""
    return F.pad(x, (d, 0))[..., : x.shape[-1]]


def _public_gate(cond, x, y):
    mask = (cond > 0).float()
    return mask * x + (1.0 - mask) * y


# The public version's own spelling of the ops it gets right, lags made causal; the rest (JUMP, whose public
# z-score reads the whole sample, and the arithmetic) are ours. Same values as OPS_CONFIG.
PUBLIC_OPS = {"GATE": _public_gate, "DELAY1": lambda x: _public_delay(x, 1),
              "DECAY": lambda x: x + 0.8 * _public_delay(x, 1) + 0.6 * _public_delay(x, 2),
              "MAX3": lambda x: torch.max(x, torch.max(_public_delay(x, 1), _public_delay(x, 2)))}


SCORE_TOLERANCE = 1e-4   # |a - b| <= tol * (1 + |b|): float32 sums of the same terms in another order


def score_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| / (1 + |b|) over two score vectors (0 when they agree exactly)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs() / (1 + b.abs())).max().item() if len(b) else 0.0


def public_loop_scores(engine: "AlphaEngine", tokens: torch.Tensor, data: MarketData) -> torch.Tensor:
    """The public version's evaluation, re-implemented for the bench: one formula at a time, a Python stack VM
    over the features with the public ops (PUBLIC_OPS) that cleans every pushed value again (features included),
    then that formula's own backtest: positions, turnover cost, pnl per bar, its score per token and the median.
    Same scores as ours."""
    ops = [(PUBLIC_OPS.get(name, fn), arity) for name, fn, arity in OPS_CONFIG]
    K, end = engine.vocab.n_feat, engine.vocab.end
    bt = engine.backtest
    liq, ret = data.liquidity, data.target
    scores = []
    for formula in tokens.tolist():
        stack, ok = [], True
        for tok in formula:
            if tok == end:
                break
            if tok < K:
                stack.append(clean_values(data.feat[tok]))
                continue
            fn, arity = ops[tok - K]
            if len(stack) < arity:
                ok = False
                break
            args = stack[len(stack) - arity:]
            del stack[len(stack) - arity:]
            stack.append(clean_values(fn(*args)))
        if not ok or len(stack) != 1:
            scores.append(INVALID_REWARD)
            continue
        f = data.scored(stack[0])
        if f.std() < DEGENERATE_STD:
            scores.append(DEGENERATE_REWARD)
            continue
        pos = ((f > bt.entry_logit) & (liq > bt.min_liquidity)).float()         # sigmoid(f) > entry, as a logit
        prev = F.pad(pos, (1, 0))[:, :-1]
        cost = (pos - prev).abs() * (bt.base_fee + (bt.trade_size_usd / liq).clamp(max=0.05))
        pnl = pos * ret - cost
        score = ((pos * ret).sum(-1) - cost.sum(-1)) - bt.drawdown_penalty * (pnl < -bt.drawdown_threshold).sum(-1)
        trades = ((pos > 0) & (prev == 0)).sum(-1)
        score = torch.where(trades < bt.min_trades, torch.full_like(score, bt.inactive_score), score)
        scores.append(score.median().item())
    return torch.tensor(scores)


def bench_training(cfg: AlphaConfig, frame: MarketFrame, steps: int, n_one_by_one: int) -> None:
    """Formulas per second in training: `steps` real training steps from a fresh policy, timing only their
    scoring (score_formulas: node sharing within a batch and the score cache across steps count), against the
    public loop on n_one_by_one formulas drawn evenly from the same batches, their scores checked equal to the
    rewards training got."""
    seed_everything(cfg.seed)                                   # the trajectory of a run with this seed
    engine = AlphaEngine(cfg, frame)
    data, inner, batches = engine.train_data, engine.score_formulas, []

    def timed_scoring(tokens, on):
        start = time.perf_counter()
        rewards, usable = inner(tokens, on)
        batches.append((tokens, rewards, time.perf_counter() - start))
        return rewards, usable

    engine.score_formulas = timed_scoring
    for _ in tqdm(range(steps), desc="bench: training steps", leave=False):
        engine.train_step()
    tokens = torch.cat([b[0] for b in batches])
    rewards = torch.cat([b[1] for b in batches]).cpu()
    pick = torch.linspace(0, len(tokens) - 1, min(n_one_by_one, len(tokens))).long()
    t_one = float(np.median([time_calls(lambda: public_loop_scores(engine, tokens[pick], data), engine.device, 1,
                                        warmup=0)[0] for _ in range(3)]))
    diff = score_mismatch(public_loop_scores(engine, tokens[pick], data), rewards[pick])
    t_ours = sum(b[2] for b in batches)
    rate_b, rate_1 = len(tokens) / t_ours, len(pick) / t_one
    stats = engine.cache_stats()
    print(f"in training, {steps} steps x {cfg.batch_size} formulas from a fresh policy (scoring time only; "
          f"score cache hit rate {stats['hit_rate']:.1%}):")
    print(f"  training's scoring    : {len(tokens):5d} formulas in {t_ours:7.2f} s = {rate_b:9.1f} formulas/s")
    print(f"  public one-by-one loop: {len(pick):5d} of them in {t_one:7.2f} s = {rate_1:9.1f} formulas/s")
    print(f"  speed-up   : {rate_b / rate_1:.1f}x   (max relative score difference {diff:.1e})")
    if diff > SCORE_TOLERANCE:
        raise AlphaError(f"bench: training's rewards and the public loop disagree (max relative difference {diff:.1e})")


def bench(cfg: AlphaConfig, n_formulas: int, n_one_by_one: int, train_steps: int = 0) -> None:
    """Formulas scored per second: training's default evaluation (AlphaEngine.score_formulas: the device's
    fastest batched VM path + the vectorised backtest, its cache emptied first) vs the public version's loop
    (public_loop_scores: one formula at a time), on the same synthetic data and formulas, scores checked equal;
    then Postgres load time, COPY TO STDOUT vs SELECT + fetchall, on the same synthetic market in a scratch
    schema."""
    if not 1 <= n_one_by_one <= n_formulas or train_steps < 0:
        raise AlphaError("--bench-one-by-one must be in [1, --bench-formulas], --bench-train-steps >= 0")
    frame, report = clean_market(synthetic_market(cfg.synthetic_tokens, cfg.synthetic_bars, cfg.seed))
    print(f"synthetic market (seed {cfg.seed}) | {report}")
    engine = AlphaEngine(cfg, frame)
    data = engine.train_data
    gen = torch.Generator(device=engine.device).manual_seed(cfg.seed)
    tokens = sample_formulas(engine.vocab, cfg.max_formula_len, n_formulas, engine.device, generator=gen)
    engine.score_formulas(tokens[: cfg.eval_chunk], data)                          # warm-up
    public_loop_scores(engine, tokens[:2], data)
    subset = tokens[:n_one_by_one]
    out = {}  # what the timed calls computed

    def batched():
        engine.score_cache.clear()
        out["batched"] = engine.score_formulas(tokens, data)[0]

    def one_by_one():
        out["one_by_one"] = public_loop_scores(engine, subset, data)

    # alternated, median of 3 each: a busy neighbour on a shared machine slows one call, not the ratio
    times = [[time_calls(fn, engine.device, 1, warmup=0)[0] for fn in (batched, one_by_one)] for _ in range(3)]
    t_batched, t_one = np.median(np.array(times), axis=0).tolist()
    diff = score_mismatch(out["batched"][:n_one_by_one], out["one_by_one"])
    rate_b, rate_1 = n_formulas / t_batched, len(subset) / t_one
    K, N, T = data.feat.shape
    path = ("batched groups (evaluate_unique)" if engine.device.type == "cuda" else
            "memoised walk streamed into the backtest (stream_memo)")
    print(f"formula evaluation on {N} tokens x {T} bars ({T - data.start} scored), {engine.device}, "
          f"{torch.get_num_threads()} threads, max_formula_len {cfg.max_formula_len}, eval_chunk {cfg.eval_chunk}")
    print(f"  training's default    : {n_formulas:5d} formulas in {t_batched:7.2f} s = {rate_b:9.1f} formulas/s"
          f"   ({path}, score cache emptied first)")
    print(f"  public one-by-one loop: {len(subset):5d} formulas in {t_one:7.2f} s = {rate_1:9.1f} formulas/s")
    same = "equal scores" if diff <= SCORE_TOLERANCE else "SCORES DIFFER"
    print(f"  speed-up   : {rate_b / rate_1:.1f}x   ({same} on the {len(subset)} formulas both scored: "
          f"max relative difference {diff:.1e})")
    if diff > SCORE_TOLERANCE:
        raise AlphaError(f"bench: the two evaluations disagree (max relative score difference {diff:.1e})")
    if train_steps:
        bench_training(cfg, frame, train_steps, n_one_by_one)
    dsn = resolve_dsn(cfg)
    if not dsn:
        print("postgres: skipped (no --db and no DB_* variables)")
        return
    try:
        conn = connect(dsn)
    except AlphaError as exc:
        print(f"postgres: skipped ({exc})")
        return
    schema = f"alphagpt_bench_{uuid.uuid4().hex[:12]}"
    try:
        init_schema(conn, schema)
        ingest_csv(conn, schema, frame_to_csv(frame), "synthetic market")
        times = {}
        for use_copy in (True, False):
            load = lambda: load_frame(conn, schema, len(frame.addresses), use_copy)
            times[use_copy] = min(time_calls(load, torch.device("cpu"), 3, warmup=0))
            if not np.array_equal(load()[0].values, frame.values):
                raise AlphaError("bench: the frame loaded from Postgres differs from the one written")
        rows = len(frame.addresses) * len(frame.times)
        print(f"postgres load of {rows} candles ({len(frame.addresses)} tokens), best of 3, pivot included:")
        print(f"  COPY TO STDOUT   : {times[True]:.3f} s")
        print(f"  SELECT fetchall  : {times[False]:.3f} s")
        print(f"  speed-up         : {times[False] / times[True]:.1f}x")
    finally:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute(_sql("DROP SCHEMA IF EXISTS {s} CASCADE", schema))
        conn.commit()
        conn.close()


# -----------------------------------------------------------------------------
# CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one error line (the full usage is in --help)."""

    def error(self, message):
        self.exit(2, f"alphagpt: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="AlphaGPT: formula search with a transformer policy, a stack VM, a meme-coin backtest and "
                    "REINFORCE. With no database configured it trains on a built-in synthetic market; outputs go "
                    "to --out-dir.",
        epilog="Modes: plain run = train; --init-db / --ingest / --seed-synthetic write to the database; "
               "--eval-formula and --bench only read. CSV for --ingest: header address,time,open,high,low,close"
               "[,volume,liquidity,fdv,buy_volume,sell_volume,symbol], time as --time-format says; re-running it "
               "adds no duplicates.")
    parser.add_argument("--init-db", action="store_true", help="create the schema, tables and indexes, then exit")
    parser.add_argument("--ingest", metavar="FILE.csv", help="COPY-load OHLCV rows from a CSV (idempotent), then exit; "
                        "refused, with nothing loaded, when prices break high >= max(open, close) >= min(open, close) "
                        ">= low > 0, when the file gives one (address, time) different values, or when it differs "
                        "from rows already stored (see --upsert)")
    parser.add_argument("--upsert", action="store_true", help="with --ingest: replace stored rows that the file "
                        "gives other values (corrected data), in the file's columns")
    parser.add_argument("--time-format", choices=sorted(TIME_FORMATS), default="iso", help="with --ingest: the time "
                        "column's spelling: iso (ISO 8601, e.g. 2024-01-31T09:30:00Z; UTC unless it gives an offset), "
                        "unix_s or unix_ms (epoch seconds / milliseconds); other spellings such as 01/02/2024 are "
                        "refused as ambiguous (default: iso)")
    parser.add_argument("--seed-synthetic", action="store_true", help="write the synthetic market (--synthetic-tokens, "
                        "--synthetic-bars, --seed) into the database, then exit")
    parser.add_argument("--eval-formula", metavar="FILE", help="score a saved best_meme_strategy.json on the data "
                        "(full period, train part, held-out part): the report table, FILE_equity.png (the equity "
                        "curve against buy-and-hold, with matplotlib) and the JSON, then exit")
    parser.add_argument("--bench", action="store_true", help="print formulas/s of training's default evaluation vs "
                        "the public version's one-by-one loop (synthetic market, 100 tokens x 2000 bars unless "
                        "--synthetic-tokens / --synthetic-bars say otherwise), and Postgres COPY vs SELECT load "
                        "time when a DB is configured, then exit")
    parser.add_argument("--bench-formulas", type=int, default=512, help="formulas scored batched in --bench")
    parser.add_argument("--bench-one-by-one", type=int, default=128, help="formulas scored one by one in --bench")
    parser.add_argument("--bench-train-steps", type=int, default=AlphaConfig.train_steps,
                        help="training steps from a fresh policy whose scoring --bench also times against the public "
                             "loop (default: a default run's %(default)s; 0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt (flags given now "
                        "override the checkpoint's config; its DSN is stored without the password, so give --db "
                        "again if the database needs one)")
    add_config_flags(parser, AlphaConfig, helps=FIELD_HELP,
                     choices={"factors": sorted(FACTOR_SETS), "mixed_frequency": list(MIXED_FREQUENCY)})
    return parser


def run_db_commands(cfg: AlphaConfig, args: argparse.Namespace) -> None:
    dsn = resolve_dsn(cfg)
    if not dsn:
        raise AlphaError("--init-db / --ingest / --seed-synthetic need --db or the DB_HOST / DB_NAME variables")
    if args.ingest and not Path(args.ingest).is_file():
        raise AlphaError(f"{args.ingest}: CSV file not found")
    conn = connect(dsn)
    try:
        init_schema(conn, cfg.db_schema)
        print(f"schema {cfg.db_schema} ready at {mask_secret(dsn, dsn)}")
        if args.ingest:
            try:
                with open(args.ingest, newline="", encoding="utf-8") as f:
                    n_rows, n_new = ingest_csv(conn, cfg.db_schema, f, args.ingest, args.upsert, args.time_format)
            except UnicodeDecodeError as exc:
                raise AlphaError(f"{args.ingest}: not UTF-8 text (byte {exc.start}); nothing was loaded") from None
            written = "inserted or updated" if args.upsert else "inserted"
            print(f"ingest {args.ingest}: {n_rows} rows read, {n_new} {written}, {n_rows - n_new} identical to a "
                  "stored or an earlier row")
        if args.seed_synthetic:
            frame = synthetic_market(cfg.synthetic_tokens, cfg.synthetic_bars, cfg.seed)
            n_rows, n_new = ingest_csv(conn, cfg.db_schema, frame_to_csv(frame), "synthetic market")
            print(f"synthetic market: {len(frame.addresses)} tokens, {n_rows} rows, {n_new} inserted")
    finally:
        conn.close()


def eval_formula(cfg: AlphaConfig, path: str) -> dict:
    try:
        saved = json.loads(Path(path).read_text())
        names, factors = list(saved["tokens"]), saved.get("factors", cfg.factors)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AlphaError(f"{path}: not a best_meme_strategy.json ({exc})") from None
    frame, report = load_market(cfg)
    print(report)
    engine = AlphaEngine(dataclasses.replace(cfg, factors=factors), frame)
    ids = engine.vocab.encode(names)
    result = {"formula": engine.vocab.infix(ids), "factors": factors, "split": engine.split_info(),
              "full": engine.split_report(ids, engine.data), **engine.report(ids)}
    print(report_table(result))
    print(plot_equity(engine, ids, Path(path).with_name(Path(path).stem + "_equity.png")))
    print(json.dumps(result, indent=2))
    return result


def train(cfg: AlphaConfig, explicit: dict, resume: bool) -> dict:
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = None
    if resume:
        ckpt, saved_cfg = load_checkpoint(ckpt_path, AlphaConfig)
        cfg = dataclasses.replace(saved_cfg, **explicit)
    elif ckpt_path.exists():
        raise AlphaError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    seed_everything(cfg.seed)
    frame, report = load_market(cfg)
    print(report)
    engine = AlphaEngine(cfg, frame)
    if ckpt is not None:
        engine.load_state(ckpt)
    print(f"train bars {engine.split}, held-out bars {len(engine.times) - engine.split} (from "
          f"{engine.split_info()['split_time']}), features {engine.vocab.features}, device {engine.device}")
    if engine.constant_features:
        print(f"left out of the formulas, constant over the whole market: {', '.join(engine.constant_features)}")
    best = engine.train(out_dir)
    if best["test"] is None:
        print(f"no valid, non-degenerate formula found; outputs written to {out_dir}")
    else:
        print(f"best formula: {best['formula']}\n{report_table(best)}\nwritten to "
              f"{out_dir / 'best_meme_strategy.json'}")
    return best


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    explicit = given_flags(args, AlphaConfig)
    db_errors: tuple = ()
    try:
        import psycopg2
        db_errors = (psycopg2.Error,)
    except ImportError:
        pass
    try:
        cfg = AlphaConfig(**explicit)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if (args.upsert or args.time_format != "iso") and not args.ingest:
            raise AlphaError("--upsert and --time-format apply to --ingest only")
        if args.init_db or args.ingest or args.seed_synthetic:
            run_db_commands(cfg, args)
        elif args.bench:
            sizes = {k: v for k, v in BENCH_MARKET.items() if k not in explicit}   # the issue's size unless given
            bench(dataclasses.replace(cfg, **sizes), args.bench_formulas, args.bench_one_by_one,
                  args.bench_train_steps)
        elif args.eval_formula:
            eval_formula(cfg, args.eval_formula)
        else:
            train(cfg, explicit, args.resume)
    except (ValueError, OSError, *db_errors) as exc:
        message = mask_secret(" ".join(str(exc).split()), explicit.get("db", ""))
        raise SystemExit(f"alphagpt: error: {message}") from None


if __name__ == "__main__":
    main()
