"""Replay NgramProposer over fixed greedy answers (rename_gen.py's JSON): verify steps with 8 proposals at each,
and the speedup an oracle would get proposing exactly the tokens to be accepted (benchmarks/RESULTS.md)."""
import sys, json
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]; sys.path.insert(0, str(REPO))
from llama32.engine.speculative import NgramProposer
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
    # the verify costs measured on the Llama 3.2 1B shape in bfloat16 (RESULTS.md: k = 2..8; k = 1 interpolated)
    one_b = {0: 1.0, 1: 1.05, 2: 1.09, 3: 1.17, 4: 1.36, 5: 1.39, 6: 1.64, 7: 1.77, 8: 1.80}
    print(name, "1B-bf16 costs", "oracle bound", round(n / sum(one_b[a] for a in runs), 2))
