"""Data: the dataset layouts and their patient-wise folds, preprocessing, and a user's uploaded
scan. Medical I/O lives here, apart from the networks (MONAI style)."""

from neurocbir.data.cases import (
    CLASS_NAMES,
    PLANES,
    CaseTable,
    DatasetError,
    default_data_dir,
    grouped_inner_folds,
    load_cases,
)

__all__ = [
    "CLASS_NAMES",
    "PLANES",
    "CaseTable",
    "DatasetError",
    "default_data_dir",
    "grouped_inner_folds",
    "load_cases",
]
