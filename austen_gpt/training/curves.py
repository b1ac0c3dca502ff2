"""The training curves as one picture a person can open: <check-dir>/logs/curves.png, rewritten at each validation.

Panels: the training loss (raw and smoothed) with the validation loss and its best point; the learning
rate; when the run measures style (--eval-style, self-play), P(author), distinguishability from held-out
text and the share of copied word 8-grams; and with self-play, the chosen and rejected continuations'
log-probabilities per token and their margin (in nats, against the round's reference).
Drawn from the run's own metrics.jsonl records, so a resumed run draws the whole run.
"""

from __future__ import annotations

import os
from pathlib import Path


def smoothed(values: list[float]) -> list[float]:
    """A centred running mean over about a twentieth of the run: no lag behind the raw curve."""
    half = len(values) // 40
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(records: list[dict], path: Path, best_step: int | None = None) -> None:
    """Write the curves of `records` (metrics.jsonl lines) to `path`, atomically (a reader never sees half a file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = any("style_p_author" in r for r in records)
    pairs = any("self_play_margin" in r for r in records)
    panels = 2 + style + pairs
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    loss_axis, lr_axis = axes[0], axes[1]

    steps, losses = series(records, "train_loss")
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (raw)")
    loss_axis.plot(steps, smoothed(losses), color="tab:blue", label="train (smoothed)")
    val_steps, val_losses = series(records, "val_loss")
    loss_axis.plot(val_steps, val_losses, "o-", color="tab:orange", label="validation")
    if best_step in val_steps:
        best = val_losses[len(val_steps) - 1 - val_steps[::-1].index(best_step)]
        loss_axis.plot([best_step], [best], "*", color="tab:red", markersize=16, label=f"best (step {best_step})")
    loss_axis.set(title="loss (nats per token)", xlabel="optimizer step")
    loss_axis.legend(fontsize=8)

    lr_axis.plot(*series(records, "train_lr"), color="tab:green")
    lr_axis.set(title="learning rate", xlabel="optimizer step")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))

    if style:
        style_axis = axes[2]
        style_axis.plot(*series(records, "style_p_author"), "o-", color="tab:purple", label="P(author)")
        copy_steps, copied = series(records, "style_copied_8grams")
        style_axis.plot(copy_steps, copied, "s-", color="tab:brown", label="copied 8-grams (share)")
        if any("style_distinguishability" in r for r in records):
            told_apart = series(records, "style_distinguishability")
            style_axis.plot(*told_apart, "^-", color="tab:gray", label="distinguishability (0.5 passes)")
        style_axis.set(title="style of the samples", xlabel="optimizer step", ylim=(-0.02, 1.02))
        style_axis.legend(fontsize=8)

    if pairs:
        pair_axis, margin_axis = axes[-1], axes[-1].twinx()
        pair_axis.plot(*series(records, "self_play_chosen_logp"), color="tab:green", label="chosen (author's)")
        pair_axis.plot(*series(records, "self_play_rejected_logp"), color="tab:red", label="rejected (model's)")
        margin_axis.plot(*series(records, "self_play_margin"), ":", color="black", label="margin (right axis)")
        pair_axis.set(title="self-play pairs: log-prob per token", xlabel="optimizer step")
        handles = [h for axis in (pair_axis, margin_axis) for h in axis.get_legend_handles_labels()[0]]
        pair_axis.legend(handles=handles, fontsize=8)

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
