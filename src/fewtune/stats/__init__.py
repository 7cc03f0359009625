"""Statistics over a study's runs: summaries over data seeds, per-cell paired comparisons, the
two-level test (seeds × eval examples) and the arms tied for the lead, ID–OOD gaps and Pareto
fronts — thin wrappers over scipy and statsmodels. The claims (with a bootstrap over seeds × eval
examples) are in ``fewtune.stats.claims`` and ``fewtune.stats.resample``.

Why these statistics: few-shot results vary a lot with *which* examples were sampled (Mosbach et
al. 2023), so a single number per method is meaningless. Every run is one few-shot sample (data
seed); we report the spread over samples (std, 95 % t-interval, min/max) and compare methods
*paired* on the same samples, which removes the sample-to-sample variance shared by both methods.

Everything here works on plain ``EvalRow`` records (one per run × eval set) built from the
runner's ``metrics.json`` dicts, so it can be tested on hand-computed numbers without a model.
"""

from fewtune.stats.compare import (
                                   Comparison,
                                   GapRow,
                                   Leaders,
                                   PairedTest,
                                   TwoLevelTest,
                                   VsBest,
                                   at_baseline_methods,
                                   id_ood_gaps,
                                   leaders,
                                   paired_comparisons,
                                   paired_test,
                                   pareto_front,
                                   two_level_test,
)
from fewtune.stats.rows import ALPHA, AXIS_KEYS, CONFIDENCE, MAJORITY, MIN_PAIRS, MIN_SEEDS, EvalRow, arm_labels, collapse_reason, eval_rows, flatten
from fewtune.stats.summary import (
                                   Summary,
                                   SummaryRow,
                                   arm_sort,
                                   baseline_for,
                                   baseline_margin,
                                   indistinguishable,
                                   method_rank,
                                   summarize,
                                   summary_table,
                                   t_interval,
)

__all__ = ["ALPHA", "AXIS_KEYS", "CONFIDENCE", "MAJORITY", "MIN_PAIRS", "MIN_SEEDS", "Comparison", "EvalRow", "GapRow",
           "Leaders", "PairedTest", "Summary", "SummaryRow", "TwoLevelTest", "VsBest", "arm_labels", "arm_sort",
           "at_baseline_methods", "baseline_for", "baseline_margin", "collapse_reason", "eval_rows", "flatten",
           "id_ood_gaps", "indistinguishable", "leaders", "method_rank", "paired_comparisons", "paired_test", "pareto_front",
           "summarize", "summary_table", "t_interval", "two_level_test"]
