"""Tests for the whole collection, one section per file. Run: python -m pytest tests.py -q (CPU only, a few minutes)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the tests; set before import

import dataclasses
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import rwkv7_kernel as K

HERE = os.path.dirname(os.path.abspath(__file__))


# ======================================================================================
# common.py


def _auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# pick_device / pick_dtype

def test_pick_device_auto_and_cpu():
    assert common.pick_device() == _auto_device()
    assert common.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "", "mps", "cuda:x", "cuda:999", "cuda:256", " cpu"])
def test_pick_device_rejects_bad_names(name):
    with pytest.raises(ValueError):
        common.pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_cuda_unavailable():
    with pytest.raises(ValueError, match="not available"):
        common.pick_device("cuda")


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert common.pick_dtype("auto", cpu) == torch.float32
    assert common.pick_dtype("fp32", "cpu") == torch.float32
    assert common.pick_dtype("float32", cpu) == torch.float32
    assert common.pick_dtype("bf16", cpu) == torch.bfloat16
    assert common.pick_dtype("bfloat16", cpu) == torch.bfloat16
    for bad in ("fp16", "float16", "float64", "half", ""):
        with pytest.raises(ValueError):
            common.pick_dtype(bad, cpu)


# seed_everything

def test_seed_everything_reproducible():
    def draws(seed):
        common.seed_everything(seed)
        return torch.randn(5), np.random.rand(5), [random.random() for _ in range(5)]
    a, b, c = draws(123), draws(123), draws(124)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1]) and a[2] != c[2]


# atomic_save / atomic_write_bytes

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_roundtrip_and_overwrite(tmp_path):
    path = tmp_path / "sub" / "dir" / "ckpt.pt"  # parent dirs are created
    common.atomic_save({"w": torch.arange(4), "step": 1}, path)
    common.atomic_save({"w": torch.arange(6), "step": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.arange(6))
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        common.atomic_save({"w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_atomic_write_bytes_roundtrip(tmp_path):
    path = tmp_path / "vocab.json"
    data = json.dumps({"a": 1, "ü": 2}).encode()
    common.atomic_write_bytes(b"old", path)
    common.atomic_write_bytes(data, path)
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["vocab.json"]


# load_checkpoint

@dataclasses.dataclass
class _OldConfig:
    n_layer: int = 2
    n_head: int = 4


@dataclasses.dataclass
class _NewConfig:
    n_layer: int = 2
    n_head: int = 4
    dropout: float = 0.1
    block_sizes: tuple = (64, 128)


def test_load_checkpoint_fills_new_fields_with_defaults(tmp_path):
    path = tmp_path / "old.pt"
    common.atomic_save({"config": dataclasses.asdict(_OldConfig(n_layer=7)), "model": {"w": torch.ones(2)}}, path)
    ckpt, cfg = common.load_checkpoint(path, _NewConfig)
    assert cfg == _NewConfig(n_layer=7, n_head=4, dropout=0.1, block_sizes=(64, 128))
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))


def test_load_checkpoint_warns_on_unknown_keys(tmp_path):
    path = tmp_path / "new.pt"
    common.atomic_save({"config": dataclasses.asdict(_NewConfig(dropout=0.0))}, path)
    with pytest.warns(UserWarning, match="block_sizes"):
        _, cfg = common.load_checkpoint(path, _OldConfig)
    assert cfg == _OldConfig()


def test_load_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "pickled_dataclass.pt"
    torch.save({"config": _NewConfig()}, path)  # a pickled dataclass is not plain content
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        common.load_checkpoint(path, _NewConfig)


def test_load_checkpoint_truncated_and_missing(tmp_path):
    path = tmp_path / "torn.pt"
    common.atomic_save({"config": {}, "w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        common.load_checkpoint(path, _NewConfig)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        common.load_checkpoint(tmp_path / "nope.pt", _NewConfig)


# cosine_lr

def test_cosine_lr_schedule():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=100, min_lr=0.1)
    lrs = [common.cosine_lr(s, **kw) for s in range(150)]
    warmup, decay = lrs[:10], lrs[10:101]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert warmup[0] > 0 and warmup[-1] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lrs[100] == pytest.approx(0.1) and all(lr == 0.1 for lr in lrs[100:])
    assert common.cosine_lr(0, lr=3e-4, warmup_steps=0, total_steps=10) == pytest.approx(3e-4)


# sample_next

def test_sample_next_greedy_cases():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 50)
    argmax = logits.argmax(-1)
    assert torch.equal(common.sample_next(logits, temperature=0.0), argmax)
    for t in (0.5, 1.0, 5.0):
        assert torch.equal(common.sample_next(logits, temperature=t, top_k=1), argmax)
        assert torch.equal(common.sample_next(logits, temperature=t, top_p=1e-9), argmax)
    assert common.sample_next(logits).shape == (4, 3)


def test_sample_next_top_k_and_top_p_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 0.5, 2.5, -1.0])
    ids = common.sample_next(logits.expand(5000, 5), temperature=2.0, top_k=2, generator=g)
    assert set(ids.tolist()) == {1, 3}
    # probs 0.5/0.3/0.15/0.05: top_p=0.7 needs the first two tokens, top_p=0.85 the first three
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(common.sample_next(logits.expand(5000, 4), top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(common.sample_next(logits.expand(5000, 4), top_p=0.85, generator=g).tolist()) == {0, 1, 2}


def test_sample_next_matches_softmax():
    g = torch.Generator().manual_seed(1234)
    logits = torch.tensor([0.0, 1.0, 2.0, -0.5, 0.5])
    n = 20000
    ids = common.sample_next(logits.expand(n, 5), generator=g)
    observed = torch.bincount(ids, minlength=5).double()
    expected = torch.softmax(logits.double(), -1) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5  # 99.9th percentile of chi-square with 4 degrees of freedom


def test_sample_next_leaves_logits_untouched():
    logits = torch.randn(3, 20)
    before = logits.clone()
    common.sample_next(logits, temperature=0.7, top_k=5, top_p=0.5)
    assert torch.equal(logits, before)


# MetricsLogger

def test_metrics_logger_lines_survive_without_close(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    log = common.MetricsLogger(path)
    log.log(step=1, loss=torch.tensor(2.5), acc=np.float32(0.25), bad=float("nan"), big=float("-inf"))
    log.log(step=2, loss=1.5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # read before close
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 2.5 and rows[0]["acc"] == 0.25
    assert rows[0]["bad"] is None and rows[0]["big"] is None
    assert all(isinstance(r["time"], float) for r in rows)
    log.close()
    with common.MetricsLogger(path) as log2:  # appends, never truncates
        log2.log(step=3)
    assert len(path.read_text().splitlines()) == 3


def test_metrics_logger_none_is_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with common.MetricsLogger(None) as log:
        log.log(step=1, loss=0.5)
    assert os.listdir(tmp_path) == []


# setup_ddp

@pytest.mark.parametrize("world_size", [None, "1"])
def test_setup_ddp_single_process(monkeypatch, world_size):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
    assert common.setup_ddp() == (False, 0, 0, 1, _auto_device())
    common.cleanup_ddp()  # no process group: must be a harmless no-op


# ======================================================================================
# rwkv7_kernel.py

def _grads(fn, xs, s0, dy, dsT):
    """Gradients of <y, dy> + <sT, dsT> w.r.t. the six inputs and s0, through `fn`."""
    leaves = [x.detach().clone().requires_grad_() for x in (*xs, s0)]
    y, sT = fn(*leaves)
    return y, sT, torch.autograd.grad([y, sT], leaves, [dy.to(y.dtype), dsT.to(sT.dtype)])


def _rel(x, ref):
    """Largest error relative to the largest reference entry (absolute below 1e-3, e.g. an all-zero gradient)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-3)).item()


def _strong_decay_w(B, T, H, N, w_max, seed=0):
    """w spread over [-6, w_max] with every third channel at w_max (decay exp(-exp(w_max)), ~0 for w_max=5)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(B, T, H, N, generator=gen, dtype=torch.float64) * (w_max + 6) - 6
    w[..., ::3] = w_max
    return w


@pytest.mark.parametrize("B,T,H,N,chunk", [(2, 37, 2, 16, 32), (1, 70, 1, 32, 32), (2, 13, 1, 16, 4), (1, 1, 2, 16, 32)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_float64(B, T, H, N, chunk, with_state, monkeypatch):
    monkeypatch.setattr(K, "CHUNK", chunk)  # several chunks, the last one partial
    xs = K.rwkv7_inputs(B, T, H, N, torch.float64, seed=T)
    s0 = torch.randn(B, H, N, N, dtype=torch.float64) * (0.5 if with_state else 0.0)
    dy, dsT = torch.randn(B, T, H, N, dtype=torch.float64), torch.randn(B, H, N, N, dtype=torch.float64)
    y_ref, s_ref, g_ref = _grads(K.wkv7_reference, xs, s0, dy, dsT)
    y, sT, g = _grads(K.wkv7_chunked, xs, s0, dy, dsT)
    assert _rel(y, y_ref) < 1e-12 and _rel(sT, s_ref) < 1e-12
    for name, gi, gr in zip(["r", "w", "k", "v", "a", "b", "s0"], g, g_ref):
        assert _rel(gi, gr) < 1e-11, name


def test_chunked_gradcheck(monkeypatch):
    monkeypatch.setattr(K, "CHUNK", 4)  # T=10: chunks of 4, 4, 2
    xs = [x.requires_grad_() for x in K.rwkv7_inputs(1, 10, 1, 16, torch.float64, seed=1)]
    s0 = (0.3 * torch.randn(1, 1, 16, 16, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(K.wkv7_chunked, (*xs, s0), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("w_max", [1.5, 5.0])
def test_chunked_strong_decays_exact_and_finite(w_max):
    xs = K.rwkv7_inputs(2, 50, 1, 16, torch.float64, seed=2)
    xs[1] = _strong_decay_w(2, 50, 1, 16, w_max)
    s0 = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    dy, dsT = torch.randn(2, 50, 1, 16, dtype=torch.float64), torch.randn(2, 1, 16, 16, dtype=torch.float64)
    y_ref, s_ref, g_ref = _grads(K.wkv7_reference, xs, s0, dy, dsT)
    y, sT, g = _grads(K.wkv7_chunked, xs, s0, dy, dsT)
    assert _rel(y, y_ref) < 1e-12 and _rel(sT, s_ref) < 1e-12
    assert all(_rel(gi, gr) < 1e-11 for gi, gr in zip(g, g_ref))
    # float32 with the same decays: finite everywhere and close to the float64 truth
    y32, s32, g32 = _grads(K.wkv7_chunked, [x.float() for x in xs], s0.float(), dy.float(), dsT.float())
    assert all(torch.isfinite(t).all() for t in (y32, s32, *g32))
    assert _rel(y32, y_ref) < 1e-4 and all(_rel(gi, gr) < 1e-4 for gi, gr in zip(g32, g_ref))


def test_chunked_float32_accuracy_long_sequence():
    xs = K.rwkv7_inputs(1, 300, 2, 64, torch.float64, seed=3)
    y_ref, s_ref = K.wkv7_reference(*xs)
    y, sT = K.wkv7_chunked(*[x.float() for x in xs])
    assert y.dtype == torch.float32 and _rel(y, y_ref) < 1e-5 and _rel(sT, s_ref) < 1e-5


def test_chunked_bf16_inputs_keep_fp32_state():
    xs = K.rwkv7_inputs(1, 40, 2, 32, torch.float32, seed=4)
    y_ref, s_ref = K.wkv7_reference(*xs)
    y, sT = K.wkv7_chunked(*[x.bfloat16() for x in xs])
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32
    assert _rel(y, y_ref) < 3e-2 and _rel(sT, s_ref) < 3e-2


def test_state_carries_across_windows():
    """Running a sequence in two windows, passing the state, equals running it at once (chunked inference)."""
    xs = K.rwkv7_inputs(2, 45, 2, 16, torch.float32, seed=5)
    y_all, s_all = K.wkv7(*xs, output_final_state=True)
    y1, s1 = K.wkv7(*[x[:, :20] for x in xs], output_final_state=True)
    y2, s2 = K.wkv7(*[x[:, 20:] for x in xs], initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_all, rtol=1e-5, atol=1e-5)
    assert K.wkv7(*xs)[1] is None  # no final state unless asked for


def test_wkv7_errors_are_clear():
    xs = K.rwkv7_inputs(1, 8, 2, 16)
    with pytest.raises(ValueError, match="share one shape"):
        K.wkv7(xs[0][:, :4], *xs[1:])
    with pytest.raises(ValueError, match="head size N=24"):
        K.wkv7(*[torch.randn(1, 8, 2, 24) for _ in range(6)])
    with pytest.raises(TypeError, match="one floating dtype"):
        K.wkv7(xs[0].double(), *xs[1:])
    with pytest.raises(ValueError, match="one device"):
        K.wkv7(xs[0].to("meta"), *xs[1:])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, N, N\)"):
        K.wkv7(*xs, initial_state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="empty input"):
        K.wkv7(*[x[:, :0] for x in xs])


@pytest.mark.parametrize("T", [16, 37])
def test_chunked_outputs_contiguous_and_graph_freed(T):
    """Model code views y as (B, T, H*N); a second backward through a freed graph must be refused, not doubled."""
    xs = [x.requires_grad_() for x in K.rwkv7_inputs(2, T, 2, 16)]
    y, sT = K.wkv7(*xs, output_final_state=True)
    assert y.is_contiguous() and y.view(2, T, 32).shape == (2, T, 32)
    (y.sum() + sT.sum()).backward()
    assert all(x.grad.is_contiguous() for x in xs)
    with pytest.raises(RuntimeError, match="second time"):
        (y.sum() + sT.sum()).backward()


triton_only = pytest.mark.skipif(K.triton is None, reason="triton is not installed")


@triton_only
@pytest.mark.parametrize("N,bv,T,chunk", [(16, 16, 21, 8), (16, 8, 21, 8), (32, 16, 5, 8)])
def test_triton_interpreted_matches_reference(N, bv, T, chunk):
    xs = K.rwkv7_inputs(2, T, 2, N, torch.float32, seed=N + T)
    s0 = 0.3 * torch.randn(2, 2, N, N)
    dy, dsT = torch.randn(2, T, 2, N), torch.randn(2, 2, N, N)
    y_ref, s_ref, g_ref = _grads(K.wkv7_reference, [x.double() for x in xs], s0.double(), dy.double(), dsT.double())
    y, sT, g = _grads(lambda *a: K.wkv7_triton(*a, chunk=chunk, bv=bv), xs, s0, dy, dsT)
    assert _rel(y, y_ref) < 1e-5 and _rel(sT, s_ref) < 1e-5
    for name, gi, gr in zip(["r", "w", "k", "v", "a", "b", "s0"], g, g_ref):
        assert _rel(gi, gr) < 2e-5, name


@triton_only
def test_triton_interpreted_strong_decays_and_bf16():
    xs = K.rwkv7_inputs(1, 12, 1, 16, torch.float32, seed=6)
    xs[1] = _strong_decay_w(1, 12, 1, 16, 5.0).float()
    s0, dy, dsT = torch.randn(1, 1, 16, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 1, 16, 16)
    y_ref, s_ref, g_ref = _grads(K.wkv7_reference, [x.double() for x in xs], s0.double(), dy.double(), dsT.double())
    y, sT, g = _grads(lambda *a: K.wkv7_triton(*a, chunk=4), xs, s0, dy, dsT)
    assert all(torch.isfinite(t).all() for t in (y, sT, *g))
    assert _rel(y, y_ref) < 1e-5 and all(_rel(gi, gr) < 2e-5 for gi, gr in zip(g, g_ref))
    xs_huge = [x.clone() for x in xs]
    xs_huge[1][0, 3, 0, ::2] = 100.0  # exp(w) overflows float32: the decay is 0 and so is its gradient
    y_h, s_h, g_h = _grads(lambda *a: K.wkv7_triton(*a, chunk=4), xs_huge, s0, dy, dsT)
    _, _, g_c = _grads(K.wkv7_chunked, xs_huge, s0, dy, dsT)
    assert torch.isfinite(g_h[1]).all() and _rel(g_h[1], g_c[1]) < 2e-5
    y16, s16, g16 = _grads(lambda *a: K.wkv7_triton(*a, chunk=4), [x.bfloat16() for x in xs], s0, dy, dsT)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert _rel(y16, y_ref) < 3e-2 and all(_rel(gi, gr) < 5e-2 for gi, gr in zip(g16, g_ref))


def test_bench_runs_and_rejects_bad_shapes():
    cmd = [sys.executable, os.path.join(HERE, "rwkv7_kernel.py"), "--bench", "--device", "cpu", "--repeat", "1"]
    out = subprocess.run(cmd + ["--shapes", "1,40,1,16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [l.split() for l in out.stdout.splitlines() if "chunked" in l or "reference" in l]
    assert len(rows) == 2 and float(rows[1][-2]) < 1e-4  # chunked y error against the float64 truth
    bad = subprocess.run(cmd + ["--shapes", "1,40,1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--shapes" in bad.stderr.strip().splitlines()[-1]
