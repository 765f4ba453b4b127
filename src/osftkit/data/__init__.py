"""Datasets and datamodules: synthetic arithmetic, real math sets, prompt formatting."""

from osftkit.data.arithmetic import build_arithmetic
from osftkit.data.datamodule import PromptDataModule
from osftkit.data.math_sets import DataLoadError, load_prompt_table
from osftkit.data.splits import disjoint_rows, without_problems

__all__ = [
    "DataLoadError",
    "PromptDataModule",
    "build_arithmetic",
    "disjoint_rows",
    "load_prompt_table",
    "without_problems",
]
