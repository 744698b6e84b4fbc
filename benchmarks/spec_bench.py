"""Speculative decoding on the CPU: what a verify step costs, and what speculation gains through the public API.

    python benchmarks/spec_bench.py verify --ckpt-out /tmp/bench        # the 1B shape (random bf16 weights)
    python benchmarks/spec_bench.py api --dtype float32 bfloat16        # SmolLM2-135M-Instruct, real weights
    python benchmarks/spec_bench.py concurrent --dtype float32 bfloat16 # 8 callers at once, same weights
    python benchmarks/spec_bench.py ngram --smollm2 DIR --dtype float32  # the technique outside the loop

- verify: after a `--context`-token prefill, the median time (wall and the process's CPU time) of a plain
  decode step (1 position per row) and of a verify step scoring k + 1 positions per row (forward +
  `target_tokens`), k = 2..8, each round running every k once, for each `--batch` (rows at once). In
  bfloat16 the verify forward attends one position at a time, as the loop runs it (`per_position`, which makes
  its logits those of one-position steps, llama32/engine/speculative/); the fused form is timed beside it.
  The ratio is what the loop's cost model assumes: verify(k) / plain = 1 + c * k at batch 1, and a forward of
  n rows x T positions costs 1 + c (n T - 1) one-position steps.
- api: `llama32.generate` on a handle loaded with `speculative="ngram"` against one loaded without, batch 1,
  greedy, on input-grounded prompts (repeat a text, rewrite it with a rename, extract fields from it) and
  open-ended ones, `--new-tokens` each, alternating `--repeats` times (which goes first alternates too): tokens/s
  over the whole request (prefill included), the speedup as the median of the back-to-back pairs' ratios in wall
  time and in the process's CPU time (the loop thread's work; with `--threads 1` steadier than the wall clock
  on a shared machine), and whether both gave the same answer.
- concurrent: `--rows` callers on threads at once (the prompts above, cycled, greedy), total completion tokens
  per second of the whole batch, with and without speculation, alternating `--repeats` times.
- ngram: the technique without the loop (`NgramProposer` + `AdaptiveK` driving the model directly, batch 1).
Figures go to stdout as JSON lines plus a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import llama32  # noqa: E402
from llama32.engine.speculative import AdaptiveK, NgramProposer, record, target_tokens, verify  # noqa: E402
from llama32.model import KVCache  # noqa: E402
from llama32.sampling import SamplingParams, StepKnobs, sample_static  # noqa: E402

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
    # the same task worded as the one of five wordings SmolLM2-135M follows best: it copies the text (it does
    # not rename: a 135M model does not do the substitution), as a rewrite of a given text does
    "rename-copy": f"Copy the following text exactly, but write 'Oakfield Grocers' wherever it says 'Meridian "
                   f"Foods Ltd':\n\n{TEXT}",
    "open-story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "open-explain": "Explain why the sky is blue to a ten-year-old, in a few paragraphs.",
}
GROUNDED = ("repeat", "rename", "rename-copy", "extract")


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
    """One greedy request decoded with a KV cache of its own, as a loop's batch-1 step would (`batch` > 1:
    that many copies of it in one cache, for the verify scenario's batched steps)."""

    def __init__(self, llm, ids: list[int], room: int, batch: int = 1):
        self.llm, self.ids, self.batch = llm, list(ids), batch
        cfg = llm.config
        self.cache = KVCache(cfg, batch, len(ids) + room, device="cpu", dtype=llm.model.model.norm.weight.dtype)
        self.knobs = StepKnobs(batch, cfg.vocab_size, "cpu")
        for b in range(batch):
            self.knobs.set_row(b, SamplingParams(temperature=0), 0, ids)
        self.eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id])

    def forward(self, tokens: list[int], per_position: bool = False) -> torch.Tensor:
        """Logits (len(tokens), V) for `tokens` at the positions after the cached ones (every row of the batch
        the same; row 0's are returned)."""
        start = len(self.ids) - 1
        pos = torch.arange(start, start + len(tokens))[None].expand(self.batch, -1)
        ids = torch.tensor([tokens]).expand(self.batch, -1)
        return self.llm.model(ids, cache=self.cache, input_pos=pos, per_position=per_position)[0].float()

    def prefill(self) -> int:
        for b in range(1, self.batch):
            self.llm.model(torch.tensor([self.ids]), cache=self.cache.view(slice(b, b + 1)))
        logits = self.llm.model(torch.tensor([self.ids]), cache=self.cache.view(slice(0, 1)))[0, -1:].float()
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
    from bench import build_checkpoint

    ckpt = args.ckpt or build_checkpoint(args.ckpt_out, "1b", 0)
    rows = []
    for dtype in args.dtype:
        llm = llama32.load(ckpt, dtype=dtype, device="cpu")
        split = dtype != "float32"  # the loop's choice (engine/speculative/, Speculator.per_position)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(120000, llm.config.vocab_size), (args.context,), generator=g).tolist()
        for batch in args.batch:
            row = Row(llm, ids, 16, batch)
            row.prefill()
            ks = list(range(2, 9))
            kinds = [(0, False)] + [(k, split) for k in ks] + ([(k, False) for k in ks] if split else [])
            times = {kind: [] for kind in kinds}
            cpu = {kind: [] for kind in kinds}
            for kind in kinds:  # warm-up: one call of each shape
                _step(row, *kind)
            for _ in range(args.repeats):
                for kind in kinds:
                    t, c = time.perf_counter(), time.process_time()
                    _step(row, *kind)
                    times[kind].append(time.perf_counter() - t)
                    cpu[kind].append(time.process_time() - c)
            plain, plain_cpu = statistics.median(times[(0, False)]), statistics.median(cpu[(0, False)])
            for k in ks:
                v, v_cpu = statistics.median(times[(k, split)]), statistics.median(cpu[(k, split)])
                r = {"scenario": "verify", "dtype": dtype, "context": args.context, "batch": batch, "k": k,
                     "per_position": split, "plain_ms": round(plain * 1e3, 1), "verify_ms": round(v * 1e3, 1),
                     "ratio": round(v / plain, 3), "plain_cpu_ms": round(plain_cpu * 1e3, 1),
                     "verify_cpu_ms": round(v_cpu * 1e3, 1), "ratio_cpu": round(v_cpu / plain_cpu, 3),
                     # the loop's model: a forward of batch x (k + 1) positions = 1 + c (batch (k + 1) - 1) steps
                     # of one position, and the plain step of `batch` rows 1 + c (batch - 1)
                     "cost_per_position_cpu": round((v_cpu / plain_cpu - 1) / (batch * k), 4)}
                if split:
                    f_cpu = statistics.median(cpu[(k, False)])
                    r["fused_cpu_ms"] = round(f_cpu * 1e3, 1)
                    r["ratio_fused_cpu"] = round(f_cpu / plain_cpu, 3)
                print(json.dumps(r), flush=True)
                rows.append(r)
            del row
        del llm
    return rows


def _step(row: Row, k: int, per_position: bool = False) -> None:
    """A plain step (k = 0: one position, `sample_static`) or a verify step of k proposals (k + 1 positions,
    `target_tokens`), at the same positions each time (nothing is kept)."""
    tokens = [row.ids[-1]] + [row.ids[-2 - i] for i in range(k)]
    logits = row.forward(tokens, per_position)
    if k == 0:
        sample_static(logits, row.knobs.view(0, 1))
    else:
        target_tokens(logits, row.knobs, 0, tokens[1:])
    if row.batch > 1:  # the other rows' sampling (the same work again)
        for b in range(1, row.batch):
            if k == 0:
                sample_static(logits, row.knobs.view(b, b + 1))
            else:
                target_tokens(logits, row.knobs, b, tokens[1:])


# ---------------------------------------------------------------------------------------------------------
# Through the public API


def _timed(llm, body: dict) -> dict:
    t, c = time.perf_counter(), time.process_time()
    out = llama32.generate(llm, **body)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = out["usage"]["completion_tokens"]
    return {"response": out["response"], "tokens": n, "wall_s": wall, "cpu_s": cpu, "tok_s": n / wall,
            "cpu_tok_s": n / cpu}


def _spec_delta(llm, before: dict) -> dict:
    now = llm.loop.speculator.stats.as_dict()
    return {k: now[k] - before[k] for k in now}


def bench_api(args) -> list[dict]:
    rows = []
    for dtype in args.dtype:
        plain = llama32.load(args.smollm2, dtype=dtype, device="cpu")
        spec = llama32.load(args.smollm2, dtype=dtype, device="cpu", speculative="ngram")
        for name in args.prompts:
            body = dict(prompt=PROMPTS[name], max_tokens=args.new_tokens, temperature=0)
            _timed(plain, dict(body, max_tokens=8)), _timed(spec, dict(body, max_tokens=8))  # warm-up
            p_runs, s_runs, counts = [], [], []
            for i in range(args.repeats):  # alternating, each first in turn, so drift slows both alike
                for which in ((plain, spec) if i % 2 == 0 else (spec, plain)):
                    if which is spec:
                        before = spec.loop.speculator.stats.as_dict()
                        s_runs.append(_timed(spec, body))
                        counts.append(_spec_delta(spec, before))
                    else:
                        p_runs.append(_timed(plain, body))
            wall = [s_["tok_s"] / p_["tok_s"] for p_, s_ in zip(p_runs, s_runs)]
            cpu = [s_["cpu_tok_s"] / p_["cpu_tok_s"] for p_, s_ in zip(p_runs, s_runs)]
            r = {"scenario": "api", "dtype": dtype, "prompt": name, "grounded": name in GROUNDED,
                 "new_tokens": p_runs[0]["tokens"],
                 "plain_tok_s": round(statistics.median(x["tok_s"] for x in p_runs), 2),
                 "ngram_tok_s": round(statistics.median(x["tok_s"] for x in s_runs), 2),
                 "speedup_wall": round(statistics.median(wall), 3), "speedup_cpu": round(statistics.median(cpu), 3),
                 "speedup_wall_runs": [round(x, 2) for x in wall], "speedup_cpu_runs": [round(x, 2) for x in cpu],
                 **counts[0],
                 "same_answer": all(x["response"] == p_runs[0]["response"] and x["tokens"] == p_runs[0]["tokens"]
                                    for x in p_runs + s_runs)}
            print(json.dumps(r), flush=True)
            rows.append(r)
        del plain, spec
    return rows


def bench_concurrent(args) -> list[dict]:
    rows = []
    names = [args.prompts[i % len(args.prompts)] for i in range(args.rows)]
    for dtype in args.dtype:
        plain = llama32.load(args.smollm2, dtype=dtype, device="cpu", max_batch=args.rows)
        spec = llama32.load(args.smollm2, dtype=dtype, device="cpu", max_batch=args.rows, speculative="ngram")
        bodies = [dict(prompt=PROMPTS[n], max_tokens=args.new_tokens, temperature=0) for n in names]

        def together(llm) -> dict:
            outs = [None] * len(bodies)

            def work(i):
                outs[i] = llama32.generate(llm, **bodies[i])

            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
            t, c = time.perf_counter(), time.process_time()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            n = sum(o["usage"]["completion_tokens"] for o in outs)
            return {"responses": [o["response"] for o in outs], "tokens": n, "tok_s": n / wall, "cpu_tok_s": n / cpu}

        together(plain), together(spec)  # warm-up
        p_runs, s_runs, counts = [], [], []
        for i in range(args.repeats):
            for which in ((plain, spec) if i % 2 == 0 else (spec, plain)):
                if which is spec:
                    before = spec.loop.speculator.stats.as_dict()
                    s_runs.append(together(spec))
                    counts.append(_spec_delta(spec, before))
                else:
                    p_runs.append(together(plain))
        wall = [s_["tok_s"] / p_["tok_s"] for p_, s_ in zip(p_runs, s_runs)]
        cpu = [s_["cpu_tok_s"] / p_["cpu_tok_s"] for p_, s_ in zip(p_runs, s_runs)]
        r = {"scenario": "concurrent", "dtype": dtype, "rows": args.rows, "prompts": names,
             "tokens": p_runs[0]["tokens"],
             "plain_tok_s": round(statistics.median(x["tok_s"] for x in p_runs), 2),
             "ngram_tok_s": round(statistics.median(x["tok_s"] for x in s_runs), 2),
             "speedup_wall": round(statistics.median(wall), 3), "speedup_cpu": round(statistics.median(cpu), 3),
             "speedup_wall_runs": [round(x, 2) for x in wall], "speedup_cpu_runs": [round(x, 2) for x in cpu],
             **counts[0],
             "same_answers": all(x["responses"] == p_runs[0]["responses"] for x in p_runs + s_runs),
             # whether the plain runs agree among themselves (rows arrive in another order each run)
             "plain_runs_agree": all(x["responses"] == p_runs[0]["responses"] for x in p_runs)}
        print(json.dumps(r), flush=True)
        rows.append(r)
        del plain, spec
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=("verify", "api", "concurrent", "ngram"))
    p.add_argument("--dtype", nargs="+", default=["bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ckpt", type=Path, default=None, help="verify: an existing 1B-shape checkpoint")
    p.add_argument("--ckpt-out", type=Path, default=REPO / "benchmarks" / "out", help="verify: where bench.py "
                   "writes its random 1B checkpoint")
    p.add_argument("--context", type=int, default=256, help="verify: tokens in the cache before the step")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="verify: rows per step")
    p.add_argument("--rows", type=int, default=8, help="concurrent: callers at once")
    p.add_argument("--smollm2", type=Path, default=Path(os.environ.get("LLAMA32_TEST_CACHE", REPO / ".cache" / "test-fixtures")) / "smollm2-135m-instruct",
                   help="api, concurrent, ngram: the SmolLM2 checkpoint the tests build")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--cost", type=float, default=AdaptiveK.cost_per_token, help="ngram: AdaptiveK's cost_per_token")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(json.dumps({"machine": info}), flush=True)
    run = {"verify": bench_verify, "api": bench_api, "concurrent": bench_concurrent, "ngram": bench_ngram}
    rows = run[args.scenario](args)
    print(json.dumps({"loadavg_end": list(os.getloadavg())}), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
