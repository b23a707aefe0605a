"""The stage table: every stage of the pipeline, written once.

    download --> train --> calibrate --> certify (one job per radius) --> export --> report
                                     \\-> radii (every point's certified radius) ------------/

Each entry says which module and function run the stage, the part of the composed
configuration it depends on (its tracked settings), the files it reads and writes, the
command-line flag of each, and how it runs (per radius, data-parallel, on the submitting
node, threads, resources, what Snakemake's HTML report shows of it, how DVC declares and plots
its outputs, whether a report's baselines run it too). The orchestrators read these fields and
never a stage's name. The CLI (``pipeline.cli``), the Snakemake rules (``workflow/rules/stages.smk``),
``dvc.yaml`` (``pipeline.dvc``), the jobs and commands (``pipeline.dag``) and the
report's "how to reproduce" are all built from it: adding a stage is one entry here and
one module under ``locallip.stages``.

No torch is imported here: orchestrators read the table without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..foundation import layout
from ..foundation.schema import (CalibrateStage, CertifySettings, CertifyStage, Config, ConfigError, DownloadStage,
                                 ExportStage, Normalization, RadiiStage, ReportStage, TrainStage)

Files = Dict[str, Union[str, List[str]]]


@dataclass(frozen=True)
class ReportItem:
    """How Snakemake's HTML report shows one output (caption file under workflow/report/)."""

    caption: str
    category: str
    labels: Dict[str, str]
    subcategory: Optional[str] = None


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the package module that runs it ("stages.train")
    function: str  # its entry point: function(settings, run=RunConfig, **paths)
    config: type  # its settings' dataclass
    help: str
    settings: Callable[[Mapping[str, Config], str, Optional[float]], Any]  # (configs, experiment, radius)
    outputs: Callable[[str, Any], Dict[str, str]]  # (experiment or "{experiment}", radius or "{radius}")
    inputs: Callable[[Any], Dict[str, List[str]]]  # from its settings: named groups of files it reads
    options: Callable[[Any], Files] = lambda s: {}  # untracked paths it is told (resume state, baseline dirs)
    flags: Dict[str, str] = field(default_factory=dict)  # CLI flag of each input group / output / option it is given
    per_radius: bool = False  # one job per certification radius (--radius)
    enabled: Callable[[Config], bool] = lambda cfg: True
    parallel: bool = False  # data-parallel under torchrun when run.processes > 1 (one process per GPU)
    local: bool = False  # runs on the submitting node (no GPU, no cluster job)
    threads: int = 1
    priority: int = 0  # Snakemake starts higher first among ready jobs (the long chains: training)
    resources: Dict[str, int] = field(default_factory=dict)  # mem_mb, runtime (minutes); gpu follows `parallel`
    report: Dict[str, ReportItem] = field(default_factory=dict)  # outputs in Snakemake's HTML report
    dvc: Dict[str, str] = field(default_factory=dict)  # output -> "outs" (cached) | "metrics" | "plots"
    # dvc.yaml's top-level plots of one job: (experiment, its outputs) -> [{plot id: definition}]
    dvc_plots: Callable[[str, Dict[str, str]], List[dict]] = lambda experiment, outputs: []
    # An experiment runs it also when a report that shows the experiment as a baseline runs it
    # (the report compares its output across systems), even where the experiment turns it off.
    run_for_baselines: bool = False
    # Its settings' `reproduce` gets the commands that rebuild the experiment (every other stage's);
    # its own comes last in that list, composed from config/.
    shows_reproduce_commands: bool = False
    experiment: Callable[[Any], str] = lambda s: s.name  # the experiment its settings are for
    repeated_flags: Tuple[str, ...] = ()  # options that are lists of paths: the flag is given once per path

    def flag_keys(self) -> List[str]:
        return list(self.flags)


# --------------------------------------------------------------------------- settings of each stage


def _certify_settings(cfg: Config) -> CertifySettings:
    from dataclasses import fields

    return CertifySettings(**{f.name: getattr(cfg.certify, f.name) for f in fields(CertifySettings)})


def curve_top(cfg: Config) -> float:
    top = cfg.curve.max_radius or 2 * max(float(r) for r in cfg.certify.radii)
    return float(top) if top > 0 else 1.0


def _download(cfgs, name, radius):
    return DownloadStage(name=name, dataset=cfgs[name].dataset)


def _train(cfgs, name, radius):
    cfg = cfgs[name]
    return TrainStage(name=name, normalization=Normalization(list(cfg.dataset.mean), list(cfg.dataset.std)),
                      model=cfg.model, train=cfg.train)


def _calibrate(cfgs, name, radius):
    return CalibrateStage(name=name, calibrate=cfgs[name].calibrate)


def _certify(cfgs, name, radius):
    from ..foundation.ranges import check_radius

    if radius is None:
        raise ConfigError("certify needs a radius")
    return CertifyStage(name=name, radius=check_radius(radius), certify=_certify_settings(cfgs[name]))


def _radii(cfgs, name, radius):
    cfg = cfgs[name]
    return RadiiStage(name=name, max_radius=curve_top(cfg), tol=cfg.curve.tol, batch_size=cfg.curve.batch_size,
                      certify=_certify_settings(cfg))


def _export(cfgs, name, radius):
    return ExportStage(name=name, radii=[float(r) for r in cfgs[name].certify.radii])


def _report(cfgs, name, radius):
    import dataclasses

    from ..foundation.schema import RunConfig

    from ..foundation.compose import compose

    strip = (lambda c: dataclasses.replace(c, run=RunConfig()))  # the report reads everything but `run`
    # Baselines the caller did not compose come from config/ as committed.
    base = {b: cfgs[b] if b in cfgs else compose(b) for b in cfgs[name].report.baselines}
    return ReportStage(config=strip(cfgs[name]), baselines={b: strip(c) for b, c in base.items()})


# --------------------------------------------------------------------------- files of each stage


def _report_inputs(s: ReportStage) -> Dict[str, List[str]]:
    cfg = s.config
    name, radii = cfg.name, [float(r) for r in cfg.certify.radii]
    out = {"metrics": [str(layout.train_metrics(name))], "calibration": [str(layout.calibration(name))],
           "certificates": [str(layout.certificate(name, r)) for r in radii],
           "tables": [str(layout.certificate_table(name, r)) for r in radii],
           "radii": [str(layout.radii_table(name))] if cfg.curve.enabled else [], "baselines": [],
           # every system's export is part of what its report stands for (and links)
           "exports": [str(layout.exported(n)["card_json"]) for n in [name, *s.baselines]]}
    for b, bcfg in s.baselines.items():
        out["baselines"] += [str(layout.train_metrics(b)), str(layout.calibration(b))]
        out["baselines"] += [str(layout.certificate(b, r)) for r in radii]
        out["baselines"] += [str(layout.radii_table(b))] if bcfg.curve.enabled else []
    return out


def _training_plots(experiment: str, outputs: Dict[str, str]) -> List[dict]:
    metrics = outputs["metrics"]
    return [{f"training-{experiment}": {"title": f"{experiment}: validation accuracy per epoch", "x": "epoch",
                                        "y": {metrics: ["val_clean_acc", "val_certified_acc"]}}},
            {f"loss-{experiment}": {"title": f"{experiment}: training loss per epoch", "x": "epoch",
                                    "y": {metrics: ["loss"]}}}]


def _splits_and(model_path) -> Callable[[Any], Dict[str, List[str]]]:
    return lambda s: {"data": [str(layout.splits(s.name))], "model": [str(model_path(s.name))]}


_CAPTIONS = "../report/"

STAGES: Tuple[Stage, ...] = (
    Stage("download", "stages.download", "run_download", DownloadStage,
          "fetch and verify the dataset, write the splits", _download,
          outputs=lambda n, r: {"out": str(layout.splits(n))}, inputs=lambda s: {},
          flags={"out": "--out"}, local=True, dvc={"out": "outs"}),
    Stage("train", "stages.train", "run_train", TrainStage, "train with the local (or global) bound", _train,
          outputs=lambda n, r: {"out": str(layout.model(n)), "metrics": str(layout.train_metrics(n))},
          inputs=lambda s: {"data": [str(layout.splits(s.name))]},
          options=lambda s: {"state": str(layout.train_state(s.name))},
          flags={"data": "--data", "out": "--out", "metrics": "--metrics", "state": "--state"},
          # One thread per training: on CPUs two trainings side by side get ~1.3x the work of one
          # on two threads (bench/train_step.py, --threads 1 vs 2); raise it with --set-threads train=N.
          parallel=True, threads=1, priority=1, resources={"mem_mb": 16000, "runtime": 24 * 60},
          dvc={"out": "outs", "metrics": "metrics"}, dvc_plots=_training_plots),
    Stage("calibrate", "stages.calibrate", "run_calibrate", CalibrateStage,
          "choose clipping thresholds on the calibration split", _calibrate,
          outputs=lambda n, r: {"out": str(layout.calibrated_model(n)), "summary": str(layout.calibration(n))},
          inputs=_splits_and(layout.model),
          flags={"data": "--data", "model": "--model", "out": "--out", "summary": "--summary"},
          resources={"mem_mb": 8000, "runtime": 120}, dvc={"out": "outs", "summary": "metrics"}),
    Stage("certify", "stages.certify", "run_certify", CertifyStage, "certify the test split at one radius",
          _certify, outputs=lambda n, r: {"out": str(layout.certificate(n, r)),
                                          "table": str(layout.certificate_table(n, r))},
          inputs=_splits_and(layout.calibrated_model),
          flags={"data": "--data", "model": "--model", "out": "--out", "table": "--table"}, per_radius=True,
          parallel=True, resources={"mem_mb": 8000, "runtime": 240}, dvc={"out": "metrics", "table": "outs"},
          report={"out": ReportItem("certificate.rst", "Certification", {"file": "summary (JSON)"}, "{experiment}"),
                  "table": ReportItem("certificate_table.rst", "Certification", {"file": "per sample (CSV)"},
                                      "{experiment}")}),
    Stage("radii", "stages.radii", "run_radii", RadiiStage,
          "per test point, the largest certified radius (for the report's curve)", _radii,
          outputs=lambda n, r: {"out": str(layout.radii_table(n))}, inputs=_splits_and(layout.calibrated_model),
          flags={"data": "--data", "model": "--model", "out": "--out"}, enabled=lambda cfg: cfg.curve.enabled,
          parallel=True, resources={"mem_mb": 8000, "runtime": 240}, dvc={"out": "outs"}, run_for_baselines=True),
    Stage("export", "stages.export", "run_export", ExportStage,
          "write the calibrated model as safetensors + a layer list, with its model card", _export,
          outputs=lambda n, r: {k: str(v) for k, v in layout.exported(n).items()},
          inputs=lambda s: {"data": [str(layout.splits(s.name))], "model": [str(layout.calibrated_model(s.name))],
                            "certificates": [str(layout.certificate(s.name, r)) for r in s.radii]},
          flags={"data": "--data", "model": "--model", "weights": "--weights", "architecture": "--architecture",
                 "card": "--card", "card_json": "--card-json"},
          local=True, dvc={"weights": "outs", "architecture": "outs", "card": "outs", "card_json": "metrics"}),
    Stage("report", "stages.report", "run_report", ReportStage, "write results/<experiment>/report.md", _report,
          outputs=lambda n, r: {"out": str(layout.report(n)), "training_plot": str(layout.training_plot(n)),
                                "diagnostics_plot": str(layout.diagnostics_plot(n)),
                                "radius_plot": str(layout.radius_plot(n)),
                                "time_plot": str(layout.time_plot(n)), "steps_table": str(layout.steps_table(n))},
          inputs=_report_inputs,
          options=lambda s: {"experiment_dir": str(layout.experiment_dir(s.config.name)),
                             "baseline_dirs": [str(layout.experiment_dir(b)) for b in s.baselines]},
          flags={"experiment_dir": "--experiment-dir", "baseline_dirs": "--baseline-dir", "out": "--out"},
          repeated_flags=("baseline_dirs",), shows_reproduce_commands=True, experiment=lambda s: s.config.name,
          local=True, dvc={"out": "outs", "training_plot": "plots", "diagnostics_plot": "plots",
                           "radius_plot": "plots", "time_plot": "plots", "steps_table": "plots"},
          report={"out": ReportItem("report.rst", "Report", {"figure": "report (markdown)"}),
                  "training_plot": ReportItem("training.rst", "Training", {"figure": "training curves"}),
                  "diagnostics_plot": ReportItem("diagnostics.rst", "Training",
                                                 {"figure": "fixed neurons, bound ratio"}),
                  "radius_plot": ReportItem("certified_vs_radius.rst", "Certification",
                                            {"figure": "certified accuracy vs radius"}),
                  "time_plot": ReportItem("certified_vs_time.rst", "Training",
                                          {"figure": "certified accuracy vs training time"}),
                  "steps_table": ReportItem("steps.rst", "Certification",
                                            {"file": "certified points per step (CSV)"}, "{experiment}")}),
)

BY_NAME: Dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: Tuple[str, ...] = tuple(BY_NAME)


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(NAMES)}")
    return BY_NAME[name]


def stage_config(cfg: Config, name: str, radius: Optional[float] = None, cfgs: Optional[Mapping[str, Config]] = None):
    """The part of a composed config that stage ``name`` depends on (what orchestrators track).

    E.g. adding a certification radius does not retrain, and ``run`` settings rerun nothing.
    ``cfgs`` holds the other experiments the stage may read (the report's baselines).
    """
    everything = dict(cfgs or {})
    everything[cfg.name] = cfg
    return stage(name).settings(everything, cfg.name, radius)
