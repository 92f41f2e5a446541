"""DICOM Segmentation output (``*.dcm``, highdicom): the labels of a DICOM series, referring to its slices.

Workers write their chunks into a hidden Zarr (the plain Zarr sink, staged, never
published); when the run finishes, the labels are read back slice by slice into
the frames of one LABELMAP Segmentation instance: one segment per foreground
class, named by the class and given its colour (RecommendedDisplayCIELabValue, the
other outputs' :func:`~tilemask.classes.class_colours`), each frame referring to the
source slice it lies on (same position and orientation, highdicom checks it). Label 0 and the nodata
value are background. The instance is written under a hidden name and renamed
into place; with ``output.dicomweb`` it is then stored on that DICOMweb server
(STOW-RS): a server that does not answer is refused before any window runs, and
a store that fails keeps the file in place.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np

from .. import __version__
from ..classes import class_colours
from ..errors import OutputError, WorkflowError
from ..outputs import publish, remove, staged_path
from . import LabelSink, OutputLayout
from .zarr import ZarrSink

logger = logging.getLogger(__name__)

TISSUE = ("85756007", "SCT", "Tissue")  # segmented property category and type when nothing more is known
PATIENT_AND_STUDY = (  # Type 2 in the Patient and General Study modules (may be empty), copied by highdicom
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip
REQUIRED = (  # Type 1 in every slice: a SEG cannot be made without them
    "StudyInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID",
)  # fmt: skip
SEGMENT_LABEL_LENGTH = 64  # SegmentLabel is LO: at most 64 characters, no backslash (it separates values)
UTF8 = "ISO_IR 192"


def segment_label_problem(name: str) -> str | None:
    """Why ``name`` cannot be a SegmentLabel, or None."""
    if len(name) > SEGMENT_LABEL_LENGTH:
        return f"{len(name)} characters, where a DICOM SegmentLabel holds {SEGMENT_LABEL_LENGTH}"
    if "\\" in name or not name.isprintable():
        return "a backslash or a control character, which a DICOM SegmentLabel cannot hold"
    return None


@dataclass(frozen=True)
class DicomSegSink(LabelSink):
    path: str
    layout: OutputLayout

    @property
    def labels(self) -> ZarrSink:
        return ZarrSink(self.path + ".labels.zarr", self.layout, visible=False)

    @property
    def staged(self) -> str:
        return staged_path(self.path, self.layout.run_id)

    def create(self) -> None:
        self.labels.create()  # the input was checked to be a DICOM series when planning (DicomSegFormat)

    def _source(self):
        """The input series, opened again for the SEG's references, without the warnings its opening gave when the
        run was planned (a series read as its regular grid was warned of twice)."""
        from ..formats import for_path

        series_log = logging.getLogger("tilemask.sources.dicom")
        said = lambda record: record.levelno < logging.WARNING  # noqa: E731
        series_log.addFilter(said)
        try:
            return for_path(self.layout.reference).open_source(self.layout.reference, 3, None)
        finally:
            series_log.removeFilter(said)

    def write(self, region, labels: np.ndarray, probabilities) -> None:
        self.labels.write(region, labels, None)

    def finish(self) -> None:
        import highdicom as hd
        import pydicom
        import zarr

        source = self._source()
        # the k axis, in order; highdicom reads their attributes, not their pixels: a series' pixels are not held
        images = [pydicom.dcmread(f, stop_before_pixels=True) for f in source.files]
        spacing = slice_spacing(source.geometry.affine)
        for image in images:  # a Type 2 attribute a series leaves out is present and empty in the SEG
            for keyword in PATIENT_AND_STUDY:
                if keyword not in image:
                    setattr(image, keyword, "")
            if image.get("SliceThickness") is None:  # Type 2 too, but the SEG's pixel measures need a value
                image.SliceThickness = spacing
            if "SpacingBetweenSlices" in image or len(images) == 1:  # the SEG's frames lie on the slices: their
                # spacing, whatever it says; one slice's, the slab it is read as (highdicom says 1 mm)
                image.SpacingBetweenSlices = spacing
            # one orientation, as the series is read (its slices' within 1e-4): highdicom wants them equal
            image.ImageOrientationPatient = images[0].ImageOrientationPatient
        empty_refused_values(images[0])  # highdicom reads the patient and study from the first slice
        layout = self.layout
        volume = np.asarray(zarr.open_array(f"{self.labels.staged}/labels", mode="r")[...])  # (i, j, k), read once
        if layout.nodata is not None:
            volume[volume == layout.nodata] = 0
        frames = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (slices, rows, columns)
        foreground = list(range(1, len(layout.class_names)))
        colours = class_colours(len(layout.class_names))
        algorithm = hd.AlgorithmIdentificationSequence(
            name="tilemask", version=__version__, family=hd.sr.CodedConcept("113112", "DCM", "Artificial Intelligence")
        )
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=layout.class_names[value],
                segmented_property_category=hd.sr.CodedConcept(*TISSUE),
                segmented_property_type=hd.sr.CodedConcept(*TISSUE),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*colours[value][:3]),
            )
            for value in foreground
        ]
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=frames.astype(np.uint8 if len(foreground) < 256 else np.uint16, copy=False),
            segmentation_type=hd.seg.SegmentationTypeValues[layout.seg_type.upper()],  # a BINARY's from the labels too
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="tilemask",
            manufacturer_model_name="tilemask",
            software_versions=__version__,
            device_serial_number="0",
            series_description="tilemask labels",
            # a LABELMAP's frame for each slice; a BINARY's for each slice a segment is in (one for each slice and
            # class was mostly empty: 117 classes on 300 slices, 35,100 frames, 1.1 GB)
            omit_empty_frames=layout.seg_type == "binary",
            specific_character_set=segmentation_charset(images[0].get("SpecificCharacterSet"), layout.class_names),
        )
        seg.save_as(self.staged, enforce_file_format=True)  # pydicom encodes every text in the SEG's character set

    def publish(self) -> list[str]:
        publish(self.staged, self.path)
        self.labels.abort()
        return [self.path]

    @property
    def delivery(self) -> str:
        return "storing it on DICOMweb" if self.layout.dicomweb else ""

    def deliver(self) -> None:
        store(self.path, self.layout.dicomweb)  # the file in place: a failed store keeps it (the run still fails)

    def undelivered(self) -> OutputError:
        """The failure of a run that stopped while the SEG was being stored: the file is whole, the store unknown."""
        return OutputError(f"output.dicomweb: the run stopped while storing {self.path} on "
                           f"{_shown(self.layout.dicomweb)}: whether the server has it, its QIDO-RS says (the file is "
                           "whole and kept)")  # fmt: skip

    def abort(self) -> None:
        remove(self.staged)
        self.labels.abort()


CONVERTED = ("PatientSex", "PatientBirthDate", "StudyDate", "StudyTime")  # those highdicom converts as it copies


def refused_values(image) -> dict[str, str]:
    """The patient and study values of ``image`` that highdicom refuses as it copies them into a SEG, each with why:
    a PatientSex other than M, F or O, a date or time pydicom cannot read (ACR-NEMA's ``12:30:00``, an anonymizer's
    ``00000000``), as highdicom converts them (``PatientSexValues``, pydicom's ``DA`` and ``TM``)."""
    from pydicom.valuerep import DA, TM

    def sex(value):
        if value not in ("M", "F", "O"):
            raise ValueError(f"{value!r} is not M, F or O")

    refused = {}
    for keyword, check in zip(CONVERTED, (sex, DA, DA, TM)):
        value = image.get(keyword)
        if not value:
            continue
        try:
            check(value)
        except ValueError as exc:
            refused[keyword] = str(exc)
    return refused


def empty_refused_values(image) -> None:
    """Empty the values :func:`refused_values` finds in ``image``: they are Type 2, present and empty in the SEG (such
    a series ran every window, then failed in highdicom, exit 1). The warning naming each is given when planning
    (:meth:`tilemask.formats.DicomSegFormat.check_input`): a worker's is not seen."""
    for keyword in refused_values(image):
        setattr(image, keyword, "")


def segmentation_charset(given, names) -> str | None:
    """The SEG's SpecificCharacterSet: the series' where it is one value without code extensions that highdicom takes
    and the class names are ASCII, none for the default repertoire (absent or empty), else UTF-8, which holds every
    text pydicom decoded from the series.  highdicom refuses a series' value that is empty, or that has code
    extensions (``\\ISO 2022 IR 87``, a Japanese series' usual value, or ``ISO 2022 IR 100`` alone): such a series
    ran every window, then failed in highdicom, exit 1.  Those with code extensions it takes
    (``ISO 2022 IR 6\\ISO 2022 IR 87``, ``ISO 2022 IR 58``) are written in UTF-8 too, as are names pydicom reads and
    highdicom does not (``ISO_IR 6``)."""
    import highdicom as hd

    if not all(name.isascii() for name in names):
        return UTF8
    if not given:  # absent or empty: the default repertoire
        return None
    taken = {value.value for value in hd.SpecificCharacterSetValues if not value.value.startswith("ISO 2022")}
    return given if isinstance(given, str) and given in taken else UTF8


STORE_TIMEOUT = (10, 120)  # seconds: connecting, then waiting for each answer; one try (store)


def slice_spacing(affine) -> float:
    """The distance between a series' slices along their normal (a series of one slice: the slab it stands for,
    :class:`~tilemask.sources.dicom.DicomSeriesSource`), which highdicom reads from the first slice for the SEG's
    pixel measures. As the SEG's SpacingBetweenSlices where the slice has one: a slice's own may misstate it (5 mm
    slabs every 2.5 mm, given as 5), and highdicom then read the series as a volume, but not its SEG. As its
    SliceThickness where the slices leave that out or empty (Type 2), the slab the series' volume counts for each: a
    series without it failed in highdicom after every window, exit 1."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    normal = np.cross(axes[:, 0], axes[:, 1])
    return abs(float(axes[:, 2] @ normal / np.linalg.norm(normal)))


def store(path: str, url: str) -> None:
    """STOW-RS of the instance at ``path`` to the DICOMweb root ``url`` (dicomweb-client), with timeouts; stored
    only when the answer does not list it as failed (:func:`_not_stored`) and QIDO-RS then finds it (Orthanc 1.10
    answers 200 listing an instance its ``ReceivedInstanceFilter`` dropped).  A redirect is not followed: requests
    would send a 301 or 302's POST on as a GET, and the store would be lost."""
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            kwargs["timeout"] = STORE_TIMEOUT  # dicomweb-client 0.61 gives its own 20 s: a 25 s answer failed
            return super().send(request, **kwargs)

    class Session(requests.Session):
        def get_redirect_target(self, resp):
            return None

    session = Session()
    session.mount("http://", TimeoutAdapter())
    session.mount("https://", TimeoutAdapter())
    answers: list = []
    session.hooks["response"].append(lambda answer, **kwargs: answers.append(answer))
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    # one try: dicomweb-client tries 5 times, 2 to 16 s apart, on a 503 (busy) and on any error of requests, so a
    # stalled server held the store 130 s, and a busy one failed after 30 s as "RetryError[Attempts: 5, ...]"
    client.set_http_retry_params(retry=False)
    try:
        instance = pydicom.dcmread(path)
        why = _not_stored(client.store_instances([instance]), instance.SOPInstanceUID)
    except requests.HTTPError as exc:  # 4xx or 5xx: a 400 or 409 lists the instance as failed, with the reason
        why = str(exc).splitlines()[0] + _failure_in(exc.response)
    except Exception as exc:  # noqa: BLE001 - requests and the client raise many types
        why = str(exc).splitlines()[0]
    redirect = next((answer for answer in answers if answer.is_redirect), None)  # whatever the client made of it
    if redirect is not None:
        why = _redirect(redirect)
    if why is None and not _found(client, instance, url):
        why = "it answered that it stored it, and its QIDO-RS does not find it: the server dropped it"
    if why is not None:
        raise OutputError(f"output.dicomweb: storing {path} on {_shown(url)} failed: "
                          f"{_shown(url, why)} (the file is whole and kept)")  # fmt: skip


def _redirect(answer) -> str:
    """What a redirect answered, and where to: the URL to give instead."""
    target = urljoin(answer.url, answer.headers["Location"])
    return f"{answer.url} answered {answer.status_code} {answer.reason}, to {target}: give the DICOMweb root there"


def _not_stored(listed, uid: str) -> str | None:
    """Why a Store Instances Response (DICOM PS3.18 10.5.3) says that the instance ``uid`` was not stored, or None:
    only an item of its FailedSOPSequence (0008,1198) for it (a 202 Accepted may list it there) is taken as proof.
    An answer that does not list it, or that dicomweb-client does not parse (it reads a body only under a bare
    ``application/dicom+json``, not with ``; charset=utf-8``, and gives an empty Dataset otherwise) is left to the
    QIDO-RS check (:func:`_found`).  A WarningReason (0008,1196) in its ReferencedSOPSequence item, a change the
    server made (coerced or discarded elements), is logged: it is stored."""
    failed = [item for item in listed.get("FailedSOPSequence", []) if item.get("ReferencedSOPInstanceUID") == uid]
    if failed:
        return f"the server lists it as failed{_reason(failed[0], 'FailureReason')}"
    stored = [item for item in listed.get("ReferencedSOPSequence", []) if item.get("ReferencedSOPInstanceUID") == uid]
    if stored and stored[0].get("WarningReason") is not None:
        logger.warning("output.dicomweb: the server stored %s with a warning%s", uid,
                       _reason(stored[0], "WarningReason"))
    return None


def _found(client, instance, url: str) -> bool:
    """Whether QIDO-RS finds the instance just stored; True when the server answers no QIDO (a warning says so)."""
    try:
        found = client.search_for_instances(instance.StudyInstanceUID, instance.SeriesInstanceUID,
                                            search_filters={"SOPInstanceUID": instance.SOPInstanceUID})  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - requests and the client raise many types
        logger.warning("output.dicomweb: %s stored %s; its QIDO-RS, asked to confirm it, failed: %s", _shown(url),
                       instance.SOPInstanceUID, _shown(url, str(exc).splitlines()[0]))  # fmt: skip
        return True
    return bool(found)


def _failure_in(answer) -> str:
    """The FailureReason of a refusal's Store Instances Response, if its body is one."""
    import pydicom

    try:
        failed = pydicom.Dataset.from_json(answer.json()).get("FailedSOPSequence", [])
    except (ValueError, TypeError, AttributeError):  # not one: no body, an HTML page, a list
        return ""
    return _reason(failed[0], "FailureReason") if failed else ""


def _reason(item, keyword: str) -> str:
    """`` (FailureReason 0110H)``: a status code as DICOM writes them."""
    return f" ({keyword} {item.get(keyword):04X}H)" if item.get(keyword) is not None else ""


_USERINFO = re.compile(r"(?<=://)[^/?#@\s]*@")


def _shown(url: str, text: str | None = None) -> str:
    """``text`` (``url`` itself by default) with the user and password of ``url``, and of every URL in it, left
    out: messages and logs name the server, not its password.  Requests quotes the URL it asked as it rewrote it
    (the host in lower case, the password percent-encoded): ``url``'s credentials as written are not found there."""
    netloc = urlsplit(url).netloc
    return _USERINFO.sub("", (url if text is None else text).replace(netloc, netloc.rpartition("@")[2]))


# OpenSSL's X509_V_ERR_*: the certificate names another host; it is out of date. REQUESTS_CA_BUNDLE mends neither
HOST_MISMATCH, OUT_OF_DATE = (62, 64), (9, 10)


def _ca_bundle() -> str:
    """The variable, and the file, that give requests its CA certificates (as requests reads them)."""
    name = next((n for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(n)), None)
    return f"{name}, {os.environ[name]}," if name else "requests' own bundle (certifi)"


def _tls_refused(url: str, exc: Exception) -> Exception:
    """The error for a TLS failure ``exc`` (requests' SSLError) of the server at ``url``: exit 2, naming what would
    mend it (REQUESTS_CA_BUNDLE only for a certificate not trusted here), but exit 1 for a handshake that failed
    otherwise."""
    import ssl

    causes, seen = [exc], set()
    while causes:  # requests' SSLError holds urllib3's, which holds the ssl module's
        cause = causes.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            break
        causes += [c for c in (*cause.args, getattr(cause, "reason", None)) if isinstance(c, BaseException)]
    else:
        return OutputError(f"output.dicomweb: {_shown(url)}: TLS failed: {_shown(url, str(exc).splitlines()[0])}")
    shown = f"output.dicomweb: {_shown(url)}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = str(cause.verify_message or cause.reason).strip().rstrip(".")
        if cause.verify_code in HOST_MISMATCH:
            return WorkflowError(f"{shown}: its TLS certificate is for another host ({why}): give the host name its "
                                 "certificate names")  # fmt: skip
        if cause.verify_code in OUT_OF_DATE:
            return WorkflowError(f"{shown}: its TLS certificate is out of date ({why})")
        return WorkflowError(f"{shown}: its TLS certificate is not trusted here (certificate verify failed: {why}): "
                             "give its CA's certificate in REQUESTS_CA_BUNDLE")  # fmt: skip
    why = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(cause.args[1] if len(cause.args) > 1 else cause))
    if cause.library == "X509":  # loading the CA certificates given, before any handshake
        return WorkflowError(f"{shown}: the CA certificates given in {_ca_bundle()} are not read: {why}")
    if cause.reason == "WRONG_VERSION_NUMBER":  # a plain HTTP server on the port
        return WorkflowError(f"{shown}: it answers without TLS ({why}): is it http://?")
    return OutputError(f"{shown}: TLS failed: {why}")


def check_answers(url: str) -> None:
    """Refuse a DICOMweb server that does not answer now (exit 1: it may be down for now), or that refuses the
    URL's credentials (401: exit 2, the store would be refused too), whose TLS fails in a way it names (exit 2,
    :func:`_tls_refused`), redirects (exit 2: the store is not redirected) or has no ``studies`` resource there
    (404: exit 2, a mistyped root; the store posts to that resource), before any window runs, where the store
    comes once every window has.  A 400 or 405 is a warning (Orthanc's own root answers 400, and its store 405; but
    a server may refuse QIDO's ``limit`` or serve STOW-RS alone); any other HTTP answer will do (a QIDO refused
    for want of rights does not say the store will fail); its body is not read.  Asked from the process that
    drives the job (the store runs on a worker: they must both reach the server)."""
    import requests

    try:
        answer = requests.get(f"{url.rstrip('/')}/studies", params={"limit": 1}, timeout=STORE_TIMEOUT[0], stream=True,
                              allow_redirects=False)  # fmt: skip
        answer.close()
    except requests.exceptions.SSLError as exc:  # it answered, over TLS that fails here: "does not answer" before
        raise _tls_refused(url, exc) from None
    except requests.RequestException as exc:
        raise OutputError(f"output.dicomweb: {_shown(url)} does not answer: "
                          f"{_shown(url, str(exc).splitlines()[0])}") from None  # fmt: skip
    except OSError as exc:  # requests' own, for a CA bundle that is not there: "OSError: Could not find ..."
        if "CA certificate bundle" not in str(exc):
            raise
        raise WorkflowError(f"output.dicomweb: {_shown(url)}: the CA certificates given in {_ca_bundle()} are not "
                            "there") from None
    if answer.is_redirect:  # the store would be redirected too, and is not followed (store)
        raise WorkflowError(f"output.dicomweb: {_shown(url, _redirect(answer))}")
    if answer.status_code == 401:
        why = (
            "refuses the user and password in the URL (401 Unauthorized)"
            if urlsplit(url).username
            else "wants a user and password (401 Unauthorized): give them in the URL, as USER:PASSWORD@ before its host"
        )
        raise WorkflowError(f"output.dicomweb: {_shown(url)} {why}")
    asked = f"GET {_shown(url.rstrip('/'))}/studies answered {answer.status_code} {answer.reason}"
    if answer.status_code == 404:
        raise WorkflowError(f"output.dicomweb: {_shown(url)} is no DICOMweb root: {asked}; {ROOT_ADVICE}")
    if answer.status_code in (400, 405):
        logger.warning("output.dicomweb: %s may be no DICOMweb root (%s): the store, once every window has run, "
                       "may be refused; %s", _shown(url), asked, ROOT_ADVICE)  # fmt: skip


ROOT_ADVICE = "give the DICOMweb root, whose /studies takes the store (Orthanc's: http://HOST:8042/dicom-web)"
