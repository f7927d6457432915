"""Train one ensemble and write its run directory.

    python experiments/run.py                      # embedded default: digits, tiny_cnn, 32 models
    python experiments/run.py --arch=small_vgg --dataset=cifar10 --num-models=2000 --epochs=100

`python experiments/run.py --help` lists every flag; README.md documents the run directory.
"""

import sys

from jaxmem.cli import main
from jaxmem.train import lowering

if __name__ == "__main__":
    lowering.reexec_with_process_env()  # allocator settings: BENCHMARKS.md
    sys.exit(main())
