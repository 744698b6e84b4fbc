"""Batch-1 decode through the loop: total time against the time inside the model's forward, so the loop's own
cost per step shows. `python overhead_probe.py <tree>` imports llama32 from <tree>; checkpoint as arrivals_probe.py."""
import sys, time
T = sys.argv[1]; sys.path.insert(0, T)
import llama32, torch
llm = llama32.load(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "out" / "ckpt-1b"), dtype="bfloat16", device="cpu")
def words(n_tokens, tag, tok):
    text, unit = f"{tag}:", " alpha beta gamma delta epsilon zeta eta theta"
    while len(tok.encode(text)) < n_tokens:
        text += unit
    return text
p = words(128, "decode", llm.tokenizer)
model = llm.model
orig = model.forward
acc = [0.0, 0]
def fwd(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); acc[0] += time.perf_counter() - t; acc[1] += 1; return r
model.forward = fwd
llama32.generate(llm, prompt=p, raw=True, temperature=0, max_tokens=4)
for rep in range(3):
    acc[:] = [0.0, 0]
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in llama32.generate(llm, prompt=p + f" {rep}", raw=True, temperature=0, max_tokens=65, stream=True)]
    total = stamps[-1] - t0
    print(T, "total", round(total, 3), "model", round(acc[0], 3), "calls", acc[1], "overhead/step ms", round((total - acc[0]) / 65 * 1000, 2))
