"""The benches' reports, from their numbers alone: the claims bench's tables (.md) and figures, and the
paper table's table beside the paper's numbers. Nothing here computes a number; it writes them down."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import files  # noqa: E402 - the one atomic writer


# ----------------------------------------------------------------------------- the claims benches (fashion_mnist.py, cifar10.py)
def eps_label(eps):
    """A radius as a reader knows it: 8/255 for 8/255 (a few 8-bit steps of images in [0, 1]), 0.1 for 0.1."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 and 1 <= round(steps) <= 16 else f"{eps:g}"


def data_label(config):
    """What a claims bench ran on, for its tables and figures (the claims bench's config predates the key)."""
    return config.get("data_label", "Fashion-MNIST")


def fmt(st, pct=True):
    """mean [lo, hi] of a metric entry."""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(st['mean'])} [{f(st['ci95'][0])}, {f(st['ci95'][1])}]" if st["ci95"] else f(st["mean"])


def comparison_row(k, c, scale, f, n):
    """One comparison as a table row: claim, what, per seed, difference [interval], verdict, seeds to decide."""
    num = lambda v: "n/a" if v is None else f"{scale * v:+.{f}f}"  # noqa: E731
    ci = f"[{num(c['ci95'][0])}, {num(c['ci95'][1])}]" if c["ci95"] else "n/a"
    return (f"| {k} | {c['comparison']} | {', '.join(num(v) for v in c['per_seed'])} | {num(c['difference'])} {ci} | "
            f"{c['verdict']} | {n} |")


def seeds_to_decide_cell(c):
    """The *seeds to decide* cell of a paired comparison."""
    n = c["seeds_to_decide"]
    return n if n is not None else "> 1000" if c["difference"] else "never"


def claims_markdown(rows, lambda_rows, found, config, reference=None):
    """<bench>_seeds.md: the rows, the λ sweep, the claims, and every comparison with the seeds that would decide it.
    reference: row -> the paper's (L2, L-inf) robust accuracies in %, shown beside each row (a reference, never a pass mark)."""
    n = len(config["seeds"])
    sweep_seeds = ", ".join(map(str, config["sweep_seeds"]))
    ref_head, ref_rule = (" paper L2 / L∞ |", "---|") if reference else ("", "")
    lines = [f"{data_label(config)}, {config.get('arch', 'cnn')}, {config['train_samples']} training images, "
             f"{config['epochs']} epochs, {n} seeds "
             f"({', '.join(map(str, config['seeds']))}); "
             + ("no PAG row" if config["selected_lambda"] is None else f"lambda {config['selected_lambda']:g} chosen on the "
                                                                       f"validation split of seeds {sweep_seeds}")
             + f"; {config['test_samples']} test images. Mean [95% t interval over seeds], accuracies in %.", "",
             f"| model | clean | {config['attack']} L2 {config['eps_l2']:g} | L∞ {eps_label(config['eps_linf'])} | "
             f"align NN (test) | align SBG (test) |{ref_head}", f"|---|---|---|---|---|---|{ref_rule}"]
    for m, r in rows.items():
        ref = ""
        if reference:
            ref = " {:.2f} / {:.2f} |".format(*reference[m]) if m in reference else " – |"
        lines.append(f"| {m} | {fmt(r['clean'])} | {fmt(r['aa_l2'])} | {fmt(r['aa_linf'])} | "
                     f"{fmt(r['align_nn'], False)} | {fmt(r['align_sbg'], False)} |{ref}")
    if reference:
        lines += ["", f"*paper*: {config['reference']}."]
    lines += ["", f"λ sweep (PAG-CM, seeds {sweep_seeds}):", "", "| λ | validation clean | clean | AA L2 | AA L∞ | align SBG (test) |",
              "|---|---|---|---|---|---|"]
    for lam, r in lambda_rows.items():
        lines.append(f"| {lam} | {fmt(r['val_acc'])} | {fmt(r['clean'])} | {fmt(r['aa_l2'])} | {fmt(r['aa_linf'])} | "
                     f"{fmt(r['align_sbg'], False)} |")
    lines += ["", f"Claims ({config['claim_rule']}):", "", "| claim | verdict | headline | difference [95% interval] |",
              "|---|---|---|---|"]
    for k in ("1", "2", "3", "4"):
        c = found[k]
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else "n/a"
        value = f"{c['difference']:+.3f} {ci}" if c["difference"] is not None else "n/a"
        lines.append(f"| {k}: {c['claim']} | **{c['verdict']}** | {c.get('headline', 'Pearson r' if k == '3' else '')} | {value} |")
    lines += ["", "Every comparison (claims 1, 2, 4: a − b in points, paired by seed; claim 3: within-seed Pearson r, "
              "its interval on Fisher's z scale; *seeds to decide*: the fewest seeds at which this mean difference and "
              "spread would give an interval that excludes 0, a projection, not a promise):", "",
              "| claim | comparison | per seed | difference [95% interval] | verdict | seeds to decide |",
              "|---|---|---|---|---|---|"]

    row = comparison_row
    for k in ("1", "2", "3", "4"):
        for c in found[k].get("comparisons", []):
            if k == "3":
                lines.append(row(k, c, 1, 2, "—"))
                continue
            lines.append(row(k, c, 100, 1, seeds_to_decide_cell(c)))
    for c in found["3"].get("with_own_rows", {}).values():
        lines.append(row("3 (not in the verdict)", c, 1, 2, "—"))
    fuller = found["3"].get("with_lambda_sweep")  # the sweep seeds only, their sweep's models in
    for c in [*fuller.get("comparisons", []), *fuller.get("with_own_rows", {}).values()] if fuller else []:
        lines.append(row(f"3 (seeds {sweep_seeds} with the λ sweep, not in the verdict)", c, 1, 2, "—"))
    return "\n".join(lines) + "\n"


def per_source_markdown(rows, claim, config, lambdas, at_each):
    """fashion_mnist_per_source.md (lambda_per_source.py): each source's sweep and choice, its rows at its own λ and
    at the common one, and claim 2 at both with every comparison."""
    val, own = config["validation_clean_acc"], config["selected_lambda"]
    mean = lambda v: f"{100 * sum(v) / len(v):.1f}"  # noqa: E731
    lines = [f"Claim 2 with each PAG source at its own λ. Fashion-MNIST, cnn, {config['train_samples']} training images, "
             f"{config['epochs']} epochs, {len(config['seeds'])} seeds ({', '.join(map(str, config['seeds']))}); each λ "
             f"chosen on the validation split of seeds {', '.join(map(str, config['sweep_seeds']))} by the claims bench's "
             f"rule ({config['selection_rule']}); {config['test_samples']} test images. Mean [95% t interval over seeds], "
             "accuracies in %.", "",
             f"Validation clean accuracy of each source's sweep (mean over the sweep seeds; vanilla "
             f"{mean(next(iter(val.values()))['vanilla'])}); the selected λ in bold:", "",
             "| source | " + " | ".join(f"λ {lam:g}" for lam in lambdas) + " | selected λ |",
             "|---|" + "---|" * (len(lambdas) + 1)]
    for src, v in val.items():
        cells = [f"**{mean(v[str(lam)])}**" if lam == own[src] else mean(v[str(lam)]) for lam in lambdas]
        lines.append(f"| {src} | " + " | ".join(cells) + f" | {own[src]:g} |")
    lines += ["", f"| source | λ | clean | {config['attack']} L2 {config['eps_l2']:g} | L∞ {eps_label(config['eps_linf'])} | "
                  "align NN (test) | align SBG (test) |", "|---|---|---|---|---|---|---|"]
    for how in ("own", "common"):
        for src, r in rows[how].items():
            lam = own[src] if how == "own" else config["common_lambda"]
            lines.append(f"| {src} | {lam:g} ({how}) | {fmt(r['clean'])} | {fmt(r['aa_l2'])} | {fmt(r['aa_linf'])} | "
                         f"{fmt(r['align_nn'], False)} | {fmt(r['align_sbg'], False)} |")
    lines += ["", f"Claim 2, {claim['own']['claim']} ({config['claim_rule']}):", "",
              "| λ | verdict | headline | difference [95% interval] |", "|---|---|---|---|"]
    unswept = ", ".join(map(str, claim.get("own_unswept_seeds", {}).get("seeds", [])))
    label = {"own": "each source its own", "common": f"common, {config['common_lambda']:g} (PAG-CM's)",
             "own_unswept_seeds": f"each source its own, seeds {unswept} only (those that did not choose λ)"}
    short = {"own": "own", "common": "common", "own_unswept_seeds": f"own, seeds {unswept}"}
    for how, c in claim.items():
        lines.append(f"| {label[how]} | **{c['verdict']}** | {c['headline']} | {100 * c['difference']:+.1f} "
                     f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] |")
    every = "| λ | comparison | per seed | difference [95% interval] | verdict | seeds to decide |", "|---|---|---|---|---|---|"
    lines += ["", "Every comparison (a − b in points, paired by seed); the clean rows are the price, not part of the claim:",
              "", *every]
    for how, c in claim.items():
        lines += [comparison_row(short[how], x, 100, 1, seeds_to_decide_cell(x)) for x in c["comparisons"] + c["clean"]]
    seeds = ", ".join(map(str, at_each["seeds"]))
    lines += ["", f"Claim 2 with every source at the same λ, each λ of the sweep (seeds {seeds} only, the sweep seeds: "
                  "whether a change comes from the sources or from their λs; clean rows as above):", "", *every]
    for lam in lambdas:
        c = at_each["by_lambda"][str(lam)]
        lines += [comparison_row(f"{lam:g} (claim: {c['verdict']})", x, 100, 1, seeds_to_decide_cell(x))
                  for x in c["comparisons"] + c["clean"]]
    return "\n".join(lines) + "\n"


def claims_figures(rows, lambda_rows, points, others, claim3, config, out_dir, models, pag_rows, name="fashion_mnist"):
    """The trade-off (every row, mean and interval; the sweep as a line) and alignment vs robustness (claim 3's
    points, and the models outside it drawn hollow for comparison). One colour per model of `models` in both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(models)}
    attack = f"{config['attack'].split(' (')[0]} L2 ε={config['eps_l2']:g}"
    lam_sel = config["selected_lambda"]

    def err(st):
        m = st["mean"] * 100
        return m, ([[m - st["ci95"][0] * 100], [st["ci95"][1] * 100 - m]] if st["ci95"] else None)
    fig, ax = plt.subplots(figsize=(8, 5.8))
    for m, r in rows.items():
        (x, xe), (y, ye) = err(r["clean"]), err(r["aa_l2"])
        label = f"{m} (λ={lam_sel:g}, from the PAG-CM sweep)" if m in pag_rows else m
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, color=colour[m], label=label)
    sweep = [(float(lam), err(r["clean"])[0], err(r["aa_l2"])[0]) for lam, r in lambda_rows.items()]
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "k--", lw=1,
            label=f"PAG-CM λ sweep (means only, seeds {', '.join(map(str, config['sweep_seeds']))})")
    for lam, x, y in sweep:
        if lam != lam_sel:  # the selected point is the pag-cm row's marker
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set(xlabel=f"clean accuracy (%), {config['test_samples']} test images",
           ylabel=f"robust accuracy (%), {attack}",
           title=f"{data_label(config)} {config.get('arch', 'cnn')}: clean vs robust, mean and 95% interval over "
                 f"{len(config['seeds'])} seeds\n(unpaired bars: paired differences are in {name}_seeds.md)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, f"{name}_tradeoff.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    lam_markers = iter("v^sPX")
    marker = {lam: "o" if lam == lam_sel else next(lam_markers) for lam in sorted({p["lambda"] for p in points})}
    # Seeds outside the sweep: the verdict's r is over the rows at the selected λ; the sweep's other λs (its seeds
    # only) are drawn, and said to be outside it.
    sweep_apart = "with_lambda_sweep" in claim3
    for m, lam in sorted({(p["model"], p["lambda"]) for p in points}, key=str):
        pts = [p for p in points if p["model"] == m and p["lambda"] == lam]
        apart = sweep_apart and lam != lam_sel
        ax.scatter([p["align_sbg"] for p in pts], [100 * p["aa_l2"] for p in pts], color=colour[m], marker=marker[lam],
                   label=f"{m} λ={lam:g}" + (" (trained on these fields' denoiser)" if m == "pag-sbg" else "")
                   + (f" (seeds {', '.join(map(str, config['sweep_seeds']))}; not in r)" if apart else ""))
    for j, m in enumerate(sorted({p["model"] for p in others})):  # outside the correlation
        pts = [p for p in others if p["model"] == m]
        ax.scatter([p["align_sbg"] for p in pts], [100 * p["aa_l2"] for p in pts], marker="os^Dv"[j % 5],
                   facecolors="none", edgecolors=colour[m], label=f"{m} (not in r)")
    without = next((c for c in claim3.get("comparisons", []) if c["measure"] == "align_sbg"), None)
    show = lambda c: "n/a" if c is None or c["difference"] is None else (  # noqa: E731
        f"{c['difference']:.2f}" + (f" [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if c["ci95"] else "")
        + f" ({c['points'] // len(c['per_seed'])} models/seed)")  # few models a seed: an r of 3 points is often near ±1
    ax.set(xlabel="held-out alignment: mean cos to SBG fields of the test images",
           ylabel=f"robust accuracy (%), {attack}",
           title="alignment vs robustness, one point per model and seed; within-seed r, mean [95% interval]:\n"
                 + (f"PAG rows at λ={lam_sel:g} " if sweep_apart and lam_sel is not None else "PAG models ")
                 + f"{show(claim3.get('with_own_rows', {}).get('align_sbg'))};\nwithout pag-sbg {show(without)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, f"{name}_alignment.png"), dpi=110)
    plt.close(fig)



# ----------------------------------------------------------------------------- natural images (cifar10.py)
def natural_images_notes(cfg, sweep, standard):
    """What cifar10.py adds below the claims tables: the SBG denoiser's sweep (the noise level it chose) and the
    standard AutoAttack check beside the same model's APGD numbers."""
    lines = ["", "SBG ground truth: a class-conditional denoiser trained by `sbg.py train` on the same training images "
             f"({cfg['sbg']['epochs']} epochs, seed {cfg['sbg']['seed']}), fields exported at the noise level of the largest "
             "gap in `sbg.py sweep` (gap = consistency of a field over two noise draws minus the larger of its cosine "
             "with other images' fields for the same class and with the same image's fields for other classes):", ""]
    if sweep:
        lines += ["| timestep | ᾱ | consistency | cross-image | cross-class | gap |", "|---|---|---|---|---|---|"]
        for r in sweep["rows"]:
            best = " **(chosen)**" if r["timestep"] == sweep["best_timestep"] else ""
            lines.append(f"| {r['timestep']}{best} | {r['alpha_bar']:.3f} | {r['consistency']:.3f} | {r['cross_image']:.3f} | "
                         f"{r['cross_class']:.3f} | {r['gap']:.3f} |")
    else:
        lines.append("(no sweep yet)")
    lines += ["", "Is APGD-CE + APGD-T enough? Standard AutoAttack (FAB-T and the gradient-free Square added) on one model:", ""]
    if standard:
        a, s = standard["apgd"], standard["standard"]
        lines += ["| model | attack | clean | L2 | L∞ |", "|---|---|---|---|---|",
                  f"| {standard['model']} λ {standard['lambda']:g} seed {standard['seed']} | APGD-CE + APGD-T | "
                  f"{100 * a['clean']:.1f} | {100 * a['aa_l2']:.1f} | {100 * a['aa_linf']:.1f} |",
                  f"| (same checkpoint, sha256 {standard['checkpoint_sha256'][:12]}…) | standard AutoAttack | "
                  f"{100 * s['clean']:.1f} | {100 * s['aa_l2']:.1f} | {100 * s['aa_linf']:.1f} |"]
    else:
        lines.append("(not run yet)")
    return "\n".join(lines) + "\n"


def budget_markdown(out):
    """<name>_budget.md: each model at each budget (training images x epochs), one seed."""
    c = out["config"]
    lines = [f"{c['data_label']}, {c['arch']}, seed {c['budget_seed']}, PAG-CM at λ {c['selected_lambda']:g} (the main "
             f"bench's choice); {c['test_samples']} test images, {c['attack']}, L2 {c['eps_l2']:g}, L∞ {eps_label(c['eps_linf'])}. "
             "Accuracies in %; one seed: a direction, not an interval.", "",
             "| training images | epochs | model | clean | AA L2 | AA L∞ | align NN (test) | train minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for p in out["points"]:
        lines.append(f"| {p['train_samples']} | {p['epochs']} | {p['model']} | {100 * p['clean']:.1f} | {100 * p['aa_l2']:.1f} | "
                     f"{100 * p['aa_linf']:.1f} | {p['align_nn']:.3f} | {p['train_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def budget_figure(out, path):
    """Top: clean and robust accuracy against the images a model saw in training, one line per model. Bottom (where
    the points keep their per-epoch logs): each run's validation accuracy, its per-epoch PGD check and PAG-CM's PAG
    term against the images seen so far, one colour per budget: where along a run robustness is won or lost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = out["config"]
    curves = [p for p in out["points"] if p.get("per_epoch")]
    fig, axes = plt.subplots(2 if curves else 1, 3, figsize=(13, 8 if curves else 4), squeeze=False)
    label = lambda model: model + (f" (λ {c['selected_lambda']:g})" if model != "vanilla" else "")  # noqa: E731
    for model in c["budget_rows"]:
        pts = sorted((p for p in out["points"] if p["model"] == model), key=lambda p: p["images_seen"])
        for ax, m in zip(axes[0], ("clean", "aa_l2", "aa_linf")):
            ax.plot([p["images_seen"] for p in pts], [100 * p[m] for p in pts], "o-", label=label(model))
    names = {"clean": "clean accuracy (%)", "aa_l2": f"AutoAttack L2 ε={c['eps_l2']:g} (%)",
             "aa_linf": f"AutoAttack L∞ ε={eps_label(c['eps_linf'])} (%)"}
    ticks = sorted({(p["images_seen"], p["train_samples"], p["epochs"]) for p in out["points"]})
    for ax, m in zip(axes[0], names):
        ax.set(xscale="log", xlabel="images seen in training (training images x epochs)", ylabel=f"test: {names[m]}")
        ax.set_xticks([t[0] for t in ticks], [f"{n / 1000:g}k x {e}" for _, n, e in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if curves:
        budgets = sorted({(p["train_samples"], p["epochs"]) for p in curves})
        colour = {b: f"C{i + 2}" for i, b in enumerate(budgets)}  # C0, C1: the models above
        for p in curves:
            b, style = (p["train_samples"], p["epochs"]), "--" if p["model"] == "vanilla" else "-"
            seen = [e["epoch"] * p["train_samples"] for e in p["per_epoch"]]
            name = f"{p['model']}, {b[0] // 1000}k x {b[1]}"
            for ax, m in zip(axes[1], ("val_acc", "val_pgd_l2_acc", "pag")):
                ys = [e[m] for e in p["per_epoch"]]
                if all(y is not None for y in ys) and (m != "pag" or p["model"] != "vanilla"):
                    ax.plot(seen, [100 * y if m != "pag" else y for y in ys], style, color=colour[b], marker=".", label=name)
        for ax, y in zip(axes[1], (f"validation accuracy after each epoch (%, {c['val_samples']} images)",
                                   f"validation PGD-L2 ε={c['eps_l2']:g}: short per-epoch check (%)",
                                   "PAG term in training (mean 1 − cos; lower: more aligned)")):
            ax.set(xlabel="images seen so far (epoch x training images)", ylabel=y)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, handlelength=4)  # long enough to show the dashes
    budgets = ", ".join(f"{n // 1000}k x {e}" for n, e in c["budgets"])
    fig.suptitle(f"{c['data_label']}, {c['arch']}, seed {c['budget_seed']}: more images and epochs ({budgets}); "
                 f"{c['test_samples']} test images" + ("\ntop: each model at the end of training; bottom: each run along its "
                                                       "epochs (colour: budget; dashed: vanilla, solid: PAG-CM)" if curves else ""),
                 fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the paper's Table 1 (paper_table.py)
def paper_table_markdown(cfg, config, rows, missing, paper):
    """The table: each measured accuracy with its 95% interval (test sampling) beside the paper's number, the
    lambda of both, and which SBG fields a row was trained on; no row is judged by its interval (one training
    seed moves a row by more: config["seed_spread"]). paper: the paper's numbers for this dataset (row -> its
    entry of PAPER_TABLE_1)."""
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    ci = lambda r, m: f"{pct(r[m])} [{pct(r['ci95'][m][0])}, {pct(r['ci95'][m][1])}]"  # noqa: E731
    lam = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
    counts = sorted({r["eval_samples"] for r in rows.values()})
    lines = [f"{cfg['dataset']}, {' / '.join(map(str, counts)) or cfg['test_samples']} test images attacked (the first "
             f"N), {config['attack']}; L2 ε = {cfg['eps_l2']:g}, L∞ ε = {eps_label(cfg['eps_linf'])}. Each accuracy in % with its "
             f"{config['interval']}. The paper's number stands beside each row for reference: {config['seed_spread']}. "
             f"Paper: {config['paper_source']}.",
             "", "| row | weights | λ | paper λ | clean | AA L2 | paper | AA L∞ | paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, r in rows.items():
        lines.append(f"| {row} | {r['weights']} | {lam(r['lambda'])} | {lam(r['paper_lambda'])} | {ci(r, 'clean')} | "
                     f"{ci(r, 'aa_l2')} | {pct(r['paper_aa_l2'])} | {ci(r, 'aa_linf')} | {pct(r['paper_aa_linf'])} |")
    notes = [f"- paper λ of {row}: {paper[row].get('basis')}" for row in rows if paper.get(row)]
    for row, r in rows.items():
        f = r.get("sbg_fields")
        if f:
            made = (f"sbg.py export (denoiser sha256 {str(f['denoiser_sha256'])[:12]}…, timestep {f['timestep']}, "
                    f"{f['noise_draws']} noise draws)" if f["made_by"] == "sbg.py export" else f["made_by"])
            notes.append(f"- SBG fields of {row}: {made}; file sha256 {f['sha256'][:12]}…")
    lines += ["", *notes] if notes else []
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"
