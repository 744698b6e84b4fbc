"""Speculative decoding's pieces on the CPU: what a verify step costs, and what n-gram proposals gain.

    python benchmarks/spec_bench.py verify --ckpt-out /tmp/bench        # the 1B shape (random bf16 weights)
    python benchmarks/spec_bench.py ngram --smollm2 DIR --dtype float32  # SmolLM2-135M-Instruct, real weights

The generation loop does not speculate yet (llama32/speculative.py says so), so both scenarios drive the
model directly with a KV cache, batch 1, greedy, the way a loop would: `llm.model(ids, cache=..., input_pos=...)`
then the sampler (`sample_static` for a plain step, `speculative.verify` for a verify step).

- verify: after a `--context`-token prefill, the median time (wall and the process's CPU time) of a plain
  decode step (1 position) and of a verify step scoring k + 1 positions (forward + `target_tokens`),
  k = 2..8, each round running every k once.
  The ratio is what `AdaptiveK.cost_per_token` models: verify(k) / plain = 1 + c * k.
- ngram: tokens/s of plain decoding and of n-gram speculation (`NgramProposer` + `AdaptiveK`) on
  input-grounded prompts (repeat a text, rewrite it with a rename, extract fields from it) and open-ended
  ones, `--new-tokens` each, alternating `--repeats` times; the speedup is the median of the back-to-back
  pairs' ratios, in wall time and in the process's CPU time (with `--threads 1` the CPU time is the work
  itself, which on a machine shared with other jobs is steadier than the wall clock). Also whether every
  run delivered the same tokens.
Figures go to stdout as JSON lines plus a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import llama32  # noqa: E402
from llama32.model import KVCache  # noqa: E402
from llama32.sampling import SamplingParams, StepKnobs, sample_static  # noqa: E402
from llama32.speculative import AdaptiveK, NgramProposer, record, target_tokens, verify  # noqa: E402

TEXT = ("Invoice 4471 was issued on 12 March 2024 by Harbor Lane Supplies to Meridian Foods Ltd. The order "
        "covers 40 crates of olive oil at 18.50 euros each and 12 crates of vinegar at 9.75 euros each. Payment "
        "is due within 30 days to the account of Harbor Lane Supplies at Nordbank, and the goods ship from the "
        "Rotterdam warehouse on 15 March 2024. Contact person at Meridian Foods Ltd is Clara Voss.")
PROMPTS = {
    "repeat": f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    "rename": f"Rewrite the following text exactly as it is, except that 'Meridian Foods Ltd' becomes "
              f"'Oakfield Grocers':\n\n{TEXT}",
    "extract": f"From the text below, list these fields one per line as 'field: value': invoice number, date, "
               f"seller, buyer, products with quantities and prices, payment terms, warehouse, contact.\n\n{TEXT}",
    "open-story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "open-explain": "Explain why the sky is blue to a ten-year-old, in a few paragraphs.",
}
GROUNDED = ("repeat", "rename", "extract")


def machine() -> dict:
    from bench import machine_info  # benchmarks/bench.py: CPU model, flags, load, commit, date

    return machine_info(torch.device("cpu"))


def prompt_ids(llm, text: str) -> list[int]:
    tok = llm.tokenizer
    if tok.is_llama3:
        return [tok.bos_id] + tok.encode(llama32.render_chat([{"role": "user", "content": text}], None))
    from llama32.templates import render_template

    rendered = render_template(tok.chat_template, tok.special_tokens, [{"role": "user", "content": text}], None)
    return tok.encode(rendered)


class Row:
    """One greedy request decoded with a KV cache of its own, as a loop's batch-1 step would."""

    def __init__(self, llm, ids: list[int], room: int):
        self.llm, self.ids = llm, list(ids)
        cfg = llm.config
        self.cache = KVCache(cfg, 1, len(ids) + room, device="cpu", dtype=llm.model.model.norm.weight.dtype)
        self.knobs = StepKnobs(1, cfg.vocab_size, "cpu")
        self.knobs.set_row(0, SamplingParams(temperature=0), 0, ids)
        self.eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id])

    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Logits (len(tokens), V) for `tokens` at the positions after the cached ones."""
        start = len(self.ids) - 1
        pos = torch.arange(start, start + len(tokens))[None]
        return self.llm.model(torch.tensor([tokens]), cache=self.cache, input_pos=pos)[0].float()

    def prefill(self) -> int:
        logits = self.llm.model(torch.tensor([self.ids]), cache=self.cache)[0, -1:].float()
        t = sample_static(logits, self.knobs)
        self.knobs.update(t)
        self.ids.append(int(t))
        return int(t)


@torch.inference_mode()
def decode(llm, ids: list[int], n: int, speculative: bool, adaptive: AdaptiveK | None = None) -> dict:
    row = Row(llm, ids, n + 16)
    t0 = time.perf_counter()
    out = [row.prefill()]
    t1, c1 = time.perf_counter(), time.process_time()
    proposer, steps, made, taken = NgramProposer(), 0, 0, 0
    while len(out) < n and out[-1] not in row.eos:
        k = min(adaptive.next_k(), n - len(out) - 1) if speculative else 0
        props = proposer.propose(row.ids, k) if k > 0 else []
        logits = row.forward([row.ids[-1]] + props)
        v = verify(logits, row.knobs, 0, props)
        if speculative and k > 0:
            adaptive.observe(len(props), v.accepted)
        new = v.tokens
        for i, t in enumerate(new):  # a stop token ends the answer inside the delivered tokens
            if t in row.eos:
                new = new[:i + 1]
                break
        new = new[:n - len(out)]
        record(row.knobs, 0, new)
        row.ids += new
        out += new
        steps, made, taken = steps + 1, made + len(props), taken + v.accepted
    t2, c2 = time.perf_counter(), time.process_time()
    return {"tokens": out, "ttft_s": t1 - t0, "decode_s": t2 - t1, "steps": steps, "proposed": made,
            "accepted": taken, "tok_s": (len(out) - 1) / (t2 - t1), "cpu_tok_s": (len(out) - 1) / (c2 - c1)}


def bench_ngram(args) -> list[dict]:
    rows = []
    for dtype in args.dtype:
        llm = llama32.load(args.smollm2, dtype=dtype, device="cpu")
        for name in args.prompts:
            ids = prompt_ids(llm, PROMPTS[name])
            decode(llm, ids, 8, False)  # warm-up
            plain, spec = [], []
            for _ in range(args.repeats):  # alternating, so drift slows both alike
                plain.append(decode(llm, ids, args.new_tokens, False))
                spec.append(decode(llm, ids, args.new_tokens, True, AdaptiveK(cost_per_token=args.cost)))
            wall = [s_["tok_s"] / p_["tok_s"] for p_, s_ in zip(plain, spec)]
            cpu = [s_["cpu_tok_s"] / p_["cpu_tok_s"] for p_, s_ in zip(plain, spec)]
            r = {"scenario": "ngram", "dtype": dtype, "prompt": name, "grounded": name in GROUNDED,
                 "new_tokens": len(plain[0]["tokens"]),
                 "plain_tok_s": round(statistics.median(x["tok_s"] for x in plain), 2),
                 "ngram_tok_s": round(statistics.median(x["tok_s"] for x in spec), 2),
                 "speedup_wall": round(statistics.median(wall), 3), "speedup_cpu": round(statistics.median(cpu), 3),
                 "speedup_wall_runs": [round(x, 2) for x in wall], "speedup_cpu_runs": [round(x, 2) for x in cpu],
                 "verify_steps": spec[0]["steps"], "proposed": spec[0]["proposed"], "accepted": spec[0]["accepted"],
                 "same_tokens": all(x["tokens"] == plain[0]["tokens"] for x in plain + spec)}
            print(json.dumps(r), flush=True)
            rows.append(r)
        del llm
    return rows


@torch.inference_mode()
def bench_verify(args) -> list[dict]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench import build_checkpoint

    ckpt = args.ckpt or build_checkpoint(args.ckpt_out, "1b", 0)
    rows = []
    for dtype in args.dtype:
        llm = llama32.load(ckpt, dtype=dtype, device="cpu")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 120000, (args.context,), generator=g).tolist()
        row = Row(llm, ids, 16)
        row.prefill()
        ks = list(range(2, 9))
        times = {k: [] for k in [0] + ks}
        cpu = {k: [] for k in [0] + ks}
        for k in [0] + ks:  # warm-up: one call of each shape
            _step(row, k)
        for _ in range(args.repeats):
            for k in [0] + ks:
                t, c = time.perf_counter(), time.process_time()
                _step(row, k)
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        plain, plain_cpu = statistics.median(times[0]), statistics.median(cpu[0])
        for k in ks:
            v, v_cpu = statistics.median(times[k]), statistics.median(cpu[k])
            r = {"scenario": "verify", "dtype": dtype, "context": args.context, "k": k,
                 "plain_ms": round(plain * 1e3, 1), "verify_ms": round(v * 1e3, 1), "ratio": round(v / plain, 3),
                 "plain_cpu_ms": round(plain_cpu * 1e3, 1), "verify_cpu_ms": round(v_cpu * 1e3, 1),
                 "ratio_cpu": round(v_cpu / plain_cpu, 3), "cost_per_token_cpu": round((v_cpu / plain_cpu - 1) / k, 4)}
            print(json.dumps(r), flush=True)
            rows.append(r)
        del llm, row
    return rows


def _step(row: Row, k: int) -> None:
    """A plain step (k = 0: one position, `sample_static`) or a verify step of k proposals (k + 1 positions,
    `target_tokens`), at the same positions each time (nothing is kept)."""
    tokens = [row.ids[-1]] + [row.ids[-2 - i] for i in range(k)]
    logits = row.forward(tokens)
    if k == 0:
        sample_static(logits, row.knobs)
    else:
        target_tokens(logits, row.knobs, 0, tokens[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=("verify", "ngram"))
    p.add_argument("--dtype", nargs="+", default=["bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ckpt", type=Path, default=None, help="verify: an existing 1B-shape checkpoint")
    p.add_argument("--ckpt-out", type=Path, default=REPO / "benchmarks" / "out", help="verify: where bench.py "
                   "writes its random 1B checkpoint")
    p.add_argument("--context", type=int, default=256, help="verify: tokens in the cache before the step")
    p.add_argument("--smollm2", type=Path, default=Path(os.environ.get("LLAMA32_TEST_CACHE", REPO / ".cache" / "test-fixtures")) / "smollm2-135m-instruct",
                   help="ngram: the SmolLM2 checkpoint the tests build")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--cost", type=float, default=AdaptiveK.cost_per_token, help="ngram: AdaptiveK's cost_per_token")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(json.dumps({"machine": info}), flush=True)
    rows = bench_verify(args) if args.scenario == "verify" else bench_ngram(args)
    print(json.dumps({"loadavg_end": list(os.getloadavg())}), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
