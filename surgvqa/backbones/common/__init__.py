"""Algorithms the model families share: video token merging (ToMe matching, placeholders, positions), the
labelled-position gather and loss, the frozen-tower output cache, and (Q)LoRA preparation of quantized models.
Plain functions and classes; each family's model class calls them in its own code paths."""
