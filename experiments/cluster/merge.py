"""Merge part run directories (from --model-range job arrays) into one run directory.

    python experiments/cluster/merge.py runs/part-0-500 runs/part-500-1000 --out runs/whole

Refuses parts whose settings, dataset or masks disagree, that overlap, or that leave gaps.
--fdr, --null-permutations and --fit-threshold (what the merged run reports, not how its models
were trained) may be given anew; otherwise the parts must agree on them.
"""

import argparse
import dataclasses
import sys

from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.rundir.fingerprint import REPORT_SETTINGS
from jaxmem.rundir.merge import merge_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="part run directories")
    parser.add_argument("--out", required=True, help="the merged run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--model-range", default=None,
                        help="START:END the parts must cover (default: all --num-models)")
    for name in REPORT_SETTINGS:  # what the merged run reports: given now, else the parts'
        field = next(f for f in dataclasses.fields(Config) if f.name == name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(field.default),
                            default=None, help=f"{field.metadata['help']} (default: the parts')")
    args = parser.parse_args(argv)
    report = {name: getattr(args, name) for name in REPORT_SETTINGS
              if getattr(args, name) is not None}
    try:
        merge_runs(args.parts, args.out, args.overwrite, args.model_range, report)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {len(args.parts)} parts into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
