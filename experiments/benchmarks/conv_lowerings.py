"""One 3x3 'SAME' convolution, forward + backward, under candidate lowerings: one model, vmap
over M models, and M models written out in one jit ("unroll").

    python experiments/benchmarks/conv_lowerings.py --batch=128 --size=16 --channels=64 --models=4

About 4 minutes on an idle 2-core CPU. Result there (GFLOP/s, one model / vmap / unroll):
xla 18.0 / 3.4 / 24.2, im2col 54.4 / 55.2 / 55.7, row_shift 41.4 / 39.9 / 40.3,
shifted9 38.7 / 37.8 / 38.2, xla_fwd_im2col_wgrad 43.0 / 17.5 / 52.3 (BENCHMARKS.md).
winograd (F(2x2,3x3)), two idle runs of --lowerings=im2col,winograd: 63.3 / 60.6 / 64.5 and
59.4 / 57.2 / 58.5, against im2col's 60.8 / 54.2 / 58.4 and 50.9 / 50.6 / 55.4 in the same runs.
"xla" and "im2col" are jaxmem's layers.CONV_IMPLS; the others were candidates that avoid
im2col's 9x column buffer (winograd: 2.25x of the multiplications) and lost to it or won
too little to adopt (BENCHMARKS.md), kept
here so the comparison can be rerun elsewhere (tests/test_benchmarks.py checks they agree).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.models.layers import conv2d, im2col_columns
from jaxmem.timing import seconds_per_jitted_call
from jaxmem.train import lowering


def row_shift(x, kernel):
    """Nine dots on contiguous row ranges of the flattened padded input: shift (i, j) is an
    offset of i*(W+2)+j rows; outputs are computed on the padded grid and cropped."""
    batch, height, width, _ = x.shape
    padded_width = width + 2
    flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, x.shape[-1])
    rows = flat.shape[0] - 2 * padded_width - 2
    out = sum(flat[i * padded_width + j:i * padded_width + j + rows] @ kernel[i, j]
              for i in range(3) for j in range(3))
    out = jnp.pad(out, ((0, 2 * padded_width + 2), (0, 0)))
    return out.reshape(batch, height + 2, padded_width, -1)[:, :height, :width]


def shifted9(x, kernel):
    """Nine dots on 2-d shifted slices of the padded input."""
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i:i + height, j:j + width] @ kernel[i, j]
               for i in range(3) for j in range(3))


@jax.custom_vjp
def xla_fwd_im2col_wgrad(x, kernel):
    """lax.conv forward and input gradient; weight gradient as one im2col matmul."""
    return conv2d(x, kernel, 1, "xla")


def _forward(x, kernel):
    return conv2d(x, kernel, 1, "xla"), (x, kernel)


def _backward(saved, dy):
    x, kernel = saved
    dx = conv2d(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1, "xla")
    columns = im2col_columns(x, 3, 3, 1)
    dk = columns.reshape(-1, columns.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    return dx, dk.reshape(kernel.shape)


xla_fwd_im2col_wgrad.defvjp(_forward, _backward)

# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): G transforms the kernel; B^T (input) and A^T
# (output) have entries 0 and +-1, so they are written as sums of slices.
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_in(d):
    """B^T d over the first index of four arrays."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_out(m):
    """A^T m over the first index of four arrays."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd(x, kernel):
    """F(2x2, 3x3) for even H, W: the 4x4 input tile under each 2x2 output block goes through
    B^T . B, sixteen [tiles, Ci] x [Ci, Co] products with G g G^T replace the nine of a direct
    conv (2.25x fewer multiplications), and A^T . A gives the 2x2 outputs."""
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"winograd needs an even height and width, got {height}x{width}")
    tiles_h, tiles_w = height // 2, width // 2
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = _winograd_in([padded[:, i:i + 2 * tiles_h:2] for i in range(4)])
    tiles = [v for row in rows
             for v in _winograd_in([row[:, :, j:j + 2 * tiles_w:2] for j in range(4)])]
    g = jnp.asarray(WINOGRAD_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, channels, -1)
    m = jnp.matmul(jnp.stack(tiles).reshape(16, -1, channels), u)
    m = m.reshape(4, 4, batch, tiles_h, tiles_w, -1)
    blocks = [_winograd_out(row) for row in _winograd_out(m)]  # [a][b]: [B, H/2, W/2, Co]
    out = jnp.stack([jnp.stack(row, axis=3) for row in blocks], axis=2)
    return out.reshape(batch, height, width, -1)


LOWERINGS = {"xla": functools.partial(conv2d, strides=1, impl="xla"),
             "im2col": functools.partial(conv2d, strides=1, impl="im2col"),
             "row_shift": row_shift, "shifted9": shifted9,
             "xla_fwd_im2col_wgrad": xla_fwd_im2col_wgrad, "winograd": winograd}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=16, help="height = width")
    parser.add_argument("--channels", type=int, default=64, help="input = output channels")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--lowerings", default=",".join(LOWERINGS))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="write {lowering: {variant: GFLOP/s}} here")
    args = parser.parse_args(argv)
    lowering.reexec_with_process_env()
    b, s, c, m = args.batch, args.size, args.channels, args.models
    flops = 3 * 2 * b * s * s * 9 * c * c  # forward + two backward matmuls
    rng = np.random.default_rng(0)
    data = [jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in ((m, b, s, s, c), (m, 3, 3, c, c), (m, b, s, s, c))]
    results = {}
    for name in args.lowerings.split(","):
        grad = jax.grad(lambda x, k, t, f=LOWERINGS[name]: jnp.vdot(f(x, k), t), (0, 1))
        variants = {"one model": (grad, [a[0] for a in data], 1),
                    "vmap": (jax.vmap(grad), data, m),
                    "unroll": (lambda x, k, t, g=grad: [g(x[i], k[i], t[i]) for i in range(m)],
                               data, m)}
        for variant, (fn, fn_args, count) in variants.items():
            sec = seconds_per_jitted_call(fn, *fn_args, seconds=args.seconds)
            gflops = count * flops / sec / 1e9
            results.setdefault(name, {})[variant] = gflops
            print(f"{name:<22}{variant:<10} M={count:<3}{1e3 * sec:9.1f} ms{gflops:8.1f} GFLOP/s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
