"""What a model costs, counted from the graph: MACs, parameters, the inspect summary."""
