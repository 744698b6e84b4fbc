"""Replay NgramProposer over fixed greedy answers (rename_gen.py's JSON): verify steps with 8 proposals at each,
and the speedup an oracle would get proposing exactly the tokens to be accepted (benchmarks/RESULTS.md)."""
import sys, json
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]; sys.path.insert(0, str(REPO))
from llama32.speculative import NgramProposer
d = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "rename_gen.json"))
for name in d:
    p, g = d[name]["prompt"], d[name]["gen"]
    prop = NgramProposer(max_n=4); i = 1; runs = []
    while i < len(g):
        props = prop.propose(p + g[:i], 8)
        a = 0
        while a < len(props) and i + a < len(g) and props[a] == g[i + a]:
            a += 1
        runs.append(a); i += a + 1
    n = len(g) - 1
    for label, fixed, c in (("fp32", 0.15, 0.11), ("bf16", 0.0, 0.1)):
        cost = sum(1 + (fixed + c * a if a else 0) for a in runs)
        print(name, label, "tokens", n, "verify steps", len(runs), "oracle bound", round(n / cost, 2))
