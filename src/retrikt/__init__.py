"""retrikt: Retrieval-based Knowledge Transfer (Liu et al., Findings of EMNLP 2023).

Importing this package is cheap: heavy dependencies (torch, transformers, ...) are imported by
the stage modules only when a stage runs.
"""

__version__ = "0.1.0"
