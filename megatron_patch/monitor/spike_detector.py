"""Loss / grad-norm spike detection over a sliding window of recent healthy steps.

A step is a spike when its value is non-finite (always), or when it exceeds the window's
statistics by either rule that is enabled:
  z-score:  (x - mean) / std > z_threshold          (like OLMo-core's 6-sigma rule)
  ratio:    x / median > ratio_threshold             (robust to a noisy window)
Spikes are not added to the window, so a burst of spikes cannot raise the bar for the next one.
Nothing is flagged until the window holds `min_history` values (the early loss falls too fast for
any statistic to mean something).
"""

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional


@dataclass
class SpikeEvent:
    iteration: int
    metric: str  # "loss" or "grad_norm"
    value: float
    reason: str  # "non-finite", "z=7.3", "ratio=2.4"
    baseline: float  # window mean (z rule) or median (ratio rule); nan for non-finite

    def as_dict(self) -> Dict:
        return dict(iteration=self.iteration, metric=self.metric, value=self.value,
                    reason=self.reason, baseline=self.baseline)


class MetricWindow:
    """Sliding window for one metric and the rules that flag an outlier."""

    def __init__(self, name: str, window: int, min_history: int, z_threshold: Optional[float],
                 ratio_threshold: Optional[float]):
        if window < 2 or min_history < 2 or min_history > window:
            raise ValueError("spike window needs 2 <= min_history <= window")
        self.name, self.min_history = name, min_history
        self.z_threshold, self.ratio_threshold = z_threshold, ratio_threshold
        self.values: Deque[float] = deque(maxlen=window)

    def check(self, iteration: int, value: Optional[float]) -> Optional[SpikeEvent]:
        if value is None:
            return None
        if not math.isfinite(value):
            return SpikeEvent(iteration, self.name, value, "non-finite", float("nan"))
        event = None
        if len(self.values) >= self.min_history:
            if self.z_threshold is not None:
                mean = statistics.fmean(self.values)
                std = statistics.pstdev(self.values, mean)
                z = (value - mean) / std if std > 0 else (math.inf if value > mean else 0.0)
                if z > self.z_threshold:
                    event = SpikeEvent(iteration, self.name, value, f"z={z:.1f}", mean)
            if event is None and self.ratio_threshold is not None:
                median = statistics.median(self.values)
                if median > 0 and value / median > self.ratio_threshold:
                    event = SpikeEvent(iteration, self.name, value, f"ratio={value / median:.2f}", median)
        if event is None:
            self.values.append(value)
        return event


class SpikeDetector:
    """Watches the loss and the grad norm; `observe` returns the spikes of one step."""

    def __init__(self, window: int = 128, min_history: int = 16, z_threshold: Optional[float] = 6.0,
                 ratio_threshold: Optional[float] = None, metrics=("loss", "grad_norm")):
        self.windows = {m: MetricWindow(m, window, min_history, z_threshold, ratio_threshold)
                        for m in metrics}

    def observe(self, iteration: int, **values: Optional[float]) -> List[SpikeEvent]:
        return [e for m, w in self.windows.items() if (e := w.check(iteration, values.get(m)))]

    def state_dict(self) -> Dict:
        return {m: list(w.values) for m, w in self.windows.items()}

    def load_state_dict(self, state: Dict) -> None:
        for m, values in state.items():
            if m in self.windows:
                self.windows[m].values.clear()
                self.windows[m].values.extend(values)
