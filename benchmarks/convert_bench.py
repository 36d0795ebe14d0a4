"""Time and peak memory of `import-hf` (tp=1, tp=2) and `export-hf` on a ~1 GB bf16 llama.

    python benchmarks/convert_bench.py [--workdir outputs/bench_convert] [--size-gb 1.0] [--drop-caches]

The baseline is the floor for any converter: `safetensors.torch.load_file` of every shard plus
`save_file` of the same tensors. Every step runs as its own subprocess; a poller reads /proc of
every process in its tree every 0.1 s, so ranks under `megaswift launch` are measured one by one
(`/usr/bin/time` would only see the launcher). Peak RSS is VmHWM, which also counts mmapped file
pages (safetensors reads through mmap); "anon" is the largest RssAnon sampled, the process's own
memory. The export is checked bitwise against the source; results also go to <workdir>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

DIMS = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
            head_dim=128, vocab_size=32000)


def layers_for(size_gb: float) -> int:
    """Decoder layers that bring the bf16 llama closest to size_gb (untied embeddings)."""
    h, i, v = DIMS["hidden_size"], DIMS["intermediate_size"], DIMS["vocab_size"]
    q, kv = DIMS["num_attention_heads"] * DIMS["head_dim"], DIMS["num_key_value_heads"] * DIMS["head_dim"]
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    fixed = 2 * v * h + h
    return max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))


def build_spec(hf_dir: str, layers: int) -> tuple[str, dict]:
    return os.path.join(hf_dir, "bench_build.json"), {**DIMS, "num_hidden_layers": layers, "dtype": "bfloat16"}


def build(hf_dir: str, layers: int) -> None:
    """Runs in its own process, so the benchmark process stays small: a forked child starts with its
    parent's RSS counted in getrusage's ru_maxrss (Linux keeps the high-water mark across exec)."""
    stamp, want = build_spec(hf_dir, layers)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from megaswift.testing.tiny import make_tiny_hf

    shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"building a {layers}-layer bf16 llama in {hf_dir} ...", flush=True)
    t = time.perf_counter()
    make_tiny_hf("llama", hf_dir, max_shard_size="500MB", dtype=torch.bfloat16, tokenizer=True,
                 num_hidden_layers=layers, max_position_embeddings=4096, **DIMS)
    json.dump(want, open(stamp, "w"))
    print(f"built in {time.perf_counter() - t:.1f} s", flush=True)


def weight_files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def baseline_child(src: str, dst: str) -> None:
    """Runs in its own process: read every shard whole, write it back; print getrusage's peak RSS and
    the time of the I/O alone (without interpreter start and `import torch`)."""
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    for path in weight_files(src):
        save_file(load_file(path), os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
    print(json.dumps({"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "io_s": time.perf_counter() - t}))


def _proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc(int(entry), "stat")
            if stat:  # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def run_measured(cmd: list[str], log: str) -> dict:
    """Wall time and, per process of cmd's tree (labelled by its RANK), peak RSS (VmHWM, which counts
    mmapped file pages too) and the largest anonymous RSS seen (RssAnon, sampled every 0.1 s), in MB."""
    t0 = time.perf_counter()
    hwm: dict[int, float] = {}
    anon: dict[int, float] = {}
    label: dict[int, str] = {}
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                st = dict(ln.split(":", 1) for ln in _proc(pid, "status").splitlines() if ":" in ln)
                if "VmHWM" in st:
                    hwm[pid] = max(hwm.get(pid, 0.0), int(st["VmHWM"].split()[0]) / 1024)
                    anon[pid] = max(anon.get(pid, 0.0), int(st["RssAnon"].split()[0]) / 1024)
                if label.get(pid, "other") == "other":  # environ changes at exec: re-read until RANK shows
                    env = dict(kv.split("=", 1) for kv in _proc(pid, "environ").split("\0") if "=" in kv)
                    label[pid] = f"rank{env['RANK']}" if "RANK" in env else "other"
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{open(log).read()[-4000:]}")
    if not any(v != "other" for v in label.values()):  # a single process, not under torchrun
        label[proc.pid] = "rank0"
    ranks = sorted((p for p in hwm if label[p] != "other"), key=lambda p: int(label[p][4:]))
    return {"wall_s": round(wall, 2), "peak_rss_mb": {label[p]: round(hwm[p], 1) for p in ranks},
            "peak_anon_mb": {label[p]: round(anon[p], 1) for p in ranks},
            "other_procs_rss_mb": [round(hwm[p], 1) for p in hwm if label[p] == "other"]}


def compare(src: str, out: str) -> tuple[bool, str]:
    """Bitwise equality of every tensor, streaming one tensor at a time from each side."""
    import torch
    from safetensors import safe_open

    def index(d):
        return {k: path for path in weight_files(d) for k in safe_open(path, framework="pt").keys()}

    a, b = index(src), index(out)
    if set(a) != set(b):
        return False, f"names differ: {sorted(set(a) ^ set(b))[:4]}"
    for name in sorted(a):
        with safe_open(a[name], framework="pt") as fa, safe_open(b[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8),
                                                                       y.view(-1).view(torch.uint8)):
            return False, f"{name}: differs ({x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)})"
    return True, f"all {len(a)} tensors bitwise equal"


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_step(name: str, out_dir: str, cmd: list[str], repeat: int, cold: bool) -> dict:
    """The fastest of `repeat` runs, with the largest memory seen in any of them."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        if name.startswith("baseline"):
            os.makedirs(out_dir)
        if cold:
            drop_caches()
        print(f"running {name} ...", flush=True)
        r = run_measured(cmd, out_dir + ".log")
        t = time.perf_counter()
        os.sync()  # dirty pages left behind: DCP fsyncs its files, safetensors' save_file does not
        r["sync_after_s"] = round(time.perf_counter() - t, 2)
        if name.startswith("baseline"):  # the child's own getrusage (a cross-check of the poller), I/O time
            own = json.loads(open(out_dir + ".log").read().splitlines()[-1])
            r["ru_maxrss_mb"], r["io_s"] = round(own["ru_maxrss_mb"], 1), round(own["io_s"], 2)
        runs.append(r)
    r = min(runs, key=lambda x: x["wall_s"])
    r["all_wall_s"] = [x["wall_s"] for x in runs]
    for key in ("peak_rss_mb", "peak_anon_mb"):
        r[key] = {k: max(x[key][k] for x in runs) for k in r[key]}
    if name.startswith("baseline"):
        r["io_s"] = min(x["io_s"] for x in runs)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="outputs/bench_convert")
    p.add_argument("--size-gb", type=float, default=1.0, help="target checkpoint size; scales the layer count")
    p.add_argument("--drop-caches", action="store_true", help="sync, drop the page cache before each step (root)")
    p.add_argument("--repeat", type=int, default=1, help="run each step N times; report the fastest")
    p.add_argument("--_baseline", nargs=2, help=argparse.SUPPRESS)  # internal: the baseline's own process
    p.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)  # internal: build the source checkpoint
    args = p.parse_args()
    if args._baseline:
        return baseline_child(*args._baseline)
    if args._build:
        return build(args._build[0], int(args._build[1]))

    w = os.path.abspath(args.workdir)
    hf, base_out, tp1, tp2, export = (os.path.join(w, n) for n in ("hf", "baseline", "ckpt_tp1", "ckpt_tp2", "export"))
    layers, me = layers_for(args.size_gb), os.path.abspath(__file__)
    stamp, want = build_spec(hf, layers)
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == want):
        subprocess.run([sys.executable, me, "--_build", hf, str(layers)], check=True)
    if args.drop_caches:
        drop_caches()  # fails here, before any measurement, when not permitted
        cache_note = "cold: sync + drop_caches before each step"
    else:
        for path in weight_files(hf):  # pre-read the source: the first step should not be the only one on disk
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        cache_note = "warm: source pre-read; export reads the checkpoint import tp=2 just wrote"
    exe = os.path.join(os.path.dirname(sys.executable), "megaswift")
    ms = [exe] if os.path.exists(exe) else [sys.executable, "-m", "megaswift"]
    steps = [  # startup: what every step pays before any work (interpreter + torch)
        ("startup (python -c 'import torch')", os.path.join(w, "startup"), [sys.executable, "-c", "import torch"]),
        ("baseline (load_file+save_file)", base_out, [sys.executable, me, "--_baseline", hf, base_out]),
        ("import-hf tp=1", tp1, ms + ["import-hf", hf, tp1, "--parallel.tp", "1"]),
        ("import-hf tp=2", tp2, ms + ["launch", "--nproc-per-node", "2", "--", "import-hf", hf, tp2,
                                      "--parallel.tp", "2"]),
        ("export-hf (from tp=2)", export, ms + ["export-hf", tp2, export, "--max-shard-size", "500MB"]),
    ]
    results = {name: run_step(name, out, cmd, args.repeat, args.drop_caches) for name, out, cmd in steps}

    base = results["baseline (load_file+save_file)"]
    base_rss = max(base["peak_rss_mb"].values())
    size = sum(os.path.getsize(f) for f in weight_files(hf)) / 1e9
    print(f"\ncheckpoint: {size:.3f} GB of safetensors in {len(weight_files(hf))} files ({layers} layers); "
          f"best of {args.repeat}\npage cache {cache_note}\n"
          f"baseline I/O alone (inside its process, no startup): {base['io_s']:.1f} s")
    print(f"{'step':<35}{'wall s':>7}{'+sync s':>8}  {'peak RSS/rank MB':<18}{'anon/rank MB':<14}"
          f"{'time/base':>10}{'RSS/base':>9}")
    for name, r in results.items():
        rss = max(r["peak_rss_mb"].values())
        r["time_ratio"], r["rss_ratio"] = round(r["wall_s"] / base["wall_s"], 2), round(rss / base_rss, 2)
        rss_s, anon_s = (", ".join(f"{v:.0f}" for v in r[k].values()) for k in ("peak_rss_mb", "peak_anon_mb"))
        print(f"{name:<35}{r['wall_s']:>7.1f}{r['sync_after_s']:>8.1f}  {rss_s:<18}{anon_s:<14}"
              f"{r['time_ratio']:>10.2f}{r['rss_ratio']:>9.2f}")
    ok, detail = compare(hf, export)
    print(f"export vs source: {'PASS' if ok else 'FAIL'} ({detail})")
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump({"checkpoint_gb": round(size, 3), "layers": layers, "page_cache": cache_note, "repeat": args.repeat,
                   "steps": results, "export_bitwise_equal": ok, "export_check": detail}, f, indent=2)
    print(f"results: {os.path.join(w, 'results.json')}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
