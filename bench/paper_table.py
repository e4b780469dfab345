"""The paper's ablation in miniature, on `cosmos synth` scenes, on this CPU:

    python bench/paper_table.py                 # everything: data, 3 arms x 2 seeds, evaluation, table, chart
    python bench/paper_table.py --steps 100     # a quick smoke run (writes into bench/out/paper-smoke)

Arms (same data, steps, batch, seeds; COSMOS_METHOD.md section 6's ablation rows):
    clip-raw        CLIP on the raw alt-text captions (`--mode clip --clip-text raw`)
    clip-textcrops  CLIP with text crops of the long captions (`--mode clip-textcrops`)
    cosmos          COSMOS (text crops + multi-crop + cross-modality self-distillation)
Each arm is evaluated (student, and the EMA teacher for COSMOS) on the held-out synthetic eval sets: retrieval R@1
both ways with long captions, shape and colour classification top-1, segmentation mIoU for shape and colour
classes, plain and csa. Resumable: a finished arm (its results.json) is read back, an interrupted one continues
from its last checkpoint. Writes OUT/table.md, OUT/results.json and OUT/paper_table.png; `--write-benchmarks`
also replaces the paper-table section of BENCHMARKS.md and copies the chart to bench/paper_table.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cosmos.train.loop import TrainConfig, train  # noqa: E402

ARMS = {
    "clip-raw": dict(mode="clip", clip_text="raw"),
    "clip-textcrops": dict(mode="clip-textcrops"),
    "cosmos": dict(mode="cosmos"),
    # the paper's Table 5 ablation rows, not part of the default table (`--arms cosmos,cosmos-no-cross`)
    "cosmos-no-cross": dict(mode="cosmos", cross_attention=False),
    "cosmos-image-only": dict(mode="cosmos", distill_text=False),
    "cosmos-text-only": dict(mode="cosmos", distill_image=False),
}
DEFAULT_ARMS = ("clip-raw", "clip-textcrops", "cosmos")
METRICS = [  # (key, label)
    ("i2t_R@1", "R@1 i2t"), ("t2i_R@1", "R@1 t2i"), ("shape_top1", "shape top-1"), ("colour_top1", "colour top-1"),
    ("seg_shape_plain_mIoU", "seg shape plain"), ("seg_shape_csa_mIoU", "seg shape csa"),
    ("seg_colour_plain_mIoU", "seg colour plain"), ("seg_colour_csa_mIoU", "seg colour csa"),
]


def recipe(args) -> dict:
    """The training recipe every arm shares (the CPU-sized COSMOS recipe; see the module docstring)."""
    return dict(model="tiny", steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.wd,
                warmup=args.warmup, ema_momentum=args.momentum, precision=args.precision, workers=args.workers,
                local_crops=args.local_crops, global_scale=(args.global_scale, 1.0),
                local_scale=(args.local_scale_min, args.local_scale_max), vocab_size=args.vocab_size, log_every=25,
                save_every=200, keep=1)


def ensure_data(args) -> Path:
    from cosmos.data.synth import write_synth

    data = Path(args.data)
    if not (data / "synth.json").is_file():
        print(f"writing {args.n} synthetic scenes to {data}", flush=True)
        write_synth(data, n=args.n, seed=0, size=args.size, n_eval=args.n_eval)
    return data


def run_arm(name: str, seed: int, data: Path, args, out: Path) -> dict:
    run_dir = out / f"{name}-s{seed}"
    done_file = run_dir / "results.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
    cfg = TrainConfig(data=str(data), out=str(run_dir), seed=seed, **recipe(args), **ARMS[name],
                      resume="auto" if run_dir.exists() else None)
    print(f"[{time.strftime('%H:%M:%S')}] training {name} seed {seed}", flush=True)
    t0 = time.time()
    result = train(cfg)
    train_wall = time.time() - t0
    rows = [r for r in result.metrics if "samples_per_s" in r and r["samples_per_s"]]
    speed = statistics.median(r["samples_per_s"] for r in rows) if rows else None
    print(f"[{time.strftime('%H:%M:%S')}] evaluating {name} seed {seed}", flush=True)
    import cosmos
    from cosmos.zeroshot.synthetic import evaluate_synthetic

    evals = {}
    whos = ["student", "teacher"] if ARMS[name]["mode"] == "cosmos" else ["student"]  # the others have no teacher
    for who in whos:
        model, _, tokenizer = cosmos.load(run_dir / "model.pt", device="cpu", which=who)
        evals[who] = evaluate_synthetic(model, tokenizer, data, precision=args.precision)
    record = {"arm": name, "seed": seed, "steps": result.steps, "train_wall_s": train_wall,
              "samples_per_s": speed, "final_loss": next((r["loss"] for r in reversed(result.metrics) if "loss" in r), None),
              "eval": evals, "recipe": recipe(args)}
    done_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def summarize(records: list[dict]) -> tuple[str, dict]:
    """A markdown table of mean and spread (half the range over the seeds), and the numbers behind it."""
    rows = []
    groups = [(arm, who) for arm in ARMS for who in (("student", "teacher") if arm.startswith("cosmos") else ("student",))]
    summary = {}
    header = "| arm | " + " | ".join(label for _, label in METRICS) + " | train s | samples/s |"
    rows.append(header)
    rows.append("|" + "---|" * (len(METRICS) + 3))
    for arm, who in groups:
        recs = [r for r in records if r["arm"] == arm and who in r["eval"]]
        if not recs:
            continue
        cells, stats = [], {}
        for key, _ in METRICS:
            values = [100 * r["eval"][who][key] for r in recs if r["eval"][who].get(key) is not None]
            if not values:
                cells.append("-")
                continue
            mean = statistics.fmean(values)
            spread = (max(values) - min(values)) / 2
            stats[key] = {"mean": mean, "spread": spread, "values": values}
            cells.append(f"{mean:.1f} ± {spread:.1f}")
        wall = statistics.fmean(r["train_wall_s"] for r in recs)
        speed = statistics.fmean(r["samples_per_s"] for r in recs if r["samples_per_s"])
        label = f"{arm} ({who})" if arm.startswith("cosmos") else arm
        summary[label] = {"metrics": stats, "train_wall_s": wall, "samples_per_s": speed, "seeds": [r["seed"] for r in recs]}
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} | {speed:.1f} |")
    return "\n".join(rows), summary


def chart(summary: dict, path: Path) -> None:
    from cosmos.plot import bar_chart, save_png

    keys = [k for k, _ in METRICS]
    labels = [label for _, label in METRICS]
    series = {arm: [s["metrics"].get(k, {}).get("mean") for k in keys] for arm, s in summary.items()}
    errors = {arm: [s["metrics"].get(k, {}).get("spread", 0) for k in keys] for arm, s in summary.items()}
    image = bar_chart(labels, series, errors, title="COSMOS in miniature (cosmos synth, tiny model, mean ± half-range "
                      "over seeds)", ylabel="%", size=(1200, 500), ymax=100)
    save_png(image, path)


def write_benchmarks(table: str, args, records: list[dict], total_wall: float) -> None:
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text(encoding="utf-8")
    cpu = "avx512_bf16" in open("/proc/cpuinfo").read()
    body = f"""<!-- section: paper-table -->
## The paper's ablation in miniature (issue: Reproduce)

    python bench/paper_table.py --write-benchmarks

`cosmos synth` scenes ({args.n} training, {args.n_eval} per eval set, {args.size} px), tiny model (conv stem), the same
recipe for every arm: {args.steps} steps x batch {args.batch}, AdamW lr {args.lr} wd {args.wd}, warmup {args.warmup},
{args.precision}, EMA momentum {args.momentum}, {args.local_crops} local crops (global scale {args.global_scale}-1, local
{args.local_scale_min}-{args.local_scale_max}), a {args.vocab_size}-id BPE learned from the captions, seeds {args.seeds}. Mean ± half the
range over the seeds, in %. Total wall time {total_wall / 60:.1f} min on the 2-core machine
(CPU with AVX-512 BF16 / AMX: {cpu}).

{table}

![paper table](bench/paper_table.png)
<!-- /section: paper-table -->"""
    start, end = "<!-- section: paper-table -->", "<!-- /section: paper-table -->"
    if start in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    bench.write_text(text, encoding="utf-8")


def ship(records: list[dict], out: Path, path: Path) -> dict:
    """The best COSMOS teacher (mean of shape top-1 and the two R@1) as the shipped model: teacher only, fp16."""
    def score(r: dict) -> float:
        e = r["eval"]["teacher"]
        return (e["shape_top1"] + e["i2t_R@1"] + e["t2i_R@1"]) / 3

    best = max((r for r in records if r["arm"] == "cosmos"), key=score)
    obj = torch.load(out / f"cosmos-s{best['seed']}" / "model.pt", map_location="cpu", weights_only=True)
    shipped = {k: obj.get(k) for k in ("format", "format_version", "config", "tokenizer", "labels", "step", "mode")}
    shipped["templates"] = "synth"  # caption-style prompts: what a model of these scenes understands
    shipped["student"] = None  # the teacher is what the paper evaluates; the student would double the size
    shipped["teacher"] = {k: v.half() if v.is_floating_point() else v for k, v in obj["teacher"].items()}
    shipped["trained"] = {"seed": best["seed"], "recipe": best["recipe"], "eval": best["eval"]["teacher"],
                          "data": "cosmos synth --n 20000 --size 64 --seed 0"}
    from cosmos.checkpoint import _atomic_torch_save

    _atomic_torch_save(shipped, path)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="runs and results (default bench/out/paper)")
    parser.add_argument("--data", default=str(ROOT / "bench" / "out" / "paper-synth"))
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--global-scale", type=float, default=0.6)
    parser.add_argument("--local-scale-min", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--local-scale-max", type=float, default=0.4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"any of {', '.join(ARMS)}")
    parser.add_argument("--write-benchmarks", action="store_true")
    parser.add_argument("--ship", action="store_true", help="write the best COSMOS teacher to "
                        "weights/cosmos_tiny_synth.pt (fp16, teacher only)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out) if args.out else ROOT / "bench" / "out" / ("paper" if args.steps >= 400 else "paper-smoke")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = ensure_data(args)
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            records.append(run_arm(arm, seed, data, args, out))
    total = time.time() - t0
    total_recorded = sum(r["train_wall_s"] for r in records)
    previous = out / "results.json"
    if previous.is_file():  # a later invocation that read the arms back: keep the wall time of the one that ran them
        total = max(total, json.loads(previous.read_text()).get("wall_s_this_invocation", 0.0))
    table, summary = summarize(records)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"records": records, "summary": summary,
                                                 "wall_s_this_invocation": total,
                                                 "train_wall_s_total": total_recorded}, indent=2) + "\n")
    chart(summary, out / "paper_table.png")
    if args.write_benchmarks:
        import shutil

        shutil.copy(out / "paper_table.png", ROOT / "bench" / "paper_table.png")
        write_benchmarks(table, args, records, max(total, total_recorded))
    if args.ship:
        best = ship(records, out, ROOT / "weights" / "cosmos_tiny_synth.pt")
        print(f"shipped the COSMOS teacher of seed {best['seed']} as weights/cosmos_tiny_synth.pt")
    print(f"wrote {out / 'table.md'}, {out / 'paper_table.png'} ({total / 60:.1f} min this invocation)")


if __name__ == "__main__":
    main()
