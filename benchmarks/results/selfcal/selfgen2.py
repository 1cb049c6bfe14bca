"""Self-calibration text, second try: sequences sampled from the model itself from its end-of-text token, with a
temperature falling linearly from T0 to T1 over each sequence, a repetition penalty, and samples that zlib compresses
under MIN_RATIO (repetition loops) thrown away and drawn again. Usage: selfgen2.py MODEL OUT.txt N_SEQ NEW_TOKENS"""
import sys, time, zlib, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
model_dir, out, n_seq, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
T0, T1, REP, MIN_RATIO, BATCH = 1.5, 0.7, 1.1, 0.2, 16
torch.manual_seed(0)
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
start = tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id

class FallingTemperature(LogitsProcessor):
    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - 1
        t = T0 + (T1 - T0) * min(step / max(new - 1, 1), 1.0)
        return scores / t

docs, t0, rejected = [], time.time(), 0
with torch.no_grad():
    while len(docs) < n_seq and rejected < 2 * n_seq:
        ids = torch.full((BATCH, 1), start)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, temperature=1.0,
                           repetition_penalty=REP, logits_processor=LogitsProcessorList([FallingTemperature()]),
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=start)
        for row in g[:, 1:]:
            text = tok.decode(row, skip_special_tokens=True)
            text = "\n".join(line for line in text.splitlines() if line.strip())
            raw = text.encode()
            ratio = len(zlib.compress(raw)) / max(len(raw), 1)
            if ratio < MIN_RATIO:
                rejected += 1
                continue
            if len(docs) < n_seq:
                docs.append(text)
        print(f"{len(docs)} kept, {rejected} rejected, {time.time() - t0:.0f} s", flush=True)
open(out, "w").write("\n\n".join(docs) + "\n")
print(docs[0][:400])
