"""Compare the jobs of a finished (or partly failed) multirun: report.md and curves.png in the sweep dir.

Each job is read from what the run itself wrote: its overrides (.hydra/overrides.yaml), its metrics.json and
its TensorBoard events (through TensorBoard's own EventAccumulator). Jobs are grouped by the keys the sweep
varied (seeds excepted), or by the keys given with `by=`. Jobs that failed (with their error line), stopped
unfinished or never ran are listed from the sweep's own record of its jobs (cnnlab.sweep.jobs).
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnnlab import UserError, write_atomically
from cnnlab.sweep import jobs as sweep_jobs

# The slides' test accuracy for each training option (a row of the report shows it where the group matches).
SLIDES = {"optimizer=adam": ("Option 1", 0.7051), "optimizer=sgd_steplr": ("Option 2", 0.7016)}
CURVES = {"val/acc": ("validation accuracy (%)", 100), "train/loss_epoch": ("training loss", 1)}  # title, scale
REPORTED = ("test/acc", "val/acc_best", "epochs", "wall_s")
NOT_GROUPED = ("seed", "ckpt_path", "outputs_root")  # what tells runs apart, not what they compare


def overrides_of(overrides: list[str]) -> dict[str, str]:
    """key → value as given, read by Hydra's own parser (a deletion, ~key, has no value to compare)."""
    from cnnlab.config import parse_overrides

    return {o.key_or_group: o.get_value_element_as_str() for o in parse_overrides(overrides) if not o.is_delete()}


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    metrics: dict | None  # None: the job did not finish
    curves: dict[str, list[float]] = field(default_factory=dict)
    outcome: str = ""  # for a job that did not finish: its error line, "unfinished", "never ran", "pruned at …"
    pruned: bool = False  # a search's trial that its pruner stopped early: not compared with the finished ones


def read_jobs(sweep: Path) -> list[Job]:
    if not (sweep / "multirun.yaml").is_file():
        raise UserError(f"{sweep} is not a multirun dir: it has no multirun.yaml (made by `train.py -m`)")
    jobs = []
    for job in sweep_jobs(sweep):
        if job.folder is None:
            name = f"{job.number} ({' '.join(job.overrides)})"
            jobs.append(Job(name, overrides_of(job.overrides), None, {}, "never ran"))
            continue
        overrides = overrides_of(yaml.safe_load((job.folder / ".hydra" / "overrides.yaml").read_text()) or [])
        metrics = json.loads((job.folder / "metrics.json").read_text()) if job.state == "finished" else None
        curves = read_curves(job.folder) if metrics else {}
        jobs.append(Job(job.folder.name, overrides, metrics, curves, job.error or job.state, job.state == "pruned"))
    if not jobs:
        raise UserError(f"{sweep}: no job folders (<n>_<overrides>/.hydra/overrides.yaml) in this multirun")
    return jobs


def read_curves(job_dir: Path) -> dict[str, list[float]]:
    """Per-epoch scalars from the job's TensorBoard events, in step order. The whole events folder is read as one
    run, as TensorBoard reads it: a run resumed from an earlier checkpoint has one events file per start, and the
    later start hides what the earlier one logged from its first step on (purge_step), so each epoch counts once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(job_dir / "tensorboard"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in CURVES if tag in scalars}


def group_keys(jobs: list[Job], by: list[str] | None) -> list[str]:
    keys = sorted({key for job in jobs for key in job.overrides})
    if by:
        unknown = [key for key in by if key not in keys]
        if unknown:
            raise UserError(f"by={','.join(by)}: {unknown} was not overridden in this sweep; keys: {keys}")
        return by
    varied = [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1 and key not in NOT_GROUPED]
    return varied


def summarise(sweep: Path, by: list[str] | None = None) -> tuple[str, dict[str, list[Job]]]:
    """The report's markdown and the finished jobs grouped by the keys."""
    jobs = read_jobs(sweep)
    finished = [job for job in jobs if job.metrics is not None]
    failed = [job for job in jobs if job.metrics is None and not job.pruned]
    pruned = [job for job in jobs if job.pruned]
    if not finished:
        raise UserError(f"{sweep}: none of its {len(jobs)} jobs finished (no metrics.json): nothing to report")
    # each a number, but val/acc_best is null in a run that validated nothing (data.val_size=0)
    lacks = lambda metrics, k: k not in metrics or (metrics[k] is None and k != "val/acc_best")  # noqa: E731
    missing = {job.name: [k for k in REPORTED if lacks(job.metrics, k)] for job in finished}
    missing = {name: keys for name, keys in missing.items() if keys}
    if missing:
        raise UserError(f"{sweep}: jobs lack metrics {missing}: were they made by another version of train.py?")

    keys = group_keys(jobs, by)
    groups: dict[str, list[Job]] = {}
    for job in finished:
        label = ",".join(f"{key}={job.overrides.get(key, '(default)')}" for key in keys) or "all jobs"
        groups.setdefault(label, []).append(job)
    groups = dict(sorted(groups.items()))  # the same order, and colours, whatever order the sweep ran in

    lines = [
        f"# {sweep.name}",
        "",
        f"Grouped by {', '.join(keys) or 'nothing (one group)'}; {len(finished)} finished jobs, "
        f"{len(failed)} did not finish{f', {len(pruned)} were pruned' if pruned else ''}.",
        "Accuracies in %, mean ± std over the runs of a group (std needs two runs); wall time per run.",
        "",
        "| group | runs | test acc | min – max | best val acc | epochs | wall s | slides |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, members in groups.items():
        test = [100 * job.metrics["test/acc"] for job in members]
        val = [100 * job.metrics["val/acc_best"] for job in members if job.metrics["val/acc_best"] is not None]
        epochs = sorted({job.metrics["epochs"] for job in members})
        wall = statistics.mean(job.metrics["wall_s"] for job in members)
        slides = [f"{name}: {100 * acc:.2f}" for part, (name, acc) in SLIDES.items() if part in label.split(",")]
        lines.append(
            f"| {label} | {len(members)} | {mean_std(test)} | {min(test):.2f} – {max(test):.2f} | {mean_std(val)} "
            f"| {'/'.join(map(str, epochs))} | {wall:.0f} | {', '.join(slides) or '–'} |"
        )
    lines += ["", "| job | test acc | best val acc | epochs | wall s |", "| --- | --- | --- | --- | --- |"]
    for job in finished:
        test, val = 100 * job.metrics["test/acc"], job.metrics["val/acc_best"]  # None: data.val_size=0
        val = "–" if val is None else f"{100 * val:.2f}"
        lines.append(f"| {job.name} | {test:.2f} | {val} | {job.metrics['epochs']} | {job.metrics['wall_s']:.0f} |")
    if failed:
        lines += ["", "Jobs that did not finish (no metrics.json):", ""]
        lines += [f"- {job.name}: {job.outcome}" for job in failed]
    if pruned:
        lines += ["", "Trials the search's pruner stopped early (not in the groups above):", ""]
        lines += [f"- {job.name}: {job.outcome}" for job in pruned]
    return "\n".join(lines) + "\n", groups


def mean_std(values: list[float]) -> str:
    if not values:  # no validation: data.val_size=0
        return "–"
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot_curves(groups: dict[str, list[Job]], path: Path) -> None:
    """Validation accuracy and training loss per epoch: mean line and min–max band, one colour per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4.2))
    for colour, (label, members) in enumerate(groups.items()):
        for axis, (tag, (_, scale)) in zip(axes, CURVES.items(), strict=True):
            runs = [job.curves.get(tag, []) for job in members]
            length = min(map(len, runs))
            if length == 0:
                continue
            values = scale * np.array([run[:length] for run in runs])
            epochs = np.arange(1, length + 1)
            axis.plot(epochs, values.mean(0), color=f"C{colour}", label=f"{label} ({len(runs)} runs)")
            axis.fill_between(epochs, values.min(0), values.max(0), color=f"C{colour}", alpha=0.2)
    for axis, (title, _) in zip(axes, CURVES.values(), strict=True):
        axis.set(title=title, xlabel="epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda file: fig.savefig(file, format="png", dpi=110))
    plt.close(fig)


def compare(sweep: str | Path, by: list[str] | None = None) -> str:
    """Write report.md and curves.png into the sweep dir; return the report."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise UserError(f"{sweep}: no such directory")
    report, groups = summarise(sweep, by)
    for name in ("report.md", "curves.png"):
        if (sweep / name).exists():
            print(f"note: replacing the existing {sweep / name}")
    plot_curves(groups, sweep / "curves.png")
    write_atomically(sweep / "report.md", lambda file: file.write(report.encode()))
    return report
