"""ride_fast: a fast, faithful RIDE (Routing Diverse Distribution-Aware Experts, ICLR 2021) engine.

`import ride_fast` is light: it imports neither triton nor DALI and starts no CUDA; the
submodules (models, losses, ops, data, engine, profiling) are imported where they are used.
"""
__version__ = "0.1.0"
