"""Checkpoint loading: minseekr's load_hf against transformers' LlamaForCausalLM.from_pretrained.

Writes a random LLaMA of about 665 MB (fp32, default flags) with transformers' save_pretrained into a
temporary directory, then loads it alternately with each loader, every load in a fresh process. A child
reports the wall time of the load call alone (imports excluded), the time until every weight has been
read once (transformers maps the file and reads lazily, so its load call returns before the data is in
memory), and the growth of its peak resident memory (VmHWM) above the level after imports, taken after
that read. Both read the same files, warm in the page cache after
the first round, so the comparison is of the loaders, not the disk.

    python tools/bench_load.py                      # CPU, 665 MB fp32 checkpoint, 3 rounds
    python tools/bench_load.py --load_dtype bfloat16 --max_shard_size 200MB   # a cast, from 4 shards
    python tools/bench_load.py --dtype bfloat16 --n_layers 16 --device cuda
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = {
    "minseekr": """
import json, sys, time, torch
from minseekr.network.checkpoint import load_hf
{peak}
base = peak(); t = time.perf_counter()
model = load_hf(sys.argv[1], device=sys.argv[2], dtype=None if sys.argv[3] == "auto" else getattr(torch, sys.argv[3]))
""",
    "transformers": """
import json, sys, time, torch
from transformers import LlamaForCausalLM
{peak}
base = peak(); t = time.perf_counter()
# device_map needs accelerate, which is not installed; to(device) is the plain-transformers path.
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[3] if sys.argv[3] == "auto" else getattr(torch, sys.argv[3])).to(sys.argv[2])
""",
}
REPORT = """
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
# A memory-mapped loader defers reading to first use: one element per 4 KiB page makes every weight resident.
touched = sum(float(p.detach().reshape(-1)[:: 4096 // p.element_size()].sum()) for p in model.parameters())
resident = time.perf_counter() - t
grown = peak() - base
checksum = sum(float(p.detach().sum(dtype=torch.float64)) for p in model.parameters())
print(json.dumps({"seconds": seconds, "resident": resident, "peak": grown, "checksum": checksum}))
"""
PEAK = 'def peak():\n    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024'


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=16)
    p.add_argument("--hidden_dim", type=int, default=2816)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--load_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load in; auto keeps the checkpoint's (a cast converts each tensor from the "
                        "mapped file)")
    p.add_argument("--max_shard_size", default="5GB", help="as in save_pretrained; small values give a sharded checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def write_checkpoint(opt, path: Path) -> int:
    """A random LlamaForCausalLM saved by transformers itself; returns the bytes of its safetensors files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=opt.dim, num_hidden_layers=opt.n_layers, num_attention_heads=opt.n_heads,
                      intermediate_size=opt.hidden_dim, vocab_size=opt.vocab_size)
    LlamaForCausalLM(cfg).to(getattr(torch, opt.dtype)).save_pretrained(path, max_shard_size=opt.max_shard_size)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def load_in_child(loader: str, path: Path, device: str, dtype: str) -> dict:
    code = CHILD[loader].format(peak=PEAK) + REPORT
    out = subprocess.run([sys.executable, "-c", code, str(path), device, dtype], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"the {loader} load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    opt = parse()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        size = write_checkpoint(opt, path)
        n_files = len(list(path.glob("*.safetensors")))
        runs = {"minseekr": [], "transformers": []}
        for _ in range(opt.rounds):
            for loader in runs:
                runs[loader].append(load_in_child(loader, path, opt.device, opt.load_dtype))
    sums = {r["checksum"] for rs in runs.values() for r in rs}
    assert len(sums) == 1, f"the loaders disagree on the weights: {sums}"
    print(f"checkpoint: {size / 1e6:.0f} MB ({opt.dtype}, {n_files} safetensors file(s) from "
          f"save_pretrained), loaded as {opt.load_dtype} to {opt.device}; median of {opt.rounds} fresh processes each")
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("seconds", "resident", "peak")}
           for k, rs in runs.items()}
    for loader, m in med.items():
        print(f"  {loader:13s} load {m['seconds']:6.3f} s, load + read every weight {m['resident']:6.3f} s, "
              f"peak RSS growth {m['peak'] / 1e6:5.0f} MB = {m['peak'] / size:.2f}x the checkpoint")
    ours, hf = med["minseekr"], med["transformers"]
    print(f"  ratio minseekr/transformers: load {ours['seconds'] / hf['seconds']:.3f}x, "
          f"load + read {ours['resident'] / hf['resident']:.3f}x, peak RSS {ours['peak'] / hf['peak']:.3f}x")
    print(json.dumps({"size": size, **med}))


if __name__ == "__main__":
    main()
