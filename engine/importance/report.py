"""What a finished scan writes next to its journal: ``ranking.json``, ``ranking.md``, ``importance.png``.

``ranking.json`` names the component its layers belong to (``component``: ``decoder`` or ``audio``, the
audio encoder's; a ranking without the key predates it and ranks decoder layers); the markdown and
the plot say which."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..io import atomic_write_json, atomic_write_text

RANKING = "ranking.json"
RANKING_MD = "ranking.md"
PLOT = "importance.png"


def fmt_cell(v: Any, digits: int = 4) -> str:
    """A table cell: "-" for a missing value, floats with ``digits`` decimals (shared with engine.report)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def layer_word(doc: Mapping[str, Any]) -> str:
    """"decoder layer" or "audio-encoder layer": what the ranking's layer indices count."""
    return "audio-encoder layer" if doc.get("component", "decoder") == "audio" else "decoder layer"


def _pct(rel: float | None) -> str:
    return "-" if rel is None else f"{100 * rel:.1f}%"


def markdown(doc: Mapping[str, Any]) -> str:
    m = doc["metric"]
    what = layer_word(doc)
    head = "Audio-encoder layer" if what.startswith("audio") else "Layer"
    lines = [f"# {head} importance: {doc['method']} search, scorer `{doc['scorer']}`, metric `{m}` "
             f"({'higher' if doc['higher_is_better'] else 'lower'} is better)", "",
             f"- model: `{doc['model']}` ({doc['num_layers']} {what}s; protected {doc['protected']})",
             f"- dev: split `{doc['dev']['split']}` of `{doc['dev']['shards']}`, {doc['n_samples']} samples",
             f"- unpruned: {fmt_cell((doc.get('baseline') or {}).get('score'))}; pruned "
             f"({len(doc['removed'])} removed): {fmt_cell((doc.get('final') or {}).get('score'))} "
             f"({_pct((doc.get('final') or {}).get('relative'))} of unpruned)"]
    if doc.get("stopped"):
        lines.append(f"- stopped early: {doc['stopped']}")
    if (doc.get("baseline") or {}).get("hypotheses") or any(it.get("hypotheses") for it in doc["iterations"]):
        lines.append("- translations of every scored model: `hypotheses/*.jsonl` next to this file (key, target "
                     "language, reference and hypothesis per dev sample; `ranking.json` names each file)")
    lines += ["", "## Removal order", "", "| step | layer | original layer | score | of unpruned | runner-up |",
              "|---:|---:|---:|---:|---:|---|"]
    orig = dict(zip(doc["removed"], doc["removed_original"]))
    step = 0
    for c in doc["forced"]:
        step += 1
        lines.append(f"| {step} | {c} | {orig[c]} | forced | - | - |")
    for it in doc["iterations"]:
        scores = {int(k): v for k, v in it["scores"].items()}
        others = [c for c in it["ranked"] if c not in it["chosen"]]
        runner = f"{others[0]} ({fmt_cell(scores[others[0]])})" if others else "-"
        for c in it["chosen"]:
            step += 1
            lines.append(f"| {step} | {c} | {orig[c]} | {fmt_cell(scores[c])} | "
                         f"{_pct(it['relative']) if len(it['chosen']) == 1 else '-'} | {runner} |")
    if doc.get("block"):
        lines.append(f"| 1..{len(doc['block'])} | {doc['block']} | {[orig[c] for c in doc['block']]} | "
                     f"{fmt_cell((doc.get('final') or {}).get('score'))} | {_pct((doc.get('final') or {}).get('relative'))} | - |")
    if doc["iterations"]:
        its = doc["iterations"]
        lines += ["", f"## {m} per candidate and iteration (**chosen**)", "",
                  "| layer | " + " | ".join(f"it {it['iteration']}" for it in its) + " |",
                  "|---:|" + "---:|" * len(its)]
        layers = sorted({int(k) for it in its for k in it["scores"]})
        for c in layers:
            cells = []
            for it in its:
                v = it["scores"].get(str(c))
                cell = fmt_cell(v)
                cells.append(f"**{cell}**" if c in it["chosen"] else cell)
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ang = doc.get("block_angular_distance")
    if ang:
        for n, vals in ang.items():
            lines += ["", f"## Angular distance of {n}-layer blocks (unpruned model; lower: the block changes "
                      f"less)", "", "| first layer | distance |", "|---:|---:|"]
            lines += [f"| {k} | {fmt_cell(v)} |" for k, v in vals.items()]
    lines.append("")
    return "\n".join(lines)


def original_index(doc: Mapping[str, Any]) -> Any:
    """Maps a layer index of the scanned model (the keys of ``iterations[*].scores``, ``chosen``,
    ``removed``: indices stay those of the scanned model across iterations) to its index in the original
    model, from ``removed``/``removed_original`` and ``kept``/``kept_original``. A scan of an unpruned
    model maps every index to itself; one of an already pruned model does not."""
    m = dict(zip(list(doc.get("removed") or []) + list(doc.get("kept") or []),
                 list(doc.get("removed_original") or []) + list(doc.get("kept_original") or [])))
    return lambda c: int(m.get(int(c), int(c)))


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Score per candidate and iteration, at the candidates' original layer indices (stars: removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    cmap = plt.get_cmap("viridis", max(2, len(doc["iterations"])))
    orig = original_index(doc)
    for k, it in enumerate(doc["iterations"]):
        cs = sorted((int(c) for c in it["scores"]), key=lambda c: orig(c))
        ax.plot([orig(c) for c in cs], [it["scores"][str(c)] for c in cs], marker="o", ms=3, lw=1, color=cmap(k),
                label=f"iteration {it['iteration']}")
        for c in it["chosen"]:
            ax.plot([orig(c)], [it["scores"][str(c)]], marker="*", ms=12, color=cmap(k), mec="black")
    base = (doc.get("baseline") or {}).get("score")
    if base is not None:
        ax.axhline(base, ls="--", color="grey", lw=1, label="unpruned")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{layer_word(doc)} removed (original layer index)")
    ax.set_ylabel(f"{doc['metric']} ({'higher' if doc['higher_is_better'] else 'lower'} is better)")
    ax.set_title(f"{doc['method']} layer importance ({doc['scorer']}), {doc['n_samples']} dev samples; "
                 f"star = removed")
    if doc["iterations"]:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write(out: Path, doc: Mapping[str, Any]) -> None:
    atomic_write_json(out / RANKING, dict(doc))
    atomic_write_text(out / RANKING_MD, markdown(doc))
    plot(doc, out / PLOT)
