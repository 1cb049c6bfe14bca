"""Mixed calibration file: the model's own samples plus the start of wiki.txt up to WIKI_TOKENS tokens."""
import re, sys
from transformers import AutoTokenizer
model_dir, self_txt, wiki_txt, out, wiki_tokens = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(model_dir)
own = open(self_txt).read().strip("\n")
docs, n = [], 0
for d in re.split(r"\n\s*\n", open(wiki_txt).read()):
    if n >= wiki_tokens:
        break
    docs.append(d.strip("\n")); n += len(tok(d, add_special_tokens=False)["input_ids"])
n_own = len(tok(own, add_special_tokens=False)["input_ids"])
open(out, "w").write("\n\n".join(docs) + "\n\n" + own + "\n")
print(f"wiki {n} tokens in {len(docs)} documents + own samples {n_own} tokens -> {out}")
