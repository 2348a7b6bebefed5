"""Base against fine-tuned on the same exam questions: per-question outcomes, the paired test, table and chart.

The two models answer the same questions, so the right test is paired: McNemar's exact test counts only the
questions where they disagree (b: base right and fine-tuned wrong, c: the reverse) and asks how likely a split
at least this uneven is if either model were equally likely to win each of them (a fair coin, b + c tosses).
"""
import math

from medsft.console import markdown_table

INVALID = "[invalid]"  # what eval_tasks/utils.read_letters gives for a reply with no readable answer
BOOTSTRAP_ITERATIONS = 2000

# Published figures of ANOTHER model, for scale: HuatuoGPT-o1-7B-zh, arXiv 2412.18925 (Table 4), accuracy in %.
REFERENCE = {"model": "HuatuoGPT-o1-7B-zh", "source": "arXiv 2412.18925, Table 4",
             "accuracy": {"MedQA-MCMLE": 79.8, "CMB-Exam": 73.0, "CMExam": 74.1, "CMMLU-Med": 74.5}}


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def task_outcomes(result: dict, task: str, count_tokens=None, max_new_tokens: int = 0, thinking: bool = False) -> dict:
    """One model's result on one task: n, accuracy, its standard error and every question's outcome.

    For generated answers each outcome also has the letter read, whether no letter was found, and whether the
    reply was cut off (no </think> when thinking, or max_new_tokens reached); both count as wrong.
    """
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    metric, filter_name = samples[0]["metrics"][0], samples[0]["filter"]
    values = result["results"][task]
    outcomes = []
    for sample in samples:
        outcome = {"doc_id": sample["doc_id"], "correct": int(sample[metric] > 0)}
        outcome |= {key: sample["doc"][key] for key in ("id", "line", "subject") if sample["doc"].get(key)}
        outcome["multi"] = len(str(sample["doc"].get("answer", "X"))) > 1
        if isinstance(sample["filtered_resps"][0], str):  # a generated answer
            reply, letter = sample["resps"][0][0], sample["filtered_resps"][0]
            cut = (thinking and "</think>" not in reply) or bool(
                count_tokens and max_new_tokens and count_tokens(reply) >= max_new_tokens)
            outcome |= {"answer": None if letter == INVALID else letter, "target": sample["target"],
                        "cut_off": cut, "no_letter": letter == INVALID and not cut}
        outcomes.append(outcome)
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    return {"metric": metric, "filter": filter_name, "n": len(outcomes), "acc": values[f"{metric},{filter_name}"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None, "outcomes": outcomes}


def group_outcomes(result: dict, group: str, members: dict) -> dict:
    """A group's pooled result: its subtasks' outcomes ({task: result}) together, each naming its task, with
    lm-eval's size-weighted accuracy and stderr."""
    first = next(iter(members.values()))
    metric, filter_name = first["metric"], first["filter"]
    values = result["results"].get(group, {})
    outcomes = [{"task": task} | o for task, member in members.items() for o in member["outcomes"]]
    n = len(outcomes)
    acc = values.get(f"{metric},{filter_name}", sum(o["correct"] for o in outcomes) / n)
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    return {"metric": metric, "filter": filter_name, "n": n, "acc": acc,
            "stderr": stderr if isinstance(stderr, (int, float)) else None, "outcomes": outcomes}


def compare_task(base: dict, tuned: dict, seed: int = 0) -> dict:
    """The paired comparison of one task: Δ accuracy, its bootstrap 95% interval and McNemar's exact p on the
    per-question outcomes."""
    pairs = list(zip(base["outcomes"], tuned["outcomes"], strict=True))
    if any((a["doc_id"], a.get("task")) != (b["doc_id"], b.get("task")) for a, b in pairs):
        raise RuntimeError("the two passes did not answer the same questions")
    b = sum(1 for x, y in pairs if x["correct"] and not y["correct"])
    c = sum(1 for x, y in pairs if y["correct"] and not x["correct"])
    return {"n": base["n"], "delta": tuned["acc"] - base["acc"], "base_only_right": b, "finetuned_only_right": c,
            "mcnemar_p": mcnemar_exact_p(b, c),
            "interval95": bootstrap_intervals([x["correct"] for x, _ in pairs], [y["correct"] for _, y in pairs], seed)}


def bootstrap_intervals(base: list, tuned: list, seed: int, iterations: int = BOOTSTRAP_ITERATIONS) -> dict:
    """95% percentile intervals of each accuracy and of the paired difference (fine-tuned - base), resampling
    the questions (the same draw for both models, so the pairing is kept)."""
    import numpy as np

    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if len(base) == 0:
        return {"base": None, "finetuned": None, "delta": None}
    draws = np.random.default_rng(seed).integers(0, len(base), size=(iterations, len(base)))
    means = {"base": base[draws].mean(axis=1), "finetuned": tuned[draws].mean(axis=1)}
    means["delta"] = means["finetuned"] - means["base"]
    return {key: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for key, v in means.items()}


def exam_summaries(tasks: dict, exams: dict, seed: int = 0) -> dict:
    """One entry per exam (its tasks' outcomes pooled: CMMLU-Med's subjects are one exam): n, each model's
    accuracy with its interval, single- and multiple-answer accuracy, unparsed share and accuracy by subject;
    Δ with its interval and McNemar's p."""
    summaries = {}
    for exam in dict.fromkeys(exams.values()):
        members = [t for t in tasks if exams.get(t) == exam and tasks[t].get("source") != "group"]
        if not members:
            continue
        sides = {key: [o | {"subject": o.get("subject") or t} for t in members for o in tasks[t][key]["outcomes"]]
                 for key in ("base", "finetuned")}
        paired = compare_task({"n": len(sides["base"]), "acc": _mean(sides["base"]), "outcomes": sides["base"]},
                              {"n": len(sides["finetuned"]), "acc": _mean(sides["finetuned"]),
                               "outcomes": sides["finetuned"]}, seed)
        entry = {"tasks": members, **paired}
        for key, outcomes in sides.items():
            subjects = sorted({o["subject"] for o in outcomes})
            entry[key] = {"acc": _mean(outcomes), "interval95": paired["interval95"][key],
                          "single_acc": _mean([o for o in outcomes if not o["multi"]]),
                          "multi_acc": _mean([o for o in outcomes if o["multi"]]),
                          "n_multi": sum(o["multi"] for o in outcomes),
                          "unparsed": _share(outcomes, lambda o: o["answer"] is None)
                          if all("answer" in o for o in outcomes) else None,  # loglikelihood reads no reply
                          "by_subject": {s: {"n": sum(o["subject"] == s for o in outcomes),
                                             "acc": _mean([o for o in outcomes if o["subject"] == s])}
                                         for s in subjects}}
        summaries[exam] = entry
    return summaries


def _mean(outcomes: list) -> float | None:
    return sum(o["correct"] for o in outcomes) / len(outcomes) if outcomes else None


def _share(outcomes: list, test) -> float | None:
    return sum(1 for o in outcomes if test(o)) / len(outcomes) if outcomes else None


def _interval(pair, spec=".3f") -> str:
    return "—" if not pair else f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"


def exam_table(summaries: dict, left_out: dict | None = None) -> str:
    """One row per exam: n, base and fine-tuned accuracy with 95% intervals, Δ with its interval, McNemar p,
    unparsed shares, and multiple-answer questions (how many scored, with base / fine-tuned accuracy on them,
    or left out in loglikelihood mode)."""
    header = ["exam", "n", "base acc [95%]", "fine-tuned acc [95%]", "Δ acc [95%]", "McNemar p", "unparsed base",
              "unparsed ft", "multi-answer"]
    rows = []
    for exam, e in summaries.items():
        out = sum((left_out or {}).get(t, 0) for t in e["tasks"])
        scored = e["base"]["n_multi"]
        multi = (f"{scored} scored: {_fmt(e['base']['multi_acc'])} / {_fmt(e['finetuned']['multi_acc'])}" if scored
                 else "0 scored") + (f", {out} left out" if out else "")
        multi = f"{out} left out" if out and not scored else multi
        rows.append([exam, e["n"], f"{_fmt(e['base']['acc'])} {_interval(e['base']['interval95'])}",
                     f"{_fmt(e['finetuned']['acc'])} {_interval(e['finetuned']['interval95'])}",
                     f"{_fmt(e['delta'], '+.3f')} {_interval(e['interval95']['delta'], '+.3f')}",
                     _fmt(e["mcnemar_p"], ".3g"), _fmt(e["base"]["unparsed"], ".1%"),
                     _fmt(e["finetuned"]["unparsed"], ".1%"), multi])
    return markdown_table(header, rows, ["<", ">", ">", ">", ">", ">", ">", ">", ">"])


def reference_lines() -> str:
    """The published figures of another model, labelled as such, with their source."""
    figures = ", ".join(f"{exam} {acc}" for exam, acc in REFERENCE["accuracy"].items())
    return (f"For scale, ANOTHER model's published results, not this run's: {REFERENCE['model']}, accuracy % — "
            f"{figures} (source: {REFERENCE['source']}; its own prompts and settings, on the full test sets; its "
            "CMMLU figure is over its own choice of medical subjects).")


def _fmt(value, spec=".3f") -> str:
    return "—" if value is None else format(value, spec)


def report_table(tasks: dict) -> str:
    """Two rows a task (base, fine-tuned): n, accuracy ± stderr, Δ, McNemar p; cut-off and no-letter counts when
    the answers were generated."""
    generated = any("cut_off" in o for t in tasks.values() for o in t["base"]["outcomes"])
    header = ["task", "model", "n", "acc", "± stderr", "Δ acc", "McNemar p"] + (["cut off", "no letter"] if generated else [])
    rows = []
    for name, task in tasks.items():
        for label, key in (("base", "base"), ("fine-tuned", "finetuned")):
            side = task[key]
            first = label == "base"
            row = [name if first else "", label, side["n"], _fmt(side["acc"]), _fmt(side["stderr"]),
                   "" if first else _fmt(task["delta"], "+.3f"), "" if first else _fmt(task["mcnemar_p"], ".3g")]
            if generated:
                row += [sum(o.get("cut_off", False) for o in side["outcomes"]),
                        sum(o.get("no_letter", False) for o in side["outcomes"])]
            rows.append(row)
    return markdown_table(header, rows, ["<", "<"] + [">"] * (len(header) - 2))


def plot_report(tasks: dict, path, title: str) -> None:
    """Bars per task, base against fine-tuned, with ±1 stderr error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tasks)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.8))
    width = 0.38
    for offset, key, label, colour in ((-width / 2, "base", "base", "#1f77b4"),
                                       (width / 2, "finetuned", "fine-tuned", "#ff7f0e")):
        accs = [tasks[n][key]["acc"] for n in names]
        errors = [tasks[n][key]["stderr"] or 0.0 for n in names]
        lower = [min(e, a) for e, a in zip(errors, accs)]  # an error bar never goes below 0
        ax.bar([i + offset for i in range(len(names))], accs, width, label=label, color=colour,
               yerr=[lower, errors], capsize=3, error_kw={"elinewidth": 1})
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set(xlim=(-0.8, len(names) - 0.2), ylim=(0, 1.12), ylabel="accuracy", title=title)
    ax.legend(loc="upper right", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
