"""The GPU side: model loading, LoRA slots, acceleration, safety checking and generation.

Library noise is silenced here, once, before any module of this package imports the libraries that make
it: the worker, `flux2-server generate`, the tests and the scripts all come through this file first.
"""

from pipeline.logs import quiet_library_noise

quiet_library_noise()
