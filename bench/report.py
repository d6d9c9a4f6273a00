"""`python -m bench --report`'s targets, its incremental store and its writer: benchmarks.json and BENCHMARKS.md.

A report is a list of units (one step comparison, the matmul peak, one sweep point, one end-to-end run, the
segmentation figures), measured by bench/bench.py in order, headline first. After every unit the store rewrites
both files, so a report killed part-way leaves valid files with the units done; a rerun with the same measurement
identity (device, code version, torch, sizes) skips the units already in benchmarks.json.

The targets (one H100, ViT-B/16 gated+temp at 224 px) are the project's: about half of the bf16 dense peak.
"""
import json
import time
from pathlib import Path

import torch

from harness import runtime

# (prompts, batch, train-step images/s target on one H100, task). The shapes are the CUB and the VTAB (dtd)
# recipes', and the eval step runs at the harness's eval batch, so the end-to-end runs after them compile the
# same backbone graphs (inductor's cache serves them)
REPORT_POINTS = ((100, 64, 3700, "cub"), (1, 128, 5700, "dtd"))
TARGET_SPEEDUP = 9.0              # fast / reference path, training step, measured in the same run
TARGET_PEAK_FRACTION = 0.5        # of the bf16 dense peak: an aim, what the step targets amount to
TARGET_MEMORY_GIB = 6.0           # the fast training step at 100 prompts, batch 64
END_TO_END_TARGETS = {"vtab": (60, "VTAB-1k task"), "cub": (240, "CUB")}   # seconds, whole run (VTAB: cold)
# stage "table": a VTAB-1k run warm (its graphs compiled by an earlier run), the 7-point lr sweep batched vs one at
# a time (x), Table 2 and Table 2 --sweep projected from those runs (seconds)
TABLE_TARGETS = {"vtab_warm_s": 40, "sweep_ratio": 2.0, "table2_s": 3600, "table2_sweep_s": 3 * 3600}
STAGES = ("step", "kernels", "sweeps", "e2e", "segmentation", "table")
# harness/kernels.py's levers together (bench.LEVERS[:2]): train-step img/s targets, one per REPORT_POINTS entry --
# without FP8 the step's own targets, with FP8 these; SETR-PUP with its levers: it/s at batch 16 and peak GiB
LEVERS_BF16 = ("qkv-attention", "attention-backend")
LEVERS_FP8 = LEVERS_BF16 + ("fp8",)
FP8_STEP_TARGETS = (4300, 6600)
SEGMENTATION_LEVERS_TARGET = (("upsample", "channels-last"), 11.0, 24.0)
REPORT_FORMAT = 1   # the layout of benchmarks.json: header facts, identity, units, the derived tables
CPU_SMOKE_NOTE = "CPU smoke run, not a GPU measurement"
MATMUL_SIZE = {"cuda": 8192, "cpu": 256}


def measure_matmul_peak(device, repeats=3):
    """The device's own bf16 dense matmul rate (TFLOP/s): the best of `repeats` timings of a batch of square
    bf16 matmuls between two syncs (8192 on a GPU; 256 on a CPU, where the figure only shows the code runs)."""
    n = MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    calls = 20 if device.type == "cuda" else 2
    (a @ b).sum().item()   # warm-up: cuBLAS picks its kernel
    best = 0.0
    for _ in range(repeats):
        runtime.synchronize(device)
        tic = time.perf_counter()
        for _ in range(calls):
            a @ b
        runtime.synchronize(device)
        best = max(best, 2 * n ** 3 * calls / (time.perf_counter() - tic) / 1e12)
    return {"size": n, "tflops": best}

# -----------------------------------------------------------------------------
# The incremental store


class Store:
    """benchmarks.json + BENCHMARKS.md in out_dir, rewritten after every unit. `units` maps a unit's key to its
    figures; those of an earlier run are kept only if its identity (device, code version, sizes) is this one's."""

    def __init__(self, out_dir, header, identity):
        self.json, self.markdown = Path(out_dir) / "benchmarks.json", Path(out_dir) / "BENCHMARKS.md"
        self.header, self.identity, self.units = header, identity, {}
        if self.json.is_file():
            old = read_report(self.json)
            if old.get("identity") == identity:
                self.units = old.get("units", {})
            elif old:
                print(f"{self.json}: measured with other settings or code ({_difference(old.get('identity'), identity)}); "
                      "measuring again", flush=True)

    def add(self, key, figures, assemble):
        """Record one unit and rewrite both files (atomically) from every unit so far."""
        self.units[key] = figures
        self.write(assemble(self.units))

    def write(self, derived):
        out = dict(self.header, format=REPORT_FORMAT, identity=self.identity, units=self.units, **derived)
        runtime.write_json(self.json, out)
        runtime.write_text(self.markdown, report_markdown(out))
        return out


def read_report(path):
    """A benchmarks.json this code wrote (format REPORT_FORMAT; a file without "format" is format 1), as a dict;
    anything else is a one-line UserError naming the file: a report is never written over a file it cannot read."""
    fix = "move it away, or choose another --out-dir"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise runtime.UserError(f"{path} is not a readable benchmark report ({type(err).__name__}); {fix}") from None
    if not isinstance(old, dict):
        kind = {list: "list", str: "string", bool: "true/false", type(None): "null"}.get(type(old), "number")
        raise runtime.UserError(f"{path} is not a benchmark report: a JSON {kind}, not an object; {fix}")
    if old.get("format", 1) != REPORT_FORMAT:
        raise runtime.UserError(f"{path} is a benchmark report of format {old.get('format')!r}; this code reads and "
                                f"writes format {REPORT_FORMAT}: {fix}")
    if not (isinstance(old.get("identity"), dict) and isinstance(old.get("units"), dict)):
        raise runtime.UserError(f"{path} is not a benchmark report of this code (no identity and units); {fix}")
    return old


def _difference(old, new):
    old = old or {}
    changed = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in changed[:3]) or "no identity"

# -----------------------------------------------------------------------------
# Targets


def _find(rows, prompts, batch, path="fast", step="train"):
    return next((r for r in rows if (r["prompts"], r["batch"], r["path"], r["step"]) == (prompts, batch, path, step)),
                None)


def _target_row(figure, value, unit, op, target, comparable, aim=False):
    met = None
    if comparable and value is not None:
        met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return {"figure": figure, "value": value, "unit": unit, "op": op, "target": target, "aim": aim, "met": met}


def target_rows(report, comparable):
    """Each target figure next to its target on one H100. met is None where the run cannot be compared (not an
    H100, not ViT-B/16 gated+temp at 224 px, or reduced end-to-end sizes) or the figure is missing. A training
    step that did not run compiled says so in its figure."""
    # a 256-wide square matmul is no peak on a CPU (its step beat it 3x): the fraction only on a GPU
    rows, measured_peak = [], (report.get("matmul_peak") or {}).get("tflops") if report.get("on_gpu") else None
    for prompts, batch, target, *_ in report["report_points"]:
        shape = f"{prompts} prompt{'s' if prompts != 1 else ''}, batch {batch}"
        fast = _find(report["results"], prompts, batch)
        if fast is None:
            continue
        eager = "" if fast["compiled"] else " (ran eager)"
        ratio = next((r["speedup"] for r in report["ratios"]
                      if (r["prompts"], r["batch"], r["step"]) == (prompts, batch, "train")), None)
        rows += [_target_row(f"train step, {shape}{eager}", fast["images_per_s"], "img/s", ">=", target, comparable),
                 _target_row(f"fast / reference, train step, {shape}{eager}", ratio, "x", ">=", TARGET_SPEEDUP,
                             comparable),
                 _target_row(f"% of bf16 dense peak (spec), train step, {shape}",
                             fast["peak_fraction"] and 100 * fast["peak_fraction"], "%", ">=",
                             100 * TARGET_PEAK_FRACTION, comparable, aim=True),
                 _target_row(f"% of bf16 matmul peak (measured), train step, {shape}",
                             measured_peak and 100 * fast["tflops"] / measured_peak, "%", ">=",
                             100 * TARGET_PEAK_FRACTION, comparable, aim=True)]
    prompts, batch, *_ = report["report_points"][0]
    fast = _find(report["results"], prompts, batch)
    if fast is not None:
        rows.append(_target_row(f"peak GPU memory, train step, {prompts} prompts, batch {batch}",
                                fast["peak_memory_gib"], "GiB", "<=", TARGET_MEMORY_GIB, comparable))
    for run, r in report["end_to_end"].items():
        target_s, label = END_TO_END_TARGETS[run]
        estimate = r["projected_wall_s"] if r["projected_wall_s"] is not None else r["wall_s"]
        projected = f"projected from {r['epochs']} to {r['full_epochs']} epochs" \
            if r["projected_wall_s"] is not None else f"{r['epochs']} epochs"
        rows.append(_target_row(f"{label} end to end ({projected})", estimate, "s", "<", target_s,
                                comparable and r["full_size"]))
    return rows

def table_target_rows(report, comparable):
    """Stage "table"'s figures next to their targets on one H100 (rows only for what was measured)."""
    t, rows = report.get("table") or {}, []
    warm, sweep, projection = t.get("vtab_again"), t.get("lr_sweep"), t.get("projection")
    if warm:
        estimate = warm["projected_wall_s"] if warm["projected_wall_s"] is not None else warm["wall_s"]
        rows.append(_target_row(f"VTAB-1k task end to end, run again in the process (graphs {warm.get('graphs')})",
                                estimate, "s", "<", TABLE_TARGETS["vtab_warm_s"], comparable and warm["full_size"]))
    if sweep:
        rows.append(_target_row(f"{sweep['points']}-point lr sweep, one at a time / batched", sweep["ratio"], "x",
                                ">=", TABLE_TARGETS["sweep_ratio"], comparable and warm is not None
                                and warm["full_size"]))
    if projection:
        full = comparable and warm is not None and warm["full_size"]
        rows.append(_target_row(f"Table 2 ({projection['cells']} runs, projected)", projection["table2_s"], "s",
                                "<", TABLE_TARGETS["table2_s"], full))
        rows.append(_target_row("Table 2 --sweep (projected)", projection["table2_sweep_s"], "s", "<",
                                TABLE_TARGETS["table2_sweep_s"], full))
    return rows


def lever_target_rows(report, comparable, segmentation_batch=16):
    """The kernels stage's figures next to their targets on one H100: the train step with the levers together
    (without FP8: the step's own targets; with FP8: FP8_STEP_TARGETS) and SETR-PUP's iteration with its levers.
    A unit that had to leave a lever out is not comparable."""
    kernels, rows = report.get("kernels") or {}, []
    for (prompts, batch, target, *_), fp8_target in zip(report["report_points"], FP8_STEP_TARGETS):
        for levers, goal in ((LEVERS_BF16, target), (LEVERS_FP8, fp8_target)):
            unit = next((u for u in kernels.get("levers", []) if (u["prompts"], u["batch"], tuple(u["asked"])) ==
                         (prompts, batch, levers) and "lever" in u), None)
            if unit is not None:
                shape = f"{prompts} prompt{'s' if prompts != 1 else ''}, batch {batch}"
                rows.append(_target_row(f"train step with {'+'.join(unit['kernels'])}, {shape}",
                                        unit["lever"]["images_per_s"], "img/s", ">=", goal,
                                        comparable and not unit["left_out"]))
    levers, iters, memory = SEGMENTATION_LEVERS_TARGET
    for unit in kernels.get("segmentation_levers", []):
        if tuple(unit["kernels"]) == levers:
            full = comparable and unit["batch_size"] == segmentation_batch
            rows += [_target_row(f"SETR-PUP iteration with {'+'.join(levers)}, batch {unit['batch_size']}",
                                 unit["lever"]["iters_per_s"], "it/s", ">=", iters, full),
                     _target_row(f"SETR-PUP peak GPU memory with {'+'.join(levers)}", unit["lever"]["peak_memory_gib"],
                                 "GiB", "<=", memory, full)]
    return rows

# -----------------------------------------------------------------------------
# BENCHMARKS.md


UNIT_FORMAT = {"img/s": "{:,.0f}", "x": "{:.2f}", "%": "{:.1f}", "GiB": "{:.2f}", "s": "{:.1f}", "it/s": "{:.2f}"}


def format_value(value, unit):
    return "n/a" if value is None else UNIT_FORMAT[unit].format(value) + ("" if unit == "x" else " ") + unit


def report_markdown(out):
    """BENCHMARKS.md: header facts, the targets table, then every timed row (units not measured yet: absent)."""
    lines = ["# Benchmarks", ""]
    if not out["cuda_device"]:
        lines += [f"**{CPU_SMOKE_NOTE}.** The GPU report's code on a CPU; no figure below says anything about "
                  "GPU speed, and no target is judged.", ""]
    args = out["args"]
    if args["arch"] == "tiny":
        lines += [f"Tiny sizes: a 12-block ViT of width 32, step batches the GPU report's / 16, "
                  f"{args['train_images']} train / {args['test_images']} test generated images end to end.", ""]
    peak = out.get("matmul_peak") or {}
    measured = f"{peak['tflops']:.1f} TFLOP/s ({peak['size']}x{peak['size']} matmuls)" if peak else "not measured"
    lines += ["| | |", "|---|---|", f"| device | {out['device']} |", f"| torch | {out['torch']} |",
              f"| CUDA | {out['cuda'] or 'none'} |", f"| date | {out['date']} |", f"| code | {out['code_version']} |",
              f"| command | `{out['command']}` |",
              f"| model | {args['arch']}, {args['method']}, {out['img_size']} px, random weights |",
              f"| torch.compile | {'on' if out['compile'] else 'off'}, mode {args['compile_mode']} |",
              f"| bf16 dense peak (spec) | {out['peak_bf16_tflops'] or 'unknown'} TFLOP/s |",
              f"| bf16 matmul peak (measured in this run) | {measured} |",
              f"| units measured | {', '.join(out['units']) or 'none'} |", ""]
    lines += ["## Targets (one H100)", "", "| figure | measured | target on one H100 | met |", "|---|---|---|---|"]
    for t in out["targets"]:
        target = ("aim " if t["aim"] else "") + f"{t['op']} " + format_value(t["target"], t["unit"])
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['figure']} | {format_value(t['value'], t['unit'])} | {target} | {met} |")
    lines += ["", "## Training and evaluation steps, fast vs reference", ""] + _markdown_steps(out["results"])
    lines += _markdown_kernels(out.get("kernels") or {})
    lines += ["", "## Sweeps (fast path without torch.compile)", ""]
    for name, rows in out["sweeps"].items():
        lines += [f"Over {name}:", ""] + _markdown_steps(rows) + [""]
    lines += ["## End to end (generated data)", ""] + _markdown_end_to_end(out["end_to_end"])
    lines += _markdown_table_stage(out.get("table") or {})
    if out.get("segmentation"):
        s = out["segmentation"]
        lines += ["", "## Segmentation (SETR-PUP, ADE20K sizes)", "",
                  f"Training iteration ({s['train_mode']}): {s['iters_per_s']:.3f} it/s, {s['images_per_s']:.1f} "
                  f"images/s; {s['projected_iters']:,} iterations projected to {s['projected_hours']:.2f} h. "
                  f"Slide inference of one {s['infer_image'][0]}x{s['infer_image'][1]} image ({s['infer_mode']}): "
                  f"{s['infer_s_per_image']:.4f} s."]
    lines += ["", "The end-to-end runs compile the same backbone graphs as the step comparison before them (same "
              "shapes and eval batch), and inductor's caches outlive torch._dynamo.reset, so their epoch 1 holds "
              "little compiling: it is what a repeated run of that shape costs. A first run on a fresh machine adds "
              "about the comparison's compiling-call seconds (fast path, train + eval) of the same shape.", "",
              "Every number is in the JSON file written beside this one.", ""]
    return "\n".join(lines)


def _markdown_table_stage(t):
    """Stage "table": the warm VTAB run, the lr sweep batched vs one at a time, the projections, the mini Table 2."""
    if not t:
        return []
    lines = ["", "## Whole tables (stage table)", ""]
    warm, sweep, projection, mini = (t.get(k) for k in ("vtab_again", "lr_sweep", "projection", "mini_table"))
    if warm:
        lines.append(f"- The VTAB-1k run again in the same process (graphs {warm.get('graphs')}): "
                     f"{warm['wall_s']:.1f} s for {warm['epochs']} epochs"
                     + (f", {warm['projected_wall_s']:.1f} s projected to {warm['full_epochs']}" if
                        warm["projected_wall_s"] is not None else "") + ".")
    if sweep:
        lines.append(f"- {sweep['points']}-point lr sweep ({sweep['train_images']} train / {sweep['val_images']} val "
                     f"images, {sweep['epochs']} epochs): one at a time {sweep['one_at_a_time_s']:.1f} s, batched "
                     f"{sweep['batched_s']:.1f} s: **{sweep['ratio']:.2f}x**.")
    if projection:
        sweep_h = projection["table2_sweep_s"]
        lines.append(f"- Table 2 projected from these runs: {projection['cells']} final runs at "
                     f"{projection['final_run_s']:.1f} s each = {projection['table2_s'] / 60:.1f} min"
                     + (f"; with --sweep (each cell's sweep batched) {sweep_h / 3600:.2f} h" if sweep_h else "")
                     + ". Every task is counted at dtd's test size rounded up to 10,000 images: an upper bound.")
    if mini:
        lines.append(f"- Mini Table 2 ({mini['runs']} runs, {mini['graph_keys']} graph keys, {mini['epochs']} "
                     f"epochs, {mini['arch']} ViT, torch.compile backend {mini['compile']}): one at a time as before "
                     f"(compiler reset before every run) {mini['one_at_a_time_s']:.1f} s, batched and compiled once "
                     f"per key {mini['batched_s']:.1f} s: **{mini['ratio']:.2f}x**.")
    return lines


def _or_na(value, spec):
    return "n/a" if value is None else format(value, spec)


def _markdown_steps(rows):
    lines = ["| prompts | batch | path | step | ran | compiling call s | SDPA kernel | images/s (min-max) | "
             "TFLOP/s | % peak | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = _or_na(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f")
        mem, compile_s = _or_na(r["peak_memory_gib"], ".2f"), _or_na(r["compile_s"], ".1f")
        lines.append(f"| {r['prompts']} | {r['batch']} | {r['path']} | {r['step']} | {r['mode']} | {compile_s} | "
                     f"{r.get('sdpa_kernel') or 'n/a'} | "
                     f"{r['images_per_s']:,.1f} ({r['images_per_s_min']:,.1f}-{r['images_per_s_max']:,.1f}) | "
                     f"{r['tflops']:.3g} | {frac} | {mem} |")
    return lines


def _markdown_end_to_end(runs):
    lines = ["| run | train / val / test images | epochs run | setup s | epoch 1 s | later epoch s | train s | "
             "test eval s | wall s | projected wall s | compiled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in runs.items():
        later, projected = _or_na(r["later_epoch_s"], ".3f"), _or_na(r["projected_wall_s"], ".1f")
        lines.append(f"| {run} ({r['task']}, {r['num_prompts']} prompt(s), batch {r['batch_size']}) | "
                     f"{r['train_images']} / {r['val_images']} / {r['test_images']} | {r['epochs']} | "
                     f"{r['setup_s']:.2f} | {r['epoch1_s']:.2f} | {later} | {r['train_s']:.2f} | "
                     f"{r['test_eval_s']:.2f} | {r['wall_s']:.2f} | {projected} | {'yes' if r['compiled'] else 'no'} |")
    return lines


def _markdown_kernels(k):
    """The kernels stage: opt-in levers vs today's fast path, SDPA backends, GEMM ceiling, kernel split, SETR-PUP."""
    if not any(k.values()):
        return []
    lines = ["", "## Kernels (opt-in, harness/kernels.py) against today's fast path, measured in the same unit", ""]
    if k.get("levers"):
        lines += ["| prompts | batch | kernels | left out | today img/s | with kernels img/s | ratio | ran | "
                  "rel. diff. logits / prompt grad |", "|---|---|---|---|---|---|---|---|---|"]
        for u in k["levers"]:
            left = "; ".join(u["left_out"].values()) or "-"
            today, lever = u.get("today"), u.get("lever")
            agree = u.get("agreement")
            lines.append(f"| {u['prompts']} | {u['batch']} | {'+'.join(u['asked'])} | {left} | "
                         f"{_or_na(today and today['images_per_s'], ',.1f')} | "
                         f"{_or_na(lever and lever['images_per_s'], ',.1f')} | {_or_na(u.get('ratio'), '.3f')} | "
                         f"{lever['mode'] if lever else 'n/a'} | "
                         + (f"{agree['logits']:.1e} / {agree['prompt_grad']:.1e} |" if agree else "n/a |"))
        lines.append("")
    backends = k.get("attention_backends")
    if backends:
        lines += ["SDPA forward + backward, bf16, ms per call:", ""]
        if backends.get("n/a"):
            lines += [f"n/a: {backends['n/a']}", ""]
        else:
            lines += ["| attention | batch | tokens | cudnn | flash | efficient | SDPA picks | fastest |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in backends["shapes"]:
                ms = [_or_na(r["ms"].get(n), ".3f") for n in ("cudnn", "flash", "efficient")]
                lines.append(f"| {r['what']} | {r['batch']} | {r['tokens']} | {' | '.join(ms)} | {r['sdpa_default']} "
                             f"| {r['winner'] or 'n/a'} |")
            lines.append("")
    ceiling = k.get("gemm_ceiling")
    if ceiling:
        lines += [f"GEMM-shape ceiling: torch.matmul (bf16) at the step's own shapes; square-matmul peak measured "
                  f"here {ceiling['matmul_peak']['tflops']:.1f} TFLOP/s.", "",
                  "| prompts | batch | GEMM ms per step | GEMM TFLOP/s | % of square peak | img/s if only GEMMs |",
                  "|---|---|---|---|---|---|"]
        for pt in ceiling["points"]:
            lines.append(f"| {pt['prompts']} | {pt['batch']} | {pt['gemm_ms_per_step']:.2f} | {pt['gemm_tflops']:.1f} | "
                         f"{100 * pt['peak_fraction']:.1f} | {pt['ceiling_images_per_s']:,.0f} |")
        lines += ["", "| prompts | batch | GEMM | M | N | K | per step | TFLOP/s | % of square peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for pt in ceiling["points"]:
            for r in pt["shapes"]:
                lines.append(f"| {pt['prompts']} | {pt['batch']} | {r['name']} | {r['M']} | {r['N']} | {r['K']} | "
                             f"{r['count']} | {r['tflops']:.1f} | {100 * r['peak_fraction']:.1f} |")
        lines.append("")
    split = k.get("kernel_split")
    if split and split.get("ms_per_step"):
        total = split["total_ms_per_step"] or 1.0
        lines += [f"Kernel-type split of today's training step at {split['prompts']} prompts, batch {split['batch']} "
                  f"({split['source']}, {split['row']['mode']}):", "", "| type | ms per step | share |", "|---|---|---|"]
        lines += [f"| {kind} | {ms:.2f} | {100 * ms / total:.1f}% |" for kind, ms in split["ms_per_step"].items()]
        lines.append("")
    if k.get("failed"):
        lines += ["Units that failed (the report went on):", ""]
        lines += [f"- {unit}: {why}" for unit, why in k["failed"].items()] + [""]
    if k.get("segmentation_levers"):
        lines += ["SETR-PUP training iteration:", "", "| kernels | today it/s | with kernels it/s | ratio | ran | "
                  "peak GiB today / with |", "|---|---|---|---|---|---|"]
        for u in k["segmentation_levers"]:
            mem = f"{_or_na(u['today']['peak_memory_gib'], '.2f')} / {_or_na(u['lever']['peak_memory_gib'], '.2f')}"
            lines.append(f"| {'+'.join(u['kernels'])} | {u['today']['iters_per_s']:.3f} | {u['lever']['iters_per_s']:.3f} "
                         f"| {u['ratio']:.3f} | {u['lever']['mode']} | {mem} |")
        lines.append("")
    return lines
