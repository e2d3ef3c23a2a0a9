"""CIFAR-10 for the slide CNN: sources → one uint8 array (sources) → device batches (batches, datamodule)."""
