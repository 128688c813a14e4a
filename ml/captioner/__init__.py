"""The paper's image captioner: a causal LM conditioned on a frozen CLIP image embedding."""
