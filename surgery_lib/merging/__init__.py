"""Merging methods: one module per family, each registering its methods by name.

- :mod:`~surgery_lib.merging.options`     the options methods declare (:class:`Option`), and their values (:class:`MergeOptions`)
- :mod:`~surgery_lib.merging.base`        results and the registry (:data:`MERGE_METHODS`)
- :mod:`~surgery_lib.merging.vectors`     task vectors and the arithmetic every family builds on
- :mod:`~surgery_lib.merging.averaging`   weight averaging                        (data-free)
- :mod:`~surgery_lib.merging.arithmetic`  task arithmetic                         (data-free)
- :mod:`~surgery_lib.merging.ties`        TIES-merging, two operating points      (data-free)
- :mod:`~surgery_lib.merging.dare`        DARE over task arithmetic and TIES      (data-free)
- :mod:`~surgery_lib.merging.consensus`   consensus merging with TALL masks, over TA and TIES (data-free)
- :mod:`~surgery_lib.merging.tsv`         TSV-M, task singular vectors            (data-free)
- :mod:`~surgery_lib.merging.isotropic`   Iso-C and Iso-CTS, isotropic spectra    (data-free)
- :mod:`~surgery_lib.merging.wudi`        WUDI-Merging, per-layer interference    (data-free)
- :mod:`~surgery_lib.merging.fisher`      Fisher merging                          (labeled training images)
- :mod:`~surgery_lib.merging.regmean`     RegMean                                 (training images' features)
- :mod:`~surgery_lib.merging.adamerging`  AdaMerging and AdaMerging++, task- and layer-wise (unlabeled test images)
- :mod:`~surgery_lib.merging.tuning`      hyper-parameters chosen on validation data as the official code does: the
  ``<method>_tuned`` twins of every method that declares its search
- :mod:`~surgery_lib.merging.api`         any registered method on a zoo by name: merge, cache, evaluate, main table
- :mod:`~surgery_lib.merging.rows`        table rows as (method, version) keys, and their labels

Adding a method: a new module that defines its ``run`` function and calls :func:`register_method` (with
the :class:`Option` declarations it reads), plus its import line below. The command line, the tables, the merge cache and the contract test
(``tests/test_merge_methods.py``) pick it up from the registry.
"""

# The families register their methods on import; this order is the registry's (and --method's) order.
# isort: off
from surgery_lib.merging import averaging  # noqa: F401
from surgery_lib.merging import fisher  # noqa: F401
from surgery_lib.merging import regmean  # noqa: F401
from surgery_lib.merging import arithmetic  # noqa: F401
from surgery_lib.merging import ties  # noqa: F401
from surgery_lib.merging import adamerging  # noqa: F401
from surgery_lib.merging import dare  # noqa: F401
from surgery_lib.merging import consensus  # noqa: F401
from surgery_lib.merging import tsv  # noqa: F401
from surgery_lib.merging import isotropic  # noqa: F401
from surgery_lib.merging import wudi  # noqa: F401

# isort: on
from surgery_lib.core.errors import SurgeryBookError  # noqa: F401  (0.1 re-exported it here)
from surgery_lib.merging.api import (
    cached_merge,
    evaluate_merge,
    main_table,
    merge,
    merge_cache_path,
    method_label,
    scale_sweep,
)
from surgery_lib.merging.arithmetic import task_arithmetic
from surgery_lib.merging.averaging import weight_averaging
from surgery_lib.merging.base import (
    MAIN_TABLE,
    MERGE_METHODS,
    METHODS,
    REPAIRED,
    TRIMMING,
    MergeMethod,
    MergeOptions,
    MergeResult,
    check_method,
    get_method,
    register_method,
    ties_zero_entries,
    with_options,
)
from surgery_lib.merging.options import MERGE_OPTIONS, Option, option_named, register_option
from surgery_lib.merging.rows import VERSION_NAMES, VERSION_SUFFIX, Row, row_label, row_of
from surgery_lib.merging.ties import (
    TIES_OPERATING_POINTS,
    kept_fraction,
    ties_merging,
    ties_vectors,
    trim_threshold,
)
from surgery_lib.merging.vectors import (
    StateDict,
    add_vectors,
    check_compatible,
    cosine_similarities,
    flatten_vector,
    task_vectors,
)

__all__ = [
    "MAIN_TABLE",
    "MERGE_METHODS",
    "METHODS",
    "REPAIRED",
    "StateDict",
    "TIES_OPERATING_POINTS",
    "TRIMMING",
    "MergeMethod",
    "MergeOptions",
    "MergeResult",
    "add_vectors",
    "cached_merge",
    "check_compatible",
    "check_method",
    "cosine_similarities",
    "evaluate_merge",
    "flatten_vector",
    "get_method",
    "kept_fraction",
    "main_table",
    "merge",
    "merge_cache_path",
    "method_label",
    "register_method",
    "scale_sweep",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_vectors",
    "ties_zero_entries",
    "trim_threshold",
    "weight_averaging",
    "with_options",
    "MERGE_OPTIONS",
    "Option",
    "option_named",
    "register_option",
    "Row",
    "VERSION_NAMES",
    "VERSION_SUFFIX",
    "row_label",
    "row_of",
]
