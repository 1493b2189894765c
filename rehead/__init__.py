"""rehead: rewrite the attention heads of a trained LLaMA-family checkpoint.

Importing rehead registers its layouts with transformers' Auto classes, so a
converted checkpoint loads without ``trust_remote_code`` wherever rehead is
installed.
"""

__version__ = "0.1.0"

import rehead.layouts  # noqa: E402,F401  (registers the layouts)
