"""8 greedy 64-token requests started together against one: when the last first token came, and the decode
step after it. `python arrivals_probe.py <tree>` imports llama32 from <tree> (a checkout: old or new code);
the checkpoint is benchmarks/out/ckpt-1b (bench.py writes it)."""
import sys, time, threading, json
T = sys.argv[1]; sys.path.insert(0, T)
import llama32, torch
def words(n_tokens, tag, tok):
    text, unit = f"{tag}:", " alpha beta gamma delta epsilon zeta eta theta"
    while len(tok.encode(text)) < n_tokens:
        text += unit
    return text
llm = llama32.load(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "out" / "ckpt-1b"), dtype="bfloat16", device="cpu")
reqs = [dict(prompt=words(24, f"g{i}", llm.tokenizer), raw=True, temperature=0, max_tokens=64) for i in range(8)]
def run(rs):
    stamps = [[] for _ in rs]
    def work(i):
        for _ in llama32.generate(llm, stream=True, **rs[i]):
            stamps[i].append(time.perf_counter())
    th = [threading.Thread(target=work, args=(i,)) for i in range(len(rs))]
    t0 = time.perf_counter()
    for t in th: t.start()
    for t in th: t.join()
    first = max(s[0] for s in stamps) - t0
    total = max(s[-1] for s in stamps) - t0
    return dict(n=len(rs), first_all=round(first, 2), total=round(total, 2), decode=round(total - first, 2), per_step=round((total-first)/63, 4))
run(reqs[:1])
for _ in range(2):
    print(T, llama32.__file__[:12], run(reqs[:1]), run(reqs))
