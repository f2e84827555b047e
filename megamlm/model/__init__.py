"""The model: encoder (one device, plain torch), heads, the pretraining model and its HF key table."""

from megamlm.model.encoder import Encoder, init_bert_weights
from megamlm.model.heads import MLMHead, PairHead, TiedDecoder
from megamlm.model.pretraining import PretrainingModel, build_model, weight_decay_groups

__all__ = ["Encoder", "MLMHead", "PairHead", "PretrainingModel", "TiedDecoder", "build_model",
           "init_bert_weights", "weight_decay_groups"]
