"""DICOMweb sources: a PACS's instances listed through QIDO-RS, their headers read from WADO-RS
metadata (no pixel data moves to plan an ingest), their pixels retrieved through WADO-RS, all with
the well-kept dicomweb-client.

A source is `dicomweb+http(s)://HOST/PATH`, the service root, optionally narrowed by a QIDO query
(`--query "ModalitiesInStudy=CT&StudyDate=20240101-20241231"`: study attributes go to the study
search, series attributes to the series search). An instance's path is its WADO-RS address with the
same prefix, `dicomweb+http://HOST/PATH/studies/S/series/E/instances/I`: it goes through the catalog,
the `files` table and `items` as a file's path does, and its item keys are the SOPInstanceUID keys a
file of the same instance gets. A series' instances share a "folder" (`.../series/E/instances`), so
the catalog hands a series to the embedders as soon as its headers are read.

Credentials come from the environment at every request (EMBEDSTORE_DICOMWEB_TOKEN for a bearer token,
or EMBEDSTORE_DICOMWEB_USER and EMBEDSTORE_DICOMWEB_PASSWORD): never part of a path, the store or a
log line. Requests are retried with backoff on 5xx answers, timeouts and refused connections; a
server that stays away ends the run (SourceUnavailableError) with what was committed kept, an
instance the server will not give is a `retrieve_failed` failure and the run goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

import requests
import requests.auth
from retrying import RetryError
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset

from embedstore.errors import RETRIEVE_FAILED, InputError, SourceUnavailableError, UsageError
from embedstore.sources.dicom import DicomHeader, header_of_dataset

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
TOKEN_ENV = "EMBEDSTORE_DICOMWEB_TOKEN"
USER_ENV, PASSWORD_ENV = "EMBEDSTORE_DICOMWEB_USER", "EMBEDSTORE_DICOMWEB_PASSWORD"
PAGE = 500  # QIDO results per request
TIMEOUT_S = (5, 60)  # connect, read
RETRIES = 3  # per request, with exponential backoff from BACKOFF_S
BACKOFF_S = 0.2
RETRIED_STATUSES = (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.INTERNAL_SERVER_ERROR,
                    HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.GATEWAY_TIMEOUT)
# Attributes a series search matches; every other query attribute narrows the study search.
SERIES_ATTRIBUTES = {"Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
                     "SeriesTime", "BodyPartExamined", "ProtocolName", "PerformedProcedureStepStartDate",
                     "Laterality", "Manufacturer", "StationName"}
STUDY_UID, SERIES_UID, SOP_UID, INSTANCE_NUMBER = "0020000D", "0020000E", "00080018", "00200013"


def is_dicomweb(path: str) -> bool:
    return path.startswith(SCHEMES)


@dataclass(frozen=True)
class DicomwebSource:
    root: str  # dicomweb+http(s)://HOST/PATH, no trailing slash
    study_filters: dict[str, str] = field(default_factory=dict)
    series_filters: dict[str, str] = field(default_factory=dict)

    @property
    def narrowed(self) -> bool:
        """Whether a query leaves instances of the server out (they are then not `gone`)."""
        return bool(self.study_filters or self.series_filters)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in {**self.study_filters, **self.series_filters}.items())
        return f"{self.root}?{query}" if query else self.root

    def instances(self) -> Iterator[str]:
        """The path of every instance the query selects: studies, their series, their instances, each
        search paged; instances in InstanceNumber order within a series."""
        with searches_of(self.root):
            yield from self._instances(client_for(service_url(self.root)))

    def _instances(self, client) -> Iterator[str]:
        for study in sorted(_uids(_paged(client.search_for_studies, search_filters=self.study_filters),
                                  STUDY_UID)):
            series_found = _paged(client.search_for_series, study_instance_uid=study,
                                  search_filters=self.series_filters)
            for series in sorted(_uids(series_found, SERIES_UID)):
                found = _paged(client.search_for_instances, study_instance_uid=study, series_instance_uid=series)
                for instance in sorted(found, key=_instance_order):
                    yield instance_path(self.root, study, series, _uid(instance, SOP_UID))


@contextmanager
def searches_of(root: str) -> Iterator[None]:
    """QIDO searches mid-run: a server that fails one or stops answering ends the run."""
    try:
        yield
    except (requests.HTTPError, RetryError) as error:
        raise SourceUnavailableError(f"DICOMweb server {root} failed a search: HTTP {_status(error)}") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise SourceUnavailableError(f"DICOMweb server {root} stopped answering: {_short(error)}") from None


def dicomweb_source(text: str, query: str | None) -> DicomwebSource:
    """The source a `dicomweb+http(s)://...` argument names; UsageError for a malformed one or query."""
    parts = urlsplit(text.removeprefix("dicomweb+"))
    if not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"a DICOMweb source is dicomweb+http(s)://HOST[:PORT]/PATH with no query or fragment "
                         f"(narrow it with --query), not {text}")
    if parts.username or parts.password:
        raise UsageError(f"credentials do not go in a DICOMweb address (they would be stored with every path): "
                         f"use --token, {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}")
    study_filters, series_filters = parse_query(query) if query else ({}, {})
    return DicomwebSource(text.rstrip("/"), study_filters, series_filters)


def parse_query(query: str) -> tuple[dict[str, str], dict[str, str]]:
    """`Keyword=value&...` as (study filters, series filters); UsageError for anything else."""
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=True)
    except ValueError:
        raise UsageError(f"--query {query!r} is not KEYWORD=VALUE&KEYWORD=VALUE...") from None
    study, series = {}, {}
    for keyword, value in pairs:
        if keyword not in keyword_dict:
            raise UsageError(f"--query: {keyword!r} is not a DICOM attribute keyword (e.g. ModalitiesInStudy, "
                             f"StudyDate, Modality, BodyPartExamined)")
        if dictionary_VR(keyword_dict[keyword]) == "SQ":
            raise UsageError(f"--query: {keyword} is a sequence; a query matches single values")
        (series if keyword in SERIES_ATTRIBUTES else study)[keyword] = value
    return study, series


def check_source(source: DicomwebSource) -> None:
    """One study search, to fail before anything is written: an unreachable server, refused
    credentials, a path with no DICOMweb service or a query the server rejects is a UsageError."""
    url = service_url(source.root)
    try:
        client_for(url, retries=0).search_for_studies(limit=1, search_filters=source.study_filters)
    except (requests.HTTPError, RetryError) as error:
        status = _status(error)
        if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            raise UsageError(f"DICOMweb server {source.root} refused access (HTTP {status}): give a token with "
                             f"--token or {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}") from None
        if status == HTTPStatus.BAD_REQUEST:
            raise UsageError(f"DICOMweb server {source.root} rejected the query {str(source)!r} (HTTP 400)") from None
        raise UsageError(f"no DICOMweb service answers at {source.root} (HTTP {status}): check the address") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise UsageError(f"cannot reach DICOMweb server {source.root}: {_short(error)}") from None
    except ValueError as error:  # an answer that is not QIDO JSON: not a DICOMweb service
        raise UsageError(f"no DICOMweb service answers at {source.root}: {error}") from None


def service_url(root: str) -> str:
    return root.removeprefix("dicomweb+")


def instance_path(root: str, study: str, series: str, sop: str) -> str:
    return f"{root}/studies/{study}/series/{series}/instances/{sop}"


def split_instance_path(path: str) -> tuple[str, str, str, str]:
    """(service URL, study, series, SOP instance UID) of an instance path."""
    root, _, rest = path.rpartition("/studies/")
    study, _, series, _, sop = rest.split("/")
    return service_url(root), study, series, sop


def read_remote_header(path: str, max_pixels: int) -> DicomHeader:
    """An instance's header facts from its series' WADO-RS metadata (fetched once per series and
    process): no pixel data is transferred."""
    url, study, series, sop = split_instance_path(path)
    metadata = _series_metadata(url, study, series).get(sop)
    if metadata is None:
        raise InputError(RETRIEVE_FAILED, f"the server lists instance {sop} but gives no metadata for it")
    ds = Dataset.from_json({tag: value for tag, value in metadata.items() if "BulkDataURI" not in value})
    ds.file_meta = FileMetaDataset()
    has_pixels = any(tag in metadata for tag in ("7FE00010", "7FE00008", "7FE00009"))
    return header_of_dataset(path, ds, max_pixels, has_pixels=lambda: has_pixels)


def retrieve(path: str) -> str:
    """A temporary file holding the instance as the server stores it (its transfer syntax), for the
    readers and codecs to decode as a file from a folder; the caller removes it."""
    url, study, series, sop = split_instance_path(path)
    try:
        ds = client_for(url).retrieve_instance(study, series, sop)
    except (requests.HTTPError, RetryError) as error:
        raise InputError(RETRIEVE_FAILED, f"WADO-RS retrieval failed: HTTP {_status(error)}", "decode") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise SourceUnavailableError(f"DICOMweb server {url} stopped answering: {_short(error)}") from None
    except (ValueError, OSError) as error:  # a multipart answer that is not one DICOM instance
        raise InputError(RETRIEVE_FAILED, f"WADO-RS answer is not a DICOM instance: {error}", "decode") from None
    handle, local = tempfile.mkstemp(suffix=".dcm", prefix="embedstore-wado-")
    os.close(handle)
    ds.save_as(local, enforce_file_format=True)
    return local


@lru_cache(maxsize=4)  # a series' instances come in consecutive chunks: one fetch per series and process
def _series_metadata(url: str, study: str, series: str) -> dict[str, dict]:
    try:
        instances = client_for(url).retrieve_series_metadata(study, series)
    except (requests.HTTPError, RetryError) as error:
        raise InputError(RETRIEVE_FAILED, f"WADO-RS metadata of series {series} failed: HTTP {_status(error)}") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise SourceUnavailableError(f"DICOMweb server {url} stopped answering: {_short(error)}") from None
    return {_uid(instance, SOP_UID): instance for instance in instances}


@lru_cache(maxsize=8)
def client_for(url: str, retries: int = RETRIES):
    """A client for one service, retrying a request `retries` times with exponential backoff on
    refused connections, timeouts and 408/429/5xx answers, credentials from the environment."""
    from dicomweb_client import DICOMwebClient  # here: `embedstore --help` need not import it

    for name in ("retrying", "dicomweb_client"):  # each retry is a warning: on the terminal, noise; failures say it
        logging.getLogger(name).setLevel(logging.ERROR)

    session = requests.Session()
    session.auth = EnvironmentCredentials()
    client = DICOMwebClient(url, session=session, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=retries > 0, max_attempts=retries + 1,
                                 wait_exponential_multiplier=int(BACKOFF_S * 1000),
                                 retriable_error_codes=RETRIED_STATUSES)
    return client


class EnvironmentCredentials(requests.auth.AuthBase):
    """The credentials the environment holds when a request goes out: a bearer token, or a user
    and password (basic), or none."""

    def __call__(self, request):
        if os.environ.get(TOKEN_ENV):
            request.headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
        elif os.environ.get(USER_ENV):
            requests.auth.HTTPBasicAuth(os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))(request)
        return request


def _paged(search, **arguments) -> list[dict]:
    found, offset = [], 0
    while True:
        page = search(limit=PAGE, offset=offset, **arguments)
        found.extend(page)
        if len(page) < PAGE:
            return found
        offset += len(page)


def _status(error: requests.HTTPError | RetryError) -> int | str:
    """The HTTP status of a failed request, or of the last of its retries."""
    response = error.response if isinstance(error, requests.HTTPError) else error.last_attempt.value
    return getattr(response, "status_code", "?")


def _uid(result: dict, tag: str) -> str:
    return str(result[tag]["Value"][0])


def _uids(results: list[dict], tag: str) -> set[str]:
    return {_uid(result, tag) for result in results}


def _instance_order(result: dict) -> tuple:
    number = result.get(INSTANCE_NUMBER, {}).get("Value", [None])[0]
    return (number is None, number if number is not None else 0, _uid(result, SOP_UID))


def _short(error: Exception) -> str:
    """A requests error in a few words (its message nests urllib3's, pool and all)."""
    text = str(error)
    for marker in ("Connection refused", "timed out", "Name or service not known", "Max retries exceeded"):
        if marker in text:
            return marker.lower()
    return text[:200]
