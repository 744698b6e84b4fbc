"""How many tokens a row proposes: `AdaptiveK`, from the row's recent acceptance and a cost model of the verify
step, which turns speculation off for a row where it does not pay (probing again now and then); and the
measured costs the loop starts from (`DEFAULT_COST`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What a verify forward costs, in one-position steps of one row: 1 + fixed + per_position * k for k proposals
# (`AdaptiveK`'s model). CPU, measured with 1 thread (benchmarks/RESULTS.md, 2026-11-26): bfloat16 1.09 (k = 2)
# to 1.80 (k = 8) on the Llama 3.2 1B shape, 1.27 to 2.04 on SmolLM2-135M; float32 1.57 to 2.30 on the 1B shape
# and 1.41 to 2.07 on SmolLM2 (a one-row float32 product has a faster kernel of its own: a fixed part of
# 0.2-0.35). The float32 default's fixed part is lower than measured on purpose: with 0.35, n-gram rows stopped
# proposing after moderate matches and SmolLM2's "repeat" gained 2.2x instead of 2.8x with 0.15. A batch of n
# rows (`Speculator._positions`): 1 + per_position * (n T - 1), no fixed part (its plain step already multiplies
# several rows). CUDA: a guess (a forward of a few dozen positions reads the weights once, as a one-position step
# does), not measured.
DEFAULT_COST = {("cpu", torch.float32): (0.15, 0.11), ("cpu", None): (0.0, 0.1), ("cuda", None): (0.0, 0.02)}


@dataclass
class AdaptiveK:
    """One row's number of proposals, from its recent acceptance and the verify step's cost.

    Model: each proposal is accepted with probability `rate` (until the first rejection), so k proposals
    deliver E(k) = (1 - rate^(k+1)) / (1 - rate) tokens for a verify step costing
    (1 + cost_fixed + cost_per_token * k) plain steps (measured on this CPU, benchmarks/RESULTS.md: bfloat16 about
    0 + 0.1 k on the 1B shape; float32 about 0.2-0.35 + 0.11 k, a one-row float32 product having a kernel of its
    own that several rows leave; the loop's defaults: `DEFAULT_COST` above). `next_k` picks the k in 0..max_k with
    the best E(k) / cost; when even that is below `min_gain` the row stops speculating, and after `probe_after`
    plain steps it tries once more (doubling the wait each time the probe fails, up to `max_wait`), so an
    open-ended answer pays for one probe in many steps.

    `rate` is an exponential moving average over proposal trials: a verify with k proposals of which n were
    accepted is n successes in n + (n < k) trials.
    """

    max_k: int = 8
    cost_per_token: float = 0.1
    cost_fixed: float = 0.0  # what any verify step costs beyond a plain one before its proposals' share
    min_gain: float = 1.05
    rate: float = 0.6  # the prior: an optimistic start, quickly corrected
    decay: float = 0.7  # weight of the past in the moving average
    probe_after: int = 16
    max_wait: int = 256
    _off_for: int = field(default=0, repr=False)  # plain steps left before the next probe
    _wait: int = field(default=0, repr=False)

    def gain(self, k: int) -> float:
        """Expected tokens per plain-step cost for k proposals."""
        a = min(self.rate, 1 - 1e-9)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + (self.cost_fixed if k else 0.0) + self.cost_per_token * k)

    def best_k(self) -> int:
        return max(range(self.max_k + 1), key=lambda k: (self.gain(k), -k))

    def next_k(self) -> int:
        """Proposals to ask for in this step (0: a plain step)."""
        if self._off_for > 0:
            self._off_for -= 1
            return 0 if self._off_for > 0 else min(2, self.max_k)  # the probe
        k = self.best_k()
        if self.gain(k) < self.min_gain:
            self._wait = min(max(self._wait * 2, self.probe_after), self.max_wait)
            self._off_for = self._wait
            return 0
        return k

    def observe(self, proposed: int, accepted: int) -> None:
        """Fold in one verify: `accepted` of `proposed` proposals taken (proposed 0: nothing learned)."""
        if proposed <= 0:
            return
        trials = accepted + (accepted < proposed)
        self.rate = self.decay * self.rate + (1 - self.decay) * accepted / trials
        if accepted > 0 and self.gain(self.best_k()) >= self.min_gain:
            self._wait = 0  # it pays again: the next time it stops, wait from the start
