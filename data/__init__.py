"""Datasets: CIFAR-10/100, Tiny-ImageNet, the embedded digits, their corrupted test sets."""
from data.arrays import BatchLoader, ImageArrayDataset
from data.corruptions import CORRUPTIONS
from data.datasets import (DATASETS, DatasetInfo, Splits, build_datasets, corrupted_test_sets,
                           corruption_names, dataset_info, split_indices)

__all__ = ["BatchLoader", "ImageArrayDataset", "CORRUPTIONS", "DATASETS", "DatasetInfo", "Splits",
           "build_datasets", "corrupted_test_sets", "corruption_names", "dataset_info", "split_indices"]
