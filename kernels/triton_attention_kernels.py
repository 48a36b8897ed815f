"""The Triton kernels of ``kernels/triton_attention.py`` (launchers, autograd and custom ops live there).

Flash-attention structure, softmax in base 2 (scores scaled by log2(e) / sqrt(head_dim) inside exp2's multiply-add):
the forward, an online softmax over key blocks, one program per (query block, batch x head); the backward recomputes
the probabilities from the saved log-sum-exp, one program per (query block, batch x head) for dq, which also stores
its rows' rowsum(dout * out), then one per (key block, batch x head) for dk / dv, so nothing is accumulated with
atomics (deterministic). A sequence that fits one tile (the encoders' 50 tokens) takes one backward program per batch
x head, which computes the probabilities and their gradient once. Only a sequence's last, partial block is masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32. PRECISION "upcast" (bf16 under the interpreter, whose bf16 tl.dot multiplies the
    raw bits): the operands as float32; a bf16 x bf16 product is exact in float32, so this is the tensor cores'
    arithmetic up to the order of the sums."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _head_coords(tokens, heads, sb, sh, BLOCK: tl.constexpr):
    """This program's (batch x head index, batch, head, offset of its q in the packed tensor, first row of its tile);
    k and v follow q at +s3 and +2 s3. A one-axis grid of batch x heads x tiles, tiles fastest: the tiles of one head
    run together (its k / v stay in L2) and batch x heads is not bound by the 65,535 programs of a grid's y axis."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(tokens, BLOCK)
    batch_head = pid // tiles
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    return batch_head, batch, head, batch * sb + head * sh, (pid % tiles) * BLOCK


@triton.jit
def _load_block(ptrs, mask, MASKED: tl.constexpr):
    """A tile read through ``mask`` (zeros outside) only in a sequence's last, partial block; the full blocks read
    unmasked (their mask, unused, is compiled away)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_key_block(q, acc, row_max, row_sum, k_ptrs, v_ptrs, keys, tokens, sn, qk_scale,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax. Only the last block of a sequence (MASKED) pays for the key mask; the
    scale is applied inside the exponent's multiply-add (the row maximum of the unscaled scores, scaled once)."""
    n_mask = keys < tokens
    scores = _mma(q, _load_block(k_ptrs + keys[None, :].to(tl.int64) * sn, n_mask[None, :], MASKED), PRECISION)
    if MASKED:
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1) * qk_scale)
    p = tl.exp2(scores * qk_scale - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    v = _load_block(v_ptrs + keys[:, None].to(tl.int64) * sn, n_mask[:, None], MASKED)
    return acc * rescale[:, None] + _mma(p.to(v.dtype), v, PRECISION), new_max, row_sum


@triton.jit
def attn_fwd_kernel(QKV, OUT, LSE, tokens, heads, sb, sn, s3, sh, ob, on, oh, qk_scale,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_M)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    m_mask = offs_m < tokens
    q = tl.load(QKV + base + offs_m[:, None].to(tl.int64) * sn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    k_ptrs = QKV + base + s3 + offs_d[:, None]  # k read transposed: (HEAD_D, BLOCK_N)
    v_ptrs = QKV + base + 2 * s3 + offs_d[None, :]
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    whole = tokens - tokens % BLOCK_N  # the keys of the full blocks
    for start in range(0, whole, BLOCK_N):
        acc, row_max, row_sum = _fwd_key_block(q, acc, row_max, row_sum, k_ptrs, v_ptrs, start + offs_n, tokens, sn,
                                               qk_scale, False, PRECISION)
    if whole < tokens:
        acc, row_max, row_sum = _fwd_key_block(q, acc, row_max, row_sum, k_ptrs, v_ptrs, whole + offs_n, tokens, sn,
                                               qk_scale, True, PRECISION)
    acc = acc / row_sum[:, None]
    out_ptrs = OUT + batch * ob + head * oh + offs_m[:, None].to(tl.int64) * on
    tl.store(out_ptrs + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=m_mask[:, None])
    # The log-sum-exp of the scaled scores, base 2: the backward's probabilities are exp2(score - lse).
    tl.store(LSE + batch_head.to(tl.int64) * tokens + offs_m, row_max + tl.log2(row_sum), mask=m_mask)


@triton.jit
def _dkdv_query_block(k, v, dk, dv, q_ptrs, dout_ptrs, lse_ptrs, rowdot_ptrs, queries, tokens, sn, dn, qk_scale,
                      MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dk's and dv's sums over one query block, with p^T (BLOCK_N, BLOCK_M) unmasked: a padded query (zero q, dout,
    lse and row-dot, read so in the last block) adds nothing to dv (its dout is zero) nor to dk (its dp - rowdot is
    zero); a padded key's row, finite or not, is never stored."""
    m_mask = queries < tokens
    rows = queries[:, None].to(tl.int64)
    q = _load_block(q_ptrs + rows * sn, m_mask[:, None], MASKED)
    lse = _load_block(lse_ptrs + queries, m_mask, MASKED)
    pt = tl.exp2(_mma(k, tl.trans(q), PRECISION) * qk_scale - lse[None, :])
    dout = _load_block(dout_ptrs + rows * dn, m_mask[:, None], MASKED)
    dv += _mma(pt.to(dout.dtype), dout, PRECISION)
    rowdot = _load_block(rowdot_ptrs + queries, m_mask, MASKED)
    dst = pt * (_mma(v, tl.trans(dout), PRECISION) - rowdot[None, :])
    return dk + _mma(dst.to(q.dtype), q, PRECISION), dv


@triton.jit
def attn_bwd_dkdv_kernel(QKV, DOUT, LSE, ROWDOT, DQKV, tokens, heads, sb, sn, s3, sh, db, dn, dh,
                         gb, gn, g3, gh, qk_scale, sm_scale,
                         HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of one key block: a walk over every query block, the probabilities recomputed transposed."""
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_N)
    offs_n = first + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    n_mask = offs_n < tokens
    keys = offs_n[:, None].to(tl.int64) * sn + offs_d[None, :]
    k = tl.load(QKV + base + s3 + keys, mask=n_mask[:, None], other=0.0)
    v = tl.load(QKV + base + 2 * s3 + keys, mask=n_mask[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_D), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_D), tl.float32)
    q_ptrs = QKV + base + offs_d[None, :]
    dout_ptrs = DOUT + batch * db + head * dh + offs_d[None, :]
    stats = batch_head.to(tl.int64) * tokens
    whole = tokens - tokens % BLOCK_M  # the queries of the full blocks
    for start in range(0, whole, BLOCK_M):
        dk, dv = _dkdv_query_block(k, v, dk, dv, q_ptrs, dout_ptrs, LSE + stats, ROWDOT + stats, start + offs_m,
                                   tokens, sn, dn, qk_scale, False, PRECISION)
    if whole < tokens:
        dk, dv = _dkdv_query_block(k, v, dk, dv, q_ptrs, dout_ptrs, LSE + stats, ROWDOT + stats, whole + offs_m,
                                   tokens, sn, dn, qk_scale, True, PRECISION)
    grads = DQKV + batch * gb + head * gh + offs_n[:, None].to(tl.int64) * gn + offs_d[None, :]
    tl.store(grads + g3, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=n_mask[:, None])
    tl.store(grads + 2 * g3, dv.to(DQKV.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _dq_key_block(q, dout, lse, rowdot, dq, k_ptrs, s3, keys, tokens, sn, qk_scale,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dq's sum over one key block; only the last block of a sequence (MASKED) reads through the key mask and zeroes
    the padded keys' probabilities (their k is zero, but exp2(-lse) may overflow, and inf * 0 would reach dq)."""
    cols = keys[None, :].to(tl.int64) * sn
    n_mask = keys < tokens
    kt = _load_block(k_ptrs + cols, n_mask[None, :], MASKED)
    vt = _load_block(k_ptrs + s3 + cols, n_mask[None, :], MASKED)
    p = tl.exp2(_mma(q, kt, PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(n_mask[None, :], p, 0.0)
    ds = p * (_mma(dout, vt, PRECISION) - rowdot[:, None])
    return dq + _mma(ds.to(kt.dtype), tl.trans(kt), PRECISION)


@triton.jit
def attn_bwd_dq_kernel(QKV, OUT, DOUT, LSE, ROWDOT, DQKV, tokens, heads, sb, sn, s3, sh, ob, on, oh, db, dn, dh,
                       gb, gn, g3, gh, qk_scale, sm_scale,
                       HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one query block, a walk over every key block; first the block's rowsum(dout * out) (the softmax
    backward's correction, float32), which it also stores for the dk / dv kernel launched after it."""
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_M)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    m_mask = offs_m < tokens
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(QKV + base + rows * sn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    dout = tl.load(DOUT + batch * db + head * dh + rows * dn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    out = tl.load(OUT + batch * ob + head * oh + rows * on + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    rowdot = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    stats = batch_head.to(tl.int64) * tokens
    tl.store(ROWDOT + stats + offs_m, rowdot, mask=m_mask)
    lse = tl.load(LSE + stats + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    k_ptrs = QKV + base + s3 + offs_d[:, None]  # k and v read transposed: (HEAD_D, BLOCK_N)
    whole = tokens - tokens % BLOCK_N  # the keys of the full blocks
    for start in range(0, whole, BLOCK_N):
        dq = _dq_key_block(q, dout, lse, rowdot, dq, k_ptrs, s3, start + offs_n, tokens, sn, qk_scale, False,
                           PRECISION)
    if whole < tokens:
        dq = _dq_key_block(q, dout, lse, rowdot, dq, k_ptrs, s3, whole + offs_n, tokens, sn, qk_scale, True,
                           PRECISION)
    tl.store(DQKV + batch * gb + head * gh + rows * gn + offs_d[None, :], (dq * sm_scale).to(DQKV.dtype.element_ty),
             mask=m_mask[:, None])


@triton.jit
def attn_bwd_tile_kernel(QKV, OUT, DOUT, LSE, DQKV, tokens, heads, sb, sn, s3, sh, ob, on, oh, db, dn, dh,
                         gb, gn, g3, gh, qk_scale, sm_scale,
                         HEAD_D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk and dv of one head whose whole sequence fits one BLOCK-row tile: the probabilities and their gradient
    computed once (the split kernels recompute both, one pair of products each), five products instead of seven."""
    batch_head, batch, head, base, _ = _head_coords(tokens, heads, sb, sh, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    mask = offs < tokens
    rows = offs[:, None].to(tl.int64)
    tile = rows * sn + offs_d[None, :]
    q = tl.load(QKV + base + tile, mask=mask[:, None], other=0.0)
    k = tl.load(QKV + base + s3 + tile, mask=mask[:, None], other=0.0)
    v = tl.load(QKV + base + 2 * s3 + tile, mask=mask[:, None], other=0.0)
    dout = tl.load(DOUT + batch * db + head * dh + rows * dn + offs_d[None, :], mask=mask[:, None], other=0.0)
    out = tl.load(OUT + batch * ob + head * oh + rows * on + offs_d[None, :], mask=mask[:, None], other=0.0)
    rowdot = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    lse = tl.load(LSE + batch_head.to(tl.int64) * tokens + offs, mask=mask, other=0.0)
    p = tl.exp2(_mma(q, tl.trans(k), PRECISION) * qk_scale - lse[:, None])
    p = tl.where(mask[:, None] & mask[None, :], p, 0.0)  # (queries, keys)
    grads = DQKV + batch * gb + head * gh + rows * gn + offs_d[None, :]
    dv = _mma(tl.trans(p.to(dout.dtype)), dout, PRECISION)
    tl.store(grads + 2 * g3, dv.to(DQKV.dtype.element_ty), mask=mask[:, None])
    ds = (p * (_mma(dout, tl.trans(v), PRECISION) - rowdot[:, None])).to(q.dtype)
    dq = _mma(ds, k, PRECISION)
    tl.store(grads, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=mask[:, None])
    dk = _mma(tl.trans(ds), q, PRECISION)
    tl.store(grads + g3, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=mask[:, None])
