"""Lightning callbacks of the kit: evaluation on MMEB / VisDoc-format data during training."""

from callbacks.eval import BenchmarkEvalCallback, MMEBEvalCallback, VisDocEvalCallback

__all__ = ["BenchmarkEvalCallback", "MMEBEvalCallback", "VisDocEvalCallback"]
