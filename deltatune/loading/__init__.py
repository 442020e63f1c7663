"""Loading base models offline."""

from deltatune.loading.base_models import BUILTIN_MODELS, load_base

__all__ = ["BUILTIN_MODELS", "load_base"]
