"""RWKV-7 "generalized delta rule" recurrence: one reference, a fast chunked CPU path, Triton kernels for CUDA.

Per batch b and head h, with state S of shape (N, N) = (value dim, key dim), for t = 1..T:

    S_t = S_{t-1} * exp(-exp(w_t))[None, :] + (S_{t-1} @ a_t) b_t^T + v_t k_t^T
    y_t = S_t @ r_t

r, w, k, v, a, b have shape (B, T, H, N); w follows RWKV-LM's convention (decay = exp(-exp(w))), and RWKV-7
passes a = -kk, b = kk * a_lr. This matches RWKV-LM's RWKV-v7 CUDA kernel and the `rwkv` package's RWKV_x070.

Public entry point: `wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False)`. It dispatches to
  - `wkv7_triton_chunked` on CUDA tensors when Triton is installed (fp16/bf16/fp32 inputs): the chunked form as
    Triton kernels, forward and backward. A window whose decays are too strong for its chunks runs instead on
    `wkv7_triton`, the step kernel (one step at a time, state checkpoints; never chosen for a whole call);
  - `wkv7_chunked`   everywhere else: an exact chunked form with a hand-derived backward;
  - `wkv7_reference` the plain loop, the ground truth for tests (never chosen automatically).
`python rwkv7_kernel.py --bench` times every available path against the reference on this machine.
"""
import argparse
import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from common import pick_device, time_calls

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the CPU paths need only PyTorch
    triton = None

HEAD_SIZES = (16, 32, 64, 128)
CHUNK = 32  # chunk length of the chunked path (the longest; see _plan_chunks)
WINDOW = 8  # chunks per window when some decay needs shorter chunks: each window picks its own length
# Largest log-decay spread (-sum of log decays) allowed within one chunk: factors reach exp(MAX_SPREAD / 2).
# RWKV-7's own decays (>= 0.545 per step) give at most 19.4 over 32 steps; stronger ones shorten the chunk.
MAX_SPREAD = 120.0
# Floor of a single step's log decay: exp(-60) = 9e-27 is 0 for any state entry it multiplies (below float32's
# and float64's resolution of the sum), and at half of MAX_SPREAD one very strong decay still fits a full chunk.
DECAY_FLOOR = MAX_SPREAD / 2


def _full_precision(fn):
    """Run fn with autocast off: the recurrence keeps its own dtypes (fp32 state) inside a caller's autocast."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(x.device.type for x in args if isinstance(x, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------
# Reference: the plain per-step loop (autograd gives its backward)


@_full_precision
def wkv7_reference(r, w, k, v, a, b, initial_state=None):
    """The recurrence step by step in float32 (float64 for float64 inputs). Returns (y, final_state)."""
    B, T, H, N = r.shape
    io_dtype, dt = r.dtype, _state_dtype(r.dtype)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(dt)
    decay = torch.exp(-torch.exp(w))
    ys = []
    for t in range(T):
        sa = S @ a[:, t, :, :, None]  # (B, H, N, 1)
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None])[..., 0])  # (B, H, N)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)  # (B, T, H, N)
    return y.to(io_dtype), S


# --------------------------------------------------------------------------------------------------------
# Chunked CPU path
#
# Within a chunk of C steps starting from state S0, let lg_t be the summed log decay of steps 1..t
# (lg_0 = 0) and u_t = S_{t-1} a_t. Unrolling the recurrence gives
#     S_t = S0 D(lg_t) + sum_{j<=t} (u_j b_j^T + v_j k_j^T) D(lg_t - lg_j),        D(x) = diag(exp(x))
# so the u_t solve a unit lower-triangular system and everything else is a matrix product:
#     (I - Lab) U = A_dec S0^T + Lak V         Lab[t,j] = sum_n a_t b_j exp(lg_{t-1} - lg_j), j < t
#     Y  = R_dec S0^T + Mrb U + Mrk V          Mrb[t,j] = sum_n r_t b_j exp(lg_t - lg_j),     j <= t
#     S_C = S0 D(lg_C) + U^T B_tail + V^T K_tail
# (Lak, Mrk likewise with k for b; A_dec = a * exp(lg_{t-1}), R_dec = r * exp(lg_t), B_tail = b * exp(lg_C - lg)).
# The pairwise decays are factored around the chunk's log-midpoint m = lg_C / 2:
#     exp(lg_t - lg_j) = exp(lg_t - m) * exp(m - lg_j),
# each factor at most exp(spread / 2) where spread = -lg_C; chunks are kept short enough for spread <= MAX_SPREAD.
# With W = (I - Lab)^-1 A_dec and Uv = (I - Lab)^-1 Lak V, U = W S0^T + Uv: everything but the two products
# with S0 (U, then S_C) runs for every chunk at once, and only those two are sequential, one chunk at a time.
# The backward walks the chunks in reverse with S_C = S0 Abar + (terms without S0), Abar = D(lg_C) + W^T B_tail.
# Chunk rows are stored in pairs, RA = [r; a] and BK = [b; k] (2C rows each), so one matmul gives all four
# intra-chunk matrices: G = RA_q BK_q^T = [[Mrb, Mrk], [Lab, Lak]] (strictly lower parts).


def _log_decay(w):
    """Per-step log decay -exp(w), floored at -DECAY_FLOOR. The floor bounds every chunk's spread, so any w
    gives finite factors; the change it makes to a result is below 1e-26 relative."""
    return torch.exp(w).clamp_(max=DECAY_FLOOR).neg_()


def _pick_chunk(g, chunk):
    """Longest chunk length <= chunk (halving) whose log-decay spread stays under MAX_SPREAD in every chunk."""
    B, T, H, N = g.shape
    if -g.min() * chunk <= MAX_SPREAD:  # RWKV-7's own decays always land here
        return chunk
    while chunk > 1:
        nc = -(-T // chunk)
        spread = -F.pad(g, (0, 0, 0, 0, 0, nc * chunk - T)).view(B, nc, chunk, H, N).sum(2)
        if spread.max() <= MAX_SPREAD:
            break
        chunk //= 2
    return chunk


def _plan_chunks(g, chunk=None):
    """(start, end, chunk length) spans covering the T steps of g (B, T, H, N). One span at `chunk` (default
    CHUNK) when every decay allows it (RWKV-7's own always do); otherwise windows of WINDOW * chunk steps, each
    with its own chunk length, so a very strong decay shortens the chunks of its window only, not of the call."""
    chunk = CHUNK if chunk is None else chunk
    T = g.shape[1]
    if _pick_chunk(g, chunk) == chunk:
        return [(0, T, chunk)]
    span = WINDOW * chunk
    return [(t0, min(t0 + span, T), _pick_chunk(g[:, t0:t0 + span], chunk)) for t0 in range(0, T, span)]


def _by_windows(run, plan, xs, state):
    """run(r, w, k, v, a, b, state, C) -> (y, state) over each span of the plan, the state carried between."""
    ys = []
    for t0, t1, C in plan:
        y, state = run(*(x[:, t0:t1] for x in xs), state, C)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), state


def _to_chunks(xs, C, dtype):
    """m tensors (B, T, H, N) -> (NC, B, H, m*C, N): each chunk's rows of every input in turn, zero-padded at
    the end (a padded step writes nothing and decays nothing). Chunk-major, so one chunk is contiguous."""
    B, T, H, N = xs[0].shape
    nc = -(-T // C)
    out = torch.empty(nc, B, H, len(xs) * C, N, dtype=dtype, device=xs[0].device)
    for i, x in enumerate(xs):
        x = F.pad(x, (0, 0, 0, 0, 0, nc * C - T)) if nc * C != T else x
        out[..., i * C:(i + 1) * C, :].copy_(x.view(B, nc, C, H, N).permute(1, 0, 3, 2, 4))
    return out


def _from_chunks(x, T, dtype):
    """(NC, B, H, C, N) -> (B, T, H, N) in `dtype`."""
    nc, B, H, C, N = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, nc * C, H, N)[:, :T].to(dtype).contiguous()


def _chunked_fwd(ra, g, bk, v, s0):
    """ra = [r; a], bk = [b; k]: (NC, B, H, 2C, N); g, v: (NC, B, H, C, N); s0 (B, H, N, N).
    Returns y (NC, B, H, C, V), the final state, and the intermediates the backward needs."""
    C = g.shape[-2]
    lg = g.cumsum(-2)                                            # (.., C, N) log decay through step t
    mid = 0.5 * lg[..., -1:, :]                                  # (.., 1, N) log-midpoint of the chunk
    e_q = torch.exp(lg - mid)                                    # (.., C, N)
    e_ra = torch.cat([e_q, torch.exp(-mid), e_q[..., :-1, :]], -2)  # (.., 2C, N) exp(lg_t - m), exp(lg_{t-1} - m)
    e_k = e_q.reciprocal()                                       # (.., C, N) exp(m - lg_t)
    e_mid = torch.exp(mid)
    RA = ra * e_ra                                               # [r exp(lg_t - m); a exp(lg_{t-1} - m)]
    BK = (bk.unflatten(-2, (2, C)) * e_k.unsqueeze(-3)).flatten(-3, -2)  # [b; k] * exp(m - lg_j)
    dec = RA * e_mid                                             # [R_dec; A_dec]
    tails = BK * e_mid                                           # [B_tail; K_tail], exp(m) = exp(lg_C - m)
    decay = torch.exp(2 * mid[..., 0, :])                        # (.., N) whole-chunk decay
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1).repeat(2, 2)
    G = (RA @ BK.transpose(-1, -2)).masked_fill_(~lower, 0.0)   # (.., 2C, 2C) [[Mrb, Mrk], [Lab, Lak]];
    # unused entries may overflow, so they are overwritten, never multiplied by a mask
    M = G[..., :C, :]                                            # (.., C, 2C) [Mrb | Mrk], plus the diagonals:
    r = ra[..., :C, :]
    M[..., :C].diagonal(dim1=-2, dim2=-1).add_((r * bk[..., :C, :]).sum(-1))
    M[..., C:].diagonal(dim1=-2, dim2=-1).add_((r * bk[..., C:, :]).sum(-1))
    Lak = G[..., C:, C:]
    eye = torch.eye(C, dtype=g.dtype, device=g.device)
    Tinv = torch.linalg.solve_triangular(eye - G[..., C:, :C], eye.expand_as(Lak), upper=False, unitriangular=True)
    W = Tinv @ dec[..., C:, :]                                   # (.., C, K)
    UV = torch.cat([Tinv @ (Lak @ v), v], -2)                    # (.., 2C, V) [Uv; V], then [U; V]
    nc = g.shape[0]
    states = s0.new_empty(nc + 1, *s0.shape)                     # (NC + 1, B, H, V, K) state entering each chunk
    states[0] = s0
    # per-chunk (B*H, ..) views, made once: indexing inside the loop costs more than its small matmuls
    st, U, UVt, Wf, tf, decay_f = (x.flatten(1, 2).unbind(0) for x in
                                   (states, UV[..., :C, :], UV.transpose(-1, -2), W, tails, decay[..., None, :]))
    for c in range(nc):  # the sequential part, one chunk at a time
        U[c].baddbmm_(Wf[c], st[c].transpose(1, 2))                                       # U = W S0^T + Uv
        torch.mul(st[c], decay_f[c], out=st[c + 1]).baddbmm_(UVt[c], tf[c])                # S0 D + [U; V]^T tails
    sT, states = states[-1].clone(), states[:-1]
    y = dec[..., :C, :] @ states.transpose(-1, -2) + M @ UV     # (.., C, V)
    saved = dict(ra=ra, bk=bk, e_ra=e_ra, e_k=e_k, e_mid=e_mid, RA=RA, BK=BK, dec=dec, tails=tails, decay=decay,
                 M=M, Lak=Lak, Tinv=Tinv, W=W, states=states, UV=UV)
    return y, sT, saved


def _chunked_bwd(dy, dsT, ra, bk, e_ra, e_k, e_mid, RA, BK, dec, tails, decay, M, Lak, Tinv, W, states, UV):
    """Gradients of the chunked form from dy (NC, B, H, C, V) and dsT (B, H, V, K) and the forward's saved
    intermediates. Returns d[r; a], dg, d[b; k], dv in chunk layout and the initial state's gradient."""
    C = M.shape[-2]
    # gradient of each chunk's initial state: dS_c = dY_c^T Q_c + dS_{c+1} Abar_c^T, where the chunk maps its
    # initial state as S_C = S0 Abar + (terms without S0), Abar = D(lg_C) + W^T B_tail, and Q = R_dec + Mrb W
    AbarT = tails[..., :C, :].transpose(-1, -2) @ W + torch.diag_embed(decay)  # (NC, B, H, K, K)
    P = dy.transpose(-1, -2) @ (dec[..., :C, :] + M[..., :C] @ W)  # (NC, B, H, V, K)
    dSn = torch.empty_like(P)                      # gradient of the state leaving each chunk
    dS = dsT
    for c in reversed(range(P.shape[0])):
        dSn[c] = dS
        dS = torch.baddbmm(P[c].flatten(0, 1), dS.flatten(0, 1), AbarT[c].flatten(0, 1)).view_as(dS)
    dUV = M.transpose(-1, -2) @ dy + tails @ dSn.transpose(-1, -2)  # (.., 2C, V): via Y and via S_C
    dX = Tinv.transpose(-1, -2) @ dUV[..., :C, :]  # U = Tinv X
    dv = dUV[..., C:, :] + Lak.transpose(-1, -2) @ dX
    dM = dy @ UV.transpose(-1, -2)                 # (.., C, 2C) = d[Mrb | Mrk]
    lower = torch.ones(C, C, dtype=torch.bool, device=dy.device).tril(-1).repeat(2, 2)
    dG = torch.where(lower, torch.cat([dM, dX @ UV.transpose(-1, -2)], -2), 0.0)  # (.., 2C, 2C)
    d_RA = dG @ BK + (torch.cat([dy, dX], -2) @ states) * e_mid                   # via G and via [R_dec; A_dec]
    d_BK = dG.transpose(-1, -2) @ RA + (UV @ dSn) * e_mid                          # via G and via the tails
    d_ra = d_RA * e_ra
    d_bk = (d_BK.unflatten(-2, (2, C)) * e_k.unsqueeze(-3)).flatten(-3, -2)
    r, b, k = ra[..., :C, :], bk[..., :C, :], bk[..., C:, :]
    m_rb = dM[..., :C].diagonal(dim1=-2, dim2=-1)[..., None]  # (.., C, 1) diagonals r_t . b_t, r_t . k_t
    m_rk = dM[..., C:].diagonal(dim1=-2, dim2=-1)[..., None]
    d_ra[..., :C, :] += m_rb * b + m_rk * k
    d_bk[..., :C, :] += m_rb * r
    d_bk[..., C:, :] += m_rk * r
    # log-decay gradients: a factor x * exp(e) gives d e = d(factor) * factor. Every product used is invariant
    # to the midpoint m, so m is held constant; the tails carry exp(lg_C - m) and so feed lg_C.
    e_grad = d_RA * RA                                                          # rows lg_t, then lg_{t-1}
    dlg = e_grad[..., :C, :] - (d_BK * BK).unflatten(-2, (2, C)).sum(-3)
    dlg[..., :-1, :] += e_grad[..., C + 1:, :]                                  # lg_{t-1} is lg of row t-1
    dlgC = ((UV @ dSn) * tails).sum(-2) + (states * dSn).sum(-2) * decay        # (.., N)
    dg = dlg.flip(-2).cumsum(-2).flip(-2) + dlgC[..., None, :]                  # lg_t sums g_1..g_t
    return d_ra, dg, d_bk, dv, dS


class _WKV7Chunked(torch.autograd.Function):
    @staticmethod
    @_full_precision
    def forward(ctx, r, w, k, v, a, b, s0, C):
        B, T, H, N = r.shape
        dt = _state_dtype(r.dtype)
        g = _log_decay(w.to(dt))
        ra, bk, gc, vc = (_to_chunks(xs, C, dt) for xs in ([r, a], [b, k], [g], [v]))
        ctx.T, ctx.io_dtype, ctx.s0_dtype = T, r.dtype, dt if s0 is None else s0.dtype
        s0 = r.new_zeros(B, H, N, N, dtype=dt) if s0 is None else s0.to(dt)
        y, sT, saved = _chunked_fwd(ra, gc, bk, vc, s0)
        ctx.names = list(saved)
        ctx.save_for_backward(gc, *saved.values())  # freed after backward; a second backward is refused
        return _from_chunks(y, T, r.dtype), sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_full_precision
    def backward(ctx, dy, dsT):
        g, *saved = ctx.saved_tensors
        p, T, C = dict(zip(ctx.names, saved)), ctx.T, g.shape[-2]
        dy = _to_chunks([dy], C, g.dtype)
        d_ra, dg, d_bk, dv, ds0 = _chunked_bwd(dy, dsT.to(g.dtype), **p)
        dw = _from_chunks(dg * g * (g > -DECAY_FLOOR), T, ctx.io_dtype)  # g = -exp(w), floored
        dr, da, db, dk = (_from_chunks(x[..., i * C:(i + 1) * C, :], T, ctx.io_dtype) for x, i in
                          ((d_ra, 0), (d_ra, 1), (d_bk, 0), (d_bk, 1)))
        grads = (dr, dw, dk, _from_chunks(dv, T, ctx.io_dtype), da, db)
        return (*grads, ds0.to(ctx.s0_dtype) if ctx.needs_input_grad[6] else None, None)


def wkv7_chunked(r, w, k, v, a, b, initial_state=None):
    """The chunked form, forward and hand-derived backward, in plain PyTorch. Returns (y, final_state).
    Where _plan_chunks splits the sequence into windows, the state is carried from one to the next."""
    _check_inputs(r, w, k, v, a, b, initial_state)
    with torch.no_grad():
        plan = _plan_chunks(_log_decay(w.detach().to(_state_dtype(w.dtype))))
    return _by_windows(_WKV7Chunked.apply, plan, (r, w, k, v, a, b), initial_state)


# --------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA)
# Rows of S (the value dim) evolve independently, so a program owns BV rows of one (b, h) and walks t.
# Buffers: inputs (B, T, H, N); states (B, H, NC, N, N) fp32 with states[:, :, c] the state before step
# c * chunk; backward scratch (B * H, N // BV, chunk, BV, N) fp32; key-dim gradient partials
# (N // BV, B, T, H, N) fp32, summed over the V-blocks afterwards.
if triton is not None:

    @triton.jit
    def _wkv7_fwd_kernel(
        r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # (B, T, H, N), input dtype
        s0_ptr,  # (B, H, N, N) fp32 (unused if not HAS_S0)
        y_ptr,  # (B, T, H, N), input dtype
        sT_ptr,  # (B, H, N, N) fp32
        states_ptr,  # (B, H, NC, N, N) fp32
        T, H, NC,
        N: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr, HAS_S0: tl.constexpr,
    ):
        pid_bh = tl.program_id(0).to(tl.int64)  # b * H + h
        pid_v = tl.program_id(1)
        i_b = pid_bh // H
        i_h = pid_bh % H

        offs_i = pid_v * BV + tl.arange(0, BV)  # (BV,) value rows owned by this program
        offs_j = tl.arange(0, N)  # (N,) key columns
        offs_s = offs_i[:, None] * N + offs_j[None, :]  # (BV, N) offsets inside one (N, N) state

        if HAS_S0:
            S = tl.load(s0_ptr + pid_bh * N * N + offs_s)  # (BV, N)
        else:
            S = tl.zeros((BV, N), dtype=tl.float32)  # (BV, N)

        # Element (b, t, h, n) of a (B, T, H, N) tensor lives at ((b*T + t)*H + h)*N + n.
        seq_base = (i_b * T * H + i_h) * N  # offset of (b, 0, h, 0)
        state_base = states_ptr + pid_bh * NC * N * N

        for c in range(0, NC):
            # checkpoint: state before step c * CHUNK
            tl.store(state_base + c * N * N + offs_s, S)
            t0 = c * CHUNK
            t_end = tl.minimum(t0 + CHUNK, T)
            for t in range(t0, t_end):
                base = seq_base + t * H * N
                r_t = tl.load(r_ptr + base + offs_j).to(tl.float32)  # (N,)
                w_t = tl.load(w_ptr + base + offs_j).to(tl.float32)  # (N,)
                k_t = tl.load(k_ptr + base + offs_j).to(tl.float32)  # (N,)
                a_t = tl.load(a_ptr + base + offs_j).to(tl.float32)  # (N,)
                b_t = tl.load(b_ptr + base + offs_j).to(tl.float32)  # (N,)
                v_t = tl.load(v_ptr + base + offs_i).to(tl.float32)  # (BV,)

                d_t = tl.exp(-tl.exp(tl.minimum(w_t, 30.0)))  # (N,)
                sa = tl.sum(S * a_t[None, :], axis=1)  # (BV,)
                S = S * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]  # (BV, N)
                y_t = tl.sum(S * r_t[None, :], axis=1)  # (BV,)
                tl.store(y_ptr + base + offs_i, y_t.to(y_ptr.dtype.element_ty))

        tl.store(sT_ptr + pid_bh * N * N + offs_s, S)


    @triton.jit
    def _wkv7_bwd_kernel(
        r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # (B, T, H, N), input dtype
        states_ptr,  # (B, H, NC, N, N) fp32 checkpoints from the forward
        dy_ptr,  # (B, T, H, N), any float dtype
        dsT_ptr,  # (B, H, N, N) fp32 (unused if not HAS_DST)
        scratch_ptr,  # (B * H, N // BV, CHUNK, BV, N) fp32
        dr_ptr, dw_ptr, dk_ptr, da_ptr, db_ptr,  # (N // BV, B, T, H, N) fp32 partial sums over V-blocks
        dv_ptr,  # (B, T, H, N), input dtype
        ds0_ptr,  # (B, H, N, N) fp32
        B, T, H, NC,
        N: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr, HAS_DST: tl.constexpr,
    ):
        pid_bh = tl.program_id(0).to(tl.int64)  # b * H + h
        pid_v = tl.program_id(1)
        i_b = pid_bh // H
        i_h = pid_bh % H

        offs_i = pid_v * BV + tl.arange(0, BV)  # (BV,) value rows owned by this program
        offs_j = tl.arange(0, N)  # (N,) key columns
        offs_s = offs_i[:, None] * N + offs_j[None, :]  # (BV, N) offsets inside one (N, N) state
        offs_blk = tl.arange(0, BV)[:, None] * N + offs_j[None, :]  # (BV, N) offsets inside one scratch slot

        if HAS_DST:
            dS = tl.load(dsT_ptr + pid_bh * N * N + offs_s)  # (BV, N)
        else:
            dS = tl.zeros((BV, N), dtype=tl.float32)  # (BV, N)

        seq_base = (i_b * T * H + i_h) * N  # offset of (b, 0, h, 0) in a (B, T, H, N) tensor
        part_base = pid_v.to(tl.int64) * B * T * H * N + seq_base  # same, in this V-block's partial buffer
        state_base = states_ptr + pid_bh * NC * N * N
        scratch_base = scratch_ptr + (pid_bh * (N // BV) + pid_v) * CHUNK * BV * N

        for c in range(NC - 1, -1, -1):
            t0 = c * CHUNK
            t_end = tl.minimum(t0 + CHUNK, T)

            # ---- recompute the chunk's states from its checkpoint; slot t - t0 <- S_{t-1} ----
            S = tl.load(state_base + c * N * N + offs_s)  # (BV, N)
            for t in range(t0, t_end):
                tl.store(scratch_base + (t - t0) * BV * N + offs_blk, S)
                base = seq_base + t * H * N
                w_t = tl.load(w_ptr + base + offs_j).to(tl.float32)  # (N,)
                k_t = tl.load(k_ptr + base + offs_j).to(tl.float32)  # (N,)
                a_t = tl.load(a_ptr + base + offs_j).to(tl.float32)  # (N,)
                b_t = tl.load(b_ptr + base + offs_j).to(tl.float32)  # (N,)
                v_t = tl.load(v_ptr + base + offs_i).to(tl.float32)  # (BV,)
                d_t = tl.exp(-tl.exp(tl.minimum(w_t, 30.0)))  # (N,)
                sa = tl.sum(S * a_t[None, :], axis=1)  # (BV,)
                S = S * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]  # (BV, N)
            # scratch writes must be visible to all threads of the program before they are read
            tl.debug_barrier()

            # ---- reverse pass over the chunk; dS = dL/dS_t on entry of step t ----
            for t in range(t_end - 1, t0 - 1, -1):
                S_prev = tl.load(scratch_base + (t - t0) * BV * N + offs_blk)  # (BV, N) = S_{t-1}
                base = seq_base + t * H * N
                r_t = tl.load(r_ptr + base + offs_j).to(tl.float32)  # (N,)
                w_t = tl.load(w_ptr + base + offs_j).to(tl.float32)  # (N,)
                k_t = tl.load(k_ptr + base + offs_j).to(tl.float32)  # (N,)
                a_t = tl.load(a_ptr + base + offs_j).to(tl.float32)  # (N,)
                b_t = tl.load(b_ptr + base + offs_j).to(tl.float32)  # (N,)
                v_t = tl.load(v_ptr + base + offs_i).to(tl.float32)  # (BV,)
                dy_t = tl.load(dy_ptr + base + offs_i).to(tl.float32)  # (BV,)

                ew = tl.exp(tl.minimum(w_t, 30.0))  # (N,) d/dw of the decay is 0 in fp32 long before w=30
                d_t = tl.exp(-ew)  # (N,)
                sa = tl.sum(S_prev * a_t[None, :], axis=1)  # (BV,)
                S_t = S_prev * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]  # (BV, N)

                dS += dy_t[:, None] * r_t[None, :]  # (BV, N)
                dr_t = tl.sum(S_t * dy_t[:, None], axis=0)  # (N,)
                dd = tl.sum(dS * S_prev, axis=0)  # (N,)
                dw_t = dd * d_t * (-ew)  # (N,)
                db_t = tl.sum(dS * sa[:, None], axis=0)  # (N,)
                dk_t = tl.sum(dS * v_t[:, None], axis=0)  # (N,)
                dv_t = tl.sum(dS * k_t[None, :], axis=1)  # (BV,)
                dsa = tl.sum(dS * b_t[None, :], axis=1)  # (BV,)
                da_t = tl.sum(dsa[:, None] * S_prev, axis=0)  # (N,)
                dS = dS * d_t[None, :] + dsa[:, None] * a_t[None, :]  # (BV, N) = dL/dS_{t-1}

                pbase = part_base + t * H * N
                tl.store(dr_ptr + pbase + offs_j, dr_t)
                tl.store(dw_ptr + pbase + offs_j, dw_t)
                tl.store(dk_ptr + pbase + offs_j, dk_t)
                tl.store(da_ptr + pbase + offs_j, da_t)
                tl.store(db_ptr + pbase + offs_j, db_t)
                tl.store(dv_ptr + base + offs_i, dv_t.to(dv_ptr.dtype.element_ty))
            # all scratch reads of this chunk must finish before the next chunk overwrites it
            tl.debug_barrier()

        tl.store(ds0_ptr + pid_bh * N * N + offs_s, dS)


    def _launch_params(N, bv, num_warps):
        """Resolve the V-block size and warp count; defaults aimed at H100."""
        if bv is None:
            bv = min(N, 32)
        if bv < 1 or N % bv != 0 or bv & (bv - 1):
            raise ValueError(f"bv={bv} must be a power of two dividing N={N}")
        if num_warps is None:
            # ~8 state elements per thread: the backward keeps ~4 (BV, N) fp32 tiles live
            # (~120 regs/thread at BV=32, N=64, 8 warps on sm_90, no spills)
            num_warps = max(1, min(8, bv * N // 256))
        return bv, num_warps


    def _triton_fwd(r, w, k, v, a, b, s0=None, chunk=16, bv=None, num_warps=None):
        """Forward. Returns y (B, T, H, N) in the input dtype, the final state sT (B, H, N, N) fp32,
        and the checkpoints states (B, H, ceil(T / chunk), N, N) fp32 needed by _triton_bwd."""
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        B, T, H, N = r.shape
        bv, num_warps = _launch_params(N, bv, num_warps)
        NC = triton.cdiv(T, chunk)
        y = torch.empty_like(r)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        states = torch.empty(B, H, NC, N, N, device=r.device, dtype=torch.float32)
        has_s0 = s0 is not None
        s0 = s0.float().contiguous() if has_s0 else sT  # dummy pointer when absent
        _wkv7_fwd_kernel[(B * H, N // bv)](
            r, w, k, v, a, b, s0, y, sT, states,
            T, H, NC,
            N=N, BV=bv, CHUNK=chunk, HAS_S0=has_s0, num_warps=num_warps,
        )
        return y, sT, states


    def _triton_bwd(r, w, k, v, a, b, states, dy, dsT=None, chunk=16, bv=None, num_warps=None):
        """Backward. `states` and `chunk` must come from _triton_fwd. dy=None / dsT=None mean zeros.
        Returns (dr, dw, dk, dv, da, db) in the input dtype and ds0 (B, H, N, N) fp32."""
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        B, T, H, N = r.shape
        bv, num_warps = _launch_params(N, bv, num_warps)
        NC = triton.cdiv(T, chunk)
        NV = N // bv
        if states.shape != (B, H, NC, N, N):
            raise ValueError("states do not match the inputs / chunk size")
        if dy is not None and dy.shape != r.shape:
            raise ValueError("dy must have shape (B, T, H, N)")
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()  # any float dtype
        has_dst = dsT is not None
        ds0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        dsT = dsT.float().contiguous() if has_dst else ds0  # dummy pointer when absent
        scratch = torch.empty(B * H, NV, chunk, bv, N, device=r.device, dtype=torch.float32)
        dr, dw, dk, da, db = (torch.empty(NV, B, T, H, N, device=r.device, dtype=torch.float32) for _ in range(5))
        dv = torch.empty_like(r)
        _wkv7_bwd_kernel[(B * H, NV)](
            r, w, k, v, a, b, states.contiguous(), dy, dsT, scratch,
            dr, dw, dk, da, db, dv, ds0,
            B, T, H, NC,
            N=N, BV=bv, CHUNK=chunk, HAS_DST=has_dst, num_warps=num_warps,
        )
        dr, dw, dk, da, db = (g.sum(0).to(r.dtype) for g in (dr, dw, dk, da, db))
        return dr, dw, dk, dv, da, db, ds0


    def _on_device(x):
        """Launch on x's CUDA device: Triton launches on the current device, which may be another one."""
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    class _WKV7Triton(torch.autograd.Function):

        @staticmethod
        def forward(ctx, r, w, k, v, a, b, s0=None, chunk=16, bv=None, num_warps=None):
            with _on_device(r):
                y, sT, states = _triton_fwd(r, w, k, v, a, b, s0, chunk=chunk, bv=bv, num_warps=num_warps)
            ctx.save_for_backward(r, w, k, v, a, b, states)
            ctx.has_s0 = s0 is not None
            ctx.cfg = (chunk, bv, num_warps)
            ctx.set_materialize_grads(False)  # keep dy / dsT as None when unused
            return y, sT

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dy, dsT):
            r, w, k, v, a, b, states = ctx.saved_tensors
            chunk, bv, num_warps = ctx.cfg
            with _on_device(r):                       # the backward may run with another device current
                dr, dw, dk, dv, da, db, ds0 = _triton_bwd(
                    r, w, k, v, a, b, states, dy, dsT, chunk=chunk, bv=bv, num_warps=num_warps
                )
            return dr, dw, dk, dv, da, db, (ds0 if ctx.has_s0 else None), None, None, None


def wkv7_triton(r, w, k, v, a, b, initial_state=None, chunk=16, bv=None, num_warps=None):
    """Triton forward and backward (fp16/bf16/fp32 inputs, fp32 state). Returns (y, final_state).

    The forward stores the state every `chunk` steps; the backward recomputes each chunk's states from there.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if triton is None:
        raise RuntimeError("wkv7_triton: Triton is not installed")
    _check_inputs(r, w, k, v, a, b, initial_state)
    if chunk < 1:
        raise ValueError(f"wkv7_triton: chunk must be >= 1, got {chunk}")
    if r.dtype == torch.float64:
        raise TypeError("wkv7_triton: float64 is not supported; use wkv7_chunked or wkv7_reference")
    return _WKV7Triton.apply(r, w, k, v, a, b, initial_state, chunk, bv, num_warps)


# --------------------------------------------------------------------------------------------------------
# Chunked Triton kernels (CUDA): the chunked form above, with the intra-chunk matrices as tl.dot products.
# Forward: _tc_intra_kernel (grid (NC, B*H)) builds each chunk's matrices and solves its triangular system;
# _tc_state_fwd_kernel (grid (B*H, N // BV)) walks the chunks, U = W S0^T + Uv and S_C, storing the state
# entering each chunk; _tc_out_kernel (grid (NC, B*H)) gives y. The backward reruns _tc_intra_kernel (and
# Q = R_dec + Mrb W for dS0), walks the chunks in reverse in _tc_state_bwd_kernel for the gradient of the state
# leaving each chunk, and assembles every input's gradient in _tc_grad_kernel (grid (NC, B*H)).
# Per-chunk buffers are fp32, chunk-major per (b, h): (B*H, NC * C, N) rows, decays (B*H, NC, N), Tinv
# (B*H, NC, C, C), states (B*H, NC, N, N) as (value, key). Every tl.dot has all dims >= 16 (C, N, BV).
if triton is not None:

    @triton.jit
    def _dot(x, y):
        # fp32 operands (the decay factors make every operand fp32): "ieee" keeps fp32 products, where tf32
        # would cost the state about 1e-3 relative; it compiles on every backend
        return tl.dot(x, y, input_precision="ieee")

    @triton.jit
    def _ld(ptr, offs, mask):
        """fp32 tile of an input, zero past T (a padded step writes nothing and decays nothing)."""
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _seq_offsets(bh, c, T, H, N: tl.constexpr, C: tl.constexpr, cols):
        """Offsets (C, len(cols)) of chunk c's rows in a (B, T, H, N) tensor, and the mask (C, 1) of t < T."""
        t = c * C + tl.arange(0, C).to(tl.int64)
        base = ((bh // H) * T * H + bh % H) * N
        return base + t[:, None] * H * N + cols[None, :], (t < T)[:, None]

    @triton.jit
    def _decay_factors(w_ptr, offs, mask, FLOOR: tl.constexpr):
        """One chunk's log decays g (C, N) and, with lg_t = g_1 + .. + g_t and m = lg_C / 2, the factors
        exp(lg_t - m), exp(lg_{t-1} - m), exp(m - lg_t) (C, N) and exp(m) (N,)."""
        g = tl.where(mask, -tl.minimum(tl.exp(_ld(w_ptr, offs, mask)), FLOOR), 0.0)  # as _log_decay
        lg = tl.cumsum(g, axis=0)
        mid = 0.5 * tl.sum(g, axis=0)
        return g, tl.exp(lg - mid[None, :]), tl.exp(lg - g - mid[None, :]), tl.exp(mid[None, :] - lg), tl.exp(mid)

    @triton.jit
    def _tril(x, C: tl.constexpr, STRICT: tl.constexpr):
        """x (C, C) with its entries above the diagonal (and on it if STRICT) set to 0. Entries set aside may
        overflow (their factors do not cancel), so they are overwritten, never multiplied by a mask."""
        i = tl.arange(0, C)
        keep = i[:, None] > i[None, :] if STRICT else i[:, None] >= i[None, :]
        return tl.where(keep, x, 0.0)

    @triton.jit
    def _unit_lower_inverse(L, C: tl.constexpr):
        """(I - L)^-1 for strictly lower L (C, C) by forward substitution: row i is e_i + sum_{j<i} L[i, j] row j,
        and rows j < i are final when row i is made."""
        i = tl.arange(0, C)
        inv = (i[:, None] == i[None, :]).to(tl.float32)
        for row in range(1, C):
            l_row = tl.sum(tl.where(i[:, None] == row, L, 0.0), axis=0)  # (C,) L[row, :]
            inv = tl.where(i[:, None] == row, inv + tl.sum(l_row[:, None] * inv, axis=0)[None, :], inv)
        return inv

    @triton.jit
    def _tc_intra_kernel(
        r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # (B, T, H, N), input dtype
        W_ptr, U_ptr, Bt_ptr, Kt_ptr, Q_ptr,  # (B*H, NC * C, N) fp32: W, Uv, B_tail, K_tail, Q (if WITH_Q)
        dec_ptr,  # (B*H, NC, N) fp32 whole-chunk decay
        Ti_ptr,  # (B*H, NC, C, C) fp32 (I - Lab)^-1
        T, H, NC,
        N: tl.constexpr, C: tl.constexpr, FLOOR: tl.constexpr, WITH_Q: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        cols, i = tl.arange(0, N), tl.arange(0, C)
        offs, mask = _seq_offsets(bh, c, T, H, N, C, cols)
        g, e_q, e_p, e_k, e_m = _decay_factors(w_ptr, offs, mask, FLOOR)
        AQ = _ld(a_ptr, offs, mask) * e_p  # (C, N) a exp(lg_{t-1} - m)
        BQ = _ld(b_ptr, offs, mask) * e_k  # (C, N) b exp(m - lg_t)
        KQ = _ld(k_ptr, offs, mask) * e_k
        Ti = _unit_lower_inverse(_tril(_dot(AQ, tl.trans(BQ)), C, True), C)  # (C, C)
        W = _dot(Ti, AQ * e_m[None, :])  # (C, K) W = Tinv A_dec
        Uv = _dot(Ti, _dot(_tril(_dot(AQ, tl.trans(KQ)), C, True), _ld(v_ptr, offs, mask)))  # (C, V) Tinv Lak V
        rows = (bh * NC + c) * C * N + i[:, None] * N + cols[None, :]
        tl.store(W_ptr + rows, W)
        tl.store(U_ptr + rows, Uv)
        tl.store(Bt_ptr + rows, BQ * e_m[None, :])  # exp(m) = exp(lg_C - m)
        tl.store(Kt_ptr + rows, KQ * e_m[None, :])
        tl.store(dec_ptr + (bh * NC + c) * N + cols, e_m * e_m)
        tl.store(Ti_ptr + (bh * NC + c) * C * C + i[:, None] * C + i[None, :], Ti)
        if WITH_Q:  # the backward's dS0 = dY^T Q + .., as y = R_dec S0^T + Mrb (W S0^T + Uv) + ..
            RQ = _ld(r_ptr, offs, mask) * e_q
            tl.store(Q_ptr + rows, RQ * e_m[None, :] + _dot(_tril(_dot(RQ, tl.trans(BQ)), C, False), W))

    @triton.jit
    def _tc_state_fwd_kernel(
        v_ptr,  # (B, T, H, N), input dtype
        s0_ptr,  # (B*H, N, N) fp32 (unused if not HAS_S0)
        W_ptr, U_ptr, Bt_ptr, Kt_ptr, dec_ptr,  # from _tc_intra_kernel; U holds Uv and receives U
        states_ptr,  # (B*H, NC, N, N) fp32 state entering each chunk
        sT_ptr,  # (B*H, N, N) fp32
        T, H, NC,
        N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        vr = tl.program_id(1) * BV + tl.arange(0, BV)  # (BV,) value rows of this program
        cols, i = tl.arange(0, N), tl.arange(0, C)
        offs_s = vr[:, None] * N + cols[None, :]  # (BV, N) inside one state
        S = tl.load(s0_ptr + bh * N * N + offs_s) if HAS_S0 else tl.zeros((BV, N), dtype=tl.float32)
        for c in range(0, NC):
            tl.store(states_ptr + (bh * NC + c) * N * N + offs_s, S)
            base = (bh * NC + c) * C * N + i[:, None] * N
            offs, mask = _seq_offsets(bh, c, T, H, N, C, vr)
            U = _dot(tl.load(W_ptr + base + cols[None, :]), tl.trans(S)) + tl.load(U_ptr + base + vr[None, :])
            tl.store(U_ptr + base + vr[None, :], U)  # (C, BV) U = W S0^T + Uv
            S = (S * tl.load(dec_ptr + (bh * NC + c) * N + cols)[None, :]  # (BV, N) S0 D + U^T B_tail + V^T K_tail
                 + _dot(tl.trans(U), tl.load(Bt_ptr + base + cols[None, :]))
                 + _dot(tl.trans(_ld(v_ptr, offs, mask)), tl.load(Kt_ptr + base + cols[None, :])))
        tl.store(sT_ptr + bh * N * N + offs_s, S)

    @triton.jit
    def _tc_out_kernel(
        r_ptr, w_ptr, k_ptr, v_ptr, b_ptr,  # (B, T, H, N), input dtype
        U_ptr, states_ptr,  # U (B*H, NC * C, N), states (B*H, NC, N, N) fp32
        y_ptr,  # (B, T, H, N), input dtype
        T, H, NC,
        N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, FLOOR: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        cols, i = tl.arange(0, N), tl.arange(0, C)
        offs, mask = _seq_offsets(bh, c, T, H, N, C, cols)
        g, e_q, e_p, e_k, e_m = _decay_factors(w_ptr, offs, mask, FLOOR)
        RQ = _ld(r_ptr, offs, mask) * e_q  # (C, N) r exp(lg_t - m)
        Mrb = _tril(_dot(RQ, tl.trans(_ld(b_ptr, offs, mask) * e_k)), C, False)  # (C, C), diagonal r_t . b_t
        Mrk = _tril(_dot(RQ, tl.trans(_ld(k_ptr, offs, mask) * e_k)), C, False)
        for iv in range(0, N // BV):  # y = R_dec S0^T + Mrb U + Mrk V, one block of value rows at a time
            vr = iv * BV + tl.arange(0, BV)
            S0 = tl.load(states_ptr + (bh * NC + c) * N * N + vr[:, None] * N + cols[None, :])  # (BV, N)
            U = tl.load(U_ptr + (bh * NC + c) * C * N + i[:, None] * N + vr[None, :])  # (C, BV)
            offs_v, _ = _seq_offsets(bh, c, T, H, N, C, vr)
            y = _dot(RQ * e_m[None, :], tl.trans(S0)) + _dot(Mrb, U) + _dot(Mrk, _ld(v_ptr, offs_v, mask))
            tl.store(y_ptr + offs_v, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tc_state_bwd_kernel(
        dy_ptr,  # (B, T, H, N), any float dtype
        dsT_ptr,  # (B*H, N, N) fp32 (unused if not HAS_DST)
        W_ptr, Bt_ptr, Q_ptr, dec_ptr,  # from _tc_intra_kernel (WITH_Q)
        dSn_ptr,  # (B*H, NC, N, N) fp32 gradient of the state leaving each chunk
        ds0_ptr,  # (B*H, N, N) fp32
        T, H, NC,
        N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        vr = tl.program_id(1) * BV + tl.arange(0, BV)
        cols, i = tl.arange(0, N), tl.arange(0, C)
        offs_s = vr[:, None] * N + cols[None, :]
        dS = tl.load(dsT_ptr + bh * N * N + offs_s) if HAS_DST else tl.zeros((BV, N), dtype=tl.float32)
        for n in range(0, NC):
            c = NC - 1 - n
            tl.store(dSn_ptr + (bh * NC + c) * N * N + offs_s, dS)
            base = (bh * NC + c) * C * N + i[:, None] * N + cols[None, :]
            offs, mask = _seq_offsets(bh, c, T, H, N, C, vr)
            # (BV, N) dS0 = dY^T Q + dS D + (dS B_tail^T) W: S_C = S0 (D + W^T B_tail) + ..
            dS = (_dot(tl.trans(_ld(dy_ptr, offs, mask)), tl.load(Q_ptr + base))
                  + dS * tl.load(dec_ptr + (bh * NC + c) * N + cols)[None, :]
                  + _dot(_dot(dS, tl.trans(tl.load(Bt_ptr + base))), tl.load(W_ptr + base)))
        tl.store(ds0_ptr + bh * N * N + offs_s, dS)

    @triton.jit
    def _tc_grad_kernel(
        r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr,  # (B, T, H, N)
        W_ptr, U_ptr, Ti_ptr,  # from _tc_intra_kernel: U holds Uv
        states_ptr, dSn_ptr,  # (B*H, NC, N, N) fp32
        dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,  # (B, T, H, N), input dtype
        T, H, NC,
        N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, FLOOR: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        cols, i = tl.arange(0, N), tl.arange(0, C)
        offs, mask = _seq_offsets(bh, c, T, H, N, C, cols)
        g, e_q, e_p, e_k, e_m = _decay_factors(w_ptr, offs, mask, FLOOR)
        RQ, AQ = _ld(r_ptr, offs, mask) * e_q, _ld(a_ptr, offs, mask) * e_p  # (C, N)
        BQ, KQ = _ld(b_ptr, offs, mask) * e_k, _ld(k_ptr, offs, mask) * e_k
        Mrb, Mrk = _tril(_dot(RQ, tl.trans(BQ)), C, False), _tril(_dot(RQ, tl.trans(KQ)), C, False)  # (C, C)
        Lak = _tril(_dot(AQ, tl.trans(KQ)), C, True)
        Ti = tl.load(Ti_ptr + (bh * NC + c) * C * C + i[:, None] * C + i[None, :])
        W = tl.load(W_ptr + (bh * NC + c) * C * N + i[:, None] * N + cols[None, :])  # (C, K)
        Bt, Kt = BQ * e_m[None, :], KQ * e_m[None, :]  # tails
        # summed over the value blocks: d[Mrb | Mrk], d[Lab | Lak] (C, C); the products with the states (C, N)
        dMb, dMk = tl.zeros((C, C), dtype=tl.float32), tl.zeros((C, C), dtype=tl.float32)
        dLb, dLk = tl.zeros((C, C), dtype=tl.float32), tl.zeros((C, C), dtype=tl.float32)
        dRs, dAs = tl.zeros((C, N), dtype=tl.float32), tl.zeros((C, N), dtype=tl.float32)
        dBs, dKs = tl.zeros((C, N), dtype=tl.float32), tl.zeros((C, N), dtype=tl.float32)
        dD = tl.zeros((N,), dtype=tl.float32)  # d(whole-chunk decay)
        for iv in range(0, N // BV):
            vr = iv * BV + tl.arange(0, BV)
            sb = (bh * NC + c) * N * N + vr[:, None] * N + cols[None, :]
            S0, dSn = tl.load(states_ptr + sb), tl.load(dSn_ptr + sb)  # (BV, N)
            offs_v, _ = _seq_offsets(bh, c, T, H, N, C, vr)
            dy, v = _ld(dy_ptr, offs_v, mask), _ld(v_ptr, offs_v, mask)  # (C, BV)
            U = _dot(W, tl.trans(S0)) + tl.load(U_ptr + (bh * NC + c) * C * N + i[:, None] * N + vr[None, :])
            # U = Tinv X with X = A_dec S0^T + Lak V; U and V reach y (via M) and S_C (via the tails)
            dX = _dot(tl.trans(Ti), _dot(tl.trans(Mrb), dy) + _dot(Bt, tl.trans(dSn)))  # (C, BV)
            dv = _dot(tl.trans(Mrk), dy) + _dot(Kt, tl.trans(dSn)) + _dot(tl.trans(Lak), dX)
            tl.store(dv_ptr + offs_v, dv.to(dv_ptr.dtype.element_ty), mask=mask)
            dMb += _dot(dy, tl.trans(U))
            dMk += _dot(dy, tl.trans(v))
            dLb += _dot(dX, tl.trans(U))
            dLk += _dot(dX, tl.trans(v))
            dRs += _dot(dy, S0)  # d R_dec
            dAs += _dot(dX, S0)  # d A_dec
            dBs += _dot(U, dSn)  # d B_tail
            dKs += _dot(v, dSn)  # d K_tail
            dD += tl.sum(S0 * dSn, axis=0)
        dMb, dMk = _tril(dMb, C, False), _tril(dMk, C, False)
        dLb, dLk = _tril(dLb, C, True), _tril(dLk, C, True)
        # gradients of the factored rows: via the (C, C) matrices and via the products with the states
        dRQ = _dot(dMb, BQ) + _dot(dMk, KQ) + dRs * e_m[None, :]
        dAQ = _dot(dLb, BQ) + _dot(dLk, KQ) + dAs * e_m[None, :]
        dBQ = _dot(tl.trans(dMb), RQ) + _dot(tl.trans(dLb), AQ) + dBs * e_m[None, :]
        dKQ = _dot(tl.trans(dMk), RQ) + _dot(tl.trans(dLk), AQ) + dKs * e_m[None, :]
        tl.store(dr_ptr + offs, (dRQ * e_q).to(dr_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptr + offs, (dAQ * e_p).to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + offs, (dBQ * e_k).to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + offs, (dKQ * e_k).to(dk_ptr.dtype.element_ty), mask=mask)
        # log decays, m held constant (every product is invariant to it): a factor x exp(e) gives
        # de = d(factor) * factor. R and B, K rows feed lg_t, A rows lg_{t-1}; the tails and D feed lg_C.
        e_a = dAQ * AQ
        e_t = dRQ * RQ + e_a - dBQ * BQ - dKQ * KQ
        dlgC = tl.sum(dBs * Bt + dKs * Kt, axis=0) + dD * e_m * e_m  # (N,)
        dg = tl.cumsum(e_t, axis=0, reverse=True) - e_a + dlgC[None, :]  # lg_t sums g_1..g_t, lg_{t-1} one less
        dw = tl.where(g > -FLOOR, dg * g, 0.0)  # g = -exp(w), floored
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=mask)

    # The per-chunk kernels loop over value blocks of 16 rows, the fewest tl.dot takes: the gradient kernel holds
    # about 20 (C, N) fp32 tiles besides, and compiled for sm_90 it spills least at 16 rows and 8 warps.
    TC_BV, TC_WARPS = 16, 8

    def _tc_sizes(r, C, bv):
        """(B*H, NC, value-block size of the sequential kernels) for the chunked kernels."""
        B, T, H, N = r.shape
        bv, _ = _launch_params(N, bv, 1)
        if bv < 16:
            raise ValueError(f"bv={bv}: the chunked kernels need bv >= 16 (tl.dot takes no dim under 16)")
        return B * H, triton.cdiv(T, C), bv

    def _tc_intra(xs, C, with_q):
        """Run _tc_intra_kernel over the contiguous inputs xs = (r, w, k, v, a, b): per-chunk buffers."""
        B, T, H, N = xs[0].shape
        BH, NC = B * H, triton.cdiv(T, C)
        new = lambda *shape: torch.empty(BH, *shape, device=xs[0].device, dtype=torch.float32)
        p = dict(W=new(NC * C, N), U=new(NC * C, N), Bt=new(NC * C, N), Kt=new(NC * C, N), dec=new(NC, N),
                 Ti=new(NC, C, C))
        p["Q"] = new(NC * C, N) if with_q else p["W"]  # a dummy pointer when unused
        _tc_intra_kernel[(NC, BH)](*xs, p["W"], p["U"], p["Bt"], p["Kt"], p["Q"], p["dec"], p["Ti"], T, H, NC,
                                   N=N, C=C, FLOOR=DECAY_FLOOR, WITH_Q=with_q, num_warps=TC_WARPS)
        return p

    def _tc_fwd(xs, s0, C, bv):
        """Forward over contiguous xs = (r, w, k, v, a, b). Returns y (input dtype), sT (B, H, N, N) fp32 and
        the states entering each chunk (B*H, NC, N, N) fp32."""
        r, w, k, v, a, b = xs
        B, T, H, N = r.shape
        BH, NC, bv = _tc_sizes(r, C, bv)
        p = _tc_intra(xs, C, with_q=False)
        states = torch.empty(BH, NC, N, N, device=r.device, dtype=torch.float32)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        has_s0 = s0 is not None
        _tc_state_fwd_kernel[(BH, N // bv)](v, s0.float().contiguous() if has_s0 else sT, p["W"], p["U"], p["Bt"],
                                            p["Kt"], p["dec"], states, sT, T, H, NC, N=N, C=C, BV=bv,
                                            HAS_S0=has_s0, num_warps=TC_WARPS)
        y = torch.empty_like(r)
        _tc_out_kernel[(NC, BH)](r, w, k, v, b, p["U"], states, y, T, H, NC, N=N, C=C, BV=TC_BV,
                                 FLOOR=DECAY_FLOOR, num_warps=TC_WARPS)
        return y, sT, states

    def _tc_bwd(xs, states, dy, dsT, C, bv):
        """Backward from dy (B, T, H, N) and dsT (B, H, N, N), either None for zeros. Returns the six inputs'
        gradients (input dtype) and ds0 (B, H, N, N) fp32."""
        r = xs[0]
        B, T, H, N = r.shape
        BH, NC, bv = _tc_sizes(r, C, bv)
        p = _tc_intra(xs, C, with_q=True)
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dSn = torch.empty_like(states)
        ds0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        has_dst = dsT is not None
        _tc_state_bwd_kernel[(BH, N // bv)](dy, dsT.float().contiguous() if has_dst else ds0, p["W"], p["Bt"],
                                            p["Q"], p["dec"], dSn, ds0, T, H, NC, N=N, C=C, BV=bv,
                                            HAS_DST=has_dst, num_warps=TC_WARPS)
        dr, dw, dk, dv, da, db = (torch.empty_like(r) for _ in range(6))
        _tc_grad_kernel[(NC, BH)](*xs, dy, p["W"], p["U"], p["Ti"], states, dSn, dr, dw, dk, dv, da, db,
                                  T, H, NC, N=N, C=C, BV=TC_BV, FLOOR=DECAY_FLOOR, num_warps=TC_WARPS)
        return dr, dw, dk, dv, da, db, ds0

    class _WKV7TritonChunked(torch.autograd.Function):

        @staticmethod
        def forward(ctx, r, w, k, v, a, b, s0, C, bv):
            xs = [x.contiguous() for x in (r, w, k, v, a, b)]
            with _on_device(r):
                y, sT, states = _tc_fwd(xs, s0, C, bv)
            ctx.save_for_backward(*xs, states)
            ctx.s0_dtype = None if s0 is None else s0.dtype
            ctx.cfg = (C, bv)
            ctx.set_materialize_grads(False)  # keep dy / dsT as None when unused
            return y, sT

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dy, dsT):
            *xs, states = ctx.saved_tensors
            with _on_device(xs[0]):  # the backward may run with another device current
                *grads, ds0 = _tc_bwd(xs, states, dy, dsT, *ctx.cfg)
            return (*grads, None if ctx.s0_dtype is None else ds0.to(ctx.s0_dtype), None, None)


def wkv7_triton_chunked(r, w, k, v, a, b, initial_state=None, chunk=16, bv=None):
    """The chunked form as Triton kernels, forward and backward (fp16/bf16/fp32 inputs, fp32 state): the
    sequential part walks T / chunk chunks, not T steps. chunk is 16 or 32; bv (>= 16) tiles the value dim.
    Returns (y, final_state). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests).

    Decays too strong for `chunk`-step factors (see _plan_chunks) run on the step kernel `wkv7_triton`, which
    takes any decay. The choice is made per window of WINDOW chunks, as wkv7_chunked does, so that a burst of
    strong decays slows its own window only."""
    if triton is None:
        raise RuntimeError("wkv7_triton_chunked: Triton is not installed")
    _check_inputs(r, w, k, v, a, b, initial_state)
    if chunk not in (16, 32):
        raise ValueError(f"wkv7_triton_chunked: chunk must be 16 or 32, got {chunk}")
    if r.dtype == torch.float64:
        raise TypeError("wkv7_triton_chunked: float64 is not supported; use wkv7_chunked or wkv7_reference")
    with torch.no_grad():
        plan = _plan_chunks(_log_decay(w.detach().float()), chunk)

    def run(r, w, k, v, a, b, s0, C):
        if C == chunk:
            return _WKV7TritonChunked.apply(r, w, k, v, a, b, s0, C, bv)
        return _WKV7Triton.apply(r, w, k, v, a, b, s0, 16, None, None)
    return _by_windows(run, plan, (r, w, k, v, a, b), initial_state)


# --------------------------------------------------------------------------------------------------------
# Dispatch


def _check_inputs(r, w, k, v, a, b, initial_state):
    xs = dict(r=r, w=w, k=k, v=v, a=a, b=b)
    for name, x in (*xs.items(), ("initial_state", initial_state)):
        if not isinstance(x, torch.Tensor) and not (name == "initial_state" and x is None):
            raise TypeError(f"wkv7: {name} must be a tensor, got {type(x).__name__}")
    shapes = {tuple(x.shape) for x in xs.values()}
    if len(shapes) != 1 or r.dim() != 4:
        raise ValueError("wkv7: r, w, k, v, a, b must share one shape (B, T, H, N); got "
                         + ", ".join(f"{n}{tuple(x.shape)}" for n, x in xs.items()))
    B, T, H, N = r.shape
    if N not in HEAD_SIZES:
        raise ValueError(f"wkv7: head size N={N} is not supported; use one of {HEAD_SIZES}")
    if B * T * H == 0:
        raise ValueError(f"wkv7: empty input (B, T, H, N) = {(B, T, H, N)}")
    dtypes = {x.dtype for x in xs.values()}
    if len(dtypes) != 1 or r.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError("wkv7: r, w, k, v, a, b must share one floating dtype (fp16, bf16, fp32 or fp64); got "
                        + ", ".join(f"{n}:{x.dtype}" for n, x in xs.items()))
    devices = {x.device for x in xs.values()}
    if len(devices) != 1:
        raise ValueError("wkv7: r, w, k, v, a, b must be on one device; got "
                         + ", ".join(f"{n}:{x.device}" for n, x in xs.items()))
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, H, N, N):
            raise ValueError(f"wkv7: initial_state must have shape (B, H, N, N) = {(B, H, N, N)}, "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.device != r.device:
            raise ValueError(f"wkv7: initial_state is on {initial_state.device}, the inputs on {r.device}")
        if not initial_state.is_floating_point():
            raise TypeError(f"wkv7: initial_state must be floating point, got {initial_state.dtype}")


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """RWKV-7 recurrence over (B, T, H, N) inputs; differentiable in all six inputs and the initial state.

    initial_state: (B, H, N, N) as (value, key), or None for zeros. Returns (y, final_state): y (B, T, H, N) in
    the inputs' dtype; final_state (B, H, N, N) in float32 (float64 for float64 inputs), None unless
    output_final_state. Uses the chunked Triton kernels on CUDA when Triton is installed (the step kernel where
    decays are too strong for them), the chunked form elsewhere.
    """
    if isinstance(r, torch.Tensor) and r.is_cuda and triton is not None and r.dtype != torch.float64:
        y, state = wkv7_triton_chunked(r, w, k, v, a, b, initial_state)
    else:
        y, state = wkv7_chunked(r, w, k, v, a, b, initial_state)
    return y, (state if output_final_state else None)


# --------------------------------------------------------------------------------------------------------
# Benchmark: python rwkv7_kernel.py --bench


def rwkv7_inputs(B, T, H, N, dtype=torch.float32, device="cpu", requires_grad=False, seed=0):
    """Inputs in RWKV-7's own ranges: w soft-clamped to <= -0.5, a = -kk, b = kk * a_lr with unit kk."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, N, generator=gen)
    kk = F.normalize(rand(), dim=-1)
    xs = (rand() * 0.5, -F.softplus(-rand()) - 0.5, rand() * 0.5, rand() * 0.5, -kk, kk * torch.sigmoid(rand()))
    return [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in xs]


def _fla_paths():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        return {}
    # fla takes the log decay (-exp(w)) and keeps its state as (key, value)
    def wrap(fn):
        def run(r, w, k, v, a, b, initial_state=None):
            h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
            y, sT = fn(r, -torch.exp(w.float()).to(w.dtype), k, v, a, b, scale=1.0, initial_state=h0,
                       output_final_state=True)
            return y, sT.transpose(-1, -2)
        return run
    return {"fla_chunk": wrap(chunk_rwkv7), "fla_fused_recurrent": wrap(fused_recurrent_rwkv7)}


def bench(shapes, dtype, device, repeat=5):
    """Time fwd and fwd+bwd of every path available here; print ratios against the reference (and fla) and the
    largest errors against a float64 ground truth (y and final state; gradients relative to their largest entry)."""
    paths = {"reference": wkv7_reference, "chunked": wkv7_chunked}
    if device.type == "cuda":
        paths.update(_fla_paths())  # before ours, so that our rows can show the ratio to fla
    # on CPU the Triton paths run only when asked for with TRITON_INTERPRET=1 (slow: tiny shapes)
    if triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        paths.update(triton=wkv7_triton, triton_chunked=wkv7_triton_chunked)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, dtype {dtype}")
    print(f"{'B,T,H,N':>18} {'path':>20} {'fwd ms':>9} {'x ref':>6} {'fwd+bwd ms':>10} {'x ref':>6} {'x fla':>6} "
          f"{'y err':>8} {'grad err':>8}")
    for B, T, H, N in shapes:
        xs = rwkv7_inputs(B, T, H, N, dtype, device, requires_grad=True)
        s0 = (0.1 * torch.randn(B, H, N, N, device=device)).requires_grad_()
        dy = torch.randn(B, T, H, N, device=device, dtype=dtype)
        # the per-step loop keeps every state for autograd: above ~2^17 (b, t, h) steps it is not timed, and
        # the float64 ground truth comes from the chunked form (which the tests check against the loop)
        small = B * T * H <= 2 ** 17
        truth = [x.detach().double().requires_grad_() for x in (*xs, s0)]
        y_ref, s_ref = (wkv7_reference if small else wkv7_chunked)(*truth)
        g_ref = torch.autograd.grad([y_ref, s_ref], truth, [dy.double(), torch.ones_like(s_ref)])
        times = {}
        for name, fn in paths.items():
            if name == "reference" and not small:
                continue
            run = lambda: fn(*xs, s0)
            step = lambda: torch.autograd.grad(run(), [*xs, s0], [dy, torch.ones(B, H, N, N, device=device)])
            with torch.no_grad():
                t_f = min(time_calls(run, device, repeat))
            t_fb = min(time_calls(step, device, repeat))
            times[name] = (t_f, t_fb)
            y, sT = run()
            grads = step()
            y_err = max((y.double() - y_ref).abs().max().item(), (sT.double() - s_ref).abs().max().item())
            g_err = max(((g.double() - gr).abs().max() / gr.abs().max().clamp_min(1e-12)).item()
                        for g, gr in zip(grads, g_ref))
            ratio = lambda base, i: f"{times[base][i] / times[name][i]:6.1f}" if base in times else f"{'-':>6}"
            print(f"{str((B, T, H, N)):>18} {name:>20} {t_f * 1e3:9.2f} {ratio('reference', 0)} {t_fb * 1e3:10.2f} "
                  f"{ratio('reference', 1)} {ratio('fla_chunk', 1)} {y_err:8.1e} {g_err:8.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time every available path against the reference")
    parser.add_argument("--shapes", default=None,
                        help="semicolon-separated B,T,H,N list (default: 1,1024,4,64;4,1024,8,64 on CPU, "
                             "8,4096,16,64 and smaller on CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the best is kept")
    args = parser.parse_args()
    if not args.bench:
        parser.print_help()
        return
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    default = "1,1024,4,64;4,1024,8,64" if device.type == "cpu" else "1,1024,4,64;8,1024,16,64;8,4096,16,64"
    try:
        shapes = [tuple(int(n) for n in s.split(",")) for s in (args.shapes or default).split(";") if s.strip()]
        assert shapes and all(len(s) == 4 and min(s) >= 1 and s[3] in HEAD_SIZES for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes: expected B,T,H,N[;B,T,H,N...] with positive sizes and N in {HEAD_SIZES}, "
                     f"got {args.shapes!r}")
    bench(shapes, dtype, device, args.repeat)


if __name__ == "__main__":
    main()
