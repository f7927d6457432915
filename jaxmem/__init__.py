"""jaxmem: train ensembles of image classifiers in one jitted step and score memorization.

Axis letters used in every docstring and shape comment:
    M  models in one wave (the ensemble axis of one jitted step)
    K  models in the whole run (all waves)
    N  training examples          N_test  test examples
    B  examples in one batch       E      evaluated epochs
    C  classes                     H, W, Ch  image height, width, channels
"""

from jaxmem.errors import UserError
from jaxmem.rundir import Run, load_run

__version__ = "0.1.0"
__all__ = ["Run", "UserError", "__version__", "load_run"]
