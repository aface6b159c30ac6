"""The measured figures as a few tables for the terminal."""

from __future__ import annotations

from typing import Any


def format_report(results: dict[str, Any]) -> str:
    """The figures as a few tables for the terminal."""
    m = results["machine"]
    lines = [(f"{results['model']} on {m.get('gpu', m['cpu'])} ({m['cores']} cores), {m['date']}, "
              f"load {m['load_average'][0]}")]
    if "preprocess" in results:
        lines += _preprocess_lines(results["preprocess"])
    if results.get("flops_per_image"):
        peak = f", peak {results['peak_tflops']:.0f} TFLOP/s" if results.get("peak_tflops") else ""
        lines.append(f"FLOPs per image (counted): {results['flops_per_image'] / 1e9:.3f} G{peak}")
    if "model_alone" in results:
        lines += _model_lines(results["model_alone"])
    if "embed" in results:
        lines += _embed_lines(results["embed"])
    if "writer" in results:
        w = results["writer"]
        lines.append(f"(d) Parquet writer: {w['rows']} rows x {w['dim']}: {w['rows_per_s']:,.0f} rows/s "
                     f"({w['mb_per_s']:.0f} MB/s of float32)")
    return "\n".join(lines)


def _preprocess_lines(p: dict[str, Any]) -> list[str]:
    r = p["images_per_s"]
    return [(
        f"(a) decode + preprocess, 1 core, {p['images']} JPEGs, images/s: ours {r['ours']:.0f} "
        f"(worker part {r['ours_worker']:.0f}), SiglipImageProcessor {r['processor_pil']:.0f} (PIL in) / "
        f"{r['processor_tensor']:.0f} (tensor in) -> {p['speedup_vs_processor']:.2f}x the faster; "
        f"max abs diff {p['max_abs_diff']:.1e} (device decode: {p['device_decode_max_abs_diff']:.1e})"
    )]


def _model_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["(b) model alone:",
             f"  {'dtype':<10}{'batch':>6}{'compile':>9}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'warmup s':>10}"]
    for r in runs:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"  {r['dtype']:<10}{r['batch_size']:>6}{'yes' if r['compile'] else 'no':>9}"
                     f"{r['images_per_s']:>10.1f}{r['tflops']:>9.2f}{mfu:>7}{r['warmup_s']:>10.1f}")
    return lines


def _embed_lines(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [(f"(c) embed job, {first['images']} JPEGs, {first['dtype']}, batch {first['batch_size']}, "
              f"{'compiled' if first['compile'] else 'eager'}; bound = min((a) x workers, model alone):"),
             (f"  {'decode':<8}{'workers':>8}{'data img/s':>12}{'model img/s':>12}{'job img/s':>11}"
              f"{'job/data':>10}{'job/bound':>11}{'MFU':>7}{'start s':>9}")]
    for r in rows:
        vs_bound = f"{r['vs_bound']:.1%}" if r["vs_bound"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"  {'device' if r['device_decode'] else 'workers':<8}{r['num_workers']:>8}"
                     f"{r['data_path_images_per_s']:>12.1f}{r['model_alone_images_per_s']:>12.1f}"
                     f"{r['images_per_s']:>11.1f}{r['vs_data_path']:>10.1%}{vs_bound:>11}{mfu:>7}"
                     f"{r['last_run']['first_batch_s']:>9.2f}")
    return lines
