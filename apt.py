"""
APT: a microkernel trainer for small GPTs. The core (profiles, the provider registry, schedules, the model
builder, the training loop with hook broadcast, checkpoints, perplexity, generation) runs with no plugin at all;
everything optional (MoE routing, an alignment loss, route-temperature annealing, retrieval, voting, other
attention kernels, int8 inference) is a plugin or a provider chosen by name in a YAML profile.

    python apt.py train -p tiny_debug                    # a few minutes on a CPU, on the built-in corpus
    python apt.py train -p base                          # the default TVA attention and FFN, no plugins
    python apt.py train -p gpt5_moe_reasoning            # MoE from epoch 2, alignment loss from epoch 3
    python apt.py train -p base --plugins moe align flash_attn
    python apt.py plugin list [--kind attention]
    python apt.py plugin enable moe --profile apt_profiles/base.yaml     # persisted, comments kept
    python apt.py generate --ckpt runs/apt-tiny_debug/ckpt.pt --prompt "def " --plugins retriever voter
    python apt.py eval --ckpt runs/apt-tiny_debug/ckpt.pt --plugins quant
    python apt.py --bench

Words used below. A *provider* is a named, versioned factory of one kind (attention, ffn, router, align,
retrieval, dataset) that the registry hands out by name; a name that is not registered falls back to the
kind's default with one warning (--strict makes that an error). A *plugin* is a provider of kind "plugin": a
bundle of hooks the trainer and the generator broadcast to. A plugin that fails to import, or raises in a
hook, is switched off with one log line and the run goes on. Third-party plugins are Python files in a plugin
folder (--plugin-dir, the profile's plugin_dirs) or packages exposing the entry-point group "apt.plugins";
either defines register(registry) or registers on import (`import apt` returns this module).
"""

from __future__ import annotations

import argparse
import codecs
import copy
import difflib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (MetricsLogger, atomic_save, atomic_write_bytes, bf16_autocast, builtin_corpus_files, cosine_lr,
                    pick_device, read_checkpoint, sample_next, seed_everything, time_calls)

sys.modules.setdefault("apt", sys.modules[__name__])  # a plugin's `import apt` gets this module, not a second copy

log = logging.getLogger("apt")
PROFILE_DIR = Path(__file__).resolve().parent / "apt_profiles"
EOT = 256                                               # the byte tokenizer's end-of-text id

# -----------------------------------------------------------------------------
# profiles: the core's own keys and their defaults (providers and plugins declare theirs)

CORE_DEFAULTS: dict = {
    "plugins": [],                                      # plugins switched on, by name
    "plugin_dirs": [],                                  # folders of plugin files (*.py), relative to the profile
    "out_dir": "",                                      # '' = runs/apt-PROFILE
    "model": {
        "attention_name": "tva_default", "ffn_name": "default", "router_name": "topk_default",
        "align_name": "bistate_default",
        "vocab_size": 257, "d_model": 256, "num_heads": 4, "num_layers": 4, "d_ff": 1024, "block_size": 256,
        "dropout": 0.0,
    },
    "data": {"provider": "text_default", "val_fraction": 0.05},
    "training": {
        "max_epochs": 3, "steps_per_epoch": 200, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4,
        "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0, "eval_batches": 16, "ckpt_every": 100,
        "seed": 1337, "device": "auto",
    },
    "schedules": {},                                    # enable_NAME_at_epoch: N, PARAM: {start, end, by}
    "generation": {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 0.95},
}


class ProfileError(ValueError):
    """A profile (or a --set override) that the core refuses; the message names the file and the key."""


def _type_name(value: object) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def check_value(value: object, default: object, where: str) -> object:
    """value if it has the default's type (an integer is a number too), else ProfileError."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ProfileError(f"{where} must be {_type_name(default)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"{where} must be finite, got {value}")
    return value


def check_keys(given: dict, defaults: dict, where: str) -> None:
    """Refuse keys defaults does not have (with the nearest known name) and values of the wrong type."""
    if not isinstance(given, dict):
        raise ProfileError(f"{where or 'the profile'} must be a mapping, got {given!r}")
    for key, value in given.items():
        if key not in defaults:
            near = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(map(str, defaults))})"
            raise ProfileError(f"unknown key {where + '.' if where else ''}{key}{hint}")
        if not isinstance(defaults[key], dict):
            check_value(value, defaults[key], f"{where + '.' if where else ''}{key}")


def merge_core(given: dict, defaults: dict, where: str, open_keys: Callable[[str], dict | None]) -> dict:
    """defaults overlaid with given, checked key by key. A key that is not a core key may still be a
    provider's or plugin's own section: open_keys(path) returns its known keys (or None if it is not one)."""
    if not isinstance(given, dict):
        raise ProfileError(f"{where or 'the profile'} must be a mapping, got {given!r}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = f"{where}.{key}" if where else str(key)
        if key in defaults and isinstance(defaults[key], dict) and key != "schedules":
            out[key] = merge_core(value, defaults[key], path, open_keys)
        elif key in defaults:
            out[key] = check_value(value, defaults[key], path)
            if isinstance(value, list):
                out[key] = [check_value(v, "", f"{path}[{i}]") for i, v in enumerate(value)]
        elif (section := open_keys(path)) is not None:
            check_keys(value, section, path)
            out[key] = copy.deepcopy(value)
        else:
            check_keys({key: value}, defaults, where)
    return out


def yaml_load(text: str, source: str) -> dict:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as exc:
        raise ProfileError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a mapping of sections, got {type(data).__name__}")
    return data


def profile_path(name_or_path: str) -> Path:
    """A profile by name (apt_profiles/NAME.yaml) or by path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = PROFILE_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else name_or_path}.yaml"
    if named.is_file() and (len(path.parts) == 1 or path.parent.name in ("profiles", "apt_profiles")):
        return named
    known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
    raise ProfileError(f"profile {name_or_path!r} not found (a path to a .yaml file, or one of: {known})")


def read_profile(name_or_path: str) -> tuple[dict, str]:
    """(raw mapping, its name) of a profile file; nothing is checked yet (see resolve_profile), but its
    plugin_dirs are made absolute (they are relative to the file)."""
    path = profile_path(name_or_path)
    raw = yaml_load(path.read_text(encoding="utf-8"), str(path))
    dirs = raw.get("plugin_dirs")
    if isinstance(dirs, list):
        raw["plugin_dirs"] = [str((path.parent / d).resolve()) if isinstance(d, str) else d for d in dirs]
    return raw, path.stem


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], object]]:
    """--set a.b=VALUE pairs as (key path, YAML-parsed value)."""
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ProfileError(f"--set {pair!r}: expected SECTION.KEY=VALUE, e.g. training.lr=3e-4")
        out.append((key.split("."), yaml_load(f"v: {text}", f"--set {pair}")["v"]))
    return out


def apply_overrides(raw: dict, overrides: list[tuple[list[str], object]]) -> dict:
    raw = copy.deepcopy(raw)
    for keys, value in overrides:
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ProfileError(f"--set {'.'.join(keys)}: {key} is not a section")
        node[keys[-1]] = value
    return raw


# -----------------------------------------------------------------------------
# core: providers and the registry

class Provider:
    """A named, versioned factory the registry hands out. `defaults` lists every config key it takes (with
    its type), `config_section` says where its config lives in a profile (a model.SECTION mapping, the data
    section, or a plugin's top-level section). Unknown keys and wrong types are refused by validate_config."""

    name = "provider"
    version = "1.0.0"
    defaults: dict = {}
    config_section: tuple[str, ...] = ()

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.validate_config(config)
        self.config = {**copy.deepcopy(self.defaults), **config}

    def validate_config(self, config: dict) -> bool:
        where = ".".join(self.config_section) or self.name
        check_keys(config, self.defaults, where)
        for key, value in config.items():
            check_value(value, self.defaults[key], f"{where}.{key}")
        return True


class Registry:
    """Providers by kind and name. get() falls back to the kind's default (logged once) when a name is not
    registered, so a profile asking for an unavailable kernel still trains; strict=True makes that an error.
    get() returns a new instance each call: a provider is configured by its profile section, and one shared
    instance would hand one caller's config to the next."""

    DEFAULTS = {"attention": "tva_default", "ffn": "default", "router": "topk_default",
                "align": "bistate_default", "retrieval": "none", "dataset": "text_default"}
    KINDS = (*DEFAULTS, "plugin")

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._providers: dict[str, dict[str, type[Provider]]] = {kind: {} for kind in self.KINDS}
        self._warned: set[str] = set()
        self._loaded: set[str] = set()                  # plugin files and entry points already imported

    def register(self, kind: str, name: str, provider_cls: type[Provider]) -> type[Provider]:
        if kind not in self._providers:
            raise ValueError(f"unknown provider kind {kind!r} (kinds: {', '.join(self.KINDS)})")
        if not (isinstance(provider_cls, type) and issubclass(provider_cls, Provider)):
            raise TypeError(f"{kind}:{name}: a provider must be a subclass of apt.Provider, got {provider_cls!r}")
        old = self._providers[kind].get(name)
        if old is not None and old is not provider_cls:
            log.warning("%s:%s re-registered: %s replaces %s", kind, name, provider_cls.__qualname__,
                        old.__qualname__)
        self._providers[kind][name] = provider_cls
        return provider_cls

    def resolve(self, kind: str, name: str, fallback: bool = True) -> str:
        """The name get() will use: name if registered, else the kind's default (warned once)."""
        if kind not in self._providers:
            raise ValueError(f"unknown provider kind {kind!r} (kinds: {', '.join(self.KINDS)})")
        if name in self._providers[kind]:
            return name
        default = self.DEFAULTS.get(kind)
        known = ", ".join(self._providers[kind]) or "none"
        if self.strict or not fallback or default not in self._providers[kind]:
            raise ValueError(f"{kind}:{name} is not registered (registered: {known})")
        if f"{kind}:{name}" not in self._warned:
            self._warned.add(f"{kind}:{name}")
            log.warning("%s:%s is not registered (registered: %s); falling back to %s", kind, name, known, default)
        return default

    def provider_class(self, kind: str, name: str, fallback: bool = True) -> type[Provider]:
        return self._providers[kind][self.resolve(kind, name, fallback)]

    def get(self, kind: str, name: str, config: dict | None = None) -> Provider:
        name = self.resolve(kind, name)
        provider = self._providers[kind][name](config)
        provider.name = name                            # the name it is registered under, in logs and checkpoints
        return provider

    def classes(self, kind: str) -> list[type[Provider]]:
        """Every provider class registered under kind."""
        return list(self._providers[kind].values())

    def list_providers(self, kind: str | None = None) -> list[str] | dict[str, list[str]]:
        if kind is not None:
            if kind not in self._providers:
                raise ValueError(f"unknown provider kind {kind!r} (kinds: {', '.join(self.KINDS)})")
            return sorted(self._providers[kind])
        return {k: sorted(v) for k, v in self._providers.items()}

    def sections(self) -> dict[tuple[str, ...], dict]:
        """Every profile section a provider or plugin owns, with the union of its owners' keys."""
        out: dict[tuple[str, ...], dict] = {}
        for kind, providers in self._providers.items():
            for name, cls in providers.items():
                section = (name,) if kind == "plugin" else cls.config_section
                if section:
                    out.setdefault(section, {}).update(cls.defaults)
        return out


registry = Registry()


def register(kind: str, name: str) -> Callable[[type[Provider]], type[Provider]]:
    """Class decorator: register the class in the global registry under kind:name."""
    def deco(cls: type[Provider]) -> type[Provider]:
        cls.name = name
        return registry.register(kind, name, cls)
    return deco


def resolve_profile(raw: dict, reg: Registry, source: str) -> dict:
    """The core defaults overlaid with raw, every key checked: core keys against CORE_DEFAULTS, a provider's
    or plugin's section against its owners' keys (they fill their own defaults when built), the data section's
    other keys against the selected dataset provider, schedules against the plugins."""
    sections = reg.sections()
    try:
        raw = copy.deepcopy(raw)
        data = raw.get("data", {})
        if not isinstance(data, dict):
            raise ProfileError(f"data must be a mapping, got {data!r}")
        dataset_cls = reg.provider_class("dataset", str(data.get("provider", CORE_DEFAULTS["data"]["provider"])),
                                         fallback=False)            # data is never silently substituted
        # the selected dataset's keys are checked; another dataset's keys (a profile's data.path after
        # --set data.provider=sql) are dropped with a note; anything else is an unknown key
        other = {k: v for kind_cls in reg.classes("dataset") for k, v in kind_cls.defaults.items()}
        own = {key: data.pop(key) for key in list(data)
               if key in dataset_cls.defaults and key not in CORE_DEFAULTS["data"]}
        unused = [key for key in list(data) if key in other and key not in CORE_DEFAULTS["data"]]
        for key in unused:
            del data[key]
        if unused:
            log.info("data: %s not used by the %s dataset", ", ".join(unused), dataset_cls.name)
        profile = merge_core(raw, CORE_DEFAULTS, "", lambda path: sections.get(tuple(path.split("."))))
        for key, value in own.items():
            profile["data"][key] = check_value(value, dataset_cls.defaults[key], f"data.{key}")
        check_schedules(profile["schedules"], reg)
        check_ranges(profile)
        for kind, name_key in (("attention", "attention_name"), ("ffn", "ffn_name"), ("router", "router_name"),
                               ("align", "align_name")):        # range checks now, not when first used
            cls = reg.provider_class(kind, profile["model"][name_key])
            cls(profile["model"].get(cls.config_section[-1], {}) if cls.config_section else {})
        for name in reg.list_providers("plugin"):
            if name in profile:
                reg.get("plugin", name, profile[name])
    except (ProfileError, ValueError) as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return profile


def check_ranges(profile: dict) -> None:
    m, t = profile["model"], profile["training"]
    positive = [("model.d_model", m["d_model"]), ("model.num_heads", m["num_heads"]),
                ("model.num_layers", m["num_layers"]), ("model.d_ff", m["d_ff"]), ("model.block_size", m["block_size"]),
                ("training.max_epochs", t["max_epochs"]), ("training.batch_size", t["batch_size"]),
                ("training.ckpt_every", t["ckpt_every"]), ("training.lr", t["lr"])]
    for where, value in positive:
        if value <= 0:
            raise ProfileError(f"{where} must be > 0, got {value}")
    if m["d_model"] % m["num_heads"]:
        raise ProfileError(f"model.d_model ({m['d_model']}) must be a multiple of model.num_heads ({m['num_heads']})")
    if m["vocab_size"] < EOT + 1:
        raise ProfileError(f"model.vocab_size must be >= {EOT + 1} (256 bytes and end-of-text), got {m['vocab_size']}")
    if not 0.0 <= m["dropout"] < 1.0:
        raise ProfileError(f"model.dropout must be in [0, 1), got {m['dropout']}")
    if not 0.0 < profile["data"]["val_fraction"] < 1.0:
        raise ProfileError(f"data.val_fraction must be in (0, 1), got {profile['data']['val_fraction']}")
    for key in ("steps_per_epoch", "warmup_steps", "eval_batches", "min_lr", "weight_decay", "grad_clip", "seed"):
        if t[key] < 0:
            raise ProfileError(f"training.{key} must be >= 0 (grad_clip 0 = no clipping), got {t[key]}")
    if t["min_lr"] > t["lr"]:
        raise ProfileError(f"training.min_lr ({t['min_lr']}) must be <= training.lr ({t['lr']})")


# -----------------------------------------------------------------------------
# core: schedules

class Schedule:
    """Curriculum from the profile's schedules section: `enable_NAME_at_epoch: N` switches plugin NAME on at
    the start of epoch N (epochs count from 1; default 1), and `PARAM: {start, end, by: epoch|step}` anneals
    PARAM linearly from start (first epoch / step 0) to end (last epoch / last step); a plain number is a
    constant."""

    def __init__(self, schedules: dict, max_epochs: int, total_steps: int):
        self.schedules, self.max_epochs, self.total_steps = schedules, max_epochs, total_steps

    def enable_epoch(self, plugin: str) -> int:
        return self.schedules.get(f"enable_{plugin}_at_epoch", 1)

    def should_enable_plugin(self, plugin: str, epoch: int) -> bool:
        return epoch >= self.enable_epoch(plugin)

    def value(self, param: str, epoch: int, step: int, default: float) -> float:
        cfg = self.schedules.get(param)
        if cfg is None:
            return default
        if not isinstance(cfg, dict):
            return float(cfg)
        if cfg.get("by", "epoch") == "epoch":
            t = (epoch - 1) / max(self.max_epochs - 1, 1)
        else:
            t = step / max(self.total_steps - 1, 1)
        t = min(max(t, 0.0), 1.0)
        return cfg["start"] + (cfg["end"] - cfg["start"]) * t


def check_schedules(schedules: dict, reg: Registry) -> None:
    plugins = reg.list_providers("plugin")
    annealable = {p: low for cls in reg.classes("plugin") for p, low in cls.schedulable.items()}
    for key, value in schedules.items():
        where = f"schedules.{key}"
        if (match := re.fullmatch(r"enable_(\w+)_at_epoch", str(key))) is not None:
            if match[1] not in plugins:
                near = difflib.get_close_matches(match[1], plugins, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ProfileError(f"{where}: no plugin named {match[1]!r}{hint}")
            if type(value) is not int or value < 1:
                raise ProfileError(f"{where} must be an epoch number >= 1 (epochs count from 1), got {value!r}")
        elif key in annealable:
            if isinstance(value, dict):
                check_keys(value, {"start": 0.0, "end": 0.0, "by": "epoch"}, where)
                if "start" not in value or "end" not in value:
                    raise ProfileError(f"{where} needs both start and end")
                if value.get("by", "epoch") not in ("epoch", "step"):
                    raise ProfileError(f"{where}.by must be 'epoch' or 'step', got {value['by']!r}")
                values = [check_value(value[k], 0.0, f"{where}.{k}") for k in ("start", "end")]
            else:
                values = [check_value(value, 0.0, where)]
            if min(values) < annealable[key]:
                raise ProfileError(f"{where} must stay >= {annealable[key]:g}, got {value}")
        else:
            known = sorted(annealable) + [f"enable_{p}_at_epoch" for p in plugins]
            near = difflib.get_close_matches(str(key), known, n=1)
            raise ProfileError(f"unknown key {where}" + (f" (did you mean {near[0]!r}?)" if near else
                                                          f" (annealable: {', '.join(sorted(annealable))})"))


# -----------------------------------------------------------------------------
# providers: attention

class CausalSelfAttention(nn.Module):
    """Shared frame of every attention layer: one qkv projection, attend() per head, the output projection
    W_o. attend maps q, k, v (B, H, T, dh) to (B, H, T, dh) causally."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, dh)
        y = self.attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class SDPAAttentionLayer(CausalSelfAttention):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self._dropout_p(), is_causal=True)


class TVAAttentionLayer(CausalSelfAttention):
    """Attention inside a learned rank-r subspace of each head ("tri-vein attention").

    Per head h, a projector pair V_h: dh -> r and U_h: r -> dh (orthonormal at init, U = V^T):
        A = softmax((Q V_h)(K V_h)^T / sqrt(r) + causal mask),   y_h = U_h(A (V V_h)),   Y = W_o concat_h y_h.
    With one head this is V: d -> r, U: r -> d as the seed writes it; with H heads every head has its own
    plane, so it is correct for any head count. The scores cost r instead of dh per pair.

    The normal compensator gives back what the plane loses: where a value's off-plane residual
    eps = ||v - U V v|| / ||v|| exceeds tau, y_h += sum_j alpha_j n_j (m_j . v), alpha = 0.5 sigmoid(g_j . v),
    with s learned direction pairs (m_j, n_j) per head; n starts at 0, so training starts from pure TVA.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, r: int, s: int, tau: float):
        super().__init__(d_model, num_heads, dropout)
        H, dh = num_heads, self.head_dim
        if not 1 <= r <= dh:
            raise ValueError(f"tva.r must be in [1, head width {dh}], got {r}")
        if s < 0:
            raise ValueError(f"tva.s must be >= 0, got {s}")
        self.r, self.s, self.tau = r, s, tau
        basis = torch.linalg.qr(torch.randn(H, dh, r))[0]                 # (H, dh, r), orthonormal columns
        self.V = nn.Parameter(basis.clone())
        self.U = nn.Parameter(basis.transpose(1, 2).clone())              # (H, r, dh)
        self.m = nn.Parameter(torch.randn(H, dh, s) / math.sqrt(dh))
        self.n = nn.Parameter(torch.zeros(H, s, dh))
        self.g = nn.Parameter(torch.zeros(H, dh, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Q V_h = x (W_q,h V_h): the projector is folded into the query and key weights, so q and k are
        # computed at width r and never at dh (the same numbers, fewer FLOPs); v is needed at full width
        B, T, D = x.shape
        H, dh, r = self.num_heads, self.head_dim, self.r
        if not isinstance(self.qkv, nn.Linear):         # replaced (int8 quant): project after it
            q, k, v = self.qkv(x).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
            return self.proj(self.attend_in_plane(q @ self.V, k @ self.V, v).transpose(1, 2).reshape(B, T, D))
        w_q, w_k, w_v = self.qkv.weight.view(3, H, dh, D).unbind(0)
        qk = x @ torch.cat([torch.einsum("hdr,hdD->hrD", self.V, w) for w in (w_q, w_k)]).reshape(2 * H * r, D).t()
        q, k = qk.view(B, T, 2, H, r).permute(2, 0, 3, 1, 4)                 # (B, H, T, r)
        v = (x @ w_v.reshape(H * dh, D).t()).view(B, T, H, dh).transpose(1, 2)   # (B, H, T, dh)
        y = self.attend_in_plane(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def attend_in_plane(self, qp: torch.Tensor, kp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        vp = v @ self.V                                                    # (B, H, T, r)
        a = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=self._dropout_p(), is_causal=True)
        y = a @ self.U                                                     # (B, H, T, dh)
        if self.s:
            eps = (v - vp @ self.U).norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-6)   # (B, H, T)
            alpha = 0.5 * torch.sigmoid(v @ self.g)                        # (B, H, T, s)
            y = y + (eps > self.tau).unsqueeze(-1) * ((alpha * (v @ self.m)) @ self.n)
        return y


class LinearCausalAttentionLayer(CausalSelfAttention):
    """Linear attention with the elu+1 feature map, causal, computed in chunks: inside a chunk as masked
    (phi(q) phi(k)^T) v, across chunks through the running sums S = sum phi(k)^T v and z = sum phi(k)."""

    chunk = 64

    def attend(self, q, k, v):
        q, k = F.elu(q) + 1, F.elu(k) + 1
        B, H, T, dh = q.shape
        S = q.new_zeros(B, H, dh, dh)
        z = q.new_zeros(B, H, dh, 1)
        mask = torch.ones(self.chunk, self.chunk, dtype=torch.bool, device=q.device).tril()
        out = []
        for t0 in range(0, T, self.chunk):
            qc, kc, vc = q[:, :, t0:t0 + self.chunk], k[:, :, t0:t0 + self.chunk], v[:, :, t0:t0 + self.chunk]
            n = qc.size(2)
            scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask[:n, :n], 0.0)   # (B, H, n, n)
            num = scores @ vc + qc @ S
            den = scores.sum(-1, keepdim=True) + qc @ z
            out.append(num / den)
            S = S + kc.transpose(-1, -2) @ vc
            z = z + kc.sum(2).unsqueeze(-1)
        return torch.cat(out, dim=2)


try:
    from flash_attn import flash_attn_func
except Exception:                                       # not installed, or built for another torch / GPU
    flash_attn_func = None


class FlashV2AttentionLayer(CausalSelfAttention):
    def attend(self, q, k, v):
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16   # flash needs half
        y = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), dropout_p=self._dropout_p(),
                            causal=True)                                   # (B, T, H, dh)
        return y.transpose(1, 2).to(q.dtype)


class AttentionProvider(Provider):
    """Builds one attention layer per block; the layer class and its config keys are all that differ."""

    layer_cls: type[CausalSelfAttention] = SDPAAttentionLayer

    def create_layer(self, d_model: int, num_heads: int, dropout: float) -> nn.Module:
        return self.layer_cls(d_model, num_heads, dropout, **self.config)


@register("attention", "tva_default")
class TVAAttention(AttentionProvider):
    version = "2.0.0"                                   # 1.x was the public single-head version
    layer_cls = TVAAttentionLayer
    defaults = {"r": 4, "s": 1, "tau": 0.18}
    config_section = ("model", "tva")

    def validate_config(self, config):
        super().validate_config(config)
        if config.get("r", 1) < 1 or config.get("s", 0) < 0 or config.get("tau", 0.0) < 0:
            raise ProfileError(f"model.tva: r must be >= 1, s >= 0 and tau >= 0, got {config}")
        return True


@register("attention", "sdpa")
class SDPAAttention(AttentionProvider):
    layer_cls = SDPAAttentionLayer


@register("attention", "linear_causal")
class LinearCausalAttention(AttentionProvider):
    layer_cls = LinearCausalAttentionLayer


class FlashV2Attention(AttentionProvider):
    layer_cls = FlashV2AttentionLayer


if flash_attn_func is not None:
    register("attention", "flash_v2")(FlashV2Attention)


# -----------------------------------------------------------------------------
# providers: feed-forward and the top-k router

class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


@register("ffn", "default")
class DefaultFFN(Provider):
    def create_layer(self, d_model: int, d_ff: int, dropout: float) -> nn.Module:
        return MLP(d_model, d_ff, dropout)


class MoEFFN(nn.Module):
    """Top-k routed experts in place of one FFN. Every expert starts as a copy of that FFN (sparse upcycling:
    expert 0 is the FFN itself), so switching MoE on mid-training keeps what the model has learnt.

    In training each expert takes at most ceil(capacity * N * k / E) of the N*k assignments (capacity 0 =
    unlimited), first choices of every token before second choices; an assignment past capacity is dropped
    (that token gets only its other experts, or just the residual) and counted in `dropped`. Inference never
    drops. aux_loss is the Switch load-balancing term E * sum_e f_e P_e of the last forward.
    """

    def __init__(self, base_ffn: nn.Module, d_model: int, experts: int, top_k: int, capacity: float):
        super().__init__()
        self.experts = nn.ModuleList([base_ffn] + [copy.deepcopy(base_ffn) for _ in range(experts - 1)])
        self.gate = nn.Linear(d_model, experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.top_k, self.capacity = top_k, capacity
        self.register_buffer("temperature", torch.ones(()))          # saved: inference routes as training ended
        self.aux_loss = torch.zeros(())
        self.dropped = self.assigned = 0

    def forward(self, x):
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        N, E, k = xf.size(0), len(self.experts), self.top_k
        probs = (self.gate(xf).float() / self.temperature).softmax(-1)   # (N, E)
        weight, expert = probs.topk(k, dim=-1)                             # (N, k)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        flat_expert, flat_weight = expert.t().reshape(-1), weight.t().reshape(-1)   # (k*N,): first choices first
        flat_token = torch.arange(N, device=x.device).repeat(k)
        keep = torch.ones_like(flat_expert, dtype=torch.bool)
        if self.training and self.capacity > 0:
            limit = math.ceil(self.capacity * N * k / E)
            onehot = F.one_hot(flat_expert, E)
            keep = (onehot.cumsum(0) * onehot).sum(-1) <= limit           # rank of the assignment at its expert
        out = torch.zeros_like(xf)
        for e, ffn in enumerate(self.experts):
            sel = keep & (flat_expert == e)
            if sel.any():
                idx = flat_token[sel]
                out.index_add_(0, idx, ffn(xf[idx]) * flat_weight[sel, None])
        share = F.one_hot(expert[:, 0], E).float().mean(0)
        self.aux_loss = E * (share * probs.mean(0)).sum()
        self.dropped, self.assigned = int((~keep).sum()), keep.numel()
        return out.view(B, T, D)


@register("router", "topk_default")
class TopKRouter(Provider):
    """Token-choice top-k routing, dropless by default (capacity 0)."""

    defaults = {"experts": 4, "top_k": 2, "capacity": 0.0, "aux_weight": 0.01}
    config_section = ("model", "moe")

    def validate_config(self, config):
        super().validate_config(config)
        c = {**self.defaults, **config}
        if c["experts"] < 1 or not 1 <= c["top_k"] <= c["experts"] or c["capacity"] < 0 or c["aux_weight"] < 0:
            raise ProfileError(f"model.moe: need experts >= 1, 1 <= top_k <= experts, capacity >= 0 and "
                               f"aux_weight >= 0, got {c}")
        return True

    def wrap_ffn(self, ffn: nn.Module, d_model: int) -> MoEFFN:
        c = self.config
        return MoEFFN(ffn, d_model, c["experts"], c["top_k"], c["capacity"])


@register("router", "topk_moe")
class CapacityTopKRouter(TopKRouter):
    """Top-k routing with a capacity factor (GShard / Switch): overflowing assignments are dropped."""

    defaults = {**TopKRouter.defaults, "capacity": 1.25}


# -----------------------------------------------------------------------------
# providers: the alignment loss

@register("align", "bistate_default")
class BistateAlign(Provider):
    """The bistate alignment loss between the model's two readings of its final hidden state h_t:
    the head's logits z_t = W h_t (magnitude and direction) and the cosine logits
    s_t = cos(h_t, E) / tau_align (direction only; E the token embeddings, one row per token).

        L_align = alpha * CE(s_t, y_t) + beta * KL(softmax(z_t) || softmax(s_t)),   softmax(z_t) held fixed

    The first term aligns the direction of h_t with its target token's embedding; the second keeps the
    direction-only reading consistent with what the model predicts. The trainer adds it once the align
    plugin is on (schedules.enable_align_at_epoch) and warmup_steps steps have passed."""

    defaults = {"alpha": 0.35, "beta": 0.20, "tau_align": 0.15, "warmup_steps": 100}
    config_section = ("model", "bistate")

    def validate_config(self, config):
        super().validate_config(config)
        c = {**self.defaults, **config}
        if c["alpha"] < 0 or c["beta"] < 0 or c["tau_align"] <= 0 or c["warmup_steps"] < 0:
            raise ProfileError(f"model.bistate: need alpha, beta, warmup_steps >= 0 and tau_align > 0, got {c}")
        return True

    def compute_align_loss(self, hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                           embedding: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = F.normalize(hidden.float(), dim=-1).flatten(0, 1)                  # (N, D)
        s = h @ F.normalize(embedding.float(), dim=-1).t() / c["tau_align"]   # (N, V)
        ce = F.cross_entropy(s, targets.flatten())
        kl = F.kl_div(s.log_softmax(-1), logits.detach().float().flatten(0, 1).log_softmax(-1),
                      log_target=True, reduction="batchmean")
        return c["alpha"] * ce + c["beta"] * kl


# -----------------------------------------------------------------------------
# the model and its builder

class ModelOutput(NamedTuple):
    logits: torch.Tensor                                # (B, T, V)
    hidden: torch.Tensor                                # (B, T, D) after the final norm


class Block(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module, d_model: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.ffn = attn, ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.ffn(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, a final norm and a head tied to the embedding."""

    def __init__(self, blocks: list[Block], vocab_size: int, d_model: int, block_size: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():        # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "ffn.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(blocks)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb.weight[:T])         # (B, T, D)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        return ModelOutput(self.head(h), h)


class ModelBuilder:
    """Assembles the GPT from the registry: each block's attention and FFN come from the providers the
    profile names (model.attention_name, model.ffn_name, with their sections)."""

    def __init__(self, profile: dict, reg: Registry = registry):
        self.profile, self.model_cfg, self.registry = profile, profile["model"], reg

    def provider(self, kind: str, name_key: str) -> Provider:
        """The provider model[name_key] names; the name actually used (after a fallback) is written back to
        the profile, so a checkpoint records the model it holds."""
        self.model_cfg[name_key] = self.registry.resolve(kind, self.model_cfg[name_key])
        cls = self.registry.provider_class(kind, self.model_cfg[name_key])
        config = self.model_cfg.get(cls.config_section[-1], {}) if cls.config_section else {}
        return cls(config)

    def build_attention(self) -> nn.Module:
        m = self.model_cfg
        return self.provider("attention", "attention_name").create_layer(m["d_model"], m["num_heads"], m["dropout"])

    def build_ffn(self) -> nn.Module:
        m = self.model_cfg
        return self.provider("ffn", "ffn_name").create_layer(m["d_model"], m["d_ff"], m["dropout"])

    def build_block(self) -> Block:
        return Block(self.build_attention(), self.build_ffn(), self.model_cfg["d_model"], self.model_cfg["dropout"])

    def build_model(self) -> GPT:
        m = self.model_cfg
        blocks = [self.build_block() for _ in range(m["num_layers"])]
        return GPT(blocks, m["vocab_size"], m["d_model"], m["block_size"], m["dropout"])


# -----------------------------------------------------------------------------
# data: byte tokenizer, dataset providers, batches

def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < EOT).decode("utf-8", errors="replace")


class DatasetProvider(Provider):
    """Yields the documents of a corpus as strings; the core encodes them as bytes, each ended by EOT."""

    config_section = ("data",)

    def documents(self) -> Iterator[str]:
        raise NotImplementedError


def read_json_documents(path: Path, field: str) -> Iterator[str]:
    """Documents of a .jsonl file (one object or string per line) or a .json file (a list of them)."""

    def text_of(item: object, where: str) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get(field), str):
            return item[field]
        raise ValueError(f"{where}: expected a string or an object with a string {field!r} field")

    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                    yield text_of(item, f"{path}:{line_no}")
            return
        try:
            items = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for i, item in enumerate(items if isinstance(items, list) else [items]):
            yield text_of(item, f"{path}[{i}]")


@register("dataset", "text_default")
class TextDataset(DatasetProvider):
    """Text files: path is a .txt/.md file, a .json/.jsonl file (text_field of each record), a folder of such
    files (recursively), or '' for the built-in corpus: this Python's standard library source."""

    defaults = {"path": "", "text_field": "text"}

    def documents(self) -> Iterator[str]:
        path = self.config["path"]
        if not path:
            files = [Path(f) for f in builtin_corpus_files()]
        elif os.path.isdir(path):
            files = sorted(p for p in Path(path).rglob("*") if p.suffix in (".txt", ".md", ".json", ".jsonl"))
            if not files:
                raise FileNotFoundError(f"data.path {path}: no .txt/.md/.json/.jsonl files in this folder")
        elif os.path.isfile(path):
            files = [Path(path)]
        else:
            raise FileNotFoundError(f"data.path {path}: no such file or folder")
        for file in files:
            if file.suffix in (".json", ".jsonl"):
                yield from read_json_documents(file, self.config["text_field"])
            else:
                yield file.read_text(encoding="utf-8", errors="replace")


@register("dataset", "sql")
class SQLDataset(DatasetProvider):
    """Text rows from PostgreSQL: every row of `query` is one document (its first column, text; NULLs are
    skipped), read through a server-side cursor so a large table is never held twice."""

    defaults = {"dsn": "", "query": ""}

    def documents(self) -> Iterator[str]:
        import psycopg2
        dsn, query = self.config["dsn"], self.config["query"]
        if not dsn or not query:
            raise ValueError("the sql dataset needs data.dsn and data.query")
        try:
            conn = psycopg2.connect(dsn, connect_timeout=5)
        except psycopg2.Error as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ConnectionError(f"data.dsn: cannot connect to PostgreSQL ({reason})") from None
        try:
            with conn, conn.cursor(name="apt_documents") as cur:
                cur.itersize = 1000
                try:
                    cur.execute(query)
                    for row in cur:
                        if row[0] is None:
                            continue
                        if not isinstance(row[0], str):
                            raise ValueError(f"data.query: the first column must be text, got {type(row[0]).__name__}")
                        yield row[0]
                except psycopg2.Error as exc:
                    raise ValueError(f"data.query failed: {str(exc).strip().splitlines()[0]}") from None
        finally:
            conn.close()


def load_tokens(profile: dict, reg: Registry) -> np.ndarray:
    """The corpus as one uint16 array: every document's UTF-8 bytes followed by EOT."""
    data = profile["data"]
    cls = reg.provider_class("dataset", data["provider"], fallback=False)
    provider = cls({k: v for k, v in data.items() if k in cls.defaults})
    parts = []
    for doc in provider.documents():
        parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOT], dtype=np.uint16))
    if not parts:
        raise ValueError(f"data: the {data['provider']} dataset has no documents")
    return np.concatenate(parts)


class TokenData:
    """Training and validation windows of block_size + 1 tokens. The last val_fraction is validation.

    An epoch draws steps_per_epoch batches (0 = one pass) from a permutation of non-overlapping windows at a
    random offset, both seeded by (seed, epoch): batch s of epoch e is the same in every run, so a resumed run
    sees exactly the batches the uninterrupted one would have."""

    def __init__(self, tokens: np.ndarray, val_fraction: float, block_size: int):
        n_val = max(int(len(tokens) * val_fraction), block_size + 1)
        if len(tokens) - n_val < 2 * (block_size + 1):
            raise ValueError(f"data: {len(tokens)} tokens is too little for block_size {block_size} "
                             f"(training and validation windows)")
        self.train, self.val, self.T = tokens[:-n_val], tokens[-n_val:], block_size

    def steps_per_epoch(self, steps: int, batch_size: int) -> int:
        return steps or max((len(self.train) - 1) // self.T // batch_size, 1)

    def _windows(self, src: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([src[s:s + self.T + 1] for s in starts]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]                                      # (B, T) each

    def epoch_batches(self, epoch: int, steps: int, batch_size: int, seed: int, start: int = 0):
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(0, self.T))
        count = (len(self.train) - 1 - offset) // self.T
        order = offset + self.T * rng.permutation(count)
        for s in range(start, steps):
            yield self._windows(self.train, order[np.arange(s * batch_size, (s + 1) * batch_size) % count])

    def val_batches(self, batch_size: int, max_batches: int):
        starts = np.arange(0, len(self.val) - self.T, self.T)
        limit = len(starts) if max_batches == 0 else max_batches * batch_size
        for i in range(0, min(len(starts), limit), batch_size):
            yield self._windows(self.val, starts[i:i + batch_size])


# -----------------------------------------------------------------------------
# plugins: the hook interface and its broadcast

class Plugin(Provider):
    """A bundle of hooks. Its config is the profile's top-level section named after it; every hook is a
    no-op here, so a plugin overrides only what it needs. Training: configure (before the model is built,
    e.g. to choose an attention provider), build (a structural change to the model when the plugin switches
    on, again when a checkpoint that had it is loaded; return True if the model changed), on_enable,
    on_train_start, on_epoch_start, on_step_start, loss_terms (named terms added to the loss before
    backward), on_step_end (may add entries to metrics), on_epoch_end, on_train_end. Generation:
    on_generation_start (returns the prompt to use), choose_token (a token id, or None to let the next plugin
    or the sampler decide), on_generation_end. Inference: prepare_inference (returns the model to use).
    state_dict / load_state_dict go into checkpoints under the plugin's name."""

    schedulable: dict[str, float] = {}                 # parameters it reads from schedules: their smallest value

    def configure(self, profile: dict) -> None: ...
    def build(self, model: GPT, builder: ModelBuilder) -> bool: return False
    def on_enable(self, trainer: Trainer) -> None: ...
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_step_start(self, trainer: Trainer, step: int, batch: tuple) -> None: ...
    def loss_terms(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, out: ModelOutput) -> dict: return {}
    def on_step_end(self, trainer: Trainer, step: int, loss: float, metrics: dict) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def on_generation_start(self, generator: Generator, prompt: str) -> str: return prompt
    def choose_token(self, generator: Generator, logits: torch.Tensor,
                     sample: Callable[[], int]) -> int | None: return None
    def on_generation_end(self, generator: Generator, text: str) -> None: ...
    def prepare_inference(self, model: nn.Module,
                          evaluate: Callable[[nn.Module], float] | None) -> nn.Module: return model
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class HookBus:
    """Calls one hook on every live plugin, in order. A plugin that raises is switched off with one log line
    and the caller goes on without it (KeyboardInterrupt and SystemExit are not caught)."""

    def __init__(self, plugins: list[Plugin] = ()):
        self.plugins = list(plugins)

    def call(self, event: str, *args, check: Callable[[object], None] | None = None) -> list:
        """Every plugin's result; check(result) may raise to refuse one (its plugin is switched off)."""
        results = []
        for plugin in list(self.plugins):
            try:
                result = getattr(plugin, event)(*args)
                if check is not None:
                    check(result)
            except Exception as exc:
                self.switch_off(plugin, event, exc)
                continue
            results.append(result)
        return results

    def pipe(self, event: str, value, *args):
        """Thread value through every plugin's hook: each gets the previous one's result, which must have
        the same type."""
        for plugin in list(self.plugins):
            try:
                result = getattr(plugin, event)(*args, value)
                if not isinstance(result, type(value)):
                    raise TypeError(f"returned {type(result).__name__}, expected {type(value).__name__}")
                value = result
            except Exception as exc:
                self.switch_off(plugin, event, exc)
        return value

    def first(self, event: str, *args, check: Callable[[object], None] | None = None):
        """The first non-None result of the hook (passing check), or None."""
        for plugin in list(self.plugins):
            try:
                result = getattr(plugin, event)(*args)
                if result is not None and check is not None:
                    check(result)
            except Exception as exc:
                self.switch_off(plugin, event, exc)
                continue
            if result is not None:
                return result
        return None

    def switch_off(self, plugin: Plugin, event: str, exc: Exception) -> None:
        if plugin in self.plugins:
            self.plugins.remove(plugin)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.error("plugin %s raised %s in %s%s; it is switched off and the run goes on", plugin.name,
                  type(exc).__name__, event, f" ({message})" if message else "")


def load_plugin_files(folders: list[str], reg: Registry = registry) -> None:
    """Import every *.py in the folders and the 'apt.plugins' entry points; each defines register(registry)
    or registers on import. One that fails is skipped with one log line."""
    sources: list[tuple[str, Callable[[], object]]] = []
    for folder in folders:
        if not os.path.isdir(folder):
            log.error("plugin folder %s does not exist; skipped", folder)
            continue
        for path in sorted(Path(folder).glob("*.py")):
            sources.append((str(path.resolve()), lambda path=path: _import_file(path)))
    for ep in importlib.metadata.entry_points(group="apt.plugins"):
        sources.append((f"entry point {ep.name} ({ep.value})", ep.load))
    for where, load in sources:
        if where in reg._loaded:
            continue
        reg._loaded.add(where)
        try:
            obj = load()
            hook = getattr(obj, "register", obj if callable(obj) and not isinstance(obj, type) else None)
            if hook is not None and hook is not register:   # `from apt import register` means it used the decorator
                hook(reg)
        except Exception as exc:
            log.error("plugin %s failed to load (%s: %s); skipped", where, type(exc).__name__,
                      str(exc).strip().splitlines()[0] if str(exc).strip() else "")


def _import_file(path: Path):
    name = f"apt_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def make_plugins(names: list[str], profile: dict, reg: Registry) -> list[Plugin]:
    """One instance per named plugin (duplicates once); an unregistered name is skipped with one log line
    (an error under --strict), a wrong config section is refused."""
    known = reg.list_providers("plugin")
    plugins = []
    for name in dict.fromkeys(names):
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            message = (f"plugin {name!r} is not registered" + (f" (did you mean {near[0]!r}?)" if near else "")
                       + f"; registered: {', '.join(known)}")
            if reg.strict:
                raise ValueError(message)
            log.error("%s; skipped", message)
            continue
        plugin = reg.get("plugin", name, profile.get(name, {}))
        plugin.registry = reg
        plugins.append(plugin)
    return plugins


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


# -----------------------------------------------------------------------------
# built-in plugins

@register("plugin", "moe")
class MoEPlugin(Plugin):
    """Turns every block's FFN into routed experts (model.router_name, configured by model.moe), adds the
    load-balancing loss (model.moe.aux_weight) and logs the share of dropped assignments."""

    dropped = assigned = 0                              # expert assignments this epoch

    def build(self, model, builder):
        self.router = builder.provider("router", "router_name")
        for block in model.blocks:
            if not isinstance(block.ffn, MoEFFN):
                block.ffn = self.router.wrap_ffn(block.ffn, builder.model_cfg["d_model"])
        return True

    def loss_terms(self, trainer, x, y, out):
        layers = moe_layers(trainer.model)
        return {"moe_aux": self.router.config["aux_weight"] * sum(m.aux_loss for m in layers) / len(layers)}

    def on_step_end(self, trainer, step, loss, metrics):
        layers = moe_layers(trainer.model)
        dropped, assigned = sum(m.dropped for m in layers), sum(m.assigned for m in layers)
        self.dropped, self.assigned = self.dropped + dropped, self.assigned + assigned
        metrics["moe_dropped"] = dropped / max(assigned, 1)

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["moe_dropped"] = self.dropped / max(self.assigned, 1)
        log.info("epoch %d: moe dropped %d of %d expert assignments (%.2f%%) at capacity %s", epoch, self.dropped,
                 self.assigned, 100 * metrics["moe_dropped"], self.router.config["capacity"])
        self.dropped = self.assigned = 0

    def state_dict(self):
        return {"dropped": self.dropped, "assigned": self.assigned}

    def load_state_dict(self, state):
        self.dropped, self.assigned = state["dropped"], state["assigned"]


@register("plugin", "align")
class AlignPlugin(Plugin):
    """Adds the align provider's loss (model.align_name, configured by model.bistate) once the plugin is on
    and its warmup_steps have passed since then."""

    enabled_at = 0                                      # the step it switched on

    def build(self, model, builder):
        self.align = builder.provider("align", "align_name")
        return False

    def on_enable(self, trainer):
        self.enabled_at = trainer.step

    def loss_terms(self, trainer, x, y, out):
        if trainer.step - self.enabled_at < self.align.config["warmup_steps"]:
            return {}
        return {"align": self.align.compute_align_loss(out.hidden, out.logits, y, trainer.model.tok_emb.weight)}

    def state_dict(self):
        return {"enabled_at": self.enabled_at}

    def load_state_dict(self, state):
        self.enabled_at = state["enabled_at"]


@register("plugin", "routing")
class RoutingPlugin(Plugin):
    """Anneals the MoE layers' route temperature (schedules.route_temp, default 1) and capacity factor
    (schedules.capacity, default: the router's) by the schedule, before every step."""

    schedulable = {"route_temp": 1e-3, "capacity": 0.0}

    def on_step_start(self, trainer, step, batch):
        for layer in moe_layers(trainer.model):
            layer.temperature.fill_(trainer.schedule.value("route_temp", trainer.epoch, step, 1.0))
            layer.capacity = trainer.schedule.value("capacity", trainer.epoch, step, layer.capacity)

    def on_step_end(self, trainer, step, loss, metrics):
        layers = moe_layers(trainer.model)
        if layers:
            metrics["route_temp"] = float(layers[0].temperature)
            metrics["capacity"] = layers[0].capacity


class _SelectAttention(Plugin):
    """Selects an attention provider for the whole model (falls back to the default if unavailable)."""

    attention = ""

    def configure(self, profile):
        profile["model"]["attention_name"] = self.attention


@register("plugin", "flash_attn")
class FlashAttnPlugin(_SelectAttention):
    attention = "flash_v2"


@register("plugin", "linear_attn")
class LinearAttnPlugin(_SelectAttention):
    attention = "linear_causal"


class RetrievalProvider(Provider):
    """Indexes passages and returns the best top_n for a query as (score, passage), best first."""

    @staticmethod
    def terms(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def index(self, passages: list[str]) -> None:
        self.passages = passages
        self.docs = [Counter(self.terms(p)) for p in passages]
        df = Counter(t for d in self.docs for t in d)
        n = len(passages)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def score(self, query: list[str]) -> list[float]:
        raise NotImplementedError

    def search(self, query: str, top_n: int) -> list[tuple[float, str]]:
        scores = self.score(self.terms(query))
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
        return [(scores[i], self.passages[i]) for i in best if scores[i] > 0]


@register("retrieval", "none")
class NoRetrieval(RetrievalProvider):
    def score(self, query):
        return [0.0] * len(self.passages)


@register("retrieval", "bm25")
class BM25Retrieval(RetrievalProvider):
    """Okapi BM25: sum over query terms of idf(t) tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avg|d|))."""

    defaults = {"k1": 1.5, "b": 0.75}

    def score(self, query):
        k1, b = self.config["k1"], self.config["b"]
        avg = sum(sum(d.values()) for d in self.docs) / max(len(self.docs), 1)
        out = []
        for d in self.docs:
            norm = k1 * (1 - b + b * sum(d.values()) / max(avg, 1e-9))
            out.append(sum(self.idf.get(t, 0.0) * d[t] * (k1 + 1) / (d[t] + norm) for t in query if t in d))
        return out


@register("retrieval", "tfidf")
class TFIDFRetrieval(RetrievalProvider):
    """Cosine similarity of tf-idf vectors."""

    def score(self, query):
        q = Counter(query)
        qv = {t: c * self.idf.get(t, 0.0) for t, c in q.items()}
        qn = math.sqrt(sum(v * v for v in qv.values())) or 1.0
        out = []
        for d in self.docs:
            dn = math.sqrt(sum((c * self.idf[t]) ** 2 for t, c in d.items())) or 1.0
            out.append(sum(v * d[t] * self.idf[t] for t, v in qv.items() if t in d) / (qn * dn))
        return out


@register("plugin", "retriever")
class RetrieverPlugin(Plugin):
    """Puts the passages of a local documents folder (.txt/.md, split at blank lines) that best match the
    prompt in front of it. A retriever that fails is switched off and the prompt is used as given."""

    defaults = {"provider": "bm25", "docs": "", "top_n": 2, "max_chars": 400}

    def on_generation_start(self, generator, prompt):
        if not hasattr(self, "retrieval"):
            folder = Path(self.config["docs"])
            if not self.config["docs"] or not folder.is_dir():
                raise FileNotFoundError(f"retriever.docs {str(folder)!r} is not a folder")
            passages = [p.strip()[:self.config["max_chars"]]
                        for f in sorted(folder.rglob("*")) if f.suffix in (".txt", ".md")
                        for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")) if p.strip()]
            retrieval = getattr(self, "registry", registry).get("retrieval", self.config["provider"])
            retrieval.index(passages)
            self.retrieval = retrieval
        hits = self.retrieval.search(prompt, self.config["top_n"])
        log.info("retriever: %d passage(s) added to the prompt", len(hits))
        return "".join(p + "\n\n" for _, p in hits) + prompt


@register("plugin", "voter")
class VoterPlugin(Plugin):
    """Where the next-token entropy (nats, at temperature 1) is above threshold, draws k samples and takes the
    most frequent (ties: the more likely token); elsewhere the sampler decides alone."""

    defaults = {"k": 3, "threshold": 2.0}

    def validate_config(self, config):
        super().validate_config(config)
        if config.get("k", 3) < 1:
            raise ProfileError(f"voter.k must be >= 1, got {config['k']}")
        return True

    def on_generation_start(self, generator, prompt):
        self.voted = self.tokens = 0
        return prompt

    def choose_token(self, generator, logits, sample):
        self.tokens += 1
        logp = logits.float().log_softmax(-1)
        if -(logp.exp() * logp).sum() <= self.config["threshold"]:
            return None
        self.voted += 1
        votes = Counter(sample() for _ in range(self.config["k"]))
        return max(votes, key=lambda t: (votes[t], float(logits[t])))

    def on_generation_end(self, generator, text):
        log.info("voter: voted on %d of %d tokens (entropy > %.2f nats)", self.voted, self.tokens,
                 self.config["threshold"])


def model_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@register("plugin", "quant")
class QuantPlugin(Plugin):
    """PyTorch dynamic int8 quantization of every Linear layer for inference (CPU); reports the perplexity
    change it causes and the size of the weights."""

    def prepare_inference(self, model, evaluate):
        from torch.ao.quantization import quantize_dynamic
        model = model.cpu().eval()
        with warnings.catch_warnings():                 # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
            sizes = model_bytes(model) / 2**20, model_bytes(quantized) / 2**20
            layers = sum(isinstance(m, nn.Linear) for m in model.modules())
            if evaluate is None:
                log.info("quant: int8 on %d Linear layers, weights %.2f MB -> %.2f MB (no data to measure "
                         "perplexity)", layers, *sizes)
                return quantized
            before, after = evaluate(model), evaluate(quantized)
        log.info("quant: int8 on %d Linear layers: perplexity %.4f -> %.4f (%+.2f%%), weights %.2f MB -> %.2f MB",
                 layers, before, after, 100 * (after / before - 1), *sizes)
        return quantized


# -----------------------------------------------------------------------------
# training

def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Trainer:
    """The training loop with hook broadcast. Plugins switch on at the start of the epoch the schedule gives
    them; one that changes the model (build) gets its new parameters added to the optimizer. A checkpoint
    (every ckpt_every steps and at each epoch's end, written atomically) holds the profile, the model, the
    optimizer, the position (epoch, step in epoch), the RNG states, which plugins changed the model and each
    plugin's state, so --resume continues exactly where the run stopped."""

    def __init__(self, profile: dict, reg: Registry, plugins: list[Plugin], data: TokenData, out_dir: Path,
                 device: torch.device):
        self.profile, self.cfg, self.registry, self.data = profile, profile["training"], reg, data
        self.out_dir, self.device = out_dir, device
        self.pending = HookBus(plugins)
        self.order = list(plugins)
        self.profile_name = "run"
        self.pending.call("configure", profile)          # before the model exists: may choose providers
        seed_everything(self.cfg["seed"])
        self.builder = ModelBuilder(profile, reg)
        self.model = self.builder.build_model().to(device)
        self.optimizer = torch.optim.AdamW(param_groups(list(self.model.parameters()), self.cfg["weight_decay"]),
                                           lr=self.cfg["lr"], betas=(0.9, 0.95))
        self.steps_per_epoch = data.steps_per_epoch(self.cfg["steps_per_epoch"], self.cfg["batch_size"])
        self.total_steps = self.cfg["max_epochs"] * self.steps_per_epoch
        self.schedule = Schedule(profile["schedules"], self.cfg["max_epochs"], self.total_steps)
        self.bus = HookBus()                              # the plugins switched on so far
        self.built: list[str] = []                     # plugins that changed the model, in order
        self._has_built: set[Plugin] = set()
        self.epoch, self.epoch_step, self.step = 1, 0, 0

    # ---- plugins switching on

    def switch_on_due_plugins(self) -> None:
        for plugin in list(self.pending.plugins):
            if not self.schedule.should_enable_plugin(plugin.name, self.epoch):
                continue
            self.pending.plugins.remove(plugin)
            bus = HookBus([plugin])
            if plugin not in self._has_built:
                self.build(bus)
            bus.call("on_enable", self)
            if bus.plugins:                             # hooks run in the profile's order, however resumed
                self.bus.plugins = sorted(self.bus.plugins + [plugin], key=self.order.index)
                log.info("epoch %d: plugin %s on", self.epoch, plugin.name)

    def build(self, bus: HookBus) -> None:
        """Run the one plugin's build; if it changed the model, move the new parameters to the device and
        into the optimizer (in the same order every time, so a resumed optimizer state fits)."""
        plugin = bus.plugins[0]
        changed = bus.call("build", self.model, self.builder)
        self._has_built.add(plugin)
        if bus.plugins and changed[0]:
            self.built.append(plugin.name)
            self.model.to(self.device)
            known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            new = [p for p in self.model.parameters() if id(p) not in known]
            for group in param_groups(new, self.cfg["weight_decay"]):
                self.optimizer.add_param_group(group)

    # ---- checkpoints

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    def save(self) -> None:
        atomic_save({
            "profile": self.profile, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "built": self.built,
            "plugin_state": {p.name: p.state_dict() for p in self.bus.plugins},    # switched on only
            "profile_name": self.profile_name,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }, self.ckpt_path)

    def resume(self, ckpt: dict) -> None:
        """Rebuild what the run's plugins changed, then load every state the checkpoint holds."""
        by_name = {p.name: p for p in self.pending.plugins}
        for name in ckpt["built"]:
            plugin = by_name.get(name) or self.registry.get("plugin", name, self.profile.get(name, {}))
            self.build(HookBus([plugin]))
            if name not in self.built:
                raise ValueError(f"{self.ckpt_path}: the run's plugin {name} could not rebuild its part of the model")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"{self.ckpt_path}: the checkpoint does not fit the model its profile builds "
                             f"({_detail(exc)})") from None
        self.epoch, self.epoch_step, self.step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.switch_on_due_plugins()
        for plugin in list(self.bus.plugins):
            if plugin.name in ckpt["plugin_state"]:
                try:
                    plugin.load_state_dict(ckpt["plugin_state"][plugin.name])
                except Exception as exc:
                    self.bus.switch_off(plugin, "load_state_dict", exc)
        truncate_metrics(self.out_dir / "metrics.jsonl", self.step, self.epoch)
        log.info("resumed %s at epoch %d, step %d", self.ckpt_path, self.epoch, self.step)

    # ---- the loop

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        self.model.train()
        c = self.cfg
        lr = cosine_lr(self.step, lr=c["lr"], warmup_steps=c["warmup_steps"], total_steps=self.total_steps,
                       min_lr=c["min_lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with bf16_autocast(self.device):
            out = self.model(x)
        terms = {"ce": F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())}

        def check_terms(extra: object) -> None:
            if not isinstance(extra, dict):
                raise TypeError(f"returned {type(extra).__name__}, expected a dict of named loss terms")
            for name, value in extra.items():
                if name in terms:
                    raise ValueError(f"loss term {name!r} is already taken")
                if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()):
                    raise TypeError(f"loss term {name!r} must be a 0-dim float tensor, got {value!r}")
            terms.update(extra)

        self.bus.call("loss_terms", self, x, y, out, check=check_terms)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            kept = f"{self.ckpt_path} is kept" if self.ckpt_path.exists() else "no checkpoint was written yet"
            parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step} ({parts}); {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
                     if c["grad_clip"] > 0 else torch.zeros(()))
        self.optimizer.step()
        return {"epoch": self.epoch, "step": self.step + 1, "lr": lr, "loss": loss.item(),
                "grad_norm": grad_norm.item(), **{k: v.item() for k, v in terms.items()}}

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict:
        return evaluate(model or self.model, self.data, self.cfg["batch_size"], self.cfg["eval_batches"], self.device)

    def train(self) -> dict:
        c = self.cfg
        metrics_log = MetricsLogger(self.out_dir / "metrics.jsonl")
        self.switch_on_due_plugins()
        self.bus.call("on_train_start", self)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 60.0)   # a log file gets a line a minute
        summary = {}
        try:
            while self.epoch <= c["max_epochs"]:
                self.switch_on_due_plugins()
                self.bus.call("on_epoch_start", self, self.epoch)
                batches = self.data.epoch_batches(self.epoch, self.steps_per_epoch, c["batch_size"], c["seed"],
                                                  start=self.epoch_step)
                for x, y in batches:
                    self.bus.call("on_step_start", self, self.step, (x, y))
                    metrics = self.train_step(x, y)
                    self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
                    self.bus.call("on_step_end", self, self.step, metrics["loss"], metrics)
                    metrics_log.log(**metrics)
                    bar.update()
                    bar.set_postfix(epoch=self.epoch, ce=f"{metrics['ce']:.3f}", loss=f"{metrics['loss']:.3f}",
                                    refresh=False)
                    if self.step % c["ckpt_every"] == 0:
                        self.save()
                summary = {"epoch": self.epoch, "step": self.step, **self.evaluate()}
                self.bus.call("on_epoch_end", self, self.epoch, summary)
                metrics_log.log(**summary)
                tqdm.write(f"epoch {self.epoch}: val loss {summary['val_loss']:.4f}, perplexity "
                           f"{summary['val_ppl']:.3f}, {summary['val_bpb']:.3f} bits/byte")
                self.epoch, self.epoch_step = self.epoch + 1, 0
                self.save()
            self.bus.call("on_train_end", self)
        finally:
            bar.close()
            metrics_log.close()
        return summary


def truncate_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop the rows a resumed run writes again: steps after its checkpoint, and the summary of an epoch
    the checkpoint had not finished."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:                    # a line torn by the kill
            continue
        if row.get("step", 0) <= step and ("val_ppl" not in row or row.get("epoch", 0) < epoch):
            keep.append(line + "\n")
    atomic_write_bytes("".join(keep).encode("utf-8"), path)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, batch_size: int, max_batches: int,
             device: torch.device) -> dict:
    """Mean next-token cross-entropy on the validation windows, as perplexity and bits per byte."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(batch_size, max_batches):
        logits = model(x.to(device)).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        count += y.numel()
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2)}


# -----------------------------------------------------------------------------
# generation

class Generator:
    """Samples from a model; plugins may rewrite the prompt (retriever) and pick tokens (voter). The context
    is the last block_size tokens, recomputed each step."""

    def __init__(self, model: nn.Module, plugins: list[Plugin], device: torch.device, block_size: int):
        self.model, self.bus, self.device, self.block_size = model.eval(), HookBus(plugins), device, block_size

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
        prompt = self.bus.pipe("on_generation_start", prompt, self)
        vocab = self.model.tok_emb.num_embeddings if hasattr(self.model, "tok_emb") else EOT + 1

        def check_token(token: object) -> None:
            if not 0 <= int(token) < vocab:
                raise ValueError(f"token {token} is outside the vocabulary of {vocab}")
        ids = encode(prompt) or [EOT]
        gen = torch.Generator().manual_seed(seed)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        new: list[int] = []
        for _ in range(max_new_tokens):
            ctx = torch.tensor([ids[-self.block_size:]], device=self.device)
            logits = self.model(ctx).logits[0, -1].float().cpu()
            sample = lambda: int(sample_next(logits, temperature, top_k, top_p, generator=gen))   # noqa: E731
            token = self.bus.first("choose_token", self, logits, sample, check=check_token)
            token = sample() if token is None else int(token)
            if token == EOT:
                break
            ids.append(token)
            new.append(token)
            if on_text is not None:
                on_text(utf8.decode(bytes([token])))
        if on_text is not None:
            on_text(utf8.decode(b"", final=True))
        self.tokens = len(new)
        text = decode(new)
        self.bus.call("on_generation_end", self, text)
        return text


# -----------------------------------------------------------------------------
# loading a trained model (eval, generate)

def _detail(exc: Exception) -> str:
    """The informative line of a load_state_dict error (its first line only names the module)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__
    return detail if len(detail) <= 240 else detail[:237] + "..."

def load_model(path: str, reg: Registry, device: torch.device, overrides: list) -> tuple[GPT, dict]:
    """The model of a checkpoint, rebuilt from its own profile (with the plugins that changed it)."""
    ckpt = read_checkpoint(path)
    if not all(k in ckpt for k in ("profile", "model", "built")):
        raise ValueError(f"{path}: not an apt.py checkpoint (no profile/model/built entries)")
    if isinstance(ckpt["profile"].get("plugin_dirs"), list):
        load_plugin_files(ckpt["profile"]["plugin_dirs"], reg)    # the run's own plugins
    profile = resolve_profile(apply_overrides(ckpt["profile"], overrides), reg, f"{path} (its profile)")
    builder = ModelBuilder(profile, reg)
    model = builder.build_model()
    for name in ckpt["built"]:
        if name not in reg.list_providers("plugin"):
            raise ValueError(f"{path}: the model was changed by plugin {name!r}, which is not registered "
                             f"(give its folder with --plugin-dir)")
        reg.get("plugin", name, profile.get(name, {})).build(model, builder)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the model its profile builds ({_detail(exc)})") from None
    return model.to(device).eval(), profile


def inference_model(model: GPT, profile: dict, plugins: list[Plugin], data: TokenData | None) -> nn.Module:
    """The model after every plugin's prepare_inference (quant returns an int8 copy on the CPU); a plugin
    that fails there is removed from plugins."""
    t = profile["training"]

    def perplexity(m: nn.Module) -> float:
        return evaluate(m, data, t["batch_size"], t["eval_batches"], next(m.parameters()).device)["val_ppl"]

    for plugin in list(plugins):
        try:
            model = plugin.prepare_inference(model, perplexity if data is not None else None)
        except Exception as exc:
            HookBus([plugin]).switch_off(plugin, "prepare_inference", exc)
            plugins.remove(plugin)                      # and it takes no part in generation either
    return model


# -----------------------------------------------------------------------------
# profiles on disk: plugin enable / disable

def set_plugin_enabled(profile: str, name: str, enabled: bool, reg: Registry) -> bool:
    """Add name to (or remove it from) the profile file's plugins list, keeping every comment, other key,
    quoting and list style; the file is rewritten atomically. False if there was nothing to change."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString
    path = profile_path(profile)
    if enabled and name not in reg.list_providers("plugin"):
        near = difflib.get_close_matches(name, reg.list_providers("plugin"), n=1)
        raise ValueError(f"no plugin named {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                         + f"; registered: {', '.join(reg.list_providers('plugin'))}")
    yaml = YAML()
    yaml.preserve_quotes = True
    text = path.read_text(encoding="utf-8")
    block = re.search(r"^plugins:[ \t]*(?:#.*)?\n(?:[ \t]*#.*\n)*([ \t]*)- ", text, re.M)
    if block:                                           # keep the file's indentation of a block list
        yaml.indent(mapping=2, sequence=len(block[1]) + 2, offset=len(block[1]))
    yaml_load(text, str(path))                          # a clear error for a broken file, before we touch it
    data = yaml.load(text) or CommentedMap()
    plugins = data.get("plugins")
    if plugins is not None and not isinstance(plugins, list):
        raise ProfileError(f"{path}: plugins must be a list, got {plugins!r}")
    if (name in (plugins or [])) == enabled:
        return False
    if enabled:
        quoted = plugins and all(isinstance(p, DoubleQuotedScalarString) for p in plugins)
        if plugins is None:
            plugins = CommentedSeq()
            data.insert(0, "plugins", plugins)
        if not plugins:
            plugins.fa.set_flow_style()                 # [] stays a one-line list
        plugins.append(DoubleQuotedScalarString(name) if quoted else name)
    else:
        for i in reversed([i for i, p in enumerate(plugins) if p == name]):
            del plugins[i]
    out = io.StringIO()
    yaml.dump(data, out)
    atomic_write_bytes(out.getvalue().encode("utf-8"), path)
    return True


# -----------------------------------------------------------------------------
# benchmark: registry-built vs plain modules, TVA vs sdpa, the MoE overhead

class PlainGPT(nn.Module):
    """The bench's reference: the registry's sdpa + default-FFN GPT written directly as plain modules, with
    the same parameter names, so the two load each other's weights."""

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, num_layers: int, d_ff: int, block_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d_model), "ln2": nn.LayerNorm(d_model),
            "attn": nn.ModuleDict({"qkv": nn.Linear(d_model, 3 * d_model, bias=False),
                                   "proj": nn.Linear(d_model, d_model, bias=False)}),
            "ffn": nn.ModuleDict({"fc": nn.Linear(d_model, d_ff), "proj": nn.Linear(d_ff, d_model)}),
        }) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight

    def forward(self, idx):
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]
        for b in self.blocks:
            q, k, v = b["attn"]["qkv"](b["ln1"](x)).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["attn"]["proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + b["ffn"]["proj"](F.gelu(b["ffn"]["fc"](b["ln2"](x))))
        return self.head(self.ln_f(x))


def run_bench(steps: int, device: torch.device) -> dict:
    """Training-step time of each pair, measured step by step in turn in this one process (medians)."""
    m = {"vocab_size": 257, "d_model": 256, "num_heads": 4, "num_layers": 4, "d_ff": 1024, "block_size": 256}
    B = 8
    x = torch.randint(0, 256, (B, m["block_size"]), device=device)
    y = torch.randint(0, 256, (B, m["block_size"]), device=device)

    def built(attention: str, moe: bool = False) -> nn.Module:
        seed_everything(0)
        profile = resolve_profile({"model": {**m, "attention_name": attention}}, registry, "bench")
        builder = ModelBuilder(profile)
        model = builder.build_model()
        if moe:
            registry.get("plugin", "moe").build(model, builder)
        return model.to(device)

    def step_fn(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(x)
            logits = out.logits if isinstance(out, ModelOutput) else out
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    registry_model = built("sdpa")
    plain = PlainGPT(m["vocab_size"], m["d_model"], m["num_heads"], m["num_layers"], m["d_ff"], m["block_size"])
    plain.load_state_dict(registry_model.state_dict())
    plain.to(device)
    with torch.no_grad():
        gap = (registry_model(x).logits - plain(x)).abs().max().item()
    pairs = {"registry-built / plain modules": (registry_model, plain),
             "tva_default / sdpa": (built("tva_default"), built("sdpa")),
             "moe (4 experts, top-2, capacity 1.25) / dense": (built("sdpa", moe=True), built("sdpa"))}
    results = {}
    print(f"bench on {device}: B={B}, T={m['block_size']}, d={m['d_model']}, {m['num_layers']} layers, "
          f"{m['num_heads']} heads; a training step (forward, backward, AdamW), {5 * steps} steps each, "
          f"alternating; the registry-built and plain models give the same logits to {gap:.1e}")
    for label, (a, b) in pairs.items():
        fa, fb = step_fn(a), step_fn(b)
        time_calls(fa, device, repeat=0, warmup=2)
        time_calls(fb, device, repeat=0, warmup=2)
        ta, tb = [], []
        for _ in range(5 * steps):                      # step by step in turn: drifts in machine speed cancel
            ta += time_calls(fa, device, repeat=1, warmup=0)
            tb += time_calls(fb, device, repeat=1, warmup=0)
        ratio = float(np.median(ta) / np.median(tb))
        results[label] = ratio
        print(f"  {label:48s} {1e3 * np.median(ta):8.2f} ms / {1e3 * np.median(tb):8.2f} ms = {ratio:.3f}x")
    return results


# -----------------------------------------------------------------------------
# command line

HELP = __doc__.split("Words used below.")[0].strip()


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugins", nargs="+", action="extend", default=[], metavar="NAME",
                        help="plugins to switch on, added to the profile's plugins list ('plugin list' shows them)")
    parser.add_argument("--plugin-dir", action="append", default=[], metavar="DIR",
                        help="a folder of third-party plugin files (*.py) to load; may be repeated")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override profile keys, e.g. --set training.lr=3e-4 model.num_layers=2")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N (default: the profile's training.device)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse, instead of falling back to the default, a provider or plugin that is not "
                             "registered")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt.py", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true",
                        help="time a training step: registry-built vs plain modules, TVA vs sdpa, MoE vs dense")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed steps per round in --bench (default 10)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model from a profile",
                           description="Train from a profile; --resume continues the run in --out-dir.")
    train.add_argument("-p", "--profile", default="base",
                       help="a profile name in apt_profiles/ (base, gpt5_moe_reasoning, tiny_debug) or a .yaml path")
    train.add_argument("--out-dir", default="", help="where the checkpoint and metrics go (default: runs/apt-PROFILE)")
    train.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out-dir")
    add_run_flags(train)

    ev = sub.add_parser("eval", help="validation perplexity of a checkpoint",
                        description="Perplexity on the checkpoint's validation split (--plugins quant: and int8).")
    ev.add_argument("--ckpt", required=True, help="checkpoint file (runs/apt-PROFILE/ckpt.pt)")
    add_run_flags(ev)

    gen = sub.add_parser("generate", help="sample text from a checkpoint",
                         description="Sample a continuation of --prompt, or chat line by line without it.")
    gen.add_argument("--ckpt", required=True, help="checkpoint file (runs/apt-PROFILE/ckpt.pt)")
    gen.add_argument("--prompt", default=None, help="text to continue (default: read prompts from stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the profile's generation section")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the profile's)")
    gen.add_argument("--top-k", type=int, default=None, help="keep the k most likely bytes, 0 = all")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, 1 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_run_flags(gen)

    plugin = sub.add_parser("plugin", help="list providers, enable or disable a plugin in a profile")
    actions = plugin.add_subparsers(dest="action", metavar="ACTION", required=True)
    lister = actions.add_parser("list", help="registered providers by kind (* marks each kind's default)")
    lister.add_argument("--kind", choices=Registry.KINDS, help="only this kind, one name per line")
    lister.add_argument("--plugin-dir", action="append", default=[], metavar="DIR", help="load these plugin files too")
    for action in ("enable", "disable"):
        p = actions.add_parser(action, help=f"{action} a plugin in a profile file (comments are kept)")
        p.add_argument("name", help="plugin name")
        p.add_argument("--profile", required=True, help="profile name or .yaml path to change")
        p.add_argument("--plugin-dir", action="append", default=[], metavar="DIR", help="load these plugin files too")
    return parser


def _prepare(args: argparse.Namespace, plugin_dirs: list[str] = ()) -> Registry:
    registry.strict = getattr(args, "strict", False)
    registry._warned.clear()                            # each command warns once per fallback
    load_plugin_files(list(args.plugin_dir) + list(plugin_dirs))
    return registry


def cmd_train(args: argparse.Namespace) -> int:
    raw, name = read_profile(args.profile)
    overrides = parse_overrides(args.set)
    raw = apply_overrides(raw, overrides)
    out_dir = args.out_dir or raw.get("out_dir") or f"runs/apt-{name}"
    if not isinstance(out_dir, str):
        raise ProfileError(f"profile {name}: out_dir must be a string, got {out_dir!r}")
    ckpt_path = Path(out_dir) / "ckpt.pt"
    ckpt = None
    if ckpt_path.exists():
        if not args.resume:
            raise ValueError(f"{ckpt_path} exists: --resume continues that run, --out-dir DIR starts a new one")
        ckpt = read_checkpoint(ckpt_path)
        if not isinstance(ckpt.get("profile"), dict) or "profile_name" not in ckpt:
            raise ValueError(f"{ckpt_path}: not an apt.py checkpoint (no profile)")
        raw, name = apply_overrides(ckpt["profile"], overrides), ckpt["profile_name"]
        log.info("resuming %s with the run's own profile (%s, from its checkpoint; -p is not read again)",
                 ckpt_path, name)
    elif args.resume:
        log.info("no checkpoint in %s yet: starting a new run", out_dir)
    dirs = raw.get("plugin_dirs", [])
    if isinstance(dirs, list):                          # the run's plugin folders, kept for resume and eval
        raw["plugin_dirs"] = list(dict.fromkeys(dirs + [str(Path(d).resolve()) for d in args.plugin_dir]))
    reg = _prepare(args, raw["plugin_dirs"] if isinstance(dirs, list) else [])
    profile = resolve_profile(raw, reg, f"profile {name}")
    profile["plugins"] += [p for p in args.plugins if p not in profile["plugins"]]
    if args.device:
        profile["training"]["device"] = args.device
    device = pick_device(profile["training"]["device"])
    plugins = make_plugins(profile["plugins"], profile, reg)
    warn_idle_schedules(profile, plugins)
    data = TokenData(load_tokens(profile, reg), profile["data"]["val_fraction"], profile["model"]["block_size"])
    trainer = Trainer(profile, reg, plugins, data, Path(out_dir), device)
    trainer.profile_name = name
    if ckpt is not None:
        trainer.resume(ckpt)
        if trainer.epoch > profile["training"]["max_epochs"]:
            log.info("the run in %s is complete (%d epochs, %d steps); raise training.max_epochs to go on",
                     out_dir, profile["training"]["max_epochs"], trainer.step)
            return 0
    m = profile["model"]
    log.info("profile %s on %s: %s attention, %s ffn, %d layers x %d, %.2fM parameters, %d training tokens; "
             "plugins: %s", name, device, m["attention_name"], m["ffn_name"], m["num_layers"], m["d_model"],
             sum(p.numel() for p in trainer.model.parameters()) / 1e6, len(data.train),
             ", ".join(f"{p.name} (epoch {trainer.schedule.enable_epoch(p.name)})" for p in plugins) or "none")
    try:
        trainer.train()
    except KeyboardInterrupt:
        log.info("interrupted at step %d; %s holds the last checkpoint, --resume continues from it",
                 trainer.step, trainer.ckpt_path)
        return 130
    log.info("done: %s", trainer.ckpt_path)
    return 0


def warn_idle_schedules(profile: dict, plugins: list[Plugin]) -> None:
    """One warning per schedule entry that will do nothing in this run."""
    names = {p.name for p in plugins}
    read = {key for p in plugins for key in p.schedulable}
    last = profile["training"]["max_epochs"]
    for key, value in profile["schedules"].items():
        match = re.fullmatch(r"enable_(\w+)_at_epoch", key)
        if match and match[1] not in names:
            log.warning("schedules.%s: plugin %s is not in this run's plugins", key, match[1])
        elif match and value > last:
            log.warning("schedules.%s: epoch %d is after the last (%d), so %s never switches on", key, value, last,
                        match[1])
        elif not match and key not in read:
            log.warning("schedules.%s: no plugin of this run reads it", key)


def _load_for_inference(args: argparse.Namespace) -> tuple[nn.Module, dict, list[Plugin], TokenData | None]:
    reg = _prepare(args)
    device = pick_device(args.device or "auto")
    model, profile = load_model(args.ckpt, reg, device, parse_overrides(args.set))
    plugins = make_plugins(args.plugins, profile, reg)
    data = None
    if args.command == "eval" or any(type(p).prepare_inference is not Plugin.prepare_inference for p in plugins):
        data = TokenData(load_tokens(profile, reg), profile["data"]["val_fraction"], profile["model"]["block_size"])
    return model, profile, plugins, data


def cmd_eval(args: argparse.Namespace) -> int:
    model, profile, plugins, data = _load_for_inference(args)
    t = profile["training"]
    r = evaluate(model, data, t["batch_size"], t["eval_batches"], next(model.parameters()).device)
    print(f"{args.ckpt}: validation loss {r['val_loss']:.4f}, perplexity {r['val_ppl']:.4f}, "
          f"{r['val_bpb']:.4f} bits/byte")
    inference_model(model, profile, plugins, data)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model, profile, plugins, data = _load_for_inference(args)
    model = inference_model(model, profile, plugins, data)
    g = profile["generation"]
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p}
    settings = {k: g[k] if v is None else v for k, v in settings.items()}
    generator = Generator(model, plugins, next(model.parameters()).device, profile["model"]["block_size"])

    def run(prompt: str) -> None:
        t0 = time.perf_counter()
        echo = [prompt]                                 # the prompt is echoed after the plugins' log lines

        def show(piece: str) -> None:
            sys.stdout.write("".join(echo) + piece)
            sys.stdout.flush()
            echo.clear()

        generator.generate(prompt, seed=args.seed, on_text=show, **settings)
        show("")
        seconds = time.perf_counter() - t0
        print(f"\n[{generator.tokens} tokens in {seconds:.2f} s, {generator.tokens / max(seconds, 1e-9):.1f} "
              f"tokens/s]", file=sys.stderr)

    if args.prompt is not None:
        run(args.prompt)
        return 0
    print("type a prompt and press enter; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line:
            return 0
        run(line)


def cmd_plugin(args: argparse.Namespace) -> int:
    reg = _prepare(args)
    if args.action == "list":
        if args.kind:
            print("\n".join(reg.list_providers(args.kind)))
            return 0
        for kind, names in reg.list_providers().items():
            print(f"{kind}:")
            for name in names:
                cls = reg.provider_class(kind, name)
                doc = " ".join((cls.__doc__ or "").split()).split(". ")[0]
                doc = doc if len(doc) <= 72 else doc[:69] + "..."
                mark = "*" if Registry.DEFAULTS.get(kind) == name else " "
                print(f"  {mark} {name:16s} {cls.version:8s} {doc}")
        return 0
    changed = set_plugin_enabled(args.profile, args.name, args.action == "enable", reg)
    state = "enabled" if args.action == "enable" else "disabled"
    print(f"{args.name} {state} in {profile_path(args.profile)}" if changed else
          f"{args.name} was already {state} in {profile_path(args.profile)}; nothing changed")
    return 0


class TqdmLogHandler(logging.Handler):
    """Log lines printed above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        handler = TqdmLogHandler()
        handler.setFormatter(logging.Formatter("apt: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if args.bench:
            run_bench(args.bench_steps, pick_device("auto"))
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        commands = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "plugin": cmd_plugin}
        return commands[args.command](args)
    except (ValueError, OSError, FloatingPointError, ConnectionError) as exc:
        print(f"apt.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
