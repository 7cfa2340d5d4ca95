"""CLIPVisionModelWithProjection's image embeddings of a checkpoint folder,
computed the way transformers' modeling_clip computes them, in numpy
(PyTorch is not installable everywhere the tests run):

- the folder's config.json read by transformers' own CLIPVisionConfig (so
  a key the writer names wrongly falls back to transformers' default and
  the embeddings disagree);
- its preprocessor_config.json and images run through transformers' own
  CLIPImageProcessor;
- the weights read by their Hugging Face names from model.safetensors.

usage: clip_vision_hf.py DIR IMG... ; writes DIR/hf_embeds.f32 (images ×
projection_dim, little-endian f32) and prints the config it read.
"""
import json
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig

folder, images = sys.argv[1], sys.argv[2:]
cfg = CLIPVisionConfig.from_pretrained(folder)
proc = CLIPImageProcessor.from_pretrained(folder)
w = {k: v.astype(np.float64) for k, v in load_file(f"{folder}/model.safetensors").items()}
pixels = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="np")[
    "pixel_values"
].astype(np.float64)


def layer_norm(x, pre):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[pre + ".weight"] + w[pre + ".bias"]


def linear(x, pre, bias=True):
    y = x @ w[pre + ".weight"].T
    return y + w[pre + ".bias"] if bias else y


def act(x):
    if cfg.hidden_act == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    if cfg.hidden_act == "gelu":
        from math import erf

        return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    raise SystemExit(f"activation {cfg.hidden_act} not in this reference")


b, c, s, _ = pixels.shape
p, h = cfg.patch_size, cfg.hidden_size
g = s // p
e = "vision_model.embeddings"
# Conv2d(kernel = stride = patch, no bias) as a product over patches.
patches = pixels.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
x = patches @ w[f"{e}.patch_embedding.weight"].reshape(h, -1).T
cls = np.broadcast_to(w[f"{e}.class_embedding"], (b, 1, h))
x = np.concatenate([cls, x], 1) + w[f"{e}.position_embedding.weight"][None]
x = layer_norm(x, "vision_model.pre_layrnorm")
heads = cfg.num_attention_heads
d = h // heads
for i in range(cfg.num_hidden_layers):
    pre = f"vision_model.encoder.layers.{i}"
    a = layer_norm(x, pre + ".layer_norm1")
    split = lambda y: y.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    q = split(linear(a, pre + ".self_attn.q_proj") * d**-0.5)
    k = split(linear(a, pre + ".self_attn.k_proj"))
    v = split(linear(a, pre + ".self_attn.v_proj"))
    sc = q @ k.transpose(0, 1, 3, 2)
    sc = np.exp(sc - sc.max(-1, keepdims=True))
    sc /= sc.sum(-1, keepdims=True)
    ctx = (sc @ v).transpose(0, 2, 1, 3).reshape(b, -1, h)
    x = x + linear(ctx, pre + ".self_attn.out_proj")
    m = layer_norm(x, pre + ".layer_norm2")
    x = x + linear(act(linear(m, pre + ".mlp.fc1")), pre + ".mlp.fc2")
pooled = layer_norm(x[:, 0], "vision_model.post_layernorm")
embeds = linear(pooled, "visual_projection", bias=False)
assert embeds.shape == (b, cfg.projection_dim), embeds.shape
embeds.astype("<f4").tofile(f"{folder}/hf_embeds.f32")
print(json.dumps({k: getattr(cfg, k) for k in ["hidden_size", "num_hidden_layers", "image_size", "patch_size", "projection_dim", "hidden_act"]}))
