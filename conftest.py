"""Collection: modules whose optional dependency is not installed are left out of the doctests."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("constrained_optim/lightning.py")
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("constrained_optim/transformers.py")
