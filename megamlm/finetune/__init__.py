"""Fine-tuning on a pretrained encoder: sequence, pair and token classification (``megamlm finetune``).

Modules: config (the fine-tuning config file type), data (readers, splits, encoding), heads (the heads
and the model), train (the DeepSpeed loop), metrics, export (to Hugging Face), report (plot + summary),
weights (the pretrained encoder from a megamlm checkpoint or an HF directory).
"""
