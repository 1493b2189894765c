"""The composition layer: the command line and the pipeline, the only code that knows every stage.

The stages (rehead.convert, rehead.tune, rehead.eval) meet only through checkpoints; the core
(rehead/*) knows none of them. What is here chains them and holds no logic a stage should own.
"""
