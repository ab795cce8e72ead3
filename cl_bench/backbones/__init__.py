"""Backbones: a model plus what strategies and the loop need to know about it.

The loaders live in ``open_clip.py`` (the only importer of open_clip), ``hf.py`` (the only
importer of transformers) and ``tiny.py`` (registered tiny configs for tests and the CPU demo).
They register themselves in :data:`cl_bench.registry.BACKBONES` when imported; heavy libraries
are imported inside the factories, so registering is cheap.
"""

from cl_bench.backbones.base import ROLES, Backbone, BackboneInfo, Block

__all__ = ["ROLES", "Backbone", "BackboneInfo", "Block"]
