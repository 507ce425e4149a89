"""Shared fixtures: the real bundled dataset and a small patient-wise subset of it."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from neurocbir.data.cases import default_data_dir, load_cases
from neurocbir.data.external import load_external


def pytest_configure(config):
    """Under pytest-xdist (`make test`: two workers on two cores) each worker's PyTorch, and the
    processes its tests start, get their share of the cores: two workers each spreading every
    forward pass over all cores made training steps about 10 times slower (the suite took 19 min)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`make test` runs two workers, `--dist loadgroup`): each file's tests run
    in one worker (its module fixtures, such as an Orthanc or a browser, are made once), and every
    file that talks to the Milvus server runs in the same worker (the embedded server fixes two
    ports: one server per machine)."""
    milvus_files = {
        item.path
        for item in items
        if {"milvus_server", "milvus_uri"} & set(item.fixturenames) or "milvus-server" in item.nodeid
    }
    for item in items:
        item.add_marker(pytest.mark.xdist_group("milvus-server" if item.path in milvus_files else item.path.name))


@pytest.fixture
def test_seed() -> int:
    """The seed of a test's random choices: NEUROCBIR_TEST_SEED, else a fixed one; printed, so a
    failure shows how to replay it (pytest shows a failing test's output)."""
    seed = int(os.environ.get("NEUROCBIR_TEST_SEED", "20261202"))
    print(f"random choices seeded with {seed} (replay: NEUROCBIR_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = default_data_dir()
    if d is None or not (d / "metadata.csv").is_file():
        pytest.fail("the bundled dataset is missing: set NEUROCBIR_DATA or place ../shared/data/brain-tumor-figshare")
    return d


@pytest.fixture(scope="session")
def cases(data_dir):
    return load_cases(data_dir)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory, data_dir, cases) -> Path:
    """A dataset folder with 3 patients per class in fold 5 and 6 per class elsewhere."""
    rng = np.random.default_rng(0)
    keep = []
    for fold_set, n_pat in (({5}, 3), ({1, 2, 3, 4}, 6)):
        for c in range(3):
            sel = np.isin(cases.fold, list(fold_set)) & (cases.label == c)
            pids = sorted(set(cases.patient_id[sel].tolist()))
            for pid in rng.choice(pids, n_pat, replace=False):
                rows = np.flatnonzero(cases.patient_id == pid)
                keep.extend(rows[:6].tolist())  # at most 6 slices per patient keeps it small
    out = tmp_path_factory.mktemp("small_data")
    with open(data_dir / "metadata.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        fields = reader.fieldnames
    wanted = {int(cases.idx[i]) for i in keep}
    with open(out / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(r for r in rows if int(r["idx"]) in wanted)
    os.symlink(data_dir / "images", out / "images")
    os.symlink(data_dir / "masks", out / "masks")
    return out


@pytest.fixture(scope="session")
def small_cases(small_data_dir):
    return load_cases(small_data_dir)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_cases, feature_cache) -> Path:
    """A real trained run (SupCon, 1 trial, last 2 blocks + head) on the small subset."""
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.cached import train_run

    out = tmp_path_factory.mktemp("small_run")
    cfg = TrainConfig(
        loss="supcon", trials=1, epochs=3, n_copies=1, data=str(small_cases.loader.root), cache_dir=str(feature_cache)
    )
    train_run(cfg, out, table=small_cases, progress=False)
    return out


def _write_cjdata(path, label, pid, image, mask):
    """A file in the layout of the figshare release (MATLAB v7.3, column-major)."""
    with h5py.File(path, "w") as f:
        g = f.create_group("cjdata")
        g["label"] = np.array([[float(label)]])
        g["PID"] = np.array([[ord(c)] for c in pid], dtype=np.uint16)
        g["image"] = image.T.astype(np.int16)
        g["tumorMask"] = mask.T.astype(np.uint8)
        g["tumorBorder"] = np.zeros((1, 8))


@pytest.fixture
def figshare_dir(tmp_path):
    rng = np.random.default_rng(1)
    specs = [(1, "100360", 512), (2, "100360", 512), (3, "MR0402", 256), (1, "MR0999", 512)]
    for i, (label, pid, size) in enumerate(specs, start=1):
        image = rng.integers(0, 2000, (size, size))
        image[:, : size // 2] = 0  # asymmetric, so a transposition would show
        mask = np.zeros((size, size), bool)
        mask[10:20, 30:50] = True  # 200 px
        _write_cjdata(tmp_path / f"{i}.mat", label, pid, image, mask)
    with h5py.File(tmp_path / "cvind.mat", "w") as f:
        f["cvind"] = np.array([[1.0, 1.0, 2.0, 3.0]])
    return tmp_path


EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-external-v2"


@pytest.fixture(scope="session")
def external() -> Path:
    if not (EXTERNAL / "metadata.csv").is_file():
        pytest.fail(f"the external slices are missing: expected {EXTERNAL}")
    return EXTERNAL


@pytest.fixture(scope="session")
def small_external(external, tmp_path_factory) -> Path:
    """A copy of 160 external slices in the same layout: whole groups, 20 with and 20 without a tumor
    from each of the four sources (TCGA with its masks), picked with a fixed seed."""
    cases = load_external(external)
    rng = np.random.default_rng(1)
    keep: list[int] = []
    for source in np.unique(cases.sources):
        for want_tumor in (False, True):
            pick = (cases.sources == source) & (cases.tumor == want_tumor)
            rows = []
            for g in rng.permutation(np.unique(cases.groups[pick])):
                rows += np.flatnonzero((cases.groups == g) & pick).tolist()
                if len(rows) >= 20:
                    break
            keep += rows[:20]
    out = tmp_path_factory.mktemp("external")
    for sub in ("images", "masks"):
        (out / sub).mkdir()
    columns = ["image_file", "label_name", "group", "source", "patient", "slice", "mask_file"]
    with open(out / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for i in sorted(keep):
            shutil.copy(cases.path(i), out / cases.files[i])
            if cases.mask_files[i]:
                shutil.copy(external / cases.mask_files[i], out / cases.mask_files[i])
            w.writerow(
                [cases.files[i], cases.labels[i], cases.groups[i], cases.sources[i], cases.patients[i], cases.slices[i]]
                + [cases.mask_files[i]]
            )
    return out


@pytest.fixture(scope="session")
def site_archive(small_external, small_run, small_data_dir, tmp_path_factory) -> Path:
    """Figshare training folds + the external development part, with the validation part and the
    figshare test fold as examples: what `make demo` builds, at small scale, through the CLI."""
    root = tmp_path_factory.mktemp("site") / "archive"
    steps = [
        [str(small_data_dir), "--fold", "1", "--fold", "2", "--fold", "3", "--fold", "4"],
        [str(small_data_dir), "--fold", "5", "--examples"],
        [str(small_external), "--part", "development"],
        [str(small_external), "--part", "validation", "--examples"],
    ]
    from neurocbir.cli import app as cli

    summaries = []
    for args in steps:
        res = CliRunner().invoke(cli, ["add", *args, "--archive", str(root), "--run", str(small_run), "--json"])
        assert res.exit_code == 0, res.output
        summaries.append(json.loads(res.stdout.strip().splitlines()[-1]))
    (root.parent / "summaries.json").write_text(json.dumps(summaries))
    return root


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone server (the PyPI package `milvus`; .ci/run installs it)."""
    from tests.milvus_server import MilvusServer, installed

    if not installed():
        pytest.fail(
            "milvus-server is not installed: pip install milvus==2.3.5"
        )  # never a skip: `make test` installs it
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    server.kill()  # its data is the session's: no need to wait the 30 s and more of a clean stop


@pytest.fixture(params=["lite", "server"])
def milvus_uri(request, tmp_path):
    """Where the Milvus tests' store lives: Milvus Lite (a file) or the real server."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    return request.getfixturevalue("milvus_server").uri


def collection_name() -> str:
    """A collection of its own for each test (the server is shared by the session)."""
    import uuid

    return f"t{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def bundled_service(tmp_path_factory, small_data_dir):
    """The committed model over the small dataset's training folds (indexed here, as on a first start)."""
    import shutil

    from neurocbir.retrieval.ingest import index_run
    from neurocbir.serving.service import RetrievalService

    root = Path(__file__).resolve().parents[1] / "models" / "lesion-fold5"
    run = tmp_path_factory.mktemp("bundled") / "lesion-fold5"
    ignore = shutil.ignore_patterns("embeddings.npz", "index.faiss*", "metrics.*", "demo-archive")
    shutil.copytree(root, run, ignore=ignore)
    index_run(run, data=small_data_dir)
    return RetrievalService.from_run(run, table=load_cases(small_data_dir))
