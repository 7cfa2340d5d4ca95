# Independent numpy re-implementations of FusionBench's ties_merging (model
# scope, as fusion_bench/method/ties_merging/ties_merging_utils.py computes
# it), mergekit's ties (per tensor) and slerp, FusionBench's iso_c, iso_cts,
# tsv_m and wudi (every 2-D tensor, the embedding included, unless named in
# exclude_keys), MagnitudeDiffPruningAlgorithm (from a mergekit YAML) and
# MagMaxAlgorithm (the experts in two orders),
# compared with `fusion merge` on a random f32 pool. Usage: check_methods.py FUSION_BINARY (run in an
# empty folder). Exit status 0 when every method agrees within 1e-5.
import json, os, subprocess, sys
import numpy as np
from safetensors.numpy import save_file, load_file

rng = np.random.default_rng(0)
shapes = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (12, 8),
          "model.layers.1.mlp.up_proj.weight": (12, 8), "model.norm.weight": (8,)}
base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
experts = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(3)]
for name, sd in [("base", base)] + [(f"e{i}", e) for i, e in enumerate(experts)]:
    os.makedirs(name, exist_ok=True)
    save_file(sd, f"{name}/model.safetensors", metadata={"format": "pt"})
    json.dump({"model_type": "llama"}, open(f"{name}/config.json", "w"))
keys = sorted(shapes)

def fb_ties(density, lam, merge_func):
    flat = np.stack([np.concatenate([(e[k] - base[k]).ravel() for k in keys]) for e in experts])
    n, d = flat.shape
    k = d - int(d * density)
    kth = np.sort(np.abs(flat), axis=1)[:, k - 1:k]
    trimmed = flat * (np.abs(flat) >= kth)
    sign = np.sign(trimmed.sum(0))
    majority = np.sign(sign.sum())
    sign[sign == 0] = majority
    keep = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge_func == "sum": merged = sel.sum(0)
    elif merge_func == "mean": merged = sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
    else: merged = np.abs(sel).max(0) * sign
    out, off = {}, 0
    for kk in keys:
        m = base[kk].size
        out[kk] = base[kk] + lam * merged[off:off + m].reshape(base[kk].shape)
        off += m
    return out

def mk_ties(density, weights, lam=1.0):
    out = {}
    for kk in keys:
        deltas = []
        for e in experts:
            t = (e[kk] - base[kk]).ravel()
            kkeep = int(density * t.size)
            mask = np.zeros_like(t)
            mask[np.argsort(-np.abs(t), kind="stable")[:kkeep]] = 1
            deltas.append(t * mask)
        deltas = np.stack(deltas)
        w = np.array(weights, dtype=np.float32)[:, None]
        wd = deltas * w
        sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(deltas) == sign
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[np.abs(div) < 1e-8] = 1
        out[kk] = base[kk] + lam * (mixed / div).reshape(base[kk].shape)
    return out

def run(args, out):
    subprocess.run([sys.argv[1], "merge", *args, "--out", out, "--force", "--quiet"], check=True, stderr=subprocess.DEVNULL)
    return load_file(f"{out}/model.safetensors")

worst = 0
for density, mf in [(0.2, "sum"), (0.5, "mean"), (0.35, "max")]:
    got = run(["--spec", f"ties_merging(e0,e1,e2;base=base,density={density},merge_func={mf},scaling_coefficient=0.3)"], "fb")
    want = fb_ties(density, 0.3, mf)
    err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
    print(f"ties_merging density={density} {mf}: max abs diff {err:.2e}")
open("mk.yaml", "w").write("merge_method: ties\nbase_model: base\nmodels:\n  - model: e0\n    parameters: {weight: 1.0, density: 0.5}\n  - model: e1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: e2\n    parameters: {weight: 0.8, density: 0.5}\n")
got = run(["mk.yaml"], "mk")
want = mk_ties(0.5, [1.0, 0.5, 0.8])
err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
print(f"mergekit ties density=0.5: max abs diff {err:.2e}")
def mk_slerp(t, a, b, eps=1e-8, thr=0.9995):
    out = {}
    for kk in keys:
        v0, v1 = a[kk].astype(np.float64), b[kk].astype(np.float64)
        n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
        dot = np.sum((v0 / n0 if n0 > eps else v0) * (v1 / n1 if n1 > eps else v1))
        if abs(dot) > thr:
            out[kk] = (1 - t) * v0 + t * v1
        else:
            th = np.arccos(dot)
            out[kk] = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
    return out

open("slerp.yaml", "w").write("merge_method: slerp\nbase_model: e0\nmodels:\n  - model: e0\n  - model: e1\nparameters:\n  t: 0.3\n")
got = run(["slerp.yaml"], "sl")
want = mk_slerp(0.3, experts[0], experts[1])
err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
print(f"slerp t=0.3: max abs diff {err:.2e}")

# FusionBench's matrix methods, transcribed from iso_utils.py, TSVM_utils.py
# and wudi.py: 2-D tensors not in exclude_keys are merged as matrices, the
# others take the mean of the task vectors.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matrix_methods_4x3 import iso_c, iso_cts, tsv_m, wudi

def fb_matrix(merge, scale, exclude):
    out = {}
    for kk in keys:
        tvs = [(e[kk] - base[kk]).astype(np.float64) for e in experts]
        if len(base[kk].shape) == 2 and kk not in exclude:
            tv = merge(tvs)
        else:
            tv = sum(tvs) / len(tvs)
        out[kk] = base[kk] + scale * tv
    return out

cases = [
    ("iso_c", "scaling_factor=1.5", lambda t: iso_c(t), 1.5),
    ("iso_cts", "common_space_fraction=0.8", lambda t: iso_cts(t, 0.8), 1.0),
    ("tsv_m", "alpha=0.7", lambda t: tsv_m(t), 0.7),
    ("wudi", "iter_num=400", lambda t: wudi(t, 400, 1e-5), 1.0),
]
embed = "model.embed_tokens.weight"
for method, params, merge, scale in cases:
    for exclude in [[], [embed]]:
        extra = f",exclude_keys=[{','.join(exclude)}]" if exclude else ""
        got = run(["--spec", f"{method}(e0,e1,e2;base=base,{params}{extra})"], "mx")
        want = fb_matrix(merge, scale, exclude)
        err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
        print(f"{method} exclude_keys={exclude}: max abs diff {err:.2e}")

def fb_magnitude_diff(ft, ratio, major):
    out = {k: base[k].copy() for k in keys}
    for kk in keys:
        # FusionBench prunes nn.Linear weights: here the mlp projections.
        if "mlp" in kk:
            d = ft[kk] - base[kk]
            metric = -np.abs(d) if major else np.abs(d)
            idx = np.argsort(metric, axis=-1, kind="stable")[:, :int(d.shape[1] * ratio)]
            np.put_along_axis(d, idx, 0.0, axis=1)
            out[kk] = base[kk] + d
    return out

for ptype in ["minor", "major"]:
    open("mp.yaml", "w").write(f"merge_method: magnitude_pruning\nbase_model: base\nmodels:\n  - model: base\n  - model: e1\nparameters:\n  prune_ratio: 0.5\n  prune_type: {ptype}\n")
    got = run(["mp.yaml"], "mp")
    want = fb_magnitude_diff(experts[1], 0.5, ptype == "major")
    err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
    print(f"magnitude_pruning (YAML, diff) {ptype}: max abs diff {err:.2e}")
def fb_magmax(order, scale):
    # FusionBench's MagMaxAlgorithm: fold the task vectors in order, a later
    # one replacing the running pick where |tau| >= |pick|.
    out = {}
    for kk in keys:
        pick = None
        for i in order:
            tv = experts[i][kk] - base[kk]
            pick = tv if pick is None else np.where(np.abs(tv) >= np.abs(pick), tv, pick)
        out[kk] = base[kk] + scale * pick
    return out

for order, scale in [([0, 1, 2], 0.5), ([2, 0, 1], 0.8)]:
    names = ",".join(f"e{i}" for i in order)
    got = run(["--spec", f"magmax({names};base=base,scaling_factor={scale})"], "mm")
    want = fb_magmax(order, scale)
    err = max(np.abs(got[k] - want[k]).max() for k in keys); worst = max(worst, err)
    print(f"magmax {names} scaling_factor={scale}: max abs diff {err:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
