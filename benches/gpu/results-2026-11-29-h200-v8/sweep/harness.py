import cupy as cp, torch, sys, os, json, glob, subprocess, re

HEADER = 8
TILE_M = 128
dev = torch.device("cuda")
results = {"tests": [], "timings": []}

def load(path):
    name = os.path.basename(path)[:-3]
    cubin = path[:-3] + ".cubin"
    m = cp.RawModule(path=cubin)
    k = m.get_function(name)
    n = int(re.search(r"_n(\d+)_", name).group(1))
    s = int(re.search(r"_s(\d+)$", name).group(1))
    smem = s * (TILE_M + n) * 64 * 2 + 1024
    k.max_dynamic_shared_size_bytes = smem
    return k, n, smem

def ptr(t):
    return cp.asarray(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)

def rows_table(segs, header):
    t = list(header) + [0] * (HEADER - len(header))
    start = 0
    for e, c in enumerate(segs):
        end = start + c
        for f in range(start, end, TILE_M):
            t += [e, f, end]
        start = end
    return torch.tensor(t, dtype=torch.int32, device=dev)

def run_rows(k, n, smem, x, w_eff, segs, width, rhs_e, rhs_ld):
    total, depth = x.shape
    out = torch.full((total, width), float("nan"), dtype=x.dtype, device=dev)
    table = rows_table(segs, [depth, width, x.stride(0), rhs_e, rhs_ld])
    tiles = (table.numel() - HEADER) // 3
    grid = ((width + n - 1) // n, tiles, 1)
    k(grid, (256,), (ptr(x), ptr(w_eff), ptr(table), ptr(out)), shared_mem=smem)
    return out

def run_wgrad(k, n, smem, x, g, segs):
    total, m = x.shape
    width = g.shape[1]
    offs = [0]
    for c in segs:
        offs.append(offs[-1] + c)
    table = torch.tensor([m, width, x.stride(0), g.stride(0), 0, 0, 0, 0] + offs, dtype=torch.int32, device=dev)
    out = torch.full((len(segs), m, width), float("nan"), dtype=x.dtype, device=dev)
    grid = ((width + n - 1) // n, (m + TILE_M - 1) // TILE_M, len(segs))
    k(grid, (256,), (ptr(x), ptr(g), ptr(table), ptr(out)), shared_mem=smem)
    return out

def rel(a, b):
    a = a.double(); b = b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

def ref_rows(x, w, segs):
    outs = []; s = 0
    for e, c in enumerate(segs):
        outs.append(x[s:s + c].double() @ w[e].double()); s += c
    return torch.cat(outs)

def ref_wgrad(x, g, segs):
    outs = []; s = 0
    for e, c in enumerate(segs):
        outs.append(x[s:s + c].double().T @ g[s:s + c].double()); s += c
    return torch.stack(outs)

def timeit(fn, iters=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    st = torch.cuda.Event(enable_timing=True); en = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(iters):
        st.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
    ts.sort()
    return ts[len(ts) // 2]

torch.manual_seed(0)
kernels = sorted(glob.glob(os.path.join(sys.argv[1], "*.cu")))
for path in kernels:
    name = os.path.basename(path)[:-3]
    if not os.path.exists(path[:-3] + ".cubin"):
        results["tests"].append({"kernel": name, "error": "no cubin"}); continue
    try:
        k, n, smem = load(path)
    except Exception as e:
        results["tests"].append({"kernel": name, "error": repr(e)}); continue
    segs = [0, 1, 300, 128, 129, 0, 1000, 77]
    for depth, width in [(1024, 520), (1000, 256), (64, 136)]:
        total = sum(segs)
        x = torch.randn(total, depth, device=dev).bfloat16()
        try:
            if "_rows_bn_" in name:
                w = torch.randn(len(segs), depth, width, device=dev).bfloat16()
                out = run_rows(k, n, smem, x, w, segs, width, depth * width, width)
                err = rel(out, ref_rows(x, w, segs))
            elif "_rows_bk_" in name:
                wt = torch.randn(len(segs), width, depth, device=dev).bfloat16()
                out = run_rows(k, n, smem, x, wt, segs, width, depth * width, depth)
                err = rel(out, ref_rows(x, wt.transpose(1, 2), segs))
            else:
                g = torch.randn(total, width, device=dev).bfloat16()
                out = run_wgrad(k, n, smem, x, g, segs)
                err = rel(out, ref_wgrad(x, g, segs))
            torch.cuda.synchronize()
        except Exception as e:
            err = repr(e)
        results["tests"].append({"kernel": name, "depth": depth, "width": width, "rel": err})
        print(name, depth, width, err, flush=True)

# Timings: dsv3 (K 7168, N 2048, E 256 x 256 rows) and small (K 1024, N 512, E 64 x 1536 rows).
for label, E, per, depth, width in [("dsv3", 256, 256, 7168, 2048), ("small", 64, 1536, 1024, 512), ("dsv3_down", 256, 256, 2048, 7168)]:
    segs = [per] * E
    total = E * per
    x = torch.randn(total, depth, device=dev).bfloat16()
    w = torch.randn(E, depth, width, device=dev).bfloat16() * 0.02
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
    flops = 2.0 * total * depth * width
    t = timeit(lambda: torch._grouped_mm(x, w, offs=offs))
    results["timings"].append({"shape": label, "kernel": "torch._grouped_mm", "ms": t, "tflops": flops / t / 1e9})
    print(label, "torch", t, flops / t / 1e9, flush=True)
    g = torch.randn(total, width, device=dev).bfloat16()
    for path in kernels:
        name = os.path.basename(path)[:-3]
        if not os.path.exists(path[:-3] + ".cubin"): continue
        k, n, smem = load(path)
        if "_rows_bn_" in name:
            fn = lambda: run_rows(k, n, smem, x, w, segs, width, depth * width, width)
        elif "_rows_bk_" in name:
            wt = w.transpose(1, 2).contiguous()
            fn = lambda: run_rows(k, n, smem, x, wt, segs, width, depth * width, depth)
        else:
            fn = lambda: run_wgrad(k, n, smem, x, g, segs)
        try:
            t = timeit(fn)
        except Exception as e:
            results["timings"].append({"shape": label, "kernel": name, "error": repr(e)}); continue
        results["timings"].append({"shape": label, "kernel": name, "ms": t, "tflops": flops / t / 1e9})
        print(label, name, t, flops / t / 1e9, flush=True)
    # torch wgrad through grouped_mm for reference
    try:
        t = timeit(lambda: torch._grouped_mm(x.t(), g, offs=offs))
        results["timings"].append({"shape": label, "kernel": "torch._grouped_mm wgrad", "ms": t, "tflops": flops / t / 1e9})
        print(label, "torch wgrad", t, flops / t / 1e9, flush=True)
    except Exception as e:
        print("torch wgrad", repr(e))
    del x, w, g
    torch.cuda.empty_cache()

json.dump(results, open(os.path.join(os.environ["OUT"], "hopper.json"), "w"), indent=1)
