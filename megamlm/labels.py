"""The label conventions shared by the data, the ops and the objectives (torch-free: the loader's worker
processes import it).

``IGNORE_INDEX``: the label of a position that is not a target (not masked, padding, an unlabelled pair
or token); the cross-entropies give it loss 0 and gradient 0 and count it nowhere. -100, as in Hugging
Face and ``torch.nn.functional.cross_entropy``'s default.
"""

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]
