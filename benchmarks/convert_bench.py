"""Time and peak memory of `import-hf` (tp=1, tp=2) and `export-hf` on a ~1 GB bf16 llama.

    python benchmarks/convert_bench.py [--workdir outputs/bench_convert] [--size-gb 1.0 | --layers N]
                                       [--drop-caches] [--repeat N] [--flatness]

The baseline is the floor for any converter: `safetensors.torch.load_file` of every shard plus
`save_file` of the same tensors. Every step runs as its own subprocess; a poller reads /proc of
every process in its tree every 0.1 s, so ranks under `megaswift launch` are measured one by one
(`/usr/bin/time` would only see the launcher). Peak RSS is VmHWM, which also counts mmapped file
pages (safetensors reads through mmap); "anon" is the largest RssAnon sampled, the process's own
memory. The export is checked bitwise against the source; results also go to <workdir>/results.json.

--flatness imports (tp=1, tp=2) a checkpoint of L layers and one of 4L layers of the same size
(L from --layers or --size-gb) and prints, per rank, peak RSS, the rank's parameter bytes and
the excess of the one over the other, with the excess's 4L / L ratio: an import that streams
holds its parameters plus a constant, whatever the depth (<workdir>/flatness.json).
"""
from __future__ import annotations

import argparse
import json
import math
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


def params_child(hf_dir: str, tp: int) -> None:
    """Runs in its own process (it imports megaswift): each TP rank's parameter bytes, in MB, as
    import-hf holds them (the checkpoint's dtype, the rank's shards and vocabulary padding)."""
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_io import HFReader
    from megaswift.models.sharding import canonical_names, shard_layout

    cfg = hf_model_config(hf_dir, load_config())
    size = HFReader(hf_dir).dtype("model.embed_tokens.weight").itemsize
    names = [n for group in canonical_names(cfg) for n in group]
    print(json.dumps({f"rank{r}": sum(math.prod(shard_layout(n, cfg, tp, r).local_shape) for n in names) * size / 2**20
                      for r in range(tp)}))


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


def ensure_checkpoint(hf: str, layers: int) -> None:
    """Build the source checkpoint unless one of exactly this shape is already there."""
    stamp, want = build_spec(hf, layers)
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == want):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--_build", hf, str(layers)], check=True)


def pre_read(hf: str) -> None:
    """Pull the source into the page cache: the first step should not be the only one on disk."""
    for path in weight_files(hf):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def megaswift_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "megaswift")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "megaswift"]


def import_cmd(hf: str, out: str, tp: int) -> list[str]:
    cmd = ["import-hf", hf, out, "--parallel.tp", str(tp)]
    return megaswift_cmd() + (["launch", "--nproc-per-node", str(tp), "--"] + cmd if tp > 1 else cmd)


def checkpoint_gb(hf: str) -> float:
    return sum(os.path.getsize(f) for f in weight_files(hf)) / 1e9


def flatness(w: str, layers: int, repeat: int, cold: bool) -> None:
    """import-hf at `layers` and 4 x `layers` layers of the same size: peak RSS per rank minus the
    rank's parameter bytes, which an import that streams keeps constant."""
    me, rows = os.path.abspath(__file__), []
    for n in (layers, 4 * layers):
        hf = os.path.join(w, f"hf_{n}l")
        ensure_checkpoint(hf, n)
        if not cold:
            pre_read(hf)
        for tp in (1, 2):
            params = json.loads(subprocess.run([sys.executable, me, "--_params", hf, str(tp)], check=True,
                                               capture_output=True, text=True).stdout)
            out = os.path.join(w, f"ckpt_{n}l_tp{tp}")
            r = run_step(f"import-hf tp={tp}, {n} layers", out, import_cmd(hf, out, tp), repeat, cold)
            shutil.rmtree(out, ignore_errors=True)  # the 4x ones are GBs each, and nothing reads them
            excess = {k: round(v - params[k], 1) for k, v in r["peak_rss_mb"].items()}
            rows.append({"layers": n, "tp": tp, "checkpoint_gb": round(checkpoint_gb(hf), 3), "wall_s": r["wall_s"],
                         "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"],
                         "params_mb": {k: round(v, 1) for k, v in params.items()}, "excess_mb": excess})
    print(f"\nimport-hf peak RSS per rank beyond the rank's parameters, {layers} vs {4 * layers} layers of the same "
          f"size; best of {repeat}, page cache {'cold' if cold else 'warm'}")
    print(f"{'tp':>3}{'layers':>7}{'ckpt GB':>9}{'wall s':>8}  {'peak RSS/rank MB':<18}{'params/rank MB':<16}"
          f"{'excess/rank MB':<16}")
    for r in rows:
        cols = (", ".join(f"{v:.0f}" for v in r[k].values()) for k in ("peak_rss_mb", "params_mb", "excess_mb"))
        print(f"{r['tp']:>3}{r['layers']:>7}{r['checkpoint_gb']:>9.2f}{r['wall_s']:>8.1f}  "
              + "".join(f"{c:<{width}}" for c, width in zip(cols, (18, 16, 16))))
    ratios = {}
    for tp in (1, 2):
        one, four = (max(r["excess_mb"].values()) for r in rows if r["tp"] == tp)
        ratios[f"tp{tp}"] = round(four / one, 2)
        print(f"tp={tp}: largest excess per rank {one:.0f} MB at {layers} layers, {four:.0f} MB at {4 * layers}: "
              f"{ratios[f'tp{tp}']:.2f}x")
    with open(os.path.join(w, "flatness.json"), "w") as f:
        json.dump({"layers": [layers, 4 * layers], "repeat": repeat, "cold": cold, "runs": rows,
                   "excess_ratio_4x": ratios}, f, indent=2)
    print(f"results: {os.path.join(w, 'flatness.json')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="outputs/bench_convert")
    p.add_argument("--size-gb", type=float, default=1.0, help="target checkpoint size; scales the layer count")
    p.add_argument("--layers", type=int, help="decoder layers of the checkpoint (instead of --size-gb)")
    p.add_argument("--flatness", action="store_true",
                   help="import-hf at L and 4L layers: does memory beyond the parameters grow with depth?")
    p.add_argument("--drop-caches", action="store_true", help="sync, drop the page cache before each step (root)")
    p.add_argument("--repeat", type=int, default=1, help="run each step N times; report the fastest")
    p.add_argument("--_baseline", nargs=2, help=argparse.SUPPRESS)  # internal: the baseline's own process
    p.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)  # internal: build the source checkpoint
    p.add_argument("--_params", nargs=2, help=argparse.SUPPRESS)  # internal: parameter bytes per rank
    args = p.parse_args()
    if args._baseline:
        return baseline_child(*args._baseline)
    if args._build:
        return build(args._build[0], int(args._build[1]))
    if args._params:
        return params_child(args._params[0], int(args._params[1]))

    w = os.path.abspath(args.workdir)
    layers, me = args.layers or layers_for(args.size_gb), os.path.abspath(__file__)
    if args.drop_caches:
        drop_caches()  # fails here, before any measurement, when not permitted
    if args.flatness:
        return flatness(w, layers, args.repeat, args.drop_caches)
    hf, base_out, tp1, tp2, export = (os.path.join(w, n) for n in ("hf", "baseline", "ckpt_tp1", "ckpt_tp2", "export"))
    ensure_checkpoint(hf, layers)
    if args.drop_caches:
        cache_note = "cold: sync + drop_caches before each step"
    else:
        pre_read(hf)
        cache_note = "warm: source pre-read; export reads the checkpoint import tp=2 just wrote"
    ms = megaswift_cmd()
    steps = [  # startup: what every step pays before any work (interpreter + torch)
        ("startup (python -c 'import torch')", os.path.join(w, "startup"), [sys.executable, "-c", "import torch"]),
        ("baseline (load_file+save_file)", base_out, [sys.executable, me, "--_baseline", hf, base_out]),
        ("import-hf tp=1", tp1, import_cmd(hf, tp1, 1)),
        ("import-hf tp=2", tp2, import_cmd(hf, tp2, 2)),
        ("export-hf (from tp=2)", export, ms + ["export-hf", tp2, export, "--max-shard-size", "500MB"]),
    ]
    results = {name: run_step(name, out, cmd, args.repeat, args.drop_caches) for name, out, cmd in steps}

    base = results["baseline (load_file+save_file)"]
    base_rss = max(base["peak_rss_mb"].values())
    size = checkpoint_gb(hf)
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
