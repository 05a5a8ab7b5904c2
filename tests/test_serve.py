"""`embedstore serve`: every route through FastAPI's TestClient, its error statuses, the token, the
thumbnails against NumPy references, and that nothing identifying leaves the service."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from PIL import Image

from embedstore import samples
from tests.support import PATIENT_ID, run_cli_here

TOKEN = "a-long-enough-test-token"


def client_for(store_path, tmp_path, **settings):
    from fastapi.testclient import TestClient

    from embedstore.serve.app import ServeSettings, create_app

    return TestClient(create_app(ServeSettings(store_path, cache_folder=tmp_path / "cache", **settings)))


@pytest.fixture
def client(patient_store, tmp_path):
    return client_for(patient_store[0], tmp_path)


def search(client, **body) -> dict:
    response = client.post("/api/search", json={"feature": "patch_mean", **body})
    assert response.status_code == 200, response.text
    return response.json()


def first_key(client) -> str:
    """A slice key as the service shows it, from a search by a stored DICOM slice."""
    import embedstore

    store = embedstore.open(client.app.state.service.store.path)
    dicom = sorted(k for k in store.items(columns=["key"])["key"].to_pylist() if k.startswith("dicom:"))
    return dicom[0]


def thumbnail(client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_models_and_facets(client):
    models = client.get("/api/models").json()["models"]
    assert len(models) == 1 and models[0]["weights"] == "random" and models[0]["embed_dim"] == 384
    facets = client.get("/api/facets").json()
    assert facets["modality"] == ["CT", "DX"]  # the photos have none
    assert facets["body_part"] == ["CHEST", "HEAD"] and facets["study_date"][0] <= facets["study_date"][1]
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


def test_the_openapi_page_shows_the_shape_of_every_json_answer(client):
    schema = client.get("/openapi.json").json()
    shapes = {}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/api/"):
                content = operation["responses"]["200"]["content"]["application/json"]
                shapes[f"{method.upper()} {path}"] = content["schema"].get("$ref", "").rsplit("/", 1)[-1]
    assert shapes == {"GET /api/models": "ModelsResponse", "GET /api/facets": "FacetsResponse",
                      "POST /api/search": "SearchResponse", "POST /api/uploads": "UploadResponse",
                      "GET /api/items/{key}": "ItemResponse", "GET /api/series/{uid}": "SeriesResponse",
                      "GET /api/studies/{uid}": "StudyResponse"}
    result = schema["components"]["schemas"]["SearchResult"]["properties"]
    assert {"rank", "score", "key", "thumbnail", "strip"} <= set(result)
    # what a search answers is what its schema says: no field it does not declare
    answer = search(client, key=first_key(client), k=2, feature="patch_mean")
    assert set(answer) == set(schema["components"]["schemas"]["SearchResponse"]["properties"])
    assert set(answer["results"][0]) <= set(result)


@pytest.mark.parametrize("level", ["slice", "series", "study"])
def test_search_levels_are_sorted_and_each_result_searches_again(client, level):
    answer = search(client, key=first_key(client), k=5, level=level)
    results = answer["results"]
    scores = [result["score"] for result in results]
    assert results and scores == sorted(scores, reverse=True) and len(results) <= 5
    assert [result["rank"] for result in results] == list(range(1, len(results) + 1))
    kind = {"slice": "key", "series": "series_uid", "study": "study_uid"}[level]
    for result in results:
        assert result["level"] == level and result["thumbnail"].startswith("/thumbnails/")
        if level != "slice":
            assert result["n_slices"] >= 1 and 1 <= len(result["strip"]) <= min(6, result["n_slices"])
        # "more like this": the id a result shows is the id a search accepts
        again = search(client, **{kind: result[kind]}, k=3, level=level)["results"]
        assert all(other[kind] != result[kind] for other in again)  # the query itself is left out
    if level == "study":
        assert all(result["n_series"] >= 1 for result in results)


def test_filters_narrow_the_results_and_a_bad_where_is_a_400_with_the_parsers_message(client):
    key = first_key(client)
    results = search(client, key=key, k=50, where="modality = 'DX'")["results"]
    assert results and {result["modality"] for result in results} == {"DX"}
    radiograph = results[0]["key"]  # in neither CT series: both are candidates at series level
    dated = search(client, key=radiograph, k=50, level="series",
                   where="study_date >= '2024-01-01' AND body_part = 'HEAD'")
    assert {(r["study_date"], r["body_part"]) for r in dated["results"]} == {("2024-01-31", "HEAD")}
    bad = client.post("/api/search", json={"key": key, "where": "modality = 'CT' OR 1=1; DROP TABLE items"})
    assert bad.status_code == 400 and "--where" in bad.json()["detail"]
    hidden = client.post("/api/search", json={"key": key, "where": "path LIKE '%Smith%'"})
    assert hidden.status_code == 400 and "unknown column 'path'" in hidden.json()["detail"]
    assert client.post("/api/search", json={"key": key, "k": 0}).status_code == 422
    assert client.post("/api/search", json={"key": key, "model": "nope"}).status_code == 400
    assert client.post("/api/search", json={"key": key, "series_uid": "1.2"}).status_code == 400
    assert client.post("/api/search", json={"key": key, "feature": "cls9"}).status_code == 400


def test_unknown_ids_are_404(client):
    assert client.post("/api/search", json={"key": "dicom:1.2.3:0"}).status_code == 404
    assert client.post("/api/search", json={"series_uid": "id:00"}).status_code == 404
    assert client.post("/api/search", json={"study_uid": "1.2.3"}).status_code == 404
    assert client.post("/api/search", json={"upload_id": "upload:00"}).status_code == 404
    assert client.get("/api/items/dicom:1.2.3:0").status_code == 404
    assert client.get("/api/series/1.2.3").status_code == 404
    assert client.get("/api/studies/id:0123").status_code == 404
    assert client.get("/thumbnails/dicom%3A1.2.3%3A0.png").status_code == 404
    assert client.get(f"/thumbnails/{quote(first_key(client), safe='')}").status_code == 404  # no .png


def test_items_series_and_studies_give_metadata_and_members(client):
    key = first_key(client)
    item = client.get(f"/api/items/{quote(key, safe='')}").json()
    assert item["key"] == key and item["modality"] in ("CT", "DX") and item["rows"] > 0
    series = client.get(f"/api/series/{quote(item['series_uid'], safe='')}").json()
    assert series["series_uid"] == item["series_uid"] and len(series["members"]) == series["n_slices"]
    assert [m["slice_index"] for m in series["members"]] == sorted(m["slice_index"] for m in series["members"])
    assert key in [member["key"] for member in series["members"]]
    study = client.get(f"/api/studies/{quote(item['study_uid'], safe='')}").json()
    assert study["n_slices"] == sum(s["n_slices"] for s in study["series"])
    assert item["series_uid"] in [s["series_uid"] for s in study["series"]]
    # a photo's ids are made from its path: served opaque, and they resolve all the same
    photo = search(client, key=key, k=50, where="modality IS NULL")["results"][0]
    assert photo["key"].startswith("id:") and photo["study_uid"].startswith("id:")
    assert client.get(f"/api/items/{quote(photo['key'], safe='')}").json()["key"] == photo["key"]
    assert client.get(f"/api/studies/{quote(photo['study_uid'], safe='')}").json()["n_slices"] == 1


def test_upload_search_finds_the_stored_copy_first_and_bad_uploads_are_refused(client, patient_store, tmp_path):
    png = patient_store[1].pngs[2]
    response = client.post("/api/uploads", params={"filename": "query.png"}, content=png.read_bytes())
    assert response.status_code == 200, response.text
    upload = response.json()
    assert upload["slices"] == 1
    results = search(client, upload_id=upload["upload_id"], k=3)["results"]
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)  # the stored copy of the same picture
    assert search(client, upload_id=upload["upload_id"], level="study", k=2)["results"][0]["n_slices"] == 1
    unreadable = client.post("/api/uploads", params={"filename": "scan.png"}, content=b"not an image at all")
    assert unreadable.status_code == 400 and "scan.png" in unreadable.json()["detail"]
    assert "embedstore-upload" not in unreadable.json()["detail"]  # the server's temporary path stays inside
    assert client.post("/api/uploads", content=b"").status_code == 400
    small = client_for(patient_store[0], tmp_path, max_upload_mb=0.01)
    assert small.post("/api/uploads", params={"filename": "q.png"}, content=b"\0" * 20_000).status_code == 413


def test_a_token_is_required_on_every_api_and_thumbnail_request(patient_store, tmp_path):
    from embedstore.errors import UsageError
    from embedstore.serve.app import check_exposure

    client = client_for(patient_store[0], tmp_path, token=TOKEN)
    key = first_key(client)
    thumbnail_url = f"/thumbnails/{quote(key, safe='')}.png"
    requests = [("get", "/api/models", {}), ("get", "/api/facets", {}), ("post", "/api/search", {"json": {"key": key}}),
                ("post", "/api/uploads", {"content": b"x"}), ("get", f"/api/items/{quote(key, safe='')}", {}),
                ("get", "/api/series/1.2", {}), ("get", "/api/studies/1.2", {}), ("get", thumbnail_url, {})]
    for method, url, options in requests:
        assert getattr(client, method)(url, **options).status_code == 401, url
        wrong = getattr(client, method)(url, headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"}, **options)
        assert wrong.status_code == 401, url
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/models", headers=good).status_code == 200
    assert client.get(thumbnail_url, headers=good).status_code == 200
    assert client.get("/").status_code == 200  # the page itself holds no data
    with pytest.raises(UsageError, match="--token"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", TOKEN)
    check_exposure("127.0.0.1", None)


def test_serve_refuses_an_open_host_without_a_token(patient_store, monkeypatch, capsys):
    code, _, err = run_cli_here(["serve", str(patient_store[0]), "--host", "0.0.0.0"], monkeypatch, capsys)
    assert code == 2 and "--token" in err and len(err.strip().splitlines()) == 1


def test_a_ct_thumbnail_is_its_window_and_a_monochrome1_radiograph_comes_out_inverted(client, patient_store):
    archive = patient_store[1]
    ct = pydicom.dcmread(archive.ct[1])
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    windowed = np.clip(hu, -1024.0, 600.0)  # the study window the store's spec records ("auto" → ct:study)
    reference = np.rint((windowed - windowed.min()) / (windowed.max() - windowed.min()) * 255)
    ct_thumbnail = thumbnail(client, f"/thumbnails/{quote(f'dicom:{ct.SOPInstanceUID}:0', safe='')}.png")
    assert ct_thumbnail.shape == (256, 256)
    assert np.abs(ct_thumbnail.astype(int) - reference).max() <= 1

    def radiograph(path):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        return thumbnail(client, f"/thumbnails/{quote(f'dicom:{uid}:0', safe='')}.png").astype(int)

    stored = pydicom.dcmread(archive.xray_monochrome1).pixel_array.astype(float)
    as_stored = np.rint((stored - stored.min()) / (stored.max() - stored.min()) * 255)
    inverted = radiograph(archive.xray_monochrome1)
    assert np.abs(inverted - (255 - as_stored)).max() <= 1  # bright bone, as a reader expects
    assert np.abs(inverted - radiograph(archive.xray_monochrome2)).max() <= 1
    cache = list((client.app.state.service.thumbnails.folder).rglob("*.png"))
    assert len(cache) >= 3 and all(PATIENT_ID not in path.name for path in cache)


def responses_of_every_route(client, archive_png) -> list[str]:
    """The text of every route's answers, over every result, level and id the service hands out."""
    texts = [client.get(url).text for url in ("/", "/static/app.js", "/static/style.css", "/openapi.json",
                                                "/api/models", "/api/facets")]
    upload = client.post("/api/uploads", params={"filename": "q.png"}, content=archive_png.read_bytes())
    texts.append(upload.text)
    for level in ("slice", "series", "study"):
        for query in ({"key": first_key(client)}, {"upload_id": upload.json()["upload_id"]}):
            answer = client.post("/api/search", json={**query, "k": 50, "level": level, "feature": "patch_mean"})
            texts.append(answer.text)
            for result in answer.json()["results"]:
                for route, field in (("items", "key"), ("series", "series_uid"), ("studies", "study_uid")):
                    if result[field]:
                        texts.append(client.get(f"/api/{route}/{quote(result[field], safe='')}").text)
                texts.append(client.post("/api/search", json={"key": result["key"], "k": 1}).text)
    return texts


@pytest.mark.slow
def test_no_name_id_or_path_leaves_the_server(patient_store, tmp_path):
    path, archive = patient_store
    client = client_for(path, tmp_path)
    texts = responses_of_every_route(client, archive.pngs[0])
    assert len(texts) > 40
    everything = "\n".join(texts)
    for secret in ("Smith", "John", "Edgar", PATIENT_ID, str(archive.root.parent), "pid:"):
        assert secret not in everything, secret
    for text in texts:
        if text.startswith("{"):
            json.loads(text)  # whole JSON answers, not error pages
    # the same store served with --show-paths does show them: the test above can fail
    shown = "\n".join(responses_of_every_route(client_for(path, tmp_path, show_paths=True), archive.pngs[0]))
    assert str(archive.root) in shown


def test_search_cli_prints_the_key_it_accepts_and_describes_series_and_studies(patient_store, monkeypatch, capsys):
    path = str(patient_store[0])
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli_here(["search", path, "--key", f"file:{patient_store[1].pngs[0]}", "-k", "3"],
                                  monkeypatch, capsys)
    assert code == 0, err
    assert "slices most similar to" in out
    key = next(line.split("│")[3].strip() for line in out.splitlines() if line.startswith("│ 1 "))
    code, again, err = run_cli_here(["search", path, "--key", key, "-k", "1"], monkeypatch, capsys)
    assert code == 0, err  # the printed key is one --key accepts
    code, out, err = run_cli_here(["search", path, "--key", key, "--level", "study", "--feature", "patch_mean"],
                                  monkeypatch, capsys)
    assert code == 0 and "studies most similar to" in out and "studys" not in out
    assert "2024-01-31" in out and "generated axial CT" in out
    code, out, err = run_cli_here(["search", path, "--key", key, "--level", "series", "--feature", "patch_mean"],
                                  monkeypatch, capsys)
    assert code == 0 and "series most similar to" in out and "seriess" not in out and "slices" in out


def test_a_slice_whose_file_is_gone_keeps_its_result_and_its_thumbnail_is_a_404(tmp_path):
    from embedstore.pipeline.ingest import ingest
    from tests.support import ingest_options

    pngs = [samples.write_png(tmp_path / "archive" / f"p{i}.png", samples.phantom(48, 40 + i)) for i in range(3)]
    ingest([tmp_path / "archive"], tmp_path / "store", ingest_options())
    client = client_for(tmp_path / "store", tmp_path)
    upload = client.post("/api/uploads", params={"filename": "q.png"}, content=pngs[0].read_bytes()).json()
    results = search(client, upload_id=upload["upload_id"], k=3)["results"]
    assert client.get(results[0]["thumbnail"]).status_code == 200
    pngs[1].unlink()
    statuses = sorted(client.get(result["thumbnail"]).status_code for result in results)
    assert statuses == [200, 200, 404]  # the cached one still served, the gone one a 404, not a 500
