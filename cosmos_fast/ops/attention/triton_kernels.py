"""Triton kernels of cross-attention for short query sets (Lq <= 64) over long key sets.

One program owns ``PAIRS`` (sample, head) pairs and all of their queries: the tiles are 3-d ([pairs, rows,
columns]) and every product a batched ``tl.dot``, so a program has enough work to keep the tensor cores busy
even at Lq = 8 (a 16-row tile per pair would otherwise leave most of each program idle). Owning whole pairs
makes the backward a single pass with neither atomics nor a second kernel: walking the key blocks once, it
writes each block's dK and dV (no other program touches those keys) and accumulates dQ in registers. Keys
masked as padding, and the tail of the last block, get -inf logits; a sample whose keys are all masked stores
lse = +inf, so its output and every gradient are zero.

Tensors are [B, L, H, Dh] with heads adjacent and Dh contiguous (stride D and 1); the sample and token strides
are free, so K and V may be two views into one packed [B, L, 2, H, Dh] projection.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted
from ..triton_utils import dot_precision, mma, pow2_at_least_16

MAX_QUERIES = 64  # one program holds all queries of its pairs
MAX_HEAD_DIM = 128
ROWS_PER_PROGRAM = 64  # query rows (over all packed pairs) per program: PAIRS = ROWS_PER_PROGRAM // BLOCK_Q
TILE_BYTES = {"fwd": 32768, "bwd": 16384}  # shared memory per K or V tile (per pipeline stage)
# fp32's three-pass TF32 products stage query-sized tiles several times over: past this many query elements
# per pair (64 x 128 needs 270 KB even at the smallest key block) the backward exceeds an H100's shared memory
MAX_FP32_QUERY_TILE = 32 * 128


def supports(Lq: int, Dh: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this shape: Lq <= 64 and Dh <= 128, fp32 within MAX_FP32_QUERY_TILE."""
    if Lq > MAX_QUERIES or Dh > MAX_HEAD_DIM:
        return False
    return dtype != torch.float32 or pow2_at_least_16(Lq) * pow2_at_least_16(Dh) <= MAX_FP32_QUERY_TILE


@triton.jit
def _pairs(pid, n_pairs, H, PAIRS: tl.constexpr):
    """The program's (sample, head) pairs: index, sample, head and validity, each [PAIRS]."""
    pair = pid * PAIRS + tl.arange(0, PAIRS)
    valid = pair < n_pairs
    pair = tl.where(valid, pair, 0)  # the tail program's spare slots read pair 0 and store nothing
    return pair, (pair // H).to(tl.int64), pair % H, valid


@triton.jit
def _tile(b, h, offs_l, offs_d, D, sample_stride, token_stride):
    """Element offsets [PAIRS, len(offs_l), BLOCK_D] into a [B, L, H, D] tensor."""
    return ((b * sample_stride + h * D)[:, None, None] + offs_l[None, :, None].to(tl.int64) * token_stride
            + offs_d[None, None, :])


@triton.jit
def _in_bounds(valid, offs_l, L, offs_d, D):
    """The bounds mask of a tile: valid pairs, rows below L, columns below D."""
    return valid[:, None, None] & (offs_l < L)[None, :, None] & (offs_d < D)[None, None, :]


@triton.jit
def _logits(q, k, MASK, b, offs_k, Lk, scale, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
            PAIRS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scaled logits [PAIRS, BLOCK_Q, BLOCK_K] of the queries against one block of keys, -inf where masked."""
    s = scale * mma(q, tl.permute(k, (0, 2, 1)), tl.zeros((PAIRS, BLOCK_Q, BLOCK_K), tl.float32), PRECISION)
    key_ok = (offs_k < Lk)[None, :]
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b[:, None] * Lk + offs_k[None, :], mask=key_ok, other=1) == 0)
    return tl.where(key_ok[:, None, :], s, float("-inf"))


@triton.jit
def _key_block(q, K, V, MASK, b, h, valid, offs_k, offs_d, Lk, D, k_sb, k_sl, v_sb, v_sl, scale,
               HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, PAIRS: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One block of keys and values [PAIRS, BLOCK_K, BLOCK_D], the queries' logits against it, and its bounds."""
    kv_ok = _in_bounds(valid, offs_k, Lk, offs_d, D)
    k = tl.load(K + _tile(b, h, offs_k, offs_d, D, k_sb, k_sl), mask=kv_ok, other=0.0)
    v = tl.load(V + _tile(b, h, offs_k, offs_d, D, v_sb, v_sl), mask=kv_ok, other=0.0)
    return k, v, _logits(q, k, MASK, b, offs_k, Lk, scale, HAS_MASK, PRECISION, PAIRS, BLOCK_Q, BLOCK_K), kv_ok


@triton.jit
def _fwd_kernel(Q, K, V, MASK, O, LSE, n_pairs, Lq, Lk, H, D, q_sb, q_sl, k_sb, k_sl, v_sb, v_sl, o_sb, o_sl,
                scale, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pair, b, h, valid = _pairs(tl.program_id(0), n_pairs, H, PAIRS)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = _tile(b, h, offs_q, offs_d, D, q_sb, q_sl)
    q_ok = _in_bounds(valid, offs_q, Lq, offs_d, D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    m_i = tl.full((PAIRS, BLOCK_Q), float("-inf"), tl.float32)
    l_i = tl.zeros((PAIRS, BLOCK_Q), tl.float32)
    acc = tl.zeros((PAIRS, BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k, v, s, _ = _key_block(q, K, V, MASK, b, h, valid, offs_k, offs_d, Lk, D, k_sb, k_sl, v_sb, v_sl, scale,
                                HAS_MASK, PRECISION, PAIRS, BLOCK_Q, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp() away from -inf - -inf
        p = tl.exp(s - m_safe[:, :, None])
        rescale = tl.exp(m_i - m_safe)
        acc = mma(p.to(v.dtype), v, acc * rescale[:, :, None], PRECISION)
        l_i = l_i * rescale + tl.sum(p, 2)
        m_i = m_new
    has_key = l_i > 0
    out = tl.where(has_key[:, :, None], acc / tl.where(has_key, l_i, 1.0)[:, :, None], 0.0)
    o_offs = _tile(b, h, offs_q, offs_d, D, o_sb, o_sl)
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_ok)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + pair[:, None] * Lq + offs_q[None, :], lse, mask=valid[:, None] & (offs_q < Lq)[None, :])


@triton.jit
def _bwd_kernel(Q, K, V, MASK, O, DO, LSE, DQ, DK, DV, n_pairs, Lq, Lk, H, D,
                q_sb, q_sl, k_sb, k_sl, v_sb, v_sl, o_sb, o_sl, dk_sb, dk_sl, dv_sb, dv_sl, scale,
                HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pair, b, h, valid = _pairs(tl.program_id(0), n_pairs, H, PAIRS)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = _tile(b, h, offs_q, offs_d, D, q_sb, q_sl)
    q_ok = _in_bounds(valid, offs_q, Lq, offs_d, D)
    o_offs = _tile(b, h, offs_q, offs_d, D, o_sb, o_sl)  # O, dO and dQ share O's layout
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    do = tl.load(DO + o_offs, mask=q_ok, other=0.0)
    o = tl.load(O + o_offs, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 2)  # rowsum(dO * O) = sum_j P_ij dP_ij
    lse = tl.load(LSE + pair[:, None] * Lq + offs_q[None, :], mask=valid[:, None] & (offs_q < Lq)[None, :],
                  other=float("inf"))
    dq = tl.zeros((PAIRS, BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k, v, s, kv_ok = _key_block(q, K, V, MASK, b, h, valid, offs_k, offs_d, Lk, D, k_sb, k_sl, v_sb, v_sl, scale,
                                    HAS_MASK, PRECISION, PAIRS, BLOCK_Q, BLOCK_K)
        p = tl.exp(s - lse[:, :, None])  # 0 for masked keys and for samples without keys (lse = inf)
        dv = mma(tl.permute(p, (0, 2, 1)).to(do.dtype), do, tl.zeros((PAIRS, BLOCK_K, BLOCK_D), tl.float32),
                 PRECISION)
        dv_offs = _tile(b, h, offs_k, offs_d, D, dv_sb, dv_sl)
        tl.store(DV + dv_offs, dv.to(DV.dtype.element_ty), mask=kv_ok)
        dp = mma(do, tl.permute(v, (0, 2, 1)), tl.zeros((PAIRS, BLOCK_Q, BLOCK_K), tl.float32), PRECISION)
        ds = p * (dp - delta[:, :, None]) * scale
        dk = mma(tl.permute(ds, (0, 2, 1)).to(q.dtype), q, tl.zeros((PAIRS, BLOCK_K, BLOCK_D), tl.float32),
                 PRECISION)
        dk_offs = _tile(b, h, offs_k, offs_d, D, dk_sb, dk_sl)
        tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=kv_ok)
        dq = mma(ds.to(k.dtype), k, dq, PRECISION)
    dq_offs = _tile(b, h, offs_q, offs_d, D, o_sb, o_sl)
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=q_ok)


def _first_config(kind: str, Lq: int, D: int, n_pairs: int, element_size: int) -> dict:
    """Pairs packed to ROWS_PER_PROGRAM query rows, key blocks sized to the shared-memory budget."""
    block_q, block_d = pow2_at_least_16(Lq), pow2_at_least_16(D)
    pairs = min(max(1, ROWS_PER_PROGRAM // block_q), triton.next_power_of_2(n_pairs))
    if triton_interpreted():
        block_k = 128  # the interpreter pays per step: few, large key blocks
    else:
        block_k = 64
        while block_k > 16 and pairs * block_k * block_d * element_size > TILE_BYTES[kind]:
            block_k //= 2
    return dict(PAIRS=pairs, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _smaller(config: dict) -> dict | None:
    """The next config to try when one needs more shared memory than the GPU has (fp32's three-pass TF32
    products need several times bf16's): smaller key blocks, then fewer pairs, then no pipelining."""
    if config["BLOCK_K"] > 16:
        return dict(config, BLOCK_K=config["BLOCK_K"] // 2)
    if config["PAIRS"] > 1:
        return dict(config, PAIRS=config["PAIRS"] // 2)
    if config["num_stages"] > 1:
        return dict(config, num_stages=1)
    return None


_CONFIGS: dict[tuple, dict] = {}  # the config that fits, per (kernel, dtype, Lq, D, mask, device, first pairs)


def _launch(kernel, kind: str, x: torch.Tensor, n_pairs: int, args: tuple, has_mask: bool) -> None:
    Lq, D = x.shape[1], x.shape[3]
    first = _first_config(kind, Lq, D, n_pairs, x.element_size())
    key = (kind, x.dtype, Lq, D, has_mask, x.device, first["PAIRS"])
    config = _CONFIGS.get(key, first)
    while True:
        try:
            kernel[(triton.cdiv(n_pairs, config["PAIRS"]),)](*args, HAS_MASK=has_mask,
                                                               PRECISION=dot_precision(x.dtype), **config)
        except triton.runtime.errors.OutOfResources:
            config = _smaller(config)
            if config is None:
                raise
            continue
        _CONFIGS[key] = config
        return


def _mask_arg(key_padding_mask, like):
    # a byte per key (1 = padding); the slot needs a pointer even without a mask
    return like if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()


def _heads_packed(x: torch.Tensor) -> torch.Tensor:
    """x itself when its heads are adjacent with Dh contiguous (any sample and token strides), else a copy."""
    H, D = x.shape[2], x.shape[3]
    return x if x.stride(3) == 1 and (x.stride(2) == D or H == 1) else x.contiguous()


def _strides(x):
    return x.stride(0), x.stride(1)


def cross_attention_fwd(q, k, v, key_padding_mask, scale):
    """(out [B, Lq, H, Dh] contiguous, lse [B * H, Lq] fp32) of q [B, Lq, H, Dh] over k, v [B, Lk, H, Dh]."""
    q, k, v = _heads_packed(q), _heads_packed(k), _heads_packed(v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, Lq, dtype=torch.float32, device=q.device)
    _launch(_fwd_kernel, "fwd", q, B * H, (q, k, v, _mask_arg(key_padding_mask, q), out, lse, B * H, Lq, Lk, H, D,
                                           *_strides(q), *_strides(k), *_strides(v), *_strides(out), float(scale)),
            key_padding_mask is not None)
    return out, lse


def cross_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, scale, grad_k=None, grad_v=None):
    """(dq, dk, dv). ``out`` is the forward's (contiguous); dk and dv are written into ``grad_k``/``grad_v``
    when given (views with heads packed, e.g. into one [B, Lk, 2, H, Dh] buffer)."""
    q, k, v = _heads_packed(q), _heads_packed(k), _heads_packed(v)
    grad_out = grad_out.contiguous()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dq = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Lk, H, D, dtype=k.dtype, device=k.device) if grad_k is None else grad_k
    dv = torch.empty(B, Lk, H, D, dtype=v.dtype, device=v.device) if grad_v is None else grad_v
    _launch(_bwd_kernel, "bwd", q, B * H,
            (q, k, v, _mask_arg(key_padding_mask, q), out, grad_out, lse, dq, dk, dv, B * H, Lq, Lk, H, D,
             *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dk), *_strides(dv), float(scale)),
            key_padding_mask is not None)
    return dq, dk, dv
