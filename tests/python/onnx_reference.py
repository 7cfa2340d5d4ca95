"""Sentence embeddings of a checkpoint folder's model.onnx as ONNX Runtime's
Python package computes them (the reference for the Rust ONNX path):
tokenized with the folder's tokenizer.json by the `tokenizers` package
(padding off, truncated to sentence_bert_config.json's max_seq_length), one
text at a time, mean-pooled over the attention mask from the graph's token
embeddings in numpy, L2-normalized when modules.json lists Normalize.
Also prints the graph's own pooled output when it has one (rank 2).

    python3 onnx_reference.py FOLDER TEXT...   # prints JSON
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main():
    folder, texts = sys.argv[1], sys.argv[2:]
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()
    sbc = json.load(open(os.path.join(folder, "sentence_bert_config.json")))
    tok.enable_truncation(sbc["max_seq_length"])
    modules = json.load(open(os.path.join(folder, "modules.json")))
    normalize = any(m["type"].endswith("Normalize") for m in modules)
    sess = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outputs = sess.get_outputs()
    token_out = next(
        (o.name for o in outputs if o.name in ("last_hidden_state", "token_embeddings")),
        None,
    ) or next(o.name for o in outputs if o.type == "tensor(float)" and len(o.shape) == 3)
    pooled_out = next((o.name for o in outputs if o.type == "tensor(float)" and len(o.shape) == 2), None)
    result = {"version": ort.__version__, "embeddings": [], "graph_pooled": [], "tokens": []}
    for t in texts:
        enc = tok.encode(t.lower() if sbc.get("do_lower_case") else t)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        wanted = [token_out] + ([pooled_out] if pooled_out else [])
        out = sess.run(wanted, feed)
        h = out[0][0]
        v = (h * mask[0][:, None]).sum(0) / mask[0].sum()
        if normalize:
            v = v / max(np.linalg.norm(v), 1e-12)
        result["embeddings"].append(v.astype(float).tolist())
        result["tokens"].append(len(enc.ids))
        if pooled_out:
            result["graph_pooled"].append(out[1][0].astype(float).tolist())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
