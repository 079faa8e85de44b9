"""End to end: the real DVC pipeline and MLflow on a tiny generated dataset.

One temporary copy of the project (git + DVC initialised) with a few samples,
2 folds, 2 small variants and a depth-trend baseline, 1 epoch.  The tests run in
order on the same copy: the first `dvc repro` builds everything; a second does
nothing; changing one variant's param reruns only that variant's training
stages; each checkpoint is stored once in mlruns/ and linked from the DVC cache;
`make train-parallel` runs two training stages at once, one "GPU" each; the
MLflow UI serves the runs; a teammate's clone that pulls from a DVC remote has
nothing to rerun and draws the plots offline; `make exp` compares an experiment in
120 columns; without test labels (as the real data comes) `dvc repro` still completes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tiny_project import BIN, dvc, make_tiny_project, run, tiny_params
from tiny_project import project_env as _env

pytestmark = pytest.mark.slow


def _assert_valid_submission(pipeline_checkout: Path) -> None:
    cmd = ["validate-submission", "--submission", "submission/submission.npz"]
    check = run(
        [str(BIN / "speedstructure"), *cmd, "--test-zip", "data/test.zip"], pipeline_checkout
    )
    assert check.stdout.startswith("OK: 3 arrays")


@pytest.fixture(scope="module")
def pipeline_checkout(tmp_path_factory) -> Path:
    """A temporary copy of the whole project (git + DVC initialised) on the tiny dataset."""
    return make_tiny_project(tmp_path_factory.mktemp("proj"), tiny_params())


@pytest.fixture(scope="module")
def first_repro(pipeline_checkout) -> subprocess.CompletedProcess:
    return dvc("repro", cwd=pipeline_checkout)


def _client(pipeline_checkout: Path):
    import mlflow

    uri = f"sqlite:///{pipeline_checkout / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri)


def test_repro_builds_every_output(pipeline_checkout, first_repro):
    p = pipeline_checkout
    table = (p / "folds/folds.csv").read_text().splitlines()
    assert table[0] == "sample_id,zip,split,group,fold" and len(table) == 1 + 8 + 3
    for v in ("tiny_a", "tiny_b", "baseline_depth_trend"):
        for k in (0, 1):
            d = p / "models" / v / f"fold_{k}"
            assert (
                (d / "best.pt").is_file()
                and (d / "val_preds.npz").is_file()
                and (d / "curves.png").is_file()
            )
            m = json.loads((d / "metrics.json").read_text())
            assert m["epochs"] == 1 and 0 < m["best_val_mape"] < 1
            with np.load(d / "val_preds.npz") as z:
                assert len(z.files) == 4 and z[z.files[0]].dtype == np.float16
    ens = json.loads((p / "ensemble/ensemble.json").read_text())
    assert [f["fold"] for f in ens["folds"]] == [0, 1]
    for f in ens["folds"]:
        assert {m["variant"] for m in f["members"]} == {"tiny_a", "tiny_b"}
        assert abs(sum(m["weight"] for m in f["members"]) - 1) < 1e-9
    ev = json.loads((p / "reports/evaluate.json").read_text())
    assert ev["n_test"] == 3 and 0 < ev["ensemble_mape"] < 1 and 0 < ev["baseline_mape"] < 1
    assert (
        ev["per_depth"]["0-150"]["baseline"] < ev["per_depth"]["150-300"]["baseline"]
    )  # water is easy
    assert set(ev["per_group"]) and ev["best_single"]["run"].startswith(("tiny_a-", "tiny_b-"))
    assert (p / "plots/evaluate/best_median_worst.png").is_file()
    report = run([str(BIN / "speedstructure"), "report"], p).stdout
    assert "Test MAPE on 3 samples" in report
    # the OOD set (data/test_ood.zip, not ingested: 8 + 3 samples in folds.csv above) is
    # predicted by the registered model and scored beside the test set
    assert ev["ood"]["n_test"] == 2 and 0 < ev["ood"]["ensemble_mape"] < 1
    assert "Out-of-distribution test MAPE on 2 samples (test_ood.zip)" in report
    # make data wrote the truth files: families, bodies and the level are scored on both sets
    assert ev["truth"] == "test_truth.npz" and ev["ood"]["truth"] == "test_ood_truth.npz"
    assert sum(v["n"] for v in ev["per_family"].values()) == 3 and ev["level_floor"] == "truth"
    header = (p / "plots/evaluate/per_sample.csv").read_text().splitlines()[0]
    assert header.startswith("sample_id,group,family,ensemble_mape,")
    lean = json.loads((p / "metrics/evaluate.json").read_text())
    assert {"level_error", "ood_level_error"} <= set(lean)
    assert any(k.startswith("r2_lat_") for k in lean) and "family" in report
    _assert_valid_submission(p)
    assert dvc("status", "-q", cwd=p, check=False).returncode == 0


def test_mlflow_holds_one_finished_run_per_training_stage(pipeline_checkout, first_repro):
    client = _client(pipeline_checkout)
    exp = client.get_experiment_by_name("speedstructure")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    keys = sorted((r.data.tags["variant"], r.data.tags["fold"]) for r in runs)
    assert keys == sorted(
        (v, str(k)) for v in ("tiny_a", "tiny_b", "baseline_depth_trend") for k in (0, 1)
    )
    for r in runs:
        assert r.info.status == "FINISHED"
        assert "best_val_mape" in r.data.metrics and "val_mape" in r.data.metrics
        assert r.data.tags["dvc_stage"] == f"train@{r.data.tags['variant']}-f{r.data.tags['fold']}"
        assert r.data.tags["git_commit"]
        assert r.data.params["variant.arch"] in ("eva_fusion", "depth_trend")
        # a reference to the DVC-tracked checkpoint (dvc.lock's MD5), not a copy of it
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
        assert arts == {"model/checkpoint.json"}
        stage = r.data.tags["dvc_stage"]
        assert r.data.tags["checkpoint_md5"] == _locked_md5(pipeline_checkout, stage, "best.pt")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert {"folds", "tune", "tune-fold0", "tune-fold1", "register", "evaluate"} <= names


def _locked_md5(pipeline_checkout: Path, stage: str, name: str) -> str:
    """The MD5 that dvc.lock records for output ``name`` of ``stage``."""
    lock = yaml.safe_load((pipeline_checkout / "dvc.lock").read_text())["stages"][stage]
    (out,) = [o for o in lock["outs"] if o["path"].endswith("/" + name)]
    return out["md5"]


def _copies(folder: Path, md5: str) -> list[Path]:
    from speedstructure.fsutil import file_md5

    return [p for p in folder.rglob("*") if p.is_file() and file_md5(p) == md5]


def test_each_checkpoint_is_stored_once_in_mlruns_and_linked_from_the_cache(
    pipeline_checkout, first_repro
):
    reg = json.loads((pipeline_checkout / "registry/registered.json").read_text())
    assert reg["version"] == 1  # one registered version: one copy of each member
    for v in ("tiny_a", "tiny_b"):
        for k in (0, 1):
            best = pipeline_checkout / "models" / v / f"fold_{k}" / "best.pt"
            md5 = _locked_md5(pipeline_checkout, f"train@{v}-f{k}", "best.pt")
            assert len(_copies(pipeline_checkout / "mlruns", md5)) == 1, best
            cached = pipeline_checkout / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
            assert cached.is_file()
            if not _reflinks(pipeline_checkout):  # hardlink or symlink: one file on disk for both
                assert best.is_symlink() or os.path.samefile(best, cached), best


def _reflinks(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` makes reflinks (copy-on-write clones)."""
    from dvc_objects.fs.system import reflink

    src, dst = folder / ".reflink-probe", folder / ".reflink-probe-2"
    src.write_bytes(b"x")
    try:
        reflink(str(src), str(dst))
        return True
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def test_champion_predicts_what_the_submission_holds(pipeline_checkout, first_repro, tmp_path):
    import mlflow

    from speedstructure.data.samples import ZipSamples

    client = _client(pipeline_checkout)
    mv = client.get_model_version_by_alias("speedstructure-ensemble", "champion")
    reg = json.loads((pipeline_checkout / "registry/registered.json").read_text())
    assert int(mv.version) == reg["version"] == 1 and reg["champion"]
    store = sorted((p, p.stat().st_mtime_ns) for p in (pipeline_checkout / "mlruns").rglob("*"))
    uri = "models:/speedstructure-ensemble@champion"
    model = mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path))  # as the model card says
    assert (
        sorted((p, p.stat().st_mtime_ns) for p in (pipeline_checkout / "mlruns").rglob("*"))
        == store
    )
    with ZipSamples(pipeline_checkout / "data/test.zip") as z:
        sid = z.sample_ids[1]
        x = z.read_gathers(sid)
    pred = np.asarray(model.predict(x[None]))
    assert pred.shape == (1, 300, 1259)
    with np.load(pipeline_checkout / "submission/submission.npz") as sub:
        assert sub[sid].dtype == np.float64
        np.testing.assert_allclose(pred[0], sub[sid], rtol=0, atol=1e-5)


def test_second_repro_runs_nothing_and_one_variant_change_reruns_only_it(
    pipeline_checkout, first_repro
):
    out = dvc("repro", cwd=pipeline_checkout).stdout
    assert "Running stage" not in out, out
    params = yaml.safe_load((pipeline_checkout / "params.yaml").read_text())
    params["variants"]["tiny_b"]["drop_path_rate"] = 0.05
    (pipeline_checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=pipeline_checkout).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"train@tiny_b-f0", "train@tiny_b-f1"} <= ran
    assert not {s for s in ran if s.startswith("train@") and "tiny_b" not in s}, ran
    assert "ingest" not in ran and "folds" not in ran
    reg = json.loads((pipeline_checkout / "registry/registered.json").read_text())
    assert reg["version"] == 2  # every version stays; the alias moves only if better
    client = _client(pipeline_checkout)
    assert {
        int(v.version) for v in client.search_model_versions("name='speedstructure-ensemble'")
    } == {1, 2}
    champ = client.get_model_version_by_alias("speedstructure-ensemble", "champion")
    assert int(champ.version) == (2 if reg["champion"] else 1)


def test_editing_an_imported_module_marks_the_stages_that_import_it(pipeline_checkout, first_repro):
    # metrics.py is imported by training, tune and evaluate, not by ingest or folds
    target = pipeline_checkout / "src/speedstructure/metrics.py"
    original = target.read_text()
    try:
        target.write_text(original + "\n# an edit\n")
        changed = set(json.loads(dvc("status", "--json", cwd=pipeline_checkout).stdout))
        assert {"tune", "evaluate", "train@tiny_a-f0"} <= changed, changed
        assert not {"ingest", "folds"} & changed, changed
    finally:
        target.write_text(original)
    assert not json.loads(dvc("status", "--json", cwd=pipeline_checkout).stdout)


def _process_tree(pid: int) -> list[bytes]:
    """The command lines of ``pid`` and its descendants."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            tree.append(Path(f"/proc/{p}/cmdline").read_bytes())
        except OSError:
            continue
    return tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_train_parallel_runs_training_stages_concurrently_one_gpu_each(
    pipeline_checkout, first_repro
):
    params = yaml.safe_load((pipeline_checkout / "params.yaml").read_text())
    params["variants"]["tiny_a"]["drop_path_rate"] = 0.05
    (pipeline_checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(
        ["make", "--no-print-directory", "train-parallel", "GPUS=0 1"], pipeline_checkout
    ).stdout
    assert "train@tiny_a-f0: GPU" in out and "train@tiny_a-f1: GPU" in out
    changed = set(json.loads(dvc("status", "--json", cwd=pipeline_checkout).stdout))
    assert not {s for s in changed if s.startswith("train@")}, changed  # recorded in dvc.lock
    client = _client(pipeline_checkout)
    exp = client.get_experiment_by_name("speedstructure")
    latest = {}
    for r in client.search_runs([exp.experiment_id], "tags.variant = 'tiny_a'"):
        key = r.data.tags["fold"]
        if key not in latest or r.info.start_time > latest[key].info.start_time:
            latest[key] = r
    a, b = latest["0"], latest["1"]
    assert {a.data.tags["cuda_visible_devices"], b.data.tags["cuda_visible_devices"]} == {"0", "1"}
    # Concurrency itself is checked with controlled durations in tests/tools/test_parallel.py:
    # these trainings last about a second, so under load their MLflow runs need not overlap.
    for f in (0, 1):
        assert (pipeline_checkout / f"logs/train-parallel/train@tiny_a-f{f}.log").is_file()
    rest = dvc("repro", cwd=pipeline_checkout).stdout  # the rest of the pipeline, no training
    ran = {ln.split("'")[1] for ln in rest.splitlines() if ln.startswith("Running stage")}
    assert "tune" in ran and not {s for s in ran if s.startswith("train@")}, ran


def test_make_ui_serves_the_runs_on_loopback(pipeline_checkout, first_repro):
    port = _free_port()
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"UI_PORT={port}"],
        cwd=pipeline_checkout,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name=speedstructure-ensemble"
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError("make ui exited early") from None
                time.sleep(1)
        assert body is not None, "MLflow UI did not answer"
        aliases = {a["alias"] for a in body["registered_model"].get("aliases", [])}
        assert "champion" in aliases
        assert "# speedstructure-ensemble" in body["registered_model"]["description"]
        tree = _process_tree(proc.pid)  # make, mlflow ui and its server: no job runner
        assert len(tree) <= 3 and not [c for c in tree if b"huey" in c or b"_job_runner" in c]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _stage_process(pipeline_checkout: Path, stage: str, timeout: float = 300) -> int:
    """The pid of the ``speedstructure <stage>`` process running in ``pipeline_checkout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            names = [os.path.basename(a.decode(errors="replace")) for a in argv]
            if (
                "speedstructure" in names
                and stage in names
                and Path(cwd) == pipeline_checkout.resolve()
            ):
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no speedstructure {stage} process started")


def test_a_second_repro_in_the_same_checkout_is_refused_with_dvc_lock(
    pipeline_checkout, first_repro
):
    """While one `dvc repro` runs a stage (held still with SIGSTOP), a second one in the same
    checkout is refused by DVC's lock; the first then finishes and the outputs are whole."""
    cmd = [str(BIN / "dvc"), "repro", "--force", "--single-item", "evaluate"]
    first = subprocess.Popen(
        cmd,
        cwd=pipeline_checkout,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stage = None
    try:
        stage = _stage_process(pipeline_checkout, "evaluate")
        os.kill(stage, signal.SIGSTOP)
        second = dvc("repro", cwd=pipeline_checkout, check=False)
        assert second.returncode != 0
        # DVC's locks: the repository lock, or (DVC 3 while stages run) the outputs' rwlock
        said = second.stderr + second.stdout
        assert "Unable to acquire lock" in said or (
            "is busy, it is being blocked by" in said and f"(PID {first.pid})" in said
        ), said
    finally:
        if stage is not None:
            os.kill(stage, signal.SIGCONT)
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    ev = json.loads((pipeline_checkout / "reports/evaluate.json").read_text())
    assert ev["n_test"] == 3
    assert dvc("status", "-q", cwd=pipeline_checkout, check=False).returncode == 0


SHARED = [  # outputs a clone gets from the DVC remote (the rest of what it needs is in git)
    "data/train.zip",
    "store/manifest.json",
    "store/train/gathers.npy",
    "folds/folds.csv",
    "models/tiny_a/fold_0/best.pt",
    "models/tiny_a/fold_0/curves.png",
    "ensemble/ensemble.json",
    "submission/submission.npz",
    "plots/evaluate/best_median_worst.png",
]
VERSIONED = [  # small text outputs committed to git (no timings)
    "metrics/evaluate.json",
    "metrics/tune.json",
    "reports/evaluate.json",
    "models/tiny_a/fold_0/metrics.json",
    "models/tiny_a/fold_0/history.csv",
    "plots/training.csv",
    "plots/tune_weights.csv",
    "folds/summary.json",
    "registry/registered.json",
]


def test_a_clone_that_pulls_from_the_remote_has_nothing_to_rerun(
    pipeline_checkout, first_repro, tmp_path
):
    """A teammate's `git clone` + `dvc pull` from a local remote: every output is back (small
    text from git, the rest from the remote) and `dvc repro --dry` plans no stage."""
    dvc("remote", "add", "-f", "-d", "local", str(tmp_path / "remote"), cwd=pipeline_checkout)
    run(["git", "add", "-A"], pipeline_checkout)
    run(["git", "commit", "-qm", "the pipeline's outputs"], pipeline_checkout)
    assert run(["git", "status", "--porcelain"], pipeline_checkout).stdout == ""
    tracked = set(run(["git", "ls-files"], pipeline_checkout).stdout.split())
    assert set(VERSIONED) <= tracked and not set(SHARED) & tracked
    assert not [f for f in tracked if f.endswith(("last.pt", ".pt", ".npy", ".png"))]
    assert (
        "seconds"
        not in (pipeline_checkout / VERSIONED[3]).read_text()
        + (pipeline_checkout / VERSIONED[4]).read_text()
    )
    dvc("push", "-q", cwd=pipeline_checkout)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pipeline_checkout), str(clone)], tmp_path)
    dvc("pull", "-q", cwd=clone)
    for rel in SHARED + VERSIONED:
        assert (clone / rel).read_bytes() == (pipeline_checkout / rel).read_bytes(), rel
    dry = dvc("repro", "--dry", cwd=clone).stdout
    assert "Running stage" not in dry, dry
    status = dvc("status", cwd=clone)
    assert "up to date" in status.stdout, status.stdout
    # dvc metrics diff against HEAD works (the metrics are in git): nothing changed
    assert dvc("metrics", "diff", "HEAD", "--json", cwd=clone).stdout.strip() in ("{}", "")
    # and the plots, drawn offline: no script, style or image from outside
    run([str(BIN / "speedstructure"), "plots-template"], clone)
    dvc("plots", "show", "-o", "dvc_plots", cwd=clone)
    page = (clone / "dvc_plots/index.html").read_text()
    assert "vegaEmbed" in page and page.count("<img") >= 4  # the charts and the figures
    assert external_urls(page) == [], external_urls(page)
    charts = json.loads(dvc("plots", "show", "--json", cwd=clone).stdout)["data"]
    curves = charts["plots/training.csv"][0]["content"]  # every run in one chart
    assert {d["run"] for d in curves["data"]["values"]} == set(
        yaml.safe_load((clone / "params.yaml").read_text())["runs"]
    )
    weights = charts["plots/tune_weights.csv"][0]["content"]["data"]["values"]
    assert {w["member"] for w in weights} == {
        f"{v} @ fold {k}" for v in ("tiny_a", "tiny_b") for k in (0, 1)
    }


def external_urls(html: str) -> list[str]:
    """The http(s) URLs that ``html`` loads: src / href attributes and CSS url(...)."""
    import re

    attrs = re.findall(r"""(?:src|href)\s*=\s*["']?\s*((?:https?:)?//[^"'\s>]+)""", html, re.I)
    return attrs + re.findall(r"""url\(\s*["']?((?:https?:)?//[^"')\s]+)""", html, re.I)


def test_external_urls_finds_what_a_cdn_page_loads():
    cdn = '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script><a href="//x.org/a">'
    assert external_urls(cdn) == ["https://cdn.jsdelivr.net/npm/vega@5", "//x.org/a"]
    assert external_urls('<img src="static/a.png"><a href="#top">') == []


def test_make_exp_shows_the_ensemble_test_mape_of_an_experiment_in_120_columns(
    pipeline_checkout, first_repro
):
    """One experiment with one changed parameter (only evaluate reruns) beside the workspace
    and HEAD: `make exp` prints them with the ensemble's test MAPE, within 120 columns."""
    out = dvc("exp", "run", "-S", "evaluate.batch_size=1", cwd=pipeline_checkout).stdout
    ran = {ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage")}
    assert ran == {"evaluate"}, ran
    table = run(["make", "--no-print-directory", "exp"], pipeline_checkout, COLUMNS="120").stdout
    lines = [ln.rstrip() for ln in table.splitlines() if ln.strip()]
    assert max(map(len, lines)) <= 120 and "…" not in table, table
    header = next(ln for ln in lines if "Experiment" in ln).split()
    assert header[:3] == ["Experiment", "cv_mape", "test_mape"] and "evaluate.batch_size" in header
    rows = [ln.split() for ln in lines if ln.split()[0] in ("workspace", "└──", "├──")]
    assert len(rows) == 2, table  # the workspace and the experiment
    for row in rows:
        cells = row[3:] if row[0] != "workspace" else row[1:]
        assert 0 < float(cells[1]) < 1, row  # test MAPE
    print(table)  # pytest -s shows it


def test_repro_on_data_without_test_labels_completes(pipeline_checkout, first_repro):
    """The challenge ships no test targets: `dvc repro` still ends with exit 0 and a valid
    submission, and the evaluation records that there were no labels."""
    truths = [p.name for p in (pipeline_checkout / "data").glob("*_truth.npz")]
    for name in ("test_labels.npz", "test_ood.zip", "test_ood_labels.npz", *truths):
        (pipeline_checkout / "data" / name).unlink(missing_ok=True)  # as the real data comes
    dvc("add", "-q", "data", cwd=pipeline_checkout)
    dvc("repro", cwd=pipeline_checkout)
    ev = json.loads((pipeline_checkout / "reports/evaluate.json").read_text())
    assert ev["labels"] == "none" and ev["n_test"] == 3 and "not scored" in ev["note"]
    _assert_valid_submission(pipeline_checkout)
    report = run([str(BIN / "speedstructure"), "report"], pipeline_checkout).stdout
    assert report.startswith("No test labels: 3 test predictions, not scored")
    assert dvc("status", "-q", cwd=pipeline_checkout, check=False).returncode == 0
