"""sparsepeft — importance-aware sparse fine-tuning on the Hugging Face stack."""

from .importance import FisherMode, estimate_fisher, register_rule

__version__ = "0.1.0"

__all__ = ["FisherMode", "estimate_fisher", "register_rule"]
