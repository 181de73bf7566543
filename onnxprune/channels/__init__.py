"""Channel-dependency analysis: which channels of which tensors must be removed together."""
