"""The CPU forms of a frozen layer's code matmul (see ``fraqat_jax.nn.freeze``): ``x`` float32
(integer activation codes or float inputs) times stored weight codes (packed uint8 nibbles, int8 or
int4), by blocks of kernel rows so that the widened kernel is never written whole. ``blocked``: a
scan of float32 dots on widened blocks; ``fused``: a loop of elementwise fusions that XLA:CPU splits
between threads. Both give exact integer sums under :func:`exact_in_float32`'s bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


EXACT_FLOAT_SUM = 2**24  # float32 holds every integer of smaller magnitude


def exact_in_float32(group: int, packed: bool) -> bool:
    """Whether a float32 dot of int8 activation codes (|q| <= 128) and weight codes over ``group``
    terms keeps every partial sum an exact integer (weight codes |q| <= 8 packed, <= 128 int8)."""
    return group * 128 * (8 if packed else 128) < EXACT_FLOAT_SUM


def block_rows(group: int, n_out: int, tokens: int) -> int:
    """Kernel rows per block of the blocked form: the largest divisor of ``group`` whose widened
    float32 block (rows x ``n_out``) holds at most 2**17 values (512 KiB) for up to 16 tokens, 2**19
    beyond (a longer input reuses each block more, so a bigger one pays)."""
    budget = 2**17 if tokens <= 16 else 2**19
    target = max(1, budget // max(n_out, 1))
    return _largest_divisor(group, target)


def blocked_code_matmul(x, stored, shape, packed: bool) -> jax.Array:
    """``x (M, G, g)`` float32 times the stored codes of a ``shape = (in, out)`` kernel grouped as
    ``(G, g, out)`` -> ``(M, G, out)`` float32, by a scan over blocks of :func:`block_rows` rows
    (packed codes need an even ``out``: each row then holds whole nibble pairs)."""
    m, n_groups, g = x.shape
    n_out = shape[1]
    cols = n_out // 2 if packed else n_out
    rows = block_rows(g, n_out, m)
    steps = g // rows
    w = stored.reshape(n_groups, steps, rows, cols)
    xb = x.reshape(m, n_groups, steps, rows).transpose(1, 2, 0, 3)  # (G, steps, M, rows)

    def group(xg, wg):
        if steps == 1:
            parts = _block_products(xg[0], wg[0], packed)
        else:
            def step(acc, blk):
                return tuple(a + p for a, p in zip(acc, _block_products(blk[0], blk[1], packed))), None
            zero = jnp.zeros((m, cols), jnp.float32)
            parts, _ = lax.scan(step, (zero,) * (2 if packed else 1), (xg, wg))
        return jnp.stack(parts, -1).reshape(m, n_out)

    y = group(xb[0], w[0])[None] if n_groups == 1 else lax.map(lambda a: group(*a), (xb, w))
    return y.transpose(1, 0, 2)


FUSED_ROWS = 32  # at most this many kernel rows summed per step of the fused loop (unrolled: compiles longer)
FUSED_CHUNKS = 8  # at most this many column chunks (the outer dimension XLA:CPU splits between threads)
FUSED_MIN_WIDTH = 128  # of at least this many columns each (the vectorized inner dimension)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _float_codes(block, packed: bool, high: bool, offset: float = 8.0) -> jax.Array:
    """Codes of a block of stored codes as float32: the low (``high=False``) or high nibbles of packed
    bytes as ``q + 8 - offset`` (the signed code q for the default offset), or the int8 codes."""
    if not packed:
        return block.astype(jnp.float32)
    u = block ^ jnp.uint8(0x88)  # each two's complement nibble q becomes q + 8 in [0, 15]
    u = ((u >> jnp.uint8(4)) if high else (u & jnp.uint8(15))).astype(jnp.float32)
    return u - offset if offset else u


def _block_products(x, w, packed):
    """``x (M, rows) @ codes (rows, cols)`` in float32: for packed codes the (even, odd) output
    columns, else the one product."""
    return tuple(x @ _float_codes(w, packed, high) for high in ((False, True) if packed else (False,)))


def _pairwise_sum(terms):
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def fused_code_matmul(x, stored, shape, packed: bool) -> jax.Array:
    """The same product as :func:`blocked_code_matmul` (``x (M, G, g)`` float32 times the stored codes
    of a ``shape = (in, out)`` kernel grouped as ``(G, g, out)`` -> ``(M, G, out)`` float32), for very
    few input rows: a loop over blocks of at most :data:`FUSED_ROWS` kernel rows whose step is one
    elementwise fusion, ``acc + sum_r x[:, r] * codes[r]``, with each row's codes widened inside the
    sum. No widened block is written to memory, and the output columns are split into at most
    :data:`FUSED_CHUNKS` chunks of at least :data:`FUSED_MIN_WIDTH` columns (where ``out`` allows),
    laid out as the outer dimension, which XLA:CPU divides between its threads. Every input row
    widens the codes again, so it is meant for a single row. Packed codes need an even
    ``out``. Sums are exact under the bound of :func:`exact_in_float32`."""
    m, n_groups, g = x.shape
    n_out = shape[1]
    cols = n_out // 2 if packed else n_out
    rows = _largest_divisor(g, FUSED_ROWS)
    steps = g // rows
    chunks = _largest_divisor(cols, min(FUSED_CHUNKS, max(1, cols // FUSED_MIN_WIDTH)))
    width = cols // chunks
    w = stored.reshape(n_groups, steps, rows, chunks, width)
    xs = x.reshape(m, n_groups, steps, rows).transpose(1, 2, 3, 0)  # (G, steps, rows, M)
    planes = (False, True) if packed else (False,)  # packed: even and odd output columns
    # Packed codes are summed as q + 8 in [0, 15] (one operation less per code) and 8 * sum(x) taken
    # off at the end, while those sums stay exact: |x| <= 128 (int8 codes) times 15 per term.
    offset = 0.0 if packed and g * 128 * 15 < EXACT_FLOAT_SUM else 8.0

    def block_sum(block, xb, high):  # (rows, chunks, width) codes, (rows, M) inputs -> (chunks, M, width)
        return _pairwise_sum([xb[r][None, :, None] * _float_codes(block[r], packed, high, offset)[:, None, :]
                              for r in range(rows)])

    def group(xg, wg):
        def step(i, acc):
            xb = lax.dynamic_index_in_dim(xg, i, keepdims=False)
            block = lax.dynamic_index_in_dim(wg, i, keepdims=False)
            return tuple(a + block_sum(block, xb, high) for a, high in zip(acc, planes))
        zero = jnp.zeros((chunks, m, width), jnp.float32)
        acc = lax.fori_loop(0, steps, step, (zero,) * len(planes))
        if packed and not offset:
            shift = 8.0 * xg.sum((0, 1))[None, :, None]  # (1, M, 1): 8 * sum(x) per input row
            acc = tuple(a - shift for a in acc)
        return jnp.stack(acc, -1).transpose(1, 0, 2, 3).reshape(m, n_out)  # column = (chunk, col, plane)

    y = group(xs[0], w[0])[None] if n_groups == 1 else lax.map(lambda a: group(*a), (xs, w))
    return y.transpose(1, 0, 2)
