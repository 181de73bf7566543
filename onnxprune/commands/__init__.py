"""One module per CLI command; see :data:`onnxprune.cli.COMMANDS`."""
