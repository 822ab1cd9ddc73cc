"""Labeled text: read a file (`read`), clean it and map labels (`load`), split it (`split`)."""

from sherl_pipe.data.load import SPLITS, Dataset, Split, load_dataset
from sherl_pipe.data.read import check_texts, read_columns, rows_text

__all__ = ["SPLITS", "Dataset", "Split", "load_dataset", "check_texts", "read_columns", "rows_text"]
