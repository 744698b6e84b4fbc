"""Each spec_bench prompt decoded greedily by SmolLM2-135M-Instruct (float32, up to 128 tokens), its prompt and
answer ids saved as JSON (argument: the file; default rename_gen.json) for rename_bound.py."""
import sys, json, torch
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]; sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "benchmarks"))
torch.set_num_threads(1)
import llama32
from spec_bench import PROMPTS, prompt_ids, Row
llm = llama32.load(str(REPO / ".cache" / "test-fixtures" / "smollm2-135m-instruct"), dtype="float32", device="cpu")
out = {}
with torch.inference_mode():
    for name, text in PROMPTS.items():
        ids = prompt_ids(llm, text)
        row = Row(llm, ids, 140)
        gen = [row.prefill()]
        for _ in range(127):
            lg = row.forward([gen[-1]])[-1:]
            t = int(lg.argmax(-1)); row.ids.append(t); gen.append(t)
            if t in row.eos: break
        out[name] = {"prompt": ids, "gen": gen}
        print(name, repr(llm.tokenizer.decode(gen))[:400], flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "rename_gen.json", "w"))
