# The expected numbers of the matrix methods' unit tests on a generic 4×3
# tensor (merger/src/methods/testutil.rs, `generic_embedding`): FusionBench's
# iso_c, iso_cts (fusion_bench/method/isotropic_merging/iso_utils.py),
# tsv_m (task_singular_vector/utils/TSVM_utils.py,
# compute_and_sum_svd_mem_reduction) and wudi (wudi/wudi.py, with torch's
# Adam written out) transcribed to numpy in float64. Usage: python3
# matrix_methods_4x3.py; prints θ0 + merged τ per method, row-major
# (iso_cts with common_space_fraction 0.5, wudi 20 steps at lr 0.01).
# check_methods.py imports the four functions.
import numpy as np
np.set_printoptions(precision=7, suppress=False)

def iso_c(tvs):
    u, s, v = np.linalg.svd(sum(tvs), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ v

def iso_cts(tvs, f):
    shape = tvs[0].shape; T = len(tvs); r = min(shape)
    cs = int(r * f)
    ts = round((r - cs) / T) * T
    cs = r - ts
    u, s, v = np.linalg.svd(sum(tvs), full_matrices=False)
    cu, css, cv = u[:, :cs], s[:cs], v[:cs, :]
    n = int((r - cs) / T)
    U = np.zeros((shape[0], r)); S = np.zeros(r); V = np.zeros((r, shape[1]))
    for i, w in enumerate(tvs):
        wts = w - cu @ cu.T @ w
        ut, st, vt = np.linalg.svd(wts, full_matrices=False)
        U[:, i*n:(i+1)*n] = ut[:, :n]; S[i*n:(i+1)*n] = st[:n]; V[i*n:(i+1)*n, :] = vt[:n, :]
    U[:, T*n:T*n+cs] = cu; S[T*n:T*n+cs] = css; V[T*n:T*n+cs, :] = cv
    a, _, b = np.linalg.svd(U, full_matrices=False); U = a @ b
    a, _, b = np.linalg.svd(V, full_matrices=False); V = a @ b
    return U @ np.diag(np.full_like(S, S.mean())) @ V

def tsv_m(tvs):
    T = len(tvs)
    first = np.linalg.svd(tvs[0], full_matrices=False)
    su = np.zeros_like(first[0]); ss = np.zeros_like(first[1]); sv = np.zeros_like(first[2])
    for i, t in enumerate(tvs):
        u, s, vh = np.linalg.svd(t, full_matrices=False)
        k = int(s.shape[0] * (1 / T))
        su[:, i*k:(i+1)*k] = u[:, :k]; ss[i*k:(i+1)*k] = s[:k]; sv[i*k:(i+1)*k, :] = vh[:k, :]
    uu, _, vu = np.linalg.svd(su, full_matrices=False)
    uv, _, vv = np.linalg.svd(sv, full_matrices=False)
    return uu @ vu @ np.diag(ss) @ uv @ vv

def wudi(tvs, iters, lr):
    # loss = Σi ‖(x − τi) τiᵀ‖² / ‖τi‖²; grad = Σi 2 (x − τi) τiᵀ τi / ‖τi‖²
    x = sum(tvs).astype(np.float64); m = np.zeros_like(x); v = np.zeros_like(x)
    for step in range(1, iters + 1):
        g = sum(2 * ((x - t) @ t.T) @ t / np.sum(t * t) for t in tvs)
        m = 0.9 * m + 0.1 * g; v = 0.999 * v + 0.001 * g * g
        denom = np.sqrt(v) / np.sqrt(1 - 0.999 ** step) + 1e-8
        x = x - (lr / (1 - 0.9 ** step)) * m / denom
    return x

if __name__ == "__main__":
    base = np.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, 1.0, -2.0, 0.25, 0.75, 3.0]).reshape(4, 3)
    t1 = np.array([0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1]).reshape(4, 3)
    t2 = np.array([1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2]).reshape(4, 3)
    tvs = [t1, t2]
    print("mean    ", (base + (t1 + t2) / 2).ravel().tolist())
    print("iso_c   ", (base + iso_c(tvs)).ravel().tolist())
    print("iso_cts ", (base + iso_cts(tvs, 0.5)).ravel().tolist())
    print("tsv_m   ", (base + tsv_m(tvs)).ravel().tolist())
    print("wudi    ", (base + wudi(tvs, 20, 0.01)).ravel().tolist())
