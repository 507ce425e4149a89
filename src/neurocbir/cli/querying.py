"""Queries and the app: ``query``, ``ask``, ``serve``, ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from neurocbir.cli._common import _explain, _fail, _guard, _read_image_file, _read_query_scan, _service, resolve_run


def query(
    image: Optional[Path] = typer.Argument(None, help="PNG/JPEG, DICOM or figshare .mat file (or use --instance)"),
    run: Optional[Path] = typer.Option(None, help="trained run directory"),
    k: int = typer.Option(5),
    one_per_patient: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
    archive: Optional[Path] = typer.Option(None, help="case archive built by `neurocbir add` (default: the run's own)"),
    coverage: float = typer.Option(0.95, min=0.5, max=0.999, help="coverage of the prediction set"),
    plane: Optional[str] = typer.Option(None, help="show only archive cases in this plane"),
    tumor_type: Optional[str] = typer.Option(None, help="show only archive cases of this tumor type"),
    min_area: Optional[float] = typer.Option(None, help="show only tumors of at least this many mm²"),
    max_area: Optional[float] = typer.Option(None, help="show only tumors of at most this many mm²"),
    dicomweb: Optional[str] = typer.Option(None, help="DICOMweb server (PACS) to fetch --instance from"),
    instance: Optional[str] = typer.Option(None, help="SOP Instance UID of the scan on the --dicomweb server"),
    dicom_out: Optional[Path] = typer.Option(
        None, help="write DIR/seg.dcm and DIR/sr.dcm (a DICOM scan, answered as a one-slice study)"
    ),
    region: Optional[str] = typer.Option(
        None, help="search by this region of the scan only: a box x0,y0,x1,y1 in the scan's pixels"
    ),
    region_mask: Optional[Path] = typer.Option(
        None, help="search by this region of the scan only: a binary mask image (PNG) the size of the scan"
    ),
) -> None:
    """Predict the tumor type of a scan (a file, or an instance on a PACS), or of a region drawn
    on it, from its most similar archive cases."""
    from neurocbir.data.regions import box_region, read_region_mask
    from neurocbir.serving.sources import CaseFilter

    filters = _guard(CaseFilter, plane, tumor_type, min_area, max_area)
    if dicom_out is not None and image is None:
        _fail("--dicom-out needs the scan as a DICOM file")
    if region is not None and region_mask is not None:
        _fail("give the region as --region x0,y0,x1,y1 or as --region-mask FILE, not both")
    if region_mask is not None and not region_mask.is_file():
        _fail(f"no such file: {region_mask}")
    if dicom_out is not None and (region or region_mask):
        _fail("--dicom-out describes the whole slice: leave out --region / --region-mask")
    img, spacing = _read_query_scan(image, dicomweb, instance)
    drawn = None
    if region is not None:
        drawn = _guard(box_region, region, img.shape[:2])
    elif region_mask is not None:
        drawn = _guard(read_region_mask, region_mask.read_bytes(), img.shape[:2])
    svc = _service(run, archive)
    out = _guard(
        svc.query,
        img,
        k=k,
        one_per_patient=one_per_patient,
        coverage=coverage,
        pixel_spacing_mm=spacing,
        filters=filters,
        region=drawn,
    )
    if dicom_out is not None:
        out["dicom_out"] = _dicom_results(svc, image, k, dicom_out)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if out["no_similar_case"]:
        typer.secho("warning: no similar case found; the answer is unreliable", fg=typer.colors.RED)
    if out.get("region"):
        r = out["region"]
        typer.echo(f"searched by the drawn region ({r['kind']} {','.join(map(str, r['box']))}, {r['pixels']} pixels)")
    if out["tumor_found"] is False and out.get("region"):
        p = out["tumor_presence"]["probability_tumor_in_region"]
        name = out["tumor_presence"].get("decoder", "tumor")
        typer.echo(f"No tumor found in the drawn region ({name} decoder's peak there {p:.0%}); no tumor type is given.")
        typer.echo("The archive cases most similar to the region, as context:")
    elif out["tumor_found"] is False:
        p = out["tumor_presence"]["probability_no_tumor"]
        typer.echo(f"No tumor found on this slice (P(no tumor) {p:.0%}); no tumor type is given.")
        typer.echo("The most similar archive cases, as context:")
    else:
        if out["presence_warning"]:
            typer.secho(out["presence_warning"], fg=typer.colors.RED)
        if out["no_close_tumor_case"]:
            typer.secho(out["no_close_tumor_case"]["warning"], fg=typer.colors.RED)
        if out["no_similar_case"] or out["no_close_tumor_case"]:  # a calibrated probability would not hold
            shown = "confidence withheld: " + (
                "no similar archive case" if out["no_similar_case"] else "no close tumor case"
            )
        else:
            kind = "calibrated confidence" if out["calibrated"] else "uncalibrated softmax(I_c)"
            shown = f"{kind} {out['confidence']:.1%}"
        typer.echo(
            f"{out['prediction']} ({shown}; KNN-7 vote "
            + ", ".join(f"{c} {p:.0%}" for c, p in out["knn_vote"].items())
            + ")"
        )
        if out["prediction_set"] is not None:
            typer.echo(f"{out['coverage']:.0%} prediction set: {' or '.join(out['prediction_set'])}")
        if out["tumor_found"] is None:
            typer.echo(f"tumor presence {out['tumor_presence']['note']}")
    if out["neighbours_disagree"]:
        typer.echo("the neighbours disagree: read the evidence below")
    if out.get("query_tumor"):
        t = out["query_tumor"]
        typer.echo(f"query tumor: about {t['area_mm2']:.0f} mm² ({t['note']})")
    if out.get("nearest_other_class"):
        o = out["nearest_other_class"]
        typer.echo(
            f"nearest case of another class: case {o['case_id']}, {o['label']}, distance {o['distance']:.3f} (rank {o['rank']})"
        )
    if out.get("filters"):
        shown = ", ".join(f"{k}={v}" for k, v in out["filters"].items() if v is not None)
        typer.echo(f"retrievals filtered ({shown}); the prediction reads the whole archive")
    for i, r in enumerate(out["retrievals"], 1):
        size = "size unknown" if r["area_mm2"] is None else f"{r['area_mm2']:.1f} mm²"
        typer.echo(
            f"  {i}. case {r['case_id']}: {r['label']}, {r['plane'] or 'plane unknown'}, {size}, distance {r['distance']:.3f}"
        )
    for path in (out.get("dicom_out") or {}).values():
        typer.echo(f"wrote {path}")
    typer.echo(out["disclaimer"])


def _dicom_results(svc, image: Path, k: int, out_dir: Path) -> dict:
    """A DICOM scan answered as a one-slice study, its SEG and SR written to ``out_dir``."""
    from neurocbir.data.studies import read_study
    from neurocbir.serving.results_dicom import write_results
    from neurocbir.serving.studies import answer_study

    study = _guard(read_study, [(image.read_bytes(), image.name)])
    if study.kind != "dicom":
        _fail(f"--dicom-out needs a DICOM scan; {image.name} is not one")
    return _guard(write_results, study, _guard(answer_study, svc, study, k), out_dir)


def ask(
    image: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    run: Optional[Path] = typer.Option(None),
    k: int = typer.Option(5),
    style: str = typer.Option("normal"),
    llm: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Ask a question about the reports of a scan's most similar archive cases."""
    img, spacing = _read_image_file(image)
    svc = _service(run)
    out = _guard(svc.query, img, k=k, pixel_spacing_mm=spacing)
    if out["no_similar_case"]:  # on stderr, so that --json stays one document
        typer.secho("warning: no similar case found; these reports are of dissimilar scans", fg="red", err=True)
    reports = _guard(svc.cases.reports, [r["case_id"] for r in out["retrievals"]], style)
    area = out["query_tumor"]["area_mm2"] if out.get("query_tumor") else None
    ans, _ = _explain(llm, "grounded", "answer", question, reports, None, area)
    typer.echo(json.dumps(ans.as_dict(), indent=2) if as_json else ans.answer)


def serve(
    run: Optional[Path] = typer.Option(None),
    port: int = typer.Option(8000),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    archive: Optional[Path] = typer.Option(None, help="case archive built by `neurocbir add` (default: the run's own)"),
    dicomweb: Optional[str] = typer.Option(
        None, help="DICOMweb server (PACS) whose instances can be queried by SOP Instance UID"
    ),
    oidc_issuer: Optional[str] = typer.Option(None, help="sign in with this OpenID Connect provider (its issuer URL)"),
    oidc_audience: Optional[str] = typer.Option(None, help="the audience the provider's access tokens must carry"),
    oidc_role_claim: str = typer.Option(
        "roles", help="the claim holding the role (a dotted path, e.g. realm_access.roles)"
    ),
    oidc_client_id: Optional[str] = typer.Option(
        None, help="the web UI's client id at the provider (default: the audience)"
    ),
    allow_anonymous: bool = typer.Option(
        False, "--allow-anonymous", help="serve a non-loopback address with nobody signing in (not advised)"
    ),
    tls_cert: Optional[Path] = typer.Option(None, help="serve HTTPS with this certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, help="... and this private key (PEM)"),
    milvus_wait: float = typer.Option(
        60.0, min=0, help="wait up to this many seconds for the archive's Milvus server at start"
    ),
    trusted_proxy: list[str] = typer.Option(
        [], help="a reverse proxy (address or network) whose X-Forwarded-For names the client; repeatable"
    ),
    audit_key: Optional[Path] = typer.Option(
        None, help="the audit trail's key file (created mode 600; default audit.key beside audit.db)"
    ),
    workers: int = typer.Option(
        1, min=1, max=16, help="worker processes (each holds its own model and archive view: memory x N)"
    ),
) -> None:
    """Serve the web UI and the HTTP API (sign-in as soon as users or an identity provider are
    configured; see `neurocbir users`)."""
    from neurocbir.app.server import ServeOptions
    from neurocbir.app.server import serve as _serve

    opts = ServeOptions(
        host,
        port,
        oidc_issuer,
        oidc_audience,
        oidc_role_claim,
        oidc_client_id,
        allow_anonymous,
        tls_cert,
        tls_key,
        list(trusted_proxy),
        audit_key,
        milvus_wait,
        workers,
    )
    _guard(_serve, resolve_run(run), host, port, archive, dicomweb, opts)


def demo(port: int = typer.Option(8000)) -> None:
    """The main job: serve the committed model (else the best trained run, else a quick one
    trained first, ~5 min) over the demo archive, built on first start from the bundled data."""
    from neurocbir.app.server import serve as _serve
    from neurocbir.models.runs import BUNDLED_MODEL, TrainConfig, find_default_run, trial_seeds
    from neurocbir.serving.demo import demo_archive
    from neurocbir.training.cached import train_run

    run = BUNDLED_MODEL if trial_seeds(BUNDLED_MODEL, needs="checkpoint.pt") else find_default_run()
    if run is None:
        run = Path("runs/demo")
        typer.echo(
            "No trained run yet: training a quick SupCon model (head only, no augmented copies, 1 trial). "
            "For the lesion model run `neurocbir train --out runs/mine` (about 25 min on 2 cores)."
        )
        cfg = TrainConfig(loss="supcon", trials=1, trainable_blocks=0, n_copies=0, epochs=20)
        _guard(train_run, cfg, run)
    archive = _guard(demo_archive, run, None, typer.echo)
    _guard(_serve, run, "127.0.0.1", port, archive)


def query_study(
    paths: Optional[list[Path]] = typer.Argument(None, help="the study's slices (DICOM, PNG/JPEG, .mat) or one NIfTI"),
    series: Optional[str] = typer.Option(None, help="a Series Instance UID on the --dicomweb server, instead of files"),
    dicomweb: Optional[str] = typer.Option(None, help="DICOMweb server (PACS) of --series and --write-back"),
    run: Optional[Path] = typer.Option(None, help="trained run directory"),
    archive: Optional[Path] = typer.Option(None, help="case archive built by `neurocbir add` (default: the run's own)"),
    k: int = typer.Option(5, help="similar archive patients shown"),
    as_json: bool = typer.Option(False, "--json"),
    dicom_out: Optional[Path] = typer.Option(None, help="write DIR/seg.dcm and DIR/sr.dcm (DICOM studies)"),
    write_back: bool = typer.Option(
        False, "--write-back", help="store the SEG and SR in the --dicomweb PACS (STOW-RS)"
    ),
    region: Optional[str] = typer.Option(None, help="also search by this box x0,y0,x1,y1 drawn on --region-slice"),
    region_slice: Optional[int] = typer.Option(None, help="the slice (0-based, in the study's order) of --region"),
) -> None:
    """One answer for a whole series: per slice, and per study (type, key slice, size, similar patients)."""
    from neurocbir.data.studies import read_study
    from neurocbir.data.uploads import UploadError
    from neurocbir.serving.studies import answer_study

    if (not paths) == (series is None):
        _fail("give the study's files, or --series UID with --dicomweb URL (not both)")
    if (series or write_back) and dicomweb is None:
        _fail("--series and --write-back need --dicomweb URL (the PACS's DICOMweb root)")
    if series is not None:
        from neurocbir.retrieval.dicomweb import read_series

        study = _guard(read_series, dicomweb, series)
    else:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            _fail(f"no such file: {missing[0]}")
        try:
            study = read_study([(p.read_bytes(), p.name) for p in paths])
        except UploadError as exc:
            _fail(str(exc))
    svc = _service(run, archive)
    out = _guard(answer_study, svc, study, k)
    if region is not None:
        from neurocbir.data.regions import box_region

        if region_slice is None or not 0 <= region_slice < len(study.slices):
            _fail(f"--region needs --region-slice: the slice it is drawn on, 0 to {len(study.slices) - 1}")
        pixels = study.slices[region_slice].pixels
        drawn = _guard(box_region, region, pixels.shape[:2])
        out["region_search"] = {"slice": region_slice, **_guard(svc.query, pixels, k, region=drawn)}
    if dicom_out is not None:
        from neurocbir.serving.results_dicom import write_results

        out["dicom_out"] = _guard(write_results, study, out, dicom_out)
    if write_back:
        from neurocbir.serving.results_dicom import store_results

        if study.kind != "dicom":
            _fail("--write-back needs a DICOM study")
        out["written_back"] = _guard(store_results, dicomweb, study, out)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    tumor = [s["index"] for s in out["slices"] if s["tumor_found"] is not False]
    typer.echo(f"{out['n_slices']} slices ({out['kind']}); a tumor on {len(tumor)}")
    if out["prediction"] is None:
        typer.echo(out["note"])
    else:
        key = out["key_slice"]
        if out["presence_warning"]:
            typer.secho(out["presence_warning"], fg=typer.colors.RED)
        typer.echo(f"study: {out['prediction']} ({out['confidence']:.1%}, calibrated: {out['calibrated']})")
        area = "no tumor outlined" if key["area_mm2"] is None else f"about {key['area_mm2']:.0f} mm²"
        note = f" ({out['area_note']})" if out["area_note"] else ""
        typer.echo(f"key slice {key['index']} ({key['name']}): {area}{note}")
        if out["volume_ml"] is not None:
            typer.echo(f"volume about {out['volume_ml']:.1f} ml ({out['volume_note']})")
        for p in out["patients"]:
            typer.echo(
                f"  similar patient {p['rank']}: case {p['case_id']}, {p['label']}, distance {p['distance']:.3f}"
            )
    if out.get("region_search"):
        r = out["region_search"]
        answer = r["prediction"] or "no tumor found in the region"
        typer.echo(f"region {r['region']['box']} of slice {r['slice']}: {answer}")
    for path in (out.get("dicom_out") or {}).values():
        typer.echo(f"wrote {path}")
    typer.echo(out["disclaimer"])
