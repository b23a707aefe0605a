"""``locallip certify-model``: a model trained anywhere, certified like the pipeline's own.

* a plain Sequential trained here, saved as safetensors + a layer list, gets exactly the
  certificates the library API gives on the same points;
* the pipeline's exported model, re-certified, reproduces the pipeline's certificates byte for byte;
* every unsupported layer and bad input is a one-line error that writes nothing;
* the docs' worked example runs as written; models declared in config/external/ build through Snakemake.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from locallip.bounds import global_bound
from locallip.certify import certify
from locallip.certify.split import batches
from locallip.foundation import layout as paths
from locallip.nn.describe import UnsupportedModel, describe
from locallip.pipeline import cli

from pipeline_helpers import REPO, SMOKE, copy_project, env_for, smoke_project, snakemake

pytestmark = pytest.mark.usefixtures("own_rng")


def _points(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (n,), generator=g)
    x = (centers[y] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return x, y


def _trained_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    x, y = _points(256, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@pytest.fixture
def saved(tmp_path):
    net = _trained_sequential()
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    (tmp_path / "net.json").write_text(json.dumps(describe(net, (1, 6, 6))))
    x, y = _points()
    np.savez(tmp_path / "points.npz", x=x.numpy(), y=y.numpy())
    return net, tmp_path


def _cli(argv, capsys, threads=1):
    before = torch.get_num_threads()
    try:
        rc = cli.main(list(argv) + ["--no-progress", "--threads", str(threads)])
    finally:
        torch.set_num_threads(before)
    return rc, capsys.readouterr().err


def test_a_sequential_trained_here_gets_exactly_the_api_certificates(saved, capsys):
    net, d = saved
    out = d / "out"
    rc, err = _cli(["certify-model", "--model", str(d / "net.safetensors"), "--arch", str(d / "net.json"),
                    "--data", str(d / "points.npz"), "--radius", "0.05", "--radius", "0.2", "--out", str(out)], capsys)
    assert rc == 0, err
    x, y = _points()
    model = net.double().eval()
    g = global_bound(model, input_shape=(1, 6, 6))
    for r in (0.05, 0.2):
        rows = list(csv.DictReader(open(out / "certify" / f"radius_{r!r}.csv")))
        assert len(rows) == len(y)
        for start, gen in batches(len(y), 64, 0):  # the certify settings' batches and seed rule
            c = certify(model, x[start:start + 64].double(), y[start:start + 64], r, generator=gen, global_result=g)
            for i in range(c.certified.shape[0]):
                row = rows[start + i]
                assert (row["certified_local"] == "True") == bool(c.certified[i])
                assert float(row["worst_margin_local"]) == float(c.worst_margin[i])
                assert row["step_local"] == c.step_names()[i]
        summary = json.loads((out / "certify" / f"radius_{r!r}.json").read_text())
        assert summary["attack"]["broken"] == 0 and summary["n"] == len(y)
    assert (out / "certify" / "radii.csv").is_file() and "| 0.05 |" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_project(tmp_path_factory)


def test_the_exported_pipeline_model_recertifies_byte_for_byte(smoke, tmp_path, capsys):
    exported = paths.exported(SMOKE, smoke / "results")
    card = json.loads(exported["card_json"].read_text())
    assert card["architecture"]["spec"]["arch"] == "2c2f" and card["data"]["sha256"]["test_x"]
    assert [round(r["radius"], 6) for r in card["certified"]] == [0.1, 0.3]
    radii = [0.1, 0.3]
    settings = json.loads((smoke / paths.certificate(SMOKE, 0.1)).read_text())["provenance"]["settings"]["certify"]
    decl = {"name": "smoke_export", "model": str(exported["weights"]), "architecture": str(exported["architecture"]),
            "data": str(smoke / paths.splits(SMOKE)), "radii": radii, "certify": settings, "curve": {"enabled": False}}
    (tmp_path / "decl.yaml").write_text(yaml.safe_dump(decl))
    rc, err = _cli(["certify-model", "--config", str(tmp_path / "decl.yaml"), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    for r in radii:  # the smoke run certified on one thread too (the rules pass --threads 1)
        ours = (tmp_path / "out" / "certify" / f"radius_{r!r}.csv").read_bytes()
        assert ours == (smoke / paths.certificate_table(SMOKE, r)).read_bytes(), r


def _bad_cases(d: Path):
    """(name, argv) of inputs that must be refused with one line before any work."""
    base = ["--model", str(d / "net.safetensors"), "--arch", str(d / "net.json"), "--data", str(d / "points.npz"),
            "--radius", "0.1"]

    def arch(layers):
        p = d / f"arch{len(list(d.glob('arch*')))}.json"
        p.write_text(json.dumps({"input_shape": [1, 6, 6], "layers": layers}))
        return p

    def data(name, **arrays):
        p = d / f"{name}.npz"
        np.savez(p, **arrays)
        return p

    x, y = _points()
    good = json.loads((d / "net.json").read_text())["layers"]
    torch.save({"x": _Evil()}, d / "evil.pt")
    (d / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    return [
        ("pooling", ["--arch", str(arch([{"type": "maxpool2d", "kernel_size": 2}] + good))], "maxpool2d"),
        ("batch norm", ["--arch", str(arch([good[0], {"type": "batchnorm2d"}] + good[1:]))], "batchnorm2d"),
        ("weights of another net", ["--arch", str(arch([{"type": "flatten"}, {"type": "linear", "in_features": 36,
                                                                                "out_features": 3}]))],
         "do not match the architecture"),
        ("floats outside [0, 1]", ["--data", str(data("big", x=(x * 255).numpy(), y=y.numpy()))], "must lie in [0, 1]"),
        ("wrong image shape", ["--data", str(data("shape", x=x[:, :, :5].numpy(), y=y.numpy()))], "do not fit"),
        ("labels outside the classes", ["--data", str(data("labels", x=x.numpy(), y=(y + 5).numpy()))],
         "labels outside [0, 3)"),
        ("missing weights", ["--model", str(d / "none.safetensors")], "not found"),
        ("corrupt weights", ["--model", str(d / "corrupt.safetensors")], "cannot load weights"),
        ("pickled objects", ["--model", str(d / "evil.pt")], "cannot load weights"),
        ("negative radius", ["--radius", "-1"], "radius"),
    ], base


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsupported_layers_and_bad_inputs_are_one_line_errors_that_write_nothing(saved, capsys):
    _, d = saved
    cases, base = _bad_cases(d)
    for name, change, message in cases:
        argv = dict(zip(base[::2], base[1::2]))
        argv.update(dict(zip(change[::2], change[1::2])))
        out = d / "out" / re.sub(r"\W", "_", name)
        flat = [a for kv in argv.items() for a in kv]
        try:
            rc, err = _cli(["certify-model", *flat, "--out", str(out)], capsys)
        except SystemExit as e:  # argparse's own refusal (a negative radius)
            rc, err = e.code, capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc == 2 and message in err and "Traceback" not in err, (name, err)
        assert len(lines) == 1 or lines[0].startswith("usage:"), (name, err)
        assert not out.exists(), name


def test_describe_names_an_unsupported_layer():
    for module, name in ((nn.GroupNorm(2, 4), "GroupNorm"), (nn.MaxPool2d(2), "MaxPool2d"), (nn.Dropout(), "Dropout")):
        net = nn.Sequential(nn.Conv2d(1, 4, 3), module, nn.Flatten(), nn.Linear(4, 3))
        with pytest.raises(UnsupportedModel, match=f"layer 1 \\({name}\\) is not supported; supported layers"):
            describe(net, (1, 3, 3))

    class Residual(nn.Module):
        def forward(self, x):
            return x + x

    with pytest.raises(UnsupportedModel, match="Residual"):
        describe(nn.Sequential(nn.Flatten(), Residual(), nn.Linear(9, 3)), (1, 3, 3))


def _blocks(markdown: str):
    return re.findall(r"```(python|bash)\n(.*?)```", markdown, flags=re.S)


def test_the_docs_worked_example_runs_as_written(tmp_path):
    doc = (REPO / "docs" / "certify-your-own-model.md").read_text()
    blocks = _blocks(doc)
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    env = env_for(REPO)
    for lang, code in blocks:
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-ec", code]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (lang, p.stdout[-2000:], p.stderr[-2000:])
    out = tmp_path / "results" / "external" / "net"
    report = (out / "report.md").read_text()
    assert "| 0.1 |" in report and "| 0.3 |" in report and "0/" in report
    _the_docs_state_what_the_example_printed(doc, out)


def _the_docs_state_what_the_example_printed(doc: str, out: Path):
    """The report lines the docs quote are the report's; the counts their prose states are the outputs'."""
    stated = re.findall(r"```text\n(.*?)```", doc, flags=re.S)
    assert len(stated) == 1
    report_lines = set((out / "report.md").read_text().splitlines())
    for line in stated[0].strip().splitlines():
        assert line in report_lines, line
    table = [line.strip() for line in doc.splitlines() if line.strip().startswith("| ")]
    assert any("by linear relaxation" in line for line in table)  # the steps table, with the new step
    for line in table:
        assert line in report_lines, line
    prose = " ".join(doc.split())
    steps = {float(r["radius"]): r for r in csv.DictReader(open(out / "certify" / "steps.csv"))}
    s01, s03 = (json.loads((out / "certify" / f"radius_{r}.json").read_text()) for r in ("0.1", "0.3"))
    radii = json.loads((out / "certify" / "radii.json").read_text())
    n_correct = round(s01["clean_acc"] * s01["n"])
    claims = [
        f"{n_correct} of the {s01['n']} points are classified correctly",
        f"the correct points left after the boxes, {n_correct - int(steps[0.1]['global']) - int(steps[0.1]['box'])} "
        f"at 0.1 and {n_correct - int(steps[0.3]['global']) - int(steps[0.3]['box'])} at 0.3",
        f"It certifies {steps[0.1]['linear_relaxation']} of them at 0.1 and {steps[0.3]['linear_relaxation']} at 0.3",
        f"the rest ({steps[0.1]['excluded_by_screen']} and {steps[0.3]['excluded_by_screen']}:",
        f"({s01['attack']['certified']['checked']} and {s03['attack']['certified']['checked']})",
        f"({s01['attack']['misclassified_robust']['checked']} and {s03['attack']['misclassified_robust']['checked']})",
        f"searched on [0, {radii['max_radius']:g}]", f"relative tolerance of {100 * radii['tol']:g} %",
        f"{radii['global_above_max_radius']} of the {radii['points']} points have a global radius above "
        f"{radii['max_radius']:g}",
        f"costs it {s01['steps']['certified'] - s03['steps']['certified']} of its {s01['steps']['certified']}",
        f"`guarantee_level` says `{s01['guarantee_level']}`",
        f"({steps[0.1]['global']} of {steps[0.1]['certified']} at 0.1, {steps[0.3]['global']} of "
        f"{steps[0.3]['certified']} at 0.3)",
        f"the boxes add {'one point' if steps[0.1]['box'] == '1' else steps[0.1]['box']}",
    ]
    for r, s in ((0.1, s01), (0.3, s03)):  # every correct point left uncertified was excluded by the screen,
        assert int(steps[r]["excluded_by_screen"]) == n_correct - s["steps"]["certified"]
        # and the screen excluded every correct point left after the boxes (masked norms decided none)
        assert int(steps[r]["exact"]) + int(steps[r]["probabilistic"]) + int(steps[r]["estimate"]) == 0
    for claim in claims:
        assert claim in prose, claim


def test_models_declared_in_config_external_build_through_snakemake(saved, tmp_path):
    _, d = saved
    project = copy_project(tmp_path / "p")
    decl = {"name": "tiny", "model": str(d / "net.safetensors"), "architecture": str(d / "net.json"),
            "data": str(d / "points.npz"), "radii": [0.05], "limit": 40}
    (project / "config" / "external" / "tiny.yaml").write_text(yaml.safe_dump(decl))
    snakemake(project, "--cores", "1", "results/external/tiny/report.md")
    assert "| 0.05 |" in (project / "results" / "external" / "tiny" / "report.md").read_text()
    p = snakemake(project, "-n", "--cores", "1", "results/external/tiny/report.md")
    assert "Nothing to be done" in p.stdout + p.stderr
    shutil.rmtree(project)
