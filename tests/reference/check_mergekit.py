# Independent numpy re-implementations of mergekit's sce (sce.py),
# breadcrumbs_ties, della and della_linear (generalized_task_arithmetic.py
# with sparsify.py's magnitude_outliers and della_magprune), nuslerp
# (nuslerp.py), multislerp (multislerp.py), karcher (karcher.py),
# arcee_fusion (arcee_fusion.py) and nearswap (nearswap.py), each transcribed
# from mergekit's source and compared with `fusion merge` run on a mergekit
# YAML config over a random f32 pool. della_magprune is random, so della and
# della_linear are checked exactly at density 1 (where it keeps the task
# vector as it is) and statistically on one larger tensor: the kept entries
# must be the task vector's (or, with rescale, one multiple of it that keeps
# the L1 norm), and the keep rate per magnitude-rank decile must follow
# mergekit's keep probabilities. Usage: check_mergekit.py FUSION_BINARY (run
# in an empty folder). Exit status 0 when every check agrees within 1e-5.
import json, os, subprocess, sys
import numpy as np
from safetensors.numpy import save_file, load_file

FUSION = sys.argv[1]
rng = np.random.default_rng(0)
shapes = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (12, 8),
          "model.layers.1.self_attn.q_proj.weight": (8, 8), "model.norm.weight": (8,)}
base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
experts = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(3)]
# A second pool, one larger tensor, for della's random pruning.
UP = "model.layers.0.mlp.up_proj.weight"
base2 = {UP: rng.normal(size=(256, 512)).astype(np.float32)}
x2 = {UP: (base2[UP] + rng.normal(scale=0.1, size=(256, 512))).astype(np.float32)}
pools = [("base", base)] + [(f"e{i}", e) for i, e in enumerate(experts)] + [("base2", base2), ("x2", x2)]
for name, sd in pools:
    os.makedirs(name, exist_ok=True)
    save_file(sd, f"{name}/model.safetensors", metadata={"format": "pt"})
    json.dump({"model_type": "llama"}, open(f"{name}/config.json", "w"))
keys = sorted(shapes)
W = [1.0, 0.5, 0.8]

def f64(x):
    # mergekit computes in the tensors' dtype (f32); differences such as
    # x - base are taken in f32 as it does, then carried on in f64.
    return np.asarray(x).astype(np.float64)

def fmt(v):
    if isinstance(v, bool): return "true" if v else "false"
    if isinstance(v, int): return str(v)
    if isinstance(v, float): return np.format_float_positional(v, trim="0")
    return str(v)

def write_yaml(path, method, models, base_model=None, params=None, seed=None):
    """models: [(name, {parameter: value} or None)], in order."""
    lines = [f"merge_method: {method}"]
    if base_model: lines.append(f"base_model: {base_model}")
    lines.append("models:")
    for name, p in models:
        lines.append(f"  - model: {name}")
        if p: lines.append("    parameters: {" + ", ".join(f"{k}: {fmt(v)}" for k, v in p.items()) + "}")
    if params: lines.append("parameters: {" + ", ".join(f"{k}: {fmt(v)}" for k, v in params.items()) + "}")
    if seed is not None: lines.append(f"seed: {seed}")
    open(path, "w").write("\n".join(lines) + "\n")

def run(cfg, out):
    p = subprocess.run([FUSION, "merge", cfg, "--out", out, "--force", "--quiet"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        print(f"`fusion merge {cfg}` failed with exit status {p.returncode}; the config:\n{open(cfg).read()}stderr:\n{p.stderr}")
        sys.exit(1)
    return load_file(f"{out}/model.safetensors")

worst, checks = 0.0, 0

def record(label, err, counted=None):
    """Prints one check; `counted` (default: err) goes into worst."""
    global worst, checks
    checks += 1
    worst = max(worst, err if counted is None else counted)
    print(f"{label}: max abs diff {err:.2e}")

def compare(label, got, want):
    err = 0.0
    for k in want:
        if k not in got or got[k].shape != want[k].shape:
            print(f"{label}: tensor {k} missing or of shape {got[k].shape if k in got else None}, expected {want[k].shape}")
            err = float("inf")
            continue
        err = max(err, float(np.abs(f64(got[k]) - f64(want[k])).max()))
    record(label, err)

def per_tensor(f):
    return {k: f(k) for k in keys}

def bshape(v, nd):
    """A vector of per-model numbers shaped to broadcast over stacked tensors."""
    return np.asarray(v, dtype=np.float64).reshape((-1,) + (1,) * nd)

def majority_mask(deltas):
    # generalized_task_arithmetic.get_mask(method="sum"): the sign of the sum
    # (>= 0 counts as +), entries whose own sign differs (zeros included) out.
    majority = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    return np.sign(deltas) == majority

# ---- sce (sce.py) ---------------------------------------------------------
def mk_sce(select_topk):
    def one(k):
        b = base[k]
        tv = np.stack([f64(e[k] - b) for e in experts])
        if select_topk < 1:
            if select_topk <= 0:
                mask = np.zeros(b.shape)
            else:
                var = tv.var(0)  # unbiased=False
                # int(count_nonzero(var) * density): an int64 tensor times a
                # Python float is f32 in torch.
                kk = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
                mask = np.zeros(b.size)
                if kk > 0:
                    mask[np.argsort(-np.abs(var).ravel(), kind="stable")[:kk]] = 1
                mask = mask.reshape(b.shape)
            tv = tv * mask[None]
        erase = majority_mask(tv)
        w = (tv ** 2).reshape(len(tv), -1).mean(1)
        ws = w.sum()
        w = np.ones_like(w) / len(w) if abs(ws) < 1e-6 else w / ws
        ew = bshape(w, b.ndim) * erase
        return f64(b) + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)
    return per_tensor(one)

write_yaml("cfg.yaml", "sce", [("base", None), ("e0", None), ("e1", None), ("e2", None)], "base", {"select_topk": 0.5})
compare("sce select_topk=0.5", run("cfg.yaml", "out"), mk_sce(0.5))
write_yaml("cfg.yaml", "sce", [("e0", None), ("e1", None), ("e2", None)], "base")
compare("sce select_topk=1.0 (default)", run("cfg.yaml", "out"), mk_sce(1.0))

# ---- generalized task arithmetic ------------------------------------------
def magnitude_outliers(t, density, gamma):
    # sparsify.magnitude_outliers: drop the n_top largest |t| and the n_bot
    # smallest. mergekit keeps indices[n_bot:-n_top], which is empty when
    # n_top == 0; the checks below keep n_top >= 1, where both readings agree.
    if density >= 1:
        return t
    n = t.size
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target_n - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    assert n_top >= 1, "pick gamma so that int(gamma * n) >= 1"
    order = np.argsort(np.abs(t).ravel(), kind="stable")
    mask = np.zeros(n)
    mask[order[n_bot:n - n_top]] = 1
    return t * mask.reshape(t.shape)

def mk_gta(sparsify, consensus, normalize, lam, weights):
    # GTATask.execute; rescale is None (breadcrumbs) or moot (della at
    # density 1, where della_magprune returns the tensor unchanged).
    def one(k):
        b = base[k]
        deltas = np.stack([sparsify(f64(e[k] - b), i) for i, e in enumerate(experts)])
        w = bshape(weights, b.ndim)
        wd = deltas * w
        if consensus:
            mask = majority_mask(wd)
            mixed = (wd * mask).sum(0)
            div = (w * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed = wd.sum(0)
            div = w.sum(0)
            div[np.abs(div) < 1e-8] = 1
        if normalize:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        return f64(b) + mixed
    return per_tensor(one)

bc_models = [("base", None)] + [(f"e{i}", {"weight": w, "density": 0.6, "gamma": 0.15}) for i, w in enumerate(W)]
bc = lambda t, i: magnitude_outliers(t, 0.6, 0.15)
write_yaml("cfg.yaml", "breadcrumbs_ties", bc_models, "base")
compare("breadcrumbs_ties density=0.6 gamma=0.15", run("cfg.yaml", "out"), mk_gta(bc, True, False, 1.0, W))
write_yaml("cfg.yaml", "breadcrumbs_ties", bc_models, "base", {"normalize": True, "lambda": 0.7})
compare("breadcrumbs_ties density=0.6 gamma=0.15 normalize lambda=0.7", run("cfg.yaml", "out"), mk_gta(bc, True, True, 0.7, W))

keep = lambda t, i: t  # della_magprune at density >= 1
della_models = [("base", None)] + [(f"e{i}", {"weight": w, "density": 1.0}) for i, w in enumerate(W)]
for method, consensus, normalize in [("della", True, True), ("della_linear", False, False)]:
    for lam in [1.0, 0.5]:
        write_yaml("cfg.yaml", method, della_models, "base", {"lambda": lam} if lam != 1 else None)
        compare(f"{method} density=1 lambda={lam}", run("cfg.yaml", "out"), mk_gta(keep, consensus, normalize, lam, W))

# ---- della_linear's random pruning, statistically -------------------------
# One expert, weight 1, lambda 1, no normalization: out - base = tau * mask
# (times the L1 rescale factor when rescale is on). della_magprune ranks
# |tau| within each row and keeps an entry with probability
# (density - epsilon) + rank_norm * 2 * epsilon, rank_norm = rank / (ncols - 1).
density, epsilon = 0.5, 0.15
tau = f64(x2[UP] - base2[UP])
nrows, ncols = tau.shape
ranks = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1, kind="stable")
probs = (density - epsilon) + ranks / (ncols - 1) * 2 * epsilon
decile = ranks * 10 // ncols
dl_models = [("base2", None), ("x2", {"weight": 1.0, "density": density, "epsilon": epsilon})]

write_yaml("cfg.yaml", "della_linear", dl_models, "base2", {"rescale": False}, seed=3)
out = run("cfg.yaml", "dl")[UP]
delta = f64(out) - f64(base2[UP])
mask = out != base2[UP]
err = float(np.abs(delta[mask] - tau[mask]).max()) if mask.any() else float("inf")
record("della_linear rescale=false kept entries equal tau", err, 0.0 if err <= 1e-6 else 1.0)
dev = max(abs(mask[decile == j].mean() - probs[decile == j].mean()) for j in range(10))
print(f"della_linear rescale=false: kept {mask.mean():.4f} of the entries (mean keep probability {probs.mean():.4f})")
record("della_linear keep rates", dev, 0.0 if dev <= 0.02 else 1.0)

write_yaml("cfg.yaml", "della_linear", dl_models, "base2", seed=3)  # rescale: true, the default
out = run("cfg.yaml", "dl")[UP]
delta = f64(out) - f64(base2[UP])
mask = out != base2[UP]
kept = mask.mean()
c = np.abs(delta).sum() / np.abs(tau[mask]).sum() if mask.any() else float("nan")
err = float(np.abs(delta - c * tau * mask).max())
# A mask keeping (nearly) everything would make the rescale a no-op.
ok = err <= 1e-6 and abs(kept - density) <= 0.02
print(f"della_linear rescale=true: kept {kept:.4f} of the entries, c = {c:.4f}")
record("della_linear rescale=true out - base = c * tau * mask", err, 0.0 if ok else 1.0)
rel = abs(np.abs(delta).sum() - np.abs(tau).sum()) / np.abs(tau).sum()
record("della_linear rescale=true L1 norm kept (relative)", rel, 0.0 if rel <= 1e-4 else 1.0)

# ---- nuslerp (nuslerp.py) -------------------------------------------------
def nuslerp(t, v0, v1, row_wise, flatten, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:  # dim=0: transpose(0, -1)
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    cos = np.sum(unit(v0) * unit(v1), axis=-1, keepdims=True)
    theta = np.arccos(np.clip(cos, -1, 1))
    s = np.sin(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / s
    res = np.where(np.abs(s) < eps, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)

def mk_nuslerp(weights, row_wise=False, flatten=True, with_base=False):
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    def one(k):
        a, b = experts[0][k], experts[1][k]
        if with_base:
            return f64(base[k]) + nuslerp(t, f64(a - base[k]), f64(b - base[k]), row_wise, flatten)
        return nuslerp(t, f64(a), f64(b), row_wise, flatten)
    return per_tensor(one)

ns_models = [("e0", {"weight": 0.3}), ("e1", {"weight": 0.7})]
for label, params, kw, bm in [
        ("nuslerp (flatten)", None, {}, None),
        ("nuslerp nuslerp_flatten=false", {"nuslerp_flatten": False}, {"flatten": False}, None),
        ("nuslerp nuslerp_flatten=false nuslerp_row_wise=true", {"nuslerp_flatten": False, "nuslerp_row_wise": True},
         {"flatten": False, "row_wise": True}, None),
        ("nuslerp base_model=base (flatten)", None, {"with_base": True}, "base")]:
    write_yaml("cfg.yaml", "nuslerp", ns_models, bm, params)
    compare(label, run("cfg.yaml", "out"), mk_nuslerp([0.3, 0.7], **kw))

# ---- multislerp (multislerp.py) -------------------------------------------
def multislerp(ts, weights, b=None, normalize_weights=True, eps=1e-8):
    if len(ts) == 1:
        return ts[0]
    x = np.stack(ts)
    if b is not None:
        x = x - b
    flat = x.reshape(len(ts), -1)
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < eps:
        if len(ts) == 2:
            res = (x[0] * w[0] + x[1] * w[1])
            return res if b is None else res + b
        raise ValueError("antipodal inputs")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdims=True)
    tangent = ((units - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    res = (res * (norms[:, 0] * w).sum()).reshape(x.shape[1:])
    return res if b is None else res + b

def mk_multislerp(with_base=False, normalize_weights=True):
    def one(k):
        b = f64(base[k]) if with_base else None
        return multislerp([f64(e[k]) for e in experts], W, b, normalize_weights)
    return per_tensor(one)

ms_models = [(f"e{i}", {"weight": w}) for i, w in enumerate(W)]
write_yaml("cfg.yaml", "multislerp", ms_models)
compare("multislerp", run("cfg.yaml", "out"), mk_multislerp())
write_yaml("cfg.yaml", "multislerp", ms_models, "base")
compare("multislerp base_model=base", run("cfg.yaml", "out"), mk_multislerp(with_base=True))
write_yaml("cfg.yaml", "multislerp", ms_models, None, {"normalize_weights": False})
compare("multislerp normalize_weights=false", run("cfg.yaml", "out"), mk_multislerp(normalize_weights=False))

# ---- karcher (karcher.py) -------------------------------------------------
def karcher(ts, alphas, max_iter=10, tol=1e-5):
    if len(ts) == 1:
        return ts[0]
    norms, units = [], []
    for t in ts:
        n = float(np.linalg.norm(t))
        norms.append(n)
        units.append(np.zeros_like(t) if n == 0.0 else t / n)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(ts[0])
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    vu = [units[i] for i in valid]
    u = sum(a * ui for a, ui in zip(na, vu))
    nu = float(np.linalg.norm(u))
    u = vu[0].copy() if nu < tol else u / nu
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for a, ui in zip(na, vu):
            dot = np.clip(np.sum(u * ui), -1.0, 1.0)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            T = T + a * (theta / np.sin(theta)) * (ui - dot * u)
        nT = float(np.linalg.norm(T))
        if nT < tol:
            break
        u = np.cos(nT) * u + np.sin(nT) * (T / nT)
        un = float(np.linalg.norm(u))
        if un > tol:
            u = u / un
    return sum(a * n for a, n in zip(alphas, norms)) * u

def mk_karcher(**kw):
    return per_tensor(lambda k: karcher([f64(e[k]) for e in experts], [1.0 / len(experts)] * len(experts), **kw))

# On this pool the experts lie close together: with the default tol the
# first tangent norm is already below 1e-5 (9.3e-6 on the embedding), so
# the loop breaks before its first step; tol=1e-7 takes one step (which
# moves the result by up to 2.7e-5) and then breaks.
km_models = [(f"e{i}", None) for i in range(3)]
write_yaml("cfg.yaml", "karcher", km_models)
compare("karcher max_iter=10 tol=1e-5 (defaults)", run("cfg.yaml", "out"), mk_karcher())
write_yaml("cfg.yaml", "karcher", km_models, None, {"max_iter": 50, "tol": 1e-7})
compare("karcher max_iter=50 tol=1e-7", run("cfg.yaml", "out"), mk_karcher(max_iter=50, tol=1e-7))

# ---- arcee_fusion (arcee_fusion.py) ---------------------------------------
def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

def arcee_fusion(b, x):
    diff = np.abs(f64(x - b))
    p = softmax(f64(x)) + 1e-8
    q = softmax(f64(b)) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1)
    importance = diff * np.expand_dims(kl, -1)
    # approximate_quantiles on the whole tensor (< 1e6 entries: no sampling):
    # sorted[floor(q * (n - 1))], q an f32 tensor.
    s = np.sort(importance.ravel())
    quant = lambda qq: s[int(np.floor(np.float32(qq) * np.float32(s.size - 1)))]
    threshold = quant(0.5) + 1.5 * (quant(0.75) - quant(0.25))
    return f64(b) + f64(x - b) * (importance >= threshold)

write_yaml("cfg.yaml", "arcee_fusion", [("base", None), ("e0", None)], "base")
compare("arcee_fusion", run("cfg.yaml", "out"), per_tensor(lambda k: arcee_fusion(base[k], experts[0][k])))

# ---- nearswap (nearswap.py) -----------------------------------------------
def nearswap(a, b, t):
    w = np.clip(t / np.maximum(np.abs(f64(a - b)), 1e-6), 0, 1)
    return w * f64(b) + (1 - w) * f64(a)

for t in [0.05, 0.2]:
    write_yaml("cfg.yaml", "nearswap", [("base", None), ("e0", None)], "base", {"t": t})
    compare(f"nearswap t={t}", run("cfg.yaml", "out"), per_tensor(lambda k: nearswap(base[k], experts[0][k], t)))

print(f"{checks} checks, worst {worst:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
