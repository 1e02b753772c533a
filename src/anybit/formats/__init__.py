"""On-disk formats: packing codes into words, packed checkpoints."""
