from .datasets import ImageDataset, build_dataset, load_digits, load_mnist, to_model_range, to_uint8
from .loader import BatchIterator

__all__ = ["BatchIterator", "ImageDataset", "build_dataset", "load_digits", "load_mnist",
           "to_model_range", "to_uint8"]
