"""The README's generated tables: rendered from stored benchmark JSON or from the code, never typed.

    python benchmarks/readme_tables.py --check            # exit 1 with a diff if the README differs
    python benchmarks/readme_tables.py --write            # rewrite the marked sections
    python benchmarks/readme_tables.py --list             # every table, its kind and its sources

A generated section of ``README.md`` sits between two marker lines::

    <!-- table:NAME -->
    ...generated markdown...
    <!-- /table:NAME -->

and ``NAME`` has a renderer in :data:`TABLES` of one of three kinds:

* ``results``: a measured figure, rendered from the JSON a benchmark printed, stored under
  ``benchmarks/results/`` (``benchmarks/results/README.md`` lists each file with the command
  that produced it; a file that holds a transcription instead says so in its ``source``).
  To update such a table, rerun the benchmark, store its JSON there and ``--write``.
* ``code``: documentation derived from the code (a run-config table: key and default columns
  come from :class:`flower_focal.config.RunConfig`, the meaning column stays as written).
* ``run``: an example output of a project command, produced by running the code (fixed
  settings, the shared MedMNIST data; skipped without it). Only cheap ones (seconds): they run
  in the fast test too.

``tests/test_readme_tables.py`` runs the same comparison in the fast tier, so a figure edited
by hand fails the tests.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_npz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /table:(?P=name) -->\n",
                    re.DOTALL | re.MULTILINE)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ results: quality
QUALITY_FILES = ["quality-pathmnist-iid.json", "quality-pathmnist-dirichlet.json",
                 "quality-retinamnist-iid.json", "quality-retinamnist-dirichlet.json"]
QUALITY_HE_FILES = ["quality-he-fedavg-pathmnist-iid.json", "quality-he-fedavg-pathmnist-dirichlet.json",
                    "quality-he-fedavg-retinamnist-iid.json", "quality-he-fedavg-retinamnist-dirichlet.json"]
"""he-fedavg on all three seeds (the cell files above ran it on seed 0 only): shown in their place."""
QUALITY_SERVER_MOMENTUM_FILES = ["quality-server-momentum-pathmnist-iid.json",
                                 "quality-server-momentum-pathmnist-dirichlet.json",
                                 "quality-server-momentum-retinamnist-iid.json",
                                 "quality-server-momentum-retinamnist-dirichlet.json"]
"""fedavg with server momentum (``--server-momentum 0.5 --server-lr 1.0``): a row of its own."""
QUALITY_DITTO_FILES = ["quality-ditto-lambda1-pathmnist-iid.json", "quality-ditto-lambda1-pathmnist-dirichlet.json",
                       "quality-ditto-lambda1-retinamnist-iid.json", "quality-ditto-lambda1-retinamnist-dirichlet.json"]
"""Ditto (``--methods ditto --ditto-lambda 1``): its row; the personalised column is its personal model."""
QUALITY_METHODS = {"central": "centralised bound (pooled)", "fedavg": "fedavg",
                   "fedavg-server-momentum": "fedavg + server momentum 0.5 (FedAvgM)",
                   "he-fedavg": "he-fedavg (`compact`)", "fedprox": "fedprox (mu 0.01)", "fedbn": "fedbn",
                   "ditto": "fedavg + Ditto"}


def _label(key: str, settings: dict) -> str:
    """A method's row label; Ditto's names its lambda and personal epochs from the run's settings."""
    if key == "ditto":
        return (f"fedavg + Ditto (lambda {settings['ditto_lambda']:g}, {settings['personal_epochs']} personal "
                "epoch(s) per round; personalised: its personal models)")
    return QUALITY_METHODS[key]


def _mean_std(method: dict, key: str) -> str:
    """``mean ± std`` over seeds, or the one seed's value marked as such."""
    if f"{key}_mean" not in method:
        return "–"
    per_seed = method[f"{key}_per_seed"]
    if len(per_seed) == 1:
        return f"{per_seed[0]:.3f} (1 seed)"
    return f"{method[f'{key}_mean']:.3f} ± {method[f'{key}_std']:.3f}"


def render_quality() -> str:
    """``bench_quality.py``, one run per dataset and partition. The centralised bound does not
    depend on the partition: it was trained in the IID run and is shown in both rows."""
    cells = [cell for name in QUALITY_FILES for cell in load(name)["cells"]]
    he_runs = {(c["dataset"], c["partition"]): c["methods"]["he-fedavg"]
               for name in QUALITY_HE_FILES for c in load(name)["cells"]}
    momentum_runs = {(c["dataset"], c["partition"]): c["methods"]["fedavg"]
                     for name in QUALITY_SERVER_MOMENTUM_FILES for c in load(name)["cells"]}
    ditto_docs = [load(name) for name in QUALITY_DITTO_FILES]
    ditto_runs = {(c["dataset"], c["partition"]): (c["methods"]["ditto"], doc["settings"])
                  for doc in ditto_docs for c in doc["cells"]}
    for cell in cells:
        if (cell["dataset"], cell["partition"]) in ditto_runs:
            cell["methods"]["ditto"] = ditto_runs[cell["dataset"], cell["partition"]][0]
        if (cell["dataset"], cell["partition"]) in he_runs:
            cell["methods"]["he-fedavg"] = he_runs[cell["dataset"], cell["partition"]]
        if (cell["dataset"], cell["partition"]) in momentum_runs:
            cell["methods"]["fedavg-server-momentum"] = momentum_runs[cell["dataset"], cell["partition"]]
    central = {c["dataset"]: c["methods"]["central"] for c in cells if "central" in c["methods"]}
    rows = []
    for cell in cells:
        methods = {"central": central.get(cell["dataset"], {}), **cell["methods"]}
        part = "IID" if cell["partition"] == "iid" else "Dirichlet 0.5"
        for key, label in QUALITY_METHODS.items():
            m = methods.get(key)
            if not m or "runs" not in m:
                continue
            if key == "ditto":
                label = _label(key, ditto_runs[cell["dataset"], cell["partition"]][1])
            rows.append([f"{cell['dataset']}, {part}", label, _mean_std(m, "val_auroc"),
                         _mean_std(m, "val_accuracy"), _mean_std(m, "val_fed_auroc"),
                         _mean_std(m, "val_personal_auroc")])
    return md_table(["data, partition", "method", "val macro AUROC (final global model)", "val accuracy",
                     "federated AUROC", "personalised AUROC (1 epoch fine-tuning; Ditto: personal models)"], rows)


QUALITY_DITTO_LAMBDA_FILES = ["quality-ditto-lambda0.1-pathmnist-dirichlet.json",
                              "quality-ditto-lambda1-pathmnist-dirichlet.json",
                              "quality-ditto-lambda10-pathmnist-dirichlet.json"]


def render_quality_ditto() -> str:
    """``bench_quality.py --methods ditto --ditto-lambda L``: per lambda, the personal models'
    AUROC and accuracy on the institutions' own validation shares, next to the global model's."""
    rows = []
    for name in QUALITY_DITTO_LAMBDA_FILES:
        doc = load(name)
        m = doc["cells"][0]["methods"]["ditto"]
        rows.append([f"{doc['settings']['ditto_lambda']:g}", _mean_std(m, "val_personal_auroc"),
                     _mean_std(m, "val_personal_accuracy"), _mean_std(m, "val_fed_auroc"),
                     _mean_std(m, "val_fed_accuracy"), _mean_std(m, "val_auroc")])
    return md_table(["ditto-lambda", "personal models: AUROC", "personal models: accuracy",
                     "global model, federated: AUROC", "global model, federated: accuracy",
                     "global model, pooled val: AUROC"], rows)


QUALITY_ROUNDS_FILES = ["quality-40rounds-pathmnist-iid-central.json", "quality-40rounds-pathmnist-iid-fedavg.json"]
"""PathMNIST IID at 40 rounds (``--rounds 40``; central: 120 epochs), next to the 20-round cell."""


def render_quality_rounds() -> str:
    """PathMNIST IID, fixed val split, 3 seeds: the centralised bound and fedavg at 20 rounds
    (the quality table's runs) and at 40 (central: rounds x local-epochs epochs)."""
    twenty = next(c for c in load("quality-pathmnist-iid.json")["cells"])["methods"]
    forty = {k: v for name in QUALITY_ROUNDS_FILES for k, v in load(name)["cells"][0]["methods"].items()}
    rows = []
    for rounds, methods in ((20, twenty), (40, forty)):
        c, f = methods["central"], methods["fedavg"]
        gaps = [a - b for a, b in zip(f["val_auroc_per_seed"], c["val_auroc_per_seed"], strict=True)]
        rows.append([str(rounds), _mean_std(c, "val_auroc"), _mean_std(f, "val_auroc"), _mean_std(f, "val_fed_auroc"),
                     f"{statistics.mean(gaps):+.3f} ({', '.join(f'{g:+.3f}' for g in gaps)})"])
    return md_table(["rounds", "centralised bound (rounds x 3 epochs)", "fedavg: val macro AUROC",
                     "fedavg: federated AUROC", "fedavg − central, mean (per seed)"], rows)


# --------------------------------------------------------------- results: quality under CV
QUALITY_CV_FILES = sorted(p.name for p in RESULTS.glob("quality-cv-*.json"))
"""``bench_quality.py --cv K`` runs (one per dataset and partition, like :data:`QUALITY_FILES`).
The ``quality-cv`` table is registered in :data:`TABLES` only once such a file exists; from then
on the README needs its ``<!-- table:quality-cv -->`` section (the tests say so)."""


def _cv_mean_std(method: dict, key: str) -> str:
    """``mean ± std`` over the (fold, seed) runs."""
    if f"{key}_mean" not in method:
        return "–"
    return f"{method[f'{key}_mean']:.3f} ± {method[f'{key}_std']:.3f}"


def render_quality_cv(docs: list[dict] | None = None) -> str:
    """``bench_quality.py --cv K``: per cell and method, mean ± std over every (fold, seed) run
    (each pooled train+val image scored once per seed), the runs, and the final model's AUROC
    minus the centralised bound's paired on (fold, seed). ``docs``: the JSON documents (default:
    :data:`QUALITY_CV_FILES`). A cell without central shows the centralised bound of another cell
    of the same dataset, folds, rounds and training defaults (it does not depend on the
    partition), without a paired gap."""
    docs = [load(name) for name in QUALITY_CV_FILES] if docs is None else docs
    cells = []
    for doc in docs:
        cv = doc["settings"].get("cv")
        if not cv:
            raise ValueError("quality-cv: a results file without settings.cv (not a bench_quality --cv run)")
        # the bound is shared only between runs of the same folds, rounds and training defaults
        same = (cv["folds"], cv["fold_seed"], doc["settings"].get("rounds"),
                json.dumps(doc["settings"].get("defaults"), sort_keys=True))
        cells += [(same, doc["settings"], c) for c in doc["cells"] if "methods" in c]
    cells.sort(key=lambda t: (t[2]["dataset"], t[2]["partition"] != "iid", t[2]["partition"]))
    central = {(c["dataset"], same): c["methods"]["central"] for same, _, c in cells if "central" in c["methods"]}
    rows = []
    for same, settings, cell in cells:
        methods = {"central": central.get((cell["dataset"], same), {}), **cell["methods"]}
        part = {"iid": "IID", "dirichlet": "Dirichlet 0.5"}.get(cell["partition"], cell["partition"])
        order = [m for m in QUALITY_METHODS if m in methods] + [m for m in methods if m not in QUALITY_METHODS]
        for key in order:
            m = methods[key]
            if not m or "runs" not in m:
                continue
            paired = m.get("val_auroc_minus_central_paired")
            rows.append([f"{cell['dataset']}, {part}", _label(key, settings) if key in QUALITY_METHODS else key,
                         f"{len(m['folds'])} × {len(m['seeds'])} ({m['val_images']} images)",
                         _cv_mean_std(m, "val_auroc"), _cv_mean_std(m, "val_fed_auroc"),
                         _cv_mean_std(m, "val_personal_auroc"),
                         "–" if paired is None else f"{paired['mean']:+.3f} ± {paired['std']:.3f}"])
    return md_table(["data, partition", "method", "runs (folds × seeds)", "val macro AUROC (final global model)",
                     "federated AUROC", "personalised AUROC", "final model − central, paired by (fold, seed)"], rows)


# ------------------------------------------------------------------ results: FOCAL quality
FOCAL_NAMES = {"pathmnist": "PathMNIST (9 classes, 701 / 100)", "retinamnist": "RetinaMNIST (5 classes, 1080 / 120)"}


def _mean_spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {max(values) - min(values):.3f}"


def focal_encrypted_runs() -> dict[tuple[str, str], list[tuple[int, dict]]]:
    """(dataset, partition) -> [(seed, run)] from the stored per-seed stderr lines."""
    runs: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for line in load("focal_quality-encrypted-iid.json")["stderr"]:
        m = re.fullmatch(r"(\w+) (\w+) seed (\d+): (\{.*\})", line)
        if m:
            runs.setdefault((m[1], m[2]), []).append((int(m[3]), ast.literal_eval(m[4])))
    return runs


def render_focal_quality() -> str:
    """``bench_focal_quality.py``: the twin over every cell (``--twin``), the encrypted IID runs."""
    twin = load("focal_quality-twin.json")["results"]
    encrypted = focal_encrypted_runs()
    rows = []
    for dataset, name in FOCAL_NAMES.items():
        for part in ("iid", "dirichlet"):
            enc = encrypted.get((dataset, part), [])
            enc_cell = (f"{_mean_spread([r['val_auroc_macro'] for _, r in enc])} "
                        f"(seeds {', '.join(str(s) for s, _ in enc)})") if enc else "not run (time)"
            pooled = (f"{twin[dataset]['logreg_pooled']['val_auroc_macro']:.3f} / "
                      f"{twin[dataset]['logreg_pooled_C0.01']['val_auroc_macro']:.3f}")
            rows.append([name, "IID" if part == "iid" else "Dirichlet 0.5", enc_cell,
                         _mean_spread(twin[dataset][part]["focal_val_auroc_macro"]["values"]), pooled])
    return md_table(["dataset", "partition", "FOCAL, encrypted (CKKS)", "FOCAL, plaintext twin",
                     "logistic regression, pooled (C = 0.1 / 0.01)"], rows)


def render_focal_real() -> str:
    """``bench_focal_real.py``'s printed JSON: four ways to train the head, macro AUROC /
    accuracy, then its time ratios and the encryption error, rendered as the paragraph under it."""
    names = {"pathmnist": "PathMNIST", "retinamnist": "RetinaMNIST"}
    doc = load("focal_real.json")
    rows = []
    for r in doc["results"]:
        m = r["methods"]
        rows.append([f"{names[r['dataset']]} ({r['num_classes']} classes)"]
                    + [f"{m[k]['val_auroc_macro']:.3f} / {m[k]['val_accuracy']:.3f}"
                       for k in ("focal", "plaintext_split", "he_fedavg", "logreg_pooled")])
    table = md_table(["dataset", "(a) FOCAL, encrypted", "(b) plaintext split training", "(c) HE-FedAvg, linear head",
                      "(d) logistic regression, pooled"], rows)
    res = doc["results"]

    def each(fmt: str, get) -> str:
        return " and ".join(fmt.format(get(r)) for r in res)

    ratio = [r["time_ratio_focal_over_plaintext_split"] for r in res]
    return table + (
        f"\nThe encrypted head differs from the twin's by at most "
        f"{max(r['focal_vs_twin_max_abs_dW'] for r in res):.1e}; HE-FedAvg's from plain FedAvg's by at most "
        f"{max(r['he_fedavg_vs_plain_max_abs_dW'] for r in res):.1e}. **Time** (all roles in one process, "
        f"{' / '.join(names[r['dataset']] for r in res)}): FOCAL (key generation + encryption + "
        f"{doc['settings']['steps']} steps + decryption) takes "
        + " and ".join(f"{t['cpu']['training']:.0f}x" for t in ratio)
        + " the CPU time of plaintext split training; "
        + " and ".join(f"{t['wall']['training']:.0f}x" for t in ratio)
        + f" in wall time on the {doc['machine']['cpus']} shared cores at load average "
        f"{doc['loadavg_start'][0]:.1f}–{doc['loadavg_end'][0]:.1f} (MedBlindTuner reports about 30x). Counting the "
        "embedding of the training images (the same for both) the end-to-end ratio is "
        + " and ".join(f"{t['cpu']['end_to_end_with_embedding']:.1f}x" for t in ratio)
        + " (CPU time). The encrypted server step took "
        + each("{:.1f} s", lambda r: r["methods"]["focal"]["server_s_per_step"]) + " wall time.\n")


# ------------------------------------------------------------------- results: HE-FedAvg
def _s(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f} s"


def render_he_fedavg_micro() -> str:
    """``bench_he_fedavg.py --skip-simulation``'s printed JSON: per preset, at 1 M (medium-cnn)
    and 11 M (resnet18) parameters, one institution's encryption, the server's check + add of
    all the uploads plus serialising the sum, and one decryption."""
    models = load("he_fedavg-micro.json")["models"]
    sizes = [next(iter(models[name]["micro"]))["params"] for name in ("medium-cnn", "resnet18")]
    by_preset: dict[str, list[str]] = {}
    n = None
    for name in ("medium-cnn", "resnet18"):
        for m in models[name]["micro"]:
            n = m["institutions"]
            by_preset.setdefault(m["preset"], []).extend(
                [_s(m["encrypt_s_w1"], 2), _s(m["aggregate_s"] + m["result_s"], 2 if name == "medium-cnn" else 1),
                 _s(m["decrypt_s"], 2)])
    order = ["compact", "ckks", "bfv", "nvflare"]
    rows = [[f"`{p}`", *by_preset[p]] for p in order if p in by_preset]
    small, large = (f"{round(x / 1e6):d} M" for x in sizes)
    return md_table(["preset", f"{small}: encrypt", f"server, {n} uploads", "decrypt", f"{large}: encrypt",
                     f"server, {n} uploads", "decrypt"], rows)


def _he_rounds() -> tuple[dict, list[tuple[str, dict, dict]], tuple[str, dict, dict]]:
    """``bench_he_fedavg.py`` part 2: the output, per (model, workload) row its ``(model, row,
    compact preset's figures)``, and the headline row (the largest workload of the largest model)."""
    doc = load("he_fedavg-rounds.json")
    rows = [(model, r, r["presets"]["compact"]) for model, entry in doc["models"].items()
            for r in entry["simulation"]]
    headline = max(rows, key=lambda t: (doc["models"][t[0]]["params"], t[1]["images_per_institution"]))
    return doc, rows, headline


def _params_label(n: int) -> str:
    return f"{round(n / 1e6)} M"


def render_he_fedavg_rounds() -> str:
    """Round wall time of fedavg and he-fedavg (``compact``) in the same Ray simulation, per
    model and workload; the largest workload of the largest model in bold (the headline)."""
    doc, rows, headline = _he_rounds()
    out, seen = [], set()
    for model, r, he in rows:
        label = _params_label(doc["models"][model]["params"])
        label = label if model in seen else f"{label} ({model})"
        seen.add(model)
        ratio = f"{he['ratio_vs_fedavg']:.2f}; {he['ratio_of_medians']:.2f}"
        out.append([label, str(r["images_per_institution"]), _s(r["fedavg_round_wall_s"]), _s(he["round_wall_s"]),
                    f"**{ratio}**" if (model, r) == headline[:2] else ratio, _s(he["overhead_s_per_round"]),
                    _s(he["he_cpu_s_per_round"]["total"]),
                    f"{r['fedavg_loadavg'][0]:.1f}; {he['loadavg'][0]:.1f}"])
    return md_table(["model", "images per institution", "FedAvg round", "HE round", "ratio mean; of medians",
                     "HE overhead per round (wall)", "HE crypto, CPU s per round", "load after FedAvg; HE"], out)


def render_he_fedavg_break_even() -> str:
    """The benchmark's ``break_even`` fit (workload where the ratio reaches 1.25), per model."""
    doc, _, _ = _he_rounds()
    parts = []
    for model, entry in doc["models"].items():
        fit = entry["break_even"]["compact"]
        parts.append(f"{fit['images_per_institution_needed']} images per institution at "
                     f"{_params_label(entry['params'])} ({model}: HE overhead {fit['overhead_s_per_round']} s "
                     f"per round, so FedAvg's round must reach {fit['fedavg_round_s_needed']} s)")
    text = ("The ratio reaches 1.25 once local training is about four times HE's work; the "
            "benchmark's two-point fit over the 100- and 1000-image rows (`break_even`) puts that at "
            + " and ".join(parts) + ".")
    return textwrap.fill(text, 96, break_on_hyphens=False) + "\n"


def render_he_fedavg_time_split() -> str:
    """HE's own CPU seconds per round at the headline row, as institutions and server report them."""
    doc, _, (model, r, he) = _he_rounds()
    t = he["he_cpu_s_per_round"]
    return md_table(
        ["row", "institutions encrypt (10 uploads)", "institutions decrypt", "server sum", "server serialise",
         "total"],
        [[f"{_params_label(doc['models'][model]['params'])} / {r['images_per_institution']}",
          f"{_s(t['institutions_encrypt'])} ({_s(t['encrypt_wall_s_per_upload'], 2)} wall per upload)",
          _s(t["institutions_decrypt"]), _s(t["server_sum"]), _s(t["server_serialize"]), _s(t["total"])]])


def render_he_fedavg_pathmnist() -> str:
    """``bench_he_fedavg.py --auroc-rounds 20`` part 3: PathMNIST validation macro AUROC and
    accuracy of fedavg, he-fedavg and the control (fedavg, lr x (1 + 1e-7))."""
    doc = load("he_fedavg-pathmnist.json")
    preset = doc["settings"]["presets"][0]
    labels = {"fedavg": "fedavg", "he-fedavg": f"he-fedavg (`{preset}`)",
              "fedavg-lr-1e-7-perturbed": "fedavg, lr × (1 + 1e-7) (control)"}
    runs = doc["pathmnist"]
    rows = [[label, f"{runs[key]['val_auroc_macro']:.3f}", f"{runs[key]['val_accuracy']:.2f}"]
            for key, label in labels.items()]

    def diff(key: str) -> str:
        return (f"AUROC {runs[key]['val_auroc_macro'] - runs['fedavg']['val_auroc_macro']:+.3f}, "
                f"accuracy {runs[key]['val_accuracy'] - runs['fedavg']['val_accuracy']:+.2f}")

    return md_table(["run", "val macro AUROC", "val accuracy"], rows) + (
        f"\nAgainst fedavg: he-fedavg {diff('he-fedavg')}; the control {diff('fedavg-lr-1e-7-perturbed')}.\n")


def render_server_sum() -> str:
    """``bench_server_sum.py``: the server's check + add per 11 M upload against numpy's
    weighted sum of the same update, by ``he-server-workers`` and institution count."""
    d = load("server_sum.json")
    rows = []
    for r in d["rounds"]:
        for key in sorted(k for k in r if k.startswith("workers_")):
            w = r[key]
            same = {None: "(reference)", True: "yes", False: "**no**"}[w["identical_to_serial"]]
            rows.append([str(r["institutions"]), key.split("_")[1], f"{w['per_upload_s']:.3f} s",
                         f"{r['numpy']['per_upload_s']:.3f} s", f"{w['ratio_to_numpy']:.1f}",
                         f"{w['round_s']:.1f} s", same])
    return md_table(["institutions", "he-server-workers", "check + add per upload", "numpy weighted sum",
                     "ratio", "round (all adds)", "sum byte-identical to 1 worker"], rows)


# ------------------------------------------------------------- results: comparison report
def render_comparison_example() -> str:
    """The summary table of ``flower-focal report`` for the README's example multirun, from
    the ``report.json`` it wrote (``comparison-example.json``), in the report's own format
    (:data:`flower_focal.compare.SUMMARY_HEADER`, its number and byte formatting)."""
    from flower_focal.compare import SUMMARY_HEADER, _num, fmt_bytes

    rows = []
    for run in load("comparison-example.json")["report"]["runs"]:
        leak = run["leakage"]
        leakage = "not audited" if leak is None else (
            _num(leak["leakage_rate"], 2) + ("" if leak["attackable"] else " (server holds only ciphertexts)"))
        rows.append([run["label"], run["status"], _num(run["final_accuracy"]), _num(run["final_auroc"]),
                     _num(run["wall_time_s"], 1), fmt_bytes(run["bytes_up_per_round_per_institution"]),
                     fmt_bytes(run["bytes_down_per_round_per_institution"]),
                     fmt_bytes(run["bytes_up_total"] + run["bytes_down_total"]), leakage])
    return md_table(list(SUMMARY_HEADER), rows)


def render_comparison_audits() -> str:
    """The example command's time and what its audits' attacks reconstructed."""
    doc = load("comparison-example.json")
    prov, audits = doc["provenance"], doc["audits"]
    loads = [line.split("load average: ")[1].split(",")[0] for line in prov["uptime_before_after"]]
    attacks, found = [], []
    for label, a in audits.items():
        for side, who in ((a, "the server"), (a["institution_side"] or {}, "an institution")):
            if side.get("attackable") and side.get("ssim"):
                attacks.append(f"{label.split(' (')[0]}'s by {who} {side['attack_s']:.0f} s")
                found.append(f"{label.split(' (')[0]} attacked by {who} {min(side['ssim']):.2f}–{max(side['ssim']):.2f}")
    none = [label.split(" (")[0] for label, a in audits.items()
            if not a.get("attackable") and not (a["institution_side"] or {}).get("attackable")]
    threshold = {a["ssim_threshold"] for a in audits.values()}.pop()
    leaked = any(a["leakage_rate"] or (a["institution_side"] or {}).get("leakage_rate") for a in audits.values())
    at_audits = ", ".join(f"{a['load_avg'][0]:.1f}" for a in audits.values())
    text = (f"The whole command took {prov['command_wall_s']} s on the 2 shared cores (load average "
            f"{float(loads[0]):.1f} at the start, {at_audits} when the audits ended, {float(loads[-1]):.1f} at the end), "
            f"of which {sum(a['wall_time_s'] for a in audits.values()):.0f} s the audits "
            f"(attacks: {', '.join(attacks)}). Reconstruction SSIM: {'; '.join(found)}: "
            + (f"no sample reached {threshold}, so none counts as leaked" if not leaked else "some samples leaked")
            + (f"; {' and '.join(none)}: no image gradient to attack, for the server or an institution." if none else "."))
    return textwrap.fill(text, 96) + "\n"


# ------------------------------------------------------------------ results: FOCAL scale
def _focal_scale_eval_mib(before: dict, after: dict) -> float:
    """Evaluation's share of a before round's bytes down. The before tree did not record it;
    training sends the same bytes before and after, so it is the before round's bytes down
    less the after round's training share (its bytes down less its evaluation's)."""
    return before["bytes_down_mib"] - (after["bytes_down_mib"] - after["evaluate_bytes_down_mib"])


def _load_range(doc: dict) -> tuple[float, float]:
    """The 1-minute load average from a run's first start to its last end."""
    runs = doc["results"]
    return min(r["loadavg_before"][0] for r in runs), max(r["loadavg_after"][0] for r in runs)


def render_focal_scale() -> str:
    """``bench_focal_scale.py --institutions 10 100 --rounds 2`` on the tree before evaluation
    by validation logits (``focal_scale-before.json``) and after (``focal_scale.json``), and a
    paragraph on the largest run: metrics before and after, replies, forward time, memory, load."""
    before, after = load("focal_scale-before.json"), load("focal_scale.json")
    rows = []
    for b, a in zip(before["results"], after["results"], strict=True):
        if b["institutions"] != a["institutions"]:
            raise ValueError("focal_scale: the before and after runs have different institution counts")
        (b1, b2), (a1, a2) = b["rounds"], a["rounds"]
        rows.append([str(a["institutions"]),
                     f"{_focal_scale_eval_mib(b2, a2):.1f} → {a2['evaluate_bytes_down_mib']:.3g} MiB",
                     f"{b2['wall_s']:.1f} → {a2['wall_s']:.1f} s",
                     f"{b1['bytes_up_mib']:.1f} → {a1['bytes_up_mib']:.1f} MiB, "
                     f"{b1['wall_s']:.1f} → {a1['wall_s']:.1f} s"])
    big_b, big_a = before["results"][-1], after["results"][-1]
    n, rounds = big_a["institutions"], big_a["rounds"]
    same = all((rb["val_auroc"], rb["val_accuracy"]) == (ra["val_auroc"], ra["val_accuracy"])
               for rb, ra in zip(big_b["rounds"], rounds, strict=True))
    answered = all(r["train_replies"] == r["evaluate_replies"] == n and not r["failures"] for r in rounds)
    load_b, load_a = _load_range(before), _load_range(after)
    fairness = ("so the wall times favour the after run" if sum(load_b) > sum(load_a) else
                "so the wall times favour the before run" if sum(load_b) < sum(load_a) else "")
    text = (
        f"The validation metrics are {'identical' if same else '**not** identical'} before and after ({n} "
        "institutions: AUROC " + " and ".join(f"{r['val_auroc']:.3f}" for r in rounds)
        + " after rounds " + " and ".join(str(r["round"]) for r in rounds)
        + ", accuracy " + " and ".join(f"{r['val_accuracy']:.2f}" for r in rounds)
        + f", {big_a['final_val_examples']} images); "
        + (f"all {n} answered every exchange" if answered else "**not every institution answered**")
        + f"; the server's forward passes on the validation embeddings took "
        f"{rounds[-1]['evaluate_server_forward_s']:.1f} s of each round at {n}; peak RSS of the run's "
        f"process tree (SuperLink, Ray workers, ServerApp) {big_a['peak_rss_gib']:.2f} GiB "
        f"({big_b['peak_rss_gib']:.2f} before). Load average (1 min) {load_b[0]:.1f}–{load_b[1]:.1f} during "
        f"the before run, {load_a[0]:.1f}–{load_a[1]:.1f} during the after run on the 2 shared cores"
        + (f", {fairness}." if fairness else "."))
    return md_table(["institutions", "evaluation bytes down per round", "round 2 wall time",
                     "round 1 (embed exchange): bytes up, wall time"], rows) + "\n" + textwrap.fill(text, 96) + "\n"


# ------------------------------------------------------------------- results: HE presets
PRESET_ROWS = {"compact": ("", ""), "ckks": ("", ""), "bfv": ("", "exact sums of up to 1000 uploads"),
               "nvflare": (" (NVIDIA FLARE's)", "for comparison")}  # preset: (scheme suffix, notes)
BACKEND_NAMES = {"seal-ckks": "SEAL CKKS", "tenseal-ckks": "TenSEAL CKKS", "tenseal-bfv": "TenSEAL BFV"}


def _scheme_text(preset) -> str:
    """A preset's parameters in words, from :class:`~flower_focal.crypto.params.HEPreset`."""
    bits = preset.coeff_mod_bit_sizes
    parts = [BACKEND_NAMES.get(preset.backend, preset.backend), f"N={preset.poly_modulus_degree}",
             f"one {bits[0]}-bit prime" if len(bits) == 1 else "[" + ",".join(str(b) for b in bits) + "]"]
    if preset.plain_modulus_bits is not None:
        parts += [f"{preset.plain_modulus_bits}-bit plain modulus", f"{preset.fixed_point_bits}-bit fixed point"]
    else:
        parts.append(f"2^{preset.scale_bits}")
    parts.append("seeded symmetric" if preset.seeded else "symmetric")
    if preset.complex_packing:
        parts.append("2 reals/slot")
    return ", ".join(parts)


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def render_he_presets() -> str:
    """``bench_crypto.py`` (bytes per parameter and relative error of a 10-upload sum at its
    ``--params``); scheme and value range from the presets themselves (``crypto/params.py``)."""
    from flower_focal.config import RunConfig
    from flower_focal.crypto import PRESETS

    doc = load("crypto_presets.json")
    size = doc["settings"]["params"]
    measured = {r["preset"]: r for r in doc["results"] if r["params"] == size}
    default = RunConfig().he_preset
    rows = []
    for name, (suffix, notes) in PRESET_ROWS.items():
        preset, r = PRESETS[name], measured[name]
        error = _sci(r["rel_error"]) + (" (quantisation)" if preset.plain_modulus_bits is not None else "")
        rows.append([f"`{name}`" + (" (default)" if name == default else ""), _scheme_text(preset) + suffix,
                     f"{r['upload_bytes_per_param']:.3g}", f"{r['download_bytes_per_param']:.3g}", error,
                     f"±{preset.max_abs_value:g}", notes])
    return md_table(["preset", "scheme", "upload B/param", "download B/param", "rel. error", "value range",
                     "notes"], rows)


# ------------------------------------------------------------------------ results: GPU
def render_gpu_path() -> str:
    """``bench_gpu_path.py --device cuda`` on an H200 (a transcription: no GPU here)."""
    rows = []
    for r in load("gpu_path.json")["rows"]:
        now = r.get("train_local_img_s", r.get("end_to_end_img_s"))
        raw = r.get("raw_loop_img_s", r.get("raw_net_img_s"))
        path = r["path"] + (f" (build {r['dataset_build_s']:g} s for {r['n']:,})" if "n" in r else "")
        now_text = f"{now:,} img/s" + (f" (embedding alone {r['embed_img_s']:,})" if "embed_img_s" in r else "")
        raw_text = (f"{raw:,}" + (f" ({r['raw_note']})" if "raw_note" in r else "")
                    + (f"; fp32 loop {r['raw_fp32_loop_img_s']:,}" if "raw_fp32_loop_img_s" in r else ""))
        share = f"**{r['share_of_raw']:.2f}**" if r.get("headline") else f"{r['share_of_raw']:.2f}"
        if "target" in r:
            share += f" ({r['target']}{'' if r['target_met'] else ': missed'})"
        rows.append([path, f"{r['before_img_s']:,} img/s", now_text, raw_text, share])
    return md_table(["path", "before", "now", "raw, same run", "share of raw (target)"], rows)


# --------------------------------------------------------------- results: client imports
def render_client_imports() -> str:
    """``bench_client_imports.py``: median import seconds in fresh interpreters, on the tree
    before the ClientApp's imports were made lazy (``client_imports-before.json``) and now."""
    before, after = load("client_imports-before.json"), load("client_imports.json")

    def cell(doc: dict, case: str, first_message: bool = False) -> str:
        torch, monai = doc[f"{case}_imports_torch"], doc[f"{case}_imports_monai"]
        note = "torch + MONAI" if torch and monai else "torch" if torch else "MONAI" if monai else ""
        if torch and not monai and first_message:
            note += ("; MONAI only in the first message of an institution, which builds its data: see the "
                     "per-message table below")
        if case == "client_app" and not note:
            note = f"of which flwr {doc['flwr_s']:.1f}"
        return f"{doc[f'{case}_s']:.2f} s" + (f" ({note})" if note else "")

    def load_text(doc: dict) -> str:
        return f"{doc['loadavg_before'][0]:.1f} / {doc['loadavg_after'][0]:.1f}"

    return md_table(["import", "before", "after"], [
        ["`import clients.client_app`", cell(before, "client_app"), cell(after, "client_app")],
        ["what a FOCAL step / evaluation needs", cell(before, "focal_step"), cell(after, "focal_step")],
        ["what a fedavg / he-fedavg train message needs", cell(before, "train"), cell(after, "train", True)],
    ]) + (f"\nLoad average (1 min) at start / end on the 2 shared cores: {load_text(before)} before, "
          f"{load_text(after)} after.\n")


def render_server_opt_bn() -> str:
    """``bench_server_opt_bn.py``: the smallest BatchNorm running variance of the global model
    after each round, Flower's FedAvgM (steps every array) vs flower-focal's (averages them)."""
    d = load("server_opt_bn.json")
    runs = d["min_running_var_after_each_round"]
    rounds = len(next(iter(runs.values())))
    return md_table(["server optimiser", *(f"round {r}" for r in range(1, rounds + 1))],
                    [[name, *(f"{v:.3f}" for v in mins)] for name, mins in runs.items()])


def render_fedbn_upload() -> str:
    """``bench_fedbn_upload.py``: values and bytes of one he-fedavg upload with every array in
    the encrypted vector and with FedBN's normalisation layers left out."""
    d = load("fedbn_upload.json")
    rows = []
    for name, m in d["models"].items():
        full, fedbn = m["all_arrays"], m["fedbn"]
        rows.append([f"`{name}`", f"{full['values']:,}", f"{fedbn['values']:,} ({m['local_arrays']} arrays local)",
                     f"{full['chunks']} / {full['ciphertext_bytes'] / 1e6:.3f} MB",
                     f"{fedbn['chunks']} / {fedbn['ciphertext_bytes'] / 1e6:.3f} MB",
                     f"{100 * m['values_saved'] / full['values']:.2f} %",
                     f"{100 * m['bytes_saved'] / full['ciphertext_bytes']:.2f} %"])
    return md_table(["model", "values encrypted, every array", "values encrypted, FedBN",
                     f"upload ({d['settings']['preset']}), every array: chunks / bytes", "upload, FedBN",
                     "values saved", "bytes saved"], rows)


# ------------------------------------------------------------------ results: deployment
def render_deployment() -> str:
    """``bench_deployment.py --no-recovery``: a deployment round against its simulation round,
    before (``deployment-before.json``) and after (``deployment.json``), with Flower's floor."""
    before, after = load("deployment-before.json"), load("deployment.json")
    floor = after["flower_exchange_floor"]["exchange_s"]
    rows = []
    for name in ("fedavg", "he-fedavg", "focal"):
        b, a = before["strategies"][name], after["strategies"][name]
        rows.append([name, f"{a['simulation_round_s']:.2f} s", f"{b['deployment_minus_simulation_s']:.1f} s",
                     f"{a['deployment_minus_simulation_s']:.1f} s",
                     f"{a['exchanges_per_round']:g} x {floor:.1f} s = {a['flower_floor_round_s']:.1f} s",
                     f"{round(a['above_flower_floor_s'], 1) or 0.0:.1f} s"])  # no "-0.0"
    return md_table(["strategy", "simulation round", "deployment - simulation, before", "after",
                     "Flower's floor (exchanges x empty exchange)", "after, above the floor"], rows)


def render_deployment_messages() -> str:
    """Per message type, a SuperNode's ClientApp process: Flower's start, flower-focal's
    imports, the work (means over the run's messages), before and after."""
    before, after = load("deployment-before.json"), load("deployment.json")
    rows = []
    for name, kinds in (("fedavg", ("train", "evaluate")), ("he-fedavg", ("train", "evaluate")),
                        ("focal", ("train.focal", "evaluate.focal"))):
        for kind in kinds:
            b, a = before["strategies"][name]["client_message_s"][kind], after["strategies"][name]["client_message_s"][kind]
            rows.append([f"{name} `{kind}`"] + [f"{x['process_s']:.2f} / {x['imports_s']:.2f} / {x['work_s']:.2f} s"
                                                 for x in (b, a)])
    return md_table(["message", "before: process / imports / work", "after"], rows)


# --------------------------------------------------------------- results: privacy
def _epsilon_text(eps: float) -> str:
    if eps == float("inf"):
        return "∞"
    return f"{round(eps):,}".replace(",", " ") if eps >= 100 else f"{eps:.1f}"


def render_dp() -> str:
    """``bench_dp.py``: quality per noise level; epsilon computed here by the library's
    accountant (client level, the benchmark's rounds and delta), not stored."""
    from flower_focal.privacy import client_level_epsilon

    doc = load("dp.json")
    rounds, delta = doc["settings"]["rounds"], doc["settings"]["delta"]
    rows = []

    def order(r: dict) -> tuple:  # the controls first, then by noise level, fedavg before he-fedavg
        return (r["clip_norm"] is not None and r["noise_multiplier"] > 0, r["noise_multiplier"], r["strategy"])

    for r in sorted(doc["results"], key=order):
        losses = r.get("federated_val_loss_per_round", [])
        if "note" not in r and None in losses:  # the benchmark records a NaN loss as null
            first = losses.index(None) + 1
            r = {**r, "note": f"NaN loss {'in' if first == len(losses) else 'from'} round {first}"}
        z, clip = r["noise_multiplier"], r["clip_norm"]
        if clip is None:
            label = f"{r['strategy']}, no DP"
        elif z == 0:
            label = f"{r['strategy']}, clip only"
        else:
            label = "fedavg + Flower DP" if r["strategy"] == "fedavg" else r["strategy"]
        eps = client_level_epsilon(z, rounds, delta).epsilon if z else float("inf")
        note = f" ({r['note']})" if r.get("note") else ""
        rows.append([label, "–" if clip is None else f"{z:g}", "–" if clip is None else f"{clip:g}", _epsilon_text(eps),
                     f"{r['val_auroc_macro']:.3f}{note}", f"{r['val_accuracy']:.2f}"])
    return md_table(["strategy", "z", "S", f"ε (δ = {delta:.0e}, {rounds} rounds)".replace("e-0", "e-"), "val macro AUROC",
                     "val accuracy"], rows)


AUDIT_LABELS = {
    "lenet-bs1-path": "fedavg, lenet-sigmoid, batch 1, PathMNIST",
    "lenet-bs1-retina": "fedavg, lenet-sigmoid, batch 1, RetinaMNIST",
    "lenet-bs1-path-idlg": "same, PathMNIST, `--attack idlg`",
    "lenet-bs1-5steps-path": "fedavg, lenet-sigmoid, batch 1, 5 local steps",
    "lenet-bs4-path": "fedavg, lenet-sigmoid, batch 4",
    "smallcnn-bs1-path": "fedavg, small-cnn (default), batch 1",
    "smallcnn-bs32-path": "fedavg, small-cnn, batch 32 (its default)",
}
"""Row labels of ``bench_audit.py``'s case ids (other cases are labelled from their fields)."""
AUDIT_HEADLINE = ("lenet-bs1-path", "lenet-bs1-retina")


def audit_doc() -> dict:
    return load("audit.json")


def render_audit() -> str:
    """``bench_audit.py``'s printed JSON: one row per case (server view), the DP cases with the
    server view / after noise, the HE cases' server and institution side as separate rows."""
    def cells(a: dict, b: dict | None = None) -> list[str]:
        pair = [a] if b is None else [a, b]
        return [" / ".join(f"{x['leakage_rate']:.2f}" for x in pair),
                " / ".join(f"{x['ssim_median']:.2f}" for x in pair),
                " / ".join(f"{x['psnr_median']:.1f}" for x in pair), f"{a['label_accuracy']:.2f}"]

    def evals(c: dict) -> str:
        return f" ({c['iterations']} evaluations)" if c["iterations"] != 400 else ""

    rows = []
    for c in audit_doc()["cases"]:
        server = c["server"]
        if c["strategy"] == "fedavg" and "dp" in c:
            dp = c["dp"]
            label = (f"fedavg + Flower DP, S = {dp['clip_norm']:g}, z = {dp['noise_multiplier']:g} "
                     "(server view / after noise)")
            rows.append([label, str(server["attacked"]), *cells(server, dp["after_noise"])])
        elif c["strategy"] == "fedavg":
            row = cells(server)
            if c["case"] in AUDIT_HEADLINE:
                row[0] = f"**{row[0]}**"
            rows.append([AUDIT_LABELS.get(c["case"], c["case"]) + evals(c), str(server["attacked"]), *row])
        else:
            where = "FOCAL" if c["strategy"] == "focal" else c["strategy"]
            if not server["attackable"] and not any(r[0] == f"{c['strategy']}, server" for r in rows):
                rows.append([f"{c['strategy']}, server" + (" (EfficientNet-Lite0 embeddings)" if where == "FOCAL" else ""),
                             "–", "**0** (not attackable)", "–", "–", "–"])
            side = c.get("institution_side") or {}
            if side.get("attackable"):
                others = side["victims_per_aggregate"][0]
                label = (f"{c['strategy']}, institution side, {others} other institution"
                         f"{'s' if others > 1 else ''} in the aggregate{evals(c)}")
                rows.append([label, str(side["attacked"]), *cells(side)])
    doc = audit_doc()
    first = doc["cases"][0]["loadavg_before"][0]
    return md_table(["case", "attacked", "leakage rate (server)", "SSIM median", "PSNR median (dB)", "labels right"],
                    rows) + (f"\nAll cases: {doc['total_wall_time_s']:.0f} s on {doc['machine']['cpus']} CPU cores, "
                             f"load average (1 min) {first:.1f} at the start, {doc['loadavg_end'][0]:.1f} at the end.\n")


# --------------------------------------------------------------- code: run-config tables
def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_renderer(name: str) -> Callable[[str], str]:
    """Key and default columns from :class:`RunConfig`; the README's meaning column is kept.

    The first column names one or more run-config keys (```key```, comma-separated); the
    default column is regenerated from the dataclass (a trailing ``(note)`` in it is kept). A
    key that is not a run-config setting fails the render.
    """
    def render(current: str) -> str:
        from flower_focal.config import RunConfig

        defaults = RunConfig()
        lines = [line for line in current.splitlines() if line.startswith("|")]
        if len(lines) < 3:
            raise ValueError(f"table:{name}: the README section holds no table to keep the meanings of")
        rows = []
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            keys = re.findall(r"`([\w-]+)`", cells[0])
            unknown = [k for k in keys if k.replace("-", "_") not in RunConfig.settings()]
            if not keys or unknown:
                raise ValueError(f"table:{name}: not run-config keys: {unknown or cells[0]}")
            note = re.search(r" (\(.*\))$", cells[1])
            default = ", ".join(_default_text(getattr(defaults, k.replace("-", "_"))) for k in keys)
            rows.append([", ".join(f"`{k}`" for k in keys), default + (f" {note[1]}" if note else ""),
                         *cells[2:]])
        header = [c.strip() for c in lines[0].strip().strip("|").split(" | ")]
        return md_table(header, rows)
    return render


def render_cache_regions(current: str) -> str:
    """Every region of :data:`flower_focal.cache.REGIONS`: name, bound, variable, what it holds."""
    from flower_focal.cache import REGIONS

    rows = [[f"`{r.name}`", f"{r.default:g} {r.unit}", f"`{r.env}`", r.holds] for r in REGIONS]
    return md_table(["region", "default bound", "variable", "holds"], rows)


# ------------------------------------------------------------------- run: example outputs
def render_preflight_example() -> str | None:
    """What ``python -m simulations.run`` prints when the partition cannot be made: 400
    Dirichlet institutions on PathMNIST's 701 training images (the data path shortened)."""
    data = shared_npz("pathmnist")
    if data is None:
        return None
    from flower_focal.config import RunConfig
    from flower_focal.preflight import PreflightError, failure_line, preflight

    try:
        preflight(RunConfig(dataset="medmnist", data_path=str(data), partitioner="dirichlet"), 400)
    except PreflightError as exc:
        line = failure_line(exc).replace(str(data.parent), "...")
        return f"```text\n{line}\n```\n"
    raise AssertionError("preflight accepted 400 Dirichlet institutions on PathMNIST")


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Table:
    kind: str  # "results" | "code" | "run"
    render: Callable[..., str | None]  # () -> text, or (current text) -> text for "code"; None = skipped
    sources: tuple[str, ...] = ()  # results files (benchmarks/results/) or the code it reads


TABLES: dict[str, Table] = {
    "he-fedavg-micro": Table("results", render_he_fedavg_micro, ("he_fedavg-micro.json",)),
    "he-fedavg-rounds": Table("results", render_he_fedavg_rounds, ("he_fedavg-rounds.json",)),
    "he-fedavg-break-even": Table("results", render_he_fedavg_break_even, ("he_fedavg-rounds.json",)),
    "he-fedavg-time-split": Table("results", render_he_fedavg_time_split, ("he_fedavg-rounds.json",)),
    "focal-quality": Table("results", render_focal_quality,
                           ("focal_quality-twin.json", "focal_quality-encrypted-iid.json")),
    "focal-real": Table("results", render_focal_real, ("focal_real.json",)),
    "quality": Table("results", render_quality, tuple(QUALITY_FILES + QUALITY_HE_FILES + QUALITY_SERVER_MOMENTUM_FILES
                                                      + QUALITY_DITTO_FILES)),
    "quality-rounds": Table("results", render_quality_rounds, ("quality-pathmnist-iid.json", *QUALITY_ROUNDS_FILES)),
    "quality-ditto": Table("results", render_quality_ditto, tuple(QUALITY_DITTO_LAMBDA_FILES)),
    "dp": Table("results", render_dp, ("dp.json", "flower_focal/privacy.py")),
    "audit": Table("results", render_audit, ("audit.json",)),
    "settings-training": Table("code", settings_renderer("settings-training"), ("flower_focal/config.py",)),
    "settings-gpu": Table("code", settings_renderer("settings-gpu"), ("flower_focal/config.py",)),
    "preflight-example": Table("run", render_preflight_example, ("flower_focal/preflight.py",)),
    "cache-regions": Table("code", render_cache_regions, ("flower_focal/cache.py",)),
    "server-sum": Table("results", render_server_sum, ("server_sum.json",)),
    "server-opt-bn": Table("results", render_server_opt_bn, ("server_opt_bn.json",)),
    "fedbn-upload": Table("results", render_fedbn_upload, ("fedbn_upload.json",)),
    "deployment": Table("results", render_deployment, ("deployment-before.json", "deployment.json")),
    "deployment-messages": Table("results", render_deployment_messages,
                                 ("deployment-before.json", "deployment.json")),
    "comparison-example": Table("results", render_comparison_example,
                                ("comparison-example.json", "flower_focal/compare.py")),
    "comparison-audits": Table("results", render_comparison_audits, ("comparison-example.json",)),
    "he-fedavg-pathmnist": Table("results", render_he_fedavg_pathmnist, ("he_fedavg-pathmnist.json",)),
    "focal-scale": Table("results", render_focal_scale, ("focal_scale-before.json", "focal_scale.json")),
    "he-presets": Table("results", render_he_presets, ("crypto_presets.json", "flower_focal/crypto/params.py")),
    "gpu-path": Table("results", render_gpu_path, ("gpu_path.json",)),
    "client-imports": Table("results", render_client_imports, ("client_imports-before.json", "client_imports.json")),
}
if QUALITY_CV_FILES:  # registered once bench_quality --cv results are stored (then the README needs the section)
    TABLES["quality-cv"] = Table("results", render_quality_cv, tuple(QUALITY_CV_FILES))


def sections(text: str) -> dict[str, re.Match]:
    found: dict[str, re.Match] = {}
    for m in MARKER.finditer(text):
        if m["name"] in found:
            raise ValueError(f"table:{m['name']} appears twice in the README")
        found[m["name"]] = m
    opened = set(re.findall(r"^<!-- table:([\w-]+) -->$", text, re.MULTILINE))
    if opened - set(found):
        raise ValueError(f"table markers without their closing marker: {sorted(opened - set(found))}")
    return found


def regenerate(text: str, names: list[str]) -> tuple[str, dict[str, str]]:
    """The README with every named section re-rendered, and what happened to each table."""
    found = sections(text)
    unknown = sorted(set(found) - set(TABLES))
    if unknown:
        raise ValueError(f"README tables without a renderer in benchmarks/readme_tables.py: {unknown}")
    status: dict[str, str] = {}
    out, pos = [], 0
    for m in sorted(found.values(), key=lambda m: m.start()):
        name, body = m["name"], m["body"]
        table = TABLES[name]
        new = body
        if name not in names:
            status[name] = "not selected"
        else:
            rendered = table.render(body) if table.kind == "code" else table.render()
            if rendered is None:
                status[name] = "skipped (needs ../shared/data)"
            else:
                new, status[name] = rendered, "rendered"
        out += [text[pos:m.start()], f"<!-- table:{name} -->\n{new}<!-- /table:{name} -->\n"]
        pos = m.end()
    out.append(text[pos:])
    missing = sorted(set(names) - set(found))
    for name in missing:
        status[name] = "missing from the README"
    return "".join(out), status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff if the README differs")
    mode.add_argument("--write", action="store_true", help="rewrite the README's marked sections")
    mode.add_argument("--list", action="store_true", help="list the tables")
    p.add_argument("--tables", nargs="+", default=sorted(TABLES), choices=sorted(TABLES), metavar="NAME")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    if args.list:
        for name, t in TABLES.items():
            print(f"{name:22} {t.kind:8} {', '.join(t.sources)}")
        return 0
    text = args.readme.read_text()
    new, status = regenerate(text, args.tables)
    for name, what in status.items():
        print(f"table:{name}: {what}", file=sys.stderr)
    if any(what == "missing from the README" for what in status.values()):
        return 1
    if args.write:
        if new != text:
            args.readme.write_text(new)
        return 0
    if new != text:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                   "README.md", "README.md (regenerated)"))
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # flower_focal from this checkout when it is not installed
    raise SystemExit(main())
