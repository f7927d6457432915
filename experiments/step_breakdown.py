"""Where one VGG model's training step spends its time: the whole model forward and forward +
backward, then every convolution, BatchNorm + ReLU and 2x2 max-pool alone (forward + backward),
for each conv lowering.

    python experiments/step_breakdown.py --arch=small_vgg --batch=128

About 2 minutes on an idle 2-core CPU. Result there (ms; BENCHMARKS.md): model fwd+bwd 700
(im2col) / 1280 (xla); convs 563 / 1171 of it, BatchNorm + ReLU 69, pools 31; the 3-channel
first conv runs at 11 GFLOP/s, the 64-wide ones at 45-54, the 512-wide one at 64 (im2col).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxmem.models import layers
from jaxmem.models.vgg import LAYOUTS, VGG
from jaxmem.timing import seconds_per_jitted_call
from jaxmem.train import lowering


def layer_shapes(layout, size: int, channels: int):
    """[(kind, height, in channels, out channels)] in the order VGG applies them."""
    shapes = []
    for item in layout:
        if item == "M":
            if size >= 2:
                shapes.append(("pool", size, channels, channels))
                size //= 2
            continue
        shapes += [("conv", size, channels, item), ("bn_relu", size, item, item)]
        channels = item
    return shapes


def model_times(arch: str, impl: str, x, labels, seconds: float) -> tuple[float, float]:
    model = VGG(10, LAYOUTS[arch], conv_impl=impl)
    variables = model.init(jax.random.key(1), x[:1], False)

    def logits(params, stats):
        return model.apply({"params": params, "batch_stats": stats}, x, True,
                           mutable=["batch_stats"])[0]

    def loss(params, stats):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits(params, stats), labels).mean()

    args = (variables["params"], variables["batch_stats"])
    return (seconds_per_jitted_call(logits, *args, seconds=seconds),
            seconds_per_jitted_call(jax.grad(loss), *args, seconds=seconds))


def op_time(kind: str, impl: str, batch: int, size: int, c_in: int, c_out: int,
            seconds: float) -> tuple[float, float]:
    """(seconds, FLOPs of the forward + backward matmuls, 0 for non-convs) of one op."""
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (batch, size, size, c_in))
    if kind == "conv":
        kernel = jax.random.normal(keys[1], (3, 3, c_in, c_out))
        # The image's gradient is never needed: the first conv has two matmuls, the others 3.
        wrt = (1,) if c_in == 3 else (0, 1)
        grad = jax.grad(lambda a, k: jnp.square(layers.conv2d(a, k, 1, impl)).sum(), wrt)
        return (seconds_per_jitted_call(grad, x, kernel, seconds=seconds),
                2 * batch * size * size * 9 * c_in * c_out * (1 + len(wrt)))
    if kind == "pool":
        grad = jax.grad(lambda a: jnp.square(layers.max_pool_2x2(a)).sum())
        return seconds_per_jitted_call(grad, x, seconds=seconds), 0
    norm = layers.BatchNorm()
    variables = norm.init(jax.random.key(0), x, False)

    def loss(a, params):
        out = norm.apply({"params": params, "batch_stats": variables["batch_stats"]}, a, True,
                         mutable=["batch_stats"])[0]
        return jnp.square(nn.relu(out)).sum()

    grad = jax.grad(loss, (0, 1))
    return seconds_per_jitted_call(grad, x, variables["params"], seconds=seconds), 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vgg", choices=sorted(LAYOUTS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--lowerings", default=",".join(layers.CONV_IMPLS))
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    lowering.reexec_with_process_env()
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
    labels = jnp.zeros((args.batch,), jnp.int32)
    shapes = layer_shapes(LAYOUTS[args.arch], args.size, 3)
    impls = args.lowerings.split(",")
    for impl in impls:
        forward, backward = model_times(args.arch, impl, x, labels, args.seconds)
        print(f"{impl}: model fwd {1e3 * forward:.0f} ms, fwd+bwd {1e3 * backward:.0f} ms",
              flush=True)
        totals = {}
        for kind, size, c_in, c_out in shapes:
            if kind != "conv" and impl != impls[0]:
                continue  # BatchNorm and pools do not depend on the conv lowering
            sec, flops = op_time(kind, impl, args.batch, size, c_in, c_out, args.seconds)
            totals[kind] = totals.get(kind, 0.0) + sec
            rate = f"  {flops / sec / 1e9:.1f} GFLOP/s" if flops else ""
            print(f"  {kind:<8}{size:>3}x{size:<3}{c_in:>4}->{c_out:<4}{1e3 * sec:8.1f} ms{rate}",
                  flush=True)
        print("  total " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in totals.items()),
              flush=True)


if __name__ == "__main__":
    main()
