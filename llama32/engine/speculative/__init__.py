"""Speculative decoding: `llama32.load(..., speculative="ngram" | <draft checkpoint>)`.

A plain decode step delivers one token per row. With speculation a row proposes k tokens cheaply (from its own
text, or from a smaller draft model), one forward of the target checks the row's token and its proposals at
k + 1 positions, and the row takes every proposal up to the first the target would not have drawn, plus the
target's own token there: up to k + 1 tokens for one forward. It changes speed, not the tokens.

Where each part lives:
* proposers.py: `NgramProposer` (prompt lookup over the request's tokens), `DraftProposer` (a draft model's
  greedy proposals from its own KV cache) and `RowSampler` (a draft's draw with the row's own sampler);
* verification.py: the exactness rule: `target_tokens`, `verify`, `verify_rows` and `record`;
* adaptive.py: `AdaptiveK`, each row's number of proposals from its recent acceptance and a cost model of the
  verify step (turning speculation off for a row where it does not pay), and the measured costs, `DEFAULT_COST`;
* speculator.py: `Speculator`, the generation loop's speculative step (`step(loop, rows)`, called from
  engine/loop.py), with `RowSpec` (one request's proposer and counts) and `SpecStats` (the handle's totals).

Exactness. The sampler (sampling.py) is a pure function of a row's logits, its knobs and history, and
`counter_noise` of (seed, token index, vocabulary id): the token the target would have drawn at each of the
k + 1 positions is computable in one verify step, with the history (penalties) as it would have been had the
earlier proposals been drawn and the noise of that position's token index. A proposal is accepted exactly when
it equals that token, so the tokens delivered are those of sequential decoding, token for token (greedy and
seeded alike), provided the verify forward's logits at each position equal those a one-position decode step
would give; the first mismatch delivers the target's own token, and a fully accepted run also delivers the
target's token after the last proposal. This is not the rejection-sampling rule of Leviathan et al. (2023) /
Chen et al. (2023), which keeps the output *distribution* but not a seed's *tokens*; with a draw that is
deterministic given the noise, plain equality is both exact and (for a greedy draft) the best acceptance
available. Whether the logits are equal:
- float32: they agree to rounding (~6e-5 on SmolLM2's logits: oneDNN's float32 products sum in another order
  for another row count, exactly as a bigger batch does in the plain loop), so float32 results, greedy or
  seeded, are the plain loop's token for token, as batched results are (tests/test_speculate.py), and
  log-probabilities agree within 1e-4.
- bfloat16 on the CPU: one fused attention call over k + 1 query positions rounds differently from k + 1
  one-position calls (a tie in the last bit, once in SmolLM2's 30 layers, flips a token now and then:
  benchmarks/RESULTS.md). The products do not: this CPU's bfloat16 kernels give a row the same bits whatever
  the row count (1 to 9 positions, batches of 1, 2 and 8 measured on SmolLM2). So the loop's verify forward
  attends one position at a time (`Speculator.per_position`), and its logits are then bit for bit those of
  one-position steps: bfloat16 results are token for token the plain loop's too, on CPUs whose kernels are
  row-invariant (the AVX-512 BF16 EPYC measured here; a CPU or a library version whose kernels are not would
  part at near ties).
- CUDA: not measured (the attention is not split there).
"""

from .adaptive import DEFAULT_COST, AdaptiveK
from .proposers import DraftProposer, NgramProposer, RowSampler
from .speculator import MAX_PROPOSALS, NGRAM_PRIOR, RowSpec, SpecStats, Speculator
from .verification import Verdict, record, target_tokens, verify, verify_rows

__all__ = ["DEFAULT_COST", "MAX_PROPOSALS", "NGRAM_PRIOR", "AdaptiveK", "DraftProposer", "NgramProposer",
           "RowSampler", "RowSpec", "SpecStats", "Speculator", "Verdict", "record", "target_tokens", "verify",
           "verify_rows"]
