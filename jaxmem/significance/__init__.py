"""What noise alone gives, and which memorization survives it.

- `null`: the permutation null of a memorized count (membership shuffled across models),
  computed exactly on a bit-packed model axis: the noise floor of every count.
- `margin`: per-example p-values of H0: score <= threshold (a score test of a difference of two
  proportions with a margin) and the Benjamini-Hochberg procedure: the memorized set at a false
  discovery rate.
- `pairs`: the same two for high-influence (memorized training, test) pairs.

Pure numpy/scipy: no jax. The names below are the public ones of the three modules.
"""

from jaxmem.significance.margin import (
    DEFAULT_Q,
    benjamini_hochberg,
    margin_pvalues,
    memorized_at_fdr,
)
from jaxmem.significance.null import (
    DEFAULT_PERMUTATIONS,
    NullCounts,
    null_counts,
    permutation_null,
    permutations,
    permuted_counts,
)
from jaxmem.significance.pairs import DEFAULT_INFLUENCE_THRESHOLD, pair_pvalues, pairs_null

__all__ = ["DEFAULT_INFLUENCE_THRESHOLD", "DEFAULT_PERMUTATIONS", "DEFAULT_Q", "NullCounts",
           "benjamini_hochberg", "margin_pvalues", "memorized_at_fdr", "null_counts",
           "pair_pvalues", "pairs_null", "permutation_null", "permutations", "permuted_counts"]
