"""The run directory: the one place that writes, reads, merges and fingerprints runs, and that
holds the rule of which models a run includes. Training and analysis both import it; it
imports neither.
"""

from jaxmem.rundir.merge import merge_runs, wait_for_parts
from jaxmem.rundir.packed import PackedCorrectness
from jaxmem.rundir.record import (
    DataInfo,
    EnsembleResult,
    check_output_dir,
    write_run,
)
from jaxmem.rundir.store import PackedEpochs, Run, diverged_models, load_run, save_run

__all__ = ["DataInfo", "EnsembleResult", "PackedCorrectness", "PackedEpochs", "Run",
           "check_output_dir", "diverged_models", "load_run", "merge_runs", "save_run",
           "wait_for_parts", "write_run"]
