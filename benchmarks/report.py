"""The benchmark's results document: its schema (SCHEMA, `validate`), the Markdown tables and the PNG chart
made from it, and writing all three. A stored JSON is turned into a report without running anything
(`sprintrt bench --report results.json`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCHEMA = "sprintrt-bench/1"

_STATS = {"min", "median", "p90"}


def validate(doc: dict) -> None:
    """Raise ValueError naming the first field that breaks the schema."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"benchmark JSON does not follow {SCHEMA}: {what}")

    need(doc.get("schema") == SCHEMA, f"schema is {doc.get('schema')!r}")
    for key in ("created", "machine", "versions", "model", "settings", "onnx_bytes", "results"):
        need(key in doc, f"missing '{key}'")
    need(doc["results"], "no results")
    for r in doc["results"]:
        for key in ("height", "width", "batch", "steps", "systems"):
            need(key in r, f"result lacks '{key}'")
        need(sum(s["name"] == doc["settings"]["reference"] for s in r["systems"]) == 1, "reference system missing")
        for s in r["systems"]:
            for key in ("name", "kind", "backend", "precision", "stages", "end_to_end", "engine_sum", "overhead",
                        "transformer_steps", "peak_rss_gb", "image_vs_reference"):
                need(key in s, f"system {s.get('name')!r} lacks '{key}'")
            need(set(s["end_to_end"]) == _STATS, f"{s['name']} end_to_end needs {sorted(_STATS)}")
            need(all(set(v) == _STATS for v in s["stages"].values()), f"{s['name']} stage stats")
            ran = r.get("steps_run", r["steps"])
            need(len(s["transformer_steps"]) == ran, f"{s['name']} has {len(s['transformer_steps'])} step timings, not {ran}")
            need(s["engine_sum"]["median"] <= s["end_to_end"]["median"] * 1.001, f"{s['name']} stages exceed end to end")
    for f in doc.get("failed", []):
        need(set(f) == {"name", "kind", "error"}, f"failed system entry {f!r} needs name, kind and error")


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def report(doc: dict) -> str:
    """Markdown tables, one per (resolution, batch, steps)."""
    validate(doc)
    m, st = doc["machine"], doc["settings"]
    task = "text to image" if st.get("strength") is None else f"image to image, strength {st['strength']}"
    if st.get("controlnet"):
        task = "text to image with the ControlNet (a fixed scribble, scale 1; PyTorch: diffusers' modules)"
    lines = [f"# sprintrt benchmark — {doc['model']['source']} ({task})", "",
             f"Machine: {m['cpu']['name']} ({m['cores']} cores, {m['memory_gb']} GB"
             f"{', ' + ', '.join(g['name'] for g in m['gpus']) if m['gpus'] else ', no GPU'}); "
             f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}.",
             f"Median of {st['runs']} runs after {st['warmup']} warm-up; text length {st['text_length']} "
             f"({'with' if st['complex_human_instruction'] else 'without'} the complex human instruction"
             f"{'; sprintrt runs the text encoder over the prompt after the instruction, whose cached prefix the warm-up computed' if st['complex_human_instruction'] else ''}); "
             f"images compared with {st['reference']}. Created {doc['created']}.", ""]
    for r in doc["results"]:
        lines += [f"## {r['height']}x{r['width']}, batch {r['batch']}, {r['steps']} step{'s' if r['steps'] > 1 else ''}",
                  "", "| system | end to end s (min / median / p90) | text encoder s | "
                  f"{'VAE encoder s | ControlNet s | ' if st.get('controlnet') else ''}transformer s | VAE decoder s "
                  "| overhead | speed-up vs fp32 | peak RSS GB | PSNR dB | max abs |",
                  "|---|---|---:|" + ("---:|---:|" if st.get("controlnet") else "") + "---:|---:|---:|---:|---:|---:|---:|"]
        ref = next(s for s in r["systems"] if s["name"] == st["reference"])["end_to_end"]["median"]
        for s in r["systems"]:
            e, g = s["end_to_end"], s["stages"].get
            q = s["image_vs_reference"]
            ps = "identical" if q["psnr_db"] == float("inf") else f"{q['psnr_db']:.1f}"
            where = f" ({s['device']})" if s.get("device", "cpu") != "cpu" else ""
            lines.append(
                f"| {s['name']}{where} | {_fmt_s(e['min'])} / **{_fmt_s(e['median'])}** / {_fmt_s(e['p90'])} | "
                f"{_fmt_s(g('text_encoder', {'median': 0})['median'])} | "
                + (f"{_fmt_s(g('vae_encoder', {'median': 0})['median'])} | {_fmt_s(g('controlnet', {'median': 0})['median'])} | "
                   if st.get("controlnet") else "")
                + f"{_fmt_s(g('transformer', {'median': 0})['median'])} | "
                f"{_fmt_s(g('vae_decoder', {'median': 0})['median'])} | {100 * s['overhead']['fraction']:.1f}% | "
                f"{ref / e['median']:.2f}x | {s['peak_rss_gb']} | {ps} | {q['max_abs']:.2g} |")
        on_gpu = [(s["name"], s.get("gpu_memory_peak_gb", s.get("gpu_memory_used_gb"))) for s in r["systems"]
                  if "gpu_memory_peak_gb" in s or "gpu_memory_used_gb" in s]
        if on_gpu:
            lines += ["", "GPU memory (PyTorch: its allocator's peak; TensorRT: in use with the engines loaded): "
                      + ", ".join(f"{n} {gb} GB" for n, gb in on_gpu)]
        cached = [s for s in r["systems"] if "cached_prompt" in s]
        if cached:
            lines += ["", "Repeated prompt, with the prompt-embedding cache (`from_engines(prompt_cache=...)`), apart from "
                      "the cold-prompt numbers above:", "", "| system | end to end s (median) | text encoder s |",
                      "|---|---:|---:|"]
            lines += [f"| {s['name']} | {_fmt_s(s['cached_prompt']['end_to_end']['median'])} | "
                      f"{_fmt_s(s['cached_prompt']['text_encoder']['median'])} |" for s in cached]
        lines.append("")
    for f in doc.get("failed", []):
        lines += [f"**Not measured: {f['name']}** ({f['kind']}): {f['error'].splitlines()[0]}", ""]
    lines.append("Overhead = end to end − the engines (text encoder, transformer, VAE decoder and, image to image, "
                 "VAE encoder): tokenizing, scheduling, noise, pre- and post-processing and the runtime itself. Each "
                 "system is loaded and timed in a fresh process, one after another; peak RSS is that process's "
                 "largest resident set.")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> Path:
    """Stacked horizontal bars of median stage times, one panel per (resolution, batch, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate(doc)
    n = len(doc["results"])
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 0.55 * max(len(r["systems"]) for r in doc["results"])) if n == 1
                             else (9, 2.5 * n), squeeze=False)
    colours = {"text_encoder": "#4c72b0", "transformer": "#dd8452", "vae_decoder": "#55a868", "other": "#b0b0b0"}
    for ax, r in zip(axes[:, 0], doc["results"]):
        names = [s["name"] for s in r["systems"]]
        left = np.zeros(len(names))
        for stage in ("text_encoder", "transformer", "vae_decoder", "other"):
            if stage == "other":
                vals = np.array([s["end_to_end"]["median"] for s in r["systems"]]) - left
            else:
                vals = np.array([s["stages"].get(stage, {"median": 0})["median"] for s in r["systems"]])
            ax.barh(names, vals, left=left, color=colours[stage], label=stage.replace("_", " "))
            left += vals
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"{r['height']}x{r['width']}, batch {r['batch']}, {r['steps']} step(s)", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if n > 1 else 0.12, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, json_path: str | Path) -> tuple[Path, Path, Path]:
    from sprintrt.files import write_json_and_markdown

    json_path, md = write_json_and_markdown(doc, json_path, report)
    png = plot(doc, json_path.with_suffix(".png"))
    return json_path, md, png

