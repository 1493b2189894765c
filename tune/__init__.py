"""rehead.tune: continue-training a converted checkpoint until it is as good as its original again."""

from .loop import Trainer, tune
from .recipe import Recipe, load

__all__ = ["Recipe", "Trainer", "load", "tune"]
