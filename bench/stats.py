"""The benches' statistics, in pure Python (no numpy, nothing of ours): intervals over seeds and over test
images, the verdict rule a claim is decided by, and correlations over seeds. Each is tested against values
computed by hand (test_all.py)."""
import math
import statistics


def t_quantile_975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom (table to 30, then Cornish-Fisher)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    if df <= 30:
        return table[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values):
    """{"per_seed", "mean", "ci95"}: the mean and its 95% Student-t interval (None with one value)."""
    n, m = len(values), statistics.fmean(values)
    if n < 2:
        return {"per_seed": values, "mean": m, "ci95": None}
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"per_seed": values, "mean": m, "ci95": [m - half, m + half]}


def wilson_interval(k, n, z=1.959964):
    """The 95% Wilson score interval of a proportion k/n (an accuracy over n test images)."""
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def verdict(ci95):
    """The claims' rule (CONFIG["claim_rule"] in fashion_mnist.py) for one comparison: the interval above 0,
    below 0, or around it."""
    if ci95 is None:
        return "not shown"
    return "holds" if ci95[0] > 0 else "contradicted" if ci95[1] < 0 else "not shown"


def seeds_to_decide(values, most=1000):
    """What would change a verdict: the fewest seeds at which these values' mean and standard deviation would
    give a 95% t interval that excludes 0 (a projection: more seeds move both). None: the mean is 0, there
    are fewer than two values, or it takes more than `most` seeds."""
    if len(values) < 2 or statistics.fmean(values) == 0:
        return None
    m, sd = abs(statistics.fmean(values)), statistics.stdev(values)
    return next((n for n in range(2, most + 1) if t_quantile_975(n - 1) * sd / math.sqrt(n) < m), None)


def paired(a, b, what):
    """a - b paired by seed: mean difference, its 95% t interval, verdict, and the seeds that would decide it."""
    st = mean_interval([x - y for x, y in zip(a, b)])
    return {"comparison": what, "difference": st["mean"], "ci95": st["ci95"], "per_seed": st["per_seed"],
            "verdict": verdict(st["ci95"]), "seeds_to_decide": seeds_to_decide(st["per_seed"])}


def combine(comparisons):
    """A claim made of several comparisons: holds if all hold, contradicted if any is; the headline
    difference is the least favourable comparison's (a contradicted one, else the smallest lower bound)."""
    verdicts = [c["verdict"] for c in comparisons]
    overall = "holds" if all(v == "holds" for v in verdicts) else "contradicted" if "contradicted" in verdicts \
        else "not shown"
    worst = min(comparisons, key=lambda c: (c["verdict"] != "contradicted", c["ci95"][0] if c["ci95"] else -math.inf))
    return {"verdict": overall, "difference": worst["difference"], "ci95": worst["ci95"],
            "headline": worst["comparison"], "comparisons": comparisons}


def pearson(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def correlation_over_seeds(points, seeds):
    """points: [(seed, x, y)]. Pearson r within each seed (over its models), averaged on Fisher's z scale, with
    the 95% Student-t interval over seeds that every other number here gets, back to r. (A bootstrap over 3 seeds
    cannot give a 95% interval: a resample of one seed three times has probability 1/27, so its percentile
    limits are the extreme seeds' r.) r is None where a seed has fewer than 3 points or no spread."""
    per_seed = []
    for s in seeds:
        xy = [(x, y) for t, x, y in points if t == s]
        per_seed.append(pearson(*zip(*xy)) if len(xy) >= 3 else None)
    if any(r is None for r in per_seed):
        return {"r": None, "ci95": None, "per_seed": per_seed}
    z = mean_interval([math.atanh(max(-0.999999, min(0.999999, r))) for r in per_seed])
    return {"r": math.tanh(z["mean"]), "ci95": [math.tanh(v) for v in z["ci95"]] if z["ci95"] else None,
            "per_seed": per_seed}

