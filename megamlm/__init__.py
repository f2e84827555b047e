"""megamlm: pretraining BERT-style bidirectional encoders (MLM, NSP, SOP) at scale.

Importing the package is cheap: deepspeed, webdataset and tensorboard are imported only by the modules
that use them.
"""

__version__ = "0.1.0"
