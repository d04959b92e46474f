"""Claim 2 with every PAG source at its own lambda: does "SBG is the most robust source" change when each
source takes the lambda its own validation sweep chooses, and not PAG-CM's?

    python bench/lambda_per_source.py           # after fashion_mnist.py (it reuses that bench's result files)
    python bench/lambda_per_source.py --quick   # smoke run into runs/fashion_mnist_bench_quick/

The claims bench (fashion_mnist.py) sweeps lambda on PAG-CM alone and gives every source the lambda chosen
there. Here PAG-NN, PAG-OI and PAG-SBG are swept too, at the same lambdas and sweep seeds, and each source's
lambda is chosen by the same SELECTION_RULE on its own validation accuracies; the seeds outside the sweep then
train each source at its own lambda (and at the common one, the claims bench's rows, if they are not there).
Claim 2's comparisons (pag-sbg minus each other source, AutoAttack L2 and L-inf, paired by seed, CLAIM_RULE) are
computed at the sources' own lambdas (all seeds, and the seeds outside the sweep alone) and, beside them, at
the common lambda, each with the same pairs' clean accuracy differences; and, to tell a change that comes
from a source from one that comes from its lambda, at each lambda of the sweep with every source at it (the
sweep seeds only: the others have each source at its own and the common lambda alone). Everything else is the claims
bench's: its settings, scripts, result files (a model both benches need is trained once), test images and
denoiser. Writes RESULTS/fashion_mnist_per_source.json (+ .md).
"""
import math
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
import cli  # noqa: E402 - the project's parser
import files  # noqa: E402 - the one atomic writer
import fashion_mnist as fm  # noqa: E402 - the claims bench: settings, rows, rule, result files
from reports import per_source_markdown  # noqa: E402
from runner import git_commit, run_jobs  # noqa: E402
from stats import combine, paired  # noqa: E402

SOURCES = ("pag-cm", "pag-nn", "pag-oi", "pag-sbg")  # the PAG rows that differ only in their ground truth
CLAIM_2 = fm.CLAIMS["2"]


class PerSourceBench(fm.ClaimsBench):
    """The claims bench's sources, each swept and each at the lambda its own sweep chooses."""
    lam_of = None  # source -> its selected lambda (select)

    def __init__(self, cfg, out_dir, results_dir, workers):
        super().__init__(cfg, out_dir, results_dir, workers, {"vanilla", *SOURCES})

    def select(self):
        """SELECTION_RULE on each source's own sweep (every sweep seed), against the same vanilla."""
        val, self.lam_of = {}, {}
        for src in SOURCES:
            val[src], self.lam_of[src] = self.choose_lambda(src)
        return val

    def run(self):
        """The plan: vanilla and every source at every lambda at the sweep seeds, the selection, then each source at
        its own lambda at the other seeds (the SBG fields first, as every model's alignment needs them)."""
        sweep_seeds, lambdas = self.cfg["sweep_seeds"], self.cfg["lambdas"]
        jobs, needs, cost = {"sbg": self.sbg_job}, {}, {"sbg": math.inf}

        def add(model, seed, lam, after):
            """One job; lam "own" or "common": known once "select" ran."""
            name = f"{model}{f' lambda {lam:g}' if isinstance(lam, float) else f' {lam}' if lam else ''} seed {seed}"
            value = lambda: self.lam_of[model] if lam == "own" else self.lam_of["pag-cm"] if lam == "common" else lam  # noqa: E731
            jobs[name] = lambda: self.train_and_attack(model, seed, value())
            needs[name] = after | ({"sbg"} if model == "pag-sbg" else set())
            cost[name] = fm.COST[model]
            return name
        sweep = {add("vanilla", s, None, set()) for s in sweep_seeds}
        sweep |= {add(src, s, lam, set()) for src in SOURCES for s in sweep_seeds for lam in lambdas}
        jobs["select"], needs["select"], cost["select"] = self.select, sweep, math.inf
        for name in sweep:  # every later row waits for the selection: its inputs go first
            cost[name] += 100
        for s in [s for s in self.cfg["seeds"] if s not in sweep_seeds]:
            for src in SOURCES:  # at the common lambda too (the claims bench's rows: there if it ran)
                own = add(src, s, "own", {"select"})
                add(src, s, "common", {"select", own})  # after: where both lambdas are one, one model, trained once
        return run_jobs(jobs, needs, self.workers, cost)

    def assemble(self, wall):
        """Each source's row at its own lambda and at the common one (PAG-CM's choice, the claims bench's), and
        claim 2 at both, from the result files alone."""
        seeds, lambdas = self.cfg["seeds"], self.cfg["lambdas"]
        val = self.select()
        common = self.lam_of["pag-cm"]  # the claims bench's rule on PAG-CM's sweep: its selected lambda
        at = {"own": self.lam_of, "common": {src: common for src in SOURCES}}
        results = {how: {src: [self.read_result(self.key(src, s, lam_of[src])) for s in seeds] for src in SOURCES}
                   for how, lam_of in at.items()}
        rows = {how: {src: fm.row_stats(rs) for src, rs in res.items()} for how, res in results.items()}
        claim = {how: claim_2(res, at[how]) for how, res in results.items()}
        # The seeds whose validation accuracies did not choose the lambdas, alone (where there are two or more).
        sweep_seeds = self.cfg["sweep_seeds"]
        unswept = [i for i, s in enumerate(seeds) if s not in sweep_seeds]
        if len(unswept) >= 2:
            claim["own_unswept_seeds"] = {**claim_2({src: [rs[i] for i in unswept] for src, rs in results["own"].items()},
                                                    self.lam_of), "seeds": [seeds[i] for i in unswept]}
        # Is a change the source's or its lambda's? Claim 2 with every source at one lambda, each lambda of the
        # sweep in turn: only the sweep seeds have every source at every lambda.
        at_each = {str(lam): claim_2({src: [self.read_result(self.key(src, s, lam)) for s in sweep_seeds]
                                      for src in SOURCES}, dict.fromkeys(SOURCES, lam)) for lam in lambdas}
        config = {**self.cfg, "sources": list(SOURCES), "selected_lambda": dict(self.lam_of), "common_lambda": common,
                  "validation_clean_acc": {src: {str(k): v for k, v in v_src.items()} for src, v_src in val.items()},
                  "wall_minutes_this_call": round(wall / 60, 1),
                  "assembled_at_commit": git_commit()}  # each result file names the commit that made its model
        out = {"config": config, "seeds": seeds, "rows": rows, "claim_2": claim,
               "claim_2_at_each_sweep_lambda": {"seeds": sweep_seeds, "by_lambda": at_each}}
        path = os.path.join(self.results_dir, "fashion_mnist_per_source.json")
        files.write_json(out, path)
        md = per_source_markdown(rows, claim, config, lambdas, out["claim_2_at_each_sweep_lambda"])
        md_path = os.path.join(self.results_dir, "fashion_mnist_per_source.md")
        files.atomic_write(md_path, text=md)
        print(md)
        for f in (path, md_path):
            print(f"wrote {os.path.relpath(f)}")
        return out


def claim_2(results, lam_of):
    """Claim 2 (pag-sbg minus each other source, AutoAttack L2 and L-inf, paired by seed) on results
    {source: [result of each seed]}, each source's at the lambda lam_of[source]; beside it (not in the verdict)
    the same pairs' clean accuracy differences, the price of the robustness."""
    per_seed = {src: {m: [r[m] for r in rs] for m in ("clean", "aa_l2", "aa_linf")} for src, rs in results.items()}

    def pairs(metrics):
        return [paired(per_seed[a][m], per_seed[b][m], f"{a} (λ {lam_of[a]:g}) - {b} (λ {lam_of[b]:g}), {m}")
                for a, b in CLAIM_2[1] for m in metrics]
    side = {"holds": "above 0", "contradicted": "below 0", "not shown": "not separated from 0"}  # not a claim
    clean = [{**c, "verdict": side[c["verdict"]]} for c in pairs(("clean",))]
    return {**combine(pairs(("aa_l2", "aa_linf"))), "claim": CLAIM_2[0], "clean": clean}


def main(argv=None):
    cfg, out_dir, results_dir, args = fm.parse(argv, __doc__, rows=False)
    bench = PerSourceBench(cfg, out_dir, results_dir, args.jobs)
    return bench.assemble(bench.run())


if __name__ == "__main__":
    cli.run_cli(main)
