"""The bench's outputs: results.json, a markdown table, Pareto plots, an HTML page of GIFs, and a verdict."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..eval.cache_quality import frontier_psnr  # noqa: E402
from ..eval.edit_quality import BARS as EDIT_BARS  # noqa: E402
from ..eval.metrics import below_bars  # noqa: E402
from ..generation import save_clips  # noqa: E402
from .runner import sample_key  # noqa: E402

MARKERS = {"full compute": "*", "fewer steps": "v", "tempocache": "o", "diffusers": "s", "cache-dit": "D", "torchao": "^"}
PEER_FAMILIES = ("fewer steps", "diffusers", "cache-dit", "torchao")
TARGET_SPEEDUP = 3.0
NEAR = 0.95  # "near 3x": at least 95% of it, timing noise allowed for
TIMING_TOLERANCE = 0.97  # a point within 3% of another's speedup counts as as fast
PSNR_FLOOR = 30.0
EDIT_TARGET_SPEEDUP, EDIT_PSNR_FLOOR = 2.4, 32.0  # RegionE's, on local edits
ZERO_SHOT = "tempocache.Auto-zero-shot"
# Peers a user runs without calibrating them on the model first (MagCache's ratios are a calibration)
UNCALIBRATED_PEERS = ("diffusers.FirstBlockCache", "diffusers.TaylorSeerCache", "diffusers.TaylorSeerCache-lite",
                      "cache-dit.DBCache-F1B0", "cache-dit.DBCache-F8B0", "cache-dit.DBCache+TaylorSeer")


def main_edit_group(row: dict) -> str:
    """The local edits together where the bench ran several kinds, else the one kind."""
    quality = row["edit_quality"]
    return "local" if "local" in quality else next(iter(quality))


def accuracy_of(row: dict) -> float:
    """A generator's semantic accuracy (all attributes), an editor's edit success (the change made, the rest kept)."""
    if "edit_quality" in row:
        return row["edit_quality"][main_edit_group(row)]["success"]
    return row["semantic_accuracy"]["all"]


def scored(result: dict, families: tuple[str, ...]) -> list[dict]:
    return [r for r in result["rows"] if r["status"] == "ok" and r["family"] in families]


def best_near(rows: list[dict], speedup: float = TARGET_SPEEDUP) -> dict | None:
    """The most faithful row at least NEAR x `speedup` fast."""
    return max((r for r in rows if r["speedup"] >= NEAR * speedup), key=lambda r: r["psnr"], default=None)


def fastest_above(rows: list[dict], psnr: float = PSNR_FLOOR) -> dict | None:
    return max((r for r in rows if r["psnr"] >= psnr), key=lambda r: r["speedup"], default=None)


def undominated_peers(result: dict) -> list[dict]:
    """Peer rows that no tempocache row matches on PSNR at (within timing noise) at least their speedup."""
    ours = scored(result, ("tempocache",))
    return [p for p in scored(result, PEER_FAMILIES) if p["speedup"] > 1 / TIMING_TOLERANCE and not any(
        o["psnr"] >= p["psnr"] and o["speedup"] >= TIMING_TOLERANCE * p["speedup"] for o in ours)]


def zero_shot_comparison(result: dict) -> list[dict]:
    """Each zero-shot Auto row against calibrated Auto and every uncalibrated peer at its block compute: their PSNR
    there, read off each method's frontier (None: its cheapest setting computes more)."""
    rows = scored(result, ("tempocache", *PEER_FAMILIES))
    out = []
    for ours in (r for r in rows if r["method"] == ZERO_SHOT):
        rivals = {}
        for method in ("tempocache.Auto", *UNCALIBRATED_PEERS):
            points = [(r["compute_fraction"], r["psnr"]) for r in rows if r["method"] == method]
            if points:
                rivals[method] = frontier_psnr(points, ours["compute_fraction"])
        peers = [v for k, v in rivals.items() if k in UNCALIBRATED_PEERS and v is not None]
        out.append({"setting": ours["setting"], "compute_fraction": ours["compute_fraction"], "psnr": ours["psnr"],
                    "rivals": rivals, "beats_uncalibrated_peers": all(ours["psnr"] > v for v in peers)})
    return out


def format_zero_shot(comparison: list[dict]) -> str:
    lines = []
    for c in comparison:
        rivals = ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in c["rivals"].items())
        lines.append(f"{c['setting']} at compute {c['compute_fraction']:.2f}: {c['psnr']:.1f} dB; at that compute {rivals} dB; "
                     + ("above every uncalibrated peer" if c["beats_uncalibrated_peers"] else "NOT above every uncalibrated peer"))
    return "\n".join(lines)


def full_compute_accuracy(result: dict) -> str:
    """Full compute's semantic accuracy, with a warning when the model falls below the reference bars at this setting."""
    full = next(r for r in result["rows"] if r["family"] == "full compute")
    if "edit_quality" in full:
        quality = full["edit_quality"]
        lines = ["full compute's edits: " + "; ".join(
            f"{k} changed {q['changed']:.2f}, kept {q['kept']:.2f}, PSNR outside the mask {q['psnr_outside_median']:.1f} dB"
            for k, q in quality.items())]
        low = [f"{k} {m} {q[m]:.2f} < {bar:g}" for k, q in quality.items() for m, bar in EDIT_BARS.items() if q[m] < bar]
        if low:
            lines.append(f"WARNING: full compute is below the editor's bars ({'; '.join(low)})")
        return "\n".join(lines)
    accuracy = full["semantic_accuracy"]
    line = "full compute's semantic accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
    low = below_bars(accuracy)
    if low:
        line += (f"\nWARNING: at {result['frames']} frame(s) full compute is below the reference bars ({'; '.join(low)}): "
                 "the model does not show what its captions say here, so fidelity to it says little about quality")
    return line


def region_verdict(result: dict) -> str:
    """RegionE's most faithful setting near its target speedup against the most faithful other method there."""
    rows = scored(result, ("tempocache", *PEER_FAMILIES))
    ours = best_near([r for r in rows if r["method"] == "tempocache.RegionE"], EDIT_TARGET_SPEEDUP)
    if ours is None:
        best = max((r for r in rows if r["method"] == "tempocache.RegionE"), key=lambda r: r["speedup"], default=None)
        return (f"RegionE reaches no {NEAR * EDIT_TARGET_SPEEDUP:.2f}x" +
                (f" (fastest: {best['setting']}, {best['speedup']:.2f}x, {best['psnr']:.1f} dB)" if best else ""))
    other = best_near([r for r in rows if r["method"] != "tempocache.RegionE"], ours["speedup"])
    line = f"RegionE near {EDIT_TARGET_SPEEDUP:g}x: {ours['setting']} {ours['speedup']:.2f}x at {ours['psnr']:.1f} dB"
    if other is None:
        return line + "; no other method is as fast"
    return line + f"; best other as fast: {other['setting']} {other['psnr']:.1f} dB ({ours['psnr'] - other['psnr']:+.1f} dB)"


def verdict(result: dict) -> str:
    if "edits" in result:
        return f"verdict ({result['model']}, {result['device']}): {region_verdict(result)}"
    ours, peers = scored(result, ("tempocache",)), scored(result, PEER_FAMILIES)
    a, b = best_near(ours), best_near(peers)
    if a and b:
        near = (f"near {TARGET_SPEEDUP:g}x speedup tempocache {a['psnr']:.1f} dB ({a['setting']}, {a['speedup']:.2f}x) vs best peer "
                f"{b['psnr']:.1f} dB ({b['setting']}, {b['speedup']:.2f}x): {a['psnr'] - b['psnr']:+.1f} dB")
    else:
        near = f"near {TARGET_SPEEDUP:g}x speedup: {'no peer' if a else 'no tempocache setting'} reaches {NEAR * TARGET_SPEEDUP:.2f}x"
    a, b = fastest_above(ours), fastest_above(peers)
    if a and b:
        fast = (f"at PSNR >= {PSNR_FLOOR:g} dB tempocache {a['speedup']:.2f}x vs best peer {b['speedup']:.2f}x "
                f"({b['setting']}): {a['speedup'] / b['speedup']:.2f}x")
    else:
        fast = f"at PSNR >= {PSNR_FLOOR:g} dB: {'no peer' if a else 'no tempocache setting'} qualifies"
    return f"verdict ({result['model']}, {result['device']}): {near}; {fast}"


def format_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}, {result['date']}: {result['captions']} {'edits' if 'edits' in result else 'captions'} x {len(result['seeds'])} seed(s), "
             f"{result['steps']} steps, guidance {result['guidance']}, {result['frames']} frame(s) of {result['size']}x{result['size']}; "
             f"time = median of {result['repeats']} runs of {result.get('timed_batches', 1)} batch(es) of {result['batch_size']}",
             full_compute_accuracy(result), "",
             "| method | setting | speedup | s/batch | compute | PSNR (dB) | SSIM | rel. L2 | "
             + ("edit success | partition recall" if "edits" in result else "accuracy (all) | Fréchet") + " | peak GiB |",
             "|---" * 11 + "|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['setting'] or '-'} | {r['status']} |" + " |" * 8)
            continue
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        if "edit_quality" in r:
            recall = r["edit_quality"][main_edit_group(r)].get("partition_recall")
            last = "-" if recall is None else f"{recall:.2f}"
        else:
            last = f"{r['frechet_distance']:.1f}" if r["frechet_distance"] is not None else "-"
        lines.append(f"| {r['method']} | {r['setting']} | {r['speedup']:.2f}x | {r['seconds']:.2f} | {r['compute_fraction']:.2f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['relative_l2']:.3f} | {accuracy_of(r):.2f} | "
                     f"{last} | {peak} |")
    left = undominated_peers(result)
    lines += ["", "Every peer point is matched or beaten by a tempocache point (as faithful, as fast within 3%)." if not left else
              "Peer points no tempocache point matches (as faithful, as fast within 3%): "
              + "; ".join(f"{r['setting']} {r['speedup']:.2f}x {r['psnr']:.1f} dB" for r in left)]
    if zero_shot := zero_shot_comparison(result):
        lines += ["", "Zero-shot Auto (no profile of this model) against calibrated Auto and the uncalibrated peers, "
                      "PSNR at the same block compute:", format_zero_shot(zero_shot)]
    return "\n".join(lines)


def plot_pareto(result: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rows = scored(result, tuple(MARKERS))
    metrics = (("psnr", "PSNR vs full compute (dB)"),
               ("accuracy", "edit success (change made, rest kept)" if "edits" in result else "semantic accuracy (all attributes)"))
    for ax, (metric, label) in zip(axes, metrics):
        for family, marker in MARKERS.items():
            for method in dict.fromkeys(r["method"] for r in rows if r["family"] == family):
                points = sorted((r["speedup"], min(r["psnr"], 60) if metric == "psnr" else accuracy_of(r))
                                for r in rows if r["method"] == method)
                xs, ys = zip(*points)
                line = "-" if family in ("tempocache", "fewer steps") and method.endswith(("Auto", "steps")) else ":"
                ax.plot(xs, ys, line, marker=marker, markersize=9 if "Auto" in method else 5, alpha=0.85,
                        label=method.replace("tempocache.", "ours: "), linewidth=2 if "Auto" in method else 1)
        ax.set_xlabel("speedup over full compute (wall-clock)")
        ax.set_ylabel(label + (" (100 dB = identical, drawn at 60)" if metric == "psnr" else ""))
        ax.axvline(TARGET_SPEEDUP, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2, loc="lower left")
    fig.suptitle(f"{result['model']} on {result['device']} ({result['date']}): every method, same captions and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def write_report(result: dict, out: Path) -> dict[str, Path]:
    """results.json, table.md, pareto.png, index.html (with a GIF per setting under gifs/) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gifs").mkdir(exist_ok=True)
    gifs = {name: save_clips(clips, out / "gifs" / f"{_slug(name)}.gif", scale=1) for name, clips in result["samples"].items()}
    plain = {k: v for k, v in result.items() if k != "samples"}
    plain["zero_shot"] = zero_shot_comparison(plain)
    paths = {"json": out / "results.json", "table": out / "table.md", "plot": out / "pareto.png", "html": out / "index.html"}
    paths["json"].write_text(json.dumps(plain, indent=2))
    paths["table"].write_text(f"{format_table(plain)}\n\n{verdict(plain)}\n")
    plot_pareto(plain, paths["plot"])
    full_gif = gifs[sample_key("full", "full compute")]
    cells = []
    for r in plain["rows"]:
        gif = gifs.get(sample_key(r["method"], r["setting"] or ""))
        if r["status"] != "ok" or gif is None:
            continue
        caption = (f"{html.escape(r['setting'])}<br>{r['speedup']:.2f}x, {r['psnr']:.1f} dB, "
                   f"{'edit success' if 'edits' in plain else 'accuracy'} {accuracy_of(r):.2f}")
        cells.append(f"<tr><td>{html.escape(r['family'])}</td><td>{caption}</td>"
                     f"<td><img class=clip src='gifs/{gif.name}'></td><td><img class=clip src='gifs/{full_gif.name}'></td></tr>")
    paths["html"].write_text(
        "<!doctype html><meta charset='utf-8'><title>tempocache bench</title>"
        "<style>body{font-family:sans-serif;background:#111;color:#ddd}td{padding:4px;vertical-align:middle}"
        "img.clip{zoom:3;image-rendering:pixelated}</style>"  # GIFs stored at model resolution, shown enlarged
        f"<h1>tempocache bench: {html.escape(plain['model'])} on {html.escape(plain['device'])}, {plain['date']}</h1>"
        f"<p>{html.escape(verdict(plain))}</p><img src='pareto.png' style='max-width:100%'>"
        "<table><tr><th>family</th><th>setting</th><th>clips</th><th>full compute</th></tr>" + "".join(cells) + "</table>")
    return paths
