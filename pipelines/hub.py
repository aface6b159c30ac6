"""Where a SigLIP checkpoint comes from (a preset, a local directory, the Hugging Face cache or hub), found out
without torch: so that an entry point can say at once, before any heavy import, that the model cannot be had.

`check_model` is that check; `pipelines.siglip` runs it before loading, and an entry point may run it first.
"""

from __future__ import annotations

import functools
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.config import UserError

TINY = "tiny"
SO400M_RANDOM = "so400m-random"
# so400m-patch16-naflex's vision geometry with random weights (SigLIP 2 NaFlex): speed checks without the hub.
SO400M_NAFLEX_RANDOM = "so400m-naflex-random"
PRESETS = (TINY, SO400M_RANDOM, SO400M_NAFLEX_RANDOM)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"
# The two kinds of checkpoint this project embeds, by the `model_type` of their config.json: SigLIP (and SigLIP 2's
# fixed-resolution checkpoints, which are SiglipModels) and SigLIP 2 NaFlex (Siglip2Model).
SIGLIP = "siglip"
SIGLIP2 = "siglip2"
_KINDS = {"siglip": SIGLIP, "siglip_vision_model": SIGLIP, "siglip2": SIGLIP2, "siglip2_vision_model": SIGLIP2}
# Siglip2ImageProcessor's defaults, which every NaFlex checkpoint of the SigLIP 2 release uses.
NAFLEX_PATCH_SIZE = 16
NAFLEX_MAX_NUM_PATCHES = 256
# How long the one request that checks whether the hub answers may take (connecting, then reading).
HUB_PROBE_TIMEOUT_S = 5.0


class WeightsUnavailableError(UserError, RuntimeError):
    """The checkpoint could not be found or loaded; the message says what was tried (one line)."""


def check_model(name_or_path: str, revision: str | None = None) -> str | None:
    """Raise WeightsUnavailableError when `name_or_path` surely cannot be loaded; else say how to load it.

    Returns None to load as usual (a preset, a local directory, or a hub id the hub answers for), or the reason a
    hub id must come from the local cache alone (offline mode, no answer from the hub); then the cache is
    checked for its preprocessor config here, so that a model never downloaded fails now, in one line.
    """
    if name_or_path in PRESETS:
        return None
    check_local_path(name_or_path)
    if Path(name_or_path).expanduser().is_dir():
        return None
    offline = hub_unavailable(name_or_path, revision)
    if offline is not None:
        read_preprocessor_config(name_or_path, revision, offline)
    return offline


def read_preprocessor_config(
    name_or_path: str, revision: str | None, offline: str | None
) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's preprocessor config, and for a hub id the commit of the cached snapshot it came from."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{path} not found: a SigLIP checkpoint directory needs its {PREPROCESSOR_CONFIG}"
            )
        return json.loads(path.read_text()), None
    from huggingface_hub import hf_hub_download

    try:
        resolved = Path(hf_hub_download(name_or_path, PREPROCESSOR_CONFIG, revision=revision,
                                        local_files_only=offline is not None))
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    # The cache keeps each download under snapshots/<commit>/.
    snapshot = resolved.parent.name if resolved.parent.parent.name == "snapshots" else None
    return json.loads(resolved.read_text()), snapshot


def model_kind(name_or_path: str, revision: str | None, offline: str | None) -> str:
    """'siglip' or 'siglip2' from the checkpoint's config.json (`model_type`); any other architecture is one line.

    Read before any weights load, so that a CLIP or DINOv2 checkpoint given by mistake is named as such instead
    of failing in transformers (a size mismatch, or a SiglipVisionModel built from a foreign config).
    """
    if name_or_path in PRESETS:
        return SIGLIP2 if name_or_path == SO400M_NAFLEX_RANDOM else SIGLIP
    config = read_model_config(name_or_path, revision, offline)
    model_type = config.get("model_type")
    if model_type not in _KINDS:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise UserError(f"model.name_or_path={name_or_path!r} is a {model_type or 'untyped'} checkpoint "
                        f"({architectures}); this tool embeds SigLIP and SigLIP 2")
    return _KINDS[model_type]


def input_geometry(name_or_path: str, revision: str | None) -> tuple[str, int, int]:
    """What the vision tower takes, from the checkpoint's config files alone (no torch), for the serving launcher:
    ('naflex', max_num_patches, patch_size) for SigLIP 2 NaFlex, ('fixres', height, width) for SigLIP."""
    if name_or_path in PRESETS:
        return ("naflex", NAFLEX_MAX_NUM_PATCHES, NAFLEX_PATCH_SIZE) if name_or_path == SO400M_NAFLEX_RANDOM else (
            "fixres", 384, 384)
    offline = check_model(name_or_path, revision)
    kind = model_kind(name_or_path, revision, offline)
    config = read_preprocessor_config(name_or_path, revision, offline)[0]
    if kind == SIGLIP2:
        return ("naflex", int(config.get("max_num_patches", NAFLEX_MAX_NUM_PATCHES)),
                int(config.get("patch_size", NAFLEX_PATCH_SIZE)))
    size = config.get("size", {})
    return "fixres", int(size.get("height", 384)), int(size.get("width", 384))


def read_model_config(name_or_path: str, revision: str | None, offline: str | None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (a local directory, the cache or the hub)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / MODEL_CONFIG
        if not path.is_file():
            raise WeightsUnavailableError(
                f"model.name_or_path={name_or_path!r}: {path} not found; a checkpoint directory holds {MODEL_CONFIG}, "
                f"*.safetensors and {PREPROCESSOR_CONFIG}")
        return _json(path)
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(name_or_path, MODEL_CONFIG, revision=revision,
                                    local_files_only=offline is not None))
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(unavailable(name_or_path, exc, offline)) from exc
    return _json(path)


def _json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsUnavailableError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsUnavailableError(f"{path}: expected a JSON object")
    return config


def hub_unavailable(repo_id: str, revision: str | None) -> str | None:
    """Why a hub id must come from the local cache alone (offline mode, no answer from the hub), or None.

    One HEAD request for the checkpoint's preprocessor config, with a short timeout and no retries, stands in for
    the library's own (retried for about a minute when the hub cannot be reached); its answer is kept for the
    process. A hub that answers "no such model" or "not allowed" ends it here with WeightsUnavailableError; any
    other answer lets the load go ahead.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    return _probe(constants.ENDPOINT, repo_id, revision)


@functools.lru_cache(maxsize=64)
def _probe(endpoint: str, repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub.utils import build_hf_headers

    quoted = urllib.parse.quote(revision or "main", safe="")
    url = f"{endpoint}/{repo_id}/resolve/{quoted}/{PREPROCESSOR_CONFIG}"
    request = urllib.request.Request(url, method="HEAD", headers=build_hf_headers())
    opener = urllib.request.build_opener(_KeepRedirect)
    try:
        opener.open(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:  # the hub answered
        if exc.code in (401, 403, 404):
            raise WeightsUnavailableError(_refused(repo_id, revision, exc)) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # e.g. certificates this client lacks: leave it to the library
            return None
        return f"the hub at {endpoint} did not answer ({exc.reason})"
    except OSError as exc:  # a timeout while reading, a reset connection
        return f"the hub at {endpoint} did not answer ({type(exc).__name__}: {exc})"
    return None


class _KeepRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect (to the file store) already says the hub has the file: raise it as HTTPError, do not follow."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _refused(repo_id: str, revision: str | None, exc: urllib.error.HTTPError) -> str:
    # The hub says why in X-Error-Code / X-Error-Message; without a token it answers 401 for unknown repos too.
    why = exc.headers.get("X-Error-Message") or exc.headers.get("X-Error-Code") or exc.reason
    at = f" at revision {revision!r}" if revision else ""
    hint = ("check the id, or log in (`hf auth login` or HF_TOKEN) for a gated or private model"
            if exc.code in (401, 403) else "check the id and the revision")
    return (f"model.name_or_path={repo_id!r}{at}: the hub at {_endpoint()} refused it (HTTP {exc.code}: {why}); "
            f"{hint}, or give a local checkpoint directory")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_local_path(name_or_path: str) -> None:
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise WeightsUnavailableError(
            f"model.name_or_path={name_or_path!r}: no such directory; give a checkpoint directory "
            f"(config.json, *.safetensors, {PREPROCESSOR_CONFIG}) or a model hub id"
        )


def unavailable(name_or_path: str, exc: BaseException, offline: str | None = None) -> str:
    download = (f"Download it where the hub is reachable (`hf download {name_or_path} --local-dir DIR`) and pass "
                f"model.name_or_path=DIR, or use model=tiny for an offline demo")
    if offline is not None:  # the library's message says only "not in the cached files": say why we did not ask
        from huggingface_hub import constants

        return (f"could not load SigLIP weights for {name_or_path!r}: not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and {offline}. {download}")
    reason = " ".join(str(exc).split())[:300]
    return (
        f"could not load SigLIP weights for {name_or_path!r} from a local directory, the Hugging Face "
        f"cache or the hub ({type(exc).__name__}: {reason}). {download}"
    )
