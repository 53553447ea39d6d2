"""fl-sim: Task Arithmetic is one-shot Federated Averaging."""

__version__ = "0.1.0"
