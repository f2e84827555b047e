"""Parallelism applied to a finished model: vocabulary (tensor) parallelism for embedding, decoder and CE."""

from megamlm.parallel.vocab import (IGNORE_INDEX, group_size_rank, vocab_parallel_argmax,
                                    vocab_parallel_cross_entropy)

__all__ = ["IGNORE_INDEX", "group_size_rank", "vocab_parallel_argmax", "vocab_parallel_cross_entropy"]
