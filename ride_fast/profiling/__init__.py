"""Cost measurement: multiply-accumulates with fvcore (imported only when counting) and timers."""
from ride_fast.profiling.flops import ModelCost, count_macs, model_cost

__all__ = ["ModelCost", "count_macs", "model_cost"]
