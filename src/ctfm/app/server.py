"""The HTTP side of the app: FastAPI routes over an :class:`ctfm.app.state.AppState`.

Every refusal is a JSON object ``{"error": "<one line>"}`` with a 4xx status; anything else that
goes wrong is a 500 with a one-line message, never a traceback or a server path. Scans are
addressed by their store id only. The page and its scripts are files of this package
(``ctfm/app/static``): nothing is loaded from the network, the API page included. Every request
passes :class:`ctfm.app.security.Guard` first (Host, Origin, token, body limits).

Routes that only read (the page, scan lists, slices) run in the server's thread pool and never
wait for a search; searches that run the encoder (fine refinement, centred queries) and uploads
run one at a time each, on worker threads, within the search time budget.
"""

import time
from importlib import resources
from typing import Literal, Optional

from ctfm import __version__
from ctfm.app.security import Access, Guard, echo
from ctfm.app.state import NotFound, ServerBusy
from ctfm.app.uploads import UploadRefused
from ctfm.app.volumes import WINDOWS
from ctfm.errors import UserError, one_line, optional_import

# The app extra, through the one helper: a missing package is a one-line error naming ctfm[app].
fastapi = optional_import("fastapi", "app")
fastapi_responses = optional_import("fastapi.responses", "app")
pydantic = optional_import("pydantic", "app")
optional_import("python_multipart", "app")  # the upload route (File, UploadFile) needs it

FastAPI, Request, UploadFile = fastapi.FastAPI, fastapi.Request, fastapi.UploadFile
File, Query = fastapi.File, fastapi.Query
RequestValidationError = fastapi.exceptions.RequestValidationError
FileResponse, JSONResponse, Response = (
    fastapi_responses.FileResponse,
    fastapi_responses.JSONResponse,
    fastapi_responses.Response,
)
BaseModel, ConfigDict, Field = pydantic.BaseModel, pydantic.ConfigDict, pydantic.Field
StarletteHTTPException = optional_import("starlette.exceptions", "app").HTTPException
anyio = optional_import("anyio", "app")
run_in_threadpool = optional_import("starlette.concurrency", "app").run_in_threadpool

MESSAGE_LIMIT = 600  # characters of one error message
ENCODER_QUEUE = 4  # searches that run the encoder waiting their turn before more are refused (503)
Axis = Literal["axial", "coronal", "sagittal"]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scan_id: str = Field(description="store id of the scan the point lies in")
    point_mm: list[float] = Field(min_length=3, max_length=3, description="the query point [x, y, z], world mm, RAS")
    k: int = Field(10, ge=1, le=100, description="number of hits")
    target: Optional[str] = Field(None, description="search this one scan (store id) instead of the whole store")
    query: Optional[Literal["centred", "stored"]] = Field(
        None,
        description="centred: embed the window centred on the point (needs the weights); stored: the query scan's "
        "stored window nearest the point (no model run); default: the server's",
    )
    refine: Optional[Literal["fine", "weighted", "none"]] = Field(
        None,
        description="how a hit is moved from its best window to a point: fine (pattern search with the encoder), "
        "weighted (similarity-weighted centre of the top windows), none; default: the server's",
    )


class Hit(BaseModel):
    scan_id: str = Field(description="store id of the scan hit")
    point_mm: list[float] = Field(description="the hit, world mm, RAS, in that scan's frame")
    score: float = Field(description="cosine similarity of the query and the hit")
    rank: int
    window_score: float = Field(description="cosine of the query and the best stored window of that scan")
    name: str
    query: str = Field(description="how the query vector was made: centred or stored")


class SearchResponse(BaseModel):
    hits: list[Hit]
    ms: float = Field(description="server time of the search, milliseconds")


def create_app(state, access: Access | None = None, debug: bool = False) -> FastAPI:
    """The FastAPI application serving ``state`` (an :class:`ctfm.app.state.AppState`) under an
    access policy (default: bound to 127.0.0.1, no token); ``debug`` logs tracebacks."""

    static = resources.files("ctfm.app") / "static"
    app = FastAPI(
        title="ctfm semantic search",
        version=__version__,
        description="Click a point in a CT, find the most similar places in every scan of an embedding store.",
        docs_url=None,  # FastAPI's own pages load scripts from the network; /docs is bundled instead
        redoc_url=None,
    )

    encoder_turns = anyio.CapacityLimiter(1)  # searches that run the encoder
    upload_turns = anyio.CapacityLimiter(1)  # uploads being embedded

    def error(status: int, message: str) -> JSONResponse:
        text = state.redact(" ".join(str(message).split()))
        if len(text) > MESSAGE_LIMIT:
            text = text[:MESSAGE_LIMIT] + "..."
        return JSONResponse({"error": text}, status_code=status)

    async def in_turn(limiter, function, *args):
        if limiter.statistics().tasks_waiting >= ENCODER_QUEUE:
            raise ServerBusy(f"{ENCODER_QUEUE} requests already wait for the encoder (try again in a moment)")
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for item in exc.errors():
            loc = list(item.get("loc", ()))
            kind, names = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ("", loc)
            where = ".".join(echo(p, 40).strip("'\"") for p in names if not isinstance(p, int)) or (
                "request body" if kind == "body" else ""
            )
            parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
        return error(422, "; ".join(parts) or "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page or endpoint: {echo(request.url.path)}"
        return error(exc.status_code, message)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error(404, str(exc))

    @app.exception_handler(UploadRefused)
    async def _refused(request: Request, exc: UploadRefused):
        return error(exc.status, str(exc))

    @app.exception_handler(ServerBusy)
    async def _busy(request: Request, exc: ServerBusy):
        return error(503, str(exc))

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return error(400, one_line(exc, MESSAGE_LIMIT))

    # Host, Origin, token and body limits before any route; unexpected errors become one line.
    app.add_middleware(Guard, access=access or Access(), upload_limit=state.uploads.max_bytes, debug=debug)

    png = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}

    # ---- the page ------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def api_page():
        return FileResponse(str(static / "api.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        allowed = {"app.js": "text/javascript", "app.css": "text/css", "api.js": "text/javascript"}
        if name not in allowed:
            return error(404, f"no such file: {echo(name)}")
        return FileResponse(str(static / name), media_type=allowed[name])

    # ---- the API -------------------------------------------------------------------------
    @app.get("/api/info", summary="The store, its computation and its provenance")
    def info():
        return state.info()

    @app.get("/api/scans", summary="Every scan of the store's patch run: id, name, shape, spacing, provenance")
    def scans():
        return {"scans": state.scan_list()}

    @app.get("/api/scans/{scan_id}", summary="One scan and its display geometry (loads it into the cache)")
    def scan(scan_id: str):
        return state.scan_detail(scan_id)

    @app.get(
        "/api/scans/{scan_id}/slice", responses=png, response_class=Response, summary="One slice as a PNG, windowed"
    )
    def slice_png(
        scan_id: str,
        axis: Axis = Query(..., description="the view"),
        index: int = Query(..., description="slice number along the view's axis of the display grid"),
        window: Literal["soft", "lung", "bone", "brain"] = Query(
            "soft", description=", ".join(f"{k}: L{v[0]:g} W{v[1]:g}" for k, v in WINDOWS.items())
        ),
        size: Optional[int] = Query(
            None, ge=16, le=1024, description="thumbnail: at most this many pixels on the longer side, square mm"
        ),
    ):
        return Response(
            state.slice_png(scan_id, axis, index, window, size),
            media_type="image/png",
            headers={"Cache-Control": "max-age=3600"},
        )

    @app.get(
        "/api/scans/{scan_id}/heatmap",
        responses=png,
        response_class=Response,
        summary="Similarity to a query point, as an RGBA overlay slice (PNG) or the volume (NIfTI)",
    )
    def heatmap(
        scan_id: str,
        query_scan: str = Query(..., description="store id of the scan the query point lies in"),
        x: float = Query(..., description="query point, RAS mm"),
        y: float = Query(...),
        z: float = Query(...),
        axis: Optional[Axis] = Query(None, description="the view (with index); omit both for the NIfTI volume"),
        index: Optional[int] = Query(None, description="slice number (with axis)"),
        query: Optional[Literal["centred", "stored"]] = Query(
            None, description="the query vector, as in POST /api/search (default: the server's)"
        ),
    ):
        point = [x, y, z]
        if (axis is None) != (index is None):
            return error(422, "axis and index go together: give both for a slice, neither for the volume")
        if axis is None:
            data = state.heatmap_nifti(scan_id, query_scan, point, query)
            return Response(
                data,
                media_type="application/gzip",
                headers={"Content-Disposition": f'attachment; filename="heatmap-{scan_id}.nii.gz"'},
            )
        return Response(state.heatmap_png(scan_id, query_scan, point, axis, index, query), media_type="image/png")

    @app.post(
        "/api/search",
        response_model=SearchResponse,
        summary="The top-k most similar places to a point, across the store or in one target scan",
    )
    async def search(request: SearchRequest):
        start = time.perf_counter()
        args = (request.scan_id, request.point_mm, request.k, request.target, request.query, request.refine)
        embeds = (request.refine or state.refine) == "fine" or (request.query or state.query_from) == "centred"
        hits = await (in_turn(encoder_turns, state.search, *args) if embeds else run_in_threadpool(state.search, *args))
        return {"hits": hits, "ms": round((time.perf_counter() - start) * 1000.0, 1)}

    @app.post(
        "/api/scans",
        status_code=201,
        summary="Upload a NIfTI file or a zipped DICOM series; it is embedded with the store's model and added",
    )
    async def upload(file: UploadFile = File(..., description=".nii, .nii.gz, or .zip of one DICOM series")):
        return await in_turn(upload_turns, state.add_upload, file.file, file.filename or "upload")

    return app
