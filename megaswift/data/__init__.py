"""The SFT data path: rows from files (reader), chat rendering with loss masks (chat), samples
(dataset) and deterministic, layout-independent, resumable batches (loader)."""
from .chat import tokenize_chat
from .dataset import IGNORE_INDEX, SFTDataset, make_sample
from .loader import SFTLoader
from .reader import read_rows

__all__ = ["IGNORE_INDEX", "SFTDataset", "SFTLoader", "make_sample", "read_rows", "tokenize_chat"]
