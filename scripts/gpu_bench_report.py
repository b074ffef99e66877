"""Combine scripts/gpu-bench.sh's outputs into OUTDIR/gpu-bench.json and a Markdown table
(ours vs PyTorch, same machine, with ratios). Usage: python3 gpu_bench_report.py OUTDIR"""
import json, os, sys, csv

out = sys.argv[1]

def last_json(name):
    p = os.path.join(out, name + ".json")
    try:
        lines = [l for l in open(p).read().splitlines() if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None

GEN = ["generate_f16_flash", "generate_f16_auto", "generate_f16_auto_b1", "generate_f16_fused"]
OPS = ["ops_f16", "ops_f32", "ops_f16_tunefull", "ops_f16_vulkan"]
ours = {n: last_json(n) for n in [*OPS, *GEN, "score_f16", "rfft_bf16"]}
torch = load("anchor.json") or {}
tscore = load("score.json") or {}
peak = {}
try:
    for row in csv.reader(open(os.path.join(out, "mem.csv"))):
        if len(row) == 2 and row[1].strip().isdigit():
            peak[row[0]] = max(peak.get(row[0], 0), int(row[1]))
except OSError:
    pass
rows = []

def add(work, o, t, unit, lower_better=True):
    ratio = (o / t if lower_better else t / o) if (o and t) else None
    rows.append({"work": work, "ours": o, "pytorch": t, "unit": unit, "ratio_ours_over_torch_time": ratio})

def gen(rep, b):
    if not rep:
        return None
    for x in rep.get("batches", []):
        if x["batch"] == b:
            return x["whole_batch_s"]

def partial_generate(name):
    """What a generate step killed by its time limit printed before it stopped (its stderr)."""
    import re
    try:
        log = open(os.path.join(out, name + ".log"), errors="replace").read()
    except OSError:
        return None
    rep = {"batches": [], "partial": True}
    m = re.search(r"\[bench\] models built in ([0-9.]+) s", log)
    if m:
        rep["build_s"] = float(m.group(1))
    m = re.search(r"\[bench\] batch \d+: first step ([0-9.]+) s", log)
    if m:
        rep["first_step_s"] = float(m.group(1))
    for b, ms in re.findall(r"\[bench\] batch (\d+): UNet\+ControlNet step ([0-9.]+) ms", log):
        rep["batches"].append({"batch": int(b), "unet_controlnet_step_ms": float(ms), "whole_batch_s": None})
    return rep if (rep["batches"] or "first_step_s" in rep or "build_s" in rep) else None

for name in GEN:
    if ours.get(name) is None:
        ours[name] = partial_generate(name)
for name in GEN:
    rep = ours.get(name)
    tag = "fused" if name.endswith("fused") else "auto"
    if name.endswith("flash"):
        tag = "flash:" + str((ours.get("ops_f16") or {}).get("flash_best"))
    if rep and rep.get("partial"):
        tag += ", partial: stopped before its whole-batch run"
    for x in (rep or {}).get("batches", []):
        b = x["batch"]
        t = torch.get(f"diffusers fp16 eager: 40-step ControlNet ad image, batch {b}, s/batch (min of 3)")
        add(f"ad image 512px 40 steps, batch {b}, f16, attention={tag}", x["whole_batch_s"], t, "s/batch")
        add(f"UNet+ControlNet step (CFG pair), batch {b}, attention={tag}", x["unet_controlnet_step_ms"], None, "ms")
        for k in ("build_s", "first_step_s"):
            if rep.get(k) is not None:
                add(f"{k} (first run: compile + autotune), attention={tag}", rep[k], None, "s")
ops = ours.get("ops_f16")
tmap = {"conv3x3 320->320": "torch-f16 conv3x3 ms", "attention softmax(QK^T)V": "torch-f16 naive attn ms",
        "attention fused (burn op)": "torch-f16 sdpa attn ms", "matmul": "torch-f16 matmul4096 ms"}
for name in OPS:
    rep = ours.get(name)
    if not rep:
        continue
    dt = name.split("_")[1]
    how = ", " + str(rep.get("device", "?")).split(" ")[0].split("(")[0]
    how += ", autotune full" if name.endswith("tunefull") else ""
    for op in rep["ops"]:
        base = "attention fused (burn op)" if op["name"].startswith("attention flash") else op["name"]
        key = tmap.get(base, "").replace("f16", dt)
        t = torch.get(key) if (op["shape"].startswith("2x") or op["name"] == "matmul") else None
        ref = "burn" if op["name"].startswith("groupnorm") else "matmul"
        check = f", max |diff| vs {ref} {op['max_abs_diff']:.1e}" if op.get("max_abs_diff") is not None else ""
        if op.get("unavailable"):
            check += ", UNAVAILABLE here (burn's unfused attention ran)"
        add(f"{op['name']} {op['shape']} ({rep['dtype']}{how}{check})", op["ms"], t, "ms")
    if rep.get("flash_best"):
        rows.append({"work": f"fastest correct flash kernel ({name}): flash:{rep['flash_best']}", "ours": None, "pytorch": None, "unit": "-", "ratio_ours_over_torch_time": None})
rf = ours.get("rfft_bf16")
if rf:
    t = torch.get("RFFT iter (full ControlNet, AdamW, bf16 autocast, grad ckpt=False) s (min of 3)")
    o = rf.get("iteration_s") or rf.get("mean_iteration_s")
    add("RFFT iteration (bf16)", o, t, "s")
sc = ours.get("score_f16")
if sc:
    add("RFNet scoring batch 32", sc.get("rfnet_images_per_s"), tscore.get("rfnet-like (4x resnet50@384 + bert-base + fusion) images/s"), "images/s", lower_better=False)
    add("U2-Net 320 batch 32", sc.get("u2net_images_per_s"), tscore.get("u2net 320 images/s"), "images/s", lower_better=False)
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "?"
result = {"gpu": gpu, "rows": rows, "ours": ours, "pytorch": torch, "pytorch_score": tscore,
          "peak_device_memory_mib_by_step": peak}
json.dump(result, open(os.path.join(out, "gpu-bench.json"), "w"), indent=1)
f = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
print(f"GPU: {gpu}\n\n| work | ours | PyTorch | unit | ours/PyTorch (time) |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r['work']} | {f(r['ours'])} | {f(r['pytorch'])} | {r['unit']} | {f(r['ratio_ours_over_torch_time'])} |")
print("\npeak device memory by step (MiB, nvidia-smi):", json.dumps(peak))
