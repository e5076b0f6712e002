"""lr sweeps in `kimi.bench compare` tables: a variant run at several lrs (--optim.lr=X overrides, merged with
--from-runs) is one row per lr, and the final loss against lr is drawn (lr_sweep.png)."""

from __future__ import annotations

from pathlib import Path


def name_by_lr(runs: list[dict]) -> list[dict]:
    """A variant that ran at several lrs (an lr sweep given as --optim.lr=X overrides, merged with
    --from-runs) becomes one variant per lr, `dense_muon@lr0.004`: otherwise its lrs would be averaged as if
    they were seeds. The baseline's names carry their lr already. Returns new dicts; the input is kept."""
    lrs: dict[str, set] = {}
    for r in runs:
        lrs.setdefault(r["variant"], set()).add(r["lr"])
    out = []
    for r in runs:
        if len(lrs[r["variant"]]) > 1 and r["group"] != "nanogpt":
            name = f"{r['variant']}@lr{r['lr']:g}"
            r = {**r, "variant": name, "group": f"{r['group']}@lr{r['lr']:g}"}
        out.append(r)
    return out


def plot_lr_sweep(rows: list[dict], out: Path) -> list[Path]:
    """Whole-split validation loss against lr (log axis), one line per variant swept over 2+ lrs (the nanoGPT
    baseline's --baseline-lrs included), the mean over seeds with its spread as error bars. Nothing when
    no variant was swept."""
    sweeps: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r.get("final_val_loss") is not None:
            base = r["group"].split("@lr")[0]
            sweeps.setdefault(base, []).append((r["lr"], r["final_val_loss"], r.get("final_val_loss_std") or 0.0))
    sweeps = {k: sorted(v) for k, v in sweeps.items() if len({lr for lr, _, _ in v}) > 1}
    if not sweeps:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in sweeps.items():
        lrs, loss, spread = zip(*pts)
        ax.errorbar(lrs, loss, yerr=spread, marker="o", capsize=3, lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss, whole split (end of run)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=90)
    plt.close(fig)
    return [out / "lr_sweep.png"]
