"""What a user would run instead of jaxmem: PyTorch eager, one model at a time.

The VGG layouts of jaxmem.models.vgg (conv3x3 without bias, BatchNorm, ReLU, 2x2 max-pools, a
global max-pool and one linear layer), trained with SGD (Nesterov, momentum 0.9, coupled weight
decay 5e-4, as jaxmem's optimiser) on batches gathered from the model's own subset, with random
horizontal flips. Used by bench.py (beside it) as its optional "pytorch" variant; torch is never
a dependency of jaxmem (`pip install torch` to compare).

    python experiments/benchmarks/torch_baseline.py --arch=small_vgg --batch-size=128

Both memory formats are timed (NCHW and channels_last) and the faster is the baseline.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jaxmem.models.vgg import LAYOUTS
from jaxmem.timing import seconds_per_call

MEMORY_FORMATS = ("contiguous_format", "channels_last")


def available() -> str | None:
    """None when torch imports, else why not (a sentence for the benchmark's output)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install torch to compare against PyTorch)"
    return None


def build_model(layout, in_channels: int, num_classes: int):
    import torch
    from torch import nn

    layers, channels = [], in_channels
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                   nn.ReLU(inplace=True)]
        channels = item
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return torch.nn.Sequential(*layers)


def seconds_per_step(arch: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     batch_size: int, seconds: float, memory_format: str,
                     seed: int = 0) -> float:
    """Seconds per training step of one model, after two warm-up steps."""
    import torch

    if arch not in LAYOUTS:
        raise ValueError(f"no PyTorch layout for {arch!r}; choose one of {', '.join(LAYOUTS)}")
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    fmt = getattr(torch, memory_format)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()
    data = data.contiguous(memory_format=fmt)
    targets = torch.from_numpy(labels.astype(np.int64))
    model = build_model(LAYOUTS[arch], data.shape[1], num_classes).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    generator = np.random.default_rng(seed)
    subset = generator.permutation(len(data))[:max(batch_size, int(0.7 * len(data)))]
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        ids = torch.from_numpy(generator.choice(subset, batch_size, replace=False))
        x = data[ids]
        flip = torch.from_numpy(generator.random(batch_size) < 0.5).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x).contiguous(memory_format=fmt)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), targets[ids])
        loss.backward()
        optimizer.step()

    model.train()
    step()  # the second warm-up step is seconds_per_call's
    return seconds_per_call(step, seconds)  # torch on the CPU returns when the step is done


def best_rate(arch: str, images, labels, num_classes: int, batch_size: int,
              seconds: float) -> dict:
    """Model-examples per second of the faster memory format, with both measured."""
    rates = {fmt: batch_size / seconds_per_step(arch, images, labels, num_classes, batch_size,
                                                seconds, fmt)
             for fmt in MEMORY_FORMATS}
    best = max(rates, key=rates.get)
    return {"model_examples_per_s": rates[best], "memory_format": best, "per_format": rates}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vgg", choices=sorted(LAYOUTS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        raise SystemExit(reason)
    rng = np.random.default_rng(0)
    n = 10 * args.batch_size
    images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    result = best_rate(args.arch, images, labels, 10, args.batch_size, args.seconds)
    for fmt, rate in result["per_format"].items():
        print(f"pytorch {args.arch} B={args.batch_size} {fmt}: {rate:.0f} model-examples/s")


if __name__ == "__main__":
    main()
