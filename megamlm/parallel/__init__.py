"""Parallelism applied to a finished model: vocabulary (tensor) parallelism for embedding, decoder and CE."""

from megamlm.parallel.groups import group_size_rank
from megamlm.parallel.layers import VOCAB_SHARDED_PARAMS, VOCAB_TIED_PARAMS, parallelize_vocab, vocab_parallel_layout
from megamlm.parallel.vocab import IGNORE_INDEX, vocab_parallel_argmax, vocab_parallel_cross_entropy

__all__ = ["IGNORE_INDEX", "VOCAB_SHARDED_PARAMS", "VOCAB_TIED_PARAMS", "group_size_rank", "parallelize_vocab",
           "vocab_parallel_argmax", "vocab_parallel_cross_entropy", "vocab_parallel_layout"]
