"""Greedy generation of a Llama-family checkpoint folder as Hugging Face
`transformers` computes it (`LlamaForCausalLM.generate(do_sample=False)`),
reimplemented in numpy because `transformers`' models need torch (PyPI's
wheel is about 800 MB with its CUDA libraries). Token ids come from
`transformers` itself (`AutoTokenizer(prompt)` for raw prompts,
`apply_chat_template(..., add_generation_prompt=True)` for chats: neither
needs torch), then full forward passes in float64: embedding, per layer
RMSNorm -> attention (q/k/v/o, rotary embeddings as `rotate_half` with
`inv_freq = theta^(-2i/d)`, grouped-query heads, causal softmax) -> residual
-> RMSNorm -> SwiGLU MLP -> residual, final RMSNorm, the (tied or separate)
LM head, argmax; stops after an eos id (kept, as generate keeps it) or
max_new_tokens. Prints {"prompts": [{"prompt", "input_ids", "new_ids",
"text"}]} where text is the new ids decoded with skip_special_tokens=True.

    python3 llama_greedy.py MODEL_DIR MAX_NEW_TOKENS raw|chat PROMPT...
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from transformers import AutoTokenizer


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


class Llama:
    def __init__(self, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        self.cfg = cfg
        w = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                w.update({k: v.astype(np.float64) for k, v in load_file(os.path.join(folder, f)).items()})
        self.w = w
        self.h = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads") or self.nh
        self.hd = cfg.get("head_dim") or self.h // self.nh
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.layers = cfg["num_hidden_layers"]
        self.head = w.get("lm_head.weight", w["model.embed_tokens.weight"])

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def logits_last(self, ids):
        w, t = self.w, len(ids)
        x = w["model.embed_tokens.weight"][ids]
        inv = 1.0 / (self.theta ** (np.arange(0, self.hd, 2, dtype=np.float64) / self.hd))
        freqs = np.outer(np.arange(t, dtype=np.float64), inv)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        mask = np.triu(np.full((t, t), -np.inf), 1)
        for l in range(self.layers):
            p = "model.layers.%d." % l
            hx = rms_norm(x, w[p + "input_layernorm.weight"], self.eps)
            q = self.linear(hx, p + "self_attn.q_proj").reshape(t, self.nh, self.hd).transpose(1, 0, 2)
            k = self.linear(hx, p + "self_attn.k_proj").reshape(t, self.nkv, self.hd).transpose(1, 0, 2)
            v = self.linear(hx, p + "self_attn.v_proj").reshape(t, self.nkv, self.hd).transpose(1, 0, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            rep = self.nh // self.nkv
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(self.hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(t, self.nh * self.hd)
            x = x + self.linear(a, p + "self_attn.o_proj")
            hx = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
            g = silu(self.linear(hx, p + "mlp.gate_proj")) * self.linear(hx, p + "mlp.up_proj")
            x = x + self.linear(g, p + "mlp.down_proj")
        x = rms_norm(x, w["model.norm.weight"], self.eps)
        return x[-1] @ self.head.T


def main():
    folder, max_new, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = AutoTokenizer.from_pretrained(folder)
    model = Llama(folder)
    eos = model.cfg.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        g = json.load(open(gen)).get("eos_token_id")
        if g is not None:
            eos = set(g if isinstance(g, list) else [g])
    out = []
    for prompt in sys.argv[4:]:
        if mode == "chat":
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = tok(prompt)["input_ids"]
        seq, new = list(ids), []
        while len(new) < max_new:
            nxt = int(np.argmax(model.logits_last(seq)))
            new.append(nxt)
            seq.append(nxt)
            if nxt in eos:
                break
        out.append({"prompt": prompt, "input_ids": ids, "new_ids": new,
                    "text": tok.decode(new, skip_special_tokens=True)})
    print(json.dumps({"prompts": out}))


if __name__ == "__main__":
    main()
